//! [`DockerEngine`]: the [`Engine`] trait over the Docker Engine API v1.41, spoken over a
//! unix socket with a bare hyper 1.x HTTP/1 client (no bollard: the agent must stay small).
//!
//! It works against `dockerd` (and balenaEngine, its fork) and against podman's
//! Docker-compatible service (`podman system service`). Where the two answer differently
//! this module takes both answers; the differences it handles, each checked by
//! `agent/tests/engine_docker.rs` against the real engines:
//!
//! - A pull that fails before it starts (unknown tag, registry down, no or wrong
//!   credentials) is an HTTP 404/500 from `dockerd` but an HTTP 200 with an
//!   `error`/`errorDetail` line from podman; both become [`EngineError::Pull`].
//! - Creating a container whose name is taken is HTTP 409 from `dockerd` and HTTP 500
//!   ("... is already in use") from podman: reported as 409 for both.
//! - Creating a network that exists is HTTP 409 from `dockerd` and HTTP 500 ("network
//!   already exists") from podman; both are accepted once the network is seen to exist.
//! - `dockerd` 20.10 (API 1.41) refuses more than one network in `EndpointsConfig` at
//!   create time, podman accepts it: the container is created on its first network and
//!   connected to the others with `POST /networks/{id}/connect`, which both accept (and
//!   both resolve the aliases given there).
//! - Events: podman 4.3's compat stream says `die` like `dockerd` (podman's native name
//!   `died` is taken as `die` too); its health event is a bare `health_status` with a top-level `HealthStatus`,
//!   normalised to `dockerd`'s `health_status: <status>`. `dockerd` sends `exec_*`
//!   events for every healthcheck run and podman sends `init`/`cleanup`: only changes of
//!   state are passed on.
//! - podman runs healthchecks from systemd timers: on a host without systemd its
//!   `State.Health.Status` stays `starting` until something runs `podman healthcheck
//!   run`. `dockerd` runs them itself. [`Engine::run_healthcheck`] tells the two apart
//!   once (`GET /version`: podman lists a component `Podman Engine`) and on podman runs
//!   the check with libpod's `GET /v<version>/libpod/containers/{id}/healthcheck` when
//!   it is due: one interval after the last check or the start (`Interval`, default
//!   30 s, as `dockerd`), every second during the start period while `starting` (failures
//!   do not count there), and not at all while checks run anyway (the last `Health.Log`
//!   entry is younger than that: a systemd timer or another scheduler runs them).
//! - podman sends a health event for every check run (`dockerd` only for a change of
//!   health): repeats of a container's last health are dropped.
//! - podman reports `Config.StopSignal` as a number and drops `CgroupPermissions` from
//!   `HostConfig.Devices` in inspect output (this adapter does not read them back).
//!
//! Ownership (see [`super`]): everything this adapter creates carries
//! [`LABEL_MANAGED`]`=true` whatever labels the caller passes, lists filter on it, and
//! `remove*` refuses (HTTP-409-style [`EngineError::Api`]) to touch an object that exists
//! without it.
//!
//! It never panics on what the engine sends: every answer is read as untyped JSON with
//! defaults, bodies are size-capped, and every call but the event stream has a deadline
//! (a pull: ten minutes without progress).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::UnixStream;

use fleet_spec::model::{
    ContainerOptions, ContainerSpec, Hook, ImageRef, MountSource, NetworkSpec, VolumeSpec,
};

use super::{
    Engine, EngineError, EngineEvent, Health, ObservedContainer, ObservedNetwork, RegistryAuth, LABEL_FLEET,
    LABEL_MANAGED, LABEL_SPEC_HASH,
};

/// The API version every request names; dockerd ≥ 20.10 and podman ≥ 3 serve it.
const API: &str = "/v1.41";
/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of an ordinary request (not a pull, not the event stream), answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A pull that shows no progress for this long is given up.
const PULL_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Cap on a whole (non-streamed) answer; a device lists tens of containers, not thousands.
const MAX_BODY: usize = 16 << 20;
/// Cap on one streamed JSON message (pull progress line, event).
const MAX_MESSAGE: usize = 1 << 20;
/// Docker's healthcheck interval and timeout when the healthcheck names none.
const HEALTHCHECK_DEFAULT: Duration = Duration::from_secs(30);
/// How often a healthcheck runs during its start period, while `starting` (where a
/// failure does not count; what `dockerd` ≥ 25 calls the start interval).
const HEALTHCHECK_START_TICK: Duration = Duration::from_secs(1);
/// A check due by its interval waits this much longer (at most a tenth of the
/// interval), so that a systemd timer due at the same time runs it, not both.
const HEALTHCHECK_SLACK: Duration = Duration::from_secs(1);
/// `filters` value selecting the managed objects: `{"label":["io.fleet.managed=true"]}`.
fn managed_filter() -> String {
    json!({ "label": [format!("{LABEL_MANAGED}=true")] }).to_string()
}

/// The Docker Engine API over a unix socket. One connection per request; the event
/// stream keeps its own connection open between calls to [`Engine::next_event`].
pub struct DockerEngine {
    socket: PathBuf,
    events: tokio::sync::Mutex<Events>,
    /// Which engine answers on the socket, asked once (by [`Engine::run_healthcheck`]).
    flavor: std::sync::OnceLock<Flavor>,
}

/// Which engine serves the API, as far as this adapter cares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flavor {
    /// `dockerd`, balenaEngine: runs healthchecks itself.
    Docker,
    /// podman's compatible service; `libpod` is the prefix of its own API,
    /// `/v<version>/libpod`.
    Podman { libpod: String },
}

/// The event subscription and what it passed on.
#[derive(Default)]
struct Events {
    stream: Option<EventStream>,
    /// The last health event passed on per container (podman repeats it at every check).
    health: BTreeMap<String, String>,
}

/// The answer to a request that has been sent (`'static`: it owns what it needs).
type PendingResponse = Pin<Box<dyn Future<Output = hyper::Result<Response<Incoming>>> + Send>>;

/// The `/events` subscription, kept across [`Engine::next_event`] calls.
enum EventStream {
    /// Subscribed, waiting for the response head: both `dockerd` and podman send it only
    /// together with the first event, which may be hours away.
    Subscribed(PendingResponse),
    /// Receiving events.
    Open(JsonStream),
}

impl std::fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerEngine").field("socket", &self.socket).finish_non_exhaustive()
    }
}

/// A whole answer: status and body.
struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn json(&self, op: &'static str) -> Result<Value, EngineError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| EngineError::Protocol { op, reason: format!("invalid JSON: {e}") })
    }

    /// The engine's own explanation: `message` of its JSON error body (both engines
    /// send one), else the body as text, else the HTTP reason phrase.
    fn message(&self) -> String {
        error_message(self.status, &self.body)
    }

    fn api_error(&self, op: &'static str, object: &str) -> EngineError {
        EngineError::Api {
            op,
            object: object.to_owned(),
            status: self.status.as_u16(),
            message: self.message(),
        }
    }
}

fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = v.get("message").and_then(Value::as_str) {
            return m.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("no message").to_owned()
    } else {
        text.chars().take(512).collect()
    }
}

impl DockerEngine {
    /// An engine at `socket_path`, e.g. `/var/run/docker.sock` or
    /// `/run/podman/podman.sock`. Nothing is connected until the first call.
    pub fn new(socket_path: PathBuf) -> Self {
        DockerEngine {
            socket: socket_path,
            events: tokio::sync::Mutex::new(Events::default()),
            flavor: std::sync::OnceLock::new(),
        }
    }

