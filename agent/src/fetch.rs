//! Getting bundles: HTTP(S) with resumable `Range` downloads, and this device's pointer
//! file (`<base_url>/devices/<id>.json`, a few hundred bytes) for polling.
//!
//! A poll sends `If-None-Match` with the `ETag` of the last `200` (kept in memory by the
//! caller, only when it is a sane entity tag: [`sane_etag`]), so a poll of an unchanged
//! pointer file costs a `304 Not Modified` and no body. A server without ETags is polled
//! as before.
//!
//! A download lands in `state_dir/partial/<digest>`; after a dropped connection it
//! resumes with `Range: bytes=<have>-`. The `Content-Length` and the bytes received are
//! checked against `fetch.max_bundle_bytes` before they are stored, and the whole file's
//! sha256 must equal the announced digest before the bytes are handed to verification.
//!
//! **Every failure here is about one URL and is temporary** ([`FetchError`]): a server
//! that is down, slow, answers an error, sends too much, or sends other bytes than the
//! announced digest says nothing about the bundle itself, only about that server (an
//! announcement is unsigned: anyone who can publish on the broker can point it anywhere).
//! The next URL is tried, and the caller tries again later. Only bytes that were parsed
//! and failed verification are ever rejected, by the caller, keyed by their own hash.
//! The announced size is not used at all: it is as unsigned as the URL.
//!
//! Time is bounded too: each request has `fetch.timeout_secs` to connect and to deliver
//! each chunk, a whole download from one URL (resumes included) has
//! `fetch.deadline_secs`, and after its first `timeout` it must average
//! `fetch.min_bytes_per_sec`. The caller runs downloads beside its main loop, so even a
//! download that uses all of that never holds reconcile, health or sideloads.
//!
//! Nothing fetched here is trusted: the caller verifies the bundle's signature. This
//! module never writes outside the partial file it is given.

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
use tokio::time::Instant;

use crate::config::FetchConfig;

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
    #[error("{url}: {got} bytes in {secs} s is below fetch.min_bytes_per_sec ({min}/s) or past fetch.deadline_secs; trying elsewhere or later")]
    TooSlow { url: String, got: u64, secs: u64, min: u64 },
    #[error(
        "{url}: the download ended after {got_size} bytes with sha256 {got}, not the announced {expected}"
    )]
    Digest { url: String, expected: String, got: String, got_size: u64 },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("no URL to fetch bundle {digest} from (announcement has none and fetch.base_url is not set)")]
    NoSource { digest: String },
    #[error("no URL delivered bundle {digest}: {}", .failures.join("; "))]
    AllFailed { digest: String, failures: Vec<String> },
    #[error("pointer file {url}: {reason}")]
    Pointer { url: String, reason: String },
    #[error("fetch.bearer_token_file {path}: {reason}")]
    Token { path: String, reason: String },
}

impl FetchError {
    /// Reason code for reports. Every fetch error is temporary: see the module doc.
    pub fn code(&self) -> &'static str {
        "fetch_failed"
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
/// Longest `ETag` remembered (nginx's are about 20 bytes, S3's 36, a quoted base64
/// sha256 46); a longer one is ignored.
pub const MAX_ETAG_LEN: usize = 128;

/// What a poll of a small document (the pointer file) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// `200 OK`: the body, and its `ETag` when the server sent a sane one ([`sane_etag`]).
    Body { bytes: Vec<u8>, etag: Option<String> },
    /// `304 Not Modified`: the document is the one whose `ETag` was sent.
    NotModified,
    /// `404 Not Found`.
    NotFound,
}

/// `value` as an entity tag worth sending back in `If-None-Match`: `"..."` or `W/"..."`
/// of at most [`MAX_ETAG_LEN`] bytes, visible ASCII with no quote inside (RFC 9110's
/// `entity-tag` without obs-text). Anything else is ignored (the poll then simply is
/// unconditional), so a hostile server cannot make the agent send it arbitrary bytes.
pub fn sane_etag(value: &[u8]) -> Option<String> {
    if value.len() > MAX_ETAG_LEN {
        return None;
    }
    let opaque = value.strip_prefix(b"W/").unwrap_or(value);
    let inner = opaque.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.iter().all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b)) {
        return None;
    }
    // Only ASCII was accepted above.
    String::from_utf8(value.to_vec()).ok()
}
/// Reconnects within one download before giving up until the next attempt.
pub const MAX_RESUMES: u32 = 8;

/// The longest bearer token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// The token in a `fetch.bearer_token_file`: its content without the final line break,
/// which must be one non-empty run of visible ASCII (RFC 6750's token68 and more; no
/// space, no control character: nothing that could end or add a header line).
pub fn read_bearer_token(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("{}: over {MAX_TOKEN_FILE} bytes", path.display()));
    }
    let token = text.strip_suffix('\n').unwrap_or(&text);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "{}: the token must be one line of visible ASCII (no spaces or control characters)",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// What the bundle server (`fetch.base_url`'s origin, and only it) is given.
