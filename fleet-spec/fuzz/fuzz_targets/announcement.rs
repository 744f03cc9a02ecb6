//! Announcement and topic parsing must never panic, whatever the broker delivers.
#![no_main]

use fleet_spec::messages::{Announcement, Event, StatusReport};
use fleet_spec::topic::Topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Announcement::from_json(data);
    let _ = StatusReport::from_json(data);
    let _ = Event::from_json(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Topic::parse("fleet", text);
        if let Some((prefix, topic)) = text.split_once(' ') {
            let _ = Topic::parse(prefix, topic);
        }
    }
});
