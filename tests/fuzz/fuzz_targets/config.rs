//! The config parser (and a fleet document layered over a fixed local file) on any text: a
//! config or an error with a place, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

const BASE: &str = r#"gateway_id = "gw"
[[broker]]
host = "127.0.0.1"
[[route]]
name = "t"
topics = ["devices/+/telemetry"]
destination = "d"
[destination.d]
type = "directory"
path = "/tmp/d"
"#;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = edgeship::config::Config::parse(text, "fuzz.toml");
        let _ = edgeship::config::Config::parse_layered(BASE, "local.toml", text, "fuzz doc");
    }
});