struct Credentials {
    https: bool,
    host: String,
    port: u16,
    client_auth: Option<(std::path::PathBuf, std::path::PathBuf)>,
    bearer_token_file: Option<std::path::PathBuf>,
    tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

impl Credentials {
    fn for_url(&self, url: &Url) -> bool {
        url.https == self.https && url.host.eq_ignore_ascii_case(&self.host) && url.port == self.port
    }
}

/// An HTTP(S) client for bundles and pointer files.
pub struct Fetcher {
    ca_file: Option<std::path::PathBuf>,
    tls: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
    /// For the bundle server only: never for a URL an (unsigned) announcement names
    /// elsewhere.
    credentials: Option<Credentials>,
    timeout: Duration,
    deadline: Duration,
    min_bytes_per_sec: u64,
    max_bytes: u64,
}

/// When a download from one URL must give up: its deadline, and the floor of its rate.
#[derive(Debug, Clone, Copy)]
struct Pace {
    started: Instant,
    deadline: Instant,
    /// The rate is judged only after this long (the first `timeout`).
    grace: Duration,
    min_bytes_per_sec: u64,
}

impl Pace {
    /// `Err` once the download is past its deadline, or slower than the floor.
    fn check(&self, url: &str, got: u64, now: Instant) -> Result<(), FetchError> {
        let elapsed = now.saturating_duration_since(self.started);
        let judged = elapsed.saturating_sub(self.grace);
        let floor = self.min_bytes_per_sec.saturating_mul(judged.as_secs());
        if now >= self.deadline || got < floor {
            return Err(FetchError::TooSlow {
                url: url.into(),
                got,
                secs: elapsed.as_secs(),
                min: self.min_bytes_per_sec,
            });
        }
        Ok(())
    }

    /// How long the next read may wait: the idle timeout, but never past the deadline
    /// nor past the moment the rate falls below the floor with no more bytes.
    fn wait(&self, got: u64, timeout: Duration, now: Instant) -> Duration {
        let until_deadline = self.deadline.saturating_duration_since(now);
        let rate_ok_until = match got.checked_div(self.min_bytes_per_sec) {
            Some(secs) => self.started + self.grace + Duration::from_secs(secs + 1),
            None => self.deadline,
        };
        timeout.min(until_deadline).min(rate_ok_until.saturating_duration_since(now))
    }
}

impl Fetcher {
    pub fn new(cfg: &FetchConfig, max_bytes: u64) -> Self {
        let origin = cfg.base_url.as_deref().and_then(|u| Url::parse(u).ok());
        let wanted = cfg.client_auth.is_some() || cfg.bearer_token_file.is_some();
        let credentials = origin.filter(|_| wanted).map(|o| Credentials {
            https: o.https,
            host: o.host,
            port: o.port,
            client_auth: cfg.client_auth.clone(),
            bearer_token_file: cfg.bearer_token_file.clone(),
            tls: std::sync::OnceLock::new(),
        });
        Fetcher {
            ca_file: cfg.ca_file.clone(),
            tls: std::sync::OnceLock::new(),
            credentials,
            timeout: cfg.timeout,
            deadline: cfg.deadline,
            min_bytes_per_sec: cfg.min_bytes_per_sec,
            max_bytes,
        }
    }

    /// The TLS configuration for `url`: with the client certificate for the bundle
    /// server when one is configured.
    fn tls(&self, url: &Url) -> Result<Arc<rustls::ClientConfig>, FetchError> {
        let (slot, client) = match &self.credentials {
            Some(c) if c.client_auth.is_some() && c.for_url(url) => (&c.tls, c.client_auth.as_ref()),
            _ => (&self.tls, None),
        };
        if let Some(c) = slot.get() {
            return Ok(c.clone());
        }
        let client = client.map(|(cert, key)| (cert.as_path(), key.as_path()));
        let config = crate::tls::client_config(self.ca_file.as_deref(), client)?;
        Ok(slot.get_or_init(|| config).clone())
    }

    /// `Authorization` for `url`: the bearer token, read now, for the bundle server only.
    fn authorization(&self, url: &Url) -> Result<Option<String>, FetchError> {
        let Some(path) =
            self.credentials.as_ref().filter(|c| c.for_url(url)).and_then(|c| c.bearer_token_file.as_ref())
        else {
            return Ok(None);
        };
        let token = read_bearer_token(path)
            .map_err(|reason| FetchError::Token { path: path.display().to_string(), reason })?;
        Ok(Some(format!("Bearer {token}")))
    }

    async fn get(
        &self,
        url: &Url,
        range_from: u64,
        if_none_match: Option<&str>,
        limit: Duration,
    ) -> Result<Response<Incoming>, FetchError> {
        let text =
            format!("{}://{}{}", if url.https { "https" } else { "http" }, url.host_header(), url.path);
        let net = |reason: String| FetchError::Network { url: text.clone(), reason };
        let authorization = self.authorization(url)?;
        let headers = Headers { range_from, if_none_match, authorization: authorization.as_deref() };
        let connect = async {
            let tcp =
                TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| net(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            if url.https {
                let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                    .map_err(|_| net("invalid TLS server name".into()))?;
                let tls = tokio_rustls::TlsConnector::from(self.tls(url)?)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| net(format!("TLS: {e}")))?;
                request(tls, url, headers).await.map_err(net)
            } else {
                request(tcp, url, headers).await.map_err(net)
            }
        };
        tokio::time::timeout(self.timeout.min(limit), connect).await.map_err(|_| net("timed out".into()))?
    }

