//! Deciding effects: what to write, create, start and remove to move the device from
//! what was observed to the desired state.
//!
//! The same plan serves the apply path (a new bundle), the rollback path (the last good
//! bundle) and drift repair (the current bundle against a drifted device): only the
//! inputs differ. Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use fleet_spec::messages::DriftKind;
use fleet_spec::model::{ContainerSpec, DesiredState, NetworkOptions, RestartPolicy};

use crate::engine::{
    ObservedContainer, ObservedNetwork, LABEL_APP, LABEL_FLEET, LABEL_MANAGED, LABEL_SPEC_HASH,
};

/// What is on disk at a managed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDisk {
    pub sha256: String,
    pub mode: u32,
}

/// One file to (re)write, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: String,
    /// `None` when the file is new to the agent; otherwise the drift kind a repair reports.
    pub drift: Option<DriftKind>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilePlan {
    pub write: Vec<FileWrite>,
    /// Paths the agent managed that are no longer desired.
    pub remove: Vec<String>,
}

/// Plans the files: write every desired file whose content or mode differs from disk;
/// remove every path in `managed` (what the agent wrote before) that is not desired.
/// Paths not in `managed` and not desired are never named, so never touched.
pub fn plan_files(
    desired: &DesiredState,
    on_disk: &BTreeMap<String, Option<OnDisk>>,
    managed: &BTreeMap<String, String>,
) -> FilePlan {
    let mut plan = FilePlan::default();
    for file in desired.entries() {
        let want = file.sha256_hex();
        let drift = match on_disk.get(file.path()).cloned().flatten() {
            None => Some(DriftKind::FileMissing),
            Some(d) if d.sha256 != want => Some(DriftKind::FileChanged),
            Some(d) if d.mode & 0o7777 != file.mode() & 0o7777 => Some(DriftKind::FileChanged),
            Some(_) => continue,
        };
        // A file the agent did not manage before is new, not drift.
        let drift = if managed.contains_key(file.path()) { drift } else { None };
        plan.write.push(FileWrite { path: file.path().to_string(), drift });
    }
    let wanted: BTreeSet<&str> = desired.entries().map(|f| f.path()).collect();
    plan.remove = managed.keys().filter(|p| !wanted.contains(p.as_str())).cloned().collect();
    plan
}

/// What a desired container needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Exists with the right spec and runs (or completed as a one-shot).
    Keep,
    /// Exists with the right spec but is stopped.
    Start,
    /// Does not exist.
    Create,
    /// Exists with another spec hash: remove and create.
    Recreate,
}

