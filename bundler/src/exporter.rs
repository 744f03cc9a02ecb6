//! `fleet-bundler exporter` (also spelled `status --serve ADDR`): the fleet's retained
//! `status` and `online` topics as Prometheus metrics on `http://ADDR/metrics`, updated
//! as messages arrive.
//!
//! Two threads: this one keeps an MQTT session (reconnecting with backoff, subscribing
//! again after each connect) and folds every message into a [`FleetView`]; the other
//! answers HTTP requests by rendering that view. Nothing is stored: the broker's
//! retained messages are the state, so a restarted exporter shows the same fleet.
//!
//! The HTTP side is a small HTTP/1.1 responder written here rather than a server
//! crate: the bundler is synchronous (rumqttc's blocking client, ureq) and has no HTTP
//! server stack; hyper would bring a tokio runtime for one read-only resource. It
//! answers `GET`/`HEAD /metrics` and `/`, one request per connection
//! (`Connection: close`), with bounded request heads, read and write timeouts and a
//! cap on concurrent connections, so a slow or hostile client cannot stall scrapes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_spec::topic::{Topic, TopicKind};
use rumqttc::{Event, Packet, QoS, RecvTimeoutError};

use crate::metrics::{ExporterInfo, FleetView, Source, Wanted};
use crate::mqtt::{self, BrokerArgs, MqttError, Scope, StatusArgs};

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_duration_ms(s).map(Duration::from_millis)
}

/// The address served when `--listen` is not given: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9810";

/// Largest HTTP request head read; a longer one is answered 431.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// HTTP connections served at once; further ones are closed unanswered.
const MAX_CONNECTIONS: usize = 16;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the MQTT loop looks at the shutdown flag.
const TICK: Duration = Duration::from_millis(200);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Invalid messages logged one by one; after that they are only counted.
const LOGGED_REJECTIONS: u32 = 10;

#[derive(Debug, Clone, clap::Args)]
pub struct ExporterArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Fleet id (default: the index's).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Topic prefix (default: the index's, else "fleet").
    #[arg(long)]
    pub prefix: Option<String>,
    /// index.json of the published build: its devices count even before they report,
    /// and what they should run is the index's (read once, at start).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Address to serve http://ADDR/metrics on (0.0.0.0:PORT for every interface).
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Leave out the per-device series (fleet_device_*): the series count then stays
    /// the same whatever the fleet's size.
    #[arg(long)]
    pub no_device_metrics: bool,
    /// After a (re)connect, how long after the last retained message before devices
    /// the broker no longer retains are forgotten.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
}

