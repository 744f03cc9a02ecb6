//! Test helpers: real Git repositories made with the `git` CLI, the bundler binary,
//! free ports, and processes stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The example fleet shipped in `examples/fleet/`.
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// What a run of the bundler gave.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_stderr_has(&self, needle: &str) -> &Self {
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}\nstderr:\n{}", self.stderr);
        self
    }
}

/// Runs `fleet-bundler ARGS` with a clean signing-key environment.
pub fn bundler(args: &[&str]) -> Output {
    bundler_env(args, &[])
}

///
/// A `build` runs as CI runs it, a minute after the commit it builds: tests commit at
/// fixed dates (some ahead of the real clock, some years apart), so unless the test
/// sets `--now` or `FLEET_BUILD_NOW` itself, the build's clock is the commit's
/// committer time + 60 s.
pub fn bundler_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-bundler"));
    cmd.args(args)
        .env_remove("FLEET_SIGNING_KEY")
        .env_remove("FLEET_BROKER")
        .env_remove("FLEET_BUILD_NOW")
        .env_remove("FLEET_DASHBOARD_BROKER")
        .env_remove("FLEET_AGE_IDENTITY")
        .env_remove("FLEET_AGE_IDENTITY_FILE")
        .env_remove("FLEET_ARTIFACT_THRESHOLD")
        .env_remove("FLEET_INLINE_BUDGET")
        .env_remove("FLEET_AGENT_RELEASE");
    // A build of the example fleet (a copy or a clone: the revision holds its example-only
    // CI identity) decrypts with that identity, as its README says. Other repositories
    // and other commands get no identity unless a test passes one.
    if args.first() == Some(&"build") && !args.contains(&"--age-identity") {
        let flag = |name: &str| args.iter().position(|a| *a == name).and_then(|i| args.get(i + 1)).copied();
        let (repo, rev) = (flag("--repo").unwrap_or("."), flag("--rev").unwrap_or("HEAD"));
        let holds_example_identity = Command::new("git")
            .args(["-C", repo, "cat-file", "-e", &format!("{rev}:EXAMPLE-ONLY-ci-age.txt")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if holds_example_identity {
            cmd.env("FLEET_AGE_IDENTITY_FILE", example_dir().join("EXAMPLE-ONLY-ci-age.txt"));
        }
    }
    if args.first() == Some(&"build")
        && !args.contains(&"--now")
        && !env.iter().any(|(k, _)| *k == "FLEET_BUILD_NOW")
    {
        let flag = |name: &str| args.iter().position(|a| *a == name).and_then(|i| args.get(i + 1)).copied();
        let repo = Path::new(flag("--repo").unwrap_or("."));
        let rev = flag("--rev").unwrap_or("HEAD");
        let time = git_in(repo, &["log", "-1", "--format=%ct", rev], &[]);
        let now = time.trim().parse::<i64>().expect("commit time") + 60;
        cmd.env("FLEET_BUILD_NOW", now.to_string());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run fleet-bundler");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A Git repository in a temporary directory.
pub struct Repo {
    pub dir: TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        let repo = Repo { dir: tempfile::tempdir().expect("tempdir") };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    /// A repository holding a copy of `examples/fleet`, committed.
    pub fn example() -> Repo {
        let repo = Repo::new();
        copy_dir(&example_dir(), repo.path());
        repo.commit_at("initial fleet", 1_800_000_000);
        repo
    }

    /// Replaces `from` by `to` in the file `rel` (which must contain it).
    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let path = self.path().join(rel);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains(from), "{rel} has no {from:?}");
        std::fs::write(path, text.replace(from, to)).expect("write");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    pub fn write(&self, rel: &str, content: &str) {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
    }

    pub fn remove(&self, rel: &str) {
        let path = self.path().join(rel);
        if path.is_dir() {
            std::fs::remove_dir_all(path).expect("rm -r");
        } else {
            std::fs::remove_file(path).expect("rm");
        }
    }

    /// Runs git in the repository and returns its stdout.
    pub fn git(&self, args: &[&str]) -> String {
        git_in(self.path(), args, &[])
    }

    /// Commits everything with the given committer time; returns the commit id.
    pub fn commit_at(&self, message: &str, time: i64) -> String {
        let date = format!("@{time} +0000");
        git_in(self.path(), &["add", "-A"], &[]);
        git_in(
            self.path(),
            &["commit", "-q", "--allow-empty", "-m", message],
            &[("GIT_COMMITTER_DATE", &date), ("GIT_AUTHOR_DATE", &date)],
        );
        self.git(&["rev-parse", "HEAD"]).trim().to_string()
    }
}

pub fn git_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args([
            "-c",
            "user.name=Fleet Test",
            "-c",
            "user.email=test@fleet.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run git");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A signing key pair made with `keygen`.
pub struct Keys {
    pub dir: TempDir,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        bundler(&["keygen", "--out", keys.to_str().expect("utf-8")]).assert_code(0);
        Keys { dir }
    }

    pub fn secret(&self) -> String {
        self.dir.path().join("keys/signing.key").to_string_lossy().into_owned()
    }

    pub fn public(&self) -> String {
        self.dir.path().join("keys/signing.pub").to_string_lossy().into_owned()
    }

    pub fn public_key(&self) -> fleet_spec::PublicKey {
        fleet_spec::keys::file::load_public(Path::new(&self.public())).expect("public key")
    }
}

/// Builds `rev` of `repo` into `out`.
pub fn build(repo: &Path, rev: &str, keys: &Keys, out: &Path) -> Output {
    bundler(&[
        "build",
        "--repo",
        repo.to_str().expect("utf-8"),
        "--rev",
        rev,
        "--key",
        &keys.secret(),
        "--out",
        out.to_str().expect("utf-8"),
        "--json",
    ])
}

pub fn read_index(out: &Path) -> serde_json::Value {
    let bytes = std::fs::read(out.join("index.json")).expect("index.json");
    serde_json::from_slice(&bytes).expect("index is JSON")
}

/// Bundle files in `out/bundles`, sorted.
pub fn bundle_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("bundles"))
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Verifies a device's bundle from an index as the device would, at `now`.
pub fn open_bundle(out: &Path, device: &str, keys: &Keys) -> fleet_spec::Verified {
    let index = read_index(out);
    let entry = &index["devices"][device];
    let digest = entry["digest"].as_str().expect("digest");
    let bytes = std::fs::read(out.join("bundles").join(format!("{digest}.bundle"))).expect("bundle");
    let trusted = fleet_spec::TrustedKeys::new(vec![keys.public_key()], 1).expect("trust");
    let fleet = index["fleet"].as_str().expect("fleet");
    let now = entry["version"].as_i64().expect("version");
    fleet_spec::verify(
        &bytes,
        &trusted,
        fleet_spec::Expectation { fleet, device },
        fleet_spec::TrustState::default(),
        now,
        &fleet_spec::Limits::default(),
    )
    .expect("bundle verifies")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process stopped by PID when dropped.
pub struct Daemon {
    pub child: Child,
    /// Config and data of the daemon, removed after it stopped.
    pub _dir: TempDir,
    pub port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port}");
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts Mosquitto on a free loopback port with `extra` config lines.
pub fn mosquitto(extra: &str) -> Daemon {
    mosquitto_on(free_port(), extra)
}

/// Starts Mosquitto on loopback port `port` (e.g. again, after stopping one there).
pub fn mosquitto_on(port: u16, extra: &str) -> Daemon {
    assert!(have("mosquitto"), "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients");
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\npersistence false\n{extra}\n")).expect("conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    wait_for_port(port, "mosquitto");
    Daemon { child, _dir: dir, port }
}
