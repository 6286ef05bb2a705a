"""artifactfs: a content-addressed artifact store with a read-only FUSE view.

The API follows the Weights & Biases Artifacts API::

    from artifactfs import Store, Artifact
    art = Artifact("mnist", type="dataset")
    art.add_dir("images/")
    v = Store().log_artifact(art, aliases=["best"])
"""

from .artifact import Artifact
from .errors import ArtifactFSError, CatalogError, DigestMismatch, InvalidName, NotFound, StoreFull
from .manifest import Manifest, ManifestEntry
from .store import ArtifactVersion, GCReport, Store

__all__ = [
    "Artifact",
    "ArtifactFSError",
    "ArtifactVersion",
    "CatalogError",
    "DigestMismatch",
    "GCReport",
    "InvalidName",
    "Manifest",
    "ManifestEntry",
    "NotFound",
    "Store",
    "StoreFull",
]
__version__ = "0.1.0"
