//! `DockerEngine` against the real engines: a `dockerd` and a podman Docker-compatible
//! service, each started by the fleet-e2e harness ([`Dockerd`], [`Podman`]), with a real
//! Docker Distribution registry that wants credentials, holding a tiny FROM-scratch
//! busybox image built by the engine under test ([`build_busybox_image`]).
//!
//! One test per engine walks through everything the agent does with containers (pull by
//! digest, create with every kind of mount/port/network/healthcheck, list, health,
//! events, remove, volumes surviving recreation) and checks that unmanaged objects are
//! never listed nor touched. The two run in parallel (the podman one waits while another
//! test process holds the harness's podman lock); each takes about 10 s.
//!
//! Needs root and the packages of `scripts/setup.sh` (`docker.io`, `podman`, `runc`,
//! `netavark`, `aardvark-dns`, `docker-registry`, `busybox-static`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_agent::engine::docker::DockerEngine;
use fleet_agent::engine::{
    Engine, EngineError, EngineEvent, Health, ObservedContainer, RegistryAuth, LABEL_APP, LABEL_MANAGED,
    LABEL_SPEC_HASH,
};
use fleet_e2e::{
    build_busybox_image, engine_request, free_port, http_get, log_tail, push_image, require_program,
    wait_until, Dockerd, Engine as HarnessEngine, Podman,
};
use fleet_spec::model::{
    BlkioConfig, ContainerOptions, ContainerSpec, DesiredState, DeviceMapping, GpuRequest, Healthcheck, Hook,
    ImageRef, IpamPool, LogConfig, Mount, MountSource, NetworkAttachment, NetworkSpec, PortMapping, Protocol,
    RestartPolicy, StaticAddresses, Ulimit, VolumeSpec,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// The lab: one engine, one registry, one image; stopped on drop.
// ---------------------------------------------------------------------------------------

/// The engine under test. The harness removes its containers and networks, stops it and
/// unmounts what it left when it is dropped.
enum TestEngine {
    Docker(Dockerd),
    Podman(Podman),
}

impl HarnessEngine for TestEngine {
    fn socket_path(&self) -> &Path {
        match self {
            TestEngine::Docker(dockerd) => dockerd.socket_path(),
            TestEngine::Podman(podman) => podman.socket_path(),
        }
    }

    fn work_dir(&self) -> &Path {
        match self {
            TestEngine::Docker(dockerd) => dockerd.dir(),
            TestEngine::Podman(podman) => podman.dir(),
        }
    }
}

impl TestEngine {
    fn name(&self) -> &'static str {
        match self {
            TestEngine::Docker(_) => "dockerd",
            TestEngine::Podman(_) => "podman",
        }
    }

    fn log_tail(&self) -> String {
        let log = match self {
            TestEngine::Docker(_) => "dockerd.log",
            TestEngine::Podman(_) => "podman.log",
        };
        log_tail(&self.work_dir().join(log), 25)
    }
}

const REGISTRY_USER: &str = "fleet";
const REGISTRY_PASSWORD: &str = "fleet-s3cret";
/// bcrypt (cost 4, to keep the registry quick) of `REGISTRY_PASSWORD`.
const REGISTRY_BCRYPT: &str = "$2b$04$BmIXv13M/W4b2hkZ6pj7B.CrJLElK1nF.JLwx6reAUZ/mOhmQlSjq";