impl Need {
    /// The drift a repair of this need reports.
    pub fn drift(self) -> Option<DriftKind> {
        match self {
            Need::Keep => None,
            Need::Start => Some(DriftKind::ContainerStopped),
            Need::Create => Some(DriftKind::ContainerMissing),
            Need::Recreate => Some(DriftKind::ContainerChanged),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStep {
    pub name: String,
    pub need: Need,
    /// The label value the container must carry.
    pub spec_hash: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerPlan {
    /// Networks whose spec changed (`ipam`, `driver_opts`, ...): the containers on them
    /// ([`ContainerPlan::detach`]) are removed, the network is removed, and it is
    /// created again with the others of `create_networks`.
    pub recreate_networks: Vec<String>,
    /// Containers to remove before `recreate_networks` are removed; desired ones are
    /// created again by their step (`Need::Create`).
    pub detach: Vec<String>,
    pub create_networks: Vec<String>,
    pub create_volumes: Vec<String>,
    /// Managed containers (of this fleet) that are not desired.
    pub remove_containers: Vec<String>,
    /// Desired containers in dependency order (dependencies first).
    pub steps: Vec<ContainerStep>,
    pub remove_networks: Vec<String>,
    /// Managed volumes not desired and not mounted by any desired container.
    pub remove_volumes: Vec<String>,
}

impl ContainerPlan {
    /// Nothing to do.
    pub fn is_noop(&self) -> bool {
        self.create_networks.is_empty()
            && self.recreate_networks.is_empty()
            && self.create_volumes.is_empty()
            && self.remove_containers.is_empty()
            && self.steps.iter().all(|s| s.need == Need::Keep)
            && self.remove_networks.is_empty()
            && self.remove_volumes.is_empty()
    }
}

/// What the engine reports, reduced to what planning needs.
#[derive(Debug, Clone, Default)]
pub struct EngineView {
    pub containers: Vec<ObservedContainer>,
    pub networks: Vec<ObservedNetwork>,
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("containers depend on each other in a cycle: {0:?}")]
    Cycle(Vec<String>),
}

/// Plans the containers, networks and volumes.
pub fn plan_containers(
    desired: &DesiredState,
    fleet: &str,
    view: &EngineView,
) -> Result<ContainerPlan, PlanError> {
    let ours: Vec<&ObservedContainer> = view.containers.iter().filter(|c| is_ours(c, fleet)).collect();
    let by_name: BTreeMap<&str, &ObservedContainer> = ours.iter().map(|c| (c.name.as_str(), *c)).collect();
    let wanted: BTreeSet<&str> = desired.containers.iter().map(|c| c.name.as_str()).collect();

    // A network is kept when its label names the desired spec; one made before networks
    // were labelled is kept while the desired spec has no options (as it was then made).
    let observed: BTreeMap<&str, &ObservedNetwork> =
        view.networks.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut recreate_networks = Vec::new();
    let mut create_networks = Vec::new();
    for n in &desired.networks {
        match observed.get(n.name.as_str()) {
            None => create_networks.push(n.name.clone()),
            Some(o) => {
                let same = match &o.spec_hash {
                    Some(hash) => *hash == DesiredState::network_hash(n),
                    None => n.options == NetworkOptions::default(),
                };
                if !same {
                    recreate_networks.push(n.name.clone());
                    create_networks.push(n.name.clone());
                }
            }
        }
    }
    let moved: BTreeSet<&str> = recreate_networks.iter().map(String::as_str).collect();
    let on_moved = |c: &ContainerSpec| {
        c.network_mode.is_none() && c.networks.iter().any(|a| moved.contains(a.network.as_str()))
    };
    let detach: Vec<String> = if moved.is_empty() {
        Vec::new()
    } else {
        // Desired containers on a recreated network, and every container going away
        // (it may sit on it too): the engine removes no network with endpoints.
        ours.iter()
            .filter(|c| desired.containers.iter().find(|d| d.name == c.name).is_none_or(&on_moved))
            .map(|c| c.name.clone())
            .collect()
    };
    let mut plan = ContainerPlan {
        recreate_networks,
        create_networks,
        create_volumes: desired
            .volumes
            .iter()
            .filter(|v| !view.volumes.contains(&v.name))
            .map(|v| v.name.clone())
            .collect(),
        remove_containers: ours
            .iter()
            .filter(|c| !wanted.contains(c.name.as_str()) && !detach.contains(&c.name))
            .map(|c| c.name.clone())
            .collect(),
        ..ContainerPlan::default()
    };
    for spec in dependency_order(&desired.containers)? {
        let spec_hash = desired.container_hash(spec);
        let need = match by_name.get(spec.name.as_str()) {
            None => Need::Create,
            Some(_) if detach.contains(&spec.name) => Need::Create,
            Some(c) if c.spec_hash() != Some(spec_hash.as_str()) => Need::Recreate,
            Some(c) if c.running || completed_one_shot(spec, c) => Need::Keep,
            Some(_) => Need::Start,
        };
        plan.steps.push(ContainerStep { name: spec.name.clone(), need, spec_hash });
    }
    let wanted_networks: BTreeSet<&str> = desired.networks.iter().map(|n| n.name.as_str()).collect();
    plan.remove_networks = view
        .networks
        .iter()
        .filter(|n| !wanted_networks.contains(n.name.as_str()))
        .map(|n| n.name.clone())
        .collect();
    plan.detach = detach;
    let wanted_volumes: BTreeSet<&str> = desired.volumes.iter().map(|v| v.name.as_str()).collect();
    let mounted: BTreeSet<&str> = desired
        .containers
        .iter()
        .flat_map(|c| c.mounts.iter())
        .filter_map(|m| match &m.source {
            fleet_spec::model::MountSource::Volume(v) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    plan.remove_volumes = view
        .volumes
        .iter()
        .filter(|v| !wanted_volumes.contains(v.as_str()) && !mounted.contains(v.as_str()))
        .cloned()
        .collect();
    Ok(plan)
}

/// Whether an observed container belongs to this agent and this fleet.
pub fn is_ours(c: &ObservedContainer, fleet: &str) -> bool {
    c.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true")
        && c.labels.get(LABEL_FLEET).is_none_or(|f| f == fleet)
}

/// A container with `restart: no` that exited 0 has done its job (an init step).
pub fn completed_one_shot(spec: &ContainerSpec, c: &ObservedContainer) -> bool {
    !c.running && spec.restart == RestartPolicy::No && c.exit_code == Some(0)
}

/// The labels the agent puts on a container it creates.
pub fn container_labels(spec: &ContainerSpec, fleet: &str, spec_hash: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_FLEET.to_string(), fleet.to_string()),
        (LABEL_APP.to_string(), spec.app.clone()),
        (LABEL_SPEC_HASH.to_string(), spec_hash.to_string()),
    ])
}

/// The labels the agent puts on networks and volumes it creates.
pub fn object_labels(fleet: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_FLEET.to_string(), fleet.to_string()),
    ])
}

