//! The QUIC link to a relay in the cloud VPC: the agent's client (`[destination] type = "quic"`)
//! and the relay itself (`ha-edge relay`), over the wire protocol of `ha-edge-proto`.
//!
//! Must not break: authorization is by the client certificate's exact DNS name, never by what the
//! agent says about itself.

/// The agent's end.
pub mod client;
/// Partial transfers kept in S3, resumable by any replica.
pub mod remote;
/// `ha-edge relay`.
pub mod server;
/// Partial transfers and landing.
pub mod store;
/// Certificates and keys.
pub mod tls;
