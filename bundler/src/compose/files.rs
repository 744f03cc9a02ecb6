//! Compose `secrets:` and `configs:`: files from the commit, delivered under the app's
//! file root and bind-mounted read-only into the services granted them.
//!
//! - A top-level entry names its bytes with `file:` (relative to the Compose file, inside
//!   the app directory; a config may instead inline them with `content:`). What a device
//!   cannot have (`external:`, `environment:`, `name:`, Swarm drivers) is refused by name.
//! - A file ending in `.age` is a secret encrypted in Git: the caller decrypts it with the
//!   CI's identity (see [`super::SourceFile`]) and it travels sealed to the device. A
//!   secret that is not encrypted is delivered, with a warning.
//! - Each entry some service is granted becomes one managed file at
//!   `<app_root>/.compose/secrets/<name>` or `<app_root>/.compose/configs/<name>`, mounted
//!   read-only at `/run/secrets/<name>` (a relative `target:` is under `/run/secrets/`) or
//!   `/<name>` for a config (or its absolute `target:`). A mounted managed file is part
//!   of the container's hash, so a changed secret recreates the container.
//! - `mode:` (octal) defaults to 0600 for a secret (a secret file on the device is
//!   never readable by other users unless the repository says so) and to 0444 for a
//!   config, as in the Compose specification. `uid:`/`gid:` are numeric and set the
//!   file's owner (the one not given is 0): a container that reads its secret as
//!   another user needs them, or `mode: 0444`.
//!
//! Pure: the caller reads the files from the commit.

use std::collections::BTreeMap;

use fleet_spec::model::{ManagedFile, Mount, MountSource, Owner};

use super::parse::{ComposeFile, Ext, FileDef, FileGrant, ScalarOrMap, Service};
use super::translate::valid_service_name;
use super::{env_file_path, DeliveredFile, Translator};
use crate::yaml::{Pos, Scalar, Spanned, SpannedMap};

/// The default permission bits of a delivered config (the Compose specification's).
pub const DEFAULT_MODE: u32 = 0o444;
/// The default permission bits of a delivered secret: its owner's only, as every secret
/// file the agent writes.
pub const DEFAULT_SECRET_MODE: u32 = 0o600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Secret,
    Config,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::Config => "config",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Secret => "secrets",
            Kind::Config => "configs",
        }
    }
}

/// The device path of secret or config `name` of an app whose files land in `app_root`.
pub(super) fn host_path(app_root: &str, kind: Kind, name: &str) -> String {
    format!("{}/.compose/{}/{name}", app_root.trim_end_matches('/'), kind.key())
}

/// One top-level entry, checked.
#[derive(Debug, Default)]
pub(super) struct Def {
    /// The bytes to deliver; `None` when the entry is broken (already reported).
    content: Option<Vec<u8>>,
    sealed: bool,
}

/// The top-level entries of both kinds, by name.
#[derive(Debug, Default)]
pub(super) struct Defs {
    secrets: BTreeMap<String, Def>,
    configs: BTreeMap<String, Def>,
}

impl Defs {
    fn of(&self, kind: Kind) -> &BTreeMap<String, Def> {
        match kind {
            Kind::Secret => &self.secrets,
            Kind::Config => &self.configs,
        }
    }
}

