//! Child-process plumbing shared by the components: spawning a daemon with its output in
//! a log file, waiting for readiness while watching for an early exit, stopping by PID
//! (SIGTERM, grace period, SIGKILL), sweeping leftover helper processes (shims, conmon,
//! docker-proxy) and unmounting whatever a daemon left mounted under its temp dir.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::log_tail;

/// Where the harness keeps its cross-process lock files.
pub(crate) const LOCK_DIR: &str = "/tmp/fleet-e2e-locks";

/// A daemon started by the harness, with stdout and stderr appended to `log`.
pub(crate) struct Daemon {
    pub(crate) name: String,
    child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Daemon> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Daemon { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails (with the log tail) if the process has already exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().context("polling the child process")? {
                self.child = None;
                return Err(anyhow!("{} exited early ({status})\n{}", self.name, log_tail(&self.log, 30)));
            }
            Ok(())
        } else {
            Err(anyhow!("{} is not running", self.name))
        }
    }

    /// Polls `ready` until it returns true, failing early if the process exits and, on
    /// timeout, with the tail of the log.
    pub(crate) fn wait_ready(&mut self, deadline: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                return Err(anyhow!(
                    "{} did not become ready within {deadline:?}\n{}",
                    self.name,
                    log_tail(&self.log, 30)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs; always reaps the child.
    pub(crate) fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        signal(child.id(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        eprintln!("fleet-e2e: {} ignored SIGTERM for {grace:?}: killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Sends `sig` to `pid` (errors, e.g. an already gone process, are ignored).
/// Sends `sig` to every process of group `pgid`.
pub(crate) fn signal_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

struct ProcInfo {
    ppid: u32,
    zombie: bool,
}

fn process_table() -> HashMap<u32, ProcInfo> {
    let mut table = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else { return table };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The command name is in parentheses and may contain spaces: parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        table.insert(pid, ProcInfo { ppid, zombie: state == "Z" });
    }
    table
}

fn cmdline_mentions(pid: u32, needle: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
}

/// All (non-zombie) descendants of `roots`, plus the roots themselves.
fn with_descendants(table: &HashMap<u32, ProcInfo>, roots: &HashSet<u32>) -> HashSet<u32> {
    let mut set: HashSet<u32> = roots.clone();
    loop {
        let before = set.len();
        for (pid, info) in table {
            if set.contains(&info.ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.retain(|pid| table.get(pid).is_some_and(|i| !i.zombie));
    set
}

/// PIDs of `root` and all its descendants right now.
pub(crate) fn process_tree(root: u32) -> HashSet<u32> {
    with_descendants(&process_table(), &HashSet::from([root]))
}

/// SIGKILLs every live process in `extra`, every process whose command line mentions
/// `dir` (containerd shims, conmon, ...) and all their descendants. The harness only
/// uses this on processes it started (directly or through the daemon it started):
/// `dir` is a unique temp dir of the harness.
pub(crate) fn kill_leftovers(dir: &Path, extra: &HashSet<u32>) -> usize {
    let me = std::process::id();
    // With the trailing slash, `/tmp/fe2e-dAbc` does not match `/tmp/fe2e-dAbcd/...`.
    let mut needle = dir.as_os_str().as_bytes().to_vec();
    needle.push(b'/');
    let mut killed = 0;
    // Killing a shim can orphan a container's processes: repeat until nothing is left.
    for _ in 0..5 {
        let table = process_table();
        let mut roots: HashSet<u32> = extra.iter().copied().filter(|p| table.contains_key(p)).collect();
        roots.extend(table.keys().copied().filter(|&pid| pid != me && cmdline_mentions(pid, &needle)));
        let mut victims = with_descendants(&table, &roots);
        victims.remove(&me);
        if victims.is_empty() {
            break;
        }
        for pid in &victims {
            signal(*pid, libc::SIGKILL);
        }
        killed += victims.len();
        // Wait (briefly) until they are gone or zombies.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let table = process_table();
            if victims.iter().all(|p| table.get(p).is_none_or(|i| i.zombie)) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    killed
}

/// Mount points at or under `dir`, deepest (most recently mounted) first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found
}

fn unescape_mount_path(s: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Lazily unmounts everything mounted at or under `dir`; returns how many.
pub(crate) fn unmount_under(dir: &Path) -> usize {
    let mut count = 0;
    // Stacked mounts need several rounds.
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            let Ok(c) = CString::new(m.as_os_str().as_bytes()) else { continue };
            // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                count += 1;
            } else {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOENT) {
                    eprintln!("fleet-e2e: umount {}: {err}", m.display());
                }
            }
        }
    }
    count
}

/// Removes a component's temp dir after its processes are gone: unmounts leftovers,
/// then deletes (or keeps it, with `FLEET_E2E_KEEP=1`). Problems are reported on stderr
/// (this runs in `Drop`).
pub(crate) fn remove_tempdir(dir: tempfile::TempDir) {
    let path = dir.keep();
    unmount_under(&path);
    if crate::keep_tempdirs() {
        eprintln!("fleet-e2e: keeping {} (FLEET_E2E_KEEP=1)", path.display());
        return;
    }
    if let Err(e) = fs::remove_dir_all(&path) {
        eprintln!("fleet-e2e: could not remove {}: {e}", path.display());
    }
}

/// Takes the machine-wide lock `/tmp/fleet-e2e-locks/<name>.lock` (an exclusive `flock`,
/// so it also excludes other threads of this process), waiting at most `wait`.
/// Released when the returned file is dropped (or the process dies).
pub(crate) fn machine_lock(name: &str, wait: Duration) -> Result<File> {
    fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
    let path = Path::new(LOCK_DIR).join(format!("{name}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let start = Instant::now();
    loop {
        if file.try_lock().is_ok() {
            return Ok(file);
        }
        if start.elapsed() > wait {
            return Err(anyhow!("{} stayed locked for {wait:?} (another test holds it)", path.display()));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub(crate) fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        return Err(anyhow!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), PathBuf::from("/tmp/a b"));
        assert_eq!(unescape_mount_path("/tmp/plain"), PathBuf::from("/tmp/plain"));
        assert_eq!(unescape_mount_path(r"/x\134y"), PathBuf::from(r"/x\y"));
    }
}
