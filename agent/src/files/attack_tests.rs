//! Every input is hostile: a container with its app directory bind-mounted read-write
//! controls everything below an allowed root, and races the agent between each check
//! and the use that follows. Each test drives one such race deterministically through
//! the adapter's test hooks (`hook::install`) and asserts that nothing outside the root
//! changed; the brute-force test races a real thread against many writes and removals.
//! Every test runs with both resolvers: `openat2` and the per-component walk.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fleet_spec::model::{ManagedFile, Owner};

use super::hook::{self, Point};
use super::*;

struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    roots: Vec<PathBuf>,
}

impl Scene {
    /// `root/app/a.conf` (managed), and outside the root a directory holding files with
    /// the same names as the managed ones, plus `victim` and `shadow` (0600, root).
    fn new() -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("app")).expect("mkdir app");
        fs::create_dir_all(&outside).expect("mkdir outside");
        fs::write(root.join("app/a.conf"), b"managed").expect("write a.conf");
        for name in ["a.conf", "new.conf", "victim", "shadow", "f0", "f1", "f2", "f3"] {
            let p = outside.join(name);
            fs::write(&p, format!("outside {name}")).expect("write outside");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod outside");
        }
        let roots = vec![root.clone()];
        Scene { _dir: dir, root, outside, roots }
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root.display())
    }
}

fn file(path: &str, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> ManagedFile {
    ManagedFile {
        path: path.into(),
        mode,
        owner: owner.map(|(uid, gid)| Owner { uid, gid }),
        content: content.to_vec(),
    }
}

/// Everything observable about a directory tree, without following symlinks.
type Snapshot = BTreeMap<PathBuf, (String, Vec<u8>, u32, u32, u32)>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let p = entry.expect("entry").path();
            let m = fs::symlink_metadata(&p).expect("lstat");
            let (kind, content) = if m.file_type().is_symlink() {
                ("symlink", fs::read_link(&p).expect("readlink").into_os_string().into_encoded_bytes())
            } else if m.is_dir() {
                todo.push(p.clone());
                ("dir", Vec::new())
            } else if m.is_file() {
                ("file", fs::read(&p).expect("read"))
            } else {
                ("other", Vec::new())
            };
            out.insert(p, (kind.to_string(), content, m.mode(), m.uid(), m.gid()));
        }
    }
    out
}

/// The attacker's step: the directory becomes a symlink to `to` (the real one is kept
/// aside as `<dir>.real`).
fn swap_dir_for_symlink(dir: &Path, to: &Path) {
    let aside = dir.with_extension("real");
    fs::rename(dir, &aside).expect("move the real directory aside");
    symlink(to, dir).expect("plant the symlink");
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .expect("mkfifo");
}

/// Runs `f` on a thread of its own (the hook is per thread, so `f` installs it) and
/// fails the test if it does not finish in time instead of hanging the test suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what}: blocked for 10 s"))
}

/// Runs a test body once per resolver: `openat2`, then the per-component walk.
fn both(test: impl Fn(&str)) {
    for walk in [false, true] {
        let _forced = hook::force_walk(walk);
        test(if walk { "walk" } else { "openat2" });
    }
}

#[test]
fn parent_dir_swapped_for_symlink_between_resolve_and_write_writes_nothing_outside() {
    both(|how| {
        for point in [Point::AfterResolve, Point::BeforeTempOpen, Point::BeforeChmod, Point::BeforeRename] {
            let s = Scene::new();
            let before = snapshot(&s.outside);
            let (app, outside) = (s.root.join("app"), s.outside.clone());
            let mut done = false;
            let _hook = hook::install(move |p, _| {
                if p == point && !done {
                    done = true;
                    swap_dir_for_symlink(&app, &outside);
                }
            });
            let _ = write_managed(&file(&s.path("app/new.conf"), b"evil", 0o644, None), &s.roots);
            assert_eq!(snapshot(&s.outside), before, "{how}, swap at {point:?}: nothing outside changed");
        }
    });
}

#[test]
fn parent_dir_swapped_for_symlink_before_unlink_removes_nothing_outside() {
    both(|how| {
        for point in [Point::AfterResolve, Point::BeforeUnlink] {
            let s = Scene::new();
            let before = snapshot(&s.outside);
            let (app, outside) = (s.root.join("app"), s.outside.clone());
            let mut done = false;
            let _hook = hook::install(move |p, _| {
                if p == point && !done {
                    done = true;
                    swap_dir_for_symlink(&app, &outside);
                }
            });
            let _ = remove_managed(&s.path("app/a.conf"), &s.roots);
            assert_eq!(snapshot(&s.outside), before, "{how}, swap at {point:?}: nothing outside removed");
        }
    });
}

