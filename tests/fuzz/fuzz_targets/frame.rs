//! The frame decoders (collecting and streaming) on any bytes: an error or frames, never a
//! panic, and both agree.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let collected = edgeship::frame::decode_frame(data);
    if let Ok((header, records)) = edgeship::frame::read_frame(data) {
        let streamed: Result<Vec<_>, _> = records.take(1 << 16).collect();
        if let (Ok(frame), Ok(records)) = (&collected, &streamed) {
            if header.records as usize <= 1 << 16 {
                assert_eq!(&frame.records, records);
            }
        }
    }
    if let Ok(frame) = collected {
        for r in &frame.records {
            let _ = edgeship::decode::json_line(&frame.gateway, r);
        }
    }
});