/// The repository paths of every `file:` of the top-level `secrets:` and `configs:`, for
/// the caller to read (and decrypt, for `.age`). Paths that leave the app directory or
/// use `${VAR}` are left out (the translation names them).
pub fn file_source_paths(file: &ComposeFile, compose_file: &str, app: &str) -> Vec<String> {
    let mut out: Vec<String> = [&file.secrets, &file.configs]
        .into_iter()
        .flat_map(|defs| defs.0.iter())
        .filter_map(|(_, def)| def.value.file.as_ref())
        .filter(|f| !f.value.contains('$'))
        .filter_map(|f| env_file_path(compose_file, app, &f.value))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The device paths whose content `plan` must hide: every secret, and every config whose
/// `file:` is encrypted (`.age`).
pub fn secret_targets(file: &ComposeFile, app_root: &str) -> Vec<String> {
    let secrets = file.secrets.0.iter().map(|(name, _)| host_path(app_root, Kind::Secret, &name.value));
    let configs = file
        .configs
        .0
        .iter()
        .filter(|(_, def)| def.value.file.as_ref().is_some_and(|f| f.value.ends_with(".age")))
        .map(|(name, _)| host_path(app_root, Kind::Config, &name.value));
    secrets.chain(configs).collect()
}

impl Translator<'_, '_> {
    /// Checks the top-level `secrets:` and `configs:`.
    pub(super) fn file_defs(&mut self, file: &ComposeFile) -> Defs {
        Defs {
            secrets: self.defs(Kind::Secret, &file.secrets),
            configs: self.defs(Kind::Config, &file.configs),
        }
    }

    fn defs(&mut self, kind: Kind, defs: &SpannedMap<Spanned<Ext<FileDef>>>) -> BTreeMap<String, Def> {
        let noun = kind.noun();
        let mut out = BTreeMap::new();
        for (key, def) in &defs.0 {
            let name = key.value.as_str();
            let pos = Pos::of(key);
            let d = &def.value;
            let mut checked = Def::default();
            if !valid_service_name(name) {
                self.error(pos, format!("{noun} name `{name}` is invalid: use letters, digits, '.', '_' and '-', starting with a letter or digit (the name is a file name on the device)"));
                out.insert(name.to_string(), checked);
                continue;
            }
            for (refused, at) in d.refused() {
                self.error(at, def_refusal(kind, refused));
            }
            let host = host_path(self.ctx.app_root, kind, name);
            if let Some((source, _)) = self.ctx.file_targets.iter().find(|(_, target)| **target == host) {
                self.error(pos, format!("{noun} `{name}` is delivered to {host}, which the app.yaml file with `source: {source}` also writes: give that file another `target:`"));
            }
            match (kind, &d.file, &d.content) {
                (Kind::Secret, _, Some(c)) => self.error(Pos::of(c), format!("`content:` is not supported for a secret: it would be in the clear in Git; put the secret in a file encrypted with age and name it: `file: ./{name}.age`")),
                (_, Some(f), Some(_)) => self.error(Pos::of(f), format!("{noun} `{name}` sets both `file:` and `content:`: keep one")),
                (_, Some(f), None) => {
                    if let Some((content, sealed)) = self.def_file(kind, name, f) {
                        checked = Def { content: Some(content), sealed };
                    }
                }
                (Kind::Config, None, Some(c)) => {
                    let text = self.s(c);
                    checked = Def { content: Some(text.into_bytes()), sealed: false };
                }
                (_, None, None) if d.refused().is_empty() => {
                    let hint = match kind {
                        Kind::Secret => format!("`file: ./{name}.age` (a file encrypted with age)"),
                        Kind::Config => format!("`file: ./{name}` or `content:`"),
                    };
                    self.error(pos, format!("{noun} `{name}` needs {hint}"));
                }
                (_, None, None) => {}
            }
            out.insert(name.to_string(), checked);
        }
        out
    }

    /// A definition's `file:`: its bytes and whether they were encrypted (`.age`).
    fn def_file(&mut self, kind: Kind, name: &str, f: &Spanned<String>) -> Option<(Vec<u8>, bool)> {
        let (noun, app, written) = (kind.noun(), self.ctx.app, f.value.as_str());
        let pos = Pos::of(f);
        if written.contains('$') {
            self.error(pos, format!("`file: {written}`: the path of a {noun} is not interpolated: name the file as it is in the commit"));
            return None;
        }
        if written.starts_with('/') || written.starts_with('~') {
            self.error(pos, format!("{noun} `{name}`: `file: {written}` is a path on the machine running Compose; the bundler reads the commit: put the file in apps/{app}/ and write a relative path"));
            return None;
        }
        let Some(repo_path) = env_file_path(self.ctx.file, app, written) else {
            self.error(pos, format!("{noun} `{name}`: `file: {written}` leaves the app directory: the file must be inside apps/{app}/"));
            return None;
        };
        let Some(source) = self.ctx.sources.get(&repo_path) else {
            self.error(
                pos,
                format!(
                    "{noun} `{name}`: `file: {written}` does not exist: expected {repo_path} in the commit"
                ),
            );
            return None;
        };
        match &source.content {
            Err(why) => {
                self.error(pos, format!("{noun} `{name}`: {why}"));
                None
            }
            Ok(bytes) => {
                if kind == Kind::Secret && !source.sealed {
                    self.warning(pos, format!("secret `{name}` is not encrypted in Git: anyone who can read the repository reads it; encrypt it with age -r <CI recipient> -o {repo_path}.age {repo_path}, commit the .age file instead and write `file: {written}.age`"));
                }
                Some((bytes.clone(), source.sealed))
            }
        }
    }

    /// Mounts the secrets and configs `svc` is granted (read-only) and records the files
    /// to deliver. `mount_targets` holds the service's other mount points.
    pub(super) fn file_grants(
        &mut self,
        service: &str,
        svc: &Service,
        mount_targets: &mut BTreeMap<String, Pos>,
        mounts: &mut Vec<Mount>,
    ) {
        for (kind, grants) in [(Kind::Secret, &svc.secrets), (Kind::Config, &svc.configs)] {
            for g in grants {
                if let Some(mount) = self.file_grant(service, kind, g) {
                    if let Some(first) = mount_targets.insert(mount.target.clone(), Pos::of(g)) {
                        self.error(
                            Pos::of(g),
                            format!(
                                "{} is already mounted at line {}: the engine refuses duplicate mount points",
                                mount.target, first.line
                            ),
                        );
                        continue;
                    }
                    mounts.push(mount);
                }
            }
        }
    }

    fn file_grant(
        &mut self,
        service: &str,
        kind: Kind,
        g: &Spanned<ScalarOrMap<FileGrant>>,
    ) -> Option<Mount> {
        let pos = Pos::of(g);
        let noun = kind.noun();
        let (name, long) = match &g.value {
            ScalarOrMap::Short(s) => (self.interp(s, pos), None),
            ScalarOrMap::Long(l) => (self.s(&l.source), Some(l)),
        };
        let Some(def) = self.file_defs.of(kind).get(&name) else {
            let defined: Vec<&str> = self.file_defs.of(kind).keys().map(String::as_str).collect();
            let key = kind.key();
            let known = if defined.is_empty() {
                format!(
                    "none is: declare it, e.g. `{key}: {{{name}: {{file: ./{name}{}}}}}`",
                    if kind == Kind::Secret { ".age" } else { "" }
                )
            } else {
                format!("defined: {}", defined.join(", "))
            };
            self.error(pos, format!("{noun} `{name}` is not defined under the top-level `{key}:` ({known})"));
            return None;
        };
        let content = def.content.clone()?; // a broken definition was reported
        let sealed = def.sealed;
        let target = self.grant_target(kind, &name, long.and_then(|l| l.target.as_ref()), pos)?;
        let uid = long.and_then(|l| l.uid.as_ref()).and_then(|v| self.id_number(v, "uid"));
        let gid = long.and_then(|l| l.gid.as_ref()).and_then(|v| self.id_number(v, "gid"));
        let owner =
            (uid.is_some() || gid.is_some()).then(|| Owner { uid: uid.unwrap_or(0), gid: gid.unwrap_or(0) });
        let mode = match long.and_then(|l| l.mode.as_ref()) {
            None if kind == Kind::Secret => DEFAULT_SECRET_MODE,
            None => DEFAULT_MODE,
            Some(m) => self.file_mode(m)?,
        };
        let host = host_path(self.ctx.app_root, kind, &name);
        let file = ManagedFile { path: host.clone(), mode, owner, content };
        match self.delivered.get(&host) {
            Some((first, at, by)) if first.file.mode != mode || first.file.owner != owner => {
                let describe = |mode: u32, owner: Option<Owner>| match owner {
                    Some(o) => format!("mode {mode:04o}, uid {}, gid {}", o.uid, o.gid),
                    None => format!("mode {mode:04o}, the agent's user"),
                };
                let message = format!(
                    "{noun} `{name}` is granted here with {} and to service `{by}` at line {} with {}: it is one file on the device ({host}); give every grant of it the same uid, gid and mode",
                    describe(mode, owner),
                    at.line,
                    describe(first.file.mode, first.file.owner)
                );
                self.error(pos, message);
                return None;
            }
            Some(_) => {}
            None => {
                self.delivered
                    .insert(host.clone(), (DeliveredFile { file, sealed }, pos, service.to_string()));
            }
        }
        Some(Mount { source: MountSource::Bind(host), target, read_only: true })
    }

    /// Where a grant is mounted: a secret at `/run/secrets/<name>` (a relative `target:`
    /// below `/run/secrets/`), a config at `/<name>` (or its absolute `target:`).
    fn grant_target(
        &mut self,
        kind: Kind,
        name: &str,
        target: Option<&Spanned<String>>,
        pos: Pos,
    ) -> Option<String> {
        let (written, at) = match target {
            None => (name.to_string(), pos),
            Some(t) => (self.s(t), Pos::of(t)),
        };
        let full = match kind {
            Kind::Secret if !written.starts_with('/') => format!("/run/secrets/{written}"),
            Kind::Config if !written.starts_with('/') && target.is_some() => {
                self.error(at, format!("config target `{written}` must be an absolute path inside the container, e.g. /etc/{written}"));
                return None;
            }
            Kind::Config if target.is_none() => format!("/{written}"),
            _ => written.clone(),
        };
        match crate::render::normalize_absolute(&full) {
            Some(p) if p != "/" && !p.contains([':', ',']) => Some(p),
            _ => {
                self.error(at, format!("{} target `{written}` must be a file path inside the container without `..`, `:` or `,`", kind.noun()));
                None
            }
        }
    }

    fn id_number(&mut self, v: &Spanned<Scalar>, key: &str) -> Option<u32> {
        let text = self.scalar(v);
        match text.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(Pos::of(v), format!("{key} `{text}` must be a number: the file is written on the device, where user and group names are not looked up"));
                None
            }
        }
    }

    fn file_mode(&mut self, m: &Spanned<Scalar>) -> Option<u32> {
        let text = self.scalar(m);
        match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o7777 => Some(v),
            _ => {
                self.error(
                    Pos::of(m),
                    format!("mode `{text}` is not octal permission bits such as 0440 or \"0400\""),
                );
                None
            }
        }
    }
}

