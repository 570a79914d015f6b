//! The fleet document reader on any bytes, against a pinned key: refused with a reason (it
//! cannot carry a valid signature), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 32];
    assert!(edgeship::fleet::document::verify(data, &[key]).is_err());
});
