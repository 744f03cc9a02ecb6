//! Agent releases (bundle format 7) on real Git repositories: `fleet.yaml` `agent:` rules
//! (first match wins, no match: no agent), a device file's own `agent:`, the binaries of
//! `--agent-release DIR` as blobs written once, `verify`, `plan`, `export` and `publish
//! --blobs-over-mqtt` naming them, every mistake with its place, and a fleet without
//! `agent:` building exactly the bytes it built before.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::common::{bundler, bundler_env, mosquitto, open_bundle, read_index, Keys, Output, Repo};

const T: i64 = 1_800_000_000;
const ARCHS: [&str; 3] = ["aarch64", "arm", "x86_64"];

/// `len` bytes that do not repeat in any short period.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A few KiB that start like an ELF executable for `arch` (machine and class), then noise.
fn fake_agent(arch: &str, seed: u64) -> Vec<u8> {
    let mut b = bytes(6 << 10, seed);
    let machine: u16 = match arch {
        "aarch64" => 183,
        "arm" => 40,
        "x86_64" => 62,
        other => panic!("no machine for {other}"),
    };
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = if arch == "arm" { 1 } else { 2 };
    b[5] = 1; // little-endian
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A release directory as `cross/build.sh` writes `dist/`: `release.json` and one
/// `fleet-agent-<triple>` per architecture.
struct Release {
    dir: TempDir,
    /// arch → the binary's bytes.
    binaries: BTreeMap<String, Vec<u8>>,
}

impl Release {
    fn new(version: &str, seed: u64) -> Release {
        let dir = tempfile::tempdir().expect("tempdir");
        let triple = |arch: &str| match arch {
            "arm" => "armv7-unknown-linux-musleabihf".to_string(),
            a => format!("{a}-unknown-linux-musl"),
        };
        let mut entries = Vec::new();
        let mut binaries = BTreeMap::new();
        for (i, arch) in ARCHS.iter().enumerate() {
            let name = format!("fleet-agent-{}", triple(arch));
            let content = fake_agent(arch, seed * 10 + i as u64);
            std::fs::write(dir.path().join(&name), &content).expect("write binary");
            entries.push(format!("\n    \"{arch}\": \"{name}\""));
            binaries.insert(arch.to_string(), content);
        }
        let json =
            format!("{{\n  \"version\": \"{version}\",\n  \"binaries\": {{{}\n  }}\n}}\n", entries.join(","));
        std::fs::write(dir.path().join("release.json"), json).expect("write release.json");
        Release { dir, binaries }
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().expect("utf-8")
    }

    fn sha(&self, arch: &str) -> String {
        sha256_hex(&self.binaries[arch])
    }

    fn shas(&self) -> Vec<String> {
        ARCHS.iter().map(|a| self.sha(a)).collect()
    }
}

/// `fleet.yaml` (name `test`) with `agent`, and four devices: dev-1 canary, dev-2
/// stable, dev-3 without channel, dev-4 canary with its own `agent:` (0.10.0, downgrade
/// allowed).
fn fleet(agent: &str) -> Repo {
    let repo = Repo::new();
    repo.write("fleet.yaml", &format!("name: test\n{agent}"));
    repo.write("devices/dev-1.yaml", "labels:\n  channel: canary\n");
    repo.write("devices/dev-2.yaml", "labels:\n  channel: stable\n");
    repo.write("devices/dev-3.yaml", "labels:\n  site: a\n");
    repo.write(
        "devices/dev-4.yaml",
        "labels:\n  channel: canary\nagent:\n  version: 0.10.0\n  allow_downgrade: true\n",
    );
    repo.write("apps/web/app.yaml", "files:\n  - source: files/web.conf\n");
    repo.write("apps/web/files/web.conf", "port = 8080\n");
    repo.commit_at("fleet", T);
    repo
}

const RULES: &str = "agent:\n  - version: 0.11.0-rc.1\n    selector: {channel: canary}\n  - version: 0.10.0\n    selector:\n      channel: [stable, canary]\n";

fn build(repo: &Repo, keys: &Keys, out: &Path, extra: &[&str]) -> Output {
    let key = keys.secret();
    let mut args = vec![
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &key,
        "--out",
        out.to_str().expect("utf-8"),
        "--no-dashboard",
        "--json",
    ];
    args.extend_from_slice(extra);
    bundler(&args)
}

fn blob_names(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("blobs"))
        .map(|d| d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Every file under `dir`, by relative path.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(root).expect("under root").into(),
                    std::fs::read(&path).expect("read"),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

#[test]
fn the_first_matching_rule_wins_a_device_file_comes_first_and_a_device_no_rule_matches_gets_no_agent() {
    let repo = fleet(RULES);
    let (stable, rc) = (Release::new("0.10.0", 1), Release::new("0.11.0-rc.1", 2));
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let built =
        build(&repo, &keys, out.path(), &["--agent-release", stable.path(), "--agent-release", rc.path()]);
    built.assert_code(0);
    built.assert_stderr_has("agent 0.10.0 (aarch64, arm, x86_64) for 2 device(s)");
    built.assert_stderr_has("agent 0.11.0-rc.1 (aarch64, arm, x86_64) for 1 device(s)");

    let expect = |device: &str, release: Option<(&Release, &str, bool)>| {
        let verified = open_bundle(out.path(), device, &keys);
        let state = &verified.state;
        match release {
            None => {
                assert_eq!(state.agent, None, "{device}");
                assert_eq!(state.format(), 1, "{device}: the format is not raised");
            }
            Some((release, version, allow_downgrade)) => {
                let agent = state.agent.as_ref().unwrap_or_else(|| panic!("{device} has no agent"));
                assert_eq!(
                    (agent.version.as_str(), agent.allow_downgrade),
                    (version, allow_downgrade),
                    "{device}"
                );
                let archs: Vec<&str> = agent.binaries.iter().map(|b| b.arch.as_str()).collect();
                assert_eq!(archs, ARCHS, "{device}: one binary per architecture, sorted");
                for arch in ARCHS {
                    let b = agent.binary(arch).expect("binary");
                    assert_eq!(b.sha256_hex(), release.sha(arch), "{device} {arch}");
                    assert_eq!(b.size, release.binaries[arch].len() as u64, "{device} {arch}");
                }
                assert_eq!(state.format(), 7, "{device}");
            }
        }
    };
    // dev-1 matches both rules: the first wins. dev-4 matches the first, its own file wins.
    expect("dev-1", Some((&rc, "0.11.0-rc.1", false)));
    expect("dev-2", Some((&stable, "0.10.0", false)));
    expect("dev-3", None);
    expect("dev-4", Some((&stable, "0.10.0", true)));

    // Each binary once, named by its sha256, holding its bytes.
    let mut wanted: Vec<String> = stable.shas();
    wanted.extend(rc.shas());
    assert_eq!(blob_names(out.path()), sorted(wanted.clone()));
    for arch in ARCHS {
        let blob = out.path().join("blobs").join(stable.sha(arch));
        assert_eq!(std::fs::read(blob).expect("blob"), stable.binaries[arch]);
    }
    let summary = built.json();
    assert_eq!((summary["blobs"].as_u64(), summary["blobs_written"].as_u64()), (Some(6), Some(6)));
    let releases = summary["agent_releases"].as_array().expect("agent_releases");
    assert_eq!(releases.len(), 2);
    assert_eq!((releases[0]["version"].as_str(), releases[0]["devices"].as_u64()), (Some("0.10.0"), Some(2)));
    assert_eq!(releases[0]["dir"], stable.path());
    assert_eq!(releases[0]["binaries"][1]["arch"], "arm");
    assert_eq!(releases[0]["binaries"][1]["sha256"], stable.sha("arm").as_str());
    assert_eq!(releases[0]["binaries"][1]["blob"], format!("blobs/{}", stable.sha("arm")).as_str());
    assert_eq!(
        (releases[1]["version"].as_str(), releases[1]["devices"].as_u64()),
        (Some("0.11.0-rc.1"), Some(1))
    );

    // `verify` shows the release, text and JSON.
    let digest = read_index(out.path())["devices"]["dev-4"]["digest"].as_str().expect("digest").to_string();
    let bundle = out.path().join(format!("bundles/{digest}.bundle"));
    let bundle = bundle.to_str().expect("utf-8");
    let text = bundler(&["verify", "--pub", &keys.public(), bundle]);
    text.assert_code(0);
    assert!(
        text.stdout.contains("  agent         0.10.0 (allow_downgrade): one binary per architecture"),
        "{}",
        text.stdout
    );
    let line = format!("    arm      {:>8} sha256 {}", stable.binaries["arm"].len(), stable.sha("arm"));
    assert!(text.stdout.contains(&line), "{}", text.stdout);
    let json = bundler(&["verify", "--pub", &keys.public(), "--json", bundle]).assert_code(0).json();
    assert_eq!(json["agent"]["version"], "0.10.0");
    assert_eq!(json["agent"]["allow_downgrade"], true);
    assert_eq!(json["agent"]["binaries"][2]["arch"], "x86_64");
    assert_eq!(json["agent"]["binaries"][2]["blob"], format!("blobs/{}", stable.sha("x86_64")).as_str());
    let dev3 = read_index(out.path())["devices"]["dev-3"]["digest"].as_str().expect("digest").to_string();
    let dev3 = out.path().join(format!("bundles/{dev3}.bundle"));
    let json = bundler(&["verify", "--pub", &keys.public(), "--json", dev3.to_str().expect("utf-8")]);
    assert!(json.assert_code(0).json().get("agent").is_none(), "no agent, no key");

    // Built again: nothing changes, no blob is rewritten; a lost blob is written again.
    let blob = out.path().join("blobs").join(rc.sha("aarch64"));
    let before = std::fs::metadata(&blob).expect("blob");
    std::fs::remove_file(out.path().join("blobs").join(stable.sha("x86_64"))).expect("rm blob");
    let again =
        build(&repo, &keys, out.path(), &["--agent-release", stable.path(), "--agent-release", rc.path()]);
    let summary = again.assert_code(0).json();
    assert_eq!((summary["written"].as_u64(), summary["unchanged"].as_u64()), (Some(0), Some(4)));
    assert_eq!((summary["blobs"].as_u64(), summary["blobs_written"].as_u64()), (Some(6), Some(1)));
    let after = std::fs::metadata(&blob).expect("blob");
    assert_eq!((after.ino(), after.mtime_nsec()), (before.ino(), before.mtime_nsec()));
    assert_eq!(blob_names(out.path()), sorted(wanted));

    // A rebuilt binary of the same version is another content: its devices get a new bundle.
    std::fs::write(
        stable.dir.path().join("fleet-agent-aarch64-unknown-linux-musl"),
        fake_agent("aarch64", 99),
    )
    .expect("write");
    let rebuilt =
        build(&repo, &keys, out.path(), &["--agent-release", stable.path(), "--agent-release", rc.path()]);
    let summary = rebuilt.assert_code(0).json();
    assert_eq!(summary["changed"], serde_json::json!(["dev-2", "dev-4"]));
    let state = open_bundle(out.path(), "dev-2", &keys).state;
    let aarch64 = state.agent.as_ref().and_then(|a| a.binary("aarch64")).expect("aarch64");
    assert_eq!(aarch64.sha256_hex(), sha256_hex(&fake_agent("aarch64", 99)));
}

#[test]
fn the_short_form_and_the_environment_variable() {
    let repo = fleet("agent:\n  version: \"0.10.0\"\n");
    let release = Release::new("0.10.0", 3);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let args = [
        "build",
        "--repo",
        repo.path_str(),
        "--key",
        &keys.secret(),
        "--out",
        out.path().to_str().expect("utf-8"),
    ];
    bundler_env(&args, &[("FLEET_AGENT_RELEASE", release.path())]).assert_code(0);
    for device in ["dev-1", "dev-2", "dev-3"] {
        let state = open_bundle(out.path(), device, &keys).state;
        let agent = state.agent.expect("every device");
        assert_eq!(
            (agent.version.as_str(), agent.allow_downgrade, agent.binaries.len()),
            ("0.10.0", false, 3)
        );
    }
    assert_eq!(blob_names(out.path()), sorted(release.shas()));
}

#[test]
fn a_version_no_release_provides_is_an_error_at_its_line_and_nothing_is_written() {
    let repo = fleet(RULES);
    let stable = Release::new("0.10.0", 4);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let failed = build(&repo, &keys, out.path(), &["--agent-release", stable.path()]);
    failed.assert_code(65);
    failed.assert_stderr_has(&format!(
        "fleet.yaml:3:14: error: agent: version 0.11.0-rc.1 is not among the agent releases of this build (the \
         --agent-release directories hold 0.10.0 in {}): pass --agent-release DIR with the directory \
         cross/build.sh wrote (dist/)",
        stable.path()
    ));
    failed.assert_stderr_has("nothing was written");
    assert!(!failed.stderr.contains("fleet.yaml:5:"), "0.10.0 is provided: {}", failed.stderr);
    assert!(tree(out.path()).is_empty(), "nothing written");

    // Without any: every rule, the device file's too, each at its place.
    let none = build(&repo, &keys, out.path(), &[]);
    none.assert_code(65);
    none.assert_stderr_has("fleet.yaml:3:14: error: agent: version 0.11.0-rc.1 is not among the agent releases of this build (no --agent-release was given)");
    none.assert_stderr_has("fleet.yaml:5:14: error: agent: version 0.10.0 is not among");
    none.assert_stderr_has("devices/dev-4.yaml:4:12: error: agent: version 0.10.0 is not among");
    assert!(tree(out.path()).is_empty(), "nothing written");
}

#[test]
fn a_version_that_is_not_major_minor_patch_is_an_error_at_its_line() {
    let repo = fleet("agent:\n  - version: 0.10\n    selector: {channel: canary}\n  - version: v1.0.0\n  - verison: 1.0.0\n");
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let checked = bundler(&["validate", "--repo", repo.path_str()]);
    checked.assert_code(65);
    checked.assert_stderr_has("fleet.yaml:6:5: error: unknown key `verison`: did you mean `version`?");
    let failed = build(&repo, &keys, out.path(), &[]);
    failed.assert_code(65);

    let repo = fleet("agent:\n  - version: 0.10\n    selector: {channel: canary}\n  - version: v1.0.0\n");
    let checked = bundler(&["validate", "--repo", repo.path_str()]);
    checked.assert_code(65);
    checked.assert_stderr_has("fleet.yaml:3:14: error: agent: version `0.1` is not MAJOR.MINOR.PATCH[-PRE] (2 dot-separated number(s)");
    checked.assert_stderr_has("fleet.yaml:5:14: error: agent: version `v1.0.0` is not MAJOR.MINOR.PATCH[-PRE] (`v1` is not a number)");
    let release = Release::new("0.10.0", 5);
    build(&repo, &keys, out.path(), &["--agent-release", release.path()]).assert_code(65);
    assert!(tree(out.path()).is_empty(), "nothing written");

    // In a device file too, and a selector there is an unknown key.
    let repo = fleet("");
    repo.write("devices/dev-2.yaml", "agent:\n  version: 1.0.0-rc_1\n  selector: {a: b}\n");
    repo.commit_at("device agent", T + 10);
    let checked = bundler(&["validate", "--repo", repo.path_str()]);
    checked.assert_code(65);
    checked.assert_stderr_has("devices/dev-2.yaml:3:3: error: unknown key `selector`");
    repo.write("devices/dev-2.yaml", "agent:\n  version: 1.0.0-rc_1\n");
    repo.commit_at("device agent", T + 20);
    bundler(&["validate", "--repo", repo.path_str()]).assert_code(65).assert_stderr_has(
        "devices/dev-2.yaml:2:12: error: agent: version `1.0.0-rc_1` is not MAJOR.MINOR.PATCH[-PRE]",
    );
}

#[test]
fn a_bad_release_directory_is_an_error_naming_the_file_and_nothing_is_written() {
    let repo = fleet("agent:\n  version: 0.10.0\n");
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    let release = Release::new("0.10.0", 6);
    let json_path = release.dir.path().join("release.json");
    let run = |extra: &[&str]| build(&repo, &keys, out.path(), extra);

    std::fs::write(&json_path, "{\"version\": \"0.10.0\", \"binaries\": [\"fleet-agent\"]}").expect("write");
    let failed = run(&["--agent-release", release.path()]);
    failed.assert_code(1);
    failed.assert_stderr_has(&format!(
        "error: {} is not a valid release file: invalid type",
        json_path.display()
    ));

    std::fs::write(&json_path, "{\"version\": \"0.10\", \"binaries\": {\"aarch64\": \"a\"}}").expect("write");
    run(&["--agent-release", release.path()])
        .assert_code(1)
        .assert_stderr_has("is not a valid release file: version `0.10` is not MAJOR.MINOR.PATCH[-PRE]");

    std::fs::write(
        &json_path,
        "{\"version\": \"0.10.0\", \"binaries\": {\"arm64\": \"fleet-agent-aarch64-unknown-linux-musl\"}}",
    )
    .expect("write");
    run(&["--agent-release", release.path()]).assert_code(1).assert_stderr_has(
        "`arm64` is not an architecture as the agent names its own (did you mean `aarch64`?",
    );

    std::fs::write(&json_path, "{\"version\": \"0.10.0\", \"binaries\": {\"arm\": \"../fleet-agent\"}}")
        .expect("write");
    run(&["--agent-release", release.path()]).assert_code(1).assert_stderr_has(
        "the arm binary `../fleet-agent` is not a file name relative to the release directory",
    );

    std::fs::write(&json_path, "{\"version\": \"0.10.0\", \"binaries\": {\"arm\": \"fleet-agent-gone\"}}")
        .expect("write");
    run(&["--agent-release", release.path()]).assert_code(1).assert_stderr_has(&format!(
        "error: {} names the arm binary {}, which does not exist: build it again (cross/build.sh) or correct release.json",
        json_path.display(),
        release.dir.path().join("fleet-agent-gone").display()
    ));

    // A binary filed under another architecture than the one it is built for.
    std::fs::write(
        &json_path,
        "{\"version\": \"0.10.0\", \"binaries\": {\"arm\": \"fleet-agent-aarch64-unknown-linux-musl\"}}",
    )
    .expect("write");
    run(&["--agent-release", release.path()])
        .assert_code(1)
        .assert_stderr_has("but it is an ELF executable for aarch64: correct release.json");

    std::fs::remove_file(&json_path).expect("rm");
    run(&["--agent-release", release.path()]).assert_code(1).assert_stderr_has(&format!(
        "error: {} does not exist: --agent-release takes the directory cross/build.sh wrote",
        json_path.display()
    ));

    // The command line's mistakes: 64.
    let missing = release.dir.path().join("no-such-dir");
    run(&["--agent-release", missing.to_str().expect("utf-8")])
        .assert_code(64)
        .assert_stderr_has("no-such-dir: no such directory: pass the directory cross/build.sh wrote (dist/)");
    let (one, two) = (Release::new("0.10.0", 7), Release::new("0.10.0", 8));
    run(&["--agent-release", one.path(), "--agent-release", two.path()]).assert_code(64).assert_stderr_has(
        &format!("--agent-release {} and {} both hold version 0.10.0", one.path(), two.path()),
    );
    assert!(tree(out.path()).is_empty(), "nothing written");
}

#[test]
fn export_holds_the_bundle_its_artifacts_then_every_architecture_binary() {
    let repo = fleet("agent:\n  version: 0.10.0\n");
    let big = bytes(300 << 10, 9);
    std::fs::write(repo.path().join("apps/web/files/model.bin"), &big).expect("write");
    repo.write("apps/web/app.yaml", "files:\n  - source: files/web.conf\n  - source: files/model.bin\n");
    repo.commit_at("a big file", T + 10);
    let release = Release::new("0.10.0", 10);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &["--agent-release", release.path()]).assert_code(0);

    let file = out.path().join("dev-1.tar");
    let export = |json: bool| {
        let mut args =
            vec!["export", "--out", out.path().to_str().expect("utf-8"), "--device", "dev-1", "--file"];
        args.push(file.to_str().expect("utf-8"));
        if json {
            args.push("--json");
        }
        bundler(&args)
    };
    let done = export(true);
    done.assert_code(0);
    done.assert_stderr_has("and the agent 0.10.0 binaries for aarch64, arm, x86_64 (18.0 KiB; the device takes its own architecture's)");
    let json = done.json();
    assert_eq!(json["artifacts"][0]["sha256"], sha256_hex(&big).as_str());
    assert_eq!(json["agent"]["version"], "0.10.0");
    assert_eq!(json["agent"]["binaries"][0]["arch"], "aarch64");
    assert_eq!(json["agent"]["binaries"][1]["sha256"], release.sha("arm").as_str());
    assert_eq!(json["agent"]["binaries"][2]["size"], release.binaries["x86_64"].len() as u64);

    let digest = read_index(out.path())["devices"]["dev-1"]["digest"].as_str().expect("digest").to_string();
    let bundle = std::fs::read(out.path().join(format!("bundles/{digest}.bundle"))).expect("bundle");
    let mut expected: Vec<(String, &[u8])> =
        vec![("bundle".into(), &bundle), (format!("blobs/{}", sha256_hex(&big)), &big)];
    for arch in ARCHS {
        expected.push((format!("blobs/{}", release.sha(arch)), &release.binaries[arch]));
    }
    let mut archive = tar::Archive::new(std::fs::File::open(&file).expect("open"));
    let mut names = Vec::new();
    for (entry, (name, content)) in archive.entries().expect("entries").zip(&expected) {
        let mut entry = entry.expect("entry");
        assert_eq!(entry.header().path().expect("path").to_str(), Some(name.as_str()));
        let mut got = Vec::new();
        entry.read_to_end(&mut got).expect("read");
        assert!(got == *content, "{name}");
        names.push(name.clone());
    }
    assert_eq!(names.len(), 5);
    let count =
        tar::Archive::new(std::fs::File::open(&file).expect("open")).entries().expect("entries").count();
    assert_eq!(count, 5);

    // A missing binary blob is named with what needs it; nothing is written.
    std::fs::remove_file(&file).expect("rm");
    let blob = out.path().join("blobs").join(release.sha("arm"));
    std::fs::remove_file(&blob).expect("rm blob");
    export(false).assert_code(1).assert_stderr_has(&format!(
        "blob {} is missing: the agent 0.10.0 binary for arm of device dev-1 needs it",
        blob.display()
    ));
    assert!(!file.exists(), "nothing written");
}

#[test]
fn publish_blobs_over_mqtt_retains_every_architecture_binary() {
    let broker = mosquitto("allow_anonymous true");
    let repo = fleet("agent:\n  version: 0.10.0\n");
    let release = Release::new("0.10.0", 11);
    let keys = Keys::new();
    let out = tempfile::tempdir().expect("tempdir");
    build(&repo, &keys, out.path(), &["--agent-release", release.path()]).assert_code(0);
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let args = [
        "publish",
        "--out",
        out.path().to_str().expect("utf-8"),
        "--broker",
        &url,
        "--blobs-over-mqtt",
        "--json",
    ];
    let published = bundler(&args);
    published.assert_code(0);
    let mut sent: Vec<String> = published.json()["blobs_published"]
        .as_array()
        .expect("blobs_published")
        .iter()
        .map(|s| s.as_str().expect("sha").to_string())
        .collect();
    sent.sort();
    assert_eq!(sent, sorted(release.shas()));
    for arch in ARCHS {
        let topic = format!("fleet/test/blobs/{}/0", release.sha(arch));
        let got = std::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-t",
                &topic,
                "-C",
                "1",
                "-N",
                "-W",
                "5",
            ])
            .output()
            .expect("mosquitto_sub")
            .stdout;
        assert!(got == release.binaries[arch], "{arch}: the retained chunk is the binary");
    }
    let again = bundler(&args);
    assert_eq!(again.assert_code(0).json()["blobs_published"], serde_json::json!([]), "sent once");
}

