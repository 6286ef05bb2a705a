-- artifactfs catalog schema, version 5: what every host of a store shares (host.sql holds the
-- rest). Applied once to a new catalog; the version lives in
-- PRAGMA user_version. Idempotent: every statement uses IF NOT EXISTS.

-- One row per artifact name.
CREATE TABLE IF NOT EXISTS artifacts (
    id          INTEGER PRIMARY KEY,      -- stable artifact id
    name        TEXT NOT NULL UNIQUE,     -- [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 chars
    type        TEXT NOT NULL,            -- "dataset", "model", ... (set by the first version)
    next_index  INTEGER NOT NULL DEFAULT 0, -- N of the next v<N>; never reused after a delete
    created_at  REAL NOT NULL             -- unix time of the first version
);

-- One row per logged (immutable) version.
CREATE TABLE IF NOT EXISTS versions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- version id: never reused, so inode numbers
                                          -- derived from it stay unambiguous after deletes
    artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
    idx         INTEGER NOT NULL,         -- N of v<N>
    digest      TEXT NOT NULL,            -- manifest digest: blake3 over the sorted entries
    description TEXT,                     -- free text, may be NULL
    metadata    TEXT NOT NULL,            -- JSON object
    created_at  REAL NOT NULL,            -- unix time of the log
    n_entries   INTEGER NOT NULL,         -- number of manifest entries
    total_size  INTEGER NOT NULL,         -- sum of known entry sizes, bytes
    UNIQUE (artifact_id, idx)
);

-- Manifest entries of a version: one row per file path.
CREATE TABLE IF NOT EXISTS entries (
    version_id  INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    path        TEXT NOT NULL,            -- checked relative POSIX path inside the version
    digest      TEXT NOT NULL,            -- blake3 hex of the content (of a symlink: of its target;
                                          -- '' for a directory); the URI for unchecked or tracked refs
    size        INTEGER,                  -- bytes; NULL for tracked references
    ref         TEXT,                     -- reference URI, NULL for content held in the blob store
    blob        TEXT,                     -- blob id holding the content, NULL when served from ref
    xxh128      TEXT,                     -- base64 XXH128 of the content (W&B digest), NULL when not hashed
    extra       TEXT NOT NULL DEFAULT '{}', -- JSON: source URI, stat fingerprint, MD5 of references,
                                          -- what an import kept of W&B's entry, user extras
    kind        TEXT NOT NULL DEFAULT 'file', -- 'file', 'symlink' or 'directory' (an empty one)
    executable  INTEGER NOT NULL DEFAULT 0, -- 1: a file that had an x bit (0555 in the mount)
    target      TEXT,                     -- a symlink's relative target, NULL otherwise
    PRIMARY KEY (version_id, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_blob ON entries(blob) WHERE blob IS NOT NULL;

-- Pack files: small blobs appended to one file (<root>/blobs/packs/<name>.pack), written by a
-- log and durable before the commit that adds their row; a pack file with no row is debris.
CREATE TABLE IF NOT EXISTS packs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: a mount's nodes carry pack ids
    name        TEXT NOT NULL UNIQUE,     -- the file name: 32 hex digits
    size        INTEGER NOT NULL,         -- bytes of the file
    created_at  REAL NOT NULL             -- unix time of the commit that added it
);

-- Where each packed blob lives: a blob is a location (a blob may also be a loose file).
CREATE TABLE IF NOT EXISTS packed (
    oid         TEXT PRIMARY KEY,         -- blob id (blake3 hex of the bytes at the location)
    pack        INTEGER NOT NULL REFERENCES packs(id),
    start       INTEGER NOT NULL,         -- byte offset in the pack file
    size        INTEGER NOT NULL          -- bytes
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS packed_by_pack ON packed(pack);

-- Aliases ("latest", "best", ...): each names exactly one version of its artifact.
CREATE TABLE IF NOT EXISTS aliases (
    artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
    alias       TEXT NOT NULL,            -- a name that is not v<N>
    version_id  INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    PRIMARY KEY (artifact_id, alias)
) WITHOUT ROWID;

-- Single-row counters.
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,         -- "generation": bumped by every change a mount must show;
                                          -- "deleted_generation": the generation of the last delete
    value       INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('deleted_generation', 0);
