//! The static live dashboard that `build` writes next to its output:
//!
//! ```text
//! DIR/dashboard/index.html, style.css, app.js   the page (plain HTML/CSS/JS, embedded here)
//! DIR/dashboard/vendor/mqtt.min.js              MQTT.js 5.16.0 browser bundle (MIT, vendored)
//! DIR/dashboard/vendor/mqtt.LICENSE.md          its licence
//! DIR/dashboard/config.js                       this build: fleet, topic prefix, broker URL,
//!                                               each device's labels and built commit
//! ```
//!
//! The page is served by whatever serves the bundles, or opened from disk; it connects to
//! the broker over MQTT-over-WebSockets and only subscribes (to the fleet's retained
//! `status` and `online` topics and its `events`). There is no server process of ours.
//!
//! Architecture invariant: the page never puts what arrives over MQTT into the document
//! as HTML (only as text), and loads nothing but its own files and the broker.
//! `config.js` holds only what `index.json` already publishes (no secrets): it is JSON
//! (valid JavaScript), written by serde, so no repository string can leave its literal.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::build::{write_atomic, BuildError, Index};

/// The page's files, embedded into the binary: (path under `dashboard/`, bytes).
pub const ASSETS: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../dashboard/index.html")),
    ("style.css", include_bytes!("../dashboard/style.css")),
    ("app.js", include_bytes!("../dashboard/app.js")),
    ("vendor/mqtt.min.js", include_bytes!("../dashboard/vendor/mqtt.min.js")),
    ("vendor/mqtt.LICENSE.md", include_bytes!("../dashboard/vendor/mqtt.LICENSE.md")),
];

/// What `config.js` tells the page.
#[derive(Debug, Serialize)]
struct Config<'a> {
    fleet: &'a str,
    topic_prefix: &'a str,
    /// The broker's WebSocket URL (`ws://` or `wss://`), empty when not given at build
    /// time (the page then asks for `?broker=`).
    broker: &'a str,
    commit: &'a str,
    devices: BTreeMap<&'a str, DeviceConfig<'a>>,
}

#[derive(Debug, Serialize)]
struct DeviceConfig<'a> {
    labels: &'a BTreeMap<String, String>,
    commit: &'a str,
    version: u64,
}

/// Checks a `--dashboard-broker` URL: `ws://` or `wss://` with a host.
pub fn check_broker_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| format!("{url:?} is not a WebSocket URL: use ws://host:port[/path] or wss://..."))?;
    if rest.is_empty() || rest.starts_with('/') || rest.starts_with(':') {
        return Err(format!("{url:?} names no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} contains whitespace"));
    }
    Ok(())
}

/// The content of `config.js` for `index`.
pub fn config_js(index: &Index, broker: Option<&str>) -> String {
    let config = Config {
        fleet: &index.fleet,
        topic_prefix: &index.topic_prefix,
        broker: broker.unwrap_or(""),
        commit: &index.commit,
        devices: index
            .devices
            .iter()
            .map(|(id, e)| {
                (id.as_str(), DeviceConfig { labels: &e.labels, commit: &e.commit, version: e.version })
            })
            .collect(),
    };
    // serde_json escapes quotes and control characters; `<` is escaped too, so that the
    // text stays inert even if someone pastes it into an inline <script>.
    let json = serde_json::to_string(&config).expect("a map of strings serializes").replace('<', "\\u003c");
    format!("// Written by fleet-bundler build: this build's fleet, for the dashboard.\nwindow.FLEET_DASHBOARD = {json};\n")
}

/// Writes `out/dashboard/` for the build whose index is `out/index.json`. Files that
/// already hold the right bytes are left alone.
pub fn write(out: &Path, broker: Option<&str>) -> Result<(), BuildError> {
    let index_path = out.join("index.json");
    let index = Index::read(&index_path)?.ok_or_else(|| BuildError::BadIndex {
        path: index_path.clone(),
        message: "missing after the build".into(),
    })?;
    let dir = out.join("dashboard");
    let config = config_js(&index, broker);
    let files = ASSETS.iter().copied().chain([("config.js", config.as_bytes())]);
    for (name, bytes) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| BuildError::Io { path: parent.into(), source })?;
        }
        if std::fs::read(&path).is_ok_and(|existing| existing == bytes) {
            continue;
        }
        write_atomic(&path, bytes, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::IndexEntry;

    fn index() -> Index {
        let labels: BTreeMap<String, String> =
            [("site".to_string(), "</script><img src=x onerror=alert(1)>".to_string())].into();
        Index {
            fleet: "acme".into(),
            commit: "c".repeat(40),
            topic_prefix: "corp/iot".into(),
            devices: [(
                "gw-1".to_string(),
                IndexEntry {
                    version: 7,
                    digest: "d".repeat(64),
                    size: 1,
                    commit: "c".repeat(40),
                    state_digest: "s".into(),
                    labels,
                },
            )]
            .into(),
            rollout: None,
        }
    }

    #[test]
    fn config_js_is_one_json_literal_with_no_raw_angle_brackets() {
        let js = config_js(&index(), Some("ws://broker:9001"));
        let json = js
            .strip_prefix("// Written by fleet-bundler build: this build's fleet, for the dashboard.\nwindow.FLEET_DASHBOARD = ")
            .and_then(|s| s.strip_suffix(";\n"))
            .expect("the shape of config.js");
        assert!(!json.contains('<'), "{json}");
        let v: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert_eq!(v["fleet"], "acme");
        assert_eq!(v["topic_prefix"], "corp/iot");
        assert_eq!(v["broker"], "ws://broker:9001");
        assert_eq!(v["devices"]["gw-1"]["labels"]["site"], "</script><img src=x onerror=alert(1)>");
        assert_eq!(v["devices"]["gw-1"]["version"], 7);
    }

    #[test]
    fn broker_urls_must_be_websockets_with_a_host() {
        assert!(check_broker_url("ws://127.0.0.1:9001").is_ok());
        assert!(check_broker_url("wss://broker.example.com/mqtt").is_ok());
        for bad in ["mqtt://h:1883", "http://h", "ws://", "ws://:9001", "ws://h :1", "h:9001"] {
            assert!(check_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn write_puts_every_asset_and_the_config_under_dashboard() {
        let out = tempfile::tempdir().expect("tempdir");
        let index = index();
        std::fs::write(out.path().join("index.json"), serde_json::to_vec(&index).expect("json"))
            .expect("write");
        write(out.path(), None).expect("write");
        for (name, bytes) in ASSETS {
            assert_eq!(
                &std::fs::read(out.path().join("dashboard").join(name)).expect("asset"),
                bytes,
                "{name}"
            );
        }
        let config = std::fs::read_to_string(out.path().join("dashboard/config.js")).expect("config.js");
        assert!(config.contains("\"broker\":\"\""), "{config}");
        // The page loads only files of its own directory, and the MQTT client is vendored.
        let html = std::str::from_utf8(ASSETS[0].1).expect("utf-8");
        assert!(!html.contains("http://") && !html.contains("https://"), "no remote resources");
        for script in ["vendor/mqtt.min.js", "config.js", "app.js"] {
            assert!(html.contains(&format!("<script src=\"{script}\"></script>")), "{script}");
        }
    }
}