#[test]
fn plan_names_the_declared_agent_version_changes() {
    let repo = fleet("");
    repo.write("fleet.yaml", "name: test\nagent:\n  version: 0.10.0\n");
    repo.commit_at("agent 0.10.0", T + 10);
    repo.write("fleet.yaml", "name: test\nagent:\n  version: 0.9.0\n");
    repo.commit_at("agent 0.9.0", T + 20);

    let added = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~2", "--to", "HEAD~1"]);
    added.assert_code(2);
    assert!(added.stdout.contains("~ device dev-1\n    + agent 0.10.0\n"), "{}", added.stdout);
    assert!(!added.stdout.contains("device dev-4"), "its own agent: did not change: {}", added.stdout);

    let older = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~1"]);
    older.assert_code(2);
    assert!(
        older.stdout.contains("    ~ agent 0.10.0 -> 0.9.0 (older: a device that runs a newer agent refuses it, agent_downgrade_refused, unless allow_downgrade: true)"),
        "{}",
        older.stdout
    );
    assert!(!older.stdout.contains("device dev-4"), "its own agent: did not change: {}", older.stdout);
    let json = bundler(&["plan", "--repo", repo.path_str(), "--from", "HEAD~2", "--to", "HEAD~1", "--json"]);
    let json = json.assert_code(2).json();
    let dev1 =
        json["devices"].as_array().expect("devices").iter().find(|d| d["device"] == "dev-1").expect("dev-1");
    assert_eq!(dev1["agent"], serde_json::json!([null, {"version": "0.10.0", "allow_downgrade": false}]));
    assert_eq!(json["unchanged"], 1, "dev-4 keeps its own agent: {json}");
}

