//! The previously published build (`build --previous URL|DIR`): its `index.json` and
//! its bundles, read from the bundle server or from a directory.
//!
//! Why: versions only grow across builds into the same output directory. When CI lost
//! that directory (a cache miss) and the commit being built is dated earlier than the
//! previous build's (a committer clock behind, a rebase), the new versions would not be
//! newer than what devices hold, and every device would refuse the bundles
//! (`not_newer`). With the published index at hand the build chooses versions above it,
//! and keeps the published bundle of a device whose state did not change.
//!
//! This module only reads: it never writes to the server or the directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::build::Index;

/// The largest `index.json` read from a server (about 300 bytes per device).
const MAX_INDEX_SIZE: u64 = 256 << 20;
/// The largest bundle read from a server.
const MAX_BUNDLE_SIZE: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PreviousError {
    #[error("--previous {0}: no such directory (pass the directory of the published build output, or its http(s) URL)")]
    NoDir(PathBuf),
    #[error("--previous: cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("--previous: cannot fetch {url}: {message} (is the bundle server reachable? the build needs the published index to choose newer versions)")]
    Http { url: String, message: String },
    #[error("--previous: {url} answered HTTP {status} (pass the base URL that holds index.json, devices/ and bundles/)")]
    Status { url: String, status: u16 },
    #[error("--previous: {what} is not a build index: {message}")]
    BadIndex { what: String, message: String },
}

/// Where the previous build is.
#[derive(Debug, Clone)]
enum Location {
    Dir(PathBuf),
    Url { base: String, agent: ureq::Agent },
}

/// The previous build, loaded.
pub struct Previous {
    location: Location,
    /// Its index; `None` when nothing was published there yet.
    pub index: Option<Index>,
}

impl Previous {
    /// Loads `DIR/index.json` or `URL/index.json`. A missing index (no file, HTTP 404)
    /// is no error: nothing was published yet, as before a fleet's first build.
    pub fn load(arg: &str, timeout: Duration) -> Result<Previous, PreviousError> {
        if arg.starts_with("http://") || arg.starts_with("https://") {
            let config = ureq::Agent::config_builder()
                .timeout_global(Some(timeout))
                .http_status_as_error(false)
                .build();
            let agent = ureq::Agent::new_with_config(config);
            let base = arg.trim_end_matches('/').to_string();
            let url = format!("{base}/index.json");
            let index = match get(&agent, &url, MAX_INDEX_SIZE)? {
                None => None,
                Some(bytes) => Some(parse_index(&url, &bytes)?),
            };
            return Ok(Previous { location: Location::Url { base, agent }, index });
        }
        let dir = PathBuf::from(arg);
        if !dir.is_dir() {
            return Err(PreviousError::NoDir(dir));
        }
        let path = dir.join("index.json");
        let index = match std::fs::read(&path) {
            Ok(bytes) => Some(parse_index(&path.display().to_string(), &bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(PreviousError::Io { path, source }),
        };
        Ok(Previous { location: Location::Dir(dir), index })
    }

    /// Where it was read from, for messages.
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Dir(d) => d.display().to_string(),
            Location::Url { base, .. } => base.clone(),
        }
    }

    /// The bytes of `bundles/<digest>.bundle`, or `None` when it cannot be had (the
    /// caller then builds a new bundle). The caller checks the content address.
    pub fn bundle(&self, digest: &str) -> Option<Vec<u8>> {
        let name = format!("bundles/{digest}.bundle");
        match &self.location {
            Location::Dir(dir) => std::fs::read(Path::new(dir).join(name)).ok(),
            Location::Url { base, agent } => get(agent, &format!("{base}/{name}"), MAX_BUNDLE_SIZE).ok()?,
        }
    }
}

fn parse_index(what: &str, bytes: &[u8]) -> Result<Index, PreviousError> {
    serde_json::from_slice(bytes)
        .map_err(|e| PreviousError::BadIndex { what: what.into(), message: e.to_string() })
}

/// GET `url`: `Ok(None)` on 404, the body (at most `limit` bytes) on 2xx.
fn get(agent: &ureq::Agent, url: &str, limit: u64) -> Result<Option<Vec<u8>>, PreviousError> {
    let http = |e: ureq::Error| PreviousError::Http { url: url.into(), message: e.to_string() };
    let mut resp = agent.get(url).call().map_err(http)?;
    match resp.status().as_u16() {
        404 => Ok(None),
        200..=299 => Ok(Some(resp.body_mut().with_config().limit(limit).read_to_vec().map_err(http)?)),
        status => Err(PreviousError::Status { url: url.into(), status }),
    }
}
