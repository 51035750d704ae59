//! Holdfast's load generator, peer benchmarks and delivery verifier, as a library; the
//! `holdfast-bench` binary is a thin CLI over it.

pub mod abuse;
pub mod adapter;
pub mod baseline;
pub mod client;
pub mod cursor_window;
pub mod fanout;
pub mod load;
pub mod map;
pub mod peers;
pub mod publish;
pub mod report;
pub mod scenario;
pub mod source;
pub mod verify;
pub mod wire;
