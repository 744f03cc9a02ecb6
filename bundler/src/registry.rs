//! Pins image tags to digests through the Docker Registry HTTP API v2.
//!
//! `GET /v2/<name>/manifests/<tag>` with the manifest media types in `Accept`, reading
//! `Docker-Content-Digest` (or the sha256 of the body when a registry leaves the header
//! out) and the sizes the manifest lists, which the agent checks against its engine's
//! free space before a pull; with `--no-image-sizes`, a `HEAD` for the digest alone. Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=...`) are
//! fetched as Docker Hub and most registries require. Loopback registries and those
//! named with `--insecure-registry` are spoken to over plain HTTP, all others over
//! HTTPS.
//!
//! [`pin_states`] is the only entry point the build uses: it resolves every distinct
//! image reference once, then patches the states.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleet_spec::model::ImageSize;
use fleet_spec::DesiredState;
use sha2::{Digest, Sha256};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.manifest.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference `{0}` cannot be parsed")]
    Reference(String),
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: HTTP {status}{hint}")]
    Status { url: String, status: u16, hint: &'static str },
}

/// Where an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// `host[:port]` of the registry (`registry-1.docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
    pub tag: String,
}

/// Splits a reference as Docker does: the first component is a registry when it has
/// a `.` or `:` or is `localhost`; otherwise the image is on Docker Hub.
pub fn parse_reference(reference: &str) -> Result<ImageName, RegistryError> {
    let bad = || RegistryError::Reference(reference.into());
    let (first, rest) = reference.split_once('/').unwrap_or(("", reference));
    let (registry, path) =
        if !first.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost") {
            (first.to_string(), rest.to_string())
        } else {
            let path = if first.is_empty() { format!("library/{rest}") } else { reference.to_string() };
            ("registry-1.docker.io".to_string(), path)
        };
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match path[name_start..].rfind(':') {
        Some(i) => (path[..name_start + i].to_string(), path[name_start + i + 1..].to_string()),
        None => (path.clone(), "latest".to_string()),
    };
    if repository.is_empty() || tag.is_empty() || repository.contains(char::is_whitespace) {
        return Err(bad());
    }
    let registry = if registry == "docker.io" || registry == "index.docker.io" {
        "registry-1.docker.io".into()
    } else {
        registry
    };
    Ok(ImageName { registry, repository, tag })
}

/// An index lists at most this many platforms' manifests that are read for their size.
const MAX_PLATFORMS: usize = 32;

/// A tag pinned by the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The manifest digest, `sha256:...`.
    pub digest: String,
    /// What pulling the image downloads ([`fleet_spec::model::ImageSize`]), when asked
    /// for and listed.
    pub bytes: Option<u64>,
}

/// The config and layer sizes an image manifest lists, added up.
fn image_bytes(manifest: &[u8]) -> Option<u64> {
    let json: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    let size = |v: &serde_json::Value| v.get("size").and_then(|s| s.as_u64());
    let mut total = size(json.get("config")?)?;
    for layer in json.get("layers")?.as_array()? {
        total = total.checked_add(size(layer)?)?;
    }
    Some(total)
}

/// A Registry API v2 client.
pub struct Registry {
    agent: ureq::Agent,
    insecure: Vec<String>,
}

impl Registry {
    pub fn new(timeout: Duration, insecure: Vec<String>) -> Self {
        let config =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        Registry { agent: ureq::Agent::new_with_config(config), insecure }
    }

