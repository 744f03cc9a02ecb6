//! Translation of a parsed Compose file into container, network and volume specs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fleet_spec::model::{
    BlkioConfig, ContainerOptions, ContainerSpec, Dependency, DependencyCondition, DeviceMapping, GpuRequest,
    Healthcheck, Hook, ImageRef, IpamPool, LogConfig, Mount, MountSource, NetworkAttachment, NetworkSpec,
    PortMapping, Protocol, PullPolicy, RestartPolicy, StaticAddresses, Ulimit, VolumeSpec,
};

use super::dotenv::parse_env_file;
use super::interpolate::{interpolate, InterpError};
use super::parse::{
    refusal, BlkioDef, ComposeFile, Ext, GpusDef, HealthcheckDef, HookDef, IpamDef, LoggingDef, PortLong,
    ScalarOrMap, Service, VolumeLong,
};
use super::{env_file_path, Translated, Translator};
use crate::diag::Diagnostic;
use crate::duration::{parse_bytes, parse_duration_ms, parse_nano_cpus};
use crate::yaml::{ListOrMap, Pos, Scalar, Spanned, StringOrList};

/// Container names Docker accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn valid_container_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..].iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(super) fn valid_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Translator<'_, '_> {
    /// Reports an error at `pos`, unless the value there used a variable that is not set
    /// (that was reported, or is not an error in lenient mode): a second message about
    /// the empty value would only hide the first.
    pub(super) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        if self.tainted.contains(&pos) {
            return;
        }
        self.diags.push(Diagnostic::error(self.ctx.file, pos.line, pos.column, message));
    }

    pub(super) fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::warning(self.ctx.file, pos.line, pos.column, message));
    }

    /// Interpolates `${VAR}` forms in `text`, found at `pos`.
    pub(super) fn interp(&mut self, text: &str, pos: Pos) -> String {
        if !text.contains('$') {
            return text.to_string();
        }
        match interpolate(text, self.vars) {
            Ok(s) => s,
            Err(InterpError::Unset { name, message }) => {
                if !self.lenient {
                    let msg = match message {
                        Some(m) => format!("variable `{name}` is not set: {m}"),
                        None => format!(
                            "variable `{name}` is not set for this device: add it under `vars:` in the device file or fleet.yaml, or write ${{{name}:-default}}"
                        ),
                    };
                    self.error(pos, msg);
                }
                self.tainted.insert(pos);
                String::new()
            }
            Err(InterpError::Syntax(msg)) => {
                self.error(pos, msg);
                String::new()
            }
        }
    }

    pub(super) fn s(&mut self, v: &Spanned<String>) -> String {
        self.interp(&v.value, Pos::of(v))
    }

    pub(super) fn scalar(&mut self, v: &Spanned<Scalar>) -> String {
        self.interp(&v.value.0, Pos::of(v))
    }

    pub(super) fn run(&mut self, file: &ComposeFile) -> Translated {
        let app = self.ctx.app;
        self.file_defs = self.file_defs(file);

        // Top-level networks.
        let mut networks: BTreeMap<String, NetworkSpec> = BTreeMap::new();
        let mut network_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, def) in &file.networks.0 {
            let name = match def.as_ref().and_then(|d| d.value.name.as_ref()) {
                Some(n) => self.s(n),
                None => format!("{app}_{}", key.value),
            };
            let mut spec = NetworkSpec { name: name.clone(), ..Default::default() };
            if let Some(def) = def {
                let d = &def.value;
                if let Some(driver) = &d.driver {
                    if driver.value != "bridge" {
                        self.error(Pos::of(driver), format!("network driver `{}` is not supported: devices use single-host `bridge` networks", driver.value));
                    }
                }
                if let Some(x) = &d.external {
                    self.error(Pos::of(x), "`external:` networks are not supported: the agent creates and owns every network of an app");
                }
                if let Some(ipam) = &d.ipam {
                    spec.options.ipam = self.ipam(ipam);
                }
                spec.options.enable_ipv6 = d.enable_ipv6.unwrap_or(false);
                if let Some(opts) = &d.driver_opts {
                    spec.options.driver_opts = self.key_values(opts, "driver option", true);
                }
                spec.internal = d.internal;
                if let Some(labels) = &d.labels {
                    spec.labels = self.key_values(labels, "label", false);
                }
            }
            network_names.insert(key.value.clone(), name.clone());
            networks.insert(name, spec);
        }
        let default_network =
            network_names.get("default").cloned().unwrap_or_else(|| format!("{app}_default"));
        self.pools = networks.iter().map(|(name, n)| (name.clone(), n.options.ipam.clone())).collect();

        // Top-level volumes.
        let mut volumes: BTreeMap<String, VolumeSpec> = BTreeMap::new();
        let mut volume_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, def) in &file.volumes.0 {
            let name = match def.as_ref().and_then(|d| d.value.name.as_ref()) {
                Some(n) => self.s(n),
                None => format!("{app}_{}", key.value),
            };
            let mut spec = VolumeSpec { name: name.clone(), ..Default::default() };
            if let Some(def) = def {
                let d = &def.value;
                if let Some(driver) = &d.driver {
                    if driver.value != "local" {
                        self.error(
                            Pos::of(driver),
                            format!(
                                "volume driver `{}` is not supported: devices use `local` volumes",
                                driver.value
                            ),
                        );
                    }
                }
                if let Some(x) = &d.external {
                    self.error(Pos::of(x), "`external:` volumes are not supported: the agent creates and owns every volume of an app");
                }
                if let Some(x) = &d.driver_opts {
                    self.error(Pos::of(x), "volume `driver_opts:` is not supported");
                }
                if let Some(labels) = &d.labels {
                    spec.labels = self.key_values(labels, "label", false);
                }
            }
            volume_names.insert(key.value.clone(), name.clone());
            volumes.insert(name, spec);
        }

        // Service name → container name, for depends_on and network_mode: service:x.
        let mut container_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let name = match &svc.value.container_name {
                Some(n) => self.s(n),
                None => format!("{app}-{}", key.value),
            };
            container_names.insert(key.value.clone(), name);
        }

        if file.services.0.is_empty() {
            self.error(Pos::default(), "`services:` is empty: declare at least one service");
        }
        let mut containers = Vec::new();
        let mut default_used = false;
        let mut seen_names: BTreeMap<String, Pos> = BTreeMap::new();
        let active = self.active_profiles();
        let mut disabled: BTreeMap<&str, String> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let service = key.value.as_str();
            let pos = Pos::of(key);
            if !valid_service_name(service) {
                self.error(pos, format!("service name `{service}` is invalid: use letters, digits, '.', '_' and '-', starting with a letter or digit"));
            }
            for p in &svc.value.profiles {
                if !valid_service_name(&p.value) {
                    self.error(
                        Pos::of(p),
                        format!(
                            "profile name `{}` is invalid: use letters, digits, '.', '_' and '-'",
                            p.value
                        ),
                    );
                }
            }
            // The check for every device (lenient) translates every service.
            let profiles: Vec<&str> = svc.value.profiles.iter().map(|p| p.value.as_str()).collect();
            if !self.lenient
                && !profiles.is_empty()
                && !profiles.iter().any(|p| active.contains(*p) || active.contains("*"))
            {
                disabled.insert(service, profiles.join(", "));
                continue;
            }
            let Some(spec) = self.service(
                service,
                &svc.value,
                pos,
                &container_names,
                &network_names,
                &volume_names,
                &default_network,
                &mut volumes,
            ) else {
                continue;
            };
            if let Some(first) = seen_names.insert(spec.name.clone(), pos) {
                self.error(pos, format!("container name `{}` is also used by the service at line {}: container names must be unique", spec.name, first.line));
            }
            default_used |= spec.networks.iter().any(|n| n.network == default_network);
            containers.push(spec);
        }
        if default_used && !networks.contains_key(&default_network) {
            networks
                .insert(default_network.clone(), NetworkSpec { name: default_network, ..Default::default() });
        }
        for (key, svc) in &file.services.0 {
            if disabled.contains_key(key.value.as_str()) {
                continue;
            }
            for (dep, _) in svc.value.depends_on.iter().flat_map(|d| d.0.iter()) {
                if let Some(profiles) = disabled.get(dep.value.as_str()) {
                    self.error(Pos::of(dep), format!("`{}` depends on `{}`, whose profiles ({profiles}) are not enabled on this device: add one to the device variable COMPOSE_PROFILES", key.value, dep.value));
                }
            }
        }
        self.check_cycles(file, &container_names);
        Translated {
            containers,
            networks: networks.into_values().collect(),
            volumes: volumes.into_values().collect(),
            files: std::mem::take(&mut self.delivered).into_values().map(|(f, ..)| f).collect(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn service(
        &mut self,
        service: &str,
        svc: &Service,
        pos: Pos,
        container_names: &BTreeMap<String, String>,
        network_names: &BTreeMap<String, String>,
        volume_names: &BTreeMap<String, String>,
        default_network: &str,
        volumes: &mut BTreeMap<String, VolumeSpec>,
    ) -> Option<ContainerSpec> {
        let app = self.ctx.app;
        let mut refused = svc.refused();
        if let Some(r) =
            svc.deploy.as_ref().and_then(|d| d.value.resources.as_ref()).and_then(|r| r.reservations.as_ref())
        {
            refused.push(("deploy.resources.reservations", Pos::of(r)));
        }
        if let Some(deploy) = &svc.deploy {
            refused.extend(deploy.value.refused());
            if let Some(r) = deploy.value.replicas.as_ref().filter(|r| r.value != 1) {
                self.error(Pos::of(r), format!("`deploy.replicas: {}` is not supported: a device runs one container per service (use `profiles:` to run a service on some devices only)", r.value));
            }
        }
        for (key, at) in &refused {
            self.error(*at, refusal(key));
        }
        let image = match &svc.image {
            Some(image) => {
                let text = self.s(image);
                let text = text.trim();
                if (text.is_empty() || text.contains(char::is_whitespace))
                    && !self.tainted.contains(&Pos::of(image))
                {
                    self.error(Pos::of(image), format!("image `{text}` is not a valid image reference"));
                }
                parse_image(text)
            }
            None => {
                if svc.build.is_none() {
                    self.error(
                        pos,
                        format!("service `{service}` has no `image:`: every service runs a prebuilt image"),
                    );
                }
                return None;
            }
        };
        let name = container_names.get(service).cloned().unwrap_or_default();
        if !valid_container_name(&name) {
            let at = svc.container_name.as_ref().map(Pos::of).unwrap_or(pos);
            self.error(
                at,
                format!("container name `{name}` is invalid: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]+"),
            );
        }
        let mut spec = ContainerSpec {
            name,
            app: app.to_string(),
            service: service.to_string(),
            image,
            restart: RestartPolicy::No,
            privileged: svc.privileged.unwrap_or(false),
            ..Default::default()
        };
        spec.command = svc.command.as_ref().map(|c| self.words(c));
        spec.entrypoint = svc.entrypoint.as_ref().map(|c| self.words(c));
        spec.env = self.env_files(svc);
        if let Some(env) = &svc.environment {
            spec.env.extend(self.key_values(env, "environment variable", true));
        }
        spec.labels = self.label_files(svc);
        if let Some(labels) = &svc.labels {
            spec.labels.extend(self.key_values(labels, "label", false));
        }
        spec.user = svc.user.as_ref().map(|u| self.scalar(u));
        spec.hostname = svc.hostname.as_ref().map(|h| self.s(h));
        for port in &svc.ports {
            let mut mapped = self.port(port);
            spec.ports.append(&mut mapped);
        }
        for e in &svc.expose {
            let text = self.scalar(e);
            match parse_expose(&text) {
                Ok(mut list) => spec.expose.append(&mut list),
                Err(msg) => self.error(Pos::of(e), msg),
            }
        }
        let mut mount_targets: BTreeMap<String, Pos> = BTreeMap::new();
        for v in &svc.volumes {
            if let Some(m) = self.volume(service, v, volume_names, volumes) {
                let target = m.target.trim_end_matches('/').to_string();
                if let Some(first) = mount_targets.insert(target.clone(), Pos::of(v)) {
                    self.error(Pos::of(v), format!("{target} is already mounted at line {}: the engine refuses duplicate mount points", first.line));
                }
                spec.mounts.push(m);
            }
        }
        self.file_grants(service, svc, &mut mount_targets, &mut spec.mounts);
        if let Some(tmpfs) = &svc.tmpfs {
            for target in self.words_plain(tmpfs) {
                let target = target.split(':').next().unwrap_or_default().to_string();
                if !target.starts_with('/') {
                    self.error(Pos::of(tmpfs), format!("tmpfs target `{target}` must be an absolute path"));
                }
                spec.mounts.push(Mount { source: MountSource::Tmpfs, target, read_only: false });
            }
        }
        // Networks.
        if let Some(mode) = &svc.network_mode {
            let text = self.s(mode);
            let resolved = if let Some(other) = text.strip_prefix("service:") {
                match container_names.get(other) {
                    Some(c) => format!("container:{c}"),
                    None => {
                        self.error(
                            Pos::of(mode),
                            format!("network_mode `{text}` names no service of this app"),
                        );
                        text.clone()
                    }
                }
            } else if matches!(text.as_str(), "host" | "none" | "bridge") || text.starts_with("container:") {
                text.clone()
            } else {
                self.error(Pos::of(mode), format!("network_mode `{text}` is not supported: use host, none, bridge, service:<name> or container:<name>"));
                text.clone()
            };
            if let Some(nets) = &svc.networks {
                if let Some((first, _)) = nets.0.first() {
                    self.error(Pos::of(first), "`networks:` cannot be combined with `network_mode:`");
                }
            }
            spec.network_mode = Some(resolved);
        } else {
            match &svc.networks {
                None => spec.networks.push(NetworkAttachment {
                    network: default_network.to_string(),
                    aliases: vec![service.to_string()],
                }),
                Some(nets) => {
                    let mut attached = Vec::new();
                    for (net, settings) in &nets.0 {
                        let engine_name = if net.value == "default" {
                            default_network.to_string()
                        } else {
                            match network_names.get(&net.value) {
                                Some(n) => n.clone(),
                                None => {
                                    self.error(
                                        Pos::of(net),
                                        format!(
                                            "network `{}` is not declared under the top-level `networks:`",
                                            net.value
                                        ),
                                    );
                                    continue;
                                }
                            }
                        };
                        let mut aliases = vec![service.to_string()];
                        let mut priority = 0;
                        if let Some(settings) = settings {
                            for a in &settings.aliases {
                                let alias = self.s(a);
                                if !aliases.contains(&alias) {
                                    aliases.push(alias);
                                }
                            }
                            let pools = self.pools.get(&engine_name).cloned().unwrap_or_default();
                            let ipv4 = settings.ipv4_address.as_ref().and_then(|v| {
                                self.static_address(v, "ipv4_address", true, &net.value, &pools)
                            });
                            let ipv6 = settings.ipv6_address.as_ref().and_then(|v| {
                                self.static_address(v, "ipv6_address", false, &net.value, &pools)
                            });
                            if ipv4.is_some() || ipv6.is_some() {
                                spec.options
                                    .addresses
                                    .insert(engine_name.clone(), StaticAddresses { ipv4, ipv6 });
                            }
                            if let Some(p) = &settings.priority {
                                let text = self.scalar(p);
                                match text.parse::<i64>() {
                                    Ok(n) => priority = n,
                                    Err(_) => self.error(
                                        Pos::of(p),
                                        format!("priority `{text}` is not a whole number"),
                                    ),
                                }
                            }
                        }
                        attached.push((priority, NetworkAttachment { network: engine_name, aliases }));
                    }
                    // The highest priority first: it is the network the container is
                    // created on (its default route); ties keep the file's order.
                    attached.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
                    spec.networks.extend(attached.into_iter().map(|(_, a)| a));
                }
            }
        }
        if let Some(r) = &svc.restart {
            let text = self.scalar(r);
            spec.restart = match text.as_str() {
                "no" | "false" => RestartPolicy::No,
                "always" => RestartPolicy::Always,
                "unless-stopped" => RestartPolicy::UnlessStopped,
                t if t == "on-failure" || t.starts_with("on-failure:") => {
                    if t != "on-failure" {
                        self.warning(
                            Pos::of(r),
                            "the retry count of `on-failure:N` is ignored: the engine retries without limit",
                        );
                    }
                    RestartPolicy::OnFailure
                }
                other => {
                    self.error(Pos::of(r), format!("restart policy `{other}` is not valid: use no, always, on-failure or unless-stopped"));
                    RestartPolicy::No
                }
            };
        }
        if let Some(h) = &svc.healthcheck {
            spec.healthcheck = self.healthcheck(h);
        }
        if let Some(deps) = &svc.depends_on {
            for (dep, settings) in &deps.0 {
                let Some(container) = container_names.get(&dep.value) else {
                    self.error(
                        Pos::of(dep),
                        format!("depends_on names `{}`, which is not a service of this app", dep.value),
                    );
                    continue;
                };
                if dep.value == service {
                    self.error(Pos::of(dep), "a service cannot depend on itself");
                    continue;
                }
                let condition = match settings.as_ref().and_then(|s| s.condition.as_ref()) {
                    None => DependencyCondition::Started,
                    Some(c) => match c.value.as_str() {
                        "service_started" => DependencyCondition::Started,
                        "service_healthy" => DependencyCondition::Healthy,
                        "service_completed_successfully" => DependencyCondition::CompletedSuccessfully,
                        other => {
                            self.error(Pos::of(c), format!("depends_on condition `{other}` is not valid: use service_started, service_healthy or service_completed_successfully"));
                            DependencyCondition::Started
                        }
                    },
                };
                spec.depends_on.push(Dependency { container: container.clone(), condition });
            }
        }
        for d in &svc.devices {
            let text = self.s(d);
            let parts: Vec<&str> = text.split(':').collect();
            let (host, container, perms) = match parts.as_slice() {
                [h] => (*h, *h, "rwm"),
                [h, c] => (*h, *c, "rwm"),
                [h, c, p] => (*h, *c, *p),
                _ => {
                    self.error(Pos::of(d), format!("device `{text}` is not HOST[:CONTAINER[:PERMISSIONS]]"));
                    continue;
                }
            };
            if !host.starts_with('/')
                || !container.starts_with('/')
                || perms.is_empty()
                || !perms.chars().all(|c| "rwm".contains(c))
            {
                self.error(Pos::of(d), format!("device `{text}` is not HOST[:CONTAINER[:PERMISSIONS]] with absolute paths and permissions of r, w, m"));
                continue;
            }
            spec.devices.push(DeviceMapping {
                host_path: host.into(),
                container_path: container.into(),
                permissions: perms.into(),
            });
        }
        spec.cap_add = svc.cap_add.iter().map(|c| c.value.clone()).collect();
        spec.cap_drop = svc.cap_drop.iter().map(|c| c.value.clone()).collect();
        spec.stop_signal = svc.stop_signal.as_ref().map(|s| s.value.clone());
        // Resource limits: `mem_limit`/`cpus` or `deploy.resources.limits`, not both.
        let limits =
            svc.deploy.as_ref().and_then(|d| d.value.resources.as_ref()).and_then(|r| r.limits.as_ref());
        let memory = match (&svc.mem_limit, limits.and_then(|l| l.memory.as_ref())) {
            (Some(a), Some(_)) => {
                self.error(Pos::of(a), "set the memory limit either with `mem_limit:` or with `deploy.resources.limits.memory:`, not both");
                None
            }
            (a, b) => a.as_ref().or(b),
        };
        if let Some(m) = memory {
            let text = self.scalar(m);
            match parse_bytes(&text) {
                Ok(b) => spec.memory_bytes = Some(b),
                Err(msg) => self.error(Pos::of(m), msg),
            }
        }
        let cpus = match (&svc.cpus, limits.and_then(|l| l.cpus.as_ref())) {
            (Some(a), Some(_)) => {
                self.error(
                    Pos::of(a),
                    "set the CPU limit either with `cpus:` or with `deploy.resources.limits.cpus:`, not both",
                );
                None
            }
            (a, b) => a.as_ref().or(b),
        };
        if let Some(c) = cpus {
            let text = self.scalar(c);
            match parse_nano_cpus(&text) {
                Ok(n) => spec.nano_cpus = Some(n),
                Err(msg) => self.error(Pos::of(c), msg),
            }
        }
        let addresses = std::mem::take(&mut spec.options.addresses);
        spec.options = ContainerOptions { addresses, ..self.options(svc, container_names) };
        Some(spec)
    }

    /// The enabled profiles: the variable `COMPOSE_PROFILES` (comma-separated; `*`
    /// enables all), as `docker compose` reads it from the environment or `.env`.
    fn active_profiles(&self) -> BTreeSet<String> {
        self.vars
            .get("COMPOSE_PROFILES")
            .map(|v| v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The labels of the service's `label_file:`s (`KEY=VALUE` lines, taken as written),
    /// later files winning; `labels:` wins over them.
    fn label_files(&mut self, svc: &Service) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for (written, pos) in svc.label_files() {
            let Some(repo_path) = env_file_path(self.ctx.file, self.ctx.app, &written) else {
                self.error(pos, format!("label_file `{written}` is outside the app directory: label files must be inside apps/{}/", self.ctx.app));
                continue;
            };
            let Some(bytes) = self.ctx.env_files.get(&repo_path) else {
                self.error(
                    pos,
                    format!(
                        "label_file `{written}` is not in the commit (looked for {repo_path}): commit it"
                    ),
                );
                continue;
            };
            let Ok(text) = std::str::from_utf8(bytes) else {
                self.error(pos, format!("label_file {repo_path} is not UTF-8 text"));
                continue;
            };
            match parse_env_file(text) {
                Ok(entries) => labels.extend(entries.into_iter().map(|e| (e.key, e.value))),
                Err((line, msg)) => self.error(pos, format!("label_file {repo_path}:{line}: {msg}")),
            }
        }
        labels
    }

    /// The variables of the service's `env_file:`s, later files winning; values are
    /// interpolated (unless single-quoted or `format: raw`).
    fn env_files(&mut self, svc: &Service) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (written, required, raw, pos) in svc.env_files() {
            let Some(repo_path) = env_file_path(self.ctx.file, self.ctx.app, &written) else {
                self.error(pos, format!("env_file `{written}` is outside the app directory: env files must be inside apps/{}/", self.ctx.app));
                continue;
            };
            let Some(bytes) = self.ctx.env_files.get(&repo_path) else {
                if required {
                    self.error(pos, format!("env_file `{written}` is not in the commit (looked for {repo_path}): commit it, or write `{{path: {written}, required: false}}`"));
                }
                continue;
            };
            let Ok(text) = std::str::from_utf8(bytes) else {
                self.error(pos, format!("env_file {repo_path} is not UTF-8 text"));
                continue;
            };
            match parse_env_file(text) {
                Ok(entries) => {
                    for e in entries {
                        let value = if raw || e.literal || !e.value.contains('$') {
                            e.value
                        } else {
                            match interpolate(&e.value, self.vars) {
                                Ok(v) => v,
                                Err(InterpError::Unset { name, .. }) => {
                                    if !self.lenient {
                                        self.error(pos, format!("env_file {repo_path}:{}: `{}` uses variable `{name}`, which is not set for this device", e.line, e.key));
                                    }
                                    continue;
                                }
                                Err(InterpError::Syntax(msg)) => {
                                    self.error(pos, format!("env_file {repo_path}:{}: {msg}", e.line));
                                    continue;
                                }
                            }
                        };
                        env.insert(e.key, value);
                    }
                }
                Err((line, msg)) => self.error(pos, format!("env_file {repo_path}:{line}: {msg}")),
            }
        }
        env
    }

    /// The keys of [`ContainerOptions`]: `logging`, `init`, `read_only`, `sysctls`, ...
    fn options(&mut self, svc: &Service, container_names: &BTreeMap<String, String>) -> ContainerOptions {
        let mut o = ContainerOptions {
            init: svc.init,
            read_only: svc.read_only.unwrap_or(false),
            tty: svc.tty.unwrap_or(false),
            stdin_open: svc.stdin_open.unwrap_or(false),
            ..Default::default()
        };
        if let Some(logging) = &svc.logging {
            o.logging = Some(self.logging(logging));
        }
        o.security_opt = svc.security_opt.iter().map(|v| self.s(v)).collect();
        if let Some(dir) = &svc.working_dir {
            let text = self.s(dir);
            if !text.starts_with('/') {
                self.error(
                    Pos::of(dir),
                    format!("working_dir `{text}` must be an absolute path inside the container"),
                );
            }
            o.working_dir = Some(text);
        }
        if let Some(size) = &svc.shm_size {
            let text = self.scalar(size);
            match parse_bytes(&text) {
                Ok(bytes) => o.shm_size_bytes = Some(bytes),
                Err(msg) => self.error(Pos::of(size), format!("shm_size: {msg}")),
            }
        }
        if let Some(sysctls) = &svc.sysctls {
            o.sysctls = self.key_values(sysctls, "sysctl", true);
            // The engines refuse sysctls that are not namespaced (they would change the host).
            let namespaced = |k: &str| {
                ["net.", "kernel.shm", "kernel.msg", "fs.mqueue."].iter().any(|p| k.starts_with(p))
                    || k == "kernel.sem"
            };
            for key in o.sysctls.keys().filter(|k| !namespaced(k)) {
                self.error(Pos::of(sysctls), format!("sysctl `{key}` is not namespaced: the engine refuses it (only net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.* are per container)"));
            }
            let host_network = svc.network_mode.as_ref().is_some_and(|m| m.value == "host");
            if let Some(key) = o.sysctls.keys().find(|k| host_network && k.starts_with("net.")) {
                self.error(Pos::of(sysctls), format!("sysctl `{key}` would change the host's network: the engine refuses net.* sysctls with `network_mode: host`"));
            }
        }
        for (name, limit) in &svc.ulimits.0 {
            let (soft, hard) = match &limit.value {
                ScalarOrMap::Short(text) => match self.interp(text, Pos::of(limit)).parse::<i64>() {
                    Ok(n) => (n, n),
                    Err(_) => {
                        self.error(
                            Pos::of(limit),
                            format!(
                                "ulimit `{}` must be a number, or a map with `soft:` and `hard:`",
                                name.value
                            ),
                        );
                        continue;
                    }
                },
                ScalarOrMap::Long(l) => (l.soft.value, l.hard.value),
            };
            if soft > hard && hard != -1 || soft < -1 || hard < -1 {
                self.error(Pos::of(limit), format!("ulimit `{}`: soft limit {soft} is above the hard limit {hard} (or below -1, unlimited)", name.value));
                continue;
            }
            const KNOWN: [&str; 16] = [
                "as",
                "core",
                "cpu",
                "data",
                "fsize",
                "locks",
                "memlock",
                "msgqueue",
                "nice",
                "nofile",
                "nproc",
                "rss",
                "rtprio",
                "rttime",
                "sigpending",
                "stack",
            ];
            if !KNOWN.contains(&name.value.as_str()) {
                self.error(
                    Pos::of(name),
                    format!(
                        "ulimit `{}` is not one the engine knows: use one of {}",
                        name.value,
                        KNOWN.join(", ")
                    ),
                );
                continue;
            }
            o.ulimits.insert(name.value.clone(), Ulimit { soft, hard });
        }
        if let Some(hosts) = &svc.extra_hosts {
            o.extra_hosts = self.extra_hosts(hosts);
        }
        if let Some(period) = &svc.stop_grace_period {
            let text = self.s(period);
            match parse_duration_ms(&text) {
                // The engine takes whole seconds; round up so the grace is never shorter.
                Ok(ms) => o.stop_timeout_s = Some(ms.div_ceil(1000)),
                Err(msg) => self.error(Pos::of(period), format!("stop_grace_period: {msg}")),
            }
        }
        if let Some(dns) = &svc.dns {
            o.dns = self.words_plain(dns);
            for server in &o.dns {
                if server.parse::<std::net::IpAddr>().is_err() && !self.tainted.contains(&Pos::of(dns)) {
                    self.error(Pos::of(dns), format!("dns server `{server}` is not an IP address"));
                }
            }
        }
        if let Some(search) = &svc.dns_search {
            o.dns_search = self.words_plain(search);
        }
        o.dns_opt = svc.dns_opt.iter().map(|v| self.s(v)).collect();
        o.group_add = svc.group_add.iter().map(|v| self.scalar(v)).collect();
        if let Some(adj) = &svc.oom_score_adj {
            if !(-1000..=1000).contains(&adj.value) {
                self.error(
                    Pos::of(adj),
                    format!("oom_score_adj {} is out of range: use -1000 to 1000", adj.value),
                );
            }
            o.oom_score_adj = Some(adj.value);
        }
        if let Some(limit) = &svc.pids_limit {
            if limit.value == 0 || limit.value < -1 {
                self.error(
                    Pos::of(limit),
                    format!(
                        "pids_limit {} is not valid: use a positive number, or -1 for no limit",
                        limit.value
                    ),
                );
            }
            o.pids_limit = Some(limit.value);
        }
        if let Some(cpuset) = &svc.cpuset {
            let text = self.s(cpuset);
            if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit() || c == ',' || c == '-') {
                self.error(
                    Pos::of(cpuset),
                    format!("cpuset `{text}` is not a CPU list such as \"0-1\" or \"0,2\""),
                );
            }
            o.cpuset = Some(text);
        }
        if let Some(mac) = &svc.mac_address {
            let text = self.s(mac);
            let parts: Vec<&str> = text.split(':').collect();
            if parts.len() != 6
                || !parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
            {
                self.error(
                    Pos::of(mac),
                    format!("mac_address `{text}` is not six hex bytes such as 02:42:ac:11:00:02"),
                );
            }
            o.mac_address = Some(text);
        }
        if let Some(v) = &svc.mem_reservation {
            let text = self.scalar(v);
            match parse_bytes(&text) {
                Ok(bytes) => o.mem_reservation_bytes = Some(bytes),
                Err(msg) => self.error(Pos::of(v), format!("mem_reservation: {msg}")),
            }
        }
        if let Some(v) = &svc.memswap_limit {
            let text = self.scalar(v);
            match text.as_str() {
                "-1" => o.memswap_limit_bytes = Some(-1),
                _ => match parse_bytes(&text).map(i64::try_from) {
                    Ok(Ok(bytes)) => o.memswap_limit_bytes = Some(bytes),
                    Ok(Err(_)) | Err(_) => self.error(
                        Pos::of(v),
                        format!(
                            "memswap_limit `{text}` is not a size such as \"1g\", or -1 for unlimited swap"
                        ),
                    ),
                },
            }
            if spec_memory_missing(svc) {
                self.error(Pos::of(v), "memswap_limit needs a memory limit (`mem_limit:` or `deploy.resources.limits.memory:`): it is memory plus swap");
            }
        }
        if let Some(v) = &svc.cpu_shares {
            let text = self.scalar(v);
            match text.parse::<u64>() {
                Ok(n) if n >= 2 => o.cpu_shares = Some(n),
                _ => self.error(
                    Pos::of(v),
                    format!("cpu_shares `{text}` is not a weight of at least 2 (the default is 1024)"),
                ),
            }
        }
        o.cpu_period_us = svc
            .cpu_period
            .as_ref()
            .and_then(|v| self.micros(v, "cpu_period"))
            .and_then(|us| u64::try_from(us).ok());
        o.cpu_quota_us = svc.cpu_quota.as_ref().and_then(|v| self.micros(v, "cpu_quota"));
        o.cgroup_parent = svc.cgroup_parent.as_ref().map(|v| self.s(v));
        o.ipc = svc.ipc.as_ref().map(|v| {
            self.namespace_mode(v, "ipc", &["host", "private", "shareable", "none"], container_names)
        });
        o.pid = svc.pid.as_ref().map(|v| self.namespace_mode(v, "pid", &["host"], container_names));
        if let Some(v) = &svc.pull_policy {
            o.pull_policy = match self.s(v).as_str() {
                "missing" | "if_not_present" => Some(PullPolicy::Missing),
                "always" => Some(PullPolicy::Always),
                "never" => Some(PullPolicy::Never),
                "build" => {
                    self.error(Pos::of(v), "pull_policy `build` is not supported: devices pull images, build them in CI and set `image:`".to_string());
                    None
                }
                other => {
                    self.error(Pos::of(v), format!("pull_policy `{other}` is not supported: use `missing` (the default), `always` (pull on every update) or `never` (the image is loaded on the device by other means)"));
                    None
                }
            };
        }
        o.uts = svc.uts.as_ref().map(|v| self.namespace_mode(v, "uts", &["host"], &BTreeMap::new()));
        o.userns_mode = svc
            .userns_mode
            .as_ref()
            .map(|v| self.namespace_mode(v, "userns_mode", &["host"], &BTreeMap::new()));
        if let Some(v) = &svc.cgroup {
            let text = self.s(v);
            if text == "host" || text == "private" {
                o.cgroupns = Some(text);
            } else {
                self.error(Pos::of(v), format!("cgroup `{text}` must be `host` or `private`"));
            }
        }
        for r in &svc.device_cgroup_rules {
            let text = self.s(r);
            if fleet_spec::policy::is_device_cgroup_rule(&text) {
                o.device_cgroup_rules.push(fleet_spec::policy::normalize_rule(&text));
            } else {
                self.error(Pos::of(r), format!("device_cgroup_rules entry `{text}` is not a rule like `c 189:* rmw` (type a, b or c; major:minor with numbers or *; access r, w, m)"));
            }
        }
        if let Some(v) = &svc.mem_swappiness {
            let text = self.scalar(v);
            match text.parse::<u8>() {
                Ok(n) if n <= 100 => o.mem_swappiness = Some(n),
                _ => self.error(
                    Pos::of(v),
                    format!("mem_swappiness `{text}` must be a whole number from 0 to 100"),
                ),
            }
        }
        o.oom_kill_disable = svc.oom_kill_disable.unwrap_or(false);
        o.cpu_rt_period_us = svc
            .cpu_rt_period
            .as_ref()
            .and_then(|v| self.micros(v, "cpu_rt_period"))
            .and_then(|us| u64::try_from(us).ok());
        o.cpu_rt_runtime_us = svc.cpu_rt_runtime.as_ref().and_then(|v| self.micros(v, "cpu_rt_runtime"));
        if let Some(v) = &svc.runtime {
            let text = self.s(v);
            if !text.is_empty()
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                o.runtime = Some(text);
            } else {
                self.error(
                    Pos::of(v),
                    format!("runtime `{text}` is not a runtime name like `runc` or `crun`"),
                );
            }
        }
        o.domainname = svc.domainname.as_ref().map(|v| self.s(v));
        o.post_start = svc.post_start.iter().map(|h| self.hook(h)).collect();
        o.pre_stop = svc.pre_stop.iter().map(|h| self.hook(h)).collect();
        if let Some(g) = &svc.gpus {
            o.gpus = self.gpus(g);
        }
        if let Some(b) = &svc.blkio_config {
            o.blkio = self.blkio(b);
        }
        if let Some(opts) = &svc.storage_opt {
            o.storage_opt = self.key_values(opts, "storage option", true);
        }
        if let Some(v) = &svc.platform {
            let text = self.s(v);
            let parts: Vec<&str> = text.split('/').collect();
            let plain = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if (2..=3).contains(&parts.len()) && parts.iter().all(|p| plain(p)) {
                o.platform = Some(text);
            } else {
                self.error(
                    Pos::of(v),
                    format!(
                        "platform `{text}` must be `os/arch[/variant]`, e.g. `linux/arm64` or `linux/arm/v7`"
                    ),
                );
            }
        }
        o
    }

    /// `cpu_period:`/`cpu_quota:`: microseconds as a number, or a duration (`100ms`).
    fn micros(&mut self, v: &Spanned<Scalar>, key: &str) -> Option<i64> {
        let text = self.scalar(v);
        let us = match text.parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => {
                parse_duration_ms(&text).ok().and_then(|ms| i64::try_from(ms.saturating_mul(1000)).ok())
            }
        };
        match us {
            Some(n) if n >= 1000 || (key == "cpu_quota" && n == -1) => Some(n),
            _ => {
                self.error(Pos::of(v), format!("{key} `{text}` is not a time of at least 1000 microseconds (a number of microseconds, or e.g. \"100ms\")"));
                None
            }
        }
    }

    /// `logging:` → driver and options; `max-size`/`max-file` are checked here, as the
    /// engine would only refuse them on the device.
    fn logging(&mut self, l: &Spanned<Ext<LoggingDef>>) -> LogConfig {
        let driver = l.value.driver.as_ref().map(|d| (self.s(d), Pos::of(d)));
        let options = match &l.value.options {
            Some(opts) => self.key_values(opts, "logging option", true),
            None => BTreeMap::new(),
        };
        if let Some((name, at)) = &driver {
            match name.as_str() {
                "json-file" | "journald" | "none" => {}
                "local" => self.warning(*at, "logging driver `local` exists on dockerd only: podman refuses it; `json-file` with `max-size` rotates on both"),
                _ => self.warning(*at, format!("logging driver `{name}` is not one every engine has (json-file, journald, none): the device's engine must provide it")),
            }
        }
        if let Some(opts) = &l.value.options {
            for (key, value) in &options {
                let bad = match key.as_str() {
                    "max-size" => parse_bytes(value).err(),
                    "max-file" => (value.parse::<u32>().map_or(true, |n| n == 0))
                        .then(|| format!("invalid file count {value:?}: use a number of at least 1")),
                    _ => None,
                };
                if let Some(msg) = bad {
                    self.error(Pos::of(opts), format!("logging option `{key}`: {msg}"));
                }
            }
        }
        let driver_name = driver.map(|(d, _)| d).unwrap_or_default();
        if matches!(driver_name.as_str(), "json-file") && !options.contains_key("max-size") {
            self.warning(Pos::of(l), "the json-file log of this service grows without bound: set `options: {max-size: 10m, max-file: \"3\"}`");
        }
        LogConfig { driver: driver_name, options }
    }

    /// `extra_hosts:` as `host:ip` entries (list `host:ip` or `host=ip`, or a map).
    fn extra_hosts(&mut self, v: &Spanned<ListOrMap>) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |t: &mut Self, host: &str, ip: &str, at: Pos| {
            if host.is_empty() || (ip != "host-gateway" && ip.parse::<std::net::IpAddr>().is_err()) {
                if !t.tainted.contains(&at) {
                    t.error(at, format!("extra_hosts entry `{host}` → `{ip}` is not HOST:IP (or HOST=IP) with an IP address or host-gateway"));
                }
                return;
            }
            out.push(format!("{host}:{ip}"));
        };
        match &v.value {
            ListOrMap::List(items) => {
                for item in items {
                    let text = self.scalar(item);
                    let (host, ip) =
                        text.split_once('=').or_else(|| text.split_once(':')).unwrap_or((&text, ""));
                    add(self, host, ip.trim_start_matches('[').trim_end_matches(']'), Pos::of(item));
                }
            }
            ListOrMap::Map(entries) => {
                for (host, ip) in entries {
                    let ip = ip.as_ref().map(|i| self.scalar(i)).unwrap_or_default();
                    add(self, &host.value, &ip, Pos::of(host));
                }
            }
        }
        out
    }

    /// `ipc:`/`pid:`: one of `allowed`, `service:<name>` (→ `container:<its name>`) or
    /// `container:<name>`. `host` is carried as is; the device's container policy decides.
    fn namespace_mode(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        allowed: &[&str],
        container_names: &BTreeMap<String, String>,
    ) -> String {
        let text = self.s(v);
        if let Some(other) = text.strip_prefix("service:") {
            match container_names.get(other) {
                Some(c) => return format!("container:{c}"),
                None => self.error(Pos::of(v), format!("{key} `{text}` names no service of this app")),
            }
        } else if !allowed.contains(&text.as_str()) && !text.starts_with("container:") {
            self.error(
                Pos::of(v),
                format!(
                    "{key} `{text}` is not valid: use {}, service:<name> or container:<name>",
                    allowed.join(", ")
                ),
            );
        }
        text
    }

    /// `command:`/`entrypoint:`: a string is split like a shell would (no expansion).
    fn words(&mut self, v: &Spanned<StringOrList>) -> Vec<String> {
        match &v.value {
            StringOrList::String(s) => {
                let text = self.interp(s, Pos::of(v));
                match shell_words::split(&text) {
                    Ok(words) => words,
                    Err(e) => {
                        self.error(
                            Pos::of(v),
                            format!(
                                "cannot split `{text}` into words ({e}): check the quotes, or write a list"
                            ),
                        );
                        Vec::new()
                    }
                }
            }
            StringOrList::List(items) => items.iter().map(|i| self.scalar(i)).collect(),
        }
    }

    /// A string or a list, without word splitting (`tmpfs:`).
    fn words_plain(&mut self, v: &Spanned<StringOrList>) -> Vec<String> {
        match &v.value {
            StringOrList::String(s) => vec![self.interp(s, Pos::of(v))],
            StringOrList::List(items) => items.iter().map(|i| self.scalar(i)).collect(),
        }
    }

    /// `environment:`/`labels:` in list or map form.
    /// One `post_start:` / `pre_stop:` entry.
    fn hook(&mut self, h: &Spanned<Ext<HookDef>>) -> Hook {
        let d = &h.value;
        let command = self.words(&d.command);
        if command.is_empty() {
            self.error(Pos::of(&d.command), "a hook's `command` is empty");
        }
        let working_dir = d.working_dir.as_ref().map(|v| self.s(v));
        if let Some(dir) = &working_dir {
            if !dir.starts_with('/') {
                self.error(
                    Pos::of(h),
                    format!("hook working_dir `{dir}` must be an absolute path inside the container"),
                );
            }
        }
        Hook {
            command,
            user: d.user.as_ref().map(|v| self.scalar(v)),
            privileged: d.privileged.unwrap_or(false),
            working_dir,
            env: d
                .environment
                .as_ref()
                .map(|e| self.key_values(e, "environment variable", true))
                .unwrap_or_default(),
        }
    }

    /// `gpus:`: `all` is every GPU with the `gpu` capability; a request without `count`
    /// or `device_ids` is all of them too.
    fn gpus(&mut self, g: &Spanned<GpusDef>) -> Vec<GpuRequest> {
        let all = || GpuRequest { count: Some(-1), capabilities: vec!["gpu".into()], ..Default::default() };
        match &g.value {
            GpusDef::All => vec![all()],
            GpusDef::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    let d = &item.value;
                    if let Some(o) = &d.options {
                        self.error(Pos::of(o), "`gpus.options` is not supported: drivers take their options from the engine's configuration");
                    }
                    let count = d.count.as_ref().and_then(|c| {
                        let text = self.scalar(c);
                        match text.as_str() {
                            "all" => Some(-1),
                            t => match t.parse::<i64>() {
                                Ok(n) if n > 0 => Some(n),
                                _ => {
                                    self.error(
                                        Pos::of(c),
                                        format!("gpu count `{text}` must be `all` or a positive number"),
                                    );
                                    None
                                }
                            },
                        }
                    });
                    let device_ids: Vec<String> = d.device_ids.iter().map(|v| self.s(v)).collect();
                    if count.is_some() && !device_ids.is_empty() {
                        self.error(Pos::of(item), "a GPU request takes `count` or `device_ids`, not both");
                    }
                    let mut capabilities: Vec<String> = d.capabilities.iter().map(|v| self.s(v)).collect();
                    if capabilities.is_empty() {
                        capabilities.push("gpu".into());
                    }
                    let count = if count.is_none() && device_ids.is_empty() { Some(-1) } else { count };
                    out.push(GpuRequest {
                        driver: d.driver.as_ref().map(|v| self.s(v)),
                        count,
                        device_ids,
                        capabilities,
                    });
                }
                out
            }
        }
    }

    /// `blkio_config:`: a weight of 10..=1000, device paths absolute, rates in bytes (with
    /// k/m/g) or operations per second.
    fn blkio(&mut self, b: &Spanned<Ext<BlkioDef>>) -> BlkioConfig {
        let def = &b.value;
        let mut out = BlkioConfig::default();
        let weight = |t: &mut Self, v: &Spanned<Scalar>| -> Option<u16> {
            let text = t.scalar(v);
            match text.parse::<u16>() {
                Ok(w) if (10..=1000).contains(&w) => Some(w),
                _ => {
                    t.error(
                        Pos::of(v),
                        format!("blkio weight `{text}` must be a whole number from 10 to 1000"),
                    );
                    None
                }
            }
        };
        if let Some(w) = &def.weight {
            out.weight = weight(self, w);
        }
        for d in &def.weight_device {
            let path = self.blkio_path(&d.value.path);
            match &d.value.weight {
                Some(w) => {
                    if let (Some(path), Some(w)) = (path, weight(self, w)) {
                        out.weight_device.push((path, w));
                    }
                }
                None => self.error(Pos::of(d), "`weight_device` entries need `path` and `weight`"),
            }
        }
        let lists = [
            (&def.device_read_bps, &mut out.device_read_bps, true),
            (&def.device_write_bps, &mut out.device_write_bps, true),
            (&def.device_read_iops, &mut out.device_read_iops, false),
            (&def.device_write_iops, &mut out.device_write_iops, false),
        ];
        for (entries, into, bytes) in lists {
            for d in entries {
                let path = self.blkio_path(&d.value.path);
                let Some(rate) = &d.value.rate else {
                    self.error(Pos::of(d), "throttle entries need `path` and `rate`");
                    continue;
                };
                let text = self.scalar(rate);
                let value = if bytes { parse_bytes(&text).ok() } else { text.parse::<u64>().ok() };
                match (path, value) {
                    (Some(path), Some(v)) => into.push((path, v)),
                    (_, None) => {
                        let unit = if bytes {
                            "bytes per second (k, m, g allowed)"
                        } else {
                            "operations per second"
                        };
                        self.error(Pos::of(rate), format!("rate `{text}` is not a number of {unit}"));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn blkio_path(&mut self, v: &Spanned<String>) -> Option<String> {
        let path = self.s(v);
        if path.starts_with("/dev/") {
            Some(path)
        } else {
            self.error(Pos::of(v), format!("blkio device `{path}` must be a device path under /dev"));
            None
        }
    }

    /// A network's `ipam:`: the `default` driver's pools, each checked.
    fn ipam(&mut self, ipam: &Spanned<Ext<IpamDef>>) -> Vec<IpamPool> {
        let def = &ipam.value;
        if let Some(driver) = &def.driver {
            if driver.value != "default" {
                self.error(
                    Pos::of(driver),
                    format!(
                        "IPAM driver `{}` is not supported: devices use the engine's `default` driver",
                        driver.value
                    ),
                );
            }
        }
        if let Some(options) = &def.options {
            self.error(
                Pos::of(options),
                "`ipam.options:` is not supported: the `default` IPAM driver takes none",
            );
        }
        let mut pools = Vec::new();
        for pool in &def.config {
            let p = &pool.value;
            let subnet = self.s(&p.subnet);
            let Some(net) = Cidr::parse(&subnet) else {
                self.error(
                    Pos::of(&p.subnet),
                    format!(
                        "subnet `{subnet}` is not an address range: write it as CIDR, e.g. 172.28.0.0/16"
                    ),
                );
                continue;
            };
            let mut out = IpamPool { subnet, ..Default::default() };
            if let Some(range) = &p.ip_range {
                let text = self.s(range);
                match Cidr::parse(&text) {
                    Some(r) if net.contains_range(&r) => out.ip_range = Some(text),
                    Some(_) => self.error(
                        Pos::of(range),
                        format!("ip_range `{text}` is not inside the subnet `{}`", out.subnet),
                    ),
                    None => self.error(
                        Pos::of(range),
                        format!(
                            "ip_range `{text}` is not an address range: write it as CIDR, e.g. 172.28.5.0/24"
                        ),
                    ),
                }
            }
            if let Some(gateway) = &p.gateway {
                let text = self.s(gateway);
                match text.parse::<IpAddr>() {
                    Ok(ip) if net.contains(ip) => out.gateway = Some(text),
                    _ => self.error(
                        Pos::of(gateway),
                        format!("gateway `{text}` is not an address inside the subnet `{}`", out.subnet),
                    ),
                }
            }
            if let Some(aux) = &p.aux_addresses {
                for (name, addr) in self.key_values(aux, "aux address", true) {
                    match addr.parse::<IpAddr>() {
                        Ok(ip) if net.contains(ip) => {
                            out.aux_addresses.insert(name, addr);
                        }
                        _ => self.error(
                            Pos::of(aux),
                            format!(
                                "aux address `{name}: {addr}` is not an address inside the subnet `{}`",
                                out.subnet
                            ),
                        ),
                    }
                }
            }
            pools.push(out);
        }
        pools
    }

    /// `ipv4_address:` / `ipv6_address:` of a service on network `net`: an address of
    /// that family inside one of the network's pools (the engines give a fixed address
    /// only on a network whose subnet the user set).
    fn static_address(
        &mut self,
        v: &Spanned<String>,
        key: &str,
        v4: bool,
        net: &str,
        pools: &[IpamPool],
    ) -> Option<String> {
        let text = self.s(v);
        let ip = match text.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() == v4 => ip,
            _ => {
                let family = if v4 { "an IPv4" } else { "an IPv6" };
                self.error(Pos::of(v), format!("{key} `{text}` is not {family} address"));
                return None;
            }
        };
        if !pools.iter().filter_map(|p| Cidr::parse(&p.subnet)).any(|c| c.contains(ip)) {
            self.error(
                Pos::of(v),
                format!(
                    "{key} `{text}` is not inside a subnet of network `{net}`: declare one with `ipam: {{config: [{{subnet: ...}}]}}` under the top-level `networks: {net}:` (the engines give fixed addresses only on networks with a subnet set)"
                ),
            );
            return None;
        }
        Some(text)
    }

    fn key_values(
        &mut self,
        v: &Spanned<ListOrMap>,
        what: &str,
        need_value: bool,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match &v.value {
            ListOrMap::List(items) => {
                for item in items {
                    let text = self.scalar(item);
                    match text.split_once('=') {
                        Some((k, val)) if !k.is_empty() => {
                            out.insert(k.to_string(), val.to_string());
                        }
                        None if !need_value && !text.is_empty() => {
                            out.insert(text, String::new());
                        }
                        _ => self.error(Pos::of(item), format!("{what} `{text}` has no value: write KEY=VALUE (a value may use ${{VAR}} from the device's vars)")),
                    }
                }
            }
            ListOrMap::Map(entries) => {
                for (k, val) in entries {
                    match val {
                        Some(val) => {
                            let text = self.scalar(val);
                            out.insert(k.value.clone(), text);
                        }
                        None if !need_value => {
                            out.insert(k.value.clone(), String::new());
                        }
                        None => self.error(Pos::of(k), format!("{what} `{}` has no value: write {}: VALUE (a value may use ${{VAR}} from the device's vars)", k.value, k.value)),
                    }
                }
            }
        }
        out
    }

    fn port(&mut self, v: &Spanned<ScalarOrMap<PortLong>>) -> Vec<PortMapping> {
        let pos = Pos::of(v);
        match &v.value {
            ScalarOrMap::Short(s) => {
                let text = self.interp(s, pos);
                match parse_port(&text) {
                    Ok(list) => list,
                    Err(msg) => {
                        self.error(pos, msg);
                        Vec::new()
                    }
                }
            }
            ScalarOrMap::Long(p) => {
                let target_text = self.scalar(&p.target);
                let protocol = match p.protocol.as_ref().map(|x| x.value.as_str()) {
                    None | Some("tcp") => Protocol::Tcp,
                    Some("udp") => Protocol::Udp,
                    Some(other) => {
                        let at = p.protocol.as_ref().map(Pos::of).unwrap_or(pos);
                        self.error(at, format!("protocol `{other}` is not supported: use tcp or udp"));
                        Protocol::Tcp
                    }
                };
                let Ok(container_port) = target_text.parse::<u16>() else {
                    self.error(
                        Pos::of(&p.target),
                        format!("port target `{target_text}` is not a port number (1-65535)"),
                    );
                    return Vec::new();
                };
                let host_port = match &p.published {
                    None => None,
                    Some(pub_) => {
                        let text = self.scalar(pub_);
                        match text.parse::<u16>() {
                            Ok(n) if n > 0 => Some(n),
                            _ => {
                                self.error(
                                    Pos::of(pub_),
                                    format!("published port `{text}` is not a port number (1-65535)"),
                                );
                                None
                            }
                        }
                    }
                };
                let host_ip = p.host_ip.as_ref().map(|h| self.s(h));
                vec![PortMapping { host_ip, host_port, container_port, protocol }]
            }
        }
    }

    fn volume(
        &mut self,
        service: &str,
        v: &Spanned<ScalarOrMap<VolumeLong>>,
        volume_names: &BTreeMap<String, String>,
        volumes: &mut BTreeMap<String, VolumeSpec>,
    ) -> Option<Mount> {
        let pos = Pos::of(v);
        let (kind, source, target, read_only) = match &v.value {
            ScalarOrMap::Short(s) => {
                let text = self.interp(s, pos);
                let parts: Vec<&str> = text.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [t] => (None, *t, ""),
                    [s, t] => (Some(*s), *t, ""),
                    [s, t, m] => (Some(*s), *t, *m),
                    _ => {
                        self.error(pos, format!("volume `{text}` is not [SOURCE:]TARGET[:MODE]"));
                        return None;
                    }
                };
                let mut read_only = false;
                for opt in mode.split(',').filter(|o| !o.is_empty()) {
                    match opt {
                        "ro" => read_only = true,
                        "rw" | "z" | "Z" | "cached" | "delegated" | "consistent" | "nocopy" => {}
                        other => {
                            self.error(pos, format!("volume mode `{other}` is not supported: use ro or rw"));
                        }
                    }
                }
                let kind = match source {
                    None => "volume",
                    Some(s) if s.starts_with('/') || s.starts_with('.') || s.starts_with('~') => "bind",
                    Some(_) => "volume",
                };
                (kind.to_string(), source.map(str::to_string), target.to_string(), read_only)
            }
            ScalarOrMap::Long(l) => {
                let source = l.source.as_ref().map(|s| self.s(s));
                let target = self.s(&l.target);
                (l.kind.value.clone(), source, target, l.read_only)
            }
        };
        if !target.starts_with('/') {
            self.error(
                pos,
                format!("volume target `{target}` must be an absolute path inside the container"),
            );
            return None;
        }
        let source = match (kind.as_str(), source) {
            ("bind", Some(src)) => MountSource::Bind(self.bind_source(&src, pos)?),
            ("bind", None) => {
                self.error(pos, "a bind mount needs a `source:`");
                return None;
            }
            ("volume", Some(name)) => match volume_names.get(&name) {
                Some(engine) => MountSource::Volume(engine.clone()),
                None => {
                    self.error(
                        pos,
                        format!("volume `{name}` is not declared under the top-level `volumes:`"),
                    );
                    return None;
                }
            },
            ("volume", None) => {
                // An anonymous volume becomes a named one, so it survives recreation.
                let suffix: String = target
                    .trim_matches('/')
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
                    .collect();
                let name = format!("{}_{service}_{suffix}", self.ctx.app);
                volumes
                    .entry(name.clone())
                    .or_insert_with(|| VolumeSpec { name: name.clone(), ..Default::default() });
                MountSource::Volume(name)
            }
            ("tmpfs", _) => MountSource::Tmpfs,
            (other, _) => {
                self.error(pos, format!("volume type `{other}` is not supported: use bind, volume or tmpfs"));
                return None;
            }
        };
        Some(Mount { source, target, read_only })
    }

    /// Resolves a bind source to a device path.
    fn bind_source(&mut self, src: &str, pos: Pos) -> Option<String> {
        if src.starts_with('~') {
            self.error(pos, format!("bind source `{src}` is home-relative: devices have no login user; use an absolute path, a relative path (./...) or a named volume"));
            return None;
        }
        if src.starts_with('/') {
            let trimmed = src.trim_end_matches('/');
            return Some(if trimmed.is_empty() { "/".into() } else { trimmed.into() });
        }
        let Some(rel) = normalize_relative(src) else {
            self.error(pos, format!("bind source `{src}` leaves the app directory: relative sources must stay inside apps/{}/", self.ctx.app));
            return None;
        };
        if let Some(target) = self.ctx.file_targets.get(&rel) {
            return Some(target.clone());
        }
        let root = self.ctx.app_root.trim_end_matches('/');
        let device_path = if rel.is_empty() { root.to_string() } else { format!("{root}/{rel}") };
        let prefix = if rel.is_empty() { String::new() } else { format!("{rel}/") };
        let under: Vec<(&String, &String)> =
            self.ctx.file_targets.iter().filter(|(source, _)| source.starts_with(&prefix)).collect();
        if under.is_empty() {
            self.warning(pos, format!("bind source `{src}` is not a file delivered by this app (see `files:` in app.yaml): the device path {device_path} is mounted as it is"));
        } else if let Some((source, target)) =
            under.iter().find(|(source, target)| **target != format!("{root}/{source}"))
        {
            self.error(pos, format!("directory bind `{src}` contains `{source}`, which is delivered to {target}: a directory bind only covers files at their default place under {device_path}; bind the file itself or drop its `target:`"));
        }
        Some(device_path)
    }

    fn healthcheck(&mut self, h: &Spanned<HealthcheckDef>) -> Option<Healthcheck> {
        let d = &h.value;
        if d.disable == Some(true) {
            return Some(Healthcheck { test: vec!["NONE".into()], ..Default::default() });
        }
        if let Some(s) = &d.start_interval {
            self.warning(Pos::of(s), "`start_interval:` is ignored by the agent");
        }
        let test = match &d.test {
            None => {
                self.error(Pos::of(h), "a healthcheck needs a `test:` (or `disable: true`)");
                return None;
            }
            Some(t) => match &t.value {
                StringOrList::String(s) => vec!["CMD-SHELL".into(), self.interp(s, Pos::of(t))],
                StringOrList::List(items) => {
                    let words: Vec<String> = items.iter().map(|i| self.scalar(i)).collect();
                    match words.first().map(String::as_str) {
                        Some("CMD" | "CMD-SHELL" | "NONE") => words,
                        _ => {
                            self.error(Pos::of(t), "a healthcheck `test:` list must start with \"CMD\", \"CMD-SHELL\" or \"NONE\"");
                            return None;
                        }
                    }
                }
            },
        };
        let mut dur = |v: &Option<Spanned<String>>| -> Option<u64> {
            let v = v.as_ref()?;
            let text = self.s(v);
            match parse_duration_ms(&text) {
                Ok(ms) => Some(ms),
                Err(msg) => {
                    self.error(Pos::of(v), msg);
                    None
                }
            }
        };
        let interval_ms = dur(&d.interval);
        let timeout_ms = dur(&d.timeout);
        let start_period_ms = dur(&d.start_period);
        Some(Healthcheck {
            test,
            interval_ms,
            timeout_ms,
            retries: d.retries.as_ref().map(|r| r.value),
            start_period_ms,
        })
    }

    /// Reports dependency cycles between services.
    fn check_cycles(&mut self, file: &ComposeFile, container_names: &BTreeMap<String, String>) {
        let mut edges: BTreeMap<&str, Vec<(&str, Pos)>> = BTreeMap::new();
        for (key, svc) in &file.services.0 {
            let deps = svc.value.depends_on.as_ref().map(|d| d.0.as_slice()).unwrap_or_default();
            edges.insert(
                key.value.as_str(),
                deps.iter()
                    .filter(|(d, _)| container_names.contains_key(&d.value) && d.value != key.value)
                    .map(|(d, _)| (d.value.as_str(), Pos::of(d)))
                    .collect(),
            );
        }
        // Colors: 0 unvisited, 1 on the stack, 2 done.
        let mut color: BTreeMap<&str, u8> = BTreeMap::new();
        let mut reported = BTreeSet::new();
        for start in edges.keys().copied().collect::<Vec<_>>() {
            let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
            if color.get(start).copied().unwrap_or(0) != 0 {
                continue;
            }
            color.insert(start, 1);
            while let Some((node, i)) = stack.pop() {
                let next = edges.get(node).and_then(|e| e.get(i)).copied();
                match next {
                    Some((dep, at)) => {
                        stack.push((node, i + 1));
                        match color.get(dep).copied().unwrap_or(0) {
                            0 => {
                                color.insert(dep, 1);
                                stack.push((dep, 0));
                            }
                            1 if reported.insert((node, dep)) => {
                                self.error(at, format!("depends_on cycle: `{node}` depends on `{dep}`, which (indirectly) depends on `{node}`"));
                            }
                            _ => {}
                        }
                    }
                    None => {
                        color.insert(node, 2);
                    }
                }
            }
        }
    }
}

/// `name[:tag][@sha256:...]` → reference without digest, and the digest.
pub fn parse_image(text: &str) -> ImageRef {
    match text.split_once('@') {
        Some((reference, digest)) => ImageRef { reference: reference.into(), digest: Some(digest.into()) },
        None => ImageRef { reference: text.into(), digest: None },
    }
}

/// Normalizes `./a/../b` to `b`; `None` when it climbs above the app directory.
pub fn normalize_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Compose's short port syntax: `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]`, with
/// port ranges (`8000-8002:8000-8002`) and bracketed IPv6 host addresses.
pub fn parse_port(text: &str) -> Result<Vec<PortMapping>, String> {
    let err = |why: &str| {
        format!("port `{text}` is not valid ({why}): use [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/tcp|udp], e.g. \"8080:80\"")
    };
    let (spec, protocol) = match text.rsplit_once('/') {
        Some((s, "tcp")) => (s, Protocol::Tcp),
        Some((s, "udp")) => (s, Protocol::Udp),
        Some(_) => return Err(err("protocol must be tcp or udp")),
        None => (text, Protocol::Tcp),
    };
    let (host_ip, rest) = if let Some(stripped) = spec.strip_prefix('[') {
        let (ip, rest) = stripped.split_once(']').ok_or_else(|| err("unclosed ["))?;
        let rest = rest.strip_prefix(':').ok_or_else(|| err("expected ':' after the IPv6 address"))?;
        (Some(ip.to_string()), rest)
    } else {
        let colons = spec.matches(':').count();
        if colons == 2 {
            let (ip, rest) = spec.split_once(':').ok_or_else(|| err("bad address"))?;
            (Some(ip.to_string()), rest)
        } else if colons > 2 {
            return Err(err("write IPv6 host addresses in brackets"));
        } else {
            (None, spec)
        }
    };
    let (host, container) = match rest.split_once(':') {
        Some((h, c)) => (if h.is_empty() { None } else { Some(h) }, c),
        None => (None, rest),
    };
    let range = |s: &str| -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a: u16 = a.parse().map_err(|_| err("not a port number"))?;
        let b: u16 = b.parse().map_err(|_| err("not a port number"))?;
        if a == 0 || b < a {
            return Err(err("bad port range"));
        }
        Ok((a, b))
    };
    let (c0, c1) = range(container)?;
    let host_range = host.map(range).transpose()?;
    if let Some((h0, h1)) = host_range {
        if h1 - h0 != c1 - c0 {
            return Err(err("host and container ranges differ in length"));
        }
    }
    Ok((c0..=c1)
        .enumerate()
        .map(|(i, c)| PortMapping {
            host_ip: host_ip.clone(),
            host_port: host_range.map(|(h0, _)| h0 + i as u16),
            container_port: c,
            protocol,
        })
        .collect())
}

/// `expose:` entries: `80`, `80/udp`, `8000-8002` → `80/tcp`, ...
pub fn parse_expose(text: &str) -> Result<Vec<String>, String> {
    let err = || format!("expose `{text}` is not PORT[-PORT][/tcp|udp]");
    let (ports, proto) = match text.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some(_) => return Err(err()),
        None => (text, "tcp"),
    };
    let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
    let a: u16 = a.parse().map_err(|_| err())?;
    let b: u16 = b.parse().map_err(|_| err())?;
    if a == 0 || b < a {
        return Err(err());
    }
    Ok((a..=b).map(|p| format!("{p}/{proto}")).collect())
}

/// Whether the service sets no memory limit (which `memswap_limit` extends).
fn spec_memory_missing(svc: &Service) -> bool {
    let limits = svc.deploy.as_ref().and_then(|d| d.value.resources.as_ref()).and_then(|r| r.limits.as_ref());
    svc.mem_limit.is_none() && limits.and_then(|l| l.memory.as_ref()).is_none()
}

/// An address range in CIDR notation (`172.28.0.0/16`, `fd00::/64`). Hand-written: the
/// bundler needs only "is this address inside", not a crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    base: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = text.split_once('/')?;
        let base: IpAddr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { base, prefix })
    }

    /// The address as a number, and the bit width of its family.
    fn bits(ip: IpAddr) -> (u128, u32) {
        match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ((base, width), (ip, ip_width)) = (Self::bits(self.base), Self::bits(ip));
        if width != ip_width {
            return false;
        }
        let host_bits = width - u32::from(self.prefix);
        let mask = if host_bits >= 128 { 0 } else { !0u128 << host_bits };
        (base & mask) == (ip & mask)
    }

    fn contains_range(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.base)
    }
}
