//! MQTT clients for assertions, built on the `mosquitto_pub` / `mosquitto_sub` CLIs
//! (package `mosquitto-clients`): publish (binary-safe, QoS 1), read a retained message,
//! and collect everything published on a topic filter in the background.
//!
//! Payloads travel as hex (`mosquitto_sub -F '%x'`), so binary and multi-line payloads
//! arrive intact. A [`Subscription`] is returned only once the broker acknowledged it
//! (SUBACK), so nothing published afterwards can be missed; `mosquitto_sub` reconnects and
//! resubscribes by itself when the broker restarts.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::require_program;

const MSG_PREFIX: &str = "fleet-e2e-msg ";

/// A message received by a [`Subscription`] or [`Mqtt::retained_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Delivered with the retain flag (a stored retained message).
    pub retained: bool,
}

impl Message {
    /// The payload as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.payload)
            .with_context(|| format!("payload on {} is not JSON", self.topic))
    }
}

/// Connection settings for the CLI clients.
#[derive(Debug, Clone)]
pub struct Mqtt {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    client_id: Option<String>,
}

impl Mqtt {
    /// An anonymous client of the broker on `127.0.0.1:port`.
    pub fn new(port: u16) -> Mqtt {
        Mqtt { host: "127.0.0.1".into(), port, credentials: None, client_id: None }
    }

    /// A client of `mqtt://host:port` (port 1883 if absent).
    pub fn from_url(url: &str) -> Result<Mqtt> {
        let rest = url.strip_prefix("mqtt://").ok_or_else(|| anyhow!("not an mqtt:// URL: {url}"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().with_context(|| format!("bad port in {url}"))?),
            None => (hostport, 1883),
        };
        Ok(Mqtt { host: host.to_string(), port, credentials: None, client_id: None })
    }