impl ExporterArgs {
    /// `status --serve ADDR`: the same exporter.
    pub fn from_status(args: &StatusArgs, listen: SocketAddr) -> ExporterArgs {
        ExporterArgs {
            broker: args.broker.clone(),
            fleet: args.fleet.clone(),
            prefix: args.prefix.clone(),
            index: args.index.clone(),
            listen,
            no_device_metrics: args.no_device_metrics,
            settle: args.settle.max(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error("cannot listen on {addr}: {error} (is another exporter running there? pick another --listen)")]
    Listen { addr: SocketAddr, error: io::Error },
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signals(io::Error),
}

/// Serves the metrics until SIGINT or SIGTERM. Errors only at start (bad flags, files,
/// address); a broker that is down is retried for as long as the exporter runs, and
/// shown as `fleet_exporter_broker_connected 0`.
pub fn run(args: &ExporterArgs) -> Result<(), ExporterError> {
    let Scope { index, fleet, prefix } = Scope::resolve(&args.fleet, &args.prefix, &args.index)?;
    let wanted: BTreeMap<String, Wanted> = index
        .iter()
        .flat_map(|i| i.devices.iter())
        .map(|(id, e)| (id.clone(), Wanted { digest: e.digest.clone(), commit: e.commit.clone() }))
        .collect();
    let view = Arc::new(Mutex::new(FleetView::new(&fleet, &prefix, wanted, !args.no_device_metrics)));
    let connected = Arc::new(AtomicBool::new(false));

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown)).map_err(ExporterError::Signals)?;
    }
    let broker = args.broker.single("exporter")?.to_string();
    let (client, mut connection) = mqtt::client(&args.broker, "fleet-bundler", 10)?;
    let listener =
        TcpListener::bind(args.listen).map_err(|error| ExporterError::Listen { addr: args.listen, error })?;
    let local = listener.local_addr().unwrap_or(args.listen);
    eprintln!("serving http://{local}/metrics for fleet {fleet} (prefix {prefix}) from {broker}");
    {
        let (view, connected) = (Arc::clone(&view), Arc::clone(&connected));
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || serve(listener, view, connected))
            .map_err(|error| ExporterError::Listen { addr: local, error })?;
    }

    // The rollout state too: an account that may not read it still gets the rest (its
    // SUBACK then carries a failure, which counts as an answer all the same).
    let rollout_topic = crate::rollout::drive::rollout_topic(&prefix, &fleet)?;
    let filters = [
        (Topic::fleet_filter(&prefix, &fleet, TopicKind::Status).map_err(MqttError::from)?),
        (Topic::fleet_filter(&prefix, &fleet, TopicKind::Online).map_err(MqttError::from)?),
        rollout_topic.clone(),
    ];
    let broker = args.broker.single("exporter")?;
    let mut backoff = MIN_BACKOFF;
    let mut last_error: Option<String> = None;
    let mut resync_at: Option<Instant> = None;
    let mut subacks = 0;
    let mut rejections = 0u32;
    while !shutdown.load(Ordering::Relaxed) {
        match connection.recv_timeout(TICK) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                eprintln!("connected to {broker}; subscribing to {}", filters.join(", "));
                for filter in &filters {
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        eprintln!("warning: cannot subscribe to {filter}: {e}");
                    }
                }
                view.lock().expect("the view lock is never poisoned").begin_resync();
                // The broker sends the retained messages after each SUBACK: the settle
                // time runs from the second one.
                subacks = 0;
                resync_at = None;
                connected.store(true, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
                last_error = None;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if let Some(at) = resync_at.as_mut() {
                    *at = Instant::now() + args.settle;
                }
                if p.topic == rollout_topic {
                    view.lock().expect("the view lock is never poisoned").apply_rollout(&p.payload);
                    continue;
                }
                let Ok(topic) = Topic::parse(&prefix, &p.topic) else { continue };
                let source = match topic.kind {
                    _ if topic.fleet != fleet => continue,
                    TopicKind::Status => Source::Status,
                    TopicKind::Online => Source::Online,
                    _ => continue,
                };
                let result = view.lock().expect("the view lock is never poisoned").apply(
                    source,
                    &topic.device,
                    &p.payload,
                );
                if let Err(e) = result {
                    rejections += 1;
                    if rejections <= LOGGED_REJECTIONS {
                        eprintln!("warning: ignoring {}: {e}", p.topic);
                    }
                    if rejections == LOGGED_REJECTIONS {
                        eprintln!("warning: further invalid messages are only counted (fleet_exporter_invalid_messages_total)");
                    }
                }
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subacks += 1;
                if subacks == filters.len() {
                    resync_at = Some(Instant::now() + args.settle);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                connected.store(false, Ordering::Relaxed);
                resync_at = None;
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    eprintln!(
                        "warning: broker {broker}: {message}; retrying (every {MAX_BACKOFF:?} at most)"
                    );
                    last_error = Some(message);
                }
                sleep_unless(&shutdown, backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if resync_at.is_some_and(|at| Instant::now() >= at) {
            view.lock().expect("the view lock is never poisoned").finish_resync();
            resync_at = None;
        }
    }
    eprintln!("stopping");
    let _ = client.try_disconnect();
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match connection.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

fn sleep_unless(shutdown: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !shutdown.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
    }
}

