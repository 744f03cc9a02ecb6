//! The fleet as its operator and its devices see it, for the end-to-end scenarios.
//!
//! - [`FleetRepo`]: the operator's side. A Git fleet repository in a temp dir, a signing
//!   key made with `fleet-bundler keygen`, the build output directory served over HTTP
//!   by a [`StaticHttpServer`] (the "CDN"), and the `fleet-bundler` commands CI runs
//!   (`build`, `publish`, `status`), each run as the real binary.
//! - [`Device`]: one device. Its own `agent.toml`, state dir and log in a temp dir, and a
//!   `fleet-agent run` child process (stopped by PID on drop). With
//!   [`DeviceBuilder::private_root`] the agent runs in its own mount namespace where the
//!   fleet's file root is a private directory, so many devices on one machine each have
//!   their own files.
//! - [`DeviceWatch`]: everything one device publishes on MQTT (status, events, online),
//!   collected from before the agent starts, with waits on conditions.
//!
//! Status JSON helpers ([`state`], [`applied_commit`], [`last_error_code`], ...) read the
//! fields of `fleet-spec/MESSAGES.md`.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use fleet_spec::messages::Announcement;
use fleet_spec::SigningKey;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::mqtt::{Mqtt, Subscription};
use crate::process::signal;
use crate::{log_tail, wait_until, workspace_bin, GitRepo, StaticHttpOptions, StaticHttpServer};