    /// The socket this engine talks to.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> EngineError {
        EngineError::Unreachable { socket: self.socket.display().to_string(), reason: reason.to_string() }
    }

    /// Sends one request on a fresh connection and returns the response with its body
    /// still to be read. `path` is below `/v1.41` (unless it names its own version, as
    /// podman's `/v4.3.1/libpod/...`) and already encoded.
    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra_header: Option<(&'static str, String)>,
    ) -> Result<Response<Incoming>, EngineError> {
        let pending = self.send(method, path, body, extra_header).await?;
        pending.await.map_err(|e| self.unreachable(format!("request failed: {e}")))
    }

    /// Connects and sends one request; the returned future waits for the answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        extra_header: Option<(&'static str, String)>,
    ) -> Result<PendingResponse, EngineError> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&self.socket)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(self.unreachable(e)),
            Err(_) => return Err(self.unreachable(format!("no connection within {CONNECT_TIMEOUT:?}"))),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(format!("HTTP handshake failed: {e}")))?;
        // The connection is driven by its own task; it ends when the response body has
        // been read or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });

        let bytes = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let versioned =
            path.strip_prefix("/v").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        let uri = if versioned { path.to_owned() } else { format!("{API}{path}") };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::USER_AGENT, concat!("fleet-agent/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some((name, value)) = extra_header {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(bytes)).map_err(|e| EngineError::Protocol {
            op: "request",
            reason: format!("cannot build request: {e}"),
        })?;
        // The connection task keeps the connection up until the answer has been read;
        // the sender is not needed for that.
        Ok(Box::pin(sender.send_request(request)))
    }

    /// One request, whole answer, with a deadline.
    async fn call_with_timeout(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Reply, EngineError> {
        let exchange = async {
            let response = self.open(method, path, body, None).await?;
            let status = response.status();
            let body = read_capped(response.into_body(), MAX_BODY)
                .await
                .map_err(|reason| EngineError::Protocol { op, reason })?;
            Ok(Reply { status, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.unreachable(format!("{op}: no answer within {timeout:?}"))),
        }
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, EngineError> {
        self.call_with_timeout(op, method, path, body, REQUEST_TIMEOUT).await
    }

    /// `GET` of an object's JSON; `None` on 404.
    async fn get_object(
        &self,
        op: &'static str,
        path: &str,
        object: &str,
    ) -> Result<Option<Value>, EngineError> {
        let reply = self.call(op, Method::GET, path, None).await?;
        match reply.status {
            s if s.is_success() => reply.json(op).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(reply.api_error(op, object)),
        }
    }

    async fn inspect_value(&self, name: &str) -> Result<Option<Value>, EngineError> {
        self.get_object("inspect", &format!("/containers/{}/json", enc(name)), name).await
    }

    /// The container called exactly `name` (or with exactly that id). The engines also
    /// resolve a unique id prefix, so a name like `beef` could otherwise hit another
    /// container whose id starts with it.
    async fn container_named(&self, name: &str) -> Result<Option<Value>, EngineError> {
        Ok(self.inspect_value(name).await?.filter(|v| {
            let own_name = v.get("Name").and_then(Value::as_str).map(|n| n.trim_start_matches('/'));
            own_name == Some(name) || v.get("Id").and_then(Value::as_str) == Some(name)
        }))
    }

    /// Refuses to go on when `object` exists but is not managed by the agent.
    fn refuse_unmanaged(op: &'static str, object: &str, labels: Option<&Value>) -> Result<(), EngineError> {
        let managed = labels.and_then(|l| l.get(LABEL_MANAGED)).and_then(Value::as_str) == Some("true");
        if managed {
            Ok(())
        } else {
            Err(EngineError::Api {
                op,
                object: object.to_owned(),
                status: StatusCode::CONFLICT.as_u16(),
                message: format!("refusing to touch it: it exists but has no {LABEL_MANAGED}=true label"),
            })
        }
    }

    /// Removes a container just created whose setup failed half-way; best effort.
    async fn discard(&self, id: &str) {
        let _ =
            self.call("remove", Method::DELETE, &format!("/containers/{}?force=1&v=1", enc(id)), None).await;
    }

    async fn pull_stream(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), EngineError> {
        let reference = image.pull_reference();
        let pull_error = |message: String| EngineError::Pull { image: reference.clone(), message };
        let (repo, tag) = split_reference(&reference);
        let mut path = format!("/images/create?fromImage={}&tag={}", enc(repo), enc(tag));
        if let Some(platform) = platform {
            path.push_str(&format!("&platform={}", enc(platform)));
        }
        let header = auth.map(|a| ("x-registry-auth", registry_auth_header(a)));

        // The answer's head may come only with the first progress message.
        let response = tokio::time::timeout(PULL_IDLE_TIMEOUT, self.open(Method::POST, &path, None, header))
            .await
            .map_err(|_| pull_error(format!("no answer within {PULL_IDLE_TIMEOUT:?}")))??;
        let status = response.status();
        if !status.is_success() {
            // dockerd answers a pull that cannot start (unknown image, registry down,
            // bad credentials) with 404/500 and a JSON message.
            let body = tokio::time::timeout(REQUEST_TIMEOUT, read_capped(response.into_body(), MAX_BODY))
                .await
                .map_err(|_| pull_error(format!("HTTP {status} and no body within {REQUEST_TIMEOUT:?}")))?
                .unwrap_or_default();
            return Err(pull_error(error_message(status, &body)));
        }

        // Both engines stream JSON progress messages and report a failure (also one
        // that happens half-way) as a message with `error` / `errorDetail.message`;
        // podman does so with HTTP 200 even when the pull never started.
        let mut stream = JsonStream::new(response.into_body());
        loop {
            let next = tokio::time::timeout(PULL_IDLE_TIMEOUT, stream.next())
                .await
                .map_err(|_| pull_error(format!("no progress for {PULL_IDLE_TIMEOUT:?}")))?;
            match next {
                Ok(Some(message)) => {
                    if let Some(error) = pull_message_error(&message) {
                        return Err(pull_error(error));
                    }
                }
                Ok(None) => return Ok(()),
                Err(reason) => return Err(pull_error(format!("progress stream broke off: {reason}"))),
            }
        }
    }

    /// Which engine this is: asked once with `GET /version` (not remembered when the
    /// engine cannot be asked).
    async fn flavor(&self) -> Result<&Flavor, EngineError> {
        if let Some(flavor) = self.flavor.get() {
            return Ok(flavor);
        }
        let reply = self.call("version", Method::GET, "/version", None).await?;
        if !reply.status.is_success() {
            return Err(reply.api_error("version", "/version"));
        }
        let flavor = flavor_from_version(&reply.json("version")?);
        // A concurrent caller may have set it meanwhile: from the same answer.
        Ok(self.flavor.get_or_init(|| flavor))
    }

    /// Subscribes to the events of managed containers. Returns once the request is
    /// sent: the answer comes with the first event.
    async fn subscribe(&self) -> Result<PendingResponse, EngineError> {
        let filters = json!({
            "type": ["container"],
            "label": [format!("{LABEL_MANAGED}=true")],
        })
        .to_string();
        let path = format!("/events?filters={}", enc(&filters));
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, &path, None, None))
            .await
            .map_err(|_| self.unreachable(format!("events: no connection within {REQUEST_TIMEOUT:?}")))?
    }
}

