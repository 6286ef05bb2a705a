"""The FUSE layer: the mount's view of the catalog and the blobs, and its translation to pyfuse3.

- `view`: the `VFS`, a FUSE-free tree of nodes built from catalog snapshots, that opens files
  as blob `Reader`s (or referenced files) and checks references (testable without a mount);
- `handles`: the open files of a mount (the descriptor cache, deleted versions' files held
  open, the acknowledgement gc waits for), also without pyfuse3;
- `ops`: pyfuse3's `Operations`, a translator from kernel requests to the two above.

It reaches the catalog and the blobs only through their protocols (`catalog.Catalog`,
`blobs.BlobBackend`), never an implementation.
"""
