//! The standalone Holdfast server: configuration, JWT verification, HTTP proxies, the server API
//! and the operator endpoints over a [`holdfast_core::Node`], with the transports of
//! `holdfast-transport`.
//!
//! `main.rs` only parses arguments; [`server::run`] takes the listeners and a shutdown future, so
//! tests start a real server on `127.0.0.1:0` without signals.

pub mod admin;
pub mod api;
mod api_map;
pub mod config;
pub mod consumer;
pub mod jwt;
pub mod listen;
pub mod otel;
pub mod proxy;
pub mod server;
pub mod webhook;