/// Docker Distribution with basic auth (htpasswd), so that pulls need credentials: the
/// harness's `Registry` serves anyone.
struct AuthRegistry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl AuthRegistry {
    fn start() -> AuthRegistry {
        let program = require_program("docker-registry").expect("docker-registry is installed");
        let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir under /tmp");
        let d = dir.path();
        let port = free_port();
        std::fs::write(d.join("htpasswd"), format!("{REGISTRY_USER}:{REGISTRY_BCRYPT}\n")).expect("htpasswd");
        std::fs::write(
            d.join("reg.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\n\
                 http: {{addr: 127.0.0.1:{port}}}\nauth: {{htpasswd: {{realm: fleet-test, path: {}}}}}\n",
                d.join("regdata").display(),
                d.join("htpasswd").display(),
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(d.join("registry.log")).expect("registry log");
        let child = Command::new(program)
            .arg("serve")
            .arg(d.join("reg.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("registry log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let mut registry = AuthRegistry { child, dir, port };
        let addr = registry.addr();
        wait_until(Duration::from_secs(20), "the registry to ask for credentials", || {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    log_tail(&registry.dir.path().join("registry.log"), 25)
                );
            }
            Ok(http_get(&addr, "/v2/")?.0 == 401)
        })
        .expect("docker-registry is up");
        registry
    }

    /// `"127.0.0.1:PORT"`.
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A reference in this registry: `image("x:1")` is `"127.0.0.1:PORT/x:1"`.
    fn image(&self, name_and_tag: &str) -> String {
        format!("{}/{name_and_tag}", self.addr())
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Lab {
    // Dropped in this order: the engine (and its containers, which bind-mount `files`)
    // first.
    engine: TestEngine,
    registry: AuthRegistry,
    /// Host files and directories the containers mount.
    files: tempfile::TempDir,
    /// The test image, pushed to the registry and then removed from the engine.
    image: ImageRef,
}

impl Lab {
    fn start(engine: TestEngine) -> Lab {
        let registry = AuthRegistry::start();
        let files = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir under /tmp");

        // The image: busybox and its applets, FROM scratch, built by the engine under
        // test, pushed with credentials, then removed from the engine so that the test
        // pulls it.
        let tag = registry.image("fleet-test:1");
        build_busybox_image(&engine, &tag, &["/bin/sh", "-c", "sleep 3600"]).expect("image built");
        let digest = match &engine {
            TestEngine::Docker(dockerd) => {
                let login = ["login", "-u", REGISTRY_USER, "-p", REGISTRY_PASSWORD, &registry.addr()];
                dockerd.docker(&login).expect("docker login");
                push_image(dockerd, &tag).expect("image pushed")
            }
            // `docker login` does not work here: podman's compatible `/auth` pings the
            // registry over HTTPS only, whatever registries.conf allows. Its own CLI
            // pushes with the credentials given.
            TestEngine::Podman(podman) => {
                let digest_file = podman.dir().join("digest");
                let creds = format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}");
                let digest_path = digest_file.to_str().expect("UTF-8 temp path");
                podman
                    .podman(&["push", "-q", "--creds", &creds, "--digestfile", digest_path, &tag])
                    .expect("image pushed");
                std::fs::read_to_string(&digest_file).expect("digest file").trim().to_owned()
            }
        };
        engine.docker(&["rmi", &tag]).expect("image removed from the engine");
        assert!(digest.starts_with("sha256:"), "{digest}");
        Lab { engine, registry, files, image: ImageRef { reference: tag, digest: Some(digest) } }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    fn is_podman(&self) -> bool {
        matches!(self.engine, TestEngine::Podman(_))
    }

    /// One request to the engine's API, behind the adapter's back.
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let body = body.map(Value::to_string);
        let response =
            engine_request(self.engine.socket_path(), method, &format!("/v1.41{path}"), body.as_deref())
                .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
        (response.status, response.text())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.engine.name(), self.engine.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for the scenario.
// ---------------------------------------------------------------------------------------

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_APP.to_owned(), "ft".to_owned())])
}

/// Polls `inspect(name)` until `done` holds for it.
async fn inspect_until(
    lab: &Lab,
    engine: &DockerEngine,
    name: &str,
    what: &str,
    done: impl Fn(&ObservedContainer) -> bool,
) -> ObservedContainer {
    let start = Instant::now();
    loop {
        // What the agent does for podman, which runs no healthcheck by itself without
        // systemd (this machine has none); dockerd runs its own and says so.
        let next = engine.run_healthcheck(name).await.expect("run_healthcheck works");
        assert_eq!(next.is_some(), lab.is_podman(), "{}: {next:?}", lab.engine.name());
        let observed =
            engine.inspect(name).await.expect("inspect works").unwrap_or_else(|| panic!("{name} exists"));
        if done(&observed) {
            return observed;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: {what} never happened; last: {observed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn image_spec(lab: &Lab, name: &str, command: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        app: "ft".to_owned(),
        service: name.trim_start_matches("ft-").to_owned(),
        image: lab.image.clone(),
        command: Some(vec!["sh".into(), "-c".into(), command.into()]),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// The scenario, the same for both engines.
// ---------------------------------------------------------------------------------------

async fn scenario(lab: &Lab) {
    let engine = DockerEngine::new(lab.engine.socket_path().to_path_buf());
    engine.ping().await.expect("ping");

    // 1. Images: absent, pulled by digest with credentials (X-Registry-Auth), present;
    //    failed pulls (no or wrong credentials, unknown tag, registry down) are `Pull`
    //    errors.
    let image = &lab.image;
    assert!(
        !engine.image_present(image).await.expect("image_present"),
        "the image was removed after the push"
    );
    let server = lab.registry.addr();
    let auth = RegistryAuth { username: REGISTRY_USER.into(), password: REGISTRY_PASSWORD.into(), server };
    let wrong = RegistryAuth { password: "wrong".into(), ..auth.clone() };
    for credentials in [None, Some(&wrong)] {
        match engine.pull(image, None, credentials).await {
            Err(EngineError::Pull { image: reference, message }) => {
                assert_eq!(reference, image.pull_reference());
                assert!(!message.is_empty());
            }
            other => panic!("pulling with credentials {credentials:?}: {other:?}"),
        }
    }
    assert!(!engine.image_present(image).await.expect("image_present"));
    engine.pull(image, None, Some(&auth)).await.expect("pull by digest");
    assert!(engine.image_present(image).await.expect("image_present"));
    let by_tag = ImageRef { reference: image.reference.clone(), digest: None };
    engine.pull(&by_tag, None, Some(&auth)).await.expect("pull by tag");
    assert!(engine.image_present(&by_tag).await.expect("image_present"));
    // Compose `platform`: the engine is asked for that variant.
    let native = format!("linux/{}", host_arch());
    engine.pull(&by_tag, Some(&native), Some(&auth)).await.expect("pull for the host's platform");
    // Both engines take a single-platform image for any platform asked at pull time;
    // dockerd refuses to create a container of the wrong platform (below).
    let foreign = engine.pull(&by_tag, Some("linux/s390x"), Some(&auth)).await;
    eprintln!("pull for linux/s390x: {foreign:?}");
    let missing = ImageRef { reference: lab.registry.image("fleet-test:nope"), digest: None };
    match engine.pull(&missing, None, Some(&auth)).await {
        Err(EngineError::Pull { image, message }) => {
            assert_eq!(image, missing.reference);
            assert!(message.contains("nope") || message.contains("manifest"), "{message}");
        }
        other => panic!("pulling a missing tag: {other:?}"),
    }
    let dead_registry = ImageRef { reference: format!("127.0.0.1:{}/x:1", free_port()), digest: None };
    assert!(matches!(engine.pull(&dead_registry, None, None).await, Err(EngineError::Pull { .. })));

    // 2. Networks and volumes: created twice (idempotent), listed by label.
    for name in ["ft_front", "ft_back"] {
        let spec = NetworkSpec { name: name.into(), ..Default::default() };
        engine.create_network(&spec, &labels()).await.expect("create network");
        engine.create_network(&spec, &labels()).await.expect("create an existing network");
    }
    assert_eq!(network_names(&engine).await, ["ft_back", "ft_front"]);
    let volume = VolumeSpec { name: "ft_data".into(), labels: BTreeMap::from([("k".into(), "v".into())]) };
    engine.create_volume(&volume, &labels()).await.expect("create volume");
    engine.create_volume(&volume, &labels()).await.expect("create an existing volume");
    assert_eq!(engine.list_managed_volumes("acme").await.expect("list volumes"), ["ft_data"]);

    // 3. A web server with env, a bind-mounted host file, a named volume, a tmpfs, a
    //    published port, a healthcheck on a host-controlled flag, labels, two networks.
    std::fs::write(lab.path("index.html"), "served from a host file\n").expect("index.html");
    let flags = lab.path("flags");
    std::fs::create_dir_all(&flags).expect("flags dir");
    let port = free_port();
    let mut web = image_spec(
        lab,
        "ft-web",
        "echo \"$GREETING\" > /data/greeting && test -d /scratch && exec httpd -f -p 8080 -h /www",
    );
    web.env = BTreeMap::from([("GREETING".into(), "hello from env".into())]);
    web.hostname = Some("webhost".into());
    web.ports = vec![PortMapping {
        host_ip: Some("127.0.0.1".into()),
        host_port: Some(port),
        container_port: 8080,
        protocol: Protocol::Tcp,
    }];
    web.mounts = vec![
        Mount {
            source: MountSource::Bind(lab.path("index.html").display().to_string()),
            target: "/www/index.html".into(),
            read_only: true,
        },
        Mount {
            source: MountSource::Bind(flags.display().to_string()),
            target: "/flags".into(),
            read_only: false,
        },
        Mount { source: MountSource::Volume("ft_data".into()), target: "/data".into(), read_only: false },
        Mount { source: MountSource::Tmpfs, target: "/scratch".into(), read_only: false },
    ];
    web.networks = vec![
        NetworkAttachment { network: "ft_front".into(), aliases: vec!["web".into()] },
        NetworkAttachment { network: "ft_back".into(), aliases: vec!["web-back".into()] },
    ];
    web.healthcheck = Some(Healthcheck {
        test: vec!["CMD-SHELL".into(), "test -f /flags/ok".into()],
        interval_ms: Some(300),
        timeout_ms: Some(2000),
        retries: Some(1),
        start_period_ms: None,
    });
    web.labels = BTreeMap::from([("team".into(), "qa".into())]);
    web.stop_signal = Some("SIGTERM".into());

    let id = engine.create(&web, &labels()).await.expect("create web");
    assert_eq!(id.len(), 64, "{id}");
    let created = engine.inspect("ft-web").await.expect("inspect").expect("ft-web exists");
    assert_eq!((created.running, created.exit_code), (false, None), "created, never started: {created:?}");
    // The engines resolve id prefixes too; the adapter does not take one for a name.
    assert_eq!(engine.inspect(&id[..12]).await.expect("inspect"), None);
    engine.remove(&id[..12], 1).await.expect("no container has that name");
    assert!(engine.inspect("ft-web").await.expect("inspect").is_some(), "ft-web survived");
    let (_, inspected) = lab.raw("GET", "/containers/ft-web/json", None);
    let inspected: Value = serde_json::from_str(&inspected).expect("inspect JSON");
    assert_eq!(inspected["Config"]["Hostname"], "webhost");
    // podman reports the signal by number.
    let signal = &inspected["Config"]["StopSignal"];
    assert!(signal == "SIGTERM" || signal == "15", "{signal}");
    assert_eq!(inspected["Config"]["Healthcheck"]["Interval"], 300_000_000u64);
    assert_eq!(inspected["Config"]["Healthcheck"]["Retries"], 1);
    let env = inspected["Config"]["Env"].as_array().cloned().unwrap_or_default();
    assert!(env.contains(&json!("GREETING=hello from env")), "{env:?}");
    match engine.create(&web, &labels()).await {
        Err(EngineError::Api { status: 409, .. }) => {}
        other => panic!("creating a second ft-web: {other:?}"),
    }
    engine.start("ft-web").await.expect("start");
    engine.start("ft-web").await.expect("starting a running container is not an error");

    let listed = engine.list_managed().await.expect("list_managed");
    let observed = listed.iter().find(|c| c.name == "ft-web").expect("ft-web is listed");
    assert_eq!(observed.id, id);
    assert_eq!(observed.image, image.pull_reference());
    assert!(observed.running);
    for (key, value) in [("team", "qa"), (LABEL_APP, "ft"), (LABEL_MANAGED, "true")] {
        assert_eq!(observed.labels.get(key).map(String::as_str), Some(value), "label {key}: {observed:?}");
    }
    assert_ne!(observed.health, Health::None, "it has a healthcheck");

    let start = Instant::now();
    let page = loop {
        if let Ok((200, page)) = http_get(&format!("127.0.0.1:{port}"), "/index.html") {
            break page;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "nothing answers on published port {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(page, "served from a host file\n");

    // Health follows the flag file, both ways.
    std::fs::write(flags.join("ok"), "").expect("flag");
    inspect_until(lab, &engine, "ft-web", "healthy", |c| c.health == Health::Healthy).await;
    std::fs::remove_file(flags.join("ok")).expect("flag removed");
    inspect_until(lab, &engine, "ft-web", "unhealthy", |c| c.health == Health::Unhealthy).await;
    let listed = engine.list_managed().await.expect("list_managed");
    assert_eq!(listed.iter().find(|c| c.name == "ft-web").map(|c| c.health), Some(Health::Unhealthy));

    // 4. Another container reaches ft-web by its alias on each network; the second
    //    network of each was attached by `POST /networks/{id}/connect`.
    let out = lab.path("out");
    std::fs::create_dir_all(&out).expect("out dir");
    let fetch = |alias: &str, file: &str| {
        format!("for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O /out/{file} http://{alias}:8080/index.html && break; sleep 0.5; done")
    };
    let mut client = image_spec(
        lab,
        "ft-client",
        &format!(
            "{} && {} && test -s /out/front && test -s /out/back",
            fetch("web", "front"),
            fetch("web-back", "back")
        ),
    );
    client.mounts = vec![Mount {
        source: MountSource::Bind(out.display().to_string()),
        target: "/out".into(),
        read_only: false,
    }];
    client.networks = vec![
        NetworkAttachment { network: "ft_back".into(), aliases: vec!["client".into()] },
        NetworkAttachment { network: "ft_front".into(), aliases: vec![] },
    ];
    engine.create(&client, &labels()).await.expect("create client");
    engine.start("ft-client").await.expect("start client");
    let finished =
        inspect_until(lab, &engine, "ft-client", "exit", |c| !c.running && c.exit_code.is_some()).await;
    assert_eq!(finished.exit_code, Some(0), "the client could not fetch both aliases");
    assert_eq!(std::fs::read_to_string(out.join("front")).expect("front"), "served from a host file\n");
    assert_eq!(std::fs::read_to_string(out.join("back")).expect("back"), "served from a host file\n");

    // 5. A container the agent does not manage is neither listed nor touched; nor are
    //    foreign networks and volumes.
    let unmanaged = json!({
        "Image": image.pull_reference(),
        "Cmd": ["sleep", "300"],
        "Labels": {LABEL_APP: "ft"},
        "HostConfig": {"NetworkMode": "none"},
    });
    let (status, body) = lab.raw("POST", "/containers/create?name=ft-unmanaged", Some(&unmanaged));
    assert_eq!(status, 201, "{body}");
    assert_eq!(lab.raw("POST", "/containers/ft-unmanaged/start", None).0, 204);
    let names: Vec<String> = engine.list_managed().await.expect("list").into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["ft-client", "ft-web"]);
    assert_eq!(engine.inspect("ft-unmanaged").await.expect("inspect"), None);
    match engine.remove("ft-unmanaged", 1).await {
        Err(EngineError::Api { status: 409, message, .. }) => {
            assert!(message.contains(LABEL_MANAGED), "{message}")
        }
        other => panic!("removing an unmanaged container: {other:?}"),
    }
    assert_eq!(lab.raw("GET", "/containers/ft-unmanaged/json", None).0, 200, "it is still there");
    let (status, body) = lab.raw("POST", "/networks/create", Some(&json!({"Name": "ft_foreign"})));
    assert_eq!(status, 201, "{body}");
    assert!(matches!(engine.remove_network("ft_foreign").await, Err(EngineError::Api { status: 409, .. })));
    let (status, body) = lab.raw("POST", "/volumes/create", Some(&json!({"Name": "ft_foreign_vol"})));
    assert_eq!(status, 201, "{body}");
    assert!(matches!(
        engine.remove_volume("ft_foreign_vol").await,
        Err(EngineError::Api { status: 409, .. })
    ));
    assert_eq!(network_names(&engine).await, ["ft_back", "ft_front"]);
    assert_eq!(engine.list_managed_volumes("acme").await.expect("list"), ["ft_data"]);

    // 6. Events: killing ft-web behind the agent's back yields its `die`; killing the
    //    unmanaged one yields nothing. The subscription is made by a wait that is given
    //    up (the engines answer only with the first event) and kept for the next one.
    let quiet = tokio::time::timeout(Duration::from_millis(300), engine.next_event()).await;
    assert!(quiet.is_err(), "no event yet: {quiet:?}");
    let watch = async {
        let mut seen: Vec<EngineEvent> = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), engine.next_event())
                .await
                .unwrap_or_else(|_| panic!("no die event within 20 s; saw {seen:?}"))
                .expect("event stream works")
                .expect("the stream did not end");
            let done = event.name == "ft-web" && event.action == "die";
            seen.push(event);
            if done {
                return seen;
            }
        }
    };
    let act = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(lab.raw("POST", "/containers/ft-unmanaged/kill", None).0, 204);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lab.raw("POST", "/containers/ft-web/kill", None).0, 204);
    };
    let (seen, ()) = tokio::join!(watch, act);
    assert!(seen.iter().all(|e| e.name != "ft-unmanaged"), "events about an unmanaged container: {seen:?}");
    assert!(seen.iter().all(|e| !e.action.starts_with("exec_")), "healthcheck noise: {seen:?}");
    let killed = engine.inspect("ft-web").await.expect("inspect").expect("ft-web is still there");
    assert_eq!((killed.running, killed.exit_code), (false, Some(137)), "{killed:?}");

    // 7. A crashing container with on-failure restarts counts its restarts.
    let mut crasher = image_spec(lab, "ft-crash", "exit 3");
    crasher.restart = RestartPolicy::OnFailure;
    crasher.network_mode = Some("none".into());
    engine.create(&crasher, &labels()).await.expect("create crasher");
    engine.start("ft-crash").await.expect("start crasher");
    inspect_until(lab, &engine, "ft-crash", "a restart", |c| c.restart_count >= 1).await;
    engine.remove("ft-crash", 0).await.expect("remove a restarting container");

    // 8. Remove: stopped, running, never started and missing containers.
    engine.remove("ft-web", 1).await.expect("remove a stopped container");
    assert_eq!(engine.inspect("ft-web").await.expect("inspect"), None);
    engine.remove("ft-web", 1).await.expect("removing a missing container is not an error");
    let mut idle = image_spec(lab, "ft-idle", "sleep 300");
    idle.privileged = true;
    idle.network_mode = Some("none".into());
    engine.create(&idle, &labels()).await.expect("create idle");
    let (_, inspected) = lab.raw("GET", "/containers/ft-idle/json", None);
    let inspected: Value = serde_json::from_str(&inspected).expect("inspect JSON");
    assert_eq!(inspected["HostConfig"]["Privileged"], true);
    engine.remove("ft-idle", 1).await.expect("remove a never-started container");
    // (It also carries the fields not exercised so far, checked as the engine took them.)
    let mut sleeper = image_spec(lab, "ft-sleeper", "trap 'exit 0' TERM; sleep 300 & wait");
    sleeper.entrypoint = Some(vec!["/bin/sh".into(), "-c".into()]);
    sleeper.command = Some(vec!["trap 'exit 0' TERM; sleep 300 & wait".into()]);
    sleeper.network_mode = Some("none".into());
    sleeper.user = Some("65534:65534".into());
    sleeper.devices = vec![DeviceMapping {
        host_path: "/dev/null".into(),
        container_path: "/dev/fleet-null".into(),
        permissions: "rw".into(),
    }];
    sleeper.cap_add = vec!["NET_ADMIN".into()];
    sleeper.cap_drop = vec!["MKNOD".into()];
    sleeper.memory_bytes = Some(64 << 20);
    sleeper.nano_cpus = Some(500_000_000);
    sleeper.restart = RestartPolicy::UnlessStopped;
    engine.create(&sleeper, &labels()).await.expect("create sleeper");
    engine.start("ft-sleeper").await.expect("start sleeper");
    let (_, inspected) = lab.raw("GET", "/containers/ft-sleeper/json", None);
    let inspected: Value = serde_json::from_str(&inspected).expect("inspect JSON");
    assert_eq!(inspected["Config"]["User"], "65534:65534");
    assert_eq!(inspected["Config"]["Entrypoint"], json!(["/bin/sh", "-c"]));
    assert_eq!(inspected["HostConfig"]["Memory"], 64u64 << 20);
    assert_eq!(inspected["HostConfig"]["NanoCpus"], 500_000_000u64);
    assert_eq!(inspected["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped");
    assert_eq!(inspected["HostConfig"]["Devices"][0]["PathInContainer"], "/dev/fleet-null");
    let caps = |key: &str| inspected["HostConfig"][key].to_string();
    assert!(caps("CapAdd").contains("NET_ADMIN"), "{}", caps("CapAdd"));
    assert!(caps("CapDrop").contains("MKNOD"), "{}", caps("CapDrop"));
    assert!(engine.inspect("ft-sleeper").await.expect("inspect").is_some_and(|c| c.running));
    engine.remove("ft-sleeper", 5).await.expect("remove a running container");
    assert_eq!(engine.inspect("ft-sleeper").await.expect("inspect"), None);

    // 9. The volume's data survives the container: a new ft-web reads what the old one
    //    wrote.
    let mut reader = image_spec(lab, "ft-web", "cat /data/greeting > /out/greeting");
    reader.mounts = vec![
        Mount { source: MountSource::Volume("ft_data".into()), target: "/data".into(), read_only: true },
        Mount {
            source: MountSource::Bind(out.display().to_string()),
            target: "/out".into(),
            read_only: false,
        },
    ];
    reader.network_mode = Some("none".into());
    engine.create(&reader, &labels()).await.expect("recreate ft-web");
    engine.start("ft-web").await.expect("start the new ft-web");
    let done = inspect_until(lab, &engine, "ft-web", "exit", |c| !c.running && c.exit_code.is_some()).await;
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(std::fs::read_to_string(out.join("greeting")).expect("greeting"), "hello from env\n");

    // 10. Tear down what is managed; the unmanaged objects stay.
    for name in ["ft-web", "ft-client"] {
        engine.remove(name, 1).await.expect("remove");
    }
    assert!(engine.list_managed().await.expect("list").is_empty());
    for name in ["ft_front", "ft_back"] {
        engine.remove_network(name).await.expect("remove network");
    }
    assert!(engine.list_managed_networks("acme").await.expect("list").is_empty());
    engine.remove_network("ft_back").await.expect("removing a missing network is not an error");
    engine.remove_volume("ft_data").await.expect("remove volume");
    engine.remove_volume("ft_data").await.expect("removing a missing volume is not an error");
    assert!(engine.list_managed_volumes("acme").await.expect("list").is_empty());
    assert_eq!(lab.raw("GET", "/containers/ft-unmanaged/json", None).0, 200);
    assert_eq!(lab.raw("GET", "/volumes/ft_foreign_vol", None).0, 200);
    assert_eq!(lab.raw("GET", "/networks/ft_foreign", None).0, 200);
}

fn run_scenario(start_engine: impl FnOnce() -> TestEngine) {
    let started = Instant::now();
    let lab = Lab::start(start_engine());
    let name = lab.engine.name();
    eprintln!("{name} lab up in {:?}", started.elapsed());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(100), scenario(&lab)).await.expect("scenario within 100 s");
    });
    eprintln!("{name} scenario done in {:?}", started.elapsed());
}

