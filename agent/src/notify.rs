//! The systemd notify protocol (`sd_notify(3)`), without libsystemd: one datagram of
//! `KEY=VALUE` lines per message on the unix socket named by `$NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). The agent sends `READY=1` once started,
//! `WATCHDOG=1` keep-alives every [`Notifier::keepalive_interval`] (half of
//! `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is unset or names this process), and
//! `STOPPING=1` when it begins to shut down.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd, or a unit that is not `Type=notify`)
//! [`Notifier::from_env`] gives `None` and nothing is sent. Sending never blocks (the
//! socket is non-blocking) and never fails the agent: a lost keep-alive is systemd's to
//! judge. This module reads the environment only in [`Notifier::from_env`]; it keeps no
//! clock: the caller pings from its own loop, so that a stuck loop stops pinging and
//! systemd restarts the agent.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    Address(OsString),
    #[error("sd_notify socket {socket:?}: {source}")]
    Io { socket: OsString, source: std::io::Error },
}

/// A connection to systemd's notify socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: OsString,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; `None` when
    /// `$NOTIFY_SOCKET` is unset or unusable (logged as a warning).
    pub fn from_env() -> Option<Notifier> {
        let var = |name: &str| std::env::var(name).ok();
        let watchdog = watchdog_timeout(
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        match Notifier::from_vars(std::env::var_os("NOTIFY_SOCKET"), watchdog) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("not notifying systemd: {e}");
                None
            }
        }
    }

    /// `None` without a socket name (unset or empty), as `sd_notify` does.
    pub fn from_vars(
        socket: Option<OsString>,
        watchdog: Option<Duration>,
    ) -> Result<Option<Notifier>, NotifyError> {
        match socket {
            Some(name) if !name.is_empty() => Notifier::new(&name, watchdog).map(Some),
            _ => Ok(None),
        }
    }

    /// Notifies the socket `name` (an absolute path, or `@name` for the abstract
    /// namespace); `watchdog` is the unit's `WatchdogSec=`, if any.
    pub fn new(name: &OsStr, watchdog: Option<Duration>) -> Result<Notifier, NotifyError> {
        let io = |source| NotifyError::Io { socket: name.to_owned(), source };
        let bytes = name.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(name).map_err(io)?,
            Some(b'@') => abstract_addr(&bytes[1..]).map_err(io)?,
            _ => return Err(NotifyError::Address(name.to_owned())),
        };
        let socket = UnixDatagram::unbound().map_err(io)?;
        socket.set_nonblocking(true).map_err(io)?;
        Ok(Notifier { socket, addr, name: name.to_owned(), watchdog: watchdog.filter(|d| !d.is_zero()) })
    }

    /// Sends one message: `KEY=VALUE` lines, e.g. `"READY=1"`.
    pub fn send(&self, state: &str) -> Result<(), NotifyError> {
        let io = |source| NotifyError::Io { socket: self.name.clone(), source };
        self.socket.send_to_addr(state.as_bytes(), &self.addr).map(drop).map_err(io)
    }

    /// `READY=1`: start-up is complete (systemd then starts the watchdog).
    pub fn ready(&self) {
        self.best_effort("READY=1");
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.best_effort("STOPPING=1");
    }

    /// `WATCHDOG=1`: a keep-alive. Sent only when the unit has a watchdog for this
    /// process.
    pub fn ping(&self) {
        if self.watchdog.is_some() {
            self.best_effort("WATCHDOG=1");
        }
    }

    /// How often to [`ping`](Notifier::ping): half the watchdog timeout, as
    /// `sd_watchdog_enabled(3)` advises; `None` without a watchdog.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    fn best_effort(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!("{state}: {e}");
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract unix socket names are Linux-only"))
}

/// The watchdog timeout from `$WATCHDOG_USEC` (microseconds, > 0), when
/// `$WATCHDOG_PID` is unset or is `own_pid` (a watchdog meant for another process of
/// the unit is not ours to feed).
pub fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid {
        Some(pid) if pid.trim().parse::<u32>().ok() != Some(own_pid) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bound datagram socket standing in for systemd's.
    fn systemd_socket() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        (dir, path, socket)
    }

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_ping_and_stopping_send_one_datagram_each() {
        let (_dir, path, systemd) = systemd_socket();
        let n = Notifier::new(path.as_os_str(), Some(Duration::from_secs(60))).expect("notifier");
        n.ready();
        n.ping();
        n.stopping();
        assert_eq!(received(&systemd), "READY=1");
        assert_eq!(received(&systemd), "WATCHDOG=1");
        assert_eq!(received(&systemd), "STOPPING=1");
    }

    #[test]
    fn abstract_socket_names_start_with_an_at_sign() {
        let name = format!("fleet-agent-notify-test-{}", std::process::id());
        let addr = abstract_addr(name.as_bytes()).expect("abstract address");
        let systemd = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        systemd.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let n = Notifier::new(OsStr::new(&format!("@{name}")), None).expect("notifier");
        n.ready();
        assert_eq!(received(&systemd), "READY=1");
    }

    #[test]
    fn without_a_watchdog_ping_sends_nothing() {
        let (_dir, path, systemd) = systemd_socket();
        let n = Notifier::new(path.as_os_str(), None).expect("notifier");
        assert_eq!(n.keepalive_interval(), None);
        n.ping();
        n.stopping();
        assert_eq!(received(&systemd), "STOPPING=1", "the ping was not sent");
    }

    #[test]
    fn keepalive_interval_is_half_the_watchdog_timeout() {
        let (_dir, path, _systemd) = systemd_socket();
        let n = Notifier::new(path.as_os_str(), Some(Duration::from_secs(120))).expect("notifier");
        assert_eq!(n.keepalive_interval(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn watchdog_timeout_comes_from_usec_when_the_pid_is_ours_or_unset() {
        assert_eq!(watchdog_timeout(Some("120000000"), None, 42), Some(Duration::from_secs(120)));
        assert_eq!(watchdog_timeout(Some("120000000"), Some("42"), 42), Some(Duration::from_secs(120)));
        assert_eq!(watchdog_timeout(Some("120000000"), Some("43"), 42), None, "another process's");
        assert_eq!(watchdog_timeout(Some("120000000"), Some("x"), 42), None);
        assert_eq!(watchdog_timeout(None, Some("42"), 42), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 42), None);
        assert_eq!(watchdog_timeout(Some("60s"), None, 42), None);
    }

    #[test]
    fn no_socket_name_means_no_notifier() {
        assert!(Notifier::from_vars(None, None).expect("ok").is_none());
        assert!(Notifier::from_vars(Some(OsString::new()), None).expect("ok").is_none());
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        let err = Notifier::from_vars(Some("run/notify".into()), None).expect_err("relative");
        assert!(matches!(err, NotifyError::Address(_)), "{err}");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = Notifier::new(dir.path().join("gone").as_os_str(), Some(Duration::from_secs(1)))
            .expect("notifier");
        let err = n.send("READY=1").expect_err("no listener");
        assert!(err.to_string().contains("gone"), "{err}");
        n.ping(); // logged, not fatal
    }
}
