//! The scheduler: which object goes when, and what happens after. Three parts, each testable
//! on its own:
//! - `health`: a pure machine of destination health and per-source pauses (explicit time);
//! - `policy`: the one mapping of a delivery's outcome to a journal transition, a delay and a
//!   count (every scheduler delay is defined there);
//! - `dispatch`: the driver, a `select!` loop doing the IO those two decide.
//!
//! Must not break: the scheduler is the only place where delivery outcomes become journal
//! states; a source is deleted or moved only after its delivery is committed.

/// The driver.
pub mod dispatch;
/// Destination health and source pauses (pure).
pub mod health;
/// From outcome to transition, delay and count (pure).
pub mod policy;

pub use dispatch::{Intake, Summary, Wiring};
