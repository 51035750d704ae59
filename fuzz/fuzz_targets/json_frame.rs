//! JSON frames into commands: any bytes give commands or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    holdfast_fuzz::decode_all(holdfast_protocol::Encoding::Json, data);
});