/// Current unix time in seconds.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of the file at `path`, `None` when it does not exist (or is unreadable).
/// Read in 1 MiB steps, so a file of hundreds of MB costs no more memory than a small one.
pub fn file_sha256(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = fs::File::open(path).ok()?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Some(hex::encode(sha.finalize())),
            Ok(n) => sha.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// What a command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub command: String,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails (with the whole output) unless the command exited 0.
    pub fn check(self) -> Result<CmdOutput> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!("{self}"))
        }
    }

    /// Stdout parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self}"))
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.code.map_or_else(|| "a signal".to_string(), |c| c.to_string());
        write!(
            f,
            "`{}` exited with {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion (stdin closed) and captures its output.
pub fn run_command(cmd: &mut Command) -> Result<CmdOutput> {
    let command = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {command}"))?;
    Ok(CmdOutput {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `fleet-bundler ARGS`, built from this workspace.
pub fn bundler(args: &[&str]) -> Result<CmdOutput> {
    let bin = workspace_bin("fleet-bundler")?;
    run_command(
        Command::new(bin)
            .args(args)
            .env_remove("FLEET_SIGNING_KEY")
            .env_remove("FLEET_BROKER")
            .env_remove("FLEET_DASHBOARD_BROKER"),
    )
}

/// One device's bundle as `index.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub version: u64,
    pub digest: String,
    pub size: u64,
    pub commit: String,
}

/// The operator's side of a fleet. See the module docs.
pub struct FleetRepo {
    pub name: String,
    repo: GitRepo,
    root: PathBuf,
    out: PathBuf,
    keys: PathBuf,
    file_root: PathBuf,
    server: StaticHttpServer,
    last_commit_time: i64,
    /// The CI's age identity file every build is given (`--age-identity`), if set.
    age_identity: Option<PathBuf>,
    tmp: Option<TempDir>,
}

impl FleetRepo {
    /// A fleet repository with `fleet.yaml` (name, a file root in the temp dir, 30 days
    /// bundle expiry) and a fresh signing key, its build output served over HTTP.
    pub fn new(name: &str) -> Result<FleetRepo> {
        Self::with_server(name, StaticHttpOptions::default())
    }

    /// Like [`FleetRepo::new`], with options for the bundle server (dropped transfers).
    pub fn with_server(name: &str, opts: StaticHttpOptions) -> Result<FleetRepo> {
        let tmp = crate::short_tempdir("f")?;
        let root = tmp.path().to_path_buf();
        let repo = GitRepo::init(root.join("repo"))?;
        let (out, keys, file_root) = (root.join("out"), root.join("keys"), root.join("root"));
        for dir in [&out, &file_root] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        bundler(&["keygen", "--out", &keys.to_string_lossy()])?.check()?;
        let server = StaticHttpServer::start_with(&out, opts)?;
        let fleet = FleetRepo {
            name: name.to_string(),
            repo,
            root,
            out,
            keys,
            file_root,
            server,
            last_commit_time: 0,
            age_identity: None,
            tmp: Some(tmp),
        };
        fleet.write(
            "fleet.yaml",
            format!("name: {name}\nbundle_expiry: 30d\nfile_root: {}\n", fleet.file_root.display()),
        )?;
        Ok(fleet)
    }

    /// The fleet's `file_root` on devices (a directory in the temp dir, so that a
    /// container engine on this machine can bind-mount the files the agent writes).
    pub fn file_root(&self) -> &Path {
        &self.file_root
    }

    /// Where app `app`'s file `source` lands on a device by default.
    pub fn app_file(&self, app: &str, source: &str) -> String {
        format!("{}/{app}/{source}", self.file_root.display())
    }

    /// A scratch directory of this fleet's temp dir (created), e.g. for paths outside
    /// the allowed roots.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Writes a repository file (relative path), creating directories.
    pub fn write(&self, path: &str, content: impl AsRef<[u8]>) -> Result<()> {
        self.repo.write(path, content)
    }

    /// The repository's work tree (what `fleet-bundler enroll accept --repo` writes into).
    pub fn repo_dir(&self) -> &Path {
        self.repo.path()
    }

    /// Reads a repository file of the work tree (relative path).
    pub fn read(&self, path: &str) -> Result<String> {
        let full = self.repo.path().join(path);
        fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
    }

    /// Deletes a repository file or directory.
    pub fn remove(&self, path: &str) -> Result<()> {
        self.repo.remove(path)
    }

    /// Writes `devices/<id>.yaml` with these labels (and no variables).
    pub fn add_device(&self, id: &str, labels: &[(&str, &str)]) -> Result<()> {
        let mut text = String::from("labels:\n");
        for (k, v) in labels {
            text.push_str(&format!("  {k}: \"{v}\"\n"));
        }
        if labels.is_empty() {
            text = String::new();
        }
        self.write(&format!("devices/{id}.yaml"), text)
    }

    /// Commits everything with the current time as committer date (strictly growing, so
    /// bundle versions grow and bundles are fresh); returns the commit id.
    pub fn commit(&mut self, message: &str) -> Result<String> {
        let time = now_unix().max(self.last_commit_time + 1);
        self.last_commit_time = time;
        self.repo.set_date(&format!("{time} +0000"));
        self.repo.commit(message)
    }

    /// `fleet-bundler build --repo R --rev HEAD --key K --out O --resolve-digests [extra]`.
    pub fn build_output(&self, extra: &[&str]) -> Result<CmdOutput> {
        self.build_into(&self.out, extra)
    }

    fn build_into(&self, out: &Path, extra: &[&str]) -> Result<CmdOutput> {
        let (repo, key, out) =
            (self.repo.path().to_string_lossy(), self.signing_key_path(), out.to_string_lossy());
        let mut args =
            vec!["build", "--repo", &repo, "--rev", "HEAD", "--out", &out, "--resolve-digests", "--json"];
        let key = key.to_string_lossy();
        args.extend(["--key", &key]);
        let age = self.age_identity.as_ref().map(|p| p.to_string_lossy().into_owned());
        if let Some(age) = &age {
            args.extend(["--age-identity", age]);
        }
        args.extend(extra);
        bundler(&args)
    }

    /// Makes a CI age identity (with the real `age-keygen`) that every later build
    /// decrypts the repository's secrets with; returns its recipient (`age1…`).
    pub fn use_new_age_identity(&mut self) -> Result<String> {
        let path = self.root.join("ci-age-identity.txt");
        run_command(Command::new("age-keygen").arg("-o").arg(&path))?.check()?;
        let out = run_command(Command::new("age-keygen").arg("-y").arg(&path))?.check()?;
        self.age_identity = Some(path);
        Ok(out.stdout.trim().to_string())
    }

    /// Encrypts `plain` to `recipient` with the real `age` into the repository at `rel`.
    pub fn write_age(&self, rel: &str, plain: &str, recipient: &str) -> Result<()> {
        let src = self.root.join("age-plain.tmp");
        fs::write(&src, plain)?;
        let dest = self.repo.path().join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        run_command(Command::new("age").arg("-r").arg(recipient).arg("-o").arg(&dest).arg(&src))?.check()?;
        fs::remove_file(&src)?;
        Ok(())
    }

    /// Builds HEAD; fails unless the build succeeds. Returns the `--json` summary.
    pub fn build(&self) -> Result<Value> {
        self.build_output(&[])?.check()?.json()
    }

    /// Builds HEAD into a copy of the build output (the staging directory), as a CI job
    /// that uploads to the bundle server in a later step: the served output, so what
    /// devices poll, is untouched until [`FleetRepo::upload_staged`]. Versions follow
    /// the served output's history. Returns the `--json` summary.
    pub fn build_staged(&self) -> Result<Value> {
        let staging = self.staging_dir();
        if staging.exists() {
            fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
        }
        copy_dir(&self.out, &staging)?;
        self.build_into(&staging, &[])?.check()?.json()
    }

    /// `device`'s entry in the staged build's `index.json`.
    pub fn staged_entry(&self, device: &str) -> Result<IndexEntry> {
        index_entry(&self.staging_dir().join("index.json"), device)
    }

    /// Uploads the staged build to the bundle server: its bundles first, then its pointer
    /// files and `index.json`, each written beside its place and renamed into it (so a
    /// device never reads half a file). Files the staged build deleted stay.
    pub fn upload_staged(&self) -> Result<()> {
        let staging = self.staging_dir();
        for dir in ["bundles", "devices"] {
            let from = staging.join(dir);
            let to = self.out.join(dir);
            fs::create_dir_all(&to)?;
            for entry in fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
                let entry = entry?;
                let target = to.join(entry.file_name());
                if fs::read(entry.path()).ok() != fs::read(&target).ok() {
                    replace_file(&entry.path(), &target)?;
                }
            }
        }
        replace_file(&staging.join("index.json"), &self.out.join("index.json"))
    }

    /// Path of bundle `digest` in the staged build.
    pub fn staged_bundle_path(&self, digest: &str) -> PathBuf {
        self.staging_dir().join("bundles").join(format!("{digest}.bundle"))
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// `fleet-bundler publish --out O --broker URL --base-url <bundle server> [extra]`.
    pub fn publish_output(&self, broker: &str, extra: &[&str]) -> Result<CmdOutput> {
        let (out, base) = (self.out.to_string_lossy(), self.base_url());
        let mut args = vec![
            "publish",
            "--out",
            &out,
            "--broker",
            broker,
            "--base-url",
            &base,
            "--json",
            "--timeout",
            "5s",
        ];
        args.extend(extra);
        bundler(&args)
    }

    /// Publishes what changed since the last publish; returns the `--json` summary.
    pub fn publish(&self, broker: &str) -> Result<Value> {
        self.publish_output(broker, &[])?.check()?.json()
    }

    /// `fleet-bundler status --broker URL --index O/index.json [extra]`.
    pub fn status(&self, broker: &str, extra: &[&str]) -> Result<CmdOutput> {
        let index = self.out.join("index.json");
        let index = index.to_string_lossy();
        let mut args = vec!["status", "--broker", broker, "--index", &index];
        args.extend(extra);
        bundler(&args)
    }

    /// `status --wait --timeout T` (exit 0 converged, 3 failed, 4 timeout).
    pub fn status_wait(&self, broker: &str, timeout: Duration) -> Result<CmdOutput> {
        let t = format!("{}s", timeout.as_secs().max(1));
        self.status(broker, &["--wait", "--timeout", &t])
    }

    /// The build output's `index.json`.
    pub fn index(&self) -> Result<Value> {
        let path = self.out.join("index.json");
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
    }

    /// `device`'s entry in `index.json`.
    pub fn entry(&self, device: &str) -> Result<IndexEntry> {
        index_entry(&self.out.join("index.json"), device)
    }

    /// The build output directory (`index.json`, `bundles/`, `devices/<id>.json`), which
    /// the bundle server serves.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Path of bundle `digest` in the build output.
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.out.join("bundles").join(format!("{digest}.bundle"))
    }

    /// The bytes of `device`'s current bundle.
    pub fn bundle_of(&self, device: &str) -> Result<Vec<u8>> {
        let entry = self.entry(device)?;
        let path = self.bundle_path(&entry.digest);
        fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.keys.join("signing.key")
    }

    /// The fleet's signing key (CI's secret), for crafting validly signed bundles.
    pub fn signing_key(&self) -> Result<SigningKey> {
        Ok(fleet_spec::keys::file::load_signing(&self.signing_key_path())?)
    }

    /// The public key line devices trust.
    pub fn public_key_line(&self) -> Result<String> {
        let path = self.keys.join("signing.pub");
        Ok(fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// The bundle server's base URL (`http://127.0.0.1:PORT`, no trailing slash).
    pub fn base_url(&self) -> String {
        self.server.url("").trim_end_matches('/').to_string()
    }

    pub fn server(&self) -> &StaticHttpServer {
        &self.server
    }

    /// Serves `bytes` at `<base_url>/extra/<name>` (files an attacker controls, say);
    /// returns the URL.
    pub fn serve_extra(&self, name: &str, bytes: &[u8]) -> Result<String> {
        let dir = self.out.join("extra");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        Ok(self.server.url(&format!("extra/{name}")))
    }

    /// `fleet/<fleet>/devices/<device>/<kind>`.
    pub fn topic(&self, device: &str, kind: &str) -> String {
        format!("fleet/{}/devices/{device}/{kind}", self.name)
    }

    /// Retains `ann` on its device's `desired` topic, as a publisher would.
    pub fn announce(&self, mqtt: &Mqtt, ann: &Announcement) -> Result<()> {
        mqtt.publish(&self.topic(&ann.device, "desired"), ann.to_json(), true)
    }
}

/// `device`'s entry in the `index.json` at `path`.
fn index_entry(path: &Path, device: &str) -> Result<IndexEntry> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let index: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?;
    let e = index
        .pointer(&format!("/devices/{device}"))
        .with_context(|| format!("{device} is not in {}", path.display()))?;
    Ok(IndexEntry {
        version: e["version"].as_u64().context("version")?,
        digest: e["digest"].as_str().context("digest")?.to_string(),
        size: e["size"].as_u64().context("size")?,
        commit: e["commit"].as_str().context("commit")?.to_string(),
    })
}

/// Copies the files of directory `from` into `to` (created), recursively.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {} to {}", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

/// Copies `from` beside `to`, then renames it over `to`.
fn replace_file(from: &Path, to: &Path) -> Result<()> {
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.upload"));
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))
}

impl Drop for FleetRepo {
    fn drop(&mut self) {
        keep_if_asked(&mut self.tmp);
    }
}

/// With `FLEET_E2E_KEEP=1`, keeps a temp dir instead of deleting it.
fn keep_if_asked(tmp: &mut Option<TempDir>) {
    if crate::keep_tempdirs() {
        if let Some(dir) = tmp.take() {
            eprintln!("fleet-e2e: keeping {} (FLEET_E2E_KEEP=1)", dir.keep().display());
        }
    }
}

/// Configures a [`Device`] before it starts. Defaults: trusts the fleet's key; the
/// fleet's file root is the one allowed root; polls the fleet's bundle server every
/// 5 s; no broker; no container engine; reconcile every 2 s; health timeout 8 s;
/// status at most every 100 ms.
#[derive(Debug, Clone)]
pub struct DeviceBuilder {
    id: String,
    fleet: String,
    file_root: PathBuf,
    public_keys: Vec<String>,
    allowed_roots: Vec<PathBuf>,
    broker: Option<String>,
    credentials: Option<(String, String)>,
    base_url: Option<String>,
    poll_interval_secs: u64,
    engine_socket: Option<PathBuf>,
    reconcile_interval_secs: u64,
    health_timeout_secs: u64,
    private_root: bool,
    agent: Option<AgentCommand>,
    /// `(table, key, TOML value)` set last, over the builder's own keys.
    settings: Vec<(String, String, String)>,
    /// Started as `fleet-agent launch` (the self-update supervisor) instead of `run`.
    launcher: bool,
}

/// Which agent binary runs, and through what (e.g. qemu for a cross-built agent).
#[derive(Debug, Clone)]
pub struct AgentCommand {
    pub binary: PathBuf,
    /// A program that runs the binary, e.g. `qemu-aarch64-static`.
    pub runner: Option<PathBuf>,
}

impl AgentCommand {
    fn command(&self) -> Command {
        match &self.runner {
            Some(runner) => {
                let mut cmd = Command::new(runner);
                cmd.arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        }
    }
}

impl DeviceBuilder {
    /// Starts the agent as `fleet-agent launch` (the self-update supervisor, which runs
    /// `fleet-agent run` as its child) instead of `fleet-agent run`.
    pub fn launcher(mut self) -> Self {
        self.launcher = true;
        self
    }

    /// Runs this agent binary (through `runner` when given) instead of the workspace's.
    pub fn agent(mut self, agent: AgentCommand) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The MQTT broker URL (`mqtt://127.0.0.1:PORT`).
    pub fn broker(mut self, url: &str) -> Self {
        self.broker = Some(url.to_string());
        self
    }

    /// MQTT username and password (the client id stays the device id).
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// No `fetch.base_url`: bundles come only from announcements (or sideloading).
    pub fn no_polling(mut self) -> Self {
        self.base_url = None;
        self
    }

    /// The container engine's API socket (default: none, a files-only device).
    pub fn engine(mut self, socket: &Path) -> Self {
        self.engine_socket = Some(socket.to_path_buf());
        self
    }

    pub fn reconcile_interval_secs(mut self, secs: u64) -> Self {
        self.reconcile_interval_secs = secs;
        self
    }

    pub fn health_timeout_secs(mut self, secs: u64) -> Self {
        self.health_timeout_secs = secs;
        self
    }

    /// Replaces the trusted public key lines.
    pub fn trust(mut self, keys: Vec<String>) -> Self {
        self.public_keys = keys;
        self
    }

    /// Runs the agent in its own mount namespace, where the fleet's file root is this
    /// device's private directory (for several files-only devices on one machine).
    pub fn private_root(mut self) -> Self {
        self.private_root = true;
        self
    }

    /// Sets `key = value` in table `table` of `agent.toml` (`""` for the top level),
    /// replacing the builder's own value of that key, e.g.
    /// `.setting("fetch", "timeout_secs", "2")`. `value` is a TOML literal (strings
    /// quoted); the table is added when the builder writes none.
    pub fn setting(mut self, table: &str, key: &str, value: &str) -> Self {
        self.settings.push((table.to_string(), key.to_string(), value.to_string()));
        self
    }

    /// Writes `agent.toml` and the directories; the agent is not started.
    pub fn create(self) -> Result<Device> {
        let tmp = crate::short_tempdir("a")?;
        let root = tmp.path().to_path_buf();
        let state_dir = root.join("state");
        let private_root = if self.private_root {
            let host = root.join("files");
            fs::create_dir_all(&host)?;
            Some((self.file_root.clone(), host))
        } else {
            None
        };
        let mut toml = String::new();
        let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
        toml.push_str(&format!("device = {}\nfleet = {}\n", q(&self.id), q(&self.fleet)));
        toml.push_str(&format!("state_dir = {}\n", q(&state_dir.to_string_lossy())));
        let roots: Vec<String> = self.allowed_roots.iter().map(|r| q(&r.to_string_lossy())).collect();
        toml.push_str(&format!("allowed_roots = [{}]\n", roots.join(", ")));
        toml.push_str(&format!(
            "reconcile_interval_secs = {}\nhealth_timeout_secs = {}\nstatus_min_interval_ms = 100\nlog_level = \"debug\"\n",
            self.reconcile_interval_secs, self.health_timeout_secs
        ));
        if let Some(url) = &self.broker {
            toml.push_str(&format!(
                "\n[mqtt]\nurl = {}\nkeepalive_secs = 5\nreconnect_max_secs = 2\n",
                q(url)
            ));
            if let Some((user, password)) = &self.credentials {
                toml.push_str(&format!("username = {}\npassword = {}\n", q(user), q(password)));
            }
        }
        let keys: Vec<String> = self.public_keys.iter().map(|k| q(k)).collect();
        toml.push_str(&format!("\n[trust]\npublic_keys = [{}]\n", keys.join(", ")));
        toml.push_str("\n[fetch]\ntimeout_secs = 10\n");
        if let Some(url) = &self.base_url {
            toml.push_str(&format!(
                "base_url = {}\npoll_interval_secs = {}\n",
                q(url),
                self.poll_interval_secs
            ));
        }
        let socket = self
            .engine_socket
            .as_ref()
            .map_or_else(|| "none".to_string(), |s| s.to_string_lossy().into_owned());
        toml.push_str(&format!("\n[engine]\nsocket = {}\nstop_grace_secs = 1\n", q(&socket)));
        for (table, key, value) in &self.settings {
            toml = set_toml_key(&toml, table, key, value);
        }
        let config = root.join("agent.toml");
        fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;
        Ok(Device {
            id: self.id,
            fleet: self.fleet,
            agent: self.agent,
            launcher: self.launcher,
            config,
            state_dir,
            log: root.join("agent.log"),
            private_root,
            child: None,
            tmp: Some(tmp),
        })
    }

    /// Creates the device and starts `fleet-agent run`.
    pub fn start(self) -> Result<Device> {
        let mut device = self.create()?;
        device.start()?;
        Ok(device)
    }
}

/// `toml` with `key = value` in `[table]` (`""`: the top level): the line of that key
/// replaced, or added at the end of the table, or the table appended. Only for the
/// flat, one key per line text [`DeviceBuilder::create`] writes.
fn set_toml_key(toml: &str, table: &str, key: &str, value: &str) -> String {
    let mut lines: Vec<String> = toml.lines().map(str::to_string).collect();
    let line = format!("{key} = {value}");
    let header = format!("[{table}]");
    let start = if table.is_empty() { Some(0) } else { lines.iter().position(|l| l.trim() == header) };
    let Some(start) = start else {
        lines.extend([String::new(), header, line]);
        return lines.join("\n") + "\n";
    };
    let body = if table.is_empty() { start } else { start + 1 };
    let end =
        lines[body..].iter().position(|l| l.trim_start().starts_with('[')).map_or(lines.len(), |i| body + i);
    let is_key = |l: &String| l.split_once('=').is_some_and(|(k, _)| k.trim() == key);
    match lines[body..end].iter().position(is_key) {
        Some(i) => lines[body + i] = line,
        None => {
            // At the end of the table, before the blank lines that separate it.
            let last =
                lines[body..end].iter().rposition(|l| !l.trim().is_empty()).map_or(body, |i| body + i + 1);
            lines.insert(last, line);
        }
    }
    lines.join("\n") + "\n"
}

/// One device: `agent.toml`, state dir, log, and the `fleet-agent run` process.
pub struct Device {
    pub id: String,
    fleet: String,
    agent: Option<AgentCommand>,
    /// `fleet-agent launch`, in a process group of its own (killed as a whole).
    launcher: bool,
    config: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    /// (the fleet's file root as the agent sees it, the directory it really is)
    private_root: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
    tmp: Option<TempDir>,
}

impl Device {
    /// A device of `fleet` with the defaults of [`DeviceBuilder`].
    pub fn builder(fleet: &FleetRepo, id: &str) -> Result<DeviceBuilder> {
        Ok(DeviceBuilder {
            id: id.to_string(),
            fleet: fleet.name.clone(),
            file_root: fleet.file_root().to_path_buf(),
            public_keys: vec![fleet.public_key_line()?],
            allowed_roots: vec![fleet.file_root().to_path_buf()],
            broker: None,
            credentials: None,
            base_url: Some(fleet.base_url()),
            poll_interval_secs: 5,
            engine_socket: None,
            reconcile_interval_secs: 2,
            health_timeout_secs: 8,
            private_root: false,
            agent: None,
            settings: Vec::new(),
            launcher: false,
        })
    }

    /// Starts `fleet-agent run --config agent.toml` (its output appended to the log).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("agent {} is already running", self.id);
        }
        let log = fs::File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = match &self.private_root {
            None => {
                let mut cmd = self.agent_command()?;
                cmd.arg(if self.launcher { "launch" } else { "run" }).arg("--config").arg(&self.config);
                if self.launcher {
                    use std::os::unix::process::CommandExt;
                    cmd.process_group(0);
                }
                cmd
            }
            Some((mount_point, host_dir)) => {
                let bin = workspace_bin("fleet-agent")?;
                // unshare and sh exec: the child's PID is the agent's.
                let mut cmd = Command::new(crate::require_program("unshare")?);
                cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                    .arg(r#"mount --bind "$0" "$1" && exec "$2" run --config "$3""#)
                    .arg(host_dir)
                    .arg(mount_point)
                    .arg(&bin)
                    .arg(&self.config);
                cmd
            }
        };
        cmd.env("FLEET_LOG", "debug").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("starting the agent of {}", self.id))?);
        Ok(())
    }

    fn agent_command(&self) -> Result<Command> {
        match &self.agent {
            Some(agent) => Ok(agent.command()),
            None => Ok(Command::new(workspace_bin("fleet-agent")?)),
        }
    }

    /// Whether the agent process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The agent's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9` the agent (a crash or power loss) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.launcher {
                // The launcher and the agent it runs: the whole process group, at once.
                if let Ok(pgid) = i32::try_from(child.id()) {
                    crate::process::signal_group(pgid, libc::SIGKILL);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a graceful stop, as systemd does), waiting up to 10 s, then SIGKILL.
    /// Returns the exit code when it exited by itself.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("fleet-e2e: agent {} ignored SIGTERM for 10 s: killing it", self.id);
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// `fleet-agent apply --config agent.toml BUNDLE` (the sideload path).
    pub fn apply(&self, bundle: &Path) -> Result<CmdOutput> {
        let bin = workspace_bin("fleet-agent")?;
        let mut cmd = match &self.private_root {
            None => Command::new(bin),
            Some(_) => bail!("apply is not supported for devices with a private root"),
        };
        run_command(cmd.arg("apply").arg("--config").arg(&self.config).arg(bundle).env("FLEET_LOG", "debug"))
    }

    /// [`Device::apply`], given at most `limit` to answer: a `fleet-agent apply` still
    /// waiting then is killed, and its output has no exit code (`code: None`) and says so.
    pub fn apply_within(&self, bundle: &Path, limit: Duration) -> Result<CmdOutput> {
        if self.private_root.is_some() {
            bail!("apply is not supported for devices with a private root");
        }
        let mut cmd = Command::new(workspace_bin("fleet-agent")?);
        cmd.arg("apply").arg("--config").arg(&self.config).arg(bundle).env("FLEET_LOG", "debug");
        let command = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {command}"))?;
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            thread::spawn(move || {
                let mut text = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut text);
                }
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for fleet-agent apply")? {
                break Some(status);
            }
            if start.elapsed() >= limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = stdout.join().unwrap_or_default();
        let mut stderr = stderr.join().unwrap_or_default();
        if status.is_none() {
            stderr.push_str(&format!("\n(fleet-e2e: no answer within {limit:?}; killed)"));
        }
        Ok(CmdOutput { command, code: status.and_then(|s| s.code()), stdout, stderr })
    }

    /// `fleet-agent ARGS --config agent.toml`, e.g. `enroll --json` or `identity --rotate`.
    pub fn cli(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = self.agent_command()?;
        run_command(cmd.args(args).arg("--config").arg(&self.config).env("FLEET_LOG", "debug"))
    }

    /// `fleet-agent status --config agent.toml --json`: the local view of the state dir.
    pub fn local_status(&self) -> Result<Value> {
        let bin = workspace_bin("fleet-agent")?;
        run_command(Command::new(bin).arg("status").arg("--config").arg(&self.config).arg("--json"))?
            .check()?
            .json()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Where a device path really is on this machine (differs with a private root).
    pub fn host_path(&self, device_path: &str) -> PathBuf {
        if let Some((mount_point, host_dir)) = &self.private_root {
            if let Ok(rest) = Path::new(device_path).strip_prefix(mount_point) {
                return host_dir.join(rest);
            }
        }
        PathBuf::from(device_path)
    }

    /// Content of a file on the device, `None` when it does not exist.
    pub fn read(&self, device_path: &str) -> Option<Vec<u8>> {
        fs::read(self.host_path(device_path)).ok()
    }

    /// Hex sha256 of a file on the device, `None` when it does not exist.
    pub fn sha256(&self, device_path: &str) -> Option<String> {
        file_sha256(&self.host_path(device_path))
    }

    /// `fleet/<fleet>/devices/<id>/<kind>`.
    pub fn topic(&self, kind: &str) -> String {
        format!("fleet/{}/devices/{}/{kind}", self.fleet, self.id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 60)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.child.is_some() {
            if std::thread::panicking() || crate::keep_tempdirs() {
                eprintln!("fleet-e2e: agent {} log:\n{}", self.id, self.log_tail());
            }
            self.stop();
        }
        keep_if_asked(&mut self.tmp);
    }
}

