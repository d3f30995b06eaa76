//! Discovery: where objects come from. Sources find complete files and offer them to the journal;
//! they never upload anything themselves.
//!
//! Must not break: a source only ever offers to the journal; it never uploads, deletes or moves
//! before the scheduler says so.

pub mod bucket;
pub mod fs;
