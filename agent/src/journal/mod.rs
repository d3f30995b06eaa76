//! The journal: every object ha-edge has seen, and every multipart part it has sent, in SQLite.
//!
//! # States
//! ```text
//!            offer (settled file)                hash + CreateMultipartUpload
//!   (none) ───────────────────────▶ pending ──────────────────────────────▶ uploading
//!                                     │  ▲                                    │ all parts recorded
//!                     single PUT ok   │  │ NoSuchUpload / file changed        ▼
//!                     + HEAD verified │  └──────────────────────────────── completing
//!                                     ▼                                       │ Complete + HEAD verified
//!                                 delivered ◀─────────────────────────────────┘
//!                                     │ after_upload done (keep: at once)
//!                                     ▼
//!                                   done
//!   any active state ──▶ rejected (permanent object error)   pending ──▶ vanished (source gone)
//! ```
//!
//! # Invariants
//! - A state is committed *before* the action it allows: the SHA-256 and version before any
//!   byte is sent; the upload id before the first part; `completing` before
//!   CompleteMultipartUpload; `delivered` (after verification) before the source is deleted or
//!   moved. So after a crash the journal never claims more than happened.
//! - A part row is written only after the server acknowledged that part (its ETag), so the parts
//!   table is a subset of what the server holds. A part that was sent but not recorded is sent
//!   again: at most `parts_in_flight` parts per crash.
//! - An object's identity is its source, its path relative to the source root, and its
//!   `Version` (a file's size, mtime and inode; a bucket object's ETag, size and LastModified).
//!   A new version after delivery is a new row; a pending row is updated in place.
//!
//! # Recovery
//! Nothing special runs at start-up: `uploading` and `completing` rows are simply runnable. The
//! uploader reconciles them with the server (ListParts; on NoSuchUpload a HEAD tells whether the
//! completion went through before the crash) and continues or starts that object over. A row
//! becomes `uploading` when its hash is fixed, *before* CreateMultipartUpload; an `uploading` row
//! without an upload id therefore means "an upload may exist that we never recorded", and the
//! uploader looks for that key's uploads (ListMultipartUploads) and aborts them before it starts
//! over.
//!
//! # Disk full
//! The writer thread runs each group of requests in one transaction. If SQLite reports the disk
//! full, the transaction is rolled back and the same group runs again after a growing pause
//! (0.5 s to 10 s), logged once: every caller simply waits, so nothing happens that could not be
//! recorded, and work resumes by itself when space returns.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a commit survives power loss, and readers
//! (`ha-edge status`) never block the writer.
//!
//! Must not break: the invariants below; every other part of ha-edge relies on them.

/// States, rows, versions and the offer rule.
mod model;
#[cfg(test)]
mod model_check;
mod queries;
mod receipts;
mod schema;
mod status;
mod store;
mod studies;
mod worker;

pub use model::{Custody, Landed, ObjectRow, PartRow, State};
pub use receipts::{BatchRow, Filter as ReceiptFilter, ReceiptLine};
pub use status::{ObjectFilter, ObjectItem, Status};
#[cfg(test)]
pub use store::{now_ms, Clock};
pub use store::{Candidate, Hashed, Journal, JournalError};
pub use studies::OpenStudy;
