//! The filesystem boundary against a real attacker: a container on a real `dockerd`
//! (started by the fleet-e2e harness) with the app directory bind-mounted read-write,
//! the usual Compose pattern, racing the agent's file adapter through that bind mount.
//!
//! The container loops as fast as busybox can: it swaps the managed directory for a
//! symlink to a directory outside the allowed root and back, renames symlinks to outside
//! files over the managed names, and plants FIFOs at managed names. Meanwhile the agent
//! writes (with an owner and a setuid mode), observes and removes files there, for a few
//! seconds. Nothing outside the root may ever change, and no call may block.
//!
//! Needs root and the packages of `scripts/setup.sh` (`docker.io`, `busybox-static`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_agent::files;
use fleet_e2e::{build_busybox_image, wait_until, Dockerd};
use fleet_spec::model::{ManagedFile, Owner};

type Snapshot = BTreeMap<PathBuf, (bool, Vec<u8>, u32, u32, u32)>;

/// Everything observable about the files of `dir`, without following symlinks.
fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("read_dir") {
        let p = entry.expect("entry").path();
        let m = fs::symlink_metadata(&p).expect("lstat");
        let content = if m.is_file() { fs::read(&p).expect("read") } else { Vec::new() };
        out.insert(p, (m.is_file(), content, m.mode(), m.uid(), m.gid()));
    }
    out
}

const ATTACK: &str = r#"
i=0
while :; do
  i=$((i+1))
  if busybox mv /app/d /app/d.real 2>/dev/null; then
    busybox ln -s "$OUT" /app/d
    busybox rm -f /app/d
    busybox mv /app/d.real /app/d
  fi
  n=$((i % 4))
  busybox ln -sf "$OUT/f$n" /app/d/.l$n 2>/dev/null && busybox mv -f /app/d/.l$n /app/d/f$n 2>/dev/null
  busybox ln -sf "$OUT/shadow" /app/d/.ls 2>/dev/null
  for t in /app/d/.f*.fleet-tmp.*; do busybox mv -f /app/d/.ls "$t" 2>/dev/null; done
  if [ $((i % 7)) -eq 0 ]; then busybox rm -f /app/d/f$n; busybox mkfifo /app/d/f$n 2>/dev/null; fi
  echo $i > /app/count
done
"#;

#[test]
fn container_racing_its_bind_mount_never_makes_the_agent_touch_anything_outside() {
    let dockerd = Dockerd::start().expect("dockerd starts");
    build_busybox_image(&dockerd, "fleet-files-attack:1", &[]).expect("busybox image");

    let t = tempfile::Builder::new().prefix("ffa").tempdir_in("/tmp").expect("temp dir");
    let root = t.path().join("root");
    let app = root.join("app");
    let outside = t.path().join("outside");
    fs::create_dir_all(app.join("d")).expect("mkdir app/d");
    fs::create_dir_all(&outside).expect("mkdir outside");
    for name in ["f0", "f1", "f2", "f3", "shadow"] {
        let p = outside.join(name);
        fs::write(&p, format!("outside {name}")).expect("write outside");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod outside");
    }
    let before = snapshot(&outside);
    let roots = vec![root.clone()];

    let mount = format!("{}:/app", app.display());
    let env = format!("OUT={}", outside.display());
    dockerd
        .docker(&[
            "run",
            "-d",
            "--name",
            "attacker",
            "-v",
            &mount,
            "-e",
            &env,
            "fleet-files-attack:1",
            "/bin/sh",
            "-c",
            ATTACK,
        ])
        .expect("the attacker container starts");
    // The attacker rewrites `count` all the time: a read can land between its truncate and
    // its write (an empty file), so a read that does not parse is tried again.
    let count = |app: &Path| -> u64 {
        (0..100)
            .find_map(|_| {
                let n = fs::read_to_string(app.join("count")).ok().and_then(|s| s.trim().parse().ok());
                if n.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                n
            })
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), "the attacker to loop", || Ok(count(&app) > 10))
        .expect("the attacker loops");

    let start_count = count(&app);
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut ops, mut failed) = (0u32, 0u32);
    while Instant::now() < deadline {
        for n in 0..4 {
            let path = format!("{}/d/f{n}", app.display());
            let file = ManagedFile {
                path: path.clone(),
                mode: 0o4755,
                owner: Some(Owner { uid: 4242, gid: 4242 }),
                content: b"agent".to_vec(),
            };
            let started = Instant::now();
            failed += u32::from(files::write_managed(&file, &roots).is_err());
            failed += u32::from(files::observe(&path, &roots).is_err());
            failed += u32::from(files::remove_managed(&path, &roots).is_err());
            ops += 3;
            assert!(started.elapsed() < Duration::from_secs(5), "no call blocks (FIFOs at managed names)");
        }
    }
    let swaps = count(&app).saturating_sub(start_count);
    let _ = dockerd.docker(&["rm", "-f", "attacker"]);
    eprintln!("{ops} agent operations ({failed} refused or failed) against {swaps} attacker rounds");
    assert!(swaps > 20, "the attacker raced the agent ({swaps} rounds)");
    assert!(ops > 100, "the agent ran ({ops} operations)");
    assert_eq!(snapshot(&outside), before, "nothing outside the root ever changed");
}