    /// GETs a small document (a pointer file) of at most `limit` bytes. With `etag` (from
    /// an earlier [`Polled::Body`]) the request is conditional (`If-None-Match`) and a
    /// `304` is [`Polled::NotModified`]; a `304` to an unconditional request is an error.
    /// The whole request has `fetch.timeout_secs`.
    pub async fn get_small(&self, url: &str, limit: u64, etag: Option<&str>) -> Result<Polled, FetchError> {
        let work = async {
            let parsed = Url::parse(url)?;
            let resp = self.get(&parsed, 0, etag, self.timeout).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_MODIFIED if etag.is_some() => return Ok(Polled::NotModified),
                StatusCode::NOT_FOUND => return Ok(Polled::NotFound),
                s => return Err(FetchError::Status { url: url.into(), status: s.as_u16() }),
            }
            let too_large = |size| FetchError::TooLarge { url: url.into(), size, limit };
            if let Some(size) = content_length(&resp).filter(|&l| l > limit) {
                return Err(too_large(size));
            }
            let etag = resp.headers().get(hyper::header::ETAG).and_then(|v| sane_etag(v.as_bytes()));
            let mut body = resp.into_body();
            let mut out = Vec::new();
            while let Some(frame) = next_frame(&mut body, url, self.timeout).await? {
                out.extend_from_slice(&frame);
                if out.len() as u64 > limit {
                    return Err(too_large(out.len() as u64));
                }
            }
            Ok(Polled::Body { bytes: out, etag })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| FetchError::Network { url: url.into(), reason: "timed out".into() })?
    }

