//! The KPL aggregate decoder on any bytes: an error or records, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgeship::frame::kpl::decode(data);
});
