//! The README's main job keeps working: `scripts/demo.sh` runs the `fleet-demo` binary,
//! and this runs it end to end the way a newcomer would (in-process broker, files only,
//! no root needed, nothing installed beyond git), then checks what it printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};
use fleet_e2e::workspace_bin;

/// The workspace root: the demo finds `examples/fleet` from there.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn demo(args: &[&str], work_dir: Option<&Path>) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-demo"));
    cmd.args(args).current_dir(workspace_root()).stdin(Stdio::null());
    if let Some(dir) = work_dir {
        cmd.arg("--work-dir").arg(dir);
        cmd.arg("--bundler-bin").arg(workspace_bin("fleet-bundler")?);
        cmd.arg("--agent-bin").arg(workspace_bin("fleet-agent")?);
    }
    cmd.output().context("running fleet-demo")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Processes (other than this one) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn demo_runs_the_whole_loop_and_converges_on_the_second_commit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("demo-work");
    let out = demo(&["--timeout", "90"], Some(&work))?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "fleet-demo failed ({}):\n{stdout}\n--- stderr ---\n{stderr}", out.status);

    // Files only, said plainly; every step shows the command that repeats it.
    ensure!(stdout.contains("FILES ONLY"), "the files-only mode is not announced:\n{stdout}");
    for command in [
        "$ fleet-bundler keygen",
        "$ fleet-bundler validate",
        "$ fleet-bundler build",
        "$ fleet-agent run",
        "$ fleet-bundler publish",
        "$ fleet-bundler status",
        "$ fleet-bundler plan",
    ] {
        ensure!(stdout.contains(command), "no `{command}` in the output:\n{stdout}");
    }

    // The second commit, as the demo printed it, and the status table row that shows the
    // device converged on it.
    let second = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("commit "))
        .find(|l| l.contains("telemetry: collect network counters too"))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no second commit in the output:\n{stdout}"))?;
    ensure!(second.len() == 40, "not a commit id: {second}");
    let row = stdout.lines().find(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&"gw-berlin-01") && cols.contains(&&second[..8]) && cols.contains(&"converged")
    });
    ensure!(row.is_some(), "no status row with gw-berlin-01 converged on {second}:\n{stdout}");
    ensure!(
        stdout.contains("Done in") && stdout.contains(&format!("converged on commit {}", &second[..12])),
        "no final summary:\n{stdout}"
    );

    // The live dashboard the build wrote, pointed at the in-process broker's WebSockets.
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Live dashboard (static page, written by the build): "))
        .with_context(|| format!("no dashboard URL in the output:\n{stdout}"))?;
    let page = url.strip_prefix("file://").with_context(|| format!("not a file URL: {url}"))?;
    ensure!(Path::new(page).is_file(), "{page} does not exist");
    let config = std::fs::read_to_string(Path::new(page).with_file_name("config.js"))?;
    ensure!(config.contains("\"broker\":\"ws://127.0.0.1:"), "config.js names no local broker: {config}");

    // The device's files are below the work dir, with the second commit's change.
    let conf = work.join("device/srv/fleet/telemetry/files/telegraf.conf");
    let conf = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    ensure!(conf.contains("[[inputs.net]]"), "telegraf.conf lacks the second commit's line:\n{conf}");

    // Nothing is left running.
    let left = processes_mentioning(&work.to_string_lossy());
    ensure!(left.is_empty(), "processes left running: {left:?}");
    Ok(())
}

/// `--nginx`: the same loop with Debian's nginx serving the build output (issue 19), as
/// the README configures it; the bundles the agent applied came from nginx.
#[test]
fn demo_with_nginx_serves_the_bundles_from_nginx() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("demo-work");
    let out = demo(&["--nginx", "--timeout", "90"], Some(&work))?;
    let (stdout, stderr) = text(&out);
    ensure!(
        out.status.success(),
        "fleet-demo --nginx failed ({}):\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    ensure!(stdout.contains("served by nginx (--nginx)"), "nginx is not announced:\n{stdout}");
    ensure!(stdout.contains("$ nginx -c "), "no nginx command in the output:\n{stdout}");
    ensure!(stdout.contains("converged on commit"), "no final summary:\n{stdout}");

    // nginx's access log (the harness's JSON lines): both bundles the device applied were
    // downloaded from it, with the long-lived cache header of a content-addressed file.
    let log = std::fs::read_to_string(work.join("nginx/access.log")).context("nginx's access log")?;
    let bundles: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["uri"].as_str().is_some_and(|u| u.starts_with("/bundles/")) && r["status"] == 200)
        .collect();
    ensure!(bundles.len() >= 2, "fewer than two bundle downloads from nginx:\n{log}");
    ensure!(
        bundles.iter().all(|r| r["cache_control"] == "public, max-age=31536000, immutable"),
        "a bundle without the immutable cache header:\n{log}"
    );
    let conf = work.join("device/srv/fleet/telemetry/files/telegraf.conf");
    let conf = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    ensure!(conf.contains("[[inputs.net]]"), "telegraf.conf lacks the second commit's line:\n{conf}");

    // nginx (its command line names the work dir) is stopped with the rest.
    let left = processes_mentioning(&work.to_string_lossy());
    ensure!(left.is_empty(), "processes left running: {left:?}");
    Ok(())
}

#[test]
fn help_explains_the_options() -> Result<()> {
    let out = demo(&["--help"], None)?;
    let (stdout, _) = text(&out);
    ensure!(out.status.success(), "--help failed: {}", out.status);
    for option in [
        "--work-dir",
        "--device",
        "--broker",
        "--dashboard-broker",
        "--engine-socket",
        "--nginx",
        "--keep-running",
    ] {
        ensure!(stdout.contains(option), "--help does not mention {option}:\n{stdout}");
    }
    Ok(())
}

#[test]
fn a_bad_flag_is_a_usage_error() -> Result<()> {
    let out = demo(&["--no-such-flag"], None)?;
    let (_, stderr) = text(&out);
    ensure!(out.status.code() == Some(2), "exit {} (want 2): {stderr}", out.status);
    ensure!(stderr.contains("--no-such-flag"), "the error does not name the flag: {stderr}");
    Ok(())
}

#[test]
fn a_directory_the_demo_did_not_make_is_left_alone() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let precious = tmp.path().join("precious.txt");
    std::fs::write(&precious, "keep me")?;
    let out = demo(&[], Some(tmp.path()))?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.code() == Some(1), "exit {} (want 1):\n{stdout}\n{stderr}", out.status);
    ensure!(stderr.contains("refusing"), "no refusal message: {stderr}");
    ensure!(std::fs::read_to_string(&precious)? == "keep me", "the directory was touched");
    Ok(())
}
