//! Holdfast's load generator and delivery verifier, as a library; the `holdfast-bench` binary
//! is a thin CLI over it.

pub mod abuse;
pub mod client;
pub mod publish;
pub mod verify;
