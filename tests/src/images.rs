//! Container images without a public registry: tiny `FROM scratch` images holding a
//! static busybox (package `busybox-static`) built with `docker build` (legacy builder),
//! and pushing them to a [`crate::Registry`] to get their content digest.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::engine::Engine;
use crate::require_program;

/// The busybox applets linked into [`build_busybox_image`] images (`/bin/<applet>`).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "sleep", "httpd", "cat", "echo", "wget", "test", "true", "false", "ls", "env", "kill", "mkdir",
    "rm", "touch", "date", "printf", "grep", "nc", "ps", "hostname", "nslookup", "id", "head", "tail",
];

fn static_busybox() -> Result<std::path::PathBuf> {
    let path = require_program("busybox")?;
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let needle = b"/ld-linux";
    if bytes.windows(needle.len()).any(|w| w == needle) {
        bail!("{} is dynamically linked: install busybox-static (run scripts/setup.sh)", path.display());
    }
    Ok(path)
}

/// Builds `tag` (e.g. `"127.0.0.1:5000/bb:1"`) on `engine`: `FROM scratch` with
/// `/bin/busybox` and the [`BUSYBOX_APPLETS`] as symlinks, an empty `/tmp`, a
/// `/www/index.html` (containing the tag) and `CMD cmd` (no `CMD` when `cmd` is empty).
/// Returns the image id.
pub fn build_busybox_image(engine: &impl Engine, tag: &str, cmd: &[&str]) -> Result<String> {
    let busybox = static_busybox()?;
    let ctx = tempfile::Builder::new().prefix("fe2e-img").tempdir().context("creating a build context")?;
    let bin = ctx.path().join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(&busybox, bin.join("busybox")).context("copying busybox")?;
    for applet in BUSYBOX_APPLETS {
        symlink("busybox", bin.join(applet))?;
    }
    fs::create_dir_all(ctx.path().join("tmp"))?;
    fs::create_dir_all(ctx.path().join("www"))?;
    fs::write(ctx.path().join("www/index.html"), format!("{tag}\n"))?;
    let mut dockerfile = String::from("FROM scratch\nCOPY bin /bin\nCOPY tmp /tmp\nCOPY www /www\n");
    if !cmd.is_empty() {
        dockerfile.push_str(&format!("CMD {}\n", serde_json::to_string(cmd)?));
    }
    fs::write(ctx.path().join("Dockerfile"), dockerfile)?;
    build_image(engine, tag, ctx.path())
}

/// `docker build -q -t tag context_dir` against `engine`; returns the image id.
pub fn build_image(engine: &impl Engine, tag: &str, context_dir: &Path) -> Result<String> {
    let out = engine
        .docker(&["build", "-q", "-t", tag, &context_dir.to_string_lossy()])
        .with_context(|| format!("building image {tag}"))?;
    parse_image_id(&out).ok_or_else(|| anyhow!("docker build printed no image id: {out}"))
}

/// The image id `docker build -q` printed: `sha256:<hex>` from dockerd, the bare hex from
/// podman's compatible API.
fn parse_image_id(out: &str) -> Option<String> {
    out.lines().map(str::trim).rev().find_map(|l| {
        let hex = l.strip_prefix("sha256:").unwrap_or(l);
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
    })
}

/// `docker push reference` (e.g. `registry.image("bb:1")`) from `engine`; returns the
/// manifest digest (`sha256:...`) the registry reported.
pub fn push_image(engine: &impl Engine, reference: &str) -> Result<String> {
    let out = engine.docker(&["push", reference]).with_context(|| format!("pushing {reference}"))?;
    parse_push_digest(&out)
        .ok_or_else(|| anyhow!("no digest in the output of docker push {reference}:\n{out}"))
}

fn parse_push_digest(out: &str) -> Option<String> {
    out.split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .filter(|d| d.starts_with("sha256:") && d.len() == 71)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_of_both_engines_are_parsed() {
        let hex = "365b1a189acc43fb0bbb96e0469ac5b3961634cf6624207f45be69d72e20ad92";
        assert_eq!(parse_image_id(&format!("sha256:{hex}\n")), Some(format!("sha256:{hex}")));
        assert_eq!(parse_image_id(&format!("{hex}\n")), Some(format!("sha256:{hex}")));
        assert_eq!(parse_image_id("Step 1/3 : FROM scratch\n"), None);
    }

    #[test]
    fn digest_is_parsed_from_push_output() {
        let out = "The push refers to repository [127.0.0.1:15077/bb]\n4b16: Pushed\n1: digest: \
                   sha256:e33c222b440e6c77817df40d5c73506898feb87f551ed41986561ba40be4e6b7 size: 528\n";
        assert_eq!(
            parse_push_digest(out).as_deref(),
            Some("sha256:e33c222b440e6c77817df40d5c73506898feb87f551ed41986561ba40be4e6b7")
        );
        assert_eq!(parse_push_digest("nothing here"), None);
    }
}