/// The message for a refused key of a top-level secret or config.
fn def_refusal(kind: Kind, key: &str) -> String {
    let noun = kind.noun();
    let fix = match kind {
        Kind::Secret => {
            "put the secret in a file encrypted with age in the app directory and set `file: ./NAME.age`"
        }
        Kind::Config => "put the file in the app directory and set `file:` (or inline it with `content:`)",
    };
    let why = match key {
        "external" => format!(
            "the agent delivers every {noun} from the commit, it looks nothing up on the device; {fix}"
        ),
        "environment" => {
            format!("it reads the environment of the machine running Compose, which is not the device; {fix}")
        }
        "name" => format!("the {noun}'s key is its name"),
        "driver" | "driver_opts" | "template_driver" => {
            format!("Swarm's {noun} stores do not exist on a device; {fix}")
        }
        "labels" => "Swarm's labels on the stored object: drop them".to_string(),
        _ => fix.to_string(),
    };
    format!("`{}.NAME.{key}:` is not supported: {why}", kind.key())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleet_spec::model::{ContainerSpec, Mount, MountSource, Owner};

    use super::super::{parse_file, translate, AppContext, SourceFile, Translated};

    const ROOT: &str = "/srv/fleet/shop";

    fn sources() -> BTreeMap<String, SourceFile> {
        let ok = |bytes: &[u8], sealed| SourceFile { content: Ok(bytes.to_vec()), sealed };
        BTreeMap::from([
            ("apps/shop/secrets/db.age".to_string(), ok(b"s3cret", true)),
            ("apps/shop/db_password.txt".to_string(), ok(b"plain", false)),
            ("apps/shop/conf/app.conf".to_string(), ok(b"listen 80\n", false)),
            (
                "apps/shop/broken.age".to_string(),
                SourceFile {
                    content: Err("apps/shop/broken.age cannot be decrypted with the CI's age identity".into()),
                    sealed: true,
                },
            ),
        ])
    }

    /// Translates `yaml` as app `shop` with the app files `targets` (source → device
    /// path); every diagnostic as `line:column: message`.
    fn run(yaml: &str, targets: &[(&str, &str)]) -> (Translated, Vec<String>) {
        let file = match parse_file("compose.yaml", yaml) {
            Ok(f) => f,
            Err(found) => {
                return (
                    Translated::default(),
                    found.iter().map(|d| format!("{}:{}: {}", d.line, d.column, d.message)).collect(),
                )
            }
        };
        let targets: BTreeMap<String, String> =
            targets.iter().map(|(s, t)| (s.to_string(), t.to_string())).collect();
        let (env_files, sources) = (BTreeMap::new(), sources());
        let ctx = AppContext {
            app: "shop",
            file: "apps/shop/compose.yaml",
            app_root: ROOT,
            file_targets: &targets,
            env_files: &env_files,
            sources: &sources,
        };
        let vars = |name: &str| (name == "WHERE").then(|| "db".to_string());
        let (t, diags) = translate(&file, &ctx, &vars, false);
        (t, diags.iter().map(|d| format!("{}:{}: {}", d.line, d.column, d.message)).collect())
    }

    fn ok(yaml: &str) -> Translated {
        let (t, diags) = run(yaml, &[]);
        assert!(diags.is_empty(), "{diags:#?}");
        t
    }

    fn has(diags: &[String], part: &str) {
        assert!(diags.iter().any(|d| d.contains(part)), "no diagnostic with {part:?} in {diags:#?}");
    }

    fn web(t: &Translated) -> &ContainerSpec {
        t.containers.iter().find(|c| c.service == "web").expect("web")
    }

    fn ro_bind(source: &str, target: &str) -> Mount {
        Mount { source: MountSource::Bind(source.into()), target: target.into(), read_only: true }
    }

    #[test]
    fn short_syntax_mounts_read_only_at_the_defaults_and_delivers_sealed_files() {
        let t = ok("services:
  web:
    image: nginx
    secrets: [db]
    configs: [app]
secrets:
  db: {file: ./secrets/db.age}
configs:
  app:
    file: conf/app.conf
");
        assert_eq!(
            web(&t).mounts,
            [
                ro_bind("/srv/fleet/shop/.compose/secrets/db", "/run/secrets/db"),
                ro_bind("/srv/fleet/shop/.compose/configs/app", "/app"),
            ]
        );
        let files: Vec<(&str, u32, &[u8], bool)> = t
            .files
            .iter()
            .map(|f| (f.file.path.as_str(), f.file.mode, f.file.content.as_slice(), f.sealed))
            .collect();
        assert_eq!(
            files,
            [
                ("/srv/fleet/shop/.compose/configs/app", 0o444, &b"listen 80\n"[..], false),
                ("/srv/fleet/shop/.compose/secrets/db", 0o600, &b"s3cret"[..], true),
            ]
        );
        assert!(t.files.iter().all(|f| f.file.owner.is_none()));
    }

    #[test]
    fn long_syntax_sets_target_owner_and_mode() {
        let t = ok("services:
  web:
    image: nginx
    secrets:
      - source: db
        target: db/password
        uid: '999'
        gid: 998
        mode: 0400
      - {source: db, target: /etc/db.pw, uid: '999', gid: '998', mode: '0400'}
    configs:
      - {source: app, target: /etc/nginx/nginx.conf, mode: 0440, uid: 101}
      - {source: inline}
secrets:
  db: {file: secrets/db.age}
configs:
  app: {file: ./conf/../conf/app.conf}
  inline: {content: \"where=${WHERE}\\n\"}
");
        assert_eq!(
            web(&t).mounts,
            [
                ro_bind("/srv/fleet/shop/.compose/secrets/db", "/run/secrets/db/password"),
                ro_bind("/srv/fleet/shop/.compose/secrets/db", "/etc/db.pw"),
                ro_bind("/srv/fleet/shop/.compose/configs/app", "/etc/nginx/nginx.conf"),
                ro_bind("/srv/fleet/shop/.compose/configs/inline", "/inline"),
            ]
        );
        let by_path: BTreeMap<&str, _> = t.files.iter().map(|f| (f.file.path.as_str(), &f.file)).collect();
        let db = by_path["/srv/fleet/shop/.compose/secrets/db"];
        assert_eq!((db.mode, db.owner), (0o400, Some(Owner { uid: 999, gid: 998 })));
        let app = by_path["/srv/fleet/shop/.compose/configs/app"];
        assert_eq!((app.mode, app.owner), (0o440, Some(Owner { uid: 101, gid: 0 })));
        assert_eq!(by_path["/srv/fleet/shop/.compose/configs/inline"].content, b"where=db\n", "interpolated");
    }

    #[test]
    fn only_granted_entries_are_delivered_once_each() {
        let t = ok("services:
  web: {image: nginx, secrets: [db]}
  worker: {image: busybox, secrets: [db]}
secrets:
  db: {file: secrets/db.age}
  unused: {file: secrets/db.age}
");
        let paths: Vec<&str> = t.files.iter().map(|f| f.file.path.as_str()).collect();
        assert_eq!(paths, ["/srv/fleet/shop/.compose/secrets/db"]);
    }

    #[test]
    fn a_plain_secret_is_delivered_with_a_warning_saying_how_to_encrypt_it() {
        let (t, diags) = run(
            "services:\n  web: {image: nginx, secrets: [pw]}\nsecrets:\n  pw:\n    file: ./db_password.txt\n",
            &[],
        );
        assert_eq!(diags.len(), 1, "{diags:#?}");
        has(&diags, "5:11: secret `pw` is not encrypted in Git: anyone who can read the repository reads it; encrypt it with age -r <CI recipient> -o apps/shop/db_password.txt.age");
        assert_eq!((t.files[0].file.content.as_slice(), t.files[0].sealed), (&b"plain"[..], false));
    }

    #[test]
    fn undefined_names_are_errors_naming_the_defined_ones() {
        let (_, diags) = run(
            "services:
  web:
    image: nginx
    secrets: [dbb, {source: nope}]
    configs: [app]
secrets:
  db: {file: secrets/db.age}
  api: {file: secrets/db.age}
",
            &[],
        );
        has(&diags, "4:15: secret `dbb` is not defined under the top-level `secrets:` (defined: api, db)");
        has(&diags, "4:20: secret `nope` is not defined");
        has(&diags, "5:15: config `app` is not defined under the top-level `configs:` (none is: declare it, e.g. `configs: {app: {file: ./app}}`)");
    }

    #[test]
    fn refused_keys_name_what_is_supported_at_their_line() {
        let (_, diags) = run(
            "services:
  web: {image: nginx}
secrets:
  a: {external: true}
  b: {environment: DB_PW}
  c: {file: secrets/db.age, name: other}
  d: {content: hunter2}
  e: {}
configs:
  f: {driver: vault, file: conf/app.conf}
  g: {file: conf/app.conf, content: x}
",
            &[],
        );
        has(&diags, "4:17: `secrets.NAME.external:` is not supported: the agent delivers every secret from the commit, it looks nothing up on the device; put the secret in a file encrypted with age in the app directory and set `file: ./NAME.age`");
        has(&diags, "5:20: `secrets.NAME.environment:` is not supported: it reads the environment of the machine running Compose");
        has(&diags, "6:35: `secrets.NAME.name:` is not supported");
        has(&diags, "7:16: `content:` is not supported for a secret: it would be in the clear in Git");
        has(&diags, "8:3: secret `e` needs `file: ./e.age`");
        has(&diags, "10:15: `configs.NAME.driver:` is not supported: Swarm's config stores");
        has(&diags, "11:13: config `g` sets both `file:` and `content:`");
        assert_eq!(diags.len(), 7, "{diags:#?}");
    }

    #[test]
    fn an_unknown_key_of_an_entry_lists_only_the_supported_ones() {
        let (_, diags) = run("services:\n  web: {image: nginx}\nsecrets:\n  a: {fiel: x}\n", &[]);
        let message = diags.iter().find(|d| d.contains("fiel")).expect("unknown key");
        assert!(message.contains("did you mean `file`?"), "{message}");
        let allowed = message.split("(allowed keys: ").nth(1).expect("the allowed keys");
        assert!(!allowed.contains("external") && allowed.contains("file"), "{message}");
        let (_, diags) = run("services:\n  web: {image: nginx, secrets: [{source: a, targt: b}]}\n", &[]);
        has(&diags, "unknown key `targt`: did you mean `target`?");
    }

    #[test]
    fn hostile_paths_names_and_targets_are_refused_at_their_place() {
        let (_, diags) = run(
            "services:
  web:
    image: nginx
    secrets:
      - {source: ok, target: ../../etc/shadow}
      - {source: ok, target: /run/secrets/../../etc/x}
      - {source: ok, target: 'a:b'}
    configs:
      - {source: conf, target: etc/app.conf}
secrets:
  up: {file: ../../etc/passwd}
  abs: {file: /etc/passwd}
  home: {file: ~/.ssh/id_ed25519}
  var: {file: './${WHERE}.age'}
  missing: {file: nope.age}
  broken: {file: broken.age}
  ok: {file: secrets/db.age}
  ../escape: {file: secrets/db.age}
  a/b: {file: secrets/db.age}
configs:
  conf: {file: conf/app.conf}
",
            &[],
        );
        has(
            &diags,
            "5:30: secret target `../../etc/shadow` must be a file path inside the container without `..`",
        );
        has(&diags, "6:30: secret target `/run/secrets/../../etc/x` must be");
        has(
            &diags,
            "7:30: secret target `a:b` must be a file path inside the container without `..`, `:` or `,`",
        );
        has(&diags, "9:32: config target `etc/app.conf` must be an absolute path inside the container, e.g. /etc/etc/app.conf");
        has(&diags, "11:14: secret `up`: `file: ../../etc/passwd` leaves the app directory: the file must be inside apps/shop/");
        has(&diags, "12:15: secret `abs`: `file: /etc/passwd` is a path on the machine running Compose");
        has(
            &diags,
            "13:16: secret `home`: `file: ~/.ssh/id_ed25519` is a path on the machine running Compose",
        );
        has(&diags, "14:15: `file: ./${WHERE}.age`: the path of a secret is not interpolated");
        has(&diags, "15:19: secret `missing`: `file: nope.age` does not exist: expected apps/shop/nope.age in the commit");
        has(&diags, "16:18: secret `broken`: apps/shop/broken.age cannot be decrypted");
        has(&diags, "18:3: secret name `../escape` is invalid");
        has(&diags, "19:3: secret name `a/b` is invalid");
        assert_eq!(diags.len(), 12, "{diags:#?}");
    }

    #[test]
    fn the_delivered_file_cannot_collide_with_app_files_or_other_mounts() {
        let (_, diags) = run(
            "services:
  web:
    image: nginx
    volumes: [./conf:/run/secrets/db]
    secrets: [db]
secrets:
  db: {file: secrets/db.age}
",
            &[("conf/x", "/srv/fleet/shop/conf/x"), ("files/db", "/srv/fleet/shop/.compose/secrets/db")],
        );
        has(&diags, "7:3: secret `db` is delivered to /srv/fleet/shop/.compose/secrets/db, which the app.yaml file with `source: files/db` also writes: give that file another `target:`");
        has(&diags, "5:15: /run/secrets/db is already mounted at line 4");
    }

    #[test]
    fn one_secret_granted_with_two_modes_is_an_error() {
        let (_, diags) = run(
            "services:
  web: {image: nginx, secrets: [db]}
  worker:
    image: busybox
    secrets: [{source: db, uid: '1000', mode: 0400}]
secrets:
  db: {file: secrets/db.age}
",
            &[],
        );
        has(&diags, "5:15: secret `db` is granted here with mode 0400, uid 1000, gid 0 and to service `web` at line 2 with mode 0600, the agent's user: it is one file on the device (/srv/fleet/shop/.compose/secrets/db); give every grant of it the same uid, gid and mode");
    }

    #[test]
    fn uid_gid_and_mode_must_be_numbers() {
        let (_, diags) = run(
            "services:
  web:
    image: nginx
    secrets: [{source: db, uid: postgres, gid: -1, mode: rw}]
secrets:
  db: {file: secrets/db.age}
",
            &[],
        );
        has(&diags, "uid `postgres` must be a number: the file is written on the device, where user and group names are not looked up");
        has(&diags, "gid `-1` must be a number");
        has(&diags, "mode `rw` is not octal permission bits");
    }

    #[test]
    fn secret_targets_name_every_secret_and_encrypted_configs() {
        let file = parse_file(
            "compose.yaml",
            "services:\n  web: {image: nginx}\nsecrets:\n  db: {file: a.age}\nconfigs:\n  c: {file: c.age}\n  d: {file: d}\n",
        )
        .expect("parses");
        assert_eq!(
            super::secret_targets(&file, ROOT),
            ["/srv/fleet/shop/.compose/secrets/db", "/srv/fleet/shop/.compose/configs/c"]
        );
        assert_eq!(
            super::file_source_paths(&file, "apps/shop/compose.yaml", "shop"),
            ["apps/shop/a.age", "apps/shop/c.age", "apps/shop/d"]
        );
    }
}
