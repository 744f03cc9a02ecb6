//! The container engines under test and what scenarios put on them: a [`TestEngine`]
//! (a private `dockerd` or podman service), busybox [`Images`] in a private registry,
//! and the `web` app.
//!
//! Images are `FROM scratch` busybox images built on the engine under test and pushed to
//! a private registry, so that `build --resolve-digests` pins them by digest and bundles
//! name `127.0.0.1:PORT/bb@sha256:...`.

use anyhow::{bail, Context, Result};
use fleet_e2e::{build_busybox_image, push_image, Dockerd, Engine, FleetRepo, Podman, Registry};
use serde_json::Value;

/// The engine a scenario runs on.
pub enum TestEngine {
    Dockerd(Dockerd),
    Podman(Podman),
}

impl Engine for TestEngine {
    fn socket_path(&self) -> &std::path::Path {
        match self {
            TestEngine::Dockerd(d) => Engine::socket_path(d),
            TestEngine::Podman(p) => Engine::socket_path(p),
        }
    }

    fn work_dir(&self) -> &std::path::Path {
        match self {
            TestEngine::Dockerd(d) => Engine::work_dir(d),
            TestEngine::Podman(p) => Engine::work_dir(p),
        }
    }
}

impl TestEngine {
    pub fn name(&self) -> &'static str {
        match self {
            TestEngine::Dockerd(_) => "dockerd",
            TestEngine::Podman(_) => "podman",
        }
    }

    /// `GET /containers/{name}/json`, `None` when there is no such container.
    pub fn inspect(&self, name: &str) -> Result<Option<Value>> {
        let (status, body) = self.get(&format!("/v1.41/containers/{name}/json"))?;
        match status {
            200 => Ok(Some(serde_json::from_str(&body)?)),
            404 => Ok(None),
            _ => bail!("inspecting {name} on {}: HTTP {status}: {body}", self.name()),
        }
    }

    /// The container `name`, which must exist.
    pub fn container(&self, name: &str) -> Result<Container> {
        let v = self
            .inspect(name)?
            .with_context(|| format!("container {name} does not exist on {}", self.name()))?;
        Ok(Container(v))
    }

    /// Names of the user-defined networks.
    pub fn networks(&self) -> Result<Vec<String>> {
        let list = self.get_json("/v1.41/networks")?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["Name"].as_str().map(str::to_string))
            .filter(|n| !["bridge", "host", "none", "podman"].contains(&n.as_str()))
            .collect())
    }

    /// Removes every container and user-defined network (between scenarios on one
    /// engine).
    pub fn clear(&self) -> Result<()> {
        for c in self.containers()? {
            if let Some(id) = c["Id"].as_str() {
                self.delete(&format!("/v1.41/containers/{id}?force=1&v=1"))?;
            }
        }
        for n in self.networks()? {
            self.delete(&format!("/v1.41/networks/{n}"))?;
        }
        Ok(())
    }
}

/// An inspected container.
pub struct Container(pub Value);

impl Container {
    pub fn id(&self) -> &str {
        self.0["Id"].as_str().unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.0["State"]["Running"] == true
    }

    pub fn image(&self) -> &str {
        self.0["Config"]["Image"].as_str().unwrap_or_default()
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.0["Config"]["Labels"][key].as_str()
    }
}

/// Two busybox images in a private registry: `v1` and `v2` differ in content.
pub struct Images {
    registry: Registry,
    digest1: String,
    digest2: String,
}

impl Images {
    pub fn push(engine: &TestEngine) -> Result<Images> {
        let registry = Registry::start()?;
        let mut digests = Vec::new();
        for tag in ["1", "2"] {
            let reference = registry.image(&format!("bb:{tag}"));
            build_busybox_image(engine, &reference, &["sleep", "3600"])?;
            digests.push(push_image(engine, &reference)?);
        }
        let digest2 = digests.pop().expect("two images");
        let digest1 = digests.pop().expect("two images");
        Ok(Images { registry, digest1, digest2 })
    }

    /// The reference a Compose file names (`127.0.0.1:PORT/bb:TAG`).
    pub fn tag(&self, tag: u8) -> String {
        self.registry.image(&format!("bb:{tag}"))
    }

    /// The pinned reference the bundle (and so the container) uses.
    pub fn pinned(&self, tag: u8) -> String {
        let digest = if tag == 1 { &self.digest1 } else { &self.digest2 };
        format!("{}/bb@{digest}", self.registry.addr())
    }
}

/// Whether the `web` service's healthcheck passes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Good,
    /// Its healthcheck always fails.
    Broken,
}

/// App `web`: an httpd container (`web-web`) that mounts the managed file
/// `files/app.conf` at `/etc/app.conf` and checks it is there.
pub fn web_app(fleet: &FleetRepo, image: &str, conf: &str, health: Health) -> Result<()> {
    fleet.write("apps/web/app.yaml", "files:\n  - source: files/app.conf\n")?;
    fleet.write("apps/web/files/app.conf", conf)?;
    let (test, retries) = match health {
        Health::Good => (r#"["CMD", "cat", "/etc/app.conf"]"#, 2),
        Health::Broken => (r#"["CMD", "false"]"#, 1),
    };
    fleet.write(
        "apps/web/compose.yaml",
        format!(
            "services:
  web:
    image: {image}
    command: [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]
    volumes:
      - ./files/app.conf:/etc/app.conf:ro
    restart: unless-stopped
    healthcheck:
      test: {test}
      interval: 1s
      timeout: 1s
      retries: {retries}
"
        ),
    )
}