#[test]
fn symlink_renamed_over_temp_file_leaves_outside_mode_and_owner() {
    both(|how| {
        let s = Scene::new();
        let before = snapshot(&s.outside);
        let shadow = s.outside.join("shadow");
        let _hook = hook::install(move |p, tmp| {
            if p == Point::BeforeChmod {
                let link = tmp.with_file_name(".attacker-link");
                symlink(&shadow, &link).expect("symlink");
                fs::rename(&link, tmp).expect("rename the symlink over the temp file");
            }
        });
        let target = s.path("app/new.conf");
        let result = write_managed(&file(&target, b"x", 0o4755, Some((4242, 4242))), &s.roots);
        assert_eq!(snapshot(&s.outside), before, "{how}: outside mode and owner unchanged");
        assert!(matches!(result, Err(FileError::TempReplaced { .. })), "{how}: reported: {result:?}");
        if let Ok(m) = fs::symlink_metadata(&target) {
            assert!(!m.file_type().is_symlink(), "{how}: the attacker's symlink was not put in place");
        }
    });
}

#[test]
fn fifo_planted_at_temp_name_does_not_hang() {
    both(|how| {
        let s = Scene::new();
        let target = s.path("app/new.conf");
        let roots = s.roots.clone();
        let walk = how == "walk";
        let result = within(how, move || {
            let _forced = hook::force_walk(walk);
            let mut planted = false;
            let _hook = hook::install(move |p, tmp| {
                if p == Point::BeforeTempOpen && !planted {
                    planted = true;
                    // The name an attacker would predict, and the one about to be used
                    // (as if it had been guessed).
                    let predicted = tmp.with_file_name(format!(".new.conf.fleet-tmp.{}", std::process::id()));
                    mkfifo(&predicted);
                    if tmp != predicted {
                        mkfifo(tmp);
                    }
                }
            });
            write_managed(&file(&target, b"content", 0o644, None), &roots).map(|_| ())
        });
        result.unwrap_or_else(|e| panic!("{how}: write failed: {e}"));
        assert_eq!(fs::read(s.root.join("app/new.conf")).expect("read"), b"content", "{how}");
    });
}

#[test]
fn symlink_at_managed_path_is_replaced_and_target_untouched() {
    both(|how| {
        let s = Scene::new();
        let before = snapshot(&s.outside);
        let link = s.root.join("app/a.conf");
        fs::remove_file(&link).expect("rm");
        symlink(s.outside.join("victim"), &link).expect("symlink");
        let path = s.path("app/a.conf");
        resolve(&path, &s.roots, false).unwrap_or_else(|e| panic!("{how}: preflight refused: {e}"));
        let seen = observe(&path, &s.roots).expect("observe").expect("something is there");
        let wanted = file(&path, b"managed again", 0o644, None);
        assert_ne!(seen.sha256, wanted.content_sha256(), "{how}: a symlink reads as drift");
        write_managed(&wanted, &s.roots).unwrap_or_else(|e| panic!("{how}: write refused: {e}"));
        let m = fs::symlink_metadata(&link).expect("lstat");
        assert!(m.is_file(), "{how}: the symlink was replaced by a regular file");
        assert_eq!(fs::read(&link).expect("read"), b"managed again");
        assert_eq!(snapshot(&s.outside), before, "{how}: the symlink's target is untouched");
        // And removal removes the link, never its target.
        fs::remove_file(&link).expect("rm");
        symlink(s.outside.join("victim"), &link).expect("symlink");
        remove_managed(&path, &s.roots).expect("remove");
        assert!(fs::symlink_metadata(&link).is_err(), "{how}: the link is gone");
        assert_eq!(snapshot(&s.outside), before, "{how}: the link's target is untouched");
    });
}

#[test]
fn symlinked_directory_inside_the_root_is_refused_not_followed() {
    both(|how| {
        let s = Scene::new();
        fs::create_dir_all(s.root.join("real")).expect("mkdir");
        symlink(s.root.join("real"), s.root.join("alias")).expect("symlink");
        let path = s.path("alias/ok");
        for err in [
            resolve(&path, &s.roots, false).expect_err("preflight"),
            write_managed(&file(&path, b"y", 0o644, None), &s.roots).expect_err("write"),
            observe(&path, &s.roots).expect_err("observe"),
            remove_managed(&path, &s.roots).expect_err("remove"),
        ] {
            assert!(matches!(err, FileError::Policy(PathError::SymlinkEscape { .. })), "{how}: {err}");
            assert_eq!(err.code(), "symlink_escape", "{how}");
        }
        assert!(!s.root.join("real/ok").exists(), "{how}: nothing written through the alias");
    });
}

