//! Sideloading into a running agent: how `fleet-agent apply` hands a bundle to the
//! daemon that holds the state directory's lock, instead of asking the user to stop it.
//!
//! The daemon listens on a unix socket in its state directory, `<state_dir>/agent.sock`
//! (mode 0600, in a 0700 directory: only the agent's own user can connect). One
//! connection carries one bundle:
//!
//! 1. the client writes the bundle's bytes and shuts down its writing half;
//! 2. the daemon reads them (at most `limits.max_bundle_len`, within [`READ_TIMEOUT`]),
//!    runs them through the same path as any bundle (`Agent::apply_bundle`: full
//!    verification, journal, health wait, rollback) and answers with one JSON line, a
//!    [`Reply`], then closes.
//!
//! The daemon handles one piece of work at a time, so a sideload waits for work in
//! progress and the reply comes once the bundle is committed, refused or rolled back.
//! If the daemon stops mid-apply, the client reads end of file; the journal completes
//! or rolls back the apply at the next start, as for any bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::Outcome;

/// The socket's file name in the state directory.
pub const SOCKET: &str = "agent.sock";
/// How long the daemon waits for a client to send its bundle.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The bundle went through the apply path and ended so.
    Outcome(Outcome),
    /// It could not go through (too large, unreadable, an I/O error in the agent).
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SideloadError {
    #[error("no agent is listening on {path}: {source}")]
    NotListening { path: PathBuf, source: std::io::Error },
    #[error("sending the bundle to the running agent over {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the running agent closed {path} without an answer; it may have stopped while applying (the journal completes or rolls back the apply at its next start): check `fleet-agent status`")]
    NoAnswer { path: PathBuf },
    #[error("the running agent sent an answer that is not understood: {0}")]
    BadAnswer(String),
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Binds the daemon's socket, replacing a stale one (the caller holds the state
/// directory's lock, so no other daemon uses it).
pub fn listen(state_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Daemon side: reads one client's bundle. `Err` holds the reply to send instead.
pub async fn read_bundle(stream: &mut UnixStream, max_len: u64) -> Result<Vec<u8>, Reply> {
    let mut bytes = Vec::new();
    let mut limited = (&mut *stream).take(max_len.saturating_add(1));
    match tokio::time::timeout(READ_TIMEOUT, limited.read_to_end(&mut bytes)).await {
        Err(_) => Err(Reply::Error(format!("no complete bundle within {} s", READ_TIMEOUT.as_secs()))),
        Ok(Err(e)) => Err(Reply::Error(format!("reading the bundle: {e}"))),
        Ok(Ok(_)) if bytes.len() as u64 > max_len => Err(Reply::Error(format!(
            "the bundle is larger than limits.max_bundle_len ({max_len} bytes); nothing was changed"
        ))),
        Ok(Ok(_)) => Ok(bytes),
    }
}

/// Daemon side: sends the answer (best effort: the client may be gone).
pub async fn send_reply(stream: &mut UnixStream, reply: &Reply) {
    let mut line = serde_json::to_vec(reply).expect("replies always serialize");
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line).await {
        tracing::info!("the sideload client left before the answer: {e}");
    }
    let _ = stream.shutdown().await;
}

/// Client side: hands `bundle` to the agent running on `state_dir` and waits for its
/// answer (as long as the apply takes, health wait included).
pub async fn submit(state_dir: &Path, bundle: &[u8]) -> Result<Reply, SideloadError> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|source| SideloadError::NotListening { path: path.clone(), source })?;
    let io = |source| SideloadError::Io { path: path.clone(), source };
    stream.write_all(bundle).await.map_err(io)?;
    stream.shutdown().await.map_err(io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.map_err(io)?;
    if answer.is_empty() {
        return Err(SideloadError::NoAnswer { path });
    }
    serde_json::from_slice(&answer).map_err(|e| SideloadError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bundle_goes_over_and_the_outcome_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = listen(dir.path()).expect("listen");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let bytes = read_bundle(&mut s, 16).await.expect("bundle");
            assert_eq!(bytes, b"bundle bytes");
            send_reply(&mut s, &Reply::Outcome(Outcome::Committed { version: 7 })).await;
        });
        let reply = submit(dir.path(), b"bundle bytes").await.expect("reply");
        assert_eq!(reply, Reply::Outcome(Outcome::Committed { version: 7 }));
        server.await.expect("server");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket_path(dir.path())).expect("socket").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn an_oversized_bundle_is_answered_with_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = listen(dir.path()).expect("listen");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let reply = read_bundle(&mut s, 4).await.expect_err("too large");
            send_reply(&mut s, &reply).await;
        });
        match submit(dir.path(), b"five!").await.expect("reply") {
            Reply::Error(e) => assert!(e.contains("max_bundle_len"), "{e}"),
            other => panic!("{other:?}"),
        }
        server.await.expect("server");
    }

    #[tokio::test]
    async fn no_daemon_and_a_silent_daemon_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = submit(dir.path(), b"x").await.expect_err("nobody listens");
        assert!(matches!(err, SideloadError::NotListening { .. }), "{err}");

        let listener = listen(dir.path()).expect("listen");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            drop(s); // stops mid-apply
        });
        let err = submit(dir.path(), b"x").await.expect_err("no answer");
        server.await.expect("server");
        // Either it closed before reading (a broken pipe) or after: both say so.
        assert!(matches!(err, SideloadError::NoAnswer { .. } | SideloadError::Io { .. }), "{err}");
    }

    #[test]
    fn replies_have_a_stable_json_shape() {
        let r = Reply::Outcome(Outcome::Rejected { code: "signature".into(), reason: "bad".into() });
        let json = serde_json::to_string(&r).expect("json");
        assert_eq!(json, r#"{"outcome":{"outcome":"rejected","code":"signature","reason":"bad"}}"#);
        assert_eq!(serde_json::from_str::<Reply>(&json).expect("parse"), r);
    }
}
