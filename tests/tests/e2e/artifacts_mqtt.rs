//! Artifacts over MQTT: a broker-only fleet (`publish --blobs-over-mqtt`, no
//! `--base-url`, devices without `fetch.base_url`) delivers a file over the artifact
//! threshold as retained chunks on `<prefix>/<fleet>/blobs/<sha256>/<n>`; the agent
//! takes them one at a time and applies the bundle once the blob hashed right. A second
//! publish sends no blob again; a chunk with the wrong bytes gets the blob refused by its
//! digest, and nothing is applied; a missing chunk times out, and the download resumes
//! from the partial file once the chunk is there.

use anyhow::{ensure, Result};
use fleet_e2e::fleet::{bundler, last_error_code, sha256_hex, state};
use fleet_e2e::{Device, DeviceWatch, FleetRepo, Mosquitto};
use serde_json::Value;

use crate::common::*;

/// 256 KiB, `fleet_spec::topic::BLOB_CHUNK`.
const CHUNK: usize = 256 << 10;

/// A few MB of bytes no compressor shrinks, not a whole number of chunks.
fn firmware() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..3 * CHUNK * 4 + 12_345)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A fleet with one device `gw-1` and app `fw` delivering `files/fw.bin`; built.
fn fleet_with_firmware(bytes: &[u8]) -> Result<(FleetRepo, String)> {
    let mut fleet = FleetRepo::new("acme")?;
    fleet.add_device("gw-1", &[])?;
    fleet.write("apps/fw/files/fw.bin", bytes)?;
    fleet.write("apps/fw/app.yaml", "files:\n  - source: files/fw.bin\n")?;
    let commit = fleet.commit("firmware as an artifact")?;
    fleet.build()?;
    Ok((fleet, commit))
}

/// `fleet-bundler publish --blobs-over-mqtt` without `--base-url`; the `--json` summary.
fn publish_over_mqtt(fleet: &FleetRepo, broker: &Mosquitto) -> Result<Value> {
    let out = fleet.out_dir().to_string_lossy().into_owned();
    let url = broker.url();
    let args = ["publish", "--out", &out, "--broker", &url, "--blobs-over-mqtt", "--json", "--timeout", "5s"];
    bundler(&args)?.check()?.json()
}

#[test]
fn an_artifact_reaches_a_broker_only_device_in_chunks() -> Result<()> {
    let broker = Mosquitto::start()?;
    let bytes = firmware();
    let sha = sha256_hex(&bytes);
    let (fleet, commit) = fleet_with_firmware(&bytes)?;
    ensure!(fleet.out_dir().join("blobs").join(&sha).exists(), "the build made no blob {sha}");

    let published = publish_over_mqtt(&fleet, &broker)?;
    assert_eq!(published["blobs_published"], serde_json::json!([sha]), "{published}");
    // The chunks are retained: 13, the last one shorter.
    let last =
        broker.client().retained_message(&format!("fleet/acme/blobs/{sha}/12"))?.expect("the last chunk");
    assert_eq!(last.payload.len(), bytes.len() - 12 * CHUNK);
    assert!(broker.client().retained_message(&format!("fleet/acme/blobs/{sha}/13"))?.is_none());

    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let status = wait_converged(&watch, &device, &commit)?;
    assert!(status["last_error"].is_null(), "{status}");
    let path = fleet.app_file("fw", "files/fw.bin");
    assert_eq!(device.sha256(&path).as_deref(), Some(sha.as_str()), "{}", device.log_tail());

    // Nothing changed: the blob is not sent again.
    let again = publish_over_mqtt(&fleet, &broker)?;
    assert_eq!(again["blobs_published"], serde_json::json!([]), "{again}");
    assert_eq!(again["announced"], serde_json::json!([]), "{again}");
    let recorded: Value = serde_json::from_slice(&std::fs::read(fleet.out_dir().join("published.json"))?)?;
    assert_eq!(recorded["mqtt_blobs"][&sha], bytes.len(), "{recorded}");
    Ok(())
}

#[test]
fn a_wrong_chunk_gets_the_blob_refused_and_nothing_applied() -> Result<()> {
    let broker = Mosquitto::start()?;
    let bytes = firmware();
    let sha = sha256_hex(&bytes);
    let (fleet, commit) = fleet_with_firmware(&bytes)?;
    publish_over_mqtt(&fleet, &broker)?;
    // A hostile (or broken) broker: chunk 3 has the right length, the wrong bytes.
    broker.client().publish(&format!("fleet/acme/blobs/{sha}/3"), vec![0u8; CHUNK], true)?;

    let mut device = Device::builder(&fleet, "gw-1")?.broker(&broker.url()).no_polling().create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let status = watch.wait_status(REPORT, "the blob refused by its digest", |s| {
        last_error_code(s) == Some("fetch_failed")
            && s.pointer("/last_error/message").and_then(Value::as_str).is_some_and(|m| m.contains("sha256"))
    })?;
    let message = status.pointer("/last_error/message").and_then(Value::as_str).unwrap_or_default();
    assert!(message.contains(&sha), "the message names the blob: {status}");
    assert!(status["applied"].is_null(), "nothing applied: {status}");
    assert_ne!(state(&status), "converged", "{status}");
    assert_no_file(&device, &fleet.app_file("fw", "files/fw.bin"));
    assert!(!device.state_dir().join("blobs").join(&sha).exists(), "a bad blob was stored");

    // The right chunk again: the retry (after the candidate's backoff) takes the blob.
    broker.client().publish(&format!("fleet/acme/blobs/{sha}/3"), &bytes[3 * CHUNK..4 * CHUNK], true)?;
    wait_converged(&watch, &device, &commit)?;
    assert_eq!(device.sha256(&fleet.app_file("fw", "files/fw.bin")).as_deref(), Some(sha.as_str()));
    Ok(())
}

#[test]
fn a_missing_chunk_times_out_and_the_download_resumes() -> Result<()> {
    let broker = Mosquitto::start()?;
    let bytes = firmware();
    let sha = sha256_hex(&bytes);
    let (fleet, commit) = fleet_with_firmware(&bytes)?;
    publish_over_mqtt(&fleet, &broker)?;
    let chunk7 = format!("fleet/acme/blobs/{sha}/7");
    broker.client().clear_retained(&chunk7)?;

    let mut device = Device::builder(&fleet, "gw-1")?
        .broker(&broker.url())
        .no_polling()
        .setting("fetch", "timeout_secs", "2")
        .create()?;
    let watch = DeviceWatch::of(&broker.client(), &device)?;
    device.start()?;
    let status = watch.wait_status(REPORT, "the missing chunk to time out", |s| {
        last_error_code(s) == Some("fetch_failed")
            && s.pointer("/last_error/message")
                .and_then(Value::as_str)
                .is_some_and(|m| m.contains("no blob chunk"))
    })?;
    assert!(status["applied"].is_null(), "{status}");
    // The partial file keeps the chunks before the missing one.
    let partial = device.state_dir().join("blobs").join(format!("{sha}.partial"));
    assert_eq!(std::fs::metadata(&partial)?.len(), 7 * CHUNK as u64);

    broker.client().publish(&chunk7, &bytes[7 * CHUNK..8 * CHUNK], true)?;
    wait_converged(&watch, &device, &commit)?;
    assert_eq!(device.sha256(&fleet.app_file("fw", "files/fw.bin")).as_deref(), Some(sha.as_str()));
    assert!(device.log().contains("resuming a partial blob download over MQTT"), "{}", device.log_tail());
    Ok(())
}