/// Everything a device publishes (`fleet/<fleet>/devices/<id>/#`), collected in the
/// background from the moment the watch is made.
pub struct DeviceWatch {
    sub: Subscription,
    base: String,
}

impl DeviceWatch {
    /// Subscribes (waiting for the SUBACK) as `mqtt` to the device's topics.
    pub fn new(mqtt: &Mqtt, fleet: &str, device: &str) -> Result<DeviceWatch> {
        let base = format!("fleet/{fleet}/devices/{device}/");
        let sub = mqtt.subscribe(&format!("{base}#"))?;
        Ok(DeviceWatch { sub, base })
    }

    /// The watch of `device` on `mqtt`.
    pub fn of(mqtt: &Mqtt, device: &Device) -> Result<DeviceWatch> {
        DeviceWatch::new(mqtt, &device.fleet, &device.id)
    }

    fn payloads(&self, kind: &str) -> Vec<Vec<u8>> {
        let topic = format!("{}{kind}", self.base);
        self.sub
            .messages()
            .into_iter()
            .filter(|m| m.topic == topic && !m.payload.is_empty())
            .map(|m| m.payload)
            .collect()
    }

    /// Every status report received, oldest first.
    pub fn statuses(&self) -> Vec<Value> {
        self.payloads("status").iter().filter_map(|p| serde_json::from_slice(p).ok()).collect()
    }

