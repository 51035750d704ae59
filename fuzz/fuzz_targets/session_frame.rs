//! The whole frame-to-command path of a connection: after a valid connect, the input is
//! delivered as the connection's next frames (split at 0xFF bytes) to a real node over the
//! memory engine, as JSON or protobuf (first byte). The session must answer or close with a
//! protocol code, never panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::run_session(data);
});