fn serve(listener: TcpListener, view: Arc<Mutex<FleetView>>, connected: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, typically: back off instead of spinning.
                eprintln!("warning: accepting an HTTP connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue; // dropped: closed unanswered
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (view, connected, done) = (Arc::clone(&view), Arc::clone(&connected), Arc::clone(&active));
        let spawned = std::thread::Builder::new().name("http-conn".into()).spawn(move || {
            let render = || {
                let info = ExporterInfo {
                    version: env!("CARGO_PKG_VERSION"),
                    broker_connected: connected.load(Ordering::Relaxed),
                };
                view.lock().expect("the view lock is never poisoned").render(&info)
            };
            let _ = handle(stream, render);
            done.fetch_sub(1, Ordering::Relaxed);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn handle(mut stream: TcpStream, render: impl FnOnce() -> String) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let response = respond(&head, render);
    stream.write_all(&response)?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Reads until the blank line that ends a request head, EOF, or [`MAX_REQUEST_HEAD`]
/// bytes (one byte more marks a head that is too long).
fn read_head(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > MAX_REQUEST_HEAD {
            return Ok(head);
        }
    }
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The whole response to a request head; `render` is called only for `/metrics`.
pub fn respond(head: &[u8], render: impl FnOnce() -> String) -> Vec<u8> {
    let reply = |status: &str, extra: &str, body: &str, with_body: bool| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra}\r\n",
            body.len()
        )
        .into_bytes();
        if with_body {
            r.extend_from_slice(body.as_bytes());
        }
        r
    };
    let text = "Content-Type: text/plain; charset=utf-8\r\n";
    if head.len() > MAX_REQUEST_HEAD {
        return reply("431 Request Header Fields Too Large", text, "request head too large\n", true);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default().trim_end_matches('\r');
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return reply("400 Bad Request", text, "bad request line\n", true);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return reply("400 Bad Request", text, "bad request line\n", true);
    }
    let path = target.split('?').next().unwrap_or_default();
    let with_body = *method != "HEAD";
    match (path, *method) {
        ("/metrics", "GET" | "HEAD") => {
            reply("200 OK", &format!("Content-Type: {CONTENT_TYPE}\r\n"), &render(), with_body)
        }
        ("/", "GET" | "HEAD") => {
            reply("200 OK", text, "fleet-bundler exporter: Prometheus metrics at /metrics\n", with_body)
        }
        ("/metrics" | "/", _) => {
            reply("405 Method Not Allowed", &format!("Allow: GET, HEAD\r\n{text}"), "use GET\n", true)
        }
        _ => reply("404 Not Found", text, "not found: the metrics are at /metrics\n", with_body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(head: &[u8]) -> String {
        String::from_utf8(respond(head, || "fleet_devices 3\n".into())).expect("utf-8")
    }

    #[test]
    fn get_metrics_is_answered_with_the_exposition_and_its_content_type() {
        let r = answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{r}");
        assert!(r.contains("Content-Length: 16\r\n") && r.contains("Connection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nfleet_devices 3\n"), "{r}");
        let r = answer(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    }

    #[test]
    fn head_has_no_body_and_other_requests_get_their_status() {
        let r = answer(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"), "{r}");
        assert!(r.contains("Content-Length: 16\r\n"), "{r}");
        let r = answer(b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD\r\n"), "{r}");
        assert!(answer(b"GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(answer(b"GET / HTTP/1.1\r\n\r\n").contains("/metrics"));
        for bad in [
            &b""[..],
            b"\xff\xfe\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
        ] {
            assert!(answer(bad).starts_with("HTTP/1.1 400 "), "{bad:?}");
        }
        let long = [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_REQUEST_HEAD]].concat();
        assert!(answer(&long).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn a_request_head_is_read_up_to_its_blank_line_or_its_limit() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n\r\nbody";
        assert!(read_head(&mut input).expect("read").starts_with(b"GET / HTTP/1.1\r\n\r\n"));
        let endless = vec![b'a'; 3 * MAX_REQUEST_HEAD];
        let head = read_head(&mut endless.as_slice()).expect("read");
        assert!(head.len() > MAX_REQUEST_HEAD && head.len() <= MAX_REQUEST_HEAD + 1024);
    }
}