/// Containers sorted so that each comes after the containers it depends on; ties by
/// name. Dependencies on containers outside the state are ignored (the bundler checks
/// them); a cycle is an error.
pub fn dependency_order(containers: &[ContainerSpec]) -> Result<Vec<&ContainerSpec>, PlanError> {
    let names: BTreeSet<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = containers
        .iter()
        .map(|c| {
            let deps = c
                .depends_on
                .iter()
                .map(|d| d.container.as_str())
                .filter(|d| names.contains(d) && *d != c.name)
                .collect();
            (c.name.as_str(), deps)
        })
        .collect();
    let mut out = Vec::with_capacity(containers.len());
    while !remaining.is_empty() {
        let ready: Vec<&str> =
            remaining.iter().filter(|(_, deps)| deps.is_empty()).map(|(n, _)| *n).collect();
        if ready.is_empty() {
            return Err(PlanError::Cycle(remaining.keys().map(|s| s.to_string()).collect()));
        }
        for name in ready {
            remaining.remove(name);
            for deps in remaining.values_mut() {
                deps.remove(name);
            }
            if let Some(spec) = containers.iter().find(|c| c.name == name) {
                out.push(spec);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Health;
    use fleet_spec::model::{
        Dependency, DependencyCondition, ManagedFile, Mount, MountSource, NetworkSpec, VolumeSpec,
    };

    fn spec(name: &str, deps: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            app: "app".into(),
            depends_on: deps
                .iter()
                .map(|d| Dependency { container: d.to_string(), condition: DependencyCondition::Started })
                .collect(),
            ..Default::default()
        }
    }

    fn observed(name: &str, hash: &str, running: bool) -> ObservedContainer {
        ObservedContainer {
            id: format!("id-{name}"),
            name: name.into(),
            image: "img".into(),
            labels: container_labels(&spec(name, &[]), "acme", hash),
            running,
            health: Health::None,
            restart_count: 0,
            exit_code: if running { None } else { Some(137) },
        }
    }

    #[test]
    fn dependency_order_puts_dependencies_first_and_finds_cycles() {
        let cs = vec![spec("web", &["db", "cache"]), spec("db", &[]), spec("cache", &["db"])];
        let order: Vec<&str> =
            dependency_order(&cs).expect("acyclic").iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["db", "cache", "web"]);
        let cyclic = vec![spec("a", &["b"]), spec("b", &["a"]), spec("c", &[])];
        assert_eq!(
            dependency_order(&cyclic).expect_err("cycle"),
            PlanError::Cycle(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn containers_are_kept_started_created_or_recreated_by_hash() {
        let state = DesiredState {
            containers: vec![spec("a", &[]), spec("b", &[]), spec("c", &[]), spec("d", &[])],
            ..Default::default()
        };
        let hash =
            |n: &str| state.container_hash(state.containers.iter().find(|c| c.name == n).expect("spec"));
        let mut foreign = observed("x", "h", true);
        foreign.labels.remove(LABEL_MANAGED);
        let mut other_fleet = observed("y", "h", true);
        other_fleet.labels.insert(LABEL_FLEET.into(), "other".into());
        let view = EngineView {
            containers: vec![
                observed("a", &hash("a"), true),
                observed("b", &hash("b"), false),
                observed("c", "stale", true),
                observed("old", "h", true),
                foreign,
                other_fleet,
            ],
            ..Default::default()
        };
        let plan = plan_containers(&state, "acme", &view).expect("plan");
        let needs: Vec<(&str, Need)> = plan.steps.iter().map(|s| (s.name.as_str(), s.need)).collect();
        assert_eq!(
            needs,
            [("a", Need::Keep), ("b", Need::Start), ("c", Need::Recreate), ("d", Need::Create)]
        );
        assert_eq!(plan.remove_containers, ["old"], "never a foreign or other fleet's container");
    }

    #[test]
    fn a_network_whose_spec_changed_is_recreated_with_the_containers_on_it() {
        let on = |name: &str, net: &str| ContainerSpec {
            networks: vec![fleet_spec::model::NetworkAttachment { network: net.into(), aliases: vec![] }],
            ..spec(name, &[])
        };
        let mut pinned = NetworkSpec { name: "app_dns".into(), ..Default::default() };
        pinned.options.ipam =
            vec![fleet_spec::model::IpamPool { subnet: "10.9.0.0/24".into(), ..Default::default() }];
        let plain = NetworkSpec { name: "app_default".into(), ..Default::default() };
        let state = DesiredState {
            containers: vec![on("dns", "app_dns"), on("web", "app_default")],
            networks: vec![pinned.clone(), plain.clone()],
            ..Default::default()
        };
        let hash =
            |n: &str| state.container_hash(state.containers.iter().find(|c| c.name == n).expect("spec"));
        let containers = vec![
            observed("dns", &hash("dns"), true),
            observed("web", &hash("web"), true),
            observed("old", "h", true),
        ];
        // `app_dns` was made without the pool (by an older spec, or before networks were
        // labelled); `app_default` before networks were labelled, with no options: kept.
        for stale in [
            None,
            Some(DesiredState::network_hash(&NetworkSpec {
                options: NetworkOptions::default(),
                ..pinned.clone()
            })),
        ] {
            let view = EngineView {
                containers: containers.clone(),
                networks: vec![
                    ObservedNetwork { name: "app_dns".into(), spec_hash: stale },
                    ObservedNetwork { name: "app_default".into(), spec_hash: None },
                ],
                ..Default::default()
            };
            let plan = plan_containers(&state, "acme", &view).expect("plan");
            assert_eq!(plan.recreate_networks, ["app_dns"]);
            assert_eq!(plan.create_networks, ["app_dns"]);
            assert_eq!(plan.detach, ["dns", "old"], "what sits on it, and what goes anyway");
            assert!(plan.remove_containers.is_empty());
            let needs: Vec<(&str, Need)> = plan.steps.iter().map(|s| (s.name.as_str(), s.need)).collect();
            assert_eq!(needs, [("dns", Need::Create), ("web", Need::Keep)]);
        }
        let view = EngineView {
            containers,
            networks: vec![
                ObservedNetwork {
                    name: "app_dns".into(),
                    spec_hash: Some(DesiredState::network_hash(&pinned)),
                },
                ObservedNetwork {
                    name: "app_default".into(),
                    spec_hash: Some(DesiredState::network_hash(&plain)),
                },
            ],
            ..Default::default()
        };
        let plan = plan_containers(&state, "acme", &view).expect("plan");
        assert!(
            plan.recreate_networks.is_empty() && plan.detach.is_empty() && plan.create_networks.is_empty()
        );
    }

    #[test]
    fn volumes_still_mounted_are_never_removed() {
        let mut web = spec("web", &[]);
        web.mounts.push(Mount {
            source: MountSource::Volume("app_data".into()),
            target: "/d".into(),
            read_only: false,
        });
        let state = DesiredState {
            containers: vec![web],
            volumes: vec![VolumeSpec { name: "app_data".into(), ..Default::default() }],
            ..Default::default()
        };
        let view = EngineView { volumes: vec!["app_data".into(), "gone".into()], ..Default::default() };
        let plan = plan_containers(&state, "acme", &view).expect("plan");
        assert_eq!(plan.remove_volumes, ["gone"]);
        assert!(plan.create_volumes.is_empty());
    }

    #[test]
    fn files_plan_writes_drift_and_removes_only_managed_paths() {
        let file =
            |p: &str, c: &[u8]| ManagedFile { path: p.into(), mode: 0o644, owner: None, content: c.to_vec() };
        let state = DesiredState {
            files: vec![
                file("/r/same", b"1"),
                file("/r/edited", b"2"),
                file("/r/gone", b"3"),
                file("/r/new", b"4"),
            ],
            ..Default::default()
        };
        let sha = |c: &[u8]| file("/x", c).content_sha256();
        let on_disk = BTreeMap::from([
            ("/r/same".to_string(), Some(OnDisk { sha256: sha(b"1"), mode: 0o644 })),
            ("/r/edited".to_string(), Some(OnDisk { sha256: sha(b"edited"), mode: 0o644 })),
            ("/r/gone".to_string(), None),
            ("/r/new".to_string(), None),
        ]);
        let managed = BTreeMap::from([
            ("/r/same".to_string(), sha(b"1")),
            ("/r/edited".to_string(), sha(b"2")),
            ("/r/gone".to_string(), sha(b"3")),
            ("/r/retired".to_string(), sha(b"5")),
        ]);
        let plan = plan_files(&state, &on_disk, &managed);
        assert_eq!(
            plan.write,
            [
                FileWrite { path: "/r/edited".into(), drift: Some(DriftKind::FileChanged) },
                FileWrite { path: "/r/gone".into(), drift: Some(DriftKind::FileMissing) },
                FileWrite { path: "/r/new".into(), drift: None },
            ]
        );
        assert_eq!(plan.remove, ["/r/retired"]);
    }
}