    /// The newest status report.
    pub fn latest_status(&self) -> Option<Value> {
        self.statuses().pop()
    }

    /// Every event received, oldest first.
    pub fn events(&self) -> Vec<Value> {
        self.payloads("events").iter().filter_map(|p| serde_json::from_slice(p).ok()).collect()
    }

    /// Events of kind `event` (`apply_started`, `bundle_rejected`, ...).
    pub fn events_of(&self, event: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["event"] == event).collect()
    }

    /// The newest `online` payload.
    pub fn online(&self) -> Option<String> {
        self.payloads("online").pop().map(|p| String::from_utf8_lossy(&p).into_owned())
    }

    /// Forgets what was received so far (only newer messages count afterwards).
    pub fn clear(&self) {
        self.sub.clear();
    }

    /// Waits until the newest status report satisfies `pred`; returns it.
    pub fn wait_status(
        &self,
        deadline: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_found(deadline, what, || self.latest_status().filter(|s| pred(s)))
    }

    /// Waits until some received event satisfies `pred`; returns it.
    pub fn wait_event(
        &self,
        deadline: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_found(deadline, what, || self.events().into_iter().find(|e| pred(e)))
    }

    /// Waits until `find` finds something; on a timeout the error shows what was received.
    fn wait_found(
        &self,
        deadline: Duration,
        what: &str,
        mut find: impl FnMut() -> Option<Value>,
    ) -> Result<Value> {
        let mut found = None;
        wait_until(deadline, what, || {
            found = find();
            Ok(found.is_some())
        })
        .map_err(|e| e.context(self.describe()))?;
        found.ok_or_else(|| anyhow!("unreachable"))
    }

    /// The newest status and all events, for failure messages.
    pub fn describe(&self) -> String {
        let events: Vec<String> = self.events().iter().map(Value::to_string).collect();
        format!(
            "newest status of {}: {}\nevents:\n  {}",
            self.base,
            self.latest_status().map_or_else(|| "none".to_string(), |s| s.to_string()),
            events.join("\n  ")
        )
    }
}