    /// Logs in as `user`.
    pub fn with_credentials(mut self, user: &str, password: &str) -> Mqtt {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// Uses this MQTT client id (ACL patterns with `%c` match on it).
    pub fn with_client_id(mut self, id: &str) -> Mqtt {
        self.client_id = Some(id.to_string());
        self
    }

    fn command(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new(require_program(program)?);
        self.connection_args(&mut cmd);
        Ok(cmd)
    }

    fn connection_args(&self, cmd: &mut Command) {
        cmd.arg("-h").arg(&self.host).arg("-p").arg(self.port.to_string());
        if let Some((user, pass)) = &self.credentials {
            cmd.arg("-u").arg(user).arg("-P").arg(pass);
        }
        if let Some(id) = &self.client_id {
            cmd.arg("-i").arg(id);
        }
    }

    /// Publishes `payload` on `topic` with QoS 1 (an empty payload is sent as a null
    /// message, which clears a retained message when `retain` is set).
    pub fn publish(&self, topic: &str, payload: impl AsRef<[u8]>, retain: bool) -> Result<()> {
        let payload = payload.as_ref();
        let mut cmd = self.command("mosquitto_pub")?;
        cmd.args(["-q", "1", "-t", topic]);
        if retain {
            cmd.arg("-r");
        }
        cmd.arg(if payload.is_empty() { "-n" } else { "-s" });
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning mosquitto_pub")?;
        if let Some(mut stdin) = child.stdin.take() {
            if !payload.is_empty() {
                stdin.write_all(payload).context("writing the payload to mosquitto_pub")?;
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "mosquitto_pub to {topic} on port {} failed ({}): {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Clears the retained message on `topic`. Clearing is idempotent, so a connection
    /// the broker dropped is tried again (twice, a second apart): a RabbitMQ node under
    /// CI load was seen to drop one now and then, which is not what a test is about.
    pub fn clear_retained(&self, topic: &str) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.publish(topic, b"", true) {
                Err(e) if attempt < 2 && e.to_string().contains("connection was lost") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                result => return result,
            }
        }
    }

    /// The retained message on `topic` (waiting at most 2 s), if any.
    pub fn retained_message(&self, topic: &str) -> Result<Option<Message>> {
        let out = self
            .command("mosquitto_sub")?
            .args(["-t", topic, "-C", "1", "-W", "2", "--retained-only", "-F"])
            .arg(format!("{MSG_PREFIX}%r %x %t"))
            .stdin(Stdio::null())
            .output()
            .context("running mosquitto_sub")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(msg) = stdout.lines().find_map(parse_message_line) {
            return Ok(Some(msg));
        }
        // 27: the -W timeout expired without a (retained) message.
        if out.status.success() || out.status.code() == Some(27) {
            return Ok(None);
        }
        bail!(
            "mosquitto_sub on port {} failed ({}): {}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The retained payload on `topic` (waiting at most 2 s) as text, if any.
    pub fn retained(&self, topic: &str) -> Result<Option<String>> {
        Ok(self.retained_message(topic)?.map(|m| m.text()))
    }

    /// Subscribes to `filter` (QoS 1) in the background, returning once the broker
    /// acknowledged the subscription (at most 10 s).
    pub fn subscribe(&self, filter: &str) -> Result<Subscription> {
        // mosquitto_sub block-buffers a piped stdout: line-buffer it so that the SUBACK
        // and every message show up as they happen.
        let mut cmd = Command::new(require_program("stdbuf")?);
        cmd.arg("-oL").arg(require_program("mosquitto_sub")?);
        self.connection_args(&mut cmd);
        let mut child = cmd
            .args(["-d", "-q", "1", "-t", filter, "-F"])
            .arg(format!("{MSG_PREFIX}%r %x %t"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning mosquitto_sub")?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("mosquitto_sub has no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("mosquitto_sub has no stderr"))?;
        let s = Arc::clone(&shared);
        let reader = thread::spawn(move || read_stdout(stdout, &s));
        let s = Arc::clone(&shared);
        let err_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            lock(&s.0).stderr = text;
            s.1.notify_all();
        });
        let sub =
            Subscription { filter: filter.to_string(), child, shared, threads: vec![reader, err_reader] };
        sub.wait_state(Duration::from_secs(10), |st| st.subacks > 0 || st.closed).map_err(|_| {
            anyhow!("no SUBACK for {filter} on port {} within 10 s{}", self.port, sub.stderr_note())
        })?;
        if lock(&sub.shared.0).subacks == 0 {
            bail!("mosquitto_sub for {filter} on port {} exited{}", self.port, sub.stderr_note());
        }
        Ok(sub)
    }
}

/// Retained payload on `topic` of the anonymous broker on `127.0.0.1:port`.
pub fn retained(port: u16, topic: &str) -> Result<Option<String>> {
    Mqtt::new(port).retained(topic)
}

/// Publishes on the anonymous broker on `127.0.0.1:port`.
pub fn publish(port: u16, topic: &str, payload: impl AsRef<[u8]>, retain: bool) -> Result<()> {
    Mqtt::new(port).publish(topic, payload, retain)
}

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    subacks: usize,
    denied: bool,
    closed: bool,
    stderr: String,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_stdout(stdout: impl Read, shared: &(Mutex<State>, Condvar)) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        let mut st = lock(&shared.0);
        if let Some(msg) = parse_message_line(text) {
            st.messages.push(msg);
        } else if let Some(granted) = text.strip_prefix("Subscribed (mid: ") {
            // "Subscribed (mid: 1): 0" — the granted QoS per topic; 128 means refused.
            st.subacks += 1;
            if granted.split("):").nth(1).is_some_and(|q| q.split(',').any(|q| q.trim() == "128")) {
                st.denied = true;
            }
        }
        drop(st);
        shared.1.notify_all();
    }
    lock(&shared.0).closed = true;
    shared.1.notify_all();
}

fn parse_message_line(line: &str) -> Option<Message> {
    let rest = line.strip_prefix(MSG_PREFIX)?;
    let mut parts = rest.splitn(3, ' ');
    let retained = parts.next()? == "1";
    let payload = decode_hex(parts.next()?)?;
    let topic = parts.next()?.to_string();
    Some(Message { topic, payload, retained })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A background `mosquitto_sub` collecting every message on a topic filter. Killed on drop.
pub struct Subscription {
    filter: String,
    child: Child,
    shared: Arc<(Mutex<State>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
}

impl Subscription {
    fn wait_state(&self, deadline: Duration, mut done: impl FnMut(&State) -> bool) -> Result<()> {
        let start = Instant::now();
        let (m, cv) = &*self.shared;
        let mut st = lock(m);
        loop {
            if done(&st) {
                return Ok(());
            }
            let left = deadline.checked_sub(start.elapsed()).ok_or_else(|| anyhow!("timed out"))?;
            st = cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn stderr_note(&self) -> String {
        let st = lock(&self.shared.0);
        if st.stderr.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", st.stderr.trim())
        }
    }

    /// All messages received so far, oldest first.
    pub fn messages(&self) -> Vec<Message> {
        lock(&self.shared.0).messages.clone()
    }

    /// Forgets the messages received so far.
    pub fn clear(&self) {
        lock(&self.shared.0).messages.clear();
    }

    /// Whether the broker refused (some of) the subscription (SUBACK 0x80, e.g. by ACL).
    pub fn denied(&self) -> bool {
        lock(&self.shared.0).denied
    }

    /// How many SUBACKs arrived (more than one after reconnections to a restarted broker).
    pub fn subacks(&self) -> usize {
        lock(&self.shared.0).subacks
    }

    /// Waits until a received message (old or new) satisfies `pred`, returning it.
    pub fn wait_for(
        &self,
        deadline: Duration,
        what: &str,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Result<Message> {
        let mut found = None;
        self.wait_state(deadline, |st| {
            found = st.messages.iter().find(|m| pred(m)).cloned();
            found.is_some()
        })
        .map_err(|_| {
            anyhow!(
                "timed out after {deadline:?} waiting for {what} on {} ({} messages received)",
                self.filter,
                self.messages().len()
            )
        })?;
        found.ok_or_else(|| anyhow!("no message matched"))
    }

    /// Waits until at least `n` messages were received; returns them all.
    pub fn wait_count(&self, n: usize, deadline: Duration) -> Result<Vec<Message>> {
        self.wait_state(deadline, |st| st.messages.len() >= n).map_err(|_| {
            anyhow!(
                "timed out after {deadline:?} waiting for {n} messages on {} ({} received)",
                self.filter,
                self.messages().len()
            )
        })?;
        Ok(self.messages())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_lines_are_parsed() {
        let m = parse_message_line("fleet-e2e-msg 1 68690a00 a/b c").unwrap();
        assert_eq!(m, Message { topic: "a/b c".into(), payload: b"hi\n\0".to_vec(), retained: true });
        let m = parse_message_line("fleet-e2e-msg 0  x/y").unwrap();
        assert_eq!(m, Message { topic: "x/y".into(), payload: vec![], retained: false });
        assert!(parse_message_line("Client (null) received PUBLISH").is_none());
    }

    #[test]
    fn urls_are_parsed() {
        let m = Mqtt::from_url("mqtt://127.0.0.1:1888").unwrap();
        assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1888));
        assert!(Mqtt::from_url("http://x").is_err());
    }
}
