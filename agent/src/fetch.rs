//! Getting bundles: HTTP(S) with resumable `Range` downloads, and this device's pointer
//! file (`<base_url>/devices/<id>.json`, a few hundred bytes) for polling.
//!
//! A download lands in `state_dir/partial/<digest>`; after a dropped connection it
//! resumes with `Range: bytes=<have>-`. The announced size and the `Content-Length`
//! are checked against the limit before any byte is stored, and the whole file's
//! sha256 must equal the announced digest before the bytes are handed to verification.
//!
//! A download that *finished* (the body ended normally, or the server answered `416`:
//! it has nothing more) but whose bytes do not match the announced digest is a
//! [`FetchError::Digest`], which is permanent: the partial file is deleted and the
//! caller rejects the digest. When the mismatching file was stitched together from a
//! resume, it is downloaded once more from byte 0 first (a stale or foreign partial file
//! must not get a good bundle rejected). A connection dropped mid-body is a
//! [`FetchError::Network`] and is resumed, never rejected.
//!
//! Nothing fetched here is trusted: the caller verifies the bundle's signature. This
//! module never writes outside the partial directory it is given.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_spec::messages::{pointer_path, Announcement, MAX_ANNOUNCEMENT_LEN};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {size} bytes is over the limit of {limit} (fetch.max_bundle_bytes)")]
    TooLarge { url: String, size: u64, limit: u64 },
    #[error(
        "{url}: the download ended after {got_size} bytes with sha256 {got}, the announcement says {expected_size} bytes with sha256 {expected}"
    )]
    Digest { url: String, expected: String, got: String, expected_size: u64, got_size: u64 },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("no URL to fetch bundle {digest} from (announcement has none and fetch.base_url is not set)")]
    NoSource { digest: String },
    #[error("pointer file {url}: {reason}")]
    Pointer { url: String, reason: String },
}

impl FetchError {
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::TooLarge { .. } => "too_large",
            FetchError::Digest { .. } => "download_digest",
            _ => "fetch_failed",
        }
    }

    /// Whether retrying later cannot help (the bundle is what is wrong): too large, or
    /// a finished download whose bytes are not the announced ones.
    pub fn is_permanent(&self) -> bool {
        matches!(self, FetchError::TooLarge { .. } | FetchError::Digest { .. })
    }
}

