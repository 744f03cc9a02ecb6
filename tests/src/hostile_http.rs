//! Hostile HTTP servers: what an attacker who can publish on the broker points a device
//! at. Each one answers every request the same bad way ([`Hostility`]): a body that
//! trickles (behind a huge or an honest `Content-Length`), the wrong bytes of the right
//! size, or silence after the request.
//!
//! Each server listens on `127.0.0.1:<free port>` (never another address), serves every
//! connection on its own thread, and is bounded in time: a connection ends at the latest
//! after the server's `limit`, and dropping the server ends them all (within about 50 ms)
//! and joins their threads. Every connection is logged ([`Connection`]): when it was
//! opened, what was asked, how many body bytes went out, and when and how it ended, so a
//! test can show that a device really tried the server, and how long it held on.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How a [`HostileHttpServer`] answers every request.
#[derive(Debug, Clone)]
pub enum Hostility {
    /// `200 OK` announcing `content_length` bytes, then `chunk` bytes of junk every
    /// `every`: a huge file that never arrives, or a slow one.
    Trickle { content_length: u64, chunk: usize, every: Duration },
    /// `200 OK` with exactly these bytes, then the connection closes (wrong bytes of the
    /// announced size, say).
    Body(Vec<u8>),
    /// Reads the request and never answers (until the client or the limit gives up).
    Silent,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed it (or reset it, or stopped reading for a second).
    ClientClosed,
    /// The server sent everything it had and closed it.
    Finished,
    /// The server's time limit ran out first.
    TimeLimit,
    /// The server was dropped.
    Stopped,
    /// No complete request arrived.
    NoRequest,
}

/// One connection a [`HostileHttpServer`] accepted.
#[derive(Debug, Clone)]
pub struct Connection {
    pub opened: Instant,
    /// The request line (`GET /x.bundle HTTP/1.1`), once read.
    pub request: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Body bytes written so far.
    pub body_bytes: u64,
    /// When and how it ended; `None` while it is open.
    pub ended: Option<(Instant, Ending)>,
}

impl Connection {
    /// How long it was (or has been) open.
    pub fn duration(&self) -> Duration {
        self.ended.map_or_else(|| self.opened.elapsed(), |(at, _)| at.duration_since(self.opened))
    }

    pub fn is_open(&self) -> bool {
        self.ended.is_none()
    }
}

struct Shared {
    hostility: Hostility,
    limit: Duration,
    stop: AtomicBool,
    log: Mutex<Vec<Connection>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Connection>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut Connection)) {
        if let Some(c) = self.log().get_mut(index) {
            f(c);
        }
    }
}

/// A running hostile server. Stopped on drop. See the module docs.
pub struct HostileHttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How often a connection thread looks at the client, the clock and the stop flag.
const TICK: Duration = Duration::from_millis(50);
/// How long a write may wait for a client that does not read: then it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;

impl HostileHttpServer {
    /// Starts a server answering every request as `hostility` says, each connection
    /// lasting at most `limit`.
    pub fn start(hostility: Hostility, limit: Duration) -> Result<HostileHttpServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a hostile HTTP server")?;
        let addr = listener.local_addr().context("the hostile HTTP server's address")?;
        let shared = Arc::new(Shared {
            hostility,
            limit,
            stop: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let index = {
                    let mut log = s.log();
                    log.push(Connection {
                        opened: Instant::now(),
                        request: None,
                        range: None,
                        body_bytes: 0,
                        ended: None,
                    });
                    log.len() - 1
                };
                let sc = Arc::clone(&s);
                let handle = thread::spawn(move || {
                    let ending = serve(&conn, &sc, index).unwrap_or(Ending::ClientClosed);
                    let _ = conn.shutdown(Shutdown::Both);
                    sc.update(index, |c| c.ended = Some((Instant::now(), ending)));
                });
                s.threads.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
            }
        });
        Ok(HostileHttpServer { addr, shared, thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Every connection so far, oldest first.
    pub fn connections(&self) -> Vec<Connection> {
        self.shared.log().clone()
    }

    /// How many requests arrived (connections that sent a request line).
    pub fn requests(&self) -> usize {
        self.shared.log().iter().filter(|c| c.request.is_some()).count()
    }

    /// Whether a connection with a request is open right now.
    pub fn in_flight(&self) -> bool {
        self.shared.log().iter().any(|c| c.request.is_some() && c.is_open())
    }

    /// One line per connection, for failure messages.
    pub fn describe(&self) -> String {
        let log = self.shared.log();
        if log.is_empty() {
            return format!("{}: no connection", self.addr);
        }
        let lines: Vec<String> = log
            .iter()
            .map(|c| {
                let end = match c.ended {
                    Some((_, how)) => format!("ended ({how:?}) after {:.1?}", c.duration()),
                    None => format!("open for {:.1?}", c.duration()),
                };
                format!(
                    "{}: {:?} range {:?}, {} body bytes, {end}",
                    self.addr,
                    c.request.as_deref().unwrap_or("(no request)"),
                    c.range,
                    c.body_bytes
                )
            })
            .collect();
        lines.join("\n")
    }
}

impl Drop for HostileHttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes up accept()
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Serves one connection; returns how it ended.
fn serve(mut conn: &TcpStream, shared: &Shared, index: usize) -> io::Result<Ending> {
    let opened = Instant::now();
    let over = || -> Option<Ending> {
        if shared.stop.load(Ordering::SeqCst) {
            Some(Ending::Stopped)
        } else if opened.elapsed() >= shared.limit {
            Some(Ending::TimeLimit)
        } else {
            None
        }
    };
    conn.set_read_timeout(Some(TICK))?;
    // A client that stops reading cannot hold a connection thread (or the drop) for ever.
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // The request head, up to the blank line.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if let Some(ending) = over() {
            return Ok(ending);
        }
        match conn.read(&mut buf) {
            Ok(0) => return Ok(Ending::NoRequest),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(_) => return Ok(Ending::NoRequest),
        }
        if head.len() > MAX_HEAD {
            return Ok(Ending::NoRequest);
        }
    }
    let text = String::from_utf8_lossy(&head);
    let request = text.lines().next().unwrap_or_default().to_string();
    let range = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("range").then(|| v.trim().to_string())
    });
    shared.update(index, |c| {
        c.request = Some(request);
        c.range = range;
    });

    match &shared.hostility {
        Hostility::Silent => loop {
            if let Some(ending) = over() {
                return Ok(ending);
            }
            if client_gone(conn)? {
                return Ok(Ending::ClientClosed);
            }
        },
        Hostility::Body(bytes) => {
            write!(conn, "{}", ok_head(bytes.len() as u64))?;
            for piece in bytes.chunks(16 * 1024) {
                if let Some(ending) = over() {
                    return Ok(ending);
                }
                if conn.write_all(piece).is_err() {
                    return Ok(Ending::ClientClosed);
                }
                shared.update(index, |c| c.body_bytes += piece.len() as u64);
            }
            conn.flush()?;
            Ok(Ending::Finished)
        }
        Hostility::Trickle { content_length, chunk, every } => {
            write!(conn, "{}", ok_head(*content_length))?;
            let junk = vec![0x5au8; *chunk];
            let mut sent = 0u64;
            loop {
                // Wait `every`, watching the client, the clock and the stop flag.
                let since = Instant::now();
                while since.elapsed() < *every {
                    if let Some(ending) = over() {
                        return Ok(ending);
                    }
                    if client_gone(conn)? {
                        return Ok(Ending::ClientClosed);
                    }
                }
                let n = (*content_length - sent).min(junk.len() as u64) as usize;
                if conn.write_all(&junk[..n]).is_err() {
                    return Ok(Ending::ClientClosed);
                }
                sent += n as u64;
                shared.update(index, |c| c.body_bytes = sent);
                if sent >= *content_length {
                    conn.flush()?;
                    return Ok(Ending::Finished);
                }
            }
        }
    }
}

