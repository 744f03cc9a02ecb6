//! Property tests: every encoded type decodes to what was encoded, and the desired
//! state's encoding is canonical (order of input collections does not matter).

use std::collections::BTreeMap;

use fleet_spec::bundle::{assemble, decode_manifest, manifest_for, parse, BundleMeta, Limits};
use fleet_spec::keys::{PublicKey, SigningKey};
use fleet_spec::messages::{
    Announcement, Applied, ContainerStatus, DeviceState, DriftKind, Event, EventKind, FileCounts, LastError,
    StatusReport, VersionRef,
};
use fleet_spec::model::*;
use fleet_spec::topic::{Topic, TopicKind};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,20}"
}

fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}

fn file() -> impl Strategy<Value = ManagedFile> {
    (
        "/[a-z]{1,8}/[a-z.]{1,12}",
        any::<u32>(),
        option::of((any::<u32>(), any::<u32>())),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(path, mode, owner, content)| ManagedFile {
            path,
            mode: mode & 0o7777,
            owner: owner.map(|(uid, gid)| Owner { uid, gid }),
            content,
        })
}

fn mount() -> impl Strategy<Value = Mount> {
    let source = prop_oneof![
        text().prop_map(MountSource::Bind),
        id().prop_map(MountSource::Volume),
        Just(MountSource::Tmpfs)
    ];
    (source, text(), any::<bool>()).prop_map(|(source, target, read_only)| Mount {
        source,
        target,
        read_only,
    })
}

fn container() -> impl Strategy<Value = ContainerSpec> {
    let basics = (
        id(),
        id(),
        id(),
        (text(), option::of("sha256:[0-9a-f]{64}")),
        option::of(vec(text(), 0..3)),
        option::of(vec(text(), 0..3)),
        btree_map(id(), text(), 0..3),
        option::of(text()),
    );
    let more = (
        vec((option::of(text()), option::of(any::<u16>()), any::<u16>(), any::<bool>()), 0..3),
        vec(mount(), 0..3),
        vec((id(), vec(id(), 0..2)), 0..2),
        prop_oneof![
            Just(RestartPolicy::No),
            Just(RestartPolicy::Always),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::UnlessStopped)
        ],
        option::of((vec(text(), 1..3), option::of(any::<u64>()), option::of(any::<u32>()))),
        vec((id(), 0u8..3), 0..3),
        (any::<bool>(), option::of(any::<u64>()), option::of(any::<u64>()), option::of(text())),
    );
    (basics, more, options()).prop_map(
        |(
            (name, app, service, (reference, digest), command, entrypoint, env, user),
            (
                ports,
                mounts,
                networks,
                restart,
                health,
                deps,
                (privileged, memory_bytes, nano_cpus, stop_signal),
            ),
            options,
        )| ContainerSpec {
            name,
            app,
            service,
            image: ImageRef { reference, digest },
            command,
            entrypoint,
            env,
            user,
            hostname: None,
            ports: ports
                .into_iter()
                .map(|(host_ip, host_port, container_port, udp)| PortMapping {
                    host_ip,
                    host_port,
                    container_port,
                    protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                })
                .collect(),
            expose: vec![],
            mounts,
            networks: networks
                .into_iter()
                .map(|(network, aliases)| NetworkAttachment { network, aliases })
                .collect(),
            network_mode: None,
            restart,
            healthcheck: health.map(|(test, interval_ms, retries)| Healthcheck {
                test,
                interval_ms,
                timeout_ms: None,
                retries,
                start_period_ms: None,
            }),
            labels: BTreeMap::new(),
            depends_on: deps
                .into_iter()
                .map(|(container, c)| Dependency {
                    container,
                    condition: match c {
                        0 => DependencyCondition::Started,
                        1 => DependencyCondition::Healthy,
                        _ => DependencyCondition::CompletedSuccessfully,
                    },
                })
                .collect(),
            devices: vec![],
            cap_add: vec![],
            cap_drop: vec![],
            privileged,
            stop_signal,
            memory_bytes,
            nano_cpus,
            options,
        },
    )
}

