//! Discovery: where objects come from. Sources find complete files and offer them to the journal;
//! they never upload anything themselves.

pub mod bucket;
pub mod fs;
