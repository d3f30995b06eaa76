//! Discovery: where objects come from. Sources find complete files and offer them to the journal;
//! they never upload anything themselves.
//!
//! # The contract of a source
//! - It runs as one task (`run`, until told to stop) or one pass (`scan_once`, for `--once`).
//! - It offers `Candidate`s (relative path, key, `Version`) in batches; the journal decides what
//!   is new, so offering the same thing again is harmless and a restart needs no state.
//! - It notifies the scheduler's `wake` after an offer that added something, and journals what it
//!   refuses (with why) for `status`.
//! - It owns the question "is this complete?"; the scheduler owns "when is it sent?".
//!
//! Must not break: a source only ever offers to the journal; it never uploads, deletes or moves
//! before the scheduler says so.

/// Buckets (MinIO, S3), listed.
pub mod bucket;
/// Directories (local or NFS), scanned and watched.
pub mod fs;
