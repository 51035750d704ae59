//! The wall clock, for what the protocol states in wall time: publication times and token
//! expiries. Everything that waits runs on tokio time (see `session`).

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> i64 {
    unix_ms() / 1000
}
