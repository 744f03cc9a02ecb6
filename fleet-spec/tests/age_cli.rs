//! Interoperability of `fleet_spec::age` with the real `age` and `age-keygen` binaries
//! (Debian's `age` package, installed by `scripts/setup.sh`), in both directions.

#![cfg(feature = "age")]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use fleet_spec::age::{self, SecretKey};

fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, Vec<SecretKey>) {
    let path = dir.join(name);
    let out =
        Command::new("age-keygen").arg("-o").arg(&path).output().expect("age-keygen runs (apt install age)");
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let keys = age::parse_identities(&std::fs::read_to_string(&path).expect("key file")).expect("parses");
    (path, keys)
}

fn run(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("age runs");
    // Written from a thread: age writes while it reads, and both pipes are bounded.
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let out = child.wait_with_output().expect("age finishes");
    writer.join().expect("writer thread").expect("write stdin");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn sizes() -> Vec<Vec<u8>> {
    [0usize, 1, 100, 65_535, 65_536, 65_537, 200_000]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7 % 253) as u8).collect())
        .collect()
}

#[test]
fn what_we_encrypt_the_age_cli_decrypts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_path, a) = keygen(dir.path(), "a.txt");
    let (b_path, b) = keygen(dir.path(), "b.txt");
    let recipients = [*a[0].public_bytes(), *b[0].public_bytes()];
    for plain in sizes() {
        let sealed = age::encrypt(&plain, &recipients, &[7; 32]);
        for key in [&a_path, &b_path] {
            let out = run(Command::new("age").arg("-d").arg("-i").arg(key), &sealed);
            assert_eq!(out, plain, "{} bytes with {}", plain.len(), key.display());
        }
    }
}

#[test]
fn what_the_age_cli_encrypts_we_decrypt_binary_and_armored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, a) = keygen(dir.path(), "a.txt");
    let (_, b) = keygen(dir.path(), "b.txt");
    let (_, other) = keygen(dir.path(), "other.txt");
    for plain in sizes() {
        for armor in [false, true] {
            let mut cmd = Command::new("age");
            cmd.arg("-r").arg(a[0].recipient()).arg("-r").arg(b[0].recipient());
            if armor {
                cmd.arg("-a");
            }
            let sealed = run(&mut cmd, &plain);
            assert_eq!(age::decrypt_file(&sealed, &b).expect("b decrypts"), plain, "armor {armor}");
            assert_eq!(age::decrypt_file(&sealed, &a).expect("a decrypts"), plain, "armor {armor}");
            assert_eq!(age::decrypt_file(&sealed, &other), Err(age::AgeError::NoMatchingKey));
            if armor {
                assert!(age::decrypt(&sealed, &a).is_err(), "the device's decrypt takes binary files only");
            }
        }
    }
}

#[test]
fn an_identity_file_with_several_keys_works_with_the_cli_and_with_us() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, old) = keygen(dir.path(), "old.txt");
    let new = SecretKey::from_bytes([42; 32]);
    let both = dir.path().join("both.txt");
    let text = format!("# rotated\n{}\n{}\n", new.to_key_string(), old[0].to_key_string());
    std::fs::write(&both, &text).expect("write");
    let keys = age::parse_identities(&text).expect("parses");
    let sealed = age::encrypt(b"to the old key", &[*old[0].public_bytes()], &[1; 32]);
    assert_eq!(run(Command::new("age").arg("-d").arg("-i").arg(&both), &sealed), b"to the old key");
    assert_eq!(age::decrypt(&sealed, &keys).expect("decrypts"), b"to the old key");
    // age-keygen -y prints the recipient we compute.
    let out = run(Command::new("age-keygen").arg("-y").arg(dir.path().join("old.txt")), b"");
    assert_eq!(String::from_utf8_lossy(&out).trim(), old[0].recipient());
}
