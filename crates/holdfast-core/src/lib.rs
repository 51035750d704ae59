//! The Holdfast node: sessions, hub, engines and hooks.
//!
//! This crate knows no HTTP. A transport (the WebSocket transport in `holdfast-transport`, or an
//! in-memory pipe from [`testing`]) hands frames to [`transport::serve_connection`]; the [`Node`]
//! owns the [`hub::Hub`] of local connections, the engine ([`engine::Broker`] +
//! [`engine::PresenceStore`] + [`engine::CursorStore`]) and the application [`handler::Hooks`].

pub mod channel;
pub mod client;
pub mod config;
pub mod engine;
pub mod filter;
pub mod fossil;
pub mod glob;
pub mod handler;
pub mod hub;
pub mod limit;
pub mod node;
pub mod session;
pub mod shard;
pub mod testing;
pub mod time;
pub mod trace;
pub mod transport;
mod wake;

pub use config::NodeConfig;
pub use node::Node;
