//! A machine booted by systemd: this host's own root file system, copy-on-write
//! (an overlay whose writes land in a temp dir), booted with `systemd-nspawn -b` so that
//! systemd is its PID 1. It shares the host's network (a broker on `127.0.0.1` answers
//! inside), and starts none of the host's services: the overlay empties
//! `/etc/systemd/system/*.wants`, so only what a test installs and enables runs, and
//! removes the host's `policy-rc.d` (package installs start and restart services, as
//! on a device).
//!
//! This is how the packaged agent is tested as a device runs it: `dpkg -i` of the real
//! `.deb`, its hardened unit, `Type=notify`, the watchdog and `Restart=`.
//!
//! Needs root, `systemd-nspawn` (Debian's `systemd-container`), systemd installed on the
//! host (`/lib/systemd/systemd`) and overlayfs; [`Machine::unavailable`] says which is
//! missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::fleet::{run_command, CmdOutput};

/// systemd, the init of the machine.
const INIT: &str = "/lib/systemd/systemd";

/// One booted (or about to be booted) machine. Dropping it powers it off and unmounts
/// its root; its writes go with the temp dir.
pub struct Machine {
    root: PathBuf,
    name: String,
    nspawn: Option<Child>,
    console: PathBuf,
    tmp: Option<TempDir>,
}

impl Machine {
    /// Why machines cannot run here, or `None` when they can.
    pub fn unavailable() -> Option<String> {
        if !nix_is_root() {
            return Some("not root".into());
        }
        if crate::require_program("systemd-nspawn").is_err() {
            return Some(
                "systemd-nspawn is missing (apt-get install systemd-container; scripts/setup.sh does)".into(),
            );
        }
        if !Path::new(INIT).is_file() {
            return Some(format!("{INIT} is missing (apt-get install systemd)"));
        }
        None
    }

    /// A machine whose root is this host's, copy-on-write, with no service enabled.
    pub fn new() -> Result<Machine> {
        if let Some(why) = Machine::unavailable() {
            bail!("cannot boot a systemd machine: {why}");
        }
        let tmp = crate::short_tempdir("sd")?;
        let (upper, work, root) =
            (tmp.path().join("upper"), tmp.path().join("work"), tmp.path().join("root"));
        for dir in [&upper, &work, &root] {
            fs::create_dir_all(dir)?;
        }
        let options = format!("lowerdir=/,upperdir={},workdir={}", upper.display(), work.display());
        run_command(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &options]).arg(&root))?
            .check()
            .context("mounting the machine's root (overlayfs over /)")?;
        // A name of its own: nspawn keeps per-machine state on the host under it.
        let name =
            format!("fe2e-{}", tmp.path().file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        let machine =
            Machine { root, name, nspawn: None, console: tmp.path().join("console.log"), tmp: Some(tmp) };
        // None of the host's services: only what the test enables.
        let units = machine.path("/etc/systemd/system");
        for entry in fs::read_dir(&units).with_context(|| format!("reading {}", units.display()))? {
            let dir = entry?.path();
            if dir.is_dir() && dir.extension().is_some_and(|e| e == "wants") {
                for link in fs::read_dir(&dir)? {
                    fs::remove_file(link?.path())?;
                }
            }
        }
        // A container image's "start no service during package installs" (exit 101),
        // which this host has: a device has none, and its postinst restarts the agent.
        let policy = machine.path("/usr/sbin/policy-rc.d");
        if policy.exists() {
            fs::remove_file(&policy).with_context(|| format!("removing {}", policy.display()))?;
        }
        Ok(machine)
    }

    /// Where `path` of the machine is on the host.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Runs `args` in the machine: before [`Machine::boot`], in a container of its own
    /// (`systemd-nspawn`, no init); once booted, among its services (`nsenter` into its
    /// namespaces), where `systemctl` talks to its systemd.
    pub fn run(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = match self.init_pid() {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["-t", &pid.to_string(), "-m", "-u", "-i", "-n", "-p", "-C", "--"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("systemd-nspawn");
                cmd.args(["-q", "--register=no", "--keep-unit", "-M", &self.name, "-D"])
                    .arg(&self.root)
                    .arg("--");
                cmd
            }
        };
        run_command(cmd.args(args))
    }

    /// Boots the machine and waits until systemd says the boot is over.
    pub fn boot(&mut self) -> Result<()> {
        ensure!(self.nspawn.is_none(), "the machine is already booted");
        let console = fs::File::create(&self.console)?;
        let child = Command::new("systemd-nspawn")
            .args(["-q", "--register=no", "--keep-unit", "--console=pipe", "-b", "-M", &self.name, "-D"])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("starting systemd-nspawn")?;
        self.nspawn = Some(child);
        let start = Instant::now();
        loop {
            if let Some(child) = self.nspawn.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("the machine stopped while booting ({status})\n{}", self.console_tail());
                }
            }
            if self.init_pid().is_some() {
                let state = self.run(&["systemctl", "is-system-running"])?;
                let state = state.stdout.trim();
                if matches!(state, "running" | "degraded") {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the machine did not finish booting in 60 s\n{}", self.console_tail());
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `systemctl ARGS` in the booted machine.
    pub fn systemctl(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// One property of a unit (`systemctl show -p NAME --value UNIT`).
    pub fn unit_property(&self, unit: &str, name: &str) -> Result<String> {
        Ok(self.systemctl(&["show", "-p", name, "--value", unit])?.check()?.stdout.trim().to_string())
    }

    /// The last `lines` of a unit's journal, for failure messages.
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let n = lines.to_string();
        match self.run(&["journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit, "-n", &n]) {
            Ok(out) => format!("--- journal of {unit} ---\n{}{}", out.stdout, out.stderr),
            Err(e) => format!("(no journal of {unit}: {e:#})"),
        }
    }

    /// The PID (on the host) of the machine's systemd, once booted.
    fn init_pid(&self) -> Option<u32> {
        let nspawn = self.nspawn.as_ref()?.id();
        let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).find(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.ends_with("systemd/systemd"))
        })
    }

    fn console_tail(&self) -> String {
        crate::log_tail(&self.console, 40)
    }

    /// Powers the machine off (nspawn turns SIGTERM into a clean shutdown), killing it
    /// after 20 s.
    fn power_off(&mut self) {
        let Some(mut child) = self.nspawn.take() else { return };
        crate::process::signal(child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("fleet-e2e: the systemd machine did not power off in 20 s: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_off();
        let Some(tmp) = self.tmp.take() else { return };
        crate::process::unmount_under(tmp.path());
        if !crate::process::mounts_under(tmp.path()).is_empty() {
            // Deleting through a root still mounted would walk the host's whole tree.
            eprintln!("fleet-e2e: {} is still mounted: leaving it", tmp.keep().display());
            return;
        }
        crate::process::remove_tempdir(tmp);
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