fn options() -> impl Strategy<Value = ContainerOptions> {
    (
        option::of((id(), btree_map(id(), text(), 0..3))),
        (option::of(any::<bool>()), any::<bool>(), any::<bool>(), any::<bool>()),
        (vec(text(), 0..2), option::of(text()), option::of(any::<u64>()), option::of(any::<u64>())),
        (btree_map(id(), text(), 0..2), btree_map(id(), (any::<i64>(), any::<i64>()), 0..2)),
        (vec(text(), 0..2), vec(text(), 0..2), option::of(any::<i64>()), option::of(any::<i64>())),
        (option::of(text()), option::of(text()), option::of(text())),
    )
        .prop_map(
            |(
                logging,
                (init, read_only, tty, stdin_open),
                (security_opt, working_dir, shm_size_bytes, stop_timeout_s),
                (sysctls, ulimits),
                (extra_hosts, dns, oom_score_adj, pids_limit),
                (cpuset, ipc, pid),
            )| ContainerOptions {
                logging: logging.map(|(driver, options)| LogConfig { driver, options }),
                init,
                read_only,
                security_opt,
                working_dir,
                shm_size_bytes,
                sysctls,
                ulimits: ulimits.into_iter().map(|(k, (soft, hard))| (k, Ulimit { soft, hard })).collect(),
                extra_hosts,
                tty,
                stdin_open,
                stop_timeout_s,
                dns,
                dns_search: vec![],
                dns_opt: vec![],
                group_add: vec![],
                oom_score_adj,
                pids_limit,
                cpuset,
                ipc,
                pid,
                ..Default::default()
            },
        )
}

fn maintenance() -> impl Strategy<Value = fleet_spec::maintenance::Maintenance> {
    let window = (any::<u8>(), 0u16..1440, 0u16..1440).prop_map(|(days, from_min, to_min)| {
        fleet_spec::maintenance::Window { days: days & 0x7f, from_min, to_min }
    });
    prop_oneof![
        Just(fleet_spec::maintenance::Maintenance::default()),
        (vec(window, 0..3), text(), text(), option::of(any::<u64>())).prop_map(
            |(windows, timezone, tz_rule, max_deferral_s)| fleet_spec::maintenance::Maintenance {
                windows,
                timezone,
                tz_rule,
                max_deferral_s,
            }
        ),
    ]
}

fn desired_state() -> impl Strategy<Value = DesiredState> {
    (
        vec(file(), 0..4),
        vec(container(), 0..3),
        vec((id(), any::<bool>()), 0..3),
        vec(id(), 0..3),
        maintenance(),
        // Sealed secrets: opaque bytes to the format (format 4 when present).
        vec(any::<u8>(), 0..48),
    )
        .prop_map(|(files, containers, networks, volumes, maintenance, sealed)| DesiredState {
            maintenance,
            sealed,
            files,
            containers,
            networks: networks
                .into_iter()
                .map(|(name, internal)| NetworkSpec { name, internal, ..Default::default() })
                .collect(),
            volumes: volumes.into_iter().map(|name| VolumeSpec { name, labels: BTreeMap::new() }).collect(),
            ..Default::default()
        })
}

fn meta() -> impl Strategy<Value = BundleMeta> {
    (id(), id(), any::<u64>(), "[0-9a-f]{40}", text(), any::<i64>(), any::<i64>()).prop_map(
        |(fleet, device, version, commit, subject, created_at, expires_at)| BundleMeta {
            fleet,
            device,
            version,
            commit,
            subject,
            created_at,
            expires_at,
        },
    )
}

fn device_state() -> impl Strategy<Value = DeviceState> {
    prop_oneof![
        Just(DeviceState::Idle),
        Just(DeviceState::Downloading),
        Just(DeviceState::Applying),
        Just(DeviceState::AwaitingHealth),
        Just(DeviceState::Converged),
        Just(DeviceState::Failed),
        Just(DeviceState::RolledBack),
        Just(DeviceState::Degraded),
        Just(DeviceState::Waiting),
    ]
}