/// What the bundler before agent releases wrote for this fleet (a file and a container on
/// three devices): the sha256 of each device's canonical state, the payload the bundle
/// signs. A fleet without `agent:` must keep these bytes (bundle format 1).
const STATE_DIGEST_BEFORE: &str = "98de23858edcf1e10aacbe4f29103d9912754ce734f458dc5bfa3215f7b3a418";

#[test]
fn a_fleet_without_agent_builds_the_bytes_it_built_before_with_or_without_a_release() {
    let repo = Repo::new();
    repo.write("fleet.yaml", "name: test\n");
    repo.write("devices/dev-1.yaml", "labels:\n  site: a\n  channel: canary\n");
    repo.write("devices/dev-2.yaml", "labels:\n  site: b\n");
    repo.write("devices/dev-3.yaml", "labels:\n  site: c\n");
    repo.write("apps/web/app.yaml", "files:\n  - source: files/web.conf\n");
    repo.write("apps/web/files/web.conf", "port = 8080\n");
    repo.write(
        "apps/web/compose.yaml",
        &format!(
            "services:\n  web:\n    image: registry.example/web@sha256:{}\n    restart: unless-stopped\n",
            "a".repeat(64)
        ),
    );
    repo.commit_at("fleet", T);
    let keys = Keys::new();
    let (plain, with_release) =
        (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let built = build(&repo, &keys, plain.path(), &[]);
    let summary = built.assert_code(0).json();
    assert!(summary.get("agent_releases").is_none(), "the --json summary is unchanged: {summary}");
    let index = read_index(plain.path());
    for device in ["dev-1", "dev-2", "dev-3"] {
        assert_eq!(index["devices"][device]["state_digest"], STATE_DIGEST_BEFORE, "{device}");
        let verified = open_bundle(plain.path(), device, &keys);
        assert_eq!(verified.state.format(), 1);
        assert_eq!(verified.state.agent, None);
    }
    assert!(!plain.path().join("blobs").exists(), "no blob");

    // An --agent-release no rule uses changes nothing but a warning.
    let release = Release::new("0.10.0", 12);
    let built = build(&repo, &keys, with_release.path(), &["--agent-release", release.path()]);
    built.assert_code(0).assert_stderr_has(&format!(
        "warning: --agent-release {} (version 0.10.0): no device's agent: rule names this version, so its binaries were not written",
        release.path()
    ));
    assert!(tree(plain.path()) == tree(with_release.path()), "byte for byte the same output");
}
