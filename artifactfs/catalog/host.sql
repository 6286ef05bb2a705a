-- artifactfs host state, version 1: what belongs to this machine alone, never to the catalog the
-- hosts of a store share. <root>/host.db; the version lives in PRAGMA user_version.

-- Stat cache: lets a re-log of an unchanged file skip hashing it (device and inode numbers mean
-- something on this host only).
CREATE TABLE IF NOT EXISTS stat_cache (
    dev         INTEGER NOT NULL,         -- st_dev of the source file
    ino         INTEGER NOT NULL,         -- st_ino
    size        INTEGER NOT NULL,         -- st_size when hashed
    mtime_ns    INTEGER NOT NULL,         -- st_mtime_ns when hashed
    ctime_ns    INTEGER NOT NULL,         -- st_ctime_ns when hashed
    blake3      TEXT NOT NULL,            -- content digest
    xxh128      TEXT NOT NULL,            -- base64 XXH128
    md5         TEXT,                     -- base64 MD5 (W&B's digest of file references), NULL
                                          -- when it was not computed
    PRIMARY KEY (dev, ino)
) WITHOUT ROWID;

-- Running daemons of this host that mount the store (zero-copy download; gc waits for their
-- acknowledgement of a delete); liveness checked by pid.
CREATE TABLE IF NOT EXISTS mounts (
    mountpoint  TEXT PRIMARY KEY,         -- absolute path of the mount
    pid         INTEGER NOT NULL,         -- daemon process id
    artifact    TEXT,                     -- NAME:vN for a single-version mount, NULL for the whole store
    started_at  REAL NOT NULL,            -- unix time the mount became ready
    seen_generation INTEGER NOT NULL DEFAULT 0 -- catalog generation whose deletions this daemon
                                          -- has handled (pinned open files): gc waits for it
);
