//! Pins image tags to digests through the Docker Registry HTTP API v2.
//!
//! `HEAD /v2/<name>/manifests/<tag>` with the manifest media types in `Accept`, reading
//! `Docker-Content-Digest` (a `GET` and a sha256 of the body when a registry leaves the
//! header out). Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=...`) are
//! fetched as Docker Hub and most registries require. Loopback registries and those
//! named with `--insecure-registry` are spoken to over plain HTTP, all others over
//! HTTPS.
//!
//! [`pin_states`] is the only entry point the build uses: it resolves every distinct
//! image reference once, then patches the states.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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

    /// Resolves `reference` (a tag) to its manifest digest `sha256:...`.
    pub fn resolve(&self, reference: &str) -> Result<String, RegistryError> {
        let name = parse_reference(reference)?;
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme(&name.registry),
            name.registry,
            name.repository,
            name.tag
        );
        let http = |e: ureq::Error| RegistryError::Http { url: url.clone(), message: e.to_string() };
        let mut token: Option<String> = None;
        for attempt in 0..2 {
            let mut req = self.agent.head(&url).header("Accept", ACCEPT);
            if let Some(t) = &token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let resp = req.call().map_err(http)?;
            let status = resp.status().as_u16();
            if status == 401 && attempt == 0 {
                let challenge =
                    resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
                token = Some(self.token(challenge, &name, &url)?);
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
            if let Some(d) = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) {
                if d.starts_with("sha256:") {
                    return Ok(d.to_string());
                }
            }
            // No digest header: hash the manifest itself.
            let mut req = self.agent.get(&url).header("Accept", ACCEPT);
            if let Some(t) = &token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            let mut resp = req.call().map_err(http)?;
            let body = resp.body_mut().with_config().limit(4 << 20).read_to_vec().map_err(http)?;
            return Ok(format!("sha256:{}", hex::encode(Sha256::digest(&body))));
        }
        Err(RegistryError::Status { url, status: 401, hint: " (the registry refused the token)" })
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

/// Resolves each image reference; returns the digests and the failures.
pub fn resolve_all(
    registry: &Registry,
    images: &BTreeSet<String>,
) -> (BTreeMap<String, String>, BTreeMap<String, RegistryError>) {
    let mut digests = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for reference in images {
        match registry.resolve(reference) {
            Ok(d) => {
                digests.insert(reference.clone(), d);
            }
            Err(e) => {
                errors.insert(reference.clone(), e);
            }
        }
    }
    (digests, errors)
}

/// Pins every tag-only image of `state` that `digests` knows.
pub fn pin(state: &mut DesiredState, digests: &BTreeMap<String, String>) {
    for c in &mut state.containers {
        if c.image.digest.is_none() {
            if let Some(d) = digests.get(&c.image.reference) {
                c.image.digest = Some(d.clone());
            }
        }
    }
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
}
