//! Schema migrations, applied in order and tracked in `PRAGMA user_version`.
//!
//! Must not break: migrations are append only and each runs once in its own transaction; a row
//! written by an older schema must mean the same after migrating.

/// Each entry moves the schema from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE objects (
    id              INTEGER PRIMARY KEY,
    source          TEXT    NOT NULL,
    rel_path        BLOB    NOT NULL,   -- raw bytes of the path relative to the source root
    key             TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    inode           INTEGER NOT NULL,
    state           TEXT    NOT NULL,
    sha256          BLOB,               -- whole-object SHA-256, fixed before any byte is sent
    upload_id       TEXT,
    part_size       INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    discovered_ms   INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    delivered_ms    INTEGER
);
CREATE INDEX objects_by_path  ON objects (source, rel_path, id);
CREATE INDEX objects_by_state ON objects (state, next_attempt_ms);

CREATE TABLE parts (
    object_id   INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    part_number INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    sha256_b64  TEXT    NOT NULL,
    etag        TEXT    NOT NULL,
    PRIMARY KEY (object_id, part_number)
) WITHOUT ROWID;

CREATE TABLE errors (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    object_id INTEGER,
    message   TEXT    NOT NULL
);

-- Small facts the daemon publishes for `ha-edge status` (destination health, counters).
CREATE TABLE agent_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"#,
    // 2: dispatch walks only active rows in id order. The (state, next_attempt_ms) index made
    // every `runnable` query sort all pending rows: quadratic over a large batch.
    r#"
DROP INDEX objects_by_state;
CREATE INDEX objects_active ON objects (id)
    WHERE state IN ('pending', 'uploading', 'completing', 'delivered');
CREATE INDEX objects_backoff ON objects (next_attempt_ms)
    WHERE state IN ('pending', 'uploading', 'completing', 'delivered');
"#,
    // 3: bucket sources. The ETag the source object was listed with (change detection beside
    // size and LastModified), or, if the listing had none, the one a transfer pinned itself to
    // (If-Match on every ranged read). NULL for directory sources.
    r#"
ALTER TABLE objects ADD COLUMN etag TEXT;
"#,
    // 4: hardening. What the destination answered for each delivery (its ETag, and VersionId
    // where the bucket is versioned): a new version replaces only that object (If-Match). The
    // source file's ctime and the SHA-256 of every part, fixed with the whole-object hash: each
    // part sent must be those bytes. Paths refused at discovery (kept for `status`), and an
    // index to find the previous delivery of a key.
    r#"
ALTER TABLE objects ADD COLUMN dest_etag TEXT;
ALTER TABLE objects ADD COLUMN dest_version TEXT;
ALTER TABLE objects ADD COLUMN ctime_ns INTEGER;
ALTER TABLE objects ADD COLUMN part_hashes BLOB;
CREATE INDEX objects_by_key ON objects (key, id) WHERE dest_etag IS NOT NULL;
CREATE TABLE refused (
    source   TEXT    NOT NULL,
    rel_path BLOB    NOT NULL,
    reason   TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL,
    PRIMARY KEY (source, rel_path)
) WITHOUT ROWID;
"#,
    // 5: a row's source version says what it is (`kind`: 'file' or 'object') instead of a
    // hash of a bucket object's ETag in the inode column. `etag` is now the ETag the listing
    // gave only (part of the version); `pinned_etag` the one a transfer pinned itself to when
    // the listing had none (forgotten when the object starts over). Rows of schema 4: an
    // object had its listed ETag in `etag` and its hash in `inode`, or inode 0 and maybe a
    // pinned ETag in `etag`; files never had an ETag. (A bucket listed without any ETag and
    // never pinned cannot be told from a file here: such a row is sent once more.)
    r#"
ALTER TABLE objects ADD COLUMN kind TEXT NOT NULL DEFAULT 'file';
ALTER TABLE objects ADD COLUMN pinned_etag TEXT;
UPDATE objects SET kind = 'object', pinned_etag = etag, etag = NULL
 WHERE etag IS NOT NULL AND inode = 0;
