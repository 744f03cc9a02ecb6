//! `fleet-agent enroll`: the device's enrollment claim, published once.
//!
//! The claim ([`fleet_spec::messages::EnrollClaim`]) names the device, lists its age
//! recipients (newest first: every key of `identity.age`, so a rotation in progress is
//! claimed whole) and a few facts read cheaply from the system, each bounded and
//! sanitized. It is retained (QoS 1) on `<prefix>/<fleet>/enroll/<device>` through a
//! connection of its own: client id `<client id>-enroll` (the running agent owns the
//! device's client id, and taking it over would fire its last will), clean session, no
//! last will. The command ends when the broker acknowledged the claim (PUBACK), or with
//! a timeout.
//!
//! The claim is unsigned: the fleet repository trusts a recipient only once an operator
//! committed it (`fleet-bundler enroll accept`), after comparing its key id with what
//! `fleet-agent identity` shows on the device. Nothing here reads what the broker holds.

use std::path::Path;
use std::time::Duration;

use fleet_spec::messages::{sanitize_fact, EnrollClaim};
use fleet_spec::topic::TopicError;
use rumqttc::{AsyncClient, ConnectionError, Event, Incoming, Outgoing, QoS};
use sha2::{Digest, Sha256};

use crate::config::{Config, MqttConfig};
use crate::identity::{Identity, IdentityError};
use crate::tls::TlsError;

/// This application's id for the machine id (as systemd's app-specific ids): the claim
/// carries `HMAC-SHA256(machine id, APP_ID)` made a v4 UUID, never the machine id
/// itself. `systemd-id128 machine-id --app-specific=b73004e9b9c44702bd2f269e219d43b3`
/// prints the same on the device.
pub const APP_ID: [u8; 16] =
    [0xb7, 0x30, 0x04, 0xe9, 0xb9, 0xc4, 0x47, 0x02, 0xbd, 0x2f, 0x26, 0x9e, 0x21, 0x9d, 0x43, 0xb3];

/// How much of a system file is read for one fact.
const MAX_FACT_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "agent.toml has no [mqtt]: the claim is published on the broker; add [mqtt] with url (and the \
         device's username and password) and run `fleet-agent enroll` again"
    )]
    NoBroker,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "broker {broker} refused the connection ({code}): check [mqtt] username and password (the \
         device's broker account) and the client certificate"
    )]
    Refused { broker: String, code: String },
    #[error(
        "broker {broker} did not acknowledge the claim within {} s{}: check that it is reachable (and \
         the device's ACL: README \"Enrollment\"), then run `fleet-agent enroll` again",
        timeout.as_secs(),
        last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Timeout { broker: String, timeout: Duration, last: Option<String> },
}

/// The facts read from the system, each bounded and sanitized
/// ([`fleet_spec::messages::sanitize_fact`]); `None` when unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub kernel: Option<String>,
    pub hostname: Option<String>,
    pub machine_id: Option<String>,
}

impl Facts {
    /// Reads `/proc/sys/kernel/osrelease`, `/proc/sys/kernel/hostname` and
    /// `/etc/machine-id` (made app-specific, [`app_specific_machine_id`]).
    pub fn read() -> Facts {
        Facts {
            kernel: read_fact(Path::new("/proc/sys/kernel/osrelease")),
            hostname: read_fact(Path::new("/proc/sys/kernel/hostname")),
            machine_id: read_fact(Path::new("/etc/machine-id")).and_then(|m| app_specific_machine_id(&m)),
        }
    }
}

/// The first [`MAX_FACT_FILE`] bytes of `path`, sanitized; `None` when unreadable or empty.
fn read_fact(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_FACT_FILE).read_to_end(&mut bytes).ok()?;
    sanitize_fact(&String::from_utf8_lossy(&bytes))
}