    /// Downloads bundle `digest`, resuming into `partial`, and returns its bytes once
    /// their sha256 equals `digest`. Every URL is tried in order until one delivers;
    /// each failure is that URL's ([`FetchError::AllFailed`] lists them all).
    pub async fn fetch_bundle(
        &self,
        urls: &[String],
        digest: &str,
        partial: &Path,
    ) -> Result<Vec<u8>, FetchError> {
        if urls.is_empty() {
            return Err(FetchError::NoSource { digest: digest.into() });
        }
        let mut failures = Vec::new();
        for url in urls {
            match self.fetch_one(url, digest, partial).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => {
                    tracing::warn!("download from {url} failed: {e}");
                    // A dropped or slow transfer is worth resuming (from here or another
                    // URL: a resumed file that does not match is downloaded again from
                    // the start); what an erring server sent is not.
                    if !matches!(e, FetchError::Network { .. } | FetchError::TooSlow { .. }) {
                        let _ = std::fs::remove_file(partial);
                    }
                    failures.push(e.to_string());
                }
            }
        }
        Err(FetchError::AllFailed { digest: digest.into(), failures })
    }

    async fn fetch_one(&self, url: &str, digest: &str, partial: &Path) -> Result<Vec<u8>, FetchError> {
        let limit = Limit { max_bytes: self.max_bytes, deadline: self.deadline, resumes: MAX_RESUMES };
        self.download(url, digest, partial, limit).await?;
        let io = |source| FetchError::Io { path: partial.display().to_string(), source };
        let bytes = std::fs::read(partial).map_err(io)?;
        let _ = std::fs::remove_file(partial);
        Ok(bytes)
    }

    /// Downloads artifact blob `sha256` of `size` bytes (both from the signed state) into
    /// `partial`, resuming, hashing while it streams, and renames it to `dest` only when
    /// the digest matches. Every URL is tried in order until one delivers. Memory stays
    /// at one network frame whatever the size.
    pub async fn fetch_blob(
        &self,
        urls: &[String],
        sha256: &str,
        size: u64,
        partial: &Path,
        dest: &Path,
    ) -> Result<(), FetchError> {
        if urls.is_empty() {
            return Err(FetchError::NoSource { digest: sha256.into() });
        }
        // A big blob on a slow link: the deadline grows with the size at the rate floor.
        let at_floor = Duration::from_secs(size / self.min_bytes_per_sec.max(1));
        let limit =
            Limit { max_bytes: size, deadline: self.deadline.max(at_floor), resumes: MAX_BLOB_RESUMES };
        let mut failures = Vec::new();
        for url in urls {
            match self.download(url, sha256, partial, limit).await {
                Ok(got) if got == size => {
                    return std::fs::rename(partial, dest)
                        .map_err(|source| FetchError::Io { path: dest.display().to_string(), source });
                }
                Ok(got) => {
                    // The digest matched but not the size: impossible unless the signed
                    // state is inconsistent; never taken.
                    let _ = std::fs::remove_file(partial);
                    failures.push(format!("{url}: {got} bytes, the state says {size}"));
                }
                Err(e) => {
                    tracing::warn!("download from {url} failed: {e}");
                    if !matches!(e, FetchError::Network { .. } | FetchError::TooSlow { .. }) {
                        let _ = std::fs::remove_file(partial);
                    }
                    failures.push(e.to_string());
                }
            }
        }
        Err(FetchError::AllFailed { digest: sha256.into(), failures })
    }

    /// Downloads `url` into `partial`, resuming with `Range` after dropped connections,
    /// hashing while it streams; `Ok(size)` when the whole file's sha256 is `digest`
    /// (the file stays at `partial`).
    async fn download(
        &self,
        url: &str,
        digest: &str,
        partial: &Path,
        limit: Limit,
    ) -> Result<u64, FetchError> {
        let parsed = Url::parse(url)?;
        let io = |source| FetchError::Io { path: partial.display().to_string(), source };
        let started = Instant::now();
        let pace = Pace {
            started,
            deadline: started + limit.deadline,
            grace: self.timeout,
            min_bytes_per_sec: self.min_bytes_per_sec,
        };
        let max_bytes = limit.max_bytes;
        let mut resumes = 0;
        // Bytes received from this URL in this download (the pace is judged on these).
        let mut received: u64 = 0;
        // Whether a mismatching file was already downloaded again from byte 0.
        let mut restarted = false;
        // The sha256 of the partial file's first `hashed.1` bytes.
        let mut hashed: Option<(Sha256, u64)> = None;
        loop {
            let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            if have > max_bytes {
                std::fs::remove_file(partial).map_err(io)?;
                hashed = None;
                continue;
            }
            // A leftover from an earlier run (or a file changed under us): hash what is
            // there, streaming, so the digest covers every byte.
            if hashed.as_ref().is_none_or(|(_, n)| *n != have) {
                hashed = Some((hash_prefix(partial).map_err(io)?, have));
            }
            pace.check(url, received, Instant::now())?;
            let hasher = &mut hashed;
            let attempt = async {
                let resp =
                    self.get(&parsed, have, None, pace.wait(received, self.timeout, Instant::now())).await?;
                let (append, total) = match resp.status() {
                    StatusCode::PARTIAL_CONTENT if have > 0 => {
                        (true, content_length(&resp).map(|l| have + l))
                    }
                    StatusCode::OK => (false, content_length(&resp)),
                    // The server has nothing past what we hold: the download is finished.
                    StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => return Ok(true),
                    s => return Err(FetchError::Status { url: url.into(), status: s.as_u16() }),
                };
                if let Some(total) = total.filter(|&t| t > max_bytes) {
                    return Err(FetchError::TooLarge { url: url.into(), size: total, limit: max_bytes });
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(partial)
                    .map_err(io)?;
                if !append {
                    *hasher = Some((Sha256::new(), 0));
                }
                let (sha, hashed_len) = hasher.as_mut().expect("set above");
                let mut written = if append { have } else { 0 };
                let mut body = resp.into_body();
                loop {
                    let wait = pace.wait(received, self.timeout, Instant::now());
                    let frame = match next_frame(&mut body, url, wait).await {
                        Ok(f) => f,
                        // Out of time: say why (the pace), not just "timed out".
                        Err(e) => {
                            pace.check(url, received, Instant::now())?;
                            return Err(e);
                        }
                    };
                    let Some(data) = frame else { break };
                    written += data.len() as u64;
                    received += data.len() as u64;
                    if written > max_bytes {
                        return Err(FetchError::TooLarge {
                            url: url.into(),
                            size: written,
                            limit: max_bytes,
                        });
                    }
                    file.write_all(&data).map_err(io)?;
                    sha.update(&data);
                    *hashed_len = written;
                    // Progress on a long download: a line per 64 MiB.
                    if written >> 26 != (written - data.len() as u64) >> 26 {
                        tracing::info!(url, bytes = written, of = max_bytes, "downloading");
                    }
                    pace.check(url, received, Instant::now())?;
                }
                // The partial file is not fsynced: what a power cut does to it (a short or
                // garbled tail) is caught by the digest check below, which downloads it again.
                Ok(append)
            };
            // Whether the finished file holds bytes from an earlier response (a resume, a
            // leftover from a previous attempt, or all of it on a 416).
            let spliced = match attempt.await {
                Ok(appended) => appended,
                Err(e @ FetchError::Network { .. }) if resumes < limit.resumes => {
                    resumes += 1;
                    let wait = Duration::from_millis(250u64 << resumes.min(6));
                    tracing::info!("download interrupted ({e}); resuming in {wait:?}");
                    tokio::time::sleep(wait.min(pace.deadline.saturating_duration_since(Instant::now())))
                        .await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let size = std::fs::metadata(partial).map_err(io)?.len();
            let (sha, hashed_len) = hashed.take().unwrap_or_else(|| (Sha256::new(), 0));
            let got = if hashed_len == size {
                hex::encode(sha.finalize())
            } else {
                hex::encode(hash_prefix(partial).map_err(io)?.finalize())
            };
            if got != digest {
                let _ = std::fs::remove_file(partial);
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
                    got_size: size,
                });
            }
            return Ok(size);
        }
    }
}

/// How much one download may take.
#[derive(Debug, Clone, Copy)]
struct Limit {
    max_bytes: u64,
    deadline: Duration,
    resumes: u32,
}

