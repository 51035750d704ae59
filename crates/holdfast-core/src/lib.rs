//! The Holdfast node: sessions, hub, engines and hooks.
//!
//! This crate knows no HTTP. A transport (the WebSocket server in `holdfast-server`, or an
//! in-memory pipe in tests) hands frames to [`transport::serve_connection`]; the [`Node`] owns
//! the [`hub::Hub`] of local connections, the engine ([`engine::Broker`] +
//! [`engine::PresenceStore`]) and the application [`handler::Handler`].

pub mod channel;
pub mod client;
pub mod config;
pub mod engine;
pub mod glob;
pub mod handler;
pub mod hub;
pub mod limit;
pub mod node;
pub mod session;
pub mod shard;
pub mod testing;
pub mod time;
pub mod transport;
mod wake;

pub use config::NodeConfig;
pub use node::Node;