/// `state` of a status report.
pub fn state(status: &Value) -> &str {
    status["state"].as_str().unwrap_or("")
}

/// `applied.commit` of a status report.
pub fn applied_commit(status: &Value) -> Option<&str> {
    status.pointer("/applied/commit").and_then(Value::as_str)
}

/// `applied.version` of a status report.
pub fn applied_version(status: &Value) -> Option<u64> {
    status.pointer("/applied/version").and_then(Value::as_u64)
}

/// `last_error.code` of a status report.
pub fn last_error_code(status: &Value) -> Option<&str> {
    status.pointer("/last_error/code").and_then(Value::as_str)
}

/// Whether a status report says `converged` on `commit`.
pub fn converged_on(status: &Value, commit: &str) -> bool {
    state(status) == "converged" && applied_commit(status) == Some(commit)
}

#[cfg(test)]
mod tests {
    use super::set_toml_key;

    #[test]
    fn settings_replace_or_add_keys_in_their_table() {
        let toml = "device = \"gw\"\n\n[fetch]\ntimeout_secs = 10\nbase_url = \"http://b\"\n\n[engine]\nsocket = \"none\"\n";
        let replaced = set_toml_key(toml, "fetch", "timeout_secs", "2");
        assert_eq!(replaced, toml.replace("timeout_secs = 10", "timeout_secs = 2"));
        let added = set_toml_key(toml, "fetch", "deadline_secs", "10");
        assert_eq!(added, toml.replace("\"http://b\"\n", "\"http://b\"\ndeadline_secs = 10\n"));
        let top = set_toml_key(toml, "", "log_level", "\"info\"");
        assert_eq!(top, toml.replace("device = \"gw\"\n", "device = \"gw\"\nlog_level = \"info\"\n"));
        let table = set_toml_key(toml, "mqtt", "url", "\"mqtt://x\"");
        assert_eq!(table, format!("{toml}\n[mqtt]\nurl = \"mqtt://x\"\n"));
    }
}