/// Resumes of one blob download from one URL (a bundle gets [`MAX_RESUMES`]): a big
/// file on a flaky link drops more often.
pub const MAX_BLOB_RESUMES: u32 = 32;

/// The sha256 of a file as it is (empty when missing), read in 64 KiB steps.
fn hash_prefix(path: &Path) -> std::io::Result<Sha256> {
    let mut sha = Sha256::new();
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sha),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(sha);
        }
        sha.update(&buf[..n]);
    }
}

async fn next_frame(body: &mut Incoming, url: &str, wait: Duration) -> Result<Option<Bytes>, FetchError> {
    loop {
        let frame = tokio::time::timeout(wait, body.frame())
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

fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    resp.headers().get(hyper::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The request headers that vary.
#[derive(Clone, Copy)]
struct Headers<'a> {
    range_from: u64,
    if_none_match: Option<&'a str>,
    /// Never logged: the header is marked sensitive.
    authorization: Option<&'a str>,
}

async fn request<S>(io: S, url: &Url, headers: Headers<'_>) -> Result<Response<Incoming>, String>
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
    if headers.range_from > 0 {
        req = req.header(hyper::header::RANGE, format!("bytes={}-", headers.range_from));
    }
    if let Some(etag) = headers.if_none_match {
        req = req.header(hyper::header::IF_NONE_MATCH, etag);
    }
    if let Some(value) = headers.authorization {
        let mut value = hyper::header::HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        req = req.header(hyper::header::AUTHORIZATION, value);
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

/// Where blob `sha256` is, for a bundle fetched from `bundle_urls`: `blobs/<sha256>`
/// beside the `bundles/` directory of each (a bundle URL not under `bundles/` has its
/// blobs in `blobs/` of its own directory), and under `base_url`. Blobs are checked
/// against the signed state, so an unsigned announcement that names a URL can only
/// waste a download, never change a byte.
pub fn blob_urls(bundle_urls: &[String], base_url: Option<&str>, sha256: &str) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    let base = base_url.map(|b| format!("{b}/bundles/x.bundle"));
    for u in bundle_urls.iter().chain(base.as_ref()) {
        let dir = match u.rsplit_once("/bundles/") {
            Some((root, _)) => root,
            None => u.rsplit_once('/').map_or(u.as_str(), |(dir, _)| dir),
        };
        let blob = format!("{dir}/blobs/{sha256}");
        if !urls.contains(&blob) {
            urls.push(blob);
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
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let log = ranges.clone();
        let (port, _) = serve_heads(move |n, head| {
            log.lock().expect("lock").push(head.range);
            respond(n, head.range)
        });
        (port, ranges)
    }

    /// What [`serve_heads`] read of a request.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    struct Head {
        range: Option<u64>,
        if_none_match: Option<String>,
        authorization: Option<String>,
    }

    /// [`serve`], with the request's `If-None-Match` too; returns each request's head.
    fn serve_heads(
        respond: impl Fn(usize, &Head) -> Vec<u8> + Send + 'static,
    ) -> (u16, Arc<Mutex<Vec<Head>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut head = Head::default();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        head.range = v.trim().trim_end_matches('-').parse().ok();
                    }
                    if lower.starts_with("if-none-match:") {
                        head.if_none_match = Some(line["if-none-match:".len()..].trim().to_string());
                    }
                    if lower.starts_with("authorization:") {
                        head.authorization = Some(line["authorization:".len()..].trim().to_string());
                    }
                }
                let n = {
                    let mut log = log.lock().expect("lock");
                    log.push(head.clone());
                    log.len() - 1
                };
                let _ = stream.write_all(&respond(n, &head));
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

    fn fetch_config(timeout: u64, deadline: u64, min_bytes_per_sec: u64) -> FetchConfig {
        FetchConfig {
            base_url: None,
            poll_interval: Duration::from_secs(300),
            ca_file: None,
            timeout: Duration::from_secs(timeout),
            deadline: Duration::from_secs(deadline),
            min_bytes_per_sec,
            disk_reserve_bytes: 0,
            client_auth: None,
            bearer_token_file: None,
        }
    }

    #[tokio::test]
    async fn the_bearer_token_goes_to_the_bundle_server_only_and_is_read_at_each_request() {
        let digest = hex::encode(Sha256::digest(bundle_bytes()));
        let body = bundle_bytes();
        let (base, base_heads) =
            serve_heads(move |n, _| if n == 0 { ok(&body, body.len()) } else { ok(b"{}", 2) });
        let body = bundle_bytes();
        let (other, other_heads) = serve_heads(move |_, _| ok(&body, body.len()));
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cr3t-1\n").expect("write");
        let mut cfg = fetch_config(5, 60, 1024);
        cfg.base_url = Some(format!("http://127.0.0.1:{base}/fleet"));
        cfg.bearer_token_file = Some(token.clone());
        let f = Fetcher::new(&cfg, 1 << 20);

        // An announcement naming another server (anyone who can publish can) gets no token.
        let urls = [format!("http://127.0.0.1:{other}/b.bundle")];
        f.fetch_bundle(&urls, &digest, &dir.path().join("p1")).await.expect("fetched elsewhere");
        assert_eq!(other_heads.lock().expect("lock")[0].authorization, None);
        // The bundle server does, read from the file now: rotated in place, the new one.
        let urls = [format!("http://127.0.0.1:{base}/fleet/bundles/{digest}.bundle")];
        f.fetch_bundle(&urls, &digest, &dir.path().join("p2")).await.expect("fetched");
        std::fs::write(&token, "s3cr3t-2").expect("rotate");
        f.get_small(&format!("http://127.0.0.1:{base}/fleet/devices/gw.json"), MAX_POINTER, None)
            .await
            .expect("polled");
        let seen: Vec<_> = base_heads.lock().expect("lock").iter().map(|h| h.authorization.clone()).collect();
        assert_eq!(seen, [Some("Bearer s3cr3t-1".to_string()), Some("Bearer s3cr3t-2".to_string())]);

        // A token file that went bad is this request's failure, sent nowhere.
        std::fs::write(&token, "two\nlines").expect("write");
        let err = f
            .get_small(&format!("http://127.0.0.1:{base}/fleet/devices/gw.json"), MAX_POINTER, None)
            .await
            .expect_err("refused");
        assert!(matches!(err, FetchError::Token { .. }), "{err}");
        assert_eq!(base_heads.lock().expect("lock").len(), 2, "a request went out with a bad token");
    }

    #[test]
    fn hostile_token_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t");
        let read = |content: &[u8]| {
            std::fs::write(&path, content).expect("write");
            read_bearer_token(&path)
        };
        assert_eq!(read(b"abc.DEF-123_~+/=\n"), Ok("abc.DEF-123_~+/=".to_string()));
        assert_eq!(read(b"abc\r\n"), Ok("abc".to_string()));
        for bad in [
            &b""[..],
            b"\n",
            b"a b",
            b"abc\r\nX-Injected: 1",
            b"abc\n\n",
            b"t\x00k",
            b"t\xc3\xa9",
            &[b'a'; 5000][..],
        ] {
            assert!(read(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(read_bearer_token(&dir.path().join("missing")).is_err());
    }

    fn fetcher() -> Fetcher {
        Fetcher::new(&fetch_config(5, 60, 1024), 1 << 20)
    }

    fn bundle_bytes() -> Vec<u8> {
        (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect()
    }

    const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    /// Hardening I, case 1: other bytes than the announced digest are that server's
    /// failure, not the bundle's: the next URL (the base URL) still delivers it.
    #[tokio::test]
    async fn wrong_bytes_from_one_url_are_that_urls_failure_and_the_next_url_delivers() {
        let full = bundle_bytes();
        let digest = hex::encode(Sha256::digest(&full));
        let wrong: Vec<u8> = full.iter().map(|b| b ^ 0xff).collect();
        let served = full.clone();
        let (port, seen) = serve(move |n, _| match n {
            0 => ok(&wrong, wrong.len()),
            1 => NOT_FOUND.to_vec(),
            _ => ok(&served, served.len()),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join(&digest);
        let urls: Vec<String> = ["evil", "missing", "good"]
            .iter()
            .map(|p| format!("http://127.0.0.1:{port}/{p}.bundle"))
            .collect();
        let got = fetcher().fetch_bundle(&urls, &digest, &partial).await.expect("the good URL delivers");
        assert_eq!(got, full);
        assert_eq!(seen.lock().expect("lock").len(), 3, "every URL was tried in order");
        assert!(!partial.exists());

        // With no good URL, the error names every URL's failure, and is temporary.
        let (port, _) = serve(|_, _| NOT_FOUND.to_vec());
        let err = fetcher()
            .fetch_bundle(&[format!("http://127.0.0.1:{port}/x.bundle")], &digest, &partial)
            .await
            .expect_err("nothing delivers");
        assert!(matches!(err, FetchError::AllFailed { .. }), "{err}");
        assert!(err.to_string().contains("HTTP 404"), "{err}");
        assert_eq!(err.code(), "fetch_failed");
    }

    /// Hardening I, case 1: a huge `Content-Length` is refused before a byte is stored,
    /// for that URL only.
    #[tokio::test]
    async fn a_huge_content_length_is_that_urls_failure_and_the_next_url_delivers() {
        let full = bundle_bytes();
        let digest = hex::encode(Sha256::digest(&full));
        let served = full.clone();
        let (port, _) = serve(move |n, _| match n {
            0 => ok(b"", 10 << 30),
            _ => ok(&served, served.len()),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join(&digest);
        let urls =
            [format!("http://127.0.0.1:{port}/huge.bundle"), format!("http://127.0.0.1:{port}/b.bundle")];
        let got = fetcher().fetch_bundle(&urls, &digest, &partial).await.expect("the second URL delivers");
        assert_eq!(got, full);
    }

    /// Hardening I, case 3: a server that trickles bytes is left once the download's
    /// average rate falls below `min_bytes_per_sec` after the first `timeout`.
    #[tokio::test]
    async fn a_server_that_trickles_bytes_is_left_at_the_rate_floor() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                // One byte every 300 ms: each read is within the idle timeout.
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(300));
                    if stream.write_all(b"x").is_err() {
                        return;
                    }
                }
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join("ab".repeat(32));
        let f = Fetcher::new(&fetch_config(1, 600, 1024), 1 << 20);
        let started = std::time::Instant::now();
        let err = f
            .fetch_bundle(&[format!("http://127.0.0.1:{port}/slow.bundle")], &"ab".repeat(32), &partial)
            .await
            .expect_err("too slow");
        let took = started.elapsed();
        assert!(err.to_string().contains("min_bytes_per_sec"), "{err}");
        // Left within about grace + 1 s, not after the 30 s the trickle would last.
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    /// Hardening I, case 3: a download has a total deadline whatever its rate.
    #[tokio::test]
    async fn a_download_stops_at_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n");
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(100));
                    if stream.write_all(&[b'x'; 4096]).is_err() {
                        return;
                    }
                }
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let partial = dir.path().join("ab".repeat(32));
        let f = Fetcher::new(&fetch_config(1, 2, 1), 1 << 20);
        let started = std::time::Instant::now();
        let err = f
            .fetch_bundle(&[format!("http://127.0.0.1:{port}/long.bundle")], &"ab".repeat(32), &partial)
            .await
            .expect_err("past the deadline");
        assert!(err.to_string().contains("deadline_secs"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
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
        let got = fetcher().fetch_bundle(&[url], &digest, &partial).await.expect("resumed");
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
        let got = fetcher().fetch_bundle(&[url], &digest, &partial).await.expect("restarted");
        assert_eq!(got, full);
        assert_eq!(seen.lock().expect("lock").as_slice(), [Some(11), None]);
        assert!(!partial.exists());
    }

    #[tokio::test]
    async fn a_blob_dropped_again_and_again_is_resumed_hashed_and_renamed_only_when_it_matches() {
        let full: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&full));
        let served = full.clone();
        // Each response sends at most 70,000 bytes and drops the connection.
        let (port, seen) = serve(move |_, range| {
            let from = range.unwrap_or(0) as usize;
            let part = if from == 0 { ok(&served, served.len()) } else { partial_content(&served, from) };
            let head_len = part.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
            part[..(head_len + 70_000).min(part.len())].to_vec()
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let (partial, dest) = (dir.path().join("p"), dir.path().join(&sha));
        let urls = blob_urls(&[format!("http://127.0.0.1:{port}/fleet/bundles/d.bundle")], None, &sha);
        assert_eq!(urls, [format!("http://127.0.0.1:{port}/fleet/blobs/{sha}")]);
        fetcher().fetch_blob(&urls, &sha, full.len() as u64, &partial, &dest).await.expect("resumed");
        assert_eq!(std::fs::read(&dest).expect("blob"), full);
        assert!(!partial.exists());
        let ranges = seen.lock().expect("lock").clone();
        assert_eq!(ranges, [None, Some(70_000), Some(140_000), Some(210_000), Some(280_000)]);

        // Other bytes of the right size, or more bytes than the state says: never taken.
        let wrong = vec![0u8; full.len()];
        let (port, _) = serve(move |_, _| ok(&wrong, wrong.len()));
        let url = format!("http://127.0.0.1:{port}/blobs/{sha}");
        let dest2 = dir.path().join("other");
        let e =
            fetcher().fetch_blob(std::slice::from_ref(&url), &sha, full.len() as u64, &partial, &dest2).await;
        assert!(matches!(e, Err(FetchError::AllFailed { .. })), "{e:?}");
        let e = fetcher().fetch_blob(&[url], &sha, 1000, &partial, &dest2).await.expect_err("too large");
        assert!(e.to_string().contains("1000"), "{e}");
        assert!(!dest2.exists() && !partial.exists());
    }

    #[test]
    fn blob_urls_sit_beside_the_bundles_directory() {
        let sha = "ab".repeat(32);
        let urls = blob_urls(
            &["https://cdn.example/f/bundles/x.bundle".into(), "http://lan/x.bundle".into()],
            Some("https://fleet.example/out"),
            &sha,
        );
        assert_eq!(
            urls,
            [
                format!("https://cdn.example/f/blobs/{sha}"),
                format!("http://lan/blobs/{sha}"),
                format!("https://fleet.example/out/blobs/{sha}"),
            ]
        );
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
        assert_eq!(
            f.get_small(&url, MAX_POINTER, None).await.expect("200"),
            Polled::Body { bytes: b"{}".to_vec(), etag: None }
        );
        assert_eq!(f.get_small(&url, MAX_POINTER, None).await.expect("404"), Polled::NotFound);
        let err = f.get_small(&url, MAX_POINTER, None).await.expect_err("500");
        assert!(matches!(err, FetchError::Status { status: 500, .. }), "{err}");
        for _ in 0..2 {
            let err = f.get_small(&url, MAX_POINTER, None).await.expect_err("too large");
            assert!(matches!(err, FetchError::TooLarge { limit: MAX_POINTER, .. }), "{err}");
        }
    }

    fn ok_with_etag(body: &[u8], etag: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: ", body.len()).into_bytes();
        r.extend_from_slice(etag);
        r.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        r.extend_from_slice(body);
        r
    }

    const NOT_MODIFIED: &[u8] = b"HTTP/1.1 304 Not Modified\r\nETag: \"5f3a-2\"\r\nConnection: close\r\n\r\n";

    /// An unchanged pointer file costs a `304` and no body: the `ETag` of the `200` goes
    /// back in `If-None-Match` (what nginx, S3 and CDNs answer with `304`).
    #[tokio::test]
    async fn a_poll_with_the_last_etag_costs_a_304_and_no_body() {
        let (port, seen) = serve_heads(|_, head| match head.if_none_match.as_deref() {
            Some("\"5f3a-2\"") => NOT_MODIFIED.to_vec(),
            _ => ok_with_etag(b"{}", b"\"5f3a-2\""),
        });
        let url = format!("http://127.0.0.1:{port}/devices/gw.json");
        let f = fetcher();
        let first = f.get_small(&url, MAX_POINTER, None).await.expect("200");
        assert_eq!(first, Polled::Body { bytes: b"{}".to_vec(), etag: Some("\"5f3a-2\"".into()) });
        let second = f.get_small(&url, MAX_POINTER, Some("\"5f3a-2\"")).await.expect("304");
        assert_eq!(second, Polled::NotModified);
        // Another tag (the file changed since): the server sends the new file.
        let third = f.get_small(&url, MAX_POINTER, Some("W/\"old\"")).await.expect("200");
        assert!(matches!(third, Polled::Body { .. }), "{third:?}");
        let sent: Vec<_> = seen.lock().expect("lock").iter().map(|h| h.if_none_match.clone()).collect();
        assert_eq!(sent, [None, Some("\"5f3a-2\"".into()), Some("W/\"old\"".into())]);
    }

    /// A server that ignores `If-None-Match` (or has no ETags) keeps working: a `200`
    /// is the file, whatever was asked.
    #[tokio::test]
    async fn a_server_that_ignores_if_none_match_still_delivers_the_file() {
        let (port, seen) = serve_heads(|_, _| ok(b"{}", 2));
        let url = format!("http://127.0.0.1:{port}/devices/gw.json");
        let got = fetcher().get_small(&url, MAX_POINTER, Some("\"5f3a-2\"")).await.expect("200");
        assert_eq!(got, Polled::Body { bytes: b"{}".to_vec(), etag: None });
        assert_eq!(seen.lock().expect("lock")[0].if_none_match.as_deref(), Some("\"5f3a-2\""));
    }

    /// A `304` to a request that named no tag says nothing about any file: an error.
    #[tokio::test]
    async fn a_304_to_an_unconditional_poll_is_an_error() {
        let (port, _) = serve_heads(|_, _| NOT_MODIFIED.to_vec());
        let url = format!("http://127.0.0.1:{port}/devices/gw.json");
        let err = fetcher().get_small(&url, MAX_POINTER, None).await.expect_err("304 without a tag");
        assert!(matches!(err, FetchError::Status { status: 304, .. }), "{err}");
    }

    /// A hostile `ETag` (too long, unquoted, bytes outside visible ASCII, a quote inside)
    /// is not remembered: the next poll is unconditional, the file still arrives.
    #[tokio::test]
    async fn a_hostile_etag_is_ignored_and_the_file_still_arrives() {
        let long = format!("\"{}\"", "a".repeat(MAX_ETAG_LEN - 1));
        let hostile: Vec<Vec<u8>> = vec![
            long.clone().into_bytes(),
            b"abc".to_vec(),
            b"\"a\"b\"".to_vec(),
            b"\"a b\"".to_vec(),
            b"\"caf\xc3\xa9\"".to_vec(),
            b"W/abc".to_vec(),
            b"\"".to_vec(),
        ];
        let served = hostile.clone();
        let (port, _) = serve_heads(move |n, _| ok_with_etag(b"{}", &served[n]));
        let url = format!("http://127.0.0.1:{port}/devices/gw.json");
        let f = fetcher();
        for tag in &hostile {
            let got = f.get_small(&url, MAX_POINTER, None).await.expect("200");
            let shown = String::from_utf8_lossy(tag);
            assert_eq!(got, Polled::Body { bytes: b"{}".to_vec(), etag: None }, "{shown}");
        }
        // At the length limit, a tag is kept.
        let fits = format!("\"{}\"", "a".repeat(MAX_ETAG_LEN - 2));
        assert_eq!(sane_etag(fits.as_bytes()), Some(fits.clone()));
    }

    #[test]
    fn sane_etags_are_quoted_visible_ascii() {
        for ok in ["\"5f3a-2\"", "W/\"x\"", "\"\"", "\"d41d8cd98f00b204e9800998ecf8427e-3\"", "\"!#~\""] {
            assert_eq!(sane_etag(ok.as_bytes()).as_deref(), Some(ok));
        }
        for bad in ["", "x", "\"x", "x\"", "w/\"x\"", "W/ \"x\"", "\"x\" ", "\"a\tb\"", "\"a\\\"b\""] {
            assert_eq!(sane_etag(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