    fn scheme(&self, registry: &str) -> &'static str {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
        if loopback || self.insecure.iter().any(|i| i == registry || i == host) {
            "http"
        } else {
            "https"
        }
    }

    /// Resolves `reference` (a tag) to its manifest digest `sha256:...` and, with
    /// `sizes`, what pulling it downloads (a `GET` of the manifest, and of each
    /// platform's manifest for an index; without, one `HEAD`, which Docker Hub does not
    /// count against its pull rate limit).
    pub fn resolve(&self, reference: &str, sizes: bool) -> Result<Resolved, RegistryError> {
        let name = parse_reference(reference)?;
        let mut token = None;
        let (digest, body) = self.manifest(&name, &name.tag, !sizes, &mut token)?;
        let bytes = match body {
            Some(body) => self.download_size(&name, &body, &mut token)?,
            None => None,
        };
        Ok(Resolved { digest, bytes })
    }

    /// The digest of manifest `reference` (a tag or a digest) and, unless `head_only`
    /// (or when the registry leaves `Docker-Content-Digest` out), its body. A bearer
    /// token, fetched at the first 401, is kept in `token` for the next requests.
    fn manifest(
        &self,
        name: &ImageName,
        reference: &str,
        head_only: bool,
        token: &mut Option<String>,
    ) -> Result<(String, Option<Vec<u8>>), RegistryError> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{reference}",
            self.scheme(&name.registry),
            name.registry,
            name.repository
        );
        let http = |e: ureq::Error| RegistryError::Http { url: url.clone(), message: e.to_string() };
        for attempt in 0..2 {
            let mut req = if head_only { self.agent.head(&url) } else { self.agent.get(&url) };
            req = req.header("Accept", ACCEPT);
            if let Some(t) = token.as_deref() {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = req.call().map_err(http)?;
            let status = resp.status().as_u16();
            if status == 401 && attempt == 0 {
                let challenge =
                    resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
                *token = Some(self.token(challenge, name, &url)?);
                continue;
            }
            if status != 200 {
                let hint = match status {
                    401 | 403 => " (the registry refused anonymous access to this image)",
                    404 => " (no such image or tag)",
                    _ => "",
                };
                return Err(RegistryError::Status { url, status, hint });
            }
            let header = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .filter(|d| d.starts_with("sha256:"))
                .map(str::to_string);
            if head_only {
                if let Some(d) = header {
                    return Ok((d, None));
                }
                // No digest header: hash the manifest itself.
                return self.manifest(name, reference, false, token);
            }
            let body = resp.body_mut().with_config().limit(4 << 20).read_to_vec().map_err(http)?;
            let digest = header.unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(&body))));
            return Ok((digest, Some(body)));
        }
        Err(RegistryError::Status { url, status: 401, hint: " (the registry refused the token)" })
    }

    /// What pulling the manifest `body` downloads: its config and layers, or for an
    /// index the largest of its platforms' (attestation manifests aside). `None` when
    /// the manifest lists no sizes the bundler can read.
    fn download_size(
        &self,
        name: &ImageName,
        body: &[u8],
        token: &mut Option<String>,
    ) -> Result<Option<u64>, RegistryError> {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else { return Ok(None) };
        if let Some(children) = json.get("manifests").and_then(|m| m.as_array()) {
            let mut largest = None;
            for child in children.iter().take(MAX_PLATFORMS) {
                let attestation = child.pointer("/platform/os").and_then(|o| o.as_str()) == Some("unknown");
                let Some(digest) = child.get("digest").and_then(|d| d.as_str()) else { continue };
                if attestation || !digest.starts_with("sha256:") {
                    continue;
                }
                let (_, child_body) = self.manifest(name, digest, false, token)?;
                let size = child_body.and_then(|b| image_bytes(&b));
                largest = largest.max(size);
            }
            return Ok(largest);
        }
        Ok(image_bytes(body))
    }

    /// Fetches an anonymous pull token for a `Bearer` challenge.
    fn token(&self, challenge: &str, name: &ImageName, url: &str) -> Result<String, RegistryError> {
        let fail = |message: String| RegistryError::Http { url: url.into(), message };
        let params = challenge
            .strip_prefix("Bearer ")
            .ok_or_else(|| fail(format!("unsupported authentication challenge {challenge:?}")))?;
        let mut realm = None;
        let mut service = None;
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                let v = v.trim_matches('"').to_string();
                match k {
                    "realm" => realm = Some(v),
                    "service" => service = Some(v),
                    _ => {}
                }
            }
        }
        let realm = realm.ok_or_else(|| fail("authentication challenge without realm".into()))?;
        let mut token_url = format!("{realm}?scope=repository:{}:pull", name.repository);
        if let Some(s) = service {
            token_url.push_str(&format!("&service={s}"));
        }
        let mut resp = self.agent.get(&token_url).call().map_err(|e| fail(e.to_string()))?;
        if resp.status().as_u16() != 200 {
            return Err(fail(format!("token endpoint answered HTTP {}", resp.status().as_u16())));
        }
        let body =
            resp.body_mut().with_config().limit(1 << 20).read_to_vec().map_err(|e| fail(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| fail(format!("token response: {e}")))?;
        json.get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| fail("token response has no token".into()))
    }
}