#[test]
fn fifo_swapped_in_before_read_does_not_hang() {
    both(|how| {
        let s = Scene::new();
        let path = s.path("app/a.conf");
        let roots = s.roots.clone();
        let walk = how == "walk";
        let seen = within(how, move || {
            let _forced = hook::force_walk(walk);
            let _hook = hook::install(|p, target| {
                if p == Point::BeforeRead {
                    fs::remove_file(target).expect("rm");
                    mkfifo(target);
                }
            });
            observe(&path, &roots).map_err(|e| e.to_string())
        });
        assert_eq!(seen.expect("observe"), None, "{how}: a FIFO is not a managed file's content");
    });
}

#[test]
fn symlink_swapped_in_before_read_is_not_followed() {
    both(|how| {
        let s = Scene::new();
        let secret = s.outside.join("shadow");
        let secret_sha = hex::encode(Sha256::digest(fs::read(&secret).expect("read")));
        let _hook = hook::install(move |p, target| {
            if p == Point::BeforeRead {
                fs::remove_file(target).expect("rm");
                symlink(&secret, target).expect("symlink");
            }
        });
        let seen = observe(&s.path("app/a.conf"), &s.roots);
        if let Ok(Some(seen)) = seen {
            assert_ne!(seen.sha256, secret_sha, "{how}: the file outside was never read");
        }
    });
}

#[test]
fn setuid_mode_survives_the_owner_change() {
    both(|how| {
        let s = Scene::new();
        let path = s.path("app/tool");
        write_managed(&file(&path, b"#!/bin/sh\n", 0o4755, Some((4242, 4243))), &s.roots).expect("write");
        let m = fs::symlink_metadata(&path).expect("stat");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 4242, 4243), "{how}");
    });
}

/// A thread swaps the app directory for a symlink to the outside directory and back,
/// and plants symlinks to outside files at the managed names, as fast as it can for
/// ~2.5 s, while the agent writes (with an owner and a mode) and removes files there.
#[test]
fn racing_symlink_swaps_never_change_anything_outside() {
    both(|how| {
        let s = Scene::new();
        let before = snapshot(&s.outside);
        let stop = Arc::new(AtomicBool::new(false));
        let swapped = Arc::new(AtomicU64::new(0));
        let attacker = {
            let (app, outside, stop, swapped) =
                (s.root.join("app"), s.outside.clone(), stop.clone(), swapped.clone());
            std::thread::spawn(move || {
                let aside = app.with_extension("real");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    swapped.store(i, Ordering::Relaxed);
                    if fs::rename(&app, &aside).is_ok() {
                        let _ = symlink(&outside, &app);
                        std::thread::yield_now();
                        let _ = fs::remove_file(&app);
                        let _ = fs::rename(&aside, &app);
                    }
                    let name = format!("f{}", i % 4);
                    let link = app.join(format!(".l{name}"));
                    let _ = symlink(outside.join(&name), &link);
                    let _ = fs::rename(&link, app.join(&name));
                    // The temp files the agent is creating right now: replace them too.
                    if let Ok(rd) = fs::read_dir(&app) {
                        for e in rd.flatten() {
                            if e.file_name().to_string_lossy().contains("fleet-tmp") {
                                let l = app.join(".ltmp");
                                let _ = symlink(outside.join("shadow"), &l);
                                let _ = fs::rename(&l, e.path());
                            }
                        }
                    }
                }
                i
            })
        };
        // At least 1.2 s, and on a loaded machine on until both sides did enough work
        // (bounded: the counts are checked below).
        let start = Instant::now();
        let mut ops = 0u32;
        let enough = |ops: u32| ops > 100 && swapped.load(Ordering::Relaxed) > 100;
        while start.elapsed() < Duration::from_millis(1200)
            || (!enough(ops) && start.elapsed() < Duration::from_secs(20))
        {
            for n in 0..4 {
                let path = s.path(&format!("app/f{n}"));
                let _ = write_managed(&file(&path, b"agent", 0o4755, Some((4242, 4242))), &s.roots);
                let _ = observe(&path, &s.roots);
                let _ = remove_managed(&path, &s.roots);
                ops += 3;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = attacker.join().expect("attacker");
        assert!(ops > 100 && swaps > 100, "{how}: the race ran ({ops} operations, {swaps} swaps)");
        assert_eq!(snapshot(&s.outside), before, "{how}: nothing outside the root ever changed");
    });
}
