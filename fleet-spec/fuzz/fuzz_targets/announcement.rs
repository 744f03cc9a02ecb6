//! Announcement, enrollment claim and topic parsing must never panic, whatever the
//! broker delivers.
#![no_main]

use fleet_spec::messages::{sanitize_fact, Announcement, EnrollClaim, Event, StatusReport};
use fleet_spec::topic::{parse_enroll_topic, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Announcement::from_json(data);
    let _ = StatusReport::from_json(data);
    let _ = Event::from_json(data);
    let _ = EnrollClaim::from_json(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Topic::parse("fleet", text);
        let _ = parse_enroll_topic("fleet", "acme", text);
        let _ = sanitize_fact(text);
        if let Some((prefix, topic)) = text.split_once(' ') {
            let _ = Topic::parse(prefix, topic);
        }
    }
});