fn ok_head(content_length: u64) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {content_length}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n"
    )
}

/// Waits up to one tick for the client: whether it closed (end of file or an error).
/// Anything it sends after the request is ignored.
fn client_gone(mut conn: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; 512];
    match conn.read(&mut buf) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if is_timeout(&e) => Ok(false),
        Err(_) => Ok(true),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn get(server: &HostileHttpServer) -> TcpStream {
        let url = server.url("x.bundle");
        let addr = url.trim_start_matches("http://").split('/').next().expect("host:port").to_string();
        let mut conn = TcpStream::connect(addr).expect("connect");
        conn.write_all(b"GET /x.bundle HTTP/1.1\r\nHost: x\r\nRange: bytes=5-\r\n\r\n").expect("request");
        conn
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_body_is_served_whole_and_logged() {
        let server = HostileHttpServer::start(Hostility::Body(b"wrong".to_vec()), Duration::from_secs(5))
            .expect("start");
        let mut response = Vec::new();
        get(&server).read_to_end(&mut response).expect("read");
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), "{response:?}");
        assert!(response.ends_with(b"\r\n\r\nwrong"), "{response:?}");
        wait_for("the connection to end", || !server.connections()[0].is_open());
        let c = &server.connections()[0];
        assert_eq!(c.request.as_deref(), Some("GET /x.bundle HTTP/1.1"));
        assert_eq!(c.range.as_deref(), Some("bytes=5-"));
        assert_eq!((c.body_bytes, c.ended.map(|(_, how)| how)), (5, Some(Ending::Finished)));
        assert_eq!(server.requests(), 1);
    }

    #[test]
    fn a_trickle_sends_its_head_then_chunks_until_the_client_leaves() {
        let every = Duration::from_millis(100);
        let server = HostileHttpServer::start(
            Hostility::Trickle { content_length: 10 << 30, chunk: 2, every },
            Duration::from_secs(5),
        )
        .expect("start");
        let conn = get(&server);
        let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert_eq!(line, "HTTP/1.1 200 OK\r\n");
        wait_for("two chunks", || server.connections()[0].body_bytes >= 4);
        assert!(server.in_flight());
        drop(reader);
        drop(conn);
        wait_for("the connection to end", || !server.in_flight());
        let c = &server.connections()[0];
        assert_eq!(c.ended.map(|(_, how)| how), Some(Ending::ClientClosed), "{}", server.describe());
        assert!(c.body_bytes.is_multiple_of(2) && c.body_bytes >= 4, "{}", server.describe());
    }

    #[test]
    fn a_silent_server_holds_the_connection_until_its_limit_and_drop_ends_the_rest() {
        let server = HostileHttpServer::start(Hostility::Silent, Duration::from_millis(300)).expect("start");
        let mut conn = get(&server);
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).expect("read");
        assert!(buf.is_empty(), "no answer at all: {buf:?}");
        wait_for("the connection to end", || !server.in_flight());
        let c = &server.connections()[0];
        assert_eq!(c.ended.map(|(_, how)| how), Some(Ending::TimeLimit), "{}", server.describe());
        assert!(c.duration() >= Duration::from_millis(300));

        let server = HostileHttpServer::start(Hostility::Silent, Duration::from_secs(60)).expect("start");
        let _conn = get(&server);
        wait_for("the request", || server.requests() == 1);
        let started = Instant::now();
        drop(server);
        assert!(started.elapsed() < Duration::from_secs(2), "drop took {:?}", started.elapsed());
    }
}