UPDATE objects SET kind = 'object', inode = 0 WHERE etag IS NOT NULL;
"#,
    // 6: chain of custody and priorities. `started_ms`: when a version's upload began.
    // `priority`: its source's (higher first); the active index now serves the dispatch order
    // (priority, then oldest first). `receipts`: one append-only receipt per delivered version,
    // written in the transaction that marks it delivered; `receipt_events`: what happened to
    // the source afterwards (deleted, moved). Neither is ever updated; rows are deleted only by
    // retention, and only those older than the cutoff retention recorded itself. Each
    // `receipt_batches` row is one NDJSON batch uploaded to the bucket, with the SHA-256 the next
    // batch carries.
    r#"
ALTER TABLE objects ADD COLUMN started_ms INTEGER;
ALTER TABLE objects ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX objects_active;
CREATE INDEX objects_active ON objects (priority DESC, id)
    WHERE state IN ('pending', 'uploading', 'completing', 'delivered');
CREATE TABLE receipts (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    object_id INTEGER NOT NULL UNIQUE,
    source    TEXT    NOT NULL,
    at_ms     INTEGER NOT NULL,
    receipt   TEXT    NOT NULL
);
CREATE INDEX receipts_by_time ON receipts (at_ms);
CREATE TABLE receipt_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt_seq INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    event       TEXT    NOT NULL
);
CREATE INDEX receipt_events_by_receipt ON receipt_events (receipt_seq);
CREATE TABLE receipt_batches (
    seq          INTEGER PRIMARY KEY,
    key          TEXT    NOT NULL,
    sha256       TEXT    NOT NULL,
    last_receipt INTEGER NOT NULL,
    last_event   INTEGER NOT NULL,
    lines        INTEGER NOT NULL,
    uploaded_ms  INTEGER
);
CREATE TRIGGER receipts_append_only BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER receipt_events_append_only BEFORE UPDATE ON receipt_events
BEGIN SELECT RAISE(ABORT, 'receipt events are append-only'); END;
CREATE TRIGGER receipts_kept BEFORE DELETE ON receipts
WHEN OLD.at_ms >= COALESCE((SELECT CAST(value AS INTEGER) FROM agent_state
                             WHERE name = 'receipts_cutoff_ms'), 0)
BEGIN SELECT RAISE(ABORT, 'receipts are deleted only by retention'); END;
CREATE TRIGGER receipt_events_kept BEFORE DELETE ON receipt_events
WHEN OLD.at_ms >= COALESCE((SELECT CAST(value AS INTEGER) FROM agent_state
                             WHERE name = 'receipts_cutoff_ms'), 0)
BEGIN SELECT RAISE(ABORT, 'receipt events are deleted only by retention'); END;
"#,
    // 7: record checks and studies. `flag` holds the failed check of an object sent with
    // `on_invalid = "upload-flagged"` (fixed before its first byte, so a resumed upload is
    // tagged too). `studies` are directories released whole (`complete_when.stable_dir`): the
    // files released together, and when their completion object was written.
    r#"
ALTER TABLE objects ADD COLUMN flag TEXT;
CREATE TABLE studies (
    id           INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    dir          BLOB    NOT NULL,
    key          TEXT    NOT NULL,
    files        TEXT    NOT NULL,
    released_ms  INTEGER NOT NULL,
    completed_ms INTEGER,
    note         TEXT
);
CREATE INDEX studies_open ON studies (id) WHERE completed_ms IS NULL;
"#,
    // 8: single-pass uploads. `upload_checksum` = 'crc64nvme': a multipart upload checked by a
    // full-object CRC-64/NVME, started without a hash pass; its SHA-256 and whole CRC
    // (`crc64nvme`, base64) are fixed once every byte was read, before completion. NULL: the
    // SHA-256 was fixed before any byte was sent (as before). Each part's CRC-64/NVME, for the
    // completion's part list and for a resumed read to check the bytes the server holds.
    r#"
ALTER TABLE objects ADD COLUMN upload_checksum TEXT;
ALTER TABLE objects ADD COLUMN crc64nvme TEXT;
ALTER TABLE parts ADD COLUMN crc64nvme_b64 TEXT;
"#,
];

/// The schema this build writes.
pub const CURRENT: i64 = MIGRATIONS.len() as i64;