/// The image references (without digest) that are not pinned in any state.
pub fn unpinned<'a>(states: impl IntoIterator<Item = &'a DesiredState>) -> BTreeSet<String> {
    states
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .filter(|c| c.image.digest.is_none())
        .map(|c| c.image.reference.clone())
        .collect()
}

/// Resolves each image reference (with its download size when `sizes`); returns the
/// pins and the failures.
pub fn resolve_all(
    registry: &Registry,
    images: &BTreeSet<String>,
    sizes: bool,
) -> (BTreeMap<String, Resolved>, BTreeMap<String, RegistryError>) {
    let mut pins = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for reference in images {
        match registry.resolve(reference, sizes) {
            Ok(r) => {
                pins.insert(reference.clone(), r);
            }
            Err(e) => {
                errors.insert(reference.clone(), e);
            }
        }
    }
    (pins, errors)
}

/// Pins every tag-only image of `state` that `pins` knows, and records the download
/// sizes the registry listed for them.
pub fn pin(state: &mut DesiredState, pins: &BTreeMap<String, Resolved>) {
    for c in &mut state.containers {
        if c.image.digest.is_none() {
            if let Some(r) = pins.get(&c.image.reference) {
                c.image.digest = Some(r.digest.clone());
                if let Some(bytes) = r.bytes {
                    state.image_sizes.push(ImageSize { digest: r.digest.clone(), bytes });
                }
            }
        }
    }
    state.image_sizes.sort();
    state.image_sizes.dedup_by(|a, b| a.digest == b.digest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_like_docker() {
        let n = parse_reference("nginx").expect("valid");
        assert_eq!(
            (n.registry.as_str(), n.repository.as_str(), n.tag.as_str()),
            ("registry-1.docker.io", "library/nginx", "latest")
        );
        let n = parse_reference("grafana/grafana:10.1").expect("valid");
        assert_eq!((n.repository.as_str(), n.tag.as_str()), ("grafana/grafana", "10.1"));
        let n = parse_reference("127.0.0.1:5000/team/app:1.2").expect("valid");
        assert_eq!(
            (n.registry.as_str(), n.repository.as_str(), n.tag.as_str()),
            ("127.0.0.1:5000", "team/app", "1.2")
        );
        let n = parse_reference("localhost/app").expect("valid");
        assert_eq!((n.registry.as_str(), n.tag.as_str()), ("localhost", "latest"));
    }

    #[test]
    fn manifest_sizes_are_added_up_and_hostile_manifests_give_none() {
        let ok = br#"{"config": {"size": 100}, "layers": [{"size": 1000}, {"size": 24}]}"#;
        assert_eq!(image_bytes(ok), Some(1124));
        assert_eq!(image_bytes(br#"{"config": {"size": 7}, "layers": []}"#), Some(7));
        let max = u64::MAX;
        let overflow = format!(r#"{{"config": {{"size": {max}}}, "layers": [{{"size": 1}}]}}"#);
        for hostile in [
            &b"not json"[..],
            br#"{}"#,
            br#"{"config": {"size": 1}}"#,
            br#"{"config": {}, "layers": []}"#,
            br#"{"config": {"size": -5}, "layers": []}"#,
            br#"{"config": {"size": "12"}, "layers": []}"#,
            br#"{"config": {"size": 1.5}, "layers": []}"#,
            br#"{"config": {"size": 1}, "layers": [{"size": 1}, {}]}"#,
            br#"{"config": {"size": 1}, "layers": {"size": 1}}"#,
            overflow.as_bytes(),
        ] {
            assert_eq!(image_bytes(hostile), None, "{}", String::from_utf8_lossy(hostile));
        }
    }
}