#[test]
fn dockerd_runs_the_whole_container_lifecycle() {
    run_scenario(|| TestEngine::Docker(Dockerd::start().expect("dockerd starts")));
}

#[test]
fn podman_runs_the_whole_container_lifecycle() {
    run_scenario(|| TestEngine::Podman(Podman::start().expect("podman starts")));
}

// ---------------------------------------------------------------------------------------
// `ContainerSpec::options` (the Compose keys `logging`, `init`, `sysctls`, ...), applied
// and visible in `docker inspect`, and in effect inside the running container.
// ---------------------------------------------------------------------------------------

/// Every option at once. The command checks inside the container what it can see (the
/// working directory, the sysctl, the ulimit, /etc/hosts, a read-only root, the MAC
/// address) and exits with 10 + the number of the first check that
/// fails, so "running after a while" means "in effect".
fn options_spec(lab: &Lab) -> ContainerSpec {
    let checks = [
        "test \"$(pwd)\" = /srv",
        "test \"$(cat /proc/sys/net/core/somaxconn)\" = 1000",
        "test \"$(ulimit -n)\" = 512",
        "grep -q 'broker' /etc/hosts",
        "! touch /rootfs-is-writable 2>/dev/null",
        "grep -q 02:42:ac:11:00:09 /sys/class/net/eth0/address",
    ];
    let mut checks = checks.to_vec();
    if !lab.is_podman() {
        // cgroup: private: the container sees its own cgroup as the root.
        checks.push("! grep -q -e docker -e fleet-test /proc/self/cgroup");
    }
    // Check N failing exits with 10 + N.
    let script: String =
        checks.iter().enumerate().map(|(n, check)| format!("{check} || exit {}; ", 10 + n)).collect();
    let mut spec = image_spec(lab, "ft-opts", &format!("{script}exec sleep 3600"));
    spec.options = ContainerOptions {
        logging: Some(LogConfig {
            driver: "json-file".into(),
            options: BTreeMap::from([("max-size".into(), "10m".into()), ("max-file".into(), "3".into())]),
        }),
        init: Some(true),
        read_only: true,
        security_opt: vec!["no-new-privileges:true".into()],
        working_dir: Some("/srv".into()),
        shm_size_bytes: Some(64 << 20),
        sysctls: BTreeMap::from([("net.core.somaxconn".into(), "1000".into())]),
        // podman sets `nproc` to its maximum when only `nofile` is given, which this
        // sandbox forbids (`setrlimit NPROC: operation not permitted`); real devices do not.
        ulimits: BTreeMap::from([
            ("nofile".into(), Ulimit { soft: 512, hard: 1024 }),
            ("nproc".into(), Ulimit { soft: 100, hard: 100 }),
        ]),
        extra_hosts: vec!["broker:10.0.0.5".into()],
        tty: true,
        stdin_open: true,
        stop_timeout_s: Some(7),
        dns: vec!["10.0.0.53".into()],
        dns_search: vec!["fleet.lan".into()],
        dns_opt: vec!["ndots:1".into()],
        group_add: vec!["20".into()],
        oom_score_adj: Some(500),
        pids_limit: Some(100),
        cpuset: Some("0".into()),
        ipc: Some("shareable".into()),
        pid: None,
        mac_address: Some("02:42:ac:11:00:09".into()),
        mem_reservation_bytes: Some(32 << 20),
        memswap_limit_bytes: Some(96 << 20),
        cpu_shares: Some(512),
        cpu_period_us: Some(100_000),
        cpu_quota_us: Some(50_000),
        cgroup_parent: Some("/fleet-test".into()),
        addresses: BTreeMap::new(),
        blkio: BlkioConfig {
            weight: Some(300),
            device_read_bps: vec![(host_block_device(), 1 << 20)],
            device_write_iops: vec![(host_block_device(), 100)],
            ..Default::default()
        },
        storage_opt: BTreeMap::new(),
        uts: None,
        userns_mode: None,
        // podman's compatible API does not apply these two: `create` refuses them there
        // (checked in `options_scenario`).
        cgroupns: (!lab.is_podman()).then(|| "private".into()),
        device_cgroup_rules: if lab.is_podman() { vec![] } else { vec!["c 1:3 rmw".into()] },
        mem_swappiness: Some(10),
        oom_kill_disable: true,
        // Real-time CPU time needs a kernel with CONFIG_RT_GROUP_SCHED.
        cpu_rt_period_us: None,
        cpu_rt_runtime_us: None,
        runtime: Some("runc".into()),
        domainname: (!lab.is_podman()).then(|| "fleet.lan".into()),
        gpus: vec![],
        post_start: vec![],
        pre_stop: vec![],
        pull_policy: None,
        // The test images are built here, for the host's platform.
        platform: Some(format!("linux/{}", host_arch())),
    };
    spec.memory_bytes = Some(64 << 20);
    spec
}