fn status() -> impl Strategy<Value = StatusReport> {
    (
        (id(), id(), text(), device_state()),
        option::of((any::<u64>(), "[0-9a-f]{64}", "[0-9a-f]{40}")),
        option::of((any::<u64>(), "[0-9a-f]{64}", "[0-9a-f]{40}", any::<i64>())),
        vec((id(), text(), any::<bool>(), text(), any::<u64>()), 0..3),
        (any::<u64>(), any::<u64>()),
        option::of((id(), text(), any::<i64>())),
        any::<i64>(),
    )
        .prop_map(
            |((device, fleet, agent_version, state), desired, applied, containers, files, err, timestamp)| {
                StatusReport {
                    device,
                    fleet,
                    agent_version,
                    state,
                    desired: desired.map(|(version, digest, commit)| VersionRef { version, digest, commit }),
                    applied: applied.map(|(version, digest, commit, at)| Applied {
                        version,
                        digest,
                        commit,
                        at,
                    }),
                    containers: containers
                        .into_iter()
                        .map(|(name, image, running, health, restarts)| ContainerStatus {
                            name,
                            image,
                            running,
                            health,
                            restarts,
                        })
                        .collect(),
                    files: FileCounts { managed: files.0, drift_repaired: files.1 },
                    last_error: err.map(|(code, message, at)| LastError { code, message, at }),
                    waiting: None,
                    agent_update: None,
                    timestamp,
                }
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    let kind = prop_oneof![
        ("[0-9a-f]{64}", id(), text()).prop_map(|(digest, code, reason)| EventKind::BundleRejected {
            digest,
            code,
            reason
        }),
        (any::<u64>(), text()).prop_map(|(version, commit)| EventKind::ApplyStarted { version, commit }),
        (any::<u64>(), text()).prop_map(|(version, commit)| EventKind::ApplyFinished { version, commit }),
        (any::<u64>(), id(), text()).prop_map(|(version, code, reason)| EventKind::ApplyFailed {
            version,
            code,
            reason
        }),
        (any::<u64>(), option::of(any::<u64>()), text()).prop_map(|(from_version, to_version, reason)| {
            EventKind::RolledBack { from_version, to_version, reason }
        }),
        (0u8..5, text()).prop_map(|(k, name)| EventKind::DriftRepaired {
            kind: [
                DriftKind::FileChanged,
                DriftKind::FileMissing,
                DriftKind::ContainerMissing,
                DriftKind::ContainerStopped,
                DriftKind::ContainerChanged
            ][k as usize],
            name
        }),
    ];
    (id(), any::<i64>(), kind).prop_map(|(device, at, kind)| Event { device, at, kind })
}

proptest! {
    #[test]
    fn desired_state_round_trips(state in desired_state()) {
        let mut canonical = state.clone();
        canonical.canonicalize();
        prop_assert_eq!(DesiredState::decode(&state.encode(), state.format()).expect("decodes"), canonical);
    }

    #[test]
    fn desired_state_encoding_ignores_input_order(mut state in desired_state()) {
        // Duplicates too must have one canonical order.
        if let Some(first) = state.files.first().cloned() {
            state.files.push(ManagedFile { content: b"other".to_vec(), ..first });
        }
        let mut reversed = state.clone();
        reversed.files.reverse();
        reversed.containers.reverse();
        reversed.networks.reverse();
        reversed.volumes.reverse();
        prop_assert_eq!(state.encode(), reversed.encode());
        prop_assert_eq!(state.digest(), reversed.digest());
    }

    #[test]
    fn bundle_sections_round_trip(meta in meta(), state in desired_state(), seed in any::<[u8; 32]>()) {
        let key = SigningKey::from_seed(&seed);
        let raw = state.encode();
        let payload = zstd::bulk::compress(&raw, 3).expect("compress");
        let manifest = manifest_for(meta, &raw, &payload);
        let bytes = assemble(&manifest, state.format(), &payload, &[&key]);
        let parsed = parse(&bytes, &Limits::default()).expect("parses");
        prop_assert_eq!(decode_manifest(parsed.manifest_bytes).expect("manifest"), manifest);
        prop_assert_eq!(parsed.payload, &payload[..]);
        prop_assert_eq!(parsed.signatures[0].0, key.public().id());
    }

    #[test]
    fn keys_round_trip(seed in any::<[u8; 32]>()) {
        let key = SigningKey::from_seed(&seed);
        let again: SigningKey = key.to_secret_line().parse().expect("secret");
        prop_assert_eq!(again.public(), key.public());
        let public: PublicKey = key.public().to_string().parse().expect("public");
        prop_assert_eq!(public, key.public());
    }

    #[test]
    fn announcement_round_trips(
        fleet in id(), device in id(), version in any::<u64>(), commit in "[0-9a-f]{40}",
        digest in "[0-9a-f]{64}", size in any::<u64>(), urls in vec(text(), 0..3), mqtt_blob in any::<bool>()
    ) {
        let a = Announcement { fleet, device, version, commit, digest, size, urls, mqtt_blob };
        prop_assert_eq!(Announcement::from_json(&a.to_json()).expect("parses"), a);
    }

    #[test]
    fn status_report_round_trips(report in status()) {
        prop_assert_eq!(StatusReport::from_json(&report.to_json()).expect("parses"), report);
    }

    #[test]
    fn event_round_trips(event in event()) {
        prop_assert_eq!(Event::from_json(&event.to_json()).expect("parses"), event);
    }

    #[test]
    fn topics_round_trip(fleet in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}", device in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}", k in 0usize..5) {
        let topic = Topic::new("fleet", &fleet, &device, TopicKind::ALL[k]).expect("valid");
        prop_assert_eq!(Topic::parse("fleet", &topic.to_string()).expect("parses"), topic);
    }
}
