//! Protobuf frames (varint-length-prefixed commands) into commands.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::decode_all(holdfast_protocol::Encoding::Protobuf, data);
});