async fn options_scenario(lab: &Lab) {
    let engine = DockerEngine::new(lab.engine.socket_path().to_path_buf());
    let server = lab.registry.addr();
    let auth = RegistryAuth { username: REGISTRY_USER.into(), password: REGISTRY_PASSWORD.into(), server };
    engine.pull(&lab.image, None, Some(&auth)).await.expect("pull by digest");
    let mut spec = options_spec(lab);
    // ipam, driver_opts, static addresses: a subnet of its own per engine (both run at once).
    let subnet = if lab.is_podman() { "172.30.2" } else { "172.30.1" };
    let mut network = NetworkSpec { name: "ft_opts".into(), ..Default::default() };
    let subnet6 = if lab.is_podman() { "fd00:f17:2" } else { "fd00:f17:1" };
    network.options.ipam = vec![
        IpamPool {
            subnet: format!("{subnet}.0/24"),
            ip_range: Some(format!("{subnet}.128/25")),
            gateway: Some(format!("{subnet}.1")),
            aux_addresses: BTreeMap::new(),
        },
        IpamPool { subnet: format!("{subnet6}::/64"), ..Default::default() },
    ];
    network.options.enable_ipv6 = true;
    network.options.driver_opts = BTreeMap::from([("com.docker.network.driver.mtu".into(), "1400".into())]);
    let mut net_labels = labels();
    net_labels.insert(LABEL_SPEC_HASH.into(), DesiredState::network_hash(&network));
    engine.create_network(&network, &net_labels).await.expect("create network");
    let listed = engine.list_managed_networks("acme").await.expect("list");
    let ft_opts = listed.iter().find(|n| n.name == "ft_opts").expect("listed");
    assert_eq!(ft_opts.spec_hash.as_deref(), Some(DesiredState::network_hash(&network).as_str()));
    let (_, inspected) = lab.raw("GET", "/networks/ft_opts", None);
    let n: Value = serde_json::from_str(&inspected).expect("network JSON");
    assert_eq!(n["IPAM"]["Config"][0]["Subnet"], format!("{subnet}.0/24"), "{n}");
    assert_eq!(n["IPAM"]["Config"][0]["Gateway"], format!("{subnet}.1"), "{n}");
    if !lab.is_podman() {
        // podman keeps the range but shows no driver options in its compatible inspect.
        assert_eq!(n["IPAM"]["Config"][0]["IPRange"], format!("{subnet}.128/25"), "{n}");
        assert_eq!(n["Options"]["com.docker.network.driver.mtu"], "1400", "{n}");
    }
    spec.options.addresses = BTreeMap::from([(
        "ft_opts".to_string(),
        StaticAddresses { ipv4: Some(format!("{subnet}.9")), ipv6: Some(format!("{subnet6}::9")) },
    )]);
    spec.networks = vec![NetworkAttachment { network: "ft_opts".into(), aliases: vec!["opts".into()] }];
    // `platform` reaches the engine: dockerd refuses an amd64 image for linux/s390x.
    let foreign = ContainerSpec {
        name: "ft-foreign".into(),
        options: ContainerOptions { platform: Some("linux/s390x".into()), ..Default::default() },
        ..spec.clone()
    };
    let refused = engine.create(&foreign, &labels()).await;
    if lab.is_podman() {
        eprintln!("podman, create for linux/s390x: {refused:?}");
        let _ = engine.remove("ft-foreign", 1).await;
    } else {
        let err = refused.expect_err("dockerd created an amd64 image's container for linux/s390x");
        assert!(err.to_string().contains("platform"), "{err}");
    }
    // device_cgroup_rules, cgroup: podman would take them and not apply them; the
    // adapter refuses.
    if lab.is_podman() {
        let ruled = ContainerSpec {
            name: "ft-ruled".into(),
            options: ContainerOptions { device_cgroup_rules: vec!["c 1:3 rmw".into()], ..Default::default() },
            ..spec.clone()
        };
        let err = engine.create(&ruled, &labels()).await.expect_err("podman and device_cgroup_rules");
        assert!(err.to_string().contains("device_cgroup_rules"), "{err}");
        let private = ContainerSpec {
            name: "ft-cgroupns".into(),
            options: ContainerOptions { cgroupns: Some("private".into()), ..Default::default() },
            ..spec.clone()
        };
        let err = engine.create(&private, &labels()).await.expect_err("podman and cgroup");
        assert!(err.to_string().contains("cgroup"), "{err}");
    }
    // gpus reach the engine: this machine has no GPU driver, which dockerd says.
    let gpu = ContainerSpec {
        name: "ft-gpu".into(),
        options: ContainerOptions {
            gpus: vec![GpuRequest {
                count: Some(-1),
                capabilities: vec!["gpu".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        ..spec.clone()
    };
    let created = engine.create(&gpu, &labels()).await;
    if lab.is_podman() {
        let err = created.expect_err("podman and gpus");
        assert!(err.to_string().contains("gpus"), "{err}");
    } else {
        // dockerd checks device requests when the container starts.
        let started = match created {
            Ok(_) => engine.start("ft-gpu").await,
            Err(e) => Err(e),
        };
        let err = started.expect_err("dockerd started a container asking for GPUs on a machine without any");
        assert!(err.to_string().contains("gpu") || err.to_string().contains("device driver"), "{err}");
        let _ = engine.remove("ft-gpu", 1).await;
    }
    // storage_opt reaches the engine: overlay2 on this machine's ext4 refuses a size.
    let sized = ContainerSpec {
        name: "ft-sized".into(),
        options: ContainerOptions {
            storage_opt: BTreeMap::from([("size".into(), "1G".into())]),
            ..Default::default()
        },
        ..spec.clone()
    };
    match engine.create(&sized, &labels()).await {
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("storage") || text.contains("quota"), "{text}");
        }
        Ok(_) => {
            // A storage driver that takes sizes: it must show in inspect.
            let (_, inspected) = lab.raw("GET", "/containers/ft-sized/json", None);
            let i: Value = serde_json::from_str(&inspected).expect("inspect JSON");
            assert_eq!(i["HostConfig"]["StorageOpt"]["size"], "1G", "{}", i["HostConfig"]);
            engine.remove("ft-sized", 1).await.expect("remove ft-sized");
        }
    }
    engine.create(&spec, &labels()).await.expect("create ft-opts");
    engine.start("ft-opts").await.expect("start ft-opts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, inspected) = lab.raw("GET", "/containers/ft-opts/json", None);
    let i: Value = serde_json::from_str(&inspected).expect("inspect JSON");
    let (config, host) = (&i["Config"], &i["HostConfig"]);
    assert_eq!(i["State"]["Running"], true, "a check inside failed (exit 10 + its number): {}", i["State"]);

    // logging
    let log = &host["LogConfig"];
    if lab.is_podman() {
        // podman's compatible inspect shows no log options; its own shows the size it
        // rotates at (podman has no `max-file`: it keeps one file).
        assert_eq!(log["Type"], "json-file", "{log}");
        let TestEngine::Podman(podman) = &lab.engine else { unreachable!() };
        let native = podman
            .podman(&["inspect", "--format", "{{json .HostConfig.LogConfig}}", "ft-opts"])
            .expect("podman inspect");
        let native: Value = serde_json::from_str(native.trim()).expect("LogConfig JSON");
        assert_eq!(native["Size"], "10MB", "{native}");
    } else {
        assert_eq!(*log, json!({"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}));
    }
    // init: PID 1 is the engine's init (docker-init, or podman's catatonit), not sh.
    let pid1 = lab.engine.docker(&["exec", "ft-opts", "cat", "/proc/1/cmdline"]).expect("docker exec");
    assert!(pid1.contains("init") || pid1.contains("catatonit"), "PID 1 is {pid1:?}");
    let mut wrong = Vec::new();
    // read_only, security_opt, working_dir, shm_size, sysctls, ulimits, extra_hosts
    check(&mut wrong, "HostConfig.ReadonlyRootfs", &host["ReadonlyRootfs"], json!(true));
    let security = host["SecurityOpt"].as_array().cloned().unwrap_or_default();
    assert!(
        security.iter().any(|o| o.as_str().is_some_and(|o| o.starts_with("no-new-privileges"))),
        "{security:?}"
    );
    check(&mut wrong, "Config.WorkingDir", &config["WorkingDir"], json!("/srv"));
    check(&mut wrong, "HostConfig.ShmSize", &host["ShmSize"], json!(64u64 << 20));
    // podman's compatible inspect does not show sysctls; the check inside the container
    // saw it.
    if !lab.is_podman() {
        check(
            &mut wrong,
            "HostConfig.Sysctls.net.core.somaxconn",
            &host["Sysctls"]["net.core.somaxconn"],
            json!("1000"),
        );
    }
    let ulimits = host["Ulimits"].as_array().cloned().unwrap_or_default();
    assert!(
        ulimits.contains(&json!({"Name": "nofile", "Soft": 512, "Hard": 1024}))
            || ulimits.contains(&json!({"Name": "RLIMIT_NOFILE", "Soft": 512, "Hard": 1024})),
        "{ulimits:?}"
    );
    let hosts = host["ExtraHosts"].as_array().cloned().unwrap_or_default();
    assert!(hosts.contains(&json!("broker:10.0.0.5")), "{hosts:?}");
    // tty, stdin_open, stop_grace_period
    check(&mut wrong, "Config.Tty", &config["Tty"], json!(true));
    check(&mut wrong, "Config.OpenStdin", &config["OpenStdin"], json!(true));
    check(&mut wrong, "Config.StopTimeout", &config["StopTimeout"], json!(7));
    // dns, dns_search, dns_opt
    check(&mut wrong, "HostConfig.Dns", &host["Dns"], json!(["10.0.0.53"]));
    check(&mut wrong, "HostConfig.DnsSearch", &host["DnsSearch"], json!(["fleet.lan"]));
    check(&mut wrong, "HostConfig.DnsOptions", &host["DnsOptions"], json!(["ndots:1"]));
    // group_add, oom_score_adj, pids_limit, cpuset, ipc
    check(&mut wrong, "HostConfig.GroupAdd", &host["GroupAdd"], json!(["20"]));
    check(&mut wrong, "HostConfig.OomScoreAdj", &host["OomScoreAdj"], json!(500));
    check(&mut wrong, "HostConfig.PidsLimit", &host["PidsLimit"], json!(100));
    check(&mut wrong, "HostConfig.CpusetCpus", &host["CpusetCpus"], json!("0"));
    check(&mut wrong, "HostConfig.IpcMode", &host["IpcMode"], json!("shareable"));
    // mac_address, mem_reservation, memswap_limit, cpu_shares, cpu_period, cpu_quota,
    // cgroup_parent
    // podman's compatible inspect does not show the MAC address; the check inside the
    // container saw it.
    if !lab.is_podman() {
        check(&mut wrong, "Config.MacAddress", &config["MacAddress"], json!("02:42:ac:11:00:09"));
    }
    check(&mut wrong, "HostConfig.MemoryReservation", &host["MemoryReservation"], json!(32u64 << 20));
    check(&mut wrong, "HostConfig.MemorySwap", &host["MemorySwap"], json!(96u64 << 20));
    check(&mut wrong, "HostConfig.CpuShares", &host["CpuShares"], json!(512));
    check(&mut wrong, "HostConfig.CpuPeriod", &host["CpuPeriod"], json!(100_000));
    check(&mut wrong, "HostConfig.CpuQuota", &host["CpuQuota"], json!(50_000));
    check(&mut wrong, "HostConfig.CgroupParent", &host["CgroupParent"], json!("/fleet-test"));

    // blkio_config: the throttles (the weight needs a kernel I/O scheduler that supports
    // it, which dockerd otherwise discards with a warning).
    let device = host_block_device();
    check(
        &mut wrong,
        "HostConfig.BlkioDeviceReadBps",
        &host["BlkioDeviceReadBps"],
        json!([{"Path": device, "Rate": 1 << 20}]),
    );
    check(
        &mut wrong,
        "HostConfig.BlkioDeviceWriteIOps",
        &host["BlkioDeviceWriteIOps"],
        json!([{"Path": device, "Rate": 100}]),
    );
    eprintln!("{}: BlkioWeight {}", lab.engine.name(), host["BlkioWeight"]);
    // cgroup, device_cgroup_rules, mem_swappiness, oom_kill_disable, runtime
    // (podman's compatible inspect does not name the runtime: its own inspect does.)
    if lab.is_podman() {
        let TestEngine::Podman(podman) = &lab.engine else { unreachable!() };
        let runtime = podman.podman(&["inspect", "--format", "{{.OCIRuntime}}", "ft-opts"]).expect("inspect");
        check(&mut wrong, "OCIRuntime", &json!(runtime.trim()), json!("runc"));
    } else {
        check(&mut wrong, "HostConfig.CgroupnsMode", &host["CgroupnsMode"], json!("private"));
        check(&mut wrong, "HostConfig.DeviceCgroupRules", &host["DeviceCgroupRules"], json!(["c 1:3 rmw"]));
        check(&mut wrong, "HostConfig.Runtime", &host["Runtime"], json!("runc"));
    }
    check(&mut wrong, "HostConfig.MemorySwappiness", &host["MemorySwappiness"], json!(10));
    check(&mut wrong, "HostConfig.OomKillDisable", &host["OomKillDisable"], json!(true));
    if !lab.is_podman() {
        check(&mut wrong, "Config.Domainname", &config["Domainname"], json!("fleet.lan"));
    }
    // post_start / pre_stop run through exec: exit codes, env, working dir, the timeout.
    let hook = |cmd: &str| Hook { command: vec!["sh".into(), "-c".into(), cmd.into()], ..Default::default() };
    let wait = Duration::from_secs(10);
    assert_eq!(engine.exec("ft-opts", &hook("exit 3"), wait).await.expect("exec"), 3);
    let shaped = Hook {
        env: BTreeMap::from([("HOOK".into(), "yes".into())]),
        working_dir: Some("/proc".into()),
        ..hook("test \"$HOOK\" = yes && test \"$(pwd)\" = /proc")
    };
    assert_eq!(engine.exec("ft-opts", &shaped, wait).await.expect("exec"), 0, "env and working_dir");
    let slow = engine.exec("ft-opts", &hook("sleep 5"), Duration::from_millis(500)).await;
    assert!(matches!(slow, Err(EngineError::Api { status: 408, .. })), "{slow:?}");
    // networks.<name>.ipv4_address
    check(
        &mut wrong,
        "NetworkSettings.Networks.ft_opts.IPAddress",
        &i["NetworkSettings"]["Networks"]["ft_opts"]["IPAddress"],
        json!(format!("{subnet}.9")),
    );
    // networks.<name>.ipv6_address on a network with enable_ipv6 and a v6 pool
    check(
        &mut wrong,
        "NetworkSettings.Networks.ft_opts.GlobalIPv6Address",
        &i["NetworkSettings"]["Networks"]["ft_opts"]["GlobalIPv6Address"],
        json!(format!("{subnet6}::9")),
    );

    assert!(wrong.is_empty(), "{}: not as set in inspect: {wrong:#?}", lab.engine.name());

    engine.remove("ft-opts", 1).await.expect("remove ft-opts");
    engine.remove_network("ft_opts").await.expect("remove network");
}

/// Records a field of `docker inspect` that differs from what was set.
fn check(wrong: &mut Vec<String>, what: &str, got: &Value, want: Value) {
    if *got != want {
        wrong.push(format!("{what}: {got} (want {want})"));
    }
}

fn run_options_scenario(start_engine: impl FnOnce() -> TestEngine) {
    let lab = Lab::start(start_engine());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), options_scenario(&lab)).await.expect("within 60 s");
    });
}

#[test]
fn dockerd_applies_container_options() {
    run_options_scenario(|| TestEngine::Docker(Dockerd::start().expect("dockerd starts")));
}

#[test]
fn podman_applies_container_options() {
    run_options_scenario(|| TestEngine::Podman(Podman::start().expect("podman starts")));
}

// ---------------------------------------------------------------------------------------
// Without an engine.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn a_missing_or_dead_socket_is_unreachable() {
    let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir");
    let missing = DockerEngine::new(dir.path().join("none.sock"));
    for result in
        [missing.ping().await, missing.list_managed().await.map(drop), missing.next_event().await.map(drop)]
    {
        match result {
            Err(EngineError::Unreachable { socket, .. }) => {
                assert!(socket.ends_with("none.sock"), "{socket}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
    // A socket file nobody listens on any more: connection refused.
    let path = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let dead = DockerEngine::new(path);
    assert!(matches!(dead.ping().await, Err(EngineError::Unreachable { .. })));
}

/// A one-shot fake engine on a unix socket: answers every connection with `answer`.
async fn serve(path: PathBuf, answer: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
}

#[tokio::test(flavor = "current_thread")]
async fn an_event_stream_that_ends_gives_none_after_its_events_and_skips_garbage() {
    let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir");
    let body = concat!(
        "{\"Type\":\"container\",\"Action\":\"exec_start: sh\",\"Actor\":{\"Attributes\":{\"name\":\"a\"}}}\n",
        "this is not json\n",
        "{\"Type\":\"container\",\"status\":\"died\",\"Action\":\"died\",\"Actor\":{\"Attributes\":{\"name\":\"a\"}}}",
        "{\"Type\":\"container\",\"Action\":\"health_status\",\"HealthStatus\":\"unhealthy\",",
        "\"Actor\":{\"Attributes\":{\"name\":\"b\",\"io.fleet.managed\":\"true\"}}}\n",
    );
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let server = serve(dir.path().join("e.sock"), answer).await;
    let engine = DockerEngine::new(dir.path().join("e.sock"));
    let first = engine.next_event().await.expect("ok").expect("an event");
    assert_eq!(first, EngineEvent { name: "a".into(), action: "die".into() });
    let second = engine.next_event().await.expect("ok").expect("an event");
    assert_eq!(second, EngineEvent { name: "b".into(), action: "health_status: unhealthy".into() });
    assert_eq!(engine.next_event().await.expect("ok"), None, "the stream ended");
    // The next call reconnects and reads the stream again from the start.
    assert_eq!(engine.next_event().await.expect("ok").map(|e| e.name), Some("a".into()));
    server.abort();
}

/// podman sends a health event at every check: only changes of a container's health
/// are passed on, and any other event about it makes the next one news again.
#[tokio::test(flavor = "current_thread")]
async fn repeated_health_events_are_passed_on_once() {
    let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir");
    let health = |name: &str, status: &str| {
        format!(
            "{{\"Type\":\"container\",\"Action\":\"health_status\",\"HealthStatus\":\"{status}\",\"Actor\":{{\"Attributes\":{{\"name\":\"{name}\"}}}}}}\n"
        )
    };
    let die = "{\"Type\":\"container\",\"Action\":\"died\",\"Actor\":{\"Attributes\":{\"name\":\"a\"}}}\n";
    let body = [
        health("a", "unhealthy"),
        health("a", "unhealthy"),
        health("b", "unhealthy"),
        health("a", "unhealthy"),
        health("a", "healthy"),
        health("a", "healthy"),
        die.to_owned(),
        health("a", "healthy"),
    ]
    .concat();
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let server = serve(dir.path().join("h.sock"), answer).await;
    let engine = DockerEngine::new(dir.path().join("h.sock"));
    let mut got = Vec::new();
    while let Some(event) = engine.next_event().await.expect("ok") {
        got.push(format!("{} {}", event.name, event.action));
    }
    assert_eq!(
        got,
        [
            "a health_status: unhealthy",
            "b health_status: unhealthy",
            "a health_status: healthy",
            "a die",
            "a health_status: healthy",
        ]
    );
    server.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn api_errors_carry_the_engines_message_and_odd_bodies_do_not_panic() {
    let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir");
    let path = dir.path().join("a.sock");
    let body = r#"{"cause":"x","message":"no such container: web","response":404}"#;
    let answer: &'static str = Box::leak(
        format!("HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            .into_boxed_str(),
    );
    let server = serve(path.clone(), answer).await;
    let engine = DockerEngine::new(path.clone());
    match engine.start("web").await {
        Err(EngineError::Api { op: "start", object, status: 500, message }) => {
            assert_eq!((object.as_str(), message.as_str()), ("web", "no such container: web"));
        }
        other => panic!("{other:?}"),
    }
    server.abort();
    let _ = server.await;
    std::fs::remove_file(&path).expect("socket removed");

    let server = serve(path.clone(), "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[1,{},\"x\"").await;
    match engine.list_managed().await {
        Err(EngineError::Protocol { .. }) => {}
        other => panic!("truncated JSON: {other:?}"),
    }
    server.abort();
    let _ = server.await;
    std::fs::remove_file(&path).expect("socket removed");

    let server = serve(path.clone(), "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n[1,{},\"x\",[]]").await;
    assert_eq!(engine.list_managed().await.expect("odd items are skipped"), []);
    server.abort();
}

/// Both engines send the head of the `/events` answer only with the first event. A
/// `next_event` dropped while waiting for it (as in a `select!` with a timer) must keep
/// the subscription: the event comes through on the next call, on the same connection.
#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_wait_for_events_keeps_the_subscription() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp").expect("temp dir");
    let path = dir.path().join("q.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let connections = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn({
        let (connections, go) = (connections.clone(), go.clone());
        async move {
            let mut open = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                go.notified().await;
                let event = r#"{"Type":"container","Action":"die","Actor":{"Attributes":{"name":"web"}}}"#;
                let chunk = format!("{:x}\r\n{event}\n\r\n", event.len() + 1);
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                let _ = stream.write_all(format!("{head}{chunk}").as_bytes()).await;
                open.push(stream);
            }
        }
    });

    let engine = DockerEngine::new(path);
    for _ in 0..3 {
        let waited = tokio::time::timeout(Duration::from_millis(100), engine.next_event()).await;
        assert!(waited.is_err(), "nothing to report yet: {waited:?}");
    }
    go.notify_one();
    let event = tokio::time::timeout(Duration::from_secs(5), engine.next_event())
        .await
        .expect("the event arrives")
        .expect("ok")
        .expect("an event");
    assert_eq!(event, EngineEvent { name: "web".into(), action: "die".into() });
    assert_eq!(connections.load(Ordering::SeqCst), 1, "one subscription, kept across cancelled waits");
    let waited = tokio::time::timeout(Duration::from_millis(100), engine.next_event()).await;
    assert!(waited.is_err(), "the stream stays open and quiet: {waited:?}");
    server.abort();
}

/// A block device of this machine (`/dev/vda`, `/dev/sda`, ...), for I/O throttles.
fn host_block_device() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .filter(|n| Path::new("/dev").join(n).exists())
        .collect();
    names.sort();
    format!("/dev/{}", names.first().expect("a block device under /sys/block"))
}

/// The host's architecture as the engines name it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn network_names(engine: &DockerEngine) -> Vec<String> {
    engine.list_managed_networks("acme").await.expect("list networks").into_iter().map(|n| n.name).collect()
}