/// The app-specific id of a machine id (32 hex digits), as systemd's
/// `sd_id128_get_machine_app_specific`: the first 16 bytes of
/// `HMAC-SHA256(key = machine id, APP_ID)` with the bits of a v4 UUID, 32 hex digits.
/// `None` when `machine_id` is not 32 hex digits.
pub fn app_specific_machine_id(machine_id: &str) -> Option<String> {
    let machine_id = machine_id.trim();
    if machine_id.len() != 32 {
        return None;
    }
    let key = hex::decode(machine_id).ok()?;
    let mac = hmac_sha256(&key, &APP_ID);
    let mut id = [0u8; 16];
    id.copy_from_slice(&mac[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Some(hex::encode(id))
}

/// HMAC-SHA256 (RFC 2104) of a key no longer than the block.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The claim of `device` of `fleet` for `keys` (newest first, as
/// [`crate::identity::load_all`] returns them) made at `now`.
pub fn claim(device: &str, fleet: &str, keys: &[Identity], facts: &Facts, now: i64) -> EnrollClaim {
    EnrollClaim {
        device: device.into(),
        fleet: fleet.into(),
        recipients: keys.iter().map(Identity::recipient).collect(),
        key_id: keys.first().map(Identity::key_id).unwrap_or_default(),
        agent_version: crate::agent::version().into(),
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        kernel: facts.kernel.clone(),
        hostname: facts.hostname.clone(),
        machine_id: facts.machine_id.clone(),
        at: now,
    }
}

/// What was published.
#[derive(Debug)]
pub struct Enrolled {
    pub topic: String,
    pub claim: EnrollClaim,
}

/// Loads (or makes) the identity, builds the claim and publishes it, retained, waiting
/// at most `timeout` for the broker's acknowledgement.
pub async fn enroll(cfg: &Config, now: i64, timeout: Duration) -> Result<Enrolled, EnrollError> {
    let mqtt = cfg.mqtt.as_ref().ok_or(EnrollError::NoBroker)?;
    let topic = fleet_spec::topic::enroll_topic(&cfg.topic_prefix, &cfg.fleet, &cfg.device)?;
    crate::identity::load_or_create(&cfg.state_dir, now)?;
    let keys = crate::identity::load_all(&cfg.state_dir)?;
    let claim = claim(&cfg.device, &cfg.fleet, &keys, &Facts::read(), now);
    let client_id = format!("{}-enroll", mqtt.client_id);
    publish_retained(mqtt, &client_id, &topic, claim.to_json(), timeout).await?;
    Ok(Enrolled { topic, claim })
}

/// Publishes `payload` retained with QoS 1 on `topic` over a connection of its own and
/// waits for the PUBACK; connection failures are tried again until `timeout`, a refused
/// connection is final.
pub async fn publish_retained(
    cfg: &MqttConfig,
    client_id: &str,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), EnrollError> {
    let broker = format!("{}:{}", cfg.host, cfg.port);
    let opts = crate::mqtt::base_options(cfg, client_id, 16 * 1024)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    eventloop.set_network_options(crate::mqtt::network_options(cfg.keepalive));
    // Queued until the connection is up (and sent again after a reconnection).
    if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, true, payload) {
        return Err(EnrollError::Timeout { broker, timeout, last: Some(e.to_string()) });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return Err(EnrollError::Timeout { broker, timeout, last }),
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(EnrollError::Refused { broker, code: format!("{code:?}") })
            }
            Ok(Err(e)) => {
                tracing::debug!(%broker, error = %e, "enrollment: connection failed; trying again");
                last = Some(e.to_string());
                let pause = Duration::from_millis(500);
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(EnrollError::Timeout { broker, timeout, last });
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_lists_every_key_newest_first_and_is_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::identity::load_or_create(dir.path(), 1).expect("made");
        crate::identity::rotate(dir.path(), 2).expect("rotated");
        let keys = crate::identity::load_all(dir.path()).expect("load");
        let facts = Facts { kernel: Some("6.1.0".into()), hostname: None, machine_id: None };
        let c = claim("gw-01", "acme", &keys, &facts, 1_800_000_000);
        assert_eq!(c.recipients, [keys[0].recipient(), keys[1].recipient()]);
        assert_eq!(c.key_id, keys[0].key_id());
        assert_eq!(c.arch, std::env::consts::ARCH);
        assert_eq!(EnrollClaim::from_json(&c.to_json()).expect("valid"), c);
    }

    #[test]
    fn facts_of_this_machine_are_bounded_and_clean() {
        let facts = Facts::read();
        for fact in [&facts.kernel, &facts.hostname, &facts.machine_id].into_iter().flatten() {
            assert!(fact.len() <= fleet_spec::messages::MAX_FACT_LEN && !fact.chars().any(char::is_control));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let hostile = dir.path().join("hostname");
        std::fs::write(&hostile, format!("evil\u{1b}[2J{}", "x".repeat(10_000))).expect("write");
        let fact = read_fact(&hostile).expect("some");
        assert!(fact.starts_with("evil?[2J") && fact.len() == fleet_spec::messages::MAX_FACT_LEN, "{fact}");
        assert_eq!(read_fact(&dir.path().join("absent")), None);
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    /// The machine id is never sent as is; the app-specific id is the one systemd makes.
    #[test]
    fn the_machine_id_is_app_specific_as_systemd_makes_it() {
        let id = "0123456789abcdef0123456789abcdef";
        let ours = app_specific_machine_id(id).expect("valid");
        assert_ne!(ours, id);
        assert_eq!(ours.len(), 32);
        assert_eq!(app_specific_machine_id("not hex"), None);
        let Ok(real) = std::fs::read_to_string("/etc/machine-id") else { return };
        let out = std::process::Command::new("systemd-id128")
            .args(["machine-id", "--app-specific", &hex::encode(APP_ID)])
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let theirs = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert_eq!(app_specific_machine_id(&real).as_deref(), Some(theirs.as_str()));
            }
            _ => eprintln!("SKIPPED: systemd-id128 is not here to compare with"),
        }
    }
}
