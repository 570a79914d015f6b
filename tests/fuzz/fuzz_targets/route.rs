//! From an MQTT message to its disposition: any topic and payload size through a router
//! built from a config with templates, never a panic; a record's partition key within
//! Kinesis' 256 characters.
#![no_main]
use edgeship::spool::Disposition;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r##"gateway_id = "gw"
[batch]
max_message_bytes = "64KiB"
[[broker]]
host = "127.0.0.1"
[[route]]
name = "per-device"
topics = ["devices/+/telemetry", "plant/#"]
destination = "d"
partition_key = "site/{topic[1]}/{topic[3]}"
explicit_hash_key = "{topic}"
[[route]]
name = "rest"
topics = ["#"]
destination = "d"
partition_key = "{route}-{topic}"
[destination.d]
type = "directory"
path = "/tmp/d"
"##;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (len, topic) = data.split_at(4);
    let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    let config = edgeship::config::Config::parse(CONFIG, "fuzz").unwrap();
    let router = edgeship::source::router::Router::new(&config);
    if let Disposition::Record { key, .. } = router.classify(topic, len) {
        let (partition_key, hash_key) = edgeship::key::split(&key);
        assert!(
            (1..=256).contains(&partition_key.chars().count()),
            "{key:?}"
        );
        if let Some(h) = hash_key {
            assert!(h.parse::<u128>().is_ok(), "{key:?}");
        }
    }
});
