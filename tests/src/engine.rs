//! A tiny synchronous HTTP/1.1 client (one request per connection, `Connection: close`,
//! chunked transfer-encoding understood) over unix sockets, for inspecting container
//! engines (`/v1.41/containers/json?all=1`), and over TCP ([`http_get`]); plus the
//! [`Engine`] trait shared by [`crate::Dockerd`] and [`crate::Podman`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::process::run_output;

/// Read/write timeout of one request (image pulls stream for a while).
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {}", self.status, self.text()))
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request over an open stream and reads the whole response.
fn exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    host: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpResponse> {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: fleet-e2e\r\n");
    if let Some(body) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    } else if method != "GET" && method != "HEAD" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).context("sending the request")?;
    if let Some(body) = body {
        stream.write_all(body).context("sending the request body")?;
    }
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the response")?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head: bool) -> Result<HttpResponse> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response: {:?}", String::from_utf8_lossy(raw)))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let mut resp = HttpResponse { status, headers, body: Vec::new() };
    if head {
        return Ok(resp);
    }
    let chunked =
        resp.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    resp.body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < len {
            bail!("HTTP body truncated: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(resp)
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end =
            data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("truncated chunk size line"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk: {} of {size} bytes", data.len());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// One request to the HTTP server on unix socket `socket`.
pub fn engine_request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<HttpResponse> {
    let stream =
        UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    exchange(stream, method, "localhost", path, body.map(str::as_bytes))
        .with_context(|| format!("{method} {path} on {}", socket.display()))
}

/// `GET path` on a unix socket: (status, body).
pub fn engine_get(socket: &Path, path: &str) -> Result<(u16, String)> {
    engine_request(socket, "GET", path, None).map(|r| (r.status, r.text()))
}

/// `POST path` with an optional JSON body on a unix socket: (status, body).
pub fn engine_post(socket: &Path, path: &str, json_body: Option<&str>) -> Result<(u16, String)> {
    engine_request(socket, "POST", path, json_body).map(|r| (r.status, r.text()))
}

/// `DELETE path` on a unix socket: (status, body).
pub fn engine_delete(socket: &Path, path: &str) -> Result<(u16, String)> {
    engine_request(socket, "DELETE", path, None).map(|r| (r.status, r.text()))
}

/// `GET path` over TCP to `addr` (`"127.0.0.1:PORT"`): (status, body). For checking
/// what containers serve on published ports.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let resp =
        exchange(stream, "GET", addr, path, None).with_context(|| format!("GET http://{addr}{path}"))?;
    Ok((resp.status, resp.text()))
}

/// Percent-encodes a query value (keeps `:`, `/` and `@`, which engines accept as is).
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits an image reference into the `fromImage` and `tag` parameters of
/// `POST /images/create` (`tag` is a digest for `repo@sha256:...`).
pub(crate) fn split_reference(reference: &str) -> (String, String) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo.to_string(), digest.to_string());
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => (reference[..last_slash + i].to_string(), reference[last_slash + i + 1..].to_string()),
        None => (reference.to_string(), "latest".to_string()),
    }
}

/// The Docker CLI: Debian's `/usr/bin/docker` (matching dockerd 20.10) when installed,
/// else whatever `docker` is on `PATH`.
pub(crate) fn docker_cli() -> Result<PathBuf> {
    let debian = Path::new("/usr/bin/docker");
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    crate::require_program("docker")
}

/// A container engine speaking the Docker Engine API v1.41 on a unix socket.
pub trait Engine {
    /// The engine's API socket.
    fn socket_path(&self) -> &Path;

    /// A directory the harness owns for this engine (used for the Docker CLI config).
    fn work_dir(&self) -> &Path;

    /// `unix:///.../x.sock`, for `DOCKER_HOST`.
    fn docker_host(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// `GET path`: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String)> {
        engine_get(self.socket_path(), path)
    }

    /// `POST path` with an optional JSON body: (status, body).
    fn post(&self, path: &str, json_body: Option<&str>) -> Result<(u16, String)> {
        engine_post(self.socket_path(), path, json_body)
    }

    /// `DELETE path`: (status, body).
    fn delete(&self, path: &str) -> Result<(u16, String)> {
        engine_delete(self.socket_path(), path)
    }

    /// `GET path`, requiring a 2xx status and a JSON body.
    fn get_json(&self, path: &str) -> Result<Value> {
        let resp = engine_request(self.socket_path(), "GET", path, None)?;
        if !(200..300).contains(&resp.status) {
            bail!("GET {path}: HTTP {}: {}", resp.status, resp.text());
        }
        resp.json()
    }

    /// All containers (`/v1.41/containers/json?all=1`), running or not.
    fn containers(&self) -> Result<Vec<Value>> {
        match self.get_json("/v1.41/containers/json?all=1")? {
            Value::Array(list) => Ok(list),
            other => bail!("containers/json returned {other}"),
        }
    }

    /// Pulls `reference` (`host:port/repo:tag` or `host:port/repo@sha256:...`) through
    /// `POST /v1.41/images/create`, failing on an error in the progress stream.
    fn pull(&self, reference: &str) -> Result<()> {
        let (image, tag) = split_reference(reference);
        let path =
            format!("/v1.41/images/create?fromImage={}&tag={}", query_escape(&image), query_escape(&tag));
        let resp = engine_request(self.socket_path(), "POST", &path, None)?;
        let text = resp.text();
        if resp.status != 200 {
            bail!("pulling {reference}: HTTP {}: {text}", resp.status);
        }
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                if let Some(err) = v.get("error").or_else(|| v.get("errorDetail")) {
                    bail!("pulling {reference}: {err}");
                }
            }
        }
        Ok(())
    }

    /// Runs the Docker CLI against this engine (`DOCKER_HOST`), returning its stdout;
    /// fails with stderr when the command fails.
    fn docker(&self, args: &[&str]) -> Result<String> {
        let config = self.work_dir().join("docker-cli");
        std::fs::create_dir_all(&config).with_context(|| format!("creating {}", config.display()))?;
        run_output(
            Command::new(docker_cli()?)
                .args(args)
                .env("DOCKER_HOST", self.docker_host())
                .env("DOCKER_CONFIG", &config)
                .env("DOCKER_BUILDKIT", "0")
                .env("DOCKER_CLI_HINTS", "false"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        let r = parse_response(raw, false).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabcdef";
        let r = parse_response(raw, false).unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "abc"));
    }

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("127.0.0.1:5000/bb:1"), ("127.0.0.1:5000/bb".into(), "1".into()));
        assert_eq!(split_reference("127.0.0.1:5000/bb"), ("127.0.0.1:5000/bb".into(), "latest".into()));
        assert_eq!(
            split_reference("127.0.0.1:5000/a/bb@sha256:ab"),
            ("127.0.0.1:5000/a/bb".into(), "sha256:ab".into())
        );
    }
}
