//! The QUIC link to a relay in the cloud VPC: the agent's client (`[destination] type = "quic"`)
//! and the relay itself (`ha-edge relay`), over the wire protocol of `ha-edge-proto`.

pub mod client;
pub mod server;
pub mod store;
pub mod tls;
