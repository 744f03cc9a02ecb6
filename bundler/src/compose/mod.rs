//! The Compose subset fleet accepts, and its translation to container specs.
//!
//! Accepted service keys: `image`, `container_name`, `command`, `entrypoint`,
//! `environment`, `labels`, `user`, `hostname`, `ports`, `expose`, `volumes`, `tmpfs`,
//! `networks`, `network_mode`, `restart`, `healthcheck`, `depends_on`, `devices`,
//! `cap_add`, `cap_drop`, `privileged`, `stop_signal`, `mem_limit`, `cpus`,
//! `deploy.resources.limits`. Top level: `services`, `networks`, `volumes`, and the
//! obsolete `version` and `name` (ignored). Compose keys the agent cannot apply are
//! refused by name (`build:` above all: devices pull images, CI builds them); anything
//! else is an unknown key.
//!
//! Translation rules (documented in `bundler/README.md`):
//! - container name `<app>-<service>` unless `container_name`;
//! - every service joins `<app>_default` (alias: the service name) unless it lists
//!   networks or sets `network_mode`; named networks are `<app>_<net>`, named volumes
//!   `<app>_<vol>` (unless they set `name:`);
//! - a relative bind source `./P` is the device path `<file_root>/<app>/P`, which is
//!   where the app's file with `source: P` is delivered (or that file's `target` when
//!   it sets one), so a container mounting a managed file restarts when it changes;
//! - `${VAR}` (`${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `$VAR`, `$$`)
//!   is interpolated from the device's variables, then the fleet's; a variable that is
//!   not set is an error.
//!
//! This module is pure: no I/O. Image tags are pinned to digests later, by the caller.

mod interpolate;
mod parse;
mod translate;

use std::collections::{BTreeMap, HashSet};

use fleet_spec::model::{ContainerSpec, NetworkSpec, VolumeSpec};

use crate::diag::Diagnostic;
use crate::yaml::Pos;

pub use interpolate::{interpolate, InterpError};
pub use parse::*;
pub use translate::{normalize_relative, parse_expose, parse_image, parse_port, valid_container_name};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    pub containers: Vec<ContainerSpec>,
    pub networks: Vec<NetworkSpec>,
    pub volumes: Vec<VolumeSpec>,
}

/// Looks a variable up for `${VAR}` interpolation.
pub trait VarLookup {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> VarLookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// What the translation needs to know about the app besides its Compose file.
pub struct AppContext<'a> {
    pub app: &'a str,
    /// Repository path of the Compose file, for diagnostics.
    pub file: &'a str,
    /// `<file_root>/<app>`: where relative bind sources land on the device.
    pub app_root: &'a str,
    /// App files: normalized source path (relative to the app dir) → device target.
    pub file_targets: &'a BTreeMap<String, String>,
}

/// Translates a Compose file. With `lenient`, unset variables interpolate to "" and
/// problems in the values that used them are not reported: that is how a file is
/// checked once for every device. Returns the translation and its diagnostics.
pub fn translate(
    file: &ComposeFile,
    ctx: &AppContext<'_>,
    vars: &dyn VarLookup,
    lenient: bool,
) -> (Translated, Vec<Diagnostic>) {
    let mut t = Translator { ctx, vars, lenient, diags: Vec::new(), tainted: HashSet::new() };
    let out = t.run(file);
    (out, t.diags)
}

pub(super) struct Translator<'a, 'b> {
    ctx: &'a AppContext<'b>,
    vars: &'a dyn VarLookup,
    lenient: bool,
    diags: Vec<Diagnostic>,
    /// Places whose values used a variable that is not set (lenient mode only).
    tainted: HashSet<Pos>,
}

#[cfg(test)]
mod tests {
    use fleet_spec::model::Protocol;

    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "TZ" => Some("Europe/Berlin".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        let v: &dyn VarLookup = &vars;
        assert_eq!(interpolate("TZ=${TZ}", v), Ok("TZ=Europe/Berlin".into()));
        assert_eq!(interpolate("$TZ/x", v), Ok("Europe/Berlin/x".into()));
        assert_eq!(interpolate("$${TZ}", v), Ok("${TZ}".into()));
        assert_eq!(interpolate("${NOPE:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY:-d}", v), Ok("d".into()));
        assert_eq!(interpolate("${EMPTY-d}", v), Ok("".into()));
        assert_eq!(interpolate("${TZ:+set}", v), Ok("set".into()));
        assert_eq!(interpolate("cost $ 5", v), Ok("cost $ 5".into()));
        assert_eq!(interpolate("${NOPE}", v), Err(InterpError::Unset { name: "NOPE".into(), message: None }));
        assert_eq!(
            interpolate("${NOPE:?set NOPE}", v),
            Err(InterpError::Unset { name: "NOPE".into(), message: Some("set NOPE".into()) })
        );
        assert!(matches!(interpolate("${TZ", v), Err(InterpError::Syntax(_))));
    }

    #[test]
    fn short_port_syntax() {
        let p = parse_port("8080:80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port, p[0].protocol), (Some(8080), 80, Protocol::Tcp));
        let p = parse_port("127.0.0.1:5000:5000/udp").expect("valid");
        assert_eq!((p[0].host_ip.as_deref(), p[0].protocol), (Some("127.0.0.1"), Protocol::Udp));
        let p = parse_port("[::1]:53:53").expect("valid");
        assert_eq!(p[0].host_ip.as_deref(), Some("::1"));
        let p = parse_port("3000").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 3000));
        let p = parse_port("127.0.0.1::80").expect("valid");
        assert_eq!((p[0].host_port, p[0].container_port), (None, 80));
        let p = parse_port("8000-8002:9000-9002").expect("valid");
        assert_eq!(
            p.iter().map(|m| (m.host_port, m.container_port)).collect::<Vec<_>>(),
            vec![(Some(8000), 9000), (Some(8001), 9001), (Some(8002), 9002)]
        );
        for bad in ["x", "80:80/sctp", "70000", "8000-8001:80", "::1:80:80"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(normalize_relative("./conf/../files/a.conf").as_deref(), Some("files/a.conf"));
        assert_eq!(normalize_relative(".").as_deref(), Some(""));
        assert_eq!(normalize_relative("../other"), None);
    }
}