impl Engine for DockerEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        let reply = self.call("ping", Method::GET, "/_ping", None).await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(reply.api_error("ping", "/_ping"))
        }
    }

    async fn list_managed(&self) -> Result<Vec<ObservedContainer>, EngineError> {
        let path = format!("/containers/json?all=1&filters={}", enc(&managed_filter()));
        let reply = self.call("list containers", Method::GET, &path, None).await?;
        if !reply.status.is_success() {
            return Err(reply.api_error("list containers", "/containers/json"));
        }
        let list = reply.json("list containers")?;
        let ids: Vec<String> = list
            .as_array()
            .map(|items| {
                items.iter().filter_map(|c| c.get("Id").and_then(Value::as_str)).map(str::to_owned).collect()
            })
            .unwrap_or_default();
        // The list lacks the restart count and (on dockerd) states health only inside
        // a human-readable `Status`: inspect each one.
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            // Gone between list and inspect: it is not there any more.
            if let Some(v) = self.inspect_value(&id).await? {
                let observed = observed_from_inspect(&v)
                    .ok_or_else(|| EngineError::Protocol { op: "inspect", reason: format!("{id}: no Id") })?;
                if observed.labels.get(LABEL_MANAGED).map(String::as_str) == Some("true") {
                    out.push(observed);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn image_present(&self, image: &ImageRef) -> Result<bool, EngineError> {
        let reference = image.pull_reference();
        let path = format!("/images/{}/json", enc_path(&reference));
        Ok(self.get_object("inspect image", &path, &reference).await?.is_some())
    }

    async fn pull(
        &self,
        image: &ImageRef,
        platform: Option<&str>,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), EngineError> {
        self.pull_stream(image, platform, auth).await
    }

    async fn remove_image(&self, reference: &str) -> Result<bool, EngineError> {
        // No `force`: an image a container uses (409) stays, whoever made the container.
        let path = format!("/images/{}", enc_path(reference));
        let reply = self.call("remove image", Method::DELETE, &path, None).await?;
        match reply.status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(reply.api_error("remove image", reference)),
        }
    }

    async fn storage_root(&self) -> Result<Option<PathBuf>, EngineError> {
        let info = self.get_object("info", "/info", "engine").await?;
        Ok(info.as_ref().and_then(storage_root_of))
    }

    async fn exec(&self, name: &str, hook: &Hook, timeout: Duration) -> Result<i64, EngineError> {
        let env: Vec<String> = hook.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut body = json!({
            "Cmd": hook.command,
            "AttachStdout": true,
            "AttachStderr": true,
            "Privileged": hook.privileged,
            "Env": env,
        });
        if let Some(user) = &hook.user {
            body["User"] = json!(user);
        }
        if let Some(dir) = &hook.working_dir {
            body["WorkingDir"] = json!(dir);
        }
        let reply =
            self.call("exec", Method::POST, &format!("/containers/{}/exec", enc(name)), Some(&body)).await?;
        if !reply.status.is_success() {
            return Err(reply.api_error("exec", name));
        }
        let id = reply
            .json("exec")?
            .get("Id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| EngineError::Protocol { op: "exec", reason: "answer has no Id".to_owned() })?;
        // Attached (podman 4.3 never reports a detached exec as finished, and wants a
        // stream attached): the answer ends when the command does.
        let start = json!({ "Detach": false, "Tty": false });
        let too_slow = || EngineError::Api {
            op: "exec",
            object: name.to_owned(),
            status: 408,
            message: format!("`{}` did not finish within {timeout:?}", hook.command.join(" ")),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let path = format!("/exec/{}/start", enc(&id));
        let started = async {
            let response = self.open(Method::POST, &path, Some(&start), None).await?;
            let status = response.status();
            if !status.is_success() {
                let body = read_capped(response.into_body(), MAX_BODY)
                    .await
                    .map_err(|reason| EngineError::Protocol { op: "exec start", reason })?;
                return Err(Reply { status, body }.api_error("exec start", name));
            }
            // The command's output: read and dropped (a chatty hook costs no memory).
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                frame.map_err(|e| EngineError::Protocol { op: "exec start", reason: format!("{e}") })?;
            }
            Ok(())
        };
        tokio::time::timeout_at(deadline, started).await.map_err(|_| too_slow())??;
        loop {
            let reply =
                self.call("exec inspect", Method::GET, &format!("/exec/{}/json", enc(&id)), None).await?;
            if !reply.status.is_success() {
                return Err(reply.api_error("exec inspect", name));
            }
            let v = reply.json("exec inspect")?;
            if v.get("Running").and_then(Value::as_bool) == Some(false) {
                return v.get("ExitCode").and_then(Value::as_i64).ok_or_else(|| EngineError::Protocol {
                    op: "exec inspect",
                    reason: format!("{name}: the finished command has no ExitCode"),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(too_slow());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create(
        &self,
        spec: &ContainerSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        if let Some(key) = podman_ignores(spec) {
            if matches!(self.flavor().await?, Flavor::Podman { .. }) {
                // podman's compatible API (4.3) takes these and does not apply them:
                // refuse rather than run the container without them.
                return Err(EngineError::Api {
                    op: "create",
                    object: spec.name.clone(),
                    status: 400,
                    message: format!("podman's Docker-compatible API does not apply `{key}`: remove it for podman devices (for devices, use `devices:`)"),
                });
            }
        }
        let body = create_body(spec, labels);
        let mut path = format!("/containers/create?name={}", enc(&spec.name));
        if let Some(platform) = &spec.options.platform {
            path.push_str(&format!("&platform={}", enc(platform)));
        }
        let reply = self.call("create", Method::POST, &path, Some(&body)).await?;
        if !reply.status.is_success() {
            let mut error = reply.api_error("create", &spec.name);
            // A taken name is 409 on dockerd but 500 "... is already in use" on podman:
            // report it as dockerd does.
            if let EngineError::Api { status, message, .. } = &mut error {
                if *status == 500 && message.contains("already in use") {
                    *status = StatusCode::CONFLICT.as_u16();
                }
            }
            return Err(error);
        }
        let id =
            reply.json("create")?.get("Id").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| {
                EngineError::Protocol { op: "create", reason: "answer has no Id".to_owned() }
            })?;

        // dockerd (API 1.41) takes one network at create time: connect the others now.
        if spec.network_mode.is_none() {
            for attachment in spec.networks.iter().skip(1) {
                let body = json!({
                    "Container": id,
                    "EndpointConfig": endpoint_config(spec, &attachment.network, &attachment.aliases),
                });
                let path = format!("/networks/{}/connect", enc(&attachment.network));
                let result = self.call("connect network", Method::POST, &path, Some(&body)).await;
                let error = match result {
                    Ok(reply) if reply.status.is_success() => continue,
                    Ok(reply) => reply
                        .api_error("connect network", &format!("{} to {}", spec.name, attachment.network)),
                    Err(e) => e,
                };
                // A container missing one of its networks is not the one desired.
                self.discard(&id).await;
                return Err(error);
            }
        }
        Ok(id)
    }

    async fn start(&self, name: &str) -> Result<(), EngineError> {
        let reply =
            self.call("start", Method::POST, &format!("/containers/{}/start", enc(name)), None).await?;
        match reply.status {
            // 304: already running.
            s if s.is_success() || s == StatusCode::NOT_MODIFIED => Ok(()),
            _ => Err(reply.api_error("start", name)),
        }
    }

    async fn remove(&self, name: &str, grace_secs: u32) -> Result<(), EngineError> {
        let Some(v) = self.container_named(name).await? else { return Ok(()) };
        Self::refuse_unmanaged("remove", name, v.pointer("/Config/Labels"))?;
        // From here on by id: exactly the container that was checked.
        let id = v.get("Id").and_then(Value::as_str).unwrap_or(name);

        let path = format!("/containers/{}/stop?t={grace_secs}", enc(id));
        let timeout = REQUEST_TIMEOUT + Duration::from_secs(grace_secs.into());
        let reply = self.call_with_timeout("stop", Method::POST, &path, None, timeout).await?;
        match reply.status {
            // 304: not running; 404: gone meanwhile.
            s if s.is_success() || s == StatusCode::NOT_MODIFIED || s == StatusCode::NOT_FOUND => {}
            _ => return Err(reply.api_error("stop", name)),
        }
        let path = format!("/containers/{}?force=1&v=1", enc(id));
        let reply = self.call("remove", Method::DELETE, &path, None).await?;
        match reply.status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(reply.api_error("remove", name)),
        }
    }

    async fn inspect(&self, name: &str) -> Result<Option<ObservedContainer>, EngineError> {
        let Some(v) = self.container_named(name).await? else { return Ok(None) };
        let observed = observed_from_inspect(&v)
            .ok_or_else(|| EngineError::Protocol { op: "inspect", reason: format!("{name}: no Id") })?;
        // Not ours: as far as the agent is concerned, there is no managed container.
        Ok(observed.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true").then_some(observed))
    }

    async fn list_managed_networks(&self, fleet: &str) -> Result<Vec<ObservedNetwork>, EngineError> {
        let path = format!("/networks?filters={}", enc(&managed_filter()));
        let reply = self.call("list networks", Method::GET, &path, None).await?;
        if !reply.status.is_success() {
            return Err(reply.api_error("list networks", "/networks"));
        }
        let listed = reply.json("list networks")?;
        let items = listed.as_array();
        let hash_of = |name: &str| {
            items
                .into_iter()
                .flatten()
                .find(|n| n.get("Name").and_then(Value::as_str) == Some(name))
                .and_then(|n| {
                    n.get("Labels")
                        .and_then(|l| l.get(LABEL_SPEC_HASH))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
        };
        Ok(names_with_managed_label(items, fleet)
            .into_iter()
            .map(|name| ObservedNetwork { spec_hash: hash_of(&name), name })
            .collect())
    }

    async fn create_network(
        &self,
        spec: &NetworkSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let body = network_body(spec, labels);
        let reply = self.call("create network", Method::POST, "/networks/create", Some(&body)).await?;
        if reply.status.is_success() {
            return Ok(());
        }
        // dockerd: 409 "already exists"; podman: 500 "network already exists".
        let path = format!("/networks/{}", enc(&spec.name));
        if self.get_object("inspect network", &path, &spec.name).await?.is_some() {
            return Ok(());
        }
        Err(reply.api_error("create network", &spec.name))
    }

    async fn remove_network(&self, name: &str) -> Result<(), EngineError> {
        let path = format!("/networks/{}", enc(name));
        let Some(v) = self.get_object("inspect network", &path, name).await? else { return Ok(()) };
        Self::refuse_unmanaged("remove network", name, v.get("Labels"))?;
        let reply = self.call("remove network", Method::DELETE, &path, None).await?;
        match reply.status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(reply.api_error("remove network", name)),
        }
    }

    async fn list_managed_volumes(&self, fleet: &str) -> Result<Vec<String>, EngineError> {
        let path = format!("/volumes?filters={}", enc(&managed_filter()));
        let reply = self.call("list volumes", Method::GET, &path, None).await?;
        if !reply.status.is_success() {
            return Err(reply.api_error("list volumes", "/volumes"));
        }
        let v = reply.json("list volumes")?;
        Ok(names_with_managed_label(v.get("Volumes").and_then(Value::as_array), fleet))
    }

    async fn create_volume(
        &self,
        spec: &VolumeSpec,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let body = json!({
            "Name": spec.name,
            "Driver": "local",
            "Labels": merged_labels(&spec.labels, labels),
        });
        // Both engines answer 201 with the existing volume (data kept) when it exists.
        let reply = self.call("create volume", Method::POST, "/volumes/create", Some(&body)).await?;
        match reply.status {
            s if s.is_success() || s == StatusCode::CONFLICT => Ok(()),
            _ => Err(reply.api_error("create volume", &spec.name)),
        }
    }

    async fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        let path = format!("/volumes/{}", enc(name));
        let Some(v) = self.get_object("inspect volume", &path, name).await? else { return Ok(()) };
        Self::refuse_unmanaged("remove volume", name, v.get("Labels"))?;
        let reply = self.call("remove volume", Method::DELETE, &path, None).await?;
        match reply.status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(reply.api_error("remove volume", name)),
        }
    }

    /// Cancel-safe: a call dropped while it waits (e.g. in a `select!` with a timer)
    /// loses no event and keeps the subscription for the next call.
    async fn next_event(&self) -> Result<Option<EngineEvent>, EngineError> {
        let mut events = self.events.lock().await;
        let Events { stream: slot, health } = &mut *events;
        loop {
            let state = match slot {
                Some(state) => state,
                None => {
                    // A new subscription: what was passed on before may have changed
                    // unseen.
                    health.clear();
                    slot.insert(EventStream::Subscribed(self.subscribe().await?))
                }
            };
            match state {
                EventStream::Subscribed(pending) => match pending.as_mut().await {
                    Ok(response) if response.status().is_success() => {
                        *state = EventStream::Open(JsonStream::new(response.into_body()));
                    }
                    Ok(response) => {
                        *slot = None;
                        let status = response.status();
                        let body = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            read_capped(response.into_body(), MAX_BODY),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                        return Err(EngineError::Api {
                            op: "events",
                            object: "/events".to_owned(),
                            status: status.as_u16(),
                            message: error_message(status, &body),
                        });
                    }
                    // The engine closed the connection (restarted, stopped).
                    Err(_) => {
                        *slot = None;
                        return Ok(None);
                    }
                },
                EventStream::Open(stream) => match stream.next().await {
                    Ok(Some(message)) => {
                        if let Some(event) = parse_event(&message) {
                            if is_news(health, &event) {
                                return Ok(Some(event));
                            }
                        }
                    }
                    // Ended, or broke off (engine restarted): the caller reconnects
                    // later, and the next call subscribes anew.
                    Ok(None) | Err(_) => {
                        *slot = None;
                        return Ok(None);
                    }
                },
            }
        }
    }

    async fn run_healthcheck(&self, name: &str) -> Result<Option<Duration>, EngineError> {
        let Flavor::Podman { libpod } = self.flavor().await? else { return Ok(None) };
        let Some(v) = self.container_named(name).await? else { return Ok(Some(HEALTHCHECK_DEFAULT)) };
        Self::refuse_unmanaged("healthcheck", name, v.pointer("/Config/Labels"))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        match healthcheck_plan(&v, now) {
            HealthcheckPlan::Wait(after) => Ok(Some(after)),
            HealthcheckPlan::Run { timeout, then } => {
                let id = v.get("Id").and_then(Value::as_str).unwrap_or(name);
                let path = format!("{libpod}/containers/{}/healthcheck", enc(id));
                let reply = self
                    .call_with_timeout("healthcheck", Method::GET, &path, None, REQUEST_TIMEOUT + timeout)
                    .await?;
                match reply.status {
                    // 200 whatever the check found (the container's health says what it
                    // means); 404: gone meanwhile; 409: stopped meanwhile, or no check.
                    s if s.is_success() || s == StatusCode::NOT_FOUND || s == StatusCode::CONFLICT => {
                        Ok(Some(then))
                    }
                    _ => Err(reply.api_error("healthcheck", name)),
                }
            }
        }
    }
}

/// Whether an event says something new: podman repeats a container's health event at
/// every check; any other event about it makes its next health event news again.
fn is_news(health: &mut BTreeMap<String, String>, event: &EngineEvent) -> bool {
    if event.action.starts_with("health_status") {
        if health.get(&event.name) == Some(&event.action) {
            return false;
        }
        health.insert(event.name.clone(), event.action.clone());
    } else {
        health.remove(&event.name);
    }
    true
}

/// The engine behind a `GET /version` answer.
fn flavor_from_version(v: &Value) -> Flavor {
    let components = v.get("Components").and_then(Value::as_array).into_iter().flatten();
    let podman = components
        .into_iter()
        .find(|c| c.get("Name").and_then(Value::as_str).is_some_and(|n| n.contains("Podman")));
    match podman {
        Some(c) => {
            // The libpod API version (`4.3.1`); every podman ≥ 4 serves `4.0.0`.
            let version = c
                .pointer("/Details/APIVersion")
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                .unwrap_or("4.0.0");
            Flavor::Podman { libpod: format!("/v{version}/libpod") }
        }
        None => Flavor::Docker,
    }
}

/// What to do about a podman container's healthcheck, from its inspect output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HealthcheckPlan {
    /// Nothing now (not due, not running, or no healthcheck): ask again after this long.
    Wait(Duration),
    /// Run it now (it may take up to `timeout`), then ask again after `then`.
    Run { timeout: Duration, then: Duration },
}

/// When a podman container's healthcheck is due (see the module docs). `now_ms`: Unix
/// time in milliseconds, the clock the engine's timestamps are compared with.
fn healthcheck_plan(v: &Value, now_ms: i64) -> HealthcheckPlan {
    let check = v.pointer("/Config/Healthcheck");
    let test = check.and_then(|c| c.get("Test")).and_then(Value::as_array);
    let first = test.and_then(|t| t.first()).and_then(Value::as_str);
    if first.is_none_or(|f| f == "NONE") {
        return HealthcheckPlan::Wait(HEALTHCHECK_DEFAULT);
    }
    let duration = |key: &str| {
        check.and_then(|c| c.get(key)).and_then(Value::as_u64).filter(|ns| *ns > 0).map(Duration::from_nanos)
    };
    let interval = duration("Interval").unwrap_or(HEALTHCHECK_DEFAULT);
    let timeout = duration("Timeout").unwrap_or(HEALTHCHECK_DEFAULT);
    let start_period = duration("StartPeriod").unwrap_or_default();
    if !v.pointer("/State/Running").and_then(Value::as_bool).unwrap_or(false) {
        return HealthcheckPlan::Wait(interval);
    }
    let time_at = |pointer: &str| v.pointer(pointer).and_then(Value::as_str).and_then(unix_millis);
    let started = time_at("/State/StartedAt");
    let last = v
        .pointer("/State/Health/Log")
        .and_then(Value::as_array)
        .and_then(|log| log.last())
        .and_then(|entry| entry.get("End").or_else(|| entry.get("Start")))
        .and_then(Value::as_str)
        .and_then(unix_millis);
    let starting = v.pointer("/State/Health/Status").and_then(Value::as_str) == Some("starting");
    let in_start_period =
        starting && started.is_some_and(|s| now_ms >= s && ((now_ms - s) as u128) < start_period.as_millis());
    let (cadence, slack) = if in_start_period {
        (HEALTHCHECK_START_TICK, Duration::ZERO)
    } else {
        (interval, HEALTHCHECK_SLACK.min(interval / 10))
    };
    let run = HealthcheckPlan::Run { timeout, then: cadence };
    // Since the last check, or since the start when none ran since.
    let Some(reference) = started.max(last) else { return run };
    // A reference in the future: the clock went back; do not wait for it to catch up.
    let Ok(age) = u64::try_from(now_ms - reference).map(Duration::from_millis) else { return run };
    // A check that ran since the start, by the agent or a systemd timer: wait a little
    // longer than one interval, so that a timer due then runs it rather than both.
    let wait = if last.is_some_and(|l| l >= reference) { cadence + slack } else { cadence };
    if age < wait {
        HealthcheckPlan::Wait(wait - age)
    } else {
        run
    }
}

/// An RFC 3339 time (`2026-11-26T03:33:15.573449683Z`, `...+01:00`) as Unix time in
/// milliseconds; `None` when it is not one or lies before 1971 (Go's zero time).
fn unix_millis(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b[i] == b'.' {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for (k, c) in b[i + 1..i + 1 + digits.min(3)].iter().enumerate() {
            millis += i64::from(c - b'0') * [100, 10, 1][k];
        }
        i += 1 + digits;
    }
    let offset_minutes = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let minutes = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return None,
    };
    if year < 1971 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// Reads a whole body, refusing more than `cap` bytes.
async fn read_capped(mut body: Incoming, cap: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > cap {
                return Err(format!("body larger than {cap} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

/// A body carrying a sequence of JSON values (newline-separated on both engines, but
/// separators are not relied on). Cancel-safe: data is buffered before any await.
struct JsonStream {
    body: Incoming,
    buf: Vec<u8>,
}

impl JsonStream {
    fn new(body: Incoming) -> Self {
        JsonStream { body, buf: Vec::new() }
    }

    /// The next value; `None` when the stream ended. A line that is not JSON is skipped.
    async fn next(&mut self) -> Result<Option<Value>, String> {
        loop {
            if let Some(value) = self.take_buffered() {
                return Ok(Some(value));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_MESSAGE {
                            return Err(format!("a message longer than {MAX_MESSAGE} bytes"));
                        }
                    }
                }
            }
        }
    }

    /// A complete value from the buffer, if there is one.
    fn take_buffered(&mut self) -> Option<Value> {
        loop {
            let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match values.next() {
                None => {
                    // Only whitespace.
                    self.buf.clear();
                    return None;
                }
                Some(Ok(value)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    return Some(value);
                }
                Some(Err(e)) if e.is_eof() => return None,
                Some(Err(_)) => {
                    // Not JSON: drop through the end of the line, or wait for it.
                    let newline = self.buf.iter().position(|&b| b == b'\n')?;
                    self.buf.drain(..=newline);
                }
            }
        }
    }
}

/// The failure a pull progress message reports, if any.
fn pull_message_error(message: &Value) -> Option<String> {
    let detail = message.pointer("/errorDetail/message").and_then(Value::as_str).filter(|m| !m.is_empty());
    let error = message.get("error").and_then(Value::as_str).filter(|m| !m.is_empty());
    error.or(detail).map(str::to_owned)
}

/// The event the core cares about, from one `/events` message of either engine.
fn parse_event(message: &Value) -> Option<EngineEvent> {
    if let Some(kind) = message.get("Type").and_then(Value::as_str) {
        if kind != "container" {
            return None;
        }
    }
    let action = message
        .get("Action")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .or_else(|| message.get("status").and_then(Value::as_str))?;
    // podman: `died` for `die`, and `health_status` with the status beside it.
    let action = match action {
        "died" => "die".to_owned(),
        "health_status" => match message.get("HealthStatus").and_then(Value::as_str) {
            Some(status) if !status.is_empty() => format!("health_status: {status}"),
            _ => "health_status".to_owned(),
        },
        other => other.to_owned(),
    };
    let action = action.as_str();
    // Only changes of state: not the exec_* that every healthcheck run makes, nor
    // attach/resize/top/archive noise.
    const STATE_CHANGES: &[&str] = &[
        "create", "start", "restart", "die", "kill", "oom", "stop", "destroy", "remove", "pause", "unpause",
        "rename", "update",
    ];
    if !(STATE_CHANGES.contains(&action) || action.starts_with("health_status")) {
        return None;
    }
    let attributes = message.pointer("/Actor/Attributes");
    let name = attributes.and_then(|a| a.get("name")).and_then(Value::as_str).filter(|n| !n.is_empty())?;
    // The filter asked for managed containers only; check anyway, where the engine
    // copies the labels into the attributes (both do).
    if let Some(managed) = attributes.and_then(|a| a.get(LABEL_MANAGED)) {
        if managed.as_str() != Some("true") {
            return None;
        }
    }
    Some(EngineEvent { name: name.to_owned(), action: action.to_owned() })
}

/// A container as `GET /containers/{id}/json` describes it; `None` without an `Id`.
fn observed_from_inspect(v: &Value) -> Option<ObservedContainer> {
    let id = v.get("Id").and_then(Value::as_str)?.to_owned();
    let str_at = |pointer: &str| v.pointer(pointer).and_then(Value::as_str).unwrap_or_default();
    let name = str_at("/Name").trim_start_matches('/').to_owned();
    let image = match str_at("/Config/Image") {
        "" => str_at("/Image").to_owned(),
        image => image.to_owned(),
    };
    let labels = string_map(v.pointer("/Config/Labels"));
    let running = v.pointer("/State/Running").and_then(Value::as_bool).unwrap_or(false);
    let health = match str_at("/State/Health/Status") {
        "starting" => Health::Starting,
        "healthy" => Health::Healthy,
        "unhealthy" => Health::Unhealthy,
        _ => Health::None,
    };
    let restart_count = v.get("RestartCount").and_then(Value::as_u64).unwrap_or(0);
    // A container that never ran has no exit code, whatever `ExitCode: 0` says.
    let never_ran = str_at("/State/Status") == "created" || str_at("/State/StartedAt").starts_with("0001-");
    let exit_code =
        if running || never_ran { None } else { v.pointer("/State/ExitCode").and_then(Value::as_i64) };
    Some(ObservedContainer { id, name, image, labels, running, health, restart_count, exit_code })
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

/// `Name`s of the listed objects that carry the managed label.
fn names_with_managed_label(items: Option<&Vec<Value>>, fleet: &str) -> Vec<String> {
    let mut names: Vec<String> = items
        .into_iter()
        .flatten()
        .filter(|item| {
            let label = |key: &str| item.get("Labels").and_then(|l| l.get(key)).and_then(Value::as_str);
            label(LABEL_MANAGED) == Some("true") && label(LABEL_FLEET).is_none_or(|f| f == fleet)
        })
        .filter_map(|item| item.get("Name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The spec's labels, then the caller's, then the managed mark (which always wins).
fn merged_labels(
    own: &BTreeMap<String, String>,
    added: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = own.clone();
    labels.extend(added.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    labels
}

/// The body of `POST /containers/create` for `spec`.
fn create_body(spec: &ContainerSpec, labels: &BTreeMap<String, String>) -> Value {
    let mut config = Map::new();
    let mut host = Map::new();

    config.insert("Image".into(), json!(spec.image.pull_reference()));
    if let Some(cmd) = &spec.command {
        config.insert("Cmd".into(), json!(cmd));
    }
    if let Some(entrypoint) = &spec.entrypoint {
        config.insert("Entrypoint".into(), json!(entrypoint));
    }
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    config.insert("Env".into(), json!(env));
    if let Some(user) = &spec.user {
        config.insert("User".into(), json!(user));
    }
    if let Some(hostname) = &spec.hostname {
        config.insert("Hostname".into(), json!(hostname));
    }
    if let Some(signal) = &spec.stop_signal {
        config.insert("StopSignal".into(), json!(signal));
    }
    config.insert("Labels".into(), json!(merged_labels(&spec.labels, labels)));

    // Ports: `ExposedPorts` for every published and `expose:`d port, bindings per port.
    let mut exposed = Map::new();
    let mut bindings: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for port in &spec.ports {
        let key = format!("{}/{}", port.container_port, port.protocol.as_str());
        exposed.insert(key.clone(), json!({}));
        bindings.entry(key).or_default().push(json!({
            "HostIp": port.host_ip.clone().unwrap_or_default(),
            "HostPort": port.host_port.map(|p| p.to_string()).unwrap_or_default(),
        }));
    }
    for port in &spec.expose {
        let key = if port.contains('/') { port.clone() } else { format!("{port}/tcp") };
        exposed.insert(key, json!({}));
    }
    if !exposed.is_empty() {
        config.insert("ExposedPorts".into(), Value::Object(exposed));
    }
    if !bindings.is_empty() {
        host.insert("PortBindings".into(), json!(bindings));
    }

    if let Some(hc) = &spec.healthcheck {
        let mut check = Map::new();
        check.insert("Test".into(), json!(hc.test));
        let ns = |ms: u64| ms.saturating_mul(1_000_000);
        if let Some(ms) = hc.interval_ms {
            check.insert("Interval".into(), json!(ns(ms)));
        }
        if let Some(ms) = hc.timeout_ms {
            check.insert("Timeout".into(), json!(ns(ms)));
        }
        if let Some(ms) = hc.start_period_ms {
            check.insert("StartPeriod".into(), json!(ns(ms)));
        }
        if let Some(retries) = hc.retries {
            check.insert("Retries".into(), json!(retries));
        }
        config.insert("Healthcheck".into(), Value::Object(check));
    }

    // Mounts: `Binds` for host paths and named volumes (both engines take them and
    // neither needs the source to exist beforehand), `Tmpfs` for tmpfs.
    let mut binds = Vec::new();
    let mut tmpfs = Map::new();
    for mount in &spec.mounts {
        let mode = if mount.read_only { ":ro" } else { "" };
        match &mount.source {
            MountSource::Bind(source) | MountSource::Volume(source) => {
                binds.push(format!("{source}:{}{mode}", mount.target));
            }
            MountSource::Tmpfs => {
                tmpfs.insert(mount.target.clone(), json!(if mount.read_only { "ro" } else { "" }));
            }
        }
    }
    if !binds.is_empty() {
        host.insert("Binds".into(), json!(binds));
    }
    if !tmpfs.is_empty() {
        host.insert("Tmpfs".into(), Value::Object(tmpfs));
    }

    host.insert("RestartPolicy".into(), json!({ "Name": spec.restart.as_str(), "MaximumRetryCount": 0 }));
    if !spec.devices.is_empty() {
        let devices: Vec<Value> = spec
            .devices
            .iter()
            .map(|d| {
                json!({
                    "PathOnHost": d.host_path,
                    "PathInContainer": d.container_path,
                    "CgroupPermissions": if d.permissions.is_empty() { "rwm" } else { d.permissions.as_str() },
                })
            })
            .collect();
        host.insert("Devices".into(), json!(devices));
    }
    if !spec.cap_add.is_empty() {
        host.insert("CapAdd".into(), json!(spec.cap_add));
    }
    if !spec.cap_drop.is_empty() {
        host.insert("CapDrop".into(), json!(spec.cap_drop));
    }
    if spec.privileged {
        host.insert("Privileged".into(), json!(true));
    }
    if let Some(memory) = spec.memory_bytes {
        host.insert("Memory".into(), json!(memory));
    }
    if let Some(nano_cpus) = spec.nano_cpus {
        host.insert("NanoCpus".into(), json!(nano_cpus));
    }
    insert_options(&spec.options, &mut config, &mut host);

    // Networks: the first one at create time, with its aliases; `create` connects the
    // others afterwards.
    let mut body = Value::Object(config);
    if let Some(mode) = &spec.network_mode {
        host.insert("NetworkMode".into(), json!(mode));
    } else if let Some(first) = spec.networks.first() {
        host.insert("NetworkMode".into(), json!(first.network));
        let mut endpoint = endpoint_config(spec, &first.network, &first.aliases);
        // Docker API 1.41 reads `Config.MacAddress`; podman and newer APIs the endpoint's.
        if let Some(mac) = &spec.options.mac_address {
            endpoint["MacAddress"] = json!(mac);
        }
        body["NetworkingConfig"] = json!({ "EndpointsConfig": { first.network.clone(): endpoint } });
    }
    body["HostConfig"] = Value::Object(host);
    body
}

/// A setting of `spec` that podman's Docker-compatible API (4.3) accepts and ignores.
fn podman_ignores(spec: &ContainerSpec) -> Option<&'static str> {
    let o = &spec.options;
    if !o.device_cgroup_rules.is_empty() {
        Some("device_cgroup_rules")
    } else if o.cgroupns.is_some() {
        Some("cgroup")
    } else if o.domainname.is_some() {
        Some("domainname")
    } else if !o.gpus.is_empty() {
        Some("gpus")
    } else {
        None
    }
}

/// The body of `POST /networks/create` for `spec`.
fn network_body(spec: &NetworkSpec, labels: &BTreeMap<String, String>) -> Value {
    let o = &spec.options;
    let mut body = json!({
        "Name": spec.name,
        "CheckDuplicate": true,
        "Driver": "bridge",
        "Internal": spec.internal,
        "Labels": merged_labels(&spec.labels, labels),
    });
    if o.enable_ipv6 {
        body["EnableIPv6"] = json!(true);
    }
    if !o.ipam.is_empty() {
        let pools: Vec<Value> = o
            .ipam
            .iter()
            .map(|p| {
                let mut pool = json!({ "Subnet": p.subnet });
                if let Some(range) = &p.ip_range {
                    pool["IPRange"] = json!(range);
                }
                if let Some(gateway) = &p.gateway {
                    pool["Gateway"] = json!(gateway);
                }
                if !p.aux_addresses.is_empty() {
                    pool["AuxiliaryAddresses"] = json!(p.aux_addresses);
                }
                pool
            })
            .collect();
        body["IPAM"] = json!({ "Driver": "default", "Config": pools });
    }
    if !o.driver_opts.is_empty() {
        body["Options"] = json!(o.driver_opts);
    }
    body
}

/// The endpoint settings of `spec` on `network`: aliases and static addresses.
fn endpoint_config(spec: &ContainerSpec, network: &str, aliases: &[String]) -> Value {
    let mut endpoint = json!({ "Aliases": aliases });
    if let Some(a) = spec.options.addresses.get(network) {
        let mut ipam = Map::new();
        if let Some(v4) = &a.ipv4 {
            ipam.insert("IPv4Address".into(), json!(v4));
        }
        if let Some(v6) = &a.ipv6 {
            ipam.insert("IPv6Address".into(), json!(v6));
        }
        endpoint["IPAMConfig"] = Value::Object(ipam);
    }
    endpoint
}

/// `ContainerSpec::options` into the create body: each setting only when set, so the
/// engine's defaults stay in force otherwise.
fn insert_options(o: &ContainerOptions, config: &mut Map<String, Value>, host: &mut Map<String, Value>) {
    if let Some(log) = &o.logging {
        host.insert("LogConfig".into(), json!({ "Type": log.driver, "Config": log.options }));
    }
    if let Some(init) = o.init {
        host.insert("Init".into(), json!(init));
    }
    if o.read_only {
        host.insert("ReadonlyRootfs".into(), json!(true));
    }
    if !o.security_opt.is_empty() {
        host.insert("SecurityOpt".into(), json!(o.security_opt));
    }
    if let Some(dir) = &o.working_dir {
        config.insert("WorkingDir".into(), json!(dir));
    }
    if let Some(bytes) = o.shm_size_bytes {
        host.insert("ShmSize".into(), json!(bytes));
    }
    if !o.sysctls.is_empty() {
        host.insert("Sysctls".into(), json!(o.sysctls));
    }
    if !o.ulimits.is_empty() {
        let ulimits: Vec<Value> = o
            .ulimits
            .iter()
            .map(|(name, u)| json!({ "Name": name, "Soft": u.soft, "Hard": u.hard }))
            .collect();
        host.insert("Ulimits".into(), json!(ulimits));
    }
    if !o.extra_hosts.is_empty() {
        host.insert("ExtraHosts".into(), json!(o.extra_hosts));
    }
    if o.tty {
        config.insert("Tty".into(), json!(true));
    }
    if o.stdin_open {
        config.insert("OpenStdin".into(), json!(true));
    }
    if let Some(seconds) = o.stop_timeout_s {
        config.insert("StopTimeout".into(), json!(seconds));
    }
    for (key, list) in [("Dns", &o.dns), ("DnsSearch", &o.dns_search), ("DnsOptions", &o.dns_opt)] {
        if !list.is_empty() {
            host.insert(key.into(), json!(list));
        }
    }
    if !o.group_add.is_empty() {
        host.insert("GroupAdd".into(), json!(o.group_add));
    }
    if let Some(adj) = o.oom_score_adj {
        host.insert("OomScoreAdj".into(), json!(adj));
    }
    if let Some(limit) = o.pids_limit {
        host.insert("PidsLimit".into(), json!(limit));
    }
    if let Some(cpus) = &o.cpuset {
        host.insert("CpusetCpus".into(), json!(cpus));
    }
    if let Some(mode) = &o.ipc {
        host.insert("IpcMode".into(), json!(mode));
    }
    if let Some(mode) = &o.pid {
        host.insert("PidMode".into(), json!(mode));
    }
    if let Some(mac) = &o.mac_address {
        config.insert("MacAddress".into(), json!(mac));
    }
    if let Some(bytes) = o.mem_reservation_bytes {
        host.insert("MemoryReservation".into(), json!(bytes));
    }
    if let Some(bytes) = o.memswap_limit_bytes {
        host.insert("MemorySwap".into(), json!(bytes));
    }
    if let Some(shares) = o.cpu_shares {
        host.insert("CpuShares".into(), json!(shares));
    }
    if let Some(us) = o.cpu_period_us {
        host.insert("CpuPeriod".into(), json!(us));
    }
    if let Some(us) = o.cpu_quota_us {
        host.insert("CpuQuota".into(), json!(us));
    }
    if let Some(parent) = &o.cgroup_parent {
        host.insert("CgroupParent".into(), json!(parent));
    }
    let b = &o.blkio;
    if let Some(weight) = b.weight {
        host.insert("BlkioWeight".into(), json!(weight));
    }
    let devices = |list: &[(String, u16)]| -> Vec<Value> {
        list.iter().map(|(path, weight)| json!({ "Path": path, "Weight": weight })).collect()
    };
    let rates = |list: &[(String, u64)]| -> Vec<Value> {
        list.iter().map(|(path, rate)| json!({ "Path": path, "Rate": rate })).collect()
    };
    if !b.weight_device.is_empty() {
        host.insert("BlkioWeightDevice".into(), json!(devices(&b.weight_device)));
    }
    for (key, list) in [
        ("BlkioDeviceReadBps", &b.device_read_bps),
        ("BlkioDeviceWriteBps", &b.device_write_bps),
        ("BlkioDeviceReadIOps", &b.device_read_iops),
        ("BlkioDeviceWriteIOps", &b.device_write_iops),
    ] {
        if !list.is_empty() {
            host.insert(key.into(), json!(rates(list)));
        }
    }
    if !o.storage_opt.is_empty() {
        host.insert("StorageOpt".into(), json!(o.storage_opt));
    }
    for (key, mode) in [("UTSMode", &o.uts), ("UsernsMode", &o.userns_mode), ("CgroupnsMode", &o.cgroupns)] {
        if let Some(mode) = mode {
            host.insert(key.into(), json!(mode));
        }
    }
    if !o.device_cgroup_rules.is_empty() {
        host.insert("DeviceCgroupRules".into(), json!(o.device_cgroup_rules));
    }
    if let Some(swappiness) = o.mem_swappiness {
        host.insert("MemorySwappiness".into(), json!(swappiness));
    }
    if o.oom_kill_disable {
        host.insert("OomKillDisable".into(), json!(true));
    }
    if let Some(us) = o.cpu_rt_period_us {
        host.insert("CpuRealtimePeriod".into(), json!(us));
    }
    if let Some(us) = o.cpu_rt_runtime_us {
        host.insert("CpuRealtimeRuntime".into(), json!(us));
    }
    if let Some(runtime) = &o.runtime {
        host.insert("Runtime".into(), json!(runtime));
    }
    if let Some(domain) = &o.domainname {
        config.insert("Domainname".into(), json!(domain));
    }
    if !o.gpus.is_empty() {
        let requests: Vec<Value> = o
            .gpus
            .iter()
            .map(|g| {
                json!({
                    "Driver": g.driver.clone().unwrap_or_default(),
                    "Count": g.count.unwrap_or(0),
                    "DeviceIDs": g.device_ids,
                    "Capabilities": [g.capabilities],
                })
            })
            .collect();
        host.insert("DeviceRequests".into(), json!(requests));
    }
}

/// `repo@sha256:..` → (`repo`, `sha256:..`); `host:5000/a/b:tag` → (`host:5000/a/b`,
/// `tag`); no tag → `latest` (an empty tag would make dockerd pull every tag).
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo, digest);
    }
    let name_start = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[name_start..].rfind(':') {
        Some(i) => (&reference[..name_start + i], &reference[name_start + i + 1..]),
        None => (reference, "latest"),
    }
}

/// `X-Registry-Auth`: base64url (padded) of the JSON both engines expect.
fn registry_auth_header(auth: &RegistryAuth) -> String {
    let json = json!({
        "username": auth.username,
        "password": auth.password,
        "serveraddress": auth.server,
    })
    .to_string();
    base64url(json.as_bytes())
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters (query values, names).
fn enc(s: &str) -> String {
    percent_encode(s, b"")
}

/// Like [`enc`] but keeps `/`, `:` and `@`, which image references in a path need.
fn enc_path(s: &str) -> String {
    percent_encode(s, b"/:@")
}

fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `DockerRootDir` of a `GET /info` answer, when it is an absolute path (anything else:
/// not checked, as an engine that does not say).
fn storage_root_of(info: &Value) -> Option<PathBuf> {
    let root = info.get("DockerRootDir")?.as_str()?;
    (root.starts_with('/') && !root.contains('\0')).then(|| PathBuf::from(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::model::{
        DeviceMapping, Healthcheck, Mount, NetworkAttachment, PortMapping, Protocol, RestartPolicy,
    };

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
        ];
        for (input, expected) in cases {
            assert_eq!(base64url(input.as_bytes()), expected, "{input:?}");
        }
        // The URL-safe alphabet: 0xfb 0xff → "-_8=" rather than "+/8=".
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8=");
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        assert_eq!(
            enc(r#"{"label":["io.fleet.managed=true"]}"#),
            "%7B%22label%22%3A%5B%22io.fleet.managed%3Dtrue%22%5D%7D"
        );
        assert_eq!(enc_path("127.0.0.1:5000/a/b@sha256:ab"), "127.0.0.1:5000/a/b@sha256:ab");
        assert_eq!(enc_path("a b?#"), "a%20b%3F%23");
    }

    #[test]
    fn references_split_into_repo_and_tag_or_digest() {
        assert_eq!(split_reference("127.0.0.1:5000/a/b@sha256:ab"), ("127.0.0.1:5000/a/b", "sha256:ab"));
        assert_eq!(split_reference("127.0.0.1:5000/a/b:1.2"), ("127.0.0.1:5000/a/b", "1.2"));
        assert_eq!(split_reference("127.0.0.1:5000/a/b"), ("127.0.0.1:5000/a/b", "latest"));
        assert_eq!(split_reference("busybox"), ("busybox", "latest"));
    }

    #[test]
    fn create_body_maps_container_options_and_leaves_unset_ones_to_the_engine() {
        let mut spec = ContainerSpec {
            name: "app-web".into(),
            image: ImageRef { reference: "web:1".into(), digest: None },
            networks: vec![NetworkAttachment { network: "app_default".into(), aliases: vec!["web".into()] }],
            ..Default::default()
        };
        let plain = create_body(&spec, &BTreeMap::new());
        for key in
            ["LogConfig", "Init", "ReadonlyRootfs", "Sysctls", "Ulimits", "ShmSize", "IpcMode", "PidMode"]
        {
            assert!(plain["HostConfig"].get(key).is_none(), "{key} set without an option");
        }
        assert!(plain.get("StopTimeout").is_none() && plain.get("WorkingDir").is_none());
        spec.options = ContainerOptions {
            logging: Some(fleet_spec::model::LogConfig {
                driver: "local".into(),
                options: BTreeMap::from([("max-size".into(), "10m".into())]),
            }),
            init: Some(true),
            ulimits: BTreeMap::from([("nofile".into(), fleet_spec::model::Ulimit { soft: 1, hard: 2 })]),
            stop_timeout_s: Some(30),
            working_dir: Some("/srv".into()),
            mac_address: Some("02:42:ac:11:00:09".into()),
            pid: Some("host".into()),
            ..Default::default()
        };
        let body = create_body(&spec, &BTreeMap::new());
        let host = &body["HostConfig"];
        assert_eq!(host["LogConfig"], json!({"Type": "local", "Config": {"max-size": "10m"}}));
        assert_eq!(host["Init"], true);
        assert_eq!(host["Ulimits"], json!([{"Name": "nofile", "Soft": 1, "Hard": 2}]));
        assert_eq!(host["PidMode"], "host");
        assert_eq!((&body["StopTimeout"], &body["WorkingDir"]), (&json!(30), &json!("/srv")));
        assert_eq!(body["MacAddress"], "02:42:ac:11:00:09");
        assert_eq!(
            body["NetworkingConfig"]["EndpointsConfig"]["app_default"]["MacAddress"],
            "02:42:ac:11:00:09"
        );
    }

    #[test]
    fn create_body_maps_every_field() {
        let spec = ContainerSpec {
            name: "app-web".into(),
            image: ImageRef { reference: "reg:5000/web:1".into(), digest: Some("sha256:ab".into()) },
            command: Some(vec!["httpd".into(), "-f".into()]),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
            user: Some("1000:1000".into()),
            hostname: Some("web".into()),
            ports: vec![
                PortMapping {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(8080),
                    container_port: 80,
                    protocol: Protocol::Tcp,
                },
                PortMapping { host_ip: None, host_port: None, container_port: 53, protocol: Protocol::Udp },
            ],
            expose: vec!["9000".into(), "9001/udp".into()],
            mounts: vec![
                Mount {
                    source: MountSource::Bind("/etc/app.conf".into()),
                    target: "/conf".into(),
                    read_only: true,
                },
                Mount {
                    source: MountSource::Volume("app_data".into()),
                    target: "/data".into(),
                    read_only: false,
                },
                Mount { source: MountSource::Tmpfs, target: "/run".into(), read_only: false },
            ],
            networks: vec![
                NetworkAttachment { network: "app_default".into(), aliases: vec!["web".into()] },
                NetworkAttachment { network: "app_back".into(), aliases: vec!["web-back".into()] },
            ],
            restart: RestartPolicy::UnlessStopped,
            healthcheck: Some(Healthcheck {
                test: vec!["CMD-SHELL".into(), "test -f /tmp/ok".into()],
                interval_ms: Some(500),
                timeout_ms: Some(1000),
                retries: Some(2),
                start_period_ms: Some(1500),
            }),
            labels: BTreeMap::from([("team".into(), "a".into()), (LABEL_MANAGED.into(), "false".into())]),
            devices: vec![DeviceMapping {
                host_path: "/dev/ttyS0".into(),
                container_path: "/dev/ttyS0".into(),
                permissions: "".into(),
            }],
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["MKNOD".into()],
            privileged: true,
            stop_signal: Some("SIGINT".into()),
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            ..Default::default()
        };
        let labels = BTreeMap::from([("io.fleet.app".to_owned(), "app".to_owned())]);
        let body = create_body(&spec, &labels);
        let expected = json!({
            "Image": "reg:5000/web@sha256:ab",
            "Cmd": ["httpd", "-f"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Env": ["A=1", "B=x=y"],
            "User": "1000:1000",
            "Hostname": "web",
            "StopSignal": "SIGINT",
            "Labels": {"team": "a", "io.fleet.app": "app", "io.fleet.managed": "true"},
            "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "9000/tcp": {}, "9001/udp": {}},
            "Healthcheck": {
                "Test": ["CMD-SHELL", "test -f /tmp/ok"],
                "Interval": 500_000_000u64, "Timeout": 1_000_000_000u64, "StartPeriod": 1_500_000_000u64, "Retries": 2,
            },
            "NetworkingConfig": {"EndpointsConfig": {"app_default": {"Aliases": ["web"]}}},
            "HostConfig": {
                "PortBindings": {
                    "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                    "53/udp": [{"HostIp": "", "HostPort": ""}],
                },
                "Binds": ["/etc/app.conf:/conf:ro", "app_data:/data"],
                "Tmpfs": {"/run": ""},
                "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
                "Devices": [{"PathOnHost": "/dev/ttyS0", "PathInContainer": "/dev/ttyS0", "CgroupPermissions": "rwm"}],
                "CapAdd": ["NET_ADMIN"],
                "CapDrop": ["MKNOD"],
                "Privileged": true,
                "Memory": 64u64 << 20,
                "NanoCpus": 500_000_000u64,
                "NetworkMode": "app_default",
            },
        });
        assert_eq!(body, expected);
    }

    #[test]
    fn network_mode_replaces_networks() {
        let spec =
            ContainerSpec { name: "h".into(), network_mode: Some("host".into()), ..Default::default() };
        let body = create_body(&spec, &BTreeMap::new());
        assert_eq!(body["HostConfig"]["NetworkMode"], "host");
        assert!(body.get("NetworkingConfig").is_none());
    }

    #[test]
    fn inspect_reads_both_engines_and_survives_odd_json() {
        let docker = json!({
            "Id": "abc", "Name": "/web", "RestartCount": 3,
            "Config": {"Image": "reg/web@sha256:ab", "Labels": {"io.fleet.managed": "true", "n": 1}},
            "State": {"Status": "exited", "Running": false, "ExitCode": 137, "StartedAt": "2026-01-01T00:00:00Z",
                      "Health": {"Status": "unhealthy", "FailingStreak": 2}},
        });
        let observed = observed_from_inspect(&docker).expect("has an Id");
        assert_eq!(observed.name, "web");
        assert_eq!(observed.image, "reg/web@sha256:ab");
        assert_eq!(observed.health, Health::Unhealthy);
        assert_eq!(observed.restart_count, 3);
        assert_eq!(observed.exit_code, Some(137));
        assert_eq!(observed.labels.len(), 1, "a non-string label value is skipped");

        let created = json!({"Id": "x", "State": {"Status": "created", "Running": false, "ExitCode": 0,
                                                  "Health": {"Status": ""}}, "Config": {"Labels": null}});
        let observed = observed_from_inspect(&created).expect("has an Id");
        assert_eq!((observed.exit_code, observed.health, observed.running), (None, Health::None, false));

        for odd in [json!(null), json!([]), json!({"Id": 5}), json!("x")] {
            assert!(observed_from_inspect(&odd).is_none());
        }
        let partial = json!({"Id": "y", "State": "weird", "Config": 7, "RestartCount": -1});
        assert!(observed_from_inspect(&partial).is_some());
    }

    #[test]
    fn events_of_both_engines_are_parsed_and_noise_dropped() {
        let docker = json!({"status": "die", "Type": "container", "Action": "die",
                            "Actor": {"ID": "abc", "Attributes": {"name": "web", "io.fleet.managed": "true", "exitCode": "137"}}});
        assert_eq!(parse_event(&docker), Some(EngineEvent { name: "web".into(), action: "die".into() }));
        let podman = json!({"status": "died", "Type": "container", "Action": "died",
                            "Actor": {"ID": "abc", "Attributes": {"name": "web", "io.fleet.managed": "true"}}});
        assert_eq!(parse_event(&podman), Some(EngineEvent { name: "web".into(), action: "die".into() }));
        let old_style = json!({"status": "health_status: unhealthy", "id": "abc", "Actor": {"Attributes": {"name": "w"}}});
        assert_eq!(parse_event(&old_style).map(|e| e.action), Some("health_status: unhealthy".to_owned()));

        let exec = json!({"Type": "container", "Action": "exec_start: /bin/sh -c test", "Actor": {"Attributes": {"name": "w"}}});
        let network = json!({"Type": "network", "Action": "connect", "Actor": {"Attributes": {"name": "n"}}});
        let unmanaged = json!({"Type": "container", "Action": "die", "Actor": {"Attributes": {"name": "w", "io.fleet.managed": "no"}}});
        for ignored in [exec, network, unmanaged, json!({}), json!(null), json!({"Action": 5})] {
            assert_eq!(parse_event(&ignored), None, "{ignored}");
        }
    }

    #[test]
    fn pull_errors_are_found_in_either_field() {
        assert_eq!(pull_message_error(&json!({"status": "Downloading", "progressDetail": {}})), None);
        assert_eq!(pull_message_error(&json!({"error": "boom"})).as_deref(), Some("boom"));
        assert_eq!(pull_message_error(&json!({"errorDetail": {"message": "deep"}})).as_deref(), Some("deep"));
    }

    #[test]
    fn api_error_message_prefers_the_engines_message() {
        let podman =
            br#"{"cause":"network already exists","message":"network name n1 already used","response":500}"#;
        assert_eq!(error_message(StatusCode::INTERNAL_SERVER_ERROR, podman), "network name n1 already used");
        assert_eq!(error_message(StatusCode::BAD_REQUEST, b"  plain text\n"), "plain text");
        assert_eq!(error_message(StatusCode::NOT_FOUND, b""), "Not Found");
    }

    #[test]
    fn rfc3339_times_become_unix_millis() {
        assert_eq!(unix_millis("1970-01-02T00:00:00Z"), None, "before 1971: Go's zero time and the like");
        assert_eq!(unix_millis("0001-01-01T00:00:00Z"), None);
        assert_eq!(unix_millis("2001-09-09T01:46:40Z"), Some(1_000_000_000_000));
        assert_eq!(unix_millis("2026-11-26T03:33:15.573449683Z"), Some(1_795_663_995_573));
        assert_eq!(unix_millis("2026-11-26T04:33:15.5+01:00"), Some(1_795_663_995_500));
        assert_eq!(unix_millis("2026-11-25T22:03:15.57-05:30"), Some(1_795_663_995_570));
        assert_eq!(unix_millis("2024-02-29T12:00:00Z"), Some(1_709_208_000_000), "a leap day");
        assert_eq!(unix_millis("2000-03-01T00:00:00Z"), Some(951_868_800_000));
        for bad in [
            "",
            "2026-11-26",
            "2026-11-26T03:33:15",
            "2026-11-26T03:33:15.Z",
            "2026-13-01T00:00:00Z",
            "2026-11-26T03:33:15+0100",
            "2026-11-26T03:33:15Zjunk",
            "2026-1a-26T03:33:15Z",
        ] {
            assert_eq!(unix_millis(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn podman_is_told_from_dockerd_by_its_version_answer() {
        let podman = json!({"Components": [{"Name": "Podman Engine", "Version": "4.3.1",
                                             "Details": {"APIVersion": "4.3.1", "MinAPIVersion": "4.0.0"}},
                                            {"Name": "Conmon"}], "ApiVersion": "1.41"});
        assert_eq!(flavor_from_version(&podman), Flavor::Podman { libpod: "/v4.3.1/libpod".into() });
        let odd = json!({"Components": [{"Name": "Podman Engine", "Details": {"APIVersion": "../x"}}]});
        assert_eq!(flavor_from_version(&odd), Flavor::Podman { libpod: "/v4.0.0/libpod".into() });
        let docker =
            json!({"Components": [{"Name": "Engine", "Version": "20.10.24"}, {"Name": "containerd"}]});
        assert_eq!(flavor_from_version(&docker), Flavor::Docker);
        assert_eq!(flavor_from_version(&json!({})), Flavor::Docker);
    }

    /// A podman inspect answer: started at `started`, last check ended at `last`.
    fn podman_container(status: &str, started: &str, last: Option<&str>, check: Value) -> Value {
        let log: Vec<Value> =
            last.map(|end| json!({"Start": end, "End": end, "ExitCode": 0})).into_iter().collect();
        json!({"Id": "c1", "Config": {"Healthcheck": check},
               "State": {"Running": true, "StartedAt": started, "Health": {"Status": status, "Log": log}}})
    }

    #[test]
    fn podman_healthchecks_are_due_by_interval_and_start_period() {
        let t0 = unix_millis("2026-11-26T03:00:00Z").expect("time");
        let at = |secs: i64| t0 + secs * 1000;
        let check = json!({"Test": ["CMD-SHELL", "true"], "Interval": 10_000_000_000u64, "Timeout": 2_000_000_000u64});
        let run = |then: u64| HealthcheckPlan::Run {
            timeout: Duration::from_secs(2),
            then: Duration::from_secs(then),
        };

        // No start period: the first check one interval after the start, as dockerd.
        let fresh = podman_container("starting", "2026-11-26T03:00:00Z", None, check.clone());
        assert_eq!(healthcheck_plan(&fresh, at(4)), HealthcheckPlan::Wait(Duration::from_secs(6)));
        assert_eq!(healthcheck_plan(&fresh, at(10)), run(10));
        // Then one interval (and a little, for a systemd timer to go first) after the last.
        let checked =
            podman_container("healthy", "2026-11-26T03:00:00Z", Some("2026-11-26T03:00:10Z"), check.clone());
        assert_eq!(healthcheck_plan(&checked, at(12)), HealthcheckPlan::Wait(Duration::from_secs(9)));
        assert_eq!(healthcheck_plan(&checked, at(21)), run(10));
        // A clock that went back: run rather than wait for it.
        assert_eq!(healthcheck_plan(&checked, at(5)), run(10));
        // Log entries from before a restart do not count.
        let restarted =
            podman_container("healthy", "2026-11-26T03:01:00Z", Some("2026-11-26T03:00:10Z"), check.clone());
        assert_eq!(healthcheck_plan(&restarted, at(62)), HealthcheckPlan::Wait(Duration::from_secs(8)));

        // In the start period, while starting: every second.
        let mut with_start = check.clone();
        with_start["StartPeriod"] = json!(30_000_000_000u64);
        let starting = podman_container("starting", "2026-11-26T03:00:00Z", None, with_start.clone());
        assert_eq!(healthcheck_plan(&starting, at(0)), HealthcheckPlan::Wait(Duration::from_secs(1)));
        assert_eq!(healthcheck_plan(&starting, at(1)), run(1));
        let tried = podman_container(
            "starting",
            "2026-11-26T03:00:00Z",
            Some("2026-11-26T03:00:05Z"),
            with_start.clone(),
        );
        assert_eq!(healthcheck_plan(&tried, at(6)), run(1));
        // ... but by the interval once healthy, or once the start period is over.
        let healthy =
            podman_container("healthy", "2026-11-26T03:00:00Z", Some("2026-11-26T03:00:05Z"), with_start);
        assert_eq!(healthcheck_plan(&healthy, at(6)), HealthcheckPlan::Wait(Duration::from_secs(10)));
        assert_eq!(healthcheck_plan(&tried, at(31)), run(10));

        // Defaults: 30 s. Nothing to run without a check, or when stopped.
        let bare =
            podman_container("starting", "2026-11-26T03:00:00Z", None, json!({"Test": ["CMD", "true"]}));
        assert_eq!(
            healthcheck_plan(&bare, at(30)),
            HealthcheckPlan::Run { timeout: HEALTHCHECK_DEFAULT, then: HEALTHCHECK_DEFAULT }
        );
        let none = podman_container("", "2026-11-26T03:00:00Z", None, json!({"Test": ["NONE"]}));
        assert_eq!(healthcheck_plan(&none, at(60)), HealthcheckPlan::Wait(HEALTHCHECK_DEFAULT));
        assert_eq!(healthcheck_plan(&json!({"Id": "x"}), at(60)), HealthcheckPlan::Wait(HEALTHCHECK_DEFAULT));
        let mut stopped = podman_container("unhealthy", "2026-11-26T03:00:00Z", None, check);
        stopped["State"]["Running"] = json!(false);
        assert_eq!(healthcheck_plan(&stopped, at(60)), HealthcheckPlan::Wait(Duration::from_secs(10)));
        // Odd times: run (the engine's own checks decide what the health is).
        let odd = podman_container("starting", "yesterday", Some("soon"), json!({"Test": ["CMD", "true"]}));
        assert_eq!(
            healthcheck_plan(&odd, at(0)),
            HealthcheckPlan::Run { timeout: HEALTHCHECK_DEFAULT, then: HEALTHCHECK_DEFAULT }
        );
    }

    #[test]
    fn repeated_health_events_are_dropped_until_something_else_happens() {
        let mut seen = BTreeMap::new();
        let ev = |name: &str, action: &str| EngineEvent { name: name.into(), action: action.into() };
        assert!(is_news(&mut seen, &ev("a", "health_status: unhealthy")));
        assert!(!is_news(&mut seen, &ev("a", "health_status: unhealthy")));
        assert!(is_news(&mut seen, &ev("b", "health_status: unhealthy")), "per container");
        assert!(is_news(&mut seen, &ev("a", "health_status: healthy")));
        assert!(is_news(&mut seen, &ev("a", "health_status: unhealthy")));
        assert!(is_news(&mut seen, &ev("a", "die")));
        assert!(is_news(&mut seen, &ev("a", "die")), "only health events repeat");
        assert!(is_news(&mut seen, &ev("a", "health_status: unhealthy")), "after a die, news again");
    }

    #[test]
    fn managed_names_are_filtered_again_on_our_side() {
        let items = vec![
            json!({"Name": "b", "Labels": {"io.fleet.managed": "true"}}),
            json!({"Name": "a", "Labels": {"io.fleet.managed": "true"}}),
            json!({"Name": "c", "Labels": null}),
            json!({"Labels": {"io.fleet.managed": "true"}}),
            // Hardening I, case 9: another fleet's objects on the same engine.
            json!({"Name": "d", "Labels": {"io.fleet.managed": "true", "io.fleet.fleet": "other"}}),
            json!({"Name": "e", "Labels": {"io.fleet.managed": "true", "io.fleet.fleet": "acme"}}),
        ];
        assert_eq!(names_with_managed_label(Some(&items), "acme"), ["a", "b", "e"]);
        assert!(names_with_managed_label(None, "acme").is_empty());
    }

    #[test]
    fn the_engines_storage_root_is_taken_only_as_an_absolute_path() {
        assert_eq!(
            storage_root_of(&json!({"DockerRootDir": "/var/lib/docker"})),
            Some(PathBuf::from("/var/lib/docker"))
        );
        for hostile in [
            json!({}),
            json!({"DockerRootDir": null}),
            json!({"DockerRootDir": 42}),
            json!({"DockerRootDir": ""}),
            json!({"DockerRootDir": "var/lib/docker"}),
            json!({"DockerRootDir": "../../etc"}),
            json!({"DockerRootDir": "/var/lib\0/docker"}),
            json!(["DockerRootDir"]),
        ] {
            assert_eq!(storage_root_of(&hostile), None, "{hostile}");
        }
    }
}
