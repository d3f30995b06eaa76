//! Chain of custody: a receipt for every delivered object version, `ha-edge receipts` to read
//! them, and (optionally) NDJSON batches in the bucket that chain by SHA-256, so that the cloud
//! side holds a tamper-evident record without access to the box.
//!
//! # Design
//! - A receipt is written in the journal transaction that marks its version delivered
//!   (`journal/receipts.rs`): there is never a delivery without its receipt, nor a receipt for
//!   something not verified in the bucket. Receipts are append-only (SQLite triggers refuse an
//!   UPDATE, and a DELETE of anything newer than the retention cutoff). What happens to the
//!   source afterwards (deleted, moved) is an appended `after_upload` event.
//! - Batches (`batch.rs`): every `every`, the receipts and events since the last batch become
//!   one NDJSON object `<prefix><agent>/<yyyy>/<mm>/<dd>/<seq>.ndjson`, written create-once
//!   (`If-None-Match: *`). Its first line is a header carrying the previous batch's SHA-256.
//!   The batch is recorded in the journal (number, range, SHA-256) before it is uploaded, so a
//!   crash uploads the same bytes under the same key again, and a second writer cannot fork the
//!   chain. `verify.rs` walks the chain in the bucket.
//!
//! Must not break: one receipt per delivered version, never rewritten; batch n+1 carries the
//! SHA-256 of batch n's bytes exactly as stored.

pub mod batch;
pub mod cli;
pub mod record;
pub mod verify;