/// A parsed `http://` or `https://` URL (the small subset the agent needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, FetchError> {
        let err = |reason| FetchError::Url { url: url.into(), reason };
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(err("only http:// and https:// are supported"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(err("credentials in URLs are not supported"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| err("bad port"))?),
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || path.contains(char::is_whitespace) {
            return Err(err("no host, or whitespace in the path"));
        }
        Ok(Url { https, host: host.into(), port, path: path.into() })
    }

    fn host_header(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Largest pointer file read: what `Announcement::from_json` accepts.
pub const MAX_POINTER: u64 = MAX_ANNOUNCEMENT_LEN as u64;
/// Reconnects within one download before giving up until the next attempt.
pub const MAX_RESUMES: u32 = 8;

/// An HTTP(S) client for bundles and pointer files.
pub struct Fetcher {
    ca_file: Option<std::path::PathBuf>,
    tls: std::cell::OnceCell<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    max_bytes: u64,
}

impl Fetcher {
    pub fn new(ca_file: Option<std::path::PathBuf>, timeout: Duration, max_bytes: u64) -> Self {
        Fetcher { ca_file, tls: std::cell::OnceCell::new(), timeout, max_bytes }
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, FetchError> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let config = crate::tls::client_config(self.ca_file.as_deref(), None)?;
        Ok(self.tls.get_or_init(|| config).clone())
    }

    async fn get(&self, url: &Url, range_from: u64) -> Result<Response<Incoming>, FetchError> {
        let text =
            format!("{}://{}{}", if url.https { "https" } else { "http" }, url.host_header(), url.path);
        let net = |reason: String| FetchError::Network { url: text.clone(), reason };
        let connect = async {
            let tcp =
                TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| net(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            if url.https {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|_| net("invalid TLS server name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(self.tls()?)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| net(format!("TLS: {e}")))?;
                request(tls, url, range_from).await.map_err(net)
            } else {
                request(tcp, url, range_from).await.map_err(net)
            }
        };
        tokio::time::timeout(self.timeout, connect).await.map_err(|_| net("timed out".into()))?
    }

    /// GETs a small document (a pointer file) of at most `limit` bytes; `None` when the
    /// server answers `404 Not Found`.
    pub async fn get_small(&self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, FetchError> {
        let parsed = Url::parse(url)?;
        let resp = self.get(&parsed, 0).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(FetchError::Status { url: url.into(), status: s.as_u16() }),
        }
        let too_large = |size| FetchError::TooLarge { url: url.into(), size, limit };
        if let Some(size) = content_length(&resp).filter(|&l| l > limit) {
            return Err(too_large(size));
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = self.next_frame(&mut body, url).await? {
            out.extend_from_slice(&frame);
            if out.len() as u64 > limit {
                return Err(too_large(out.len() as u64));
            }
        }
        Ok(Some(out))
    }

    async fn next_frame(&self, body: &mut Incoming, url: &str) -> Result<Option<Bytes>, FetchError> {
        loop {
            let frame = tokio::time::timeout(self.timeout, body.frame())
                .await
                .map_err(|_| FetchError::Network { url: url.into(), reason: "body timed out".into() })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(FetchError::Network { url: url.into(), reason: e.to_string() }),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// Downloads bundle `digest` from the first URL that works, resuming into
    /// `partial`, and returns its bytes once their sha256 equals `digest`.
    ///
    /// Every URL is tried until one delivers the announced bytes. When none does and at
    /// least one finished with other bytes, that [`FetchError::Digest`] is returned (a
    /// permanent error) even if other URLs failed transiently; `TooLarge` stops at once.
    pub async fn fetch_bundle(
        &self,
        urls: &[String],
        digest: &str,
        size: u64,
        partial: &Path,
    ) -> Result<Vec<u8>, FetchError> {
        if size > self.max_bytes {
            return Err(FetchError::TooLarge { url: "announcement".into(), size, limit: self.max_bytes });
        }
        if urls.is_empty() {
            return Err(FetchError::NoSource { digest: digest.into() });
        }
        let mut last = None;
        let mut mismatch = None;
        for url in urls {
            match self.fetch_one(url, digest, size, partial).await {
                Ok(bytes) => return Ok(bytes),
                Err(e @ FetchError::TooLarge { .. }) => return Err(e),
                Err(e @ FetchError::Digest { .. }) => {
                    tracing::warn!("download from {url} does not match the announcement: {e}");
                    mismatch = Some(e);
                }
                Err(e) => {
                    tracing::warn!("download from {url} failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(mismatch.or(last).expect("at least one URL was tried"))
    }

    async fn fetch_one(
        &self,
        url: &str,
        digest: &str,
        size: u64,
        partial: &Path,
    ) -> Result<Vec<u8>, FetchError> {
        let parsed = Url::parse(url)?;
        let io = |source| FetchError::Io { path: partial.display().to_string(), source };
        let mut resumes = 0;
        // Whether a mismatching file was already downloaded again from byte 0.
        let mut restarted = false;
        loop {
            let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            if have > self.max_bytes {
                let _ = std::fs::remove_file(partial);
                continue;
            }
            let attempt = async {
                let resp = self.get(&parsed, have).await?;
                let (append, total) = match resp.status() {
                    StatusCode::PARTIAL_CONTENT if have > 0 => {
                        (true, content_length(&resp).map(|l| have + l))
                    }
                    StatusCode::OK => (false, content_length(&resp)),
                    // The server has nothing past what we hold: the download is finished.
                    StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(true),
                    s => return Err(FetchError::Status { url: url.into(), status: s.as_u16() }),
                };
                if let Some(total) = total {
                    if total > self.max_bytes {
                        return Err(FetchError::TooLarge {
                            url: url.into(),
                            size: total,
                            limit: self.max_bytes,
                        });
                    }
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(partial)
                    .map_err(io)?;
                let mut written = if append { have } else { 0 };
                let mut body = resp.into_body();
                let result = async {
                    while let Some(data) = self.next_frame(&mut body, url).await? {
                        written += data.len() as u64;
                        if written > self.max_bytes {
                            return Err(FetchError::TooLarge {
                                url: url.into(),
                                size: written,
                                limit: self.max_bytes,
                            });
                        }
                        file.write_all(&data).map_err(io)?;
                    }
                    Ok(())
                }
                .await;
                // The partial file is not fsynced: what a power cut does to it (a short or
                // garbled tail) is caught by the digest check below, which downloads it again.
                result.map(|()| append)
            };
            // Whether the finished file holds bytes from an earlier response (a resume, a
            // leftover from a previous attempt, or all of it on a 416).
            let spliced = match attempt.await {
                Ok(appended) => appended,
                Err(e @ FetchError::Network { .. }) if resumes < MAX_RESUMES => {
                    resumes += 1;
                    let wait = Duration::from_millis(250u64 << resumes.min(6));
                    tracing::info!("download interrupted ({e}); resuming in {wait:?}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => {
                    if matches!(e, FetchError::TooLarge { .. }) {
                        let _ = std::fs::remove_file(partial);
                    }
                    return Err(e);
                }
            };
            let bytes = std::fs::read(partial).map_err(io)?;
            let got = hex::encode(Sha256::digest(&bytes));
            let _ = std::fs::remove_file(partial);
            if got != digest {
                if spliced && !restarted {
                    tracing::info!(
                        "{url}: resumed download does not match the announced digest; downloading it again from the start"
                    );
                    restarted = true;
                    continue;
                }
                return Err(FetchError::Digest {
                    url: url.into(),
                    expected: digest.into(),
                    got,
                    expected_size: size,
                    got_size: bytes.len() as u64,
                });
            }
            return Ok(bytes);
        }
    }
}

fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    resp.headers().get(hyper::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn request<S>(io: S, url: &Url, range_from: u64) -> Result<Response<Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.host_header())
        .header(hyper::header::USER_AGENT, concat!("fleet-agent/", env!("CARGO_PKG_VERSION")));
    if range_from > 0 {
        req = req.header(hyper::header::RANGE, format!("bytes={range_from}-"));
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Where to fetch an announced bundle: the announcement's URLs (a URL ending in
/// `.bundle` is used as is, any other as a base URL: `<url>/bundles/<digest>.bundle`),
/// then the configured base URL.
pub fn bundle_urls(ann: &Announcement, base_url: Option<&str>) -> Vec<String> {
    let mut urls: Vec<String> = ann
        .urls
        .iter()
        .map(|u| {
            if u.ends_with(".bundle") {
                u.clone()
            } else {
                format!("{}/bundles/{}.bundle", u.trim_end_matches('/'), ann.digest)
            }
        })
        .collect();
    if let Some(base) = base_url {
        let u = format!("{base}/bundles/{}.bundle", ann.digest);
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    urls
}

/// `<base_url>/devices/<device>.json`, the pointer file the bundler writes for `device`
/// (a valid id needs no escaping in a URL path).
pub fn pointer_url(base_url: &str, device: &str) -> String {
    format!("{base_url}/{}", pointer_path(device))
}

/// Turns this device's pointer file (its announcement with no URLs, see
/// `fleet-spec/MESSAGES.md`) into an announcement of `<base_url>/bundles/<digest>.bundle`.
/// The file must be a valid announcement (sha256 digest, no unknown fields, at most
/// 16 KiB) for this fleet and this device; its `urls` and `mqtt_blob` are not used.
pub fn announcement_from_pointer(
    bytes: &[u8],
    base_url: &str,
    fleet: &str,
    device: &str,
) -> Result<Announcement, FetchError> {
    let err = |reason| FetchError::Pointer { url: pointer_url(base_url, device), reason };
    let pointer = Announcement::from_json(bytes).map_err(|e| err(e.to_string()))?;
    if pointer.fleet != fleet || pointer.device != device {
        return Err(err(format!(
            "it is for device {:?} of fleet {:?}, this is device {device:?} of fleet {fleet:?}",
            pointer.device, pointer.fleet
        )));
    }
    let url = format!("{base_url}/bundles/{}.bundle", pointer.digest);
    Ok(Announcement { urls: vec![url], mqtt_blob: false, ..pointer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::Mutex;

    /// A one-response-per-connection HTTP server: `respond(n, range_from)` gives the
    /// raw response to the `n`th request (then the connection is closed). Returns the
    /// port and each request's `Range` start.
    fn serve(
        respond: impl Fn(usize, Option<u64>) -> Vec<u8> + Send + 'static,
    ) -> (u16, Arc<Mutex<Vec<Option<u64>>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse().ok();
                    }
                }
                let n = {
                    let mut log = log.lock().expect("lock");
                    log.push(range);
                    log.len() - 1
                };
                let _ = stream.write_all(&respond(n, range));
            }
        });
        (port, seen)
    }

    fn ok(body: &[u8], content_length: usize) -> Vec<u8> {
        let mut r =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n")
                .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn partial_content(full: &[u8], from: usize) -> Vec<u8> {
        let rest = &full[from..];
        let mut r = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
            rest.len(),
            full.len() - 1,
            full.len()
        )
        .into_bytes();
        r.extend_from_slice(rest);
        r
    }

    fn fetcher() -> Fetcher {
        Fetcher::new(None, Duration::from_secs(5), 1 << 20)
    }

    fn bundle_bytes() -> Vec<u8> {
        (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect()
    }

    #[tokio::test]
    async fn a_finished_download_that_does_not_match_is_a_permanent_digest_error() {
        let full = bundle_bytes();
        let digest = hex::encode(Sha256::digest(&full));
        let half = full[..full.len() / 2].to_vec();
        // The server has only half the bundle and says so: the body ends normally.
        let (port, seen) = serve(move |n, _| match n {
            0 => ok(&half, half.len()),
            _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join(&digest);
        let url = format!("http://127.0.0.1:{port}/b.bundle");
        let missing = format!("http://127.0.0.1:{port}/missing.bundle");
        let err = fetcher()
            .fetch_bundle(&[url, missing], &digest, full.len() as u64, &partial)
            .await
            .expect_err("half a bundle");
        assert!(matches!(err, FetchError::Digest { .. }), "{err}");
        assert!(err.is_permanent(), "a mismatch is not retried forever");
        assert_eq!(err.code(), "download_digest");
        assert!(err.to_string().contains(&format!("{} bytes", full.len() / 2)), "{err}");
        assert!(!partial.exists(), "the partial file is deleted");
        // Each URL once: a download from byte 0 is not repeated; the other URL's
        // failure (404 here) does not hide the mismatch.
        assert_eq!(seen.lock().expect("lock").as_slice(), [None, None]);
    }

    #[tokio::test]
    async fn a_connection_dropped_mid_body_is_resumed_not_rejected() {
        let full = bundle_bytes();
        let digest = hex::encode(Sha256::digest(&full));
        let served = full.clone();
        let (port, seen) = serve(move |n, range| match (n, range) {
            // The full Content-Length, half the body, then the connection closes.
            (0, _) => ok(&served[..served.len() / 2], served.len()),
            (_, Some(from)) => partial_content(&served, from as usize),
            (_, None) => ok(&served, served.len()),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join(&digest);
        let url = format!("http://127.0.0.1:{port}/b.bundle");
        let got =
            fetcher().fetch_bundle(&[url], &digest, full.len() as u64, &partial).await.expect("resumed");
        assert_eq!(got, full);
        assert_eq!(seen.lock().expect("lock").as_slice(), [None, Some(full.len() as u64 / 2)]);
    }

    #[tokio::test]
    async fn a_resumed_download_that_does_not_match_is_downloaded_again_from_the_start() {
        let full = bundle_bytes();
        let digest = hex::encode(Sha256::digest(&full));
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join(&digest);
        std::fs::write(&partial, b"stale bytes").expect("write");
        let served = full.clone();
        let (port, seen) = serve(move |_, range| match range {
            Some(from) => partial_content(&served, from as usize),
            None => ok(&served, served.len()),
        });
        let url = format!("http://127.0.0.1:{port}/b.bundle");
        let got =
            fetcher().fetch_bundle(&[url], &digest, full.len() as u64, &partial).await.expect("restarted");
        assert_eq!(got, full);
        assert_eq!(seen.lock().expect("lock").as_slice(), [Some(11), None]);
        assert!(!partial.exists());
    }

    #[test]
    fn urls_parse() {
        let u = Url::parse("https://cdn.example:8443/fleet/bundles/x.bundle?sig=1").expect("valid");
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "cdn.example", 8443, "/fleet/bundles/x.bundle?sig=1")
        );
        let u = Url::parse("http://127.0.0.1").expect("valid");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://user:pw@x/").is_err());
    }

    #[test]
    fn bundle_urls_from_announcement_and_base() {
        let ann = Announcement {
            fleet: "f".into(),
            device: "d".into(),
            version: 1,
            commit: "c".into(),
            digest: "ab".repeat(32),
            size: 1,
            urls: vec!["http://a/x.bundle".into(), "http://b/base/".into()],
            mqtt_blob: false,
        };
        let urls = bundle_urls(&ann, Some("http://c"));
        assert_eq!(urls[0], "http://a/x.bundle");
        assert_eq!(urls[1], format!("http://b/base/bundles/{}.bundle", "ab".repeat(32)));
        assert_eq!(urls[2], format!("http://c/bundles/{}.bundle", "ab".repeat(32)));
    }

    fn pointer(fleet: &str, device: &str, digest: &str) -> Vec<u8> {
        let mut json = format!(
            r#"{{"fleet":"{fleet}","device":"{device}","version":3,"commit":"abc","digest":"{digest}","size":10,"urls":[],"mqtt_blob":false}}"#
        )
        .into_bytes();
        json.push(b'\n');
        json
    }

    #[test]
    fn a_pointer_file_becomes_an_announcement_of_the_base_urls_bundle() {
        let d = "cd".repeat(32);
        assert_eq!(pointer_url("http://h/fleet", "gw"), "http://h/fleet/devices/gw.json");
        let ann =
            announcement_from_pointer(&pointer("f", "gw", &d), "http://h/fleet", "f", "gw").expect("ok");
        assert_eq!(
            ann,
            Announcement {
                fleet: "f".into(),
                device: "gw".into(),
                version: 3,
                commit: "abc".into(),
                digest: d.clone(),
                size: 10,
                urls: vec![format!("http://h/fleet/bundles/{d}.bundle")],
                mqtt_blob: false,
            }
        );
        // Only the base URL's bundle is fetched, whatever the file says.
        let elsewhere = String::from_utf8(pointer("f", "gw", &d))
            .expect("utf-8")
            .replace(r#""urls":[]"#, r#""urls":["http://evil/x.bundle"]"#)
            .replace("false", "true");
        let ann = announcement_from_pointer(elsewhere.as_bytes(), "http://h", "f", "gw").expect("ok");
        assert_eq!((ann.urls, ann.mqtt_blob), (vec![format!("http://h/bundles/{d}.bundle")], false));
    }

    #[test]
    fn a_pointer_file_for_another_device_or_fleet_or_malformed_is_refused() {
        let d = "cd".repeat(32);
        let refused = |bytes: &[u8]| {
            let err = announcement_from_pointer(bytes, "http://h", "f", "gw").expect_err("refused");
            assert!(matches!(err, FetchError::Pointer { .. }), "{err}");
            assert!(err.to_string().starts_with("pointer file http://h/devices/gw.json: "), "{err}");
            err.to_string()
        };
        let other_device = refused(&pointer("f", "gw-2", &d));
        assert!(other_device.contains(r#"for device "gw-2" of fleet "f""#), "{other_device}");
        let other_fleet = refused(&pointer("g", "gw", &d));
        assert!(other_fleet.contains(r#"of fleet "g""#), "{other_fleet}");
        let bad_digest = refused(&pointer("f", "gw", "../../etc/passwd"));
        assert!(bad_digest.contains("not 64 lowercase hex"), "{bad_digest}");
        refused(&pointer("f", "gw", &"CD".repeat(32)));
        // The old index.json shape, an unknown field, truncation, garbage.
        refused(format!(r#"{{"devices":{{"gw":{{"version":3,"digest":"{d}","size":10}}}}}}"#).as_bytes());
        let extra = String::from_utf8(pointer("f", "gw", &d)).expect("utf-8").replacen('{', r#"{"x":1,"#, 1);
        refused(extra.as_bytes());
        refused(&pointer("f", "gw", &d)[..40]);
        refused(b"\x00\xff");
        let huge =
            format!(r#"{{"fleet":"f","device":"gw","commit":"{}"}}"#, "a".repeat(MAX_POINTER as usize));
        assert!(refused(huge.as_bytes()).contains("over the limit"));
    }

    #[tokio::test]
    async fn get_small_maps_404_to_none_and_caps_the_size() {
        let (port, _) = serve(|n, _| match n {
            0 => ok(b"{}", 2),
            1 => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            2 => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
            // Refused by its Content-Length, before the body.
            3 => ok(b"", 1 << 30),
            // No Content-Length: refused once the body passes the limit.
            _ => {
                let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                r.resize(r.len() + MAX_POINTER as usize + 1, b' ');
                r
            }
        });
        let url = format!("http://127.0.0.1:{port}/devices/gw.json");
        let f = fetcher();
        assert_eq!(f.get_small(&url, MAX_POINTER).await.expect("200"), Some(b"{}".to_vec()));
        assert_eq!(f.get_small(&url, MAX_POINTER).await.expect("404"), None);
        let err = f.get_small(&url, MAX_POINTER).await.expect_err("500");
        assert!(matches!(err, FetchError::Status { status: 500, .. }), "{err}");
        for _ in 0..2 {
            let err = f.get_small(&url, MAX_POINTER).await.expect_err("too large");
            assert!(matches!(err, FetchError::TooLarge { limit: MAX_POINTER, .. }), "{err}");
        }
    }
}
