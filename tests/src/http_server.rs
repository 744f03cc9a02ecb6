//! A static file server on a free loopback port, for download tests: `GET`/`HEAD`,
//! `Range: bytes=N-` and `bytes=N-M` (206 + `Content-Range`, 416 past the end), one
//! request per connection, and optionally a connection dropped after K body bytes on the
//! first request of each path, or after every N body bytes on the first few requests of
//! each path (resumable-download tests). Every request is logged.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

/// Options of a [`StaticHttpServer`].
#[derive(Debug, Clone, Default)]
pub struct StaticHttpOptions {
    /// Send only this many body bytes, then close the connection, on the first `GET` of
    /// each path (the headers still announce the full length).
    pub drop_first_after: Option<u64>,
    /// Send only this many body bytes, then close the connection, on each of the first
    /// [`StaticHttpOptions::drops`] `GET`s of a path whose answer is longer than that
    /// (the headers still announce the full length): a big file that is cut several
    /// times, each resume (`Range`) cut again, until the drops are spent.
    pub drop_every: Option<u64>,
    /// How many `GET`s of one path [`StaticHttpOptions::drop_every`] cuts.
    pub drops: u32,
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRequest {
    pub method: String,
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    pub status: u16,
    /// Body bytes actually written.
    pub body_bytes: u64,
    /// The connection was dropped on purpose mid-body.
    pub dropped: bool,
}

struct Shared {
    root: PathBuf,
    opts: StaticHttpOptions,
    dropped_paths: Mutex<HashSet<String>>,
    /// Path → how many of its answers `drop_every` cut so far.
    cuts: Mutex<HashMap<String, u32>>,
    log: Mutex<Vec<ServedRequest>>,
}

/// A running file server. Stopped on drop.
pub struct StaticHttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StaticHttpServer {
    /// Serves `dir` on `127.0.0.1:<free port>`.
    pub fn start(dir: impl Into<PathBuf>) -> Result<StaticHttpServer> {
        Self::start_with(dir, StaticHttpOptions::default())
    }

    pub fn start_with(dir: impl Into<PathBuf>, opts: StaticHttpOptions) -> Result<StaticHttpServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the static HTTP server")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            root: dir.into(),
            opts,
            dropped_paths: Mutex::new(HashSet::new()),
            cuts: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let (s, st) = (Arc::clone(&shared), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = Arc::clone(&s);
                    thread::spawn(move || {
                        let _ = serve(conn, &s);
                    });
                }
            }
        });
        Ok(StaticHttpServer { addr, stop, shared, thread: Some(thread) })
    }

    /// `"127.0.0.1:PORT"`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<ServedRequest> {
        self.shared.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for StaticHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes up accept()
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, shared: &Shared) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_string();
    let mut entry = ServedRequest {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        status: 0,
        body_bytes: 0,
        dropped: false,
    };
    let result = respond(&conn, shared, &method, &path, range.as_deref(), &mut entry);
    shared.log.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    let _ = conn.shutdown(Shutdown::Both);
    result
}

fn respond(
    mut conn: &TcpStream,
    shared: &Shared,
    method: &str,
    path: &str,
    range: Option<&str>,
    entry: &mut ServedRequest,
) -> io::Result<()> {
    let simple = |mut conn: &TcpStream, entry: &mut ServedRequest, status: u16, reason: &str, extra: &str| {
        entry.status = status;
        write!(conn, "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n")
    };
    if method != "GET" && method != "HEAD" {
        return simple(conn, entry, 405, "Method Not Allowed", "");
    }
    let Some(file_path) = resolve(&shared.root, path) else {
        return simple(conn, entry, 404, "Not Found", "");
    };
    let Ok(mut file) = File::open(&file_path) else {
        return simple(conn, entry, 404, "Not Found", "");
    };
    let len = file.metadata()?.len();
    let (status, start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        None => (200, 0, len),
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let start: u64 = a.trim().parse().unwrap_or(u64::MAX);
            let end = b.trim().parse::<u64>().map_or(len, |e| (e + 1).min(len));
            if start >= len || start >= end {
                return simple(
                    conn,
                    entry,
                    416,
                    "Range Not Satisfiable",
                    &format!("Content-Range: bytes */{len}\r\n"),
                );
            }
            (206, start, end)
        }
    };
    entry.status = status;
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Accept-Ranges: bytes\r\nConnection: close\r\n",
        if status == 206 { "Partial Content" } else { "OK" },
        end - start
    );
    if status == 206 {
        head.push_str(&format!("Content-Range: bytes {start}-{}/{len}\r\n", end - 1));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut limit = end - start;
    if let Some(k) = shared.opts.drop_first_after {
        if shared.dropped_paths.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_string())
            && k < limit
        {
            limit = k;
            entry.dropped = true;
        }
    }
    if let Some(k) = shared.opts.drop_every.filter(|&k| k < limit) {
        let mut cuts = shared.cuts.lock().unwrap_or_else(|e| e.into_inner());
        let cut = cuts.entry(path.to_string()).or_insert(0);
        if *cut < shared.opts.drops {
            *cut += 1;
            limit = k;
            entry.dropped = true;
        }
    }
    file.seek(SeekFrom::Start(start))?;
    entry.body_bytes = io::copy(&mut file.take(limit), &mut conn)?;
    conn.flush()
}

/// Maps a URL path onto a file under `root`, refusing `..` and non-files.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(url_path)?;
    let rel = Path::new(decoded.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let full = root.join(rel);
    full.is_file().then_some(full)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
