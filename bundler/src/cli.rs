//! The command line's definition: subcommands, flags, their help texts and the exit
//! codes they document. Parsing only; `main.rs` runs what is parsed.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use fleet_bundler::{artifacts, duration, enroll, exporter, mqtt, rollout};
/// Exit codes, also listed in `--help` and the README.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const CHANGES: u8 = 2;
    pub const DEVICE_FAILED: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const NOT_NEWER: u8 = 5;
    /// `rollout`: the rollout is aborted.
    pub const ABORTED: u8 = 6;
    pub const USAGE: u8 = 64;
    /// `status --wait` stopped by SIGINT (Ctrl-C): 128 + 2, as shells report it.
    pub const INTERRUPTED: u8 = 130;
    /// `status --wait` stopped by SIGTERM: 128 + 15.
    pub const TERMINATED: u8 = 143;
    pub const INVALID_REPO: u8 = 65;
}

#[derive(Parser)]
#[command(
    name = "fleet-bundler",
    version,
    about = "Turns a fleet Git repository into signed per-device bundles, announces them over MQTT and gates CI on fleet status.",
    after_help = concat!("Typical CI flow:
  fleet-bundler validate --repo .
  fleet-bundler plan --repo . --from origin/main --to HEAD
  fleet-bundler build --repo . --rev HEAD --key signing.key --out out/
  fleet-bundler publish --out out/ --broker mqtts://broker:8883 --base-url https://cdn.example/fleet
  fleet-bundler status --broker mqtts://broker:8883 --index out/index.json --selector channel=canary --wait --timeout 10m
With `rollout:` in fleet.yaml, `rollout` replaces `publish` and the gate:
  fleet-bundler rollout --out out/ --broker mqtts://broker:8883 --base-url https://cdn.example/fleet --sync 'aws s3 sync out/ s3://bucket/fleet/'
Enrolling a device (after `fleet-agent enroll` on it):
  fleet-bundler enroll list --broker mqtts://broker:8883 --repo .
  fleet-bundler enroll accept gw-berlin-01 --broker mqtts://broker:8883 --repo . --labels site=berlin && git commit -am 'Enroll gw-berlin-01'

Repository format and rules: bundler/README.md

Exit codes:
  0   success (plan: no changes; status --wait: every device converged)
  1   failure: I/O, Git, keys, registry, broker, or a bundle that does not verify; export: a bundle or blob missing from the build output
  2   plan: there are changes
  3   status --wait: a device failed or rolled back on the indexed version; rollout: halted (a criterion tripped)
  4   status --wait: timeout before every device converged; rollout: --timeout (or --once) while still running
  5   publish: the broker retains a version for a device that this build's is not newer than (nothing published)
  6   rollout: the rollout is aborted
  64  usage error: bad flags; build: no signing key; export: a --device the build output does not hold; verify: a threshold above the keys given;
      publish/status/exporter: a bad broker URL, fleet id or selector; a --broker given twice or more than 16; several --broker for exporter or for status without --index; a --index or TLS file that does not exist
  65  the repository is invalid (validation errors are printed with file:line:column); enroll accept: devices/<id>.yaml or fleet.yaml is
  130 status --wait: interrupted by Ctrl-C (SIGINT); 143: by SIGTERM")
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a signing key pair: DIR/signing.key (0600) and DIR/signing.pub.
    #[command(
        after_help = "Examples:\n  fleet-bundler keygen --out keys/\n  fleet-bundler keygen --out keys/ --json\n\nPrints the key id on stdout (--json: {key_id, secret, public} with the two paths).\nPut the one line of signing.key into a CI secret (FLEET_SIGNING_KEY) and signing.pub into every agent's trusted keys.\n\nExit codes: 0 ok, 1 failure (e.g. the key files exist already, --out is a file), 64 usage."
    )]
    Keygen {
        /// Directory for the key files (created if needed; existing keys are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Print the key id and the two paths as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Check a repository revision: every file, every device; all problems at once.
    #[command(
        after_help = "Examples:\n  fleet-bundler validate\n  fleet-bundler validate --worktree          # the files as they are on disk, before committing\n  fleet-bundler validate --repo /srv/git/fleet.git --rev feature/x --json\n\nA commit is what `build` bundles, so validate checks one (default HEAD). When it checks HEAD and the work tree differs from it, it warns and names the files: commit them, or pass --worktree.\nThe repository is found at --repo or in a directory above it, like git does.\n\nExit codes: 0 valid (warnings allowed), 65 invalid (each problem printed as file:line:column), 1 failure (Git, I/O), 64 usage."
    )]
    Validate {
        #[command(flatten)]
        source: Source,
        /// Check the files on disk (fleet.yaml, devices/, apps/ of the work tree,
        /// uncommitted changes included) instead of a commit.
        #[arg(long, conflicts_with = "rev")]
        worktree: bool,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Render, sign and write every device's bundle, DIR/index.json, DIR/devices/<id>.json and the live dashboard DIR/dashboard/.
    #[command(
        after_help = "Examples:\n  fleet-bundler build --repo . --key keys/signing.key --out out/\n  FLEET_SIGNING_KEY=\"$KEY\" fleet-bundler build --repo . --rev v1.2 --out out/ --resolve-digests --json\n  fleet-bundler build --repo . --key keys/signing.key --out out/ --previous https://cdn.example/fleet\n  fleet-bundler build --repo . --key keys/signing.key --out out/ --dashboard-broker wss://broker.example.com:8084/mqtt\n  cross/build.sh --all && fleet-bundler build --repo . --key keys/signing.key --out out/ --agent-release dist\n\nReuse the same --out directory across builds: unchanged devices keep their bundle and version.\nWithout it (no CI cache), pass --previous with the published output: versions stay newer than what devices hold.\nA commit dated more than 5 minutes ahead of this machine's clock, or whose bundles would already be expired, is refused (exit 1).\nUpload DIR as is: agents poll DIR/devices/<their id>.json and fetch DIR/bundles/<digest>.bundle (and DIR/blobs/<sha256> for artifacts and agent binaries).\nLarge files travel beside the bundle as artifacts (bundle format 5): every file over --artifact-threshold, then the largest ones while a device's inline files total more than --inline-budget; their bytes are written once as DIR/blobs/<sha256>, shared by every device and version that uses them. A device decompresses its bundle in memory, so the bundle stays small; artifacts are streamed to disk.\nAgent self-update (bundle format 7): fleet.yaml `agent:` declares which agent version devices run (`agent: {version: 0.10.0}`, or a list of rules `- {version, selector, allow_downgrade}`, first match wins); --agent-release DIR (repeatable, one per version; or FLEET_AGENT_RELEASE) names a directory whose release.json lists that version's binary per architecture, as cross/build.sh writes dist/release.json. Each binary is written once as DIR/blobs/<sha256>; a device the rule selects gets every architecture's (sha256 and size) in its signed state and fetches only its own.\nDIR/dashboard/index.html is a static live view of the fleet (open it from disk or any static server; it reads the broker over MQTT-over-WebSockets).\nThe signing key may also come from the environment: FLEET_SIGNING_KEY=<the line of signing.key>.\n\nExit codes: 0 built, 65 invalid repository (also: an agent: version no --agent-release provides, printed as fleet.yaml:line:column; nothing written), 1 failure (Git, key, registry, I/O, --previous, a commit dated in the future or already expired, a release.json that is missing or malformed or an agent binary it names that is missing; nothing written), 64 usage (bad flags; no --key and no FLEET_SIGNING_KEY; an --agent-release that is not a directory, two of the same version)."
    )]
    Build(BuildArgs),
    /// Show what changes per device between two revisions (secrets-free).
    #[command(
        after_help = "Examples:\n  fleet-bundler plan --repo . --from origin/main --to HEAD\n  fleet-bundler plan --repo . --from v1 --to v2 --json\n  fleet-bundler plan --from HEAD --worktree      # what the uncommitted changes would do\n\nWhen --to is HEAD and the work tree differs from it, plan warns and names the files: commit them, or pass --worktree.\n\nExit codes: 0 no changes, 2 changes, 65 a revision is invalid, 1 failure, 64 usage."
    )]
    Plan {
        /// Repository: a clone, a bare repository or its .git directory.
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The revision deployed now.
        #[arg(long)]
        from: String,
        /// The revision to deploy.
        #[arg(long, default_value = "HEAD")]
        to: String,
        /// Compare --from with the files on disk (the work tree, uncommitted changes
        /// included) instead of --to.
        #[arg(long, conflicts_with = "to")]
        worktree: bool,
        /// Print the plan as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Lines of context around each change in file diffs.
        #[arg(long, default_value_t = 3)]
        context: usize,
        #[command(flatten)]
        limits: ReadLimits,
        #[command(flatten)]
        artifacts: ArtifactLimits,
        #[command(flatten)]
        age: AgeIdentity,
    },
    /// Announce changed bundles over MQTT (retained, QoS 1, confirmed).
    #[command(
        after_help = "Examples:\n  fleet-bundler publish --out out/ --broker mqtt://127.0.0.1:1883 --base-url http://files.local/fleet\n  fleet-bundler publish --out out/ --broker mqtts://broker:8883 --ca-file ca.pem --username ci --blobs-over-mqtt\n  fleet-bundler publish --out out/ --broker mqtt://rabbit-1:1883 --broker mqtt://rabbit-2:1883 --broker mqtt://rabbit-3:1883 --base-url http://files.local/fleet\n\nRepeat --broker once per node of a cluster whose nodes keep retained messages to themselves (RabbitMQ): every node then retains every announcement (README \"Clustered brokers\").\nOnly devices whose bundle changed since the last publish from this directory (DIR/published.json) are announced; --force announces all.\nThe retained announcements are read first: a device whose retained version is newer than this build's (or equal with another bundle) would refuse it, so nothing is published (exit 5).\n\nExit codes: 0 every announcement acknowledged, 5 a device already has a newer (or equal) version (nothing published; rebuild with --previous), 1 failure (broker unreachable or refused, timeout, an unreadable index or TLS file), 64 usage (bad flags or broker URL, neither --base-url nor --blobs-over-mqtt, no DIR/index.json, a build that declares a rollout (use `rollout`), a TLS file that does not exist)."
    )]
    Publish(mqtt::PublishArgs),
    /// Check a bundle exactly as a device would and print its manifest.
    #[command(
        after_help = "Examples:\n  fleet-bundler verify --pub keys/signing.pub out/bundles/<digest>.bundle\n  fleet-bundler verify --pub a.pub --pub b.pub --threshold 2 --json bundle\n\nWith --json a refusal is printed too: {ok: false, bundle, reason, message}.\n\nExit codes: 0 the bundle verifies, 1 it does not or cannot be read (the reason code is printed, e.g. (expired), (unknown_key); key_file, unreadable), 64 usage (bad flags; a --threshold above the number of distinct --pub keys)."
    )]
    Verify {
        /// A trusted public key file (repeatable).
        #[arg(long = "pub", required = true)]
        pubs: Vec<PathBuf>,
        /// How many distinct trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Expected fleet (default: the one the manifest names).
        #[arg(long)]
        fleet: Option<String>,
        /// Expected device (default: the one the manifest names).
        #[arg(long)]
        device: Option<String>,
        /// Print the manifest as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// The bundle file.
        bundle: PathBuf,
    },
    /// Write one device's current bundle and the blobs it names into one tar file, for a device without network.
    #[command(after_help = "Examples:
  fleet-bundler export --out out/ --device gw-berlin-01 --file gw-berlin-01.tar
  fleet-bundler export --out out/ --device gw-berlin-01 --file /media/usb/gw-berlin-01.tar --json
  tar tvf gw-berlin-01.tar       # bundle, then blobs/<sha256> per artifact and per agent binary

DIR is the output directory of `fleet-bundler build`. The device's bundle is the one its pointer file DIR/devices/<ID>.json names (what the device would fetch now), or, without one, its entry of DIR/index.json.
FILE is a POSIX ustar archive: first the entry `bundle` (the bundle's bytes), then `blobs/<sha256>` for each artifact of the bundle's state (once per content, in the state's order), then for each binary of its agent release (every architecture, by architecture: the device takes its own), each mode 0644, mtime 0, uid/gid 0: the same build output gives the same file. Every blob is checked against the sha256 and size the signed state names. FILE is written to a temp file beside it, then renamed. Its format: fleet-spec/FORMAT.md \"Export files\".
The bundle is not verified here (no key is needed); the device verifies it as it verifies every bundle (`fleet-bundler verify --pub KEY DIR/bundles/<digest>.bundle` checks it beforehand).

--json prints {file, device, version, bundle (its digest), artifacts: [{path, sha256, size}], agent (when the state has an agent release): {version, allow_downgrade, binaries: [{arch, sha256, size}]}, bytes (the size of FILE)}.

Exit codes: 0 written, 1 failure (the bundle or a blob missing from DIR or damaged (the blob and the file that needs it are named), I/O; nothing written), 64 usage (bad flags or device id; DIR holds neither the device's pointer file nor an index.json that lists it).")]
    Export {
        /// The build output directory (bundles/, blobs/, devices/, index.json).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The device whose bundle is exported.
        #[arg(long, value_name = "ID")]
        device: String,
        /// The tar file to write (replaced if it exists).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Print what was written as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show the fleet's status from MQTT; with --wait, gate CI on convergence.
    #[command(
        after_help = "Examples:\n  fleet-bundler status --broker mqtt://127.0.0.1:1883 --fleet acme\n  fleet-bundler status --broker mqtt://broker:1883 --index out/index.json --selector channel=canary --wait --timeout 10m\n  fleet-bundler status --broker mqtt://broker:1883 --fleet acme --serve 127.0.0.1:9810   # Prometheus metrics (see `exporter --help`)\n  fleet-bundler status --broker mqtt://rabbit-1:1883 --broker mqtt://rabbit-2:1883 --index out/index.json --wait\n\nSeveral --broker (one per node of a cluster that keeps retained messages per node, RabbitMQ) need --index: status reads each indexed device's topics on every node and keeps the newest report (README \"Clustered brokers\").\nWith --wait: exit 0 when every selected device of the index runs its indexed version and is converged, 3 as soon as one failed or rolled back on it, 4 at the timeout.\nCtrl-C during --wait ends it as interrupted (exit 130; SIGTERM: 143), not as a timeout.\nExit codes: 0 ok/converged (--serve: stopped by a signal), 3 failed or rolled back, 4 timeout, 130 --wait interrupted by Ctrl-C (143: by SIGTERM), 1 failure (broker unreachable or refused, unreadable --index or TLS file; --serve: cannot listen), 64 usage (bad flags, broker URL, fleet id, prefix or --selector; --wait without --index; a --index, --ca-file, --client-cert or --client-key that does not exist)."
    )]
    Status(mqtt::StatusArgs),
    /// Serve the fleet's status as Prometheus metrics on http://ADDR/metrics, live from MQTT.
    #[command(after_help = "Examples:
  fleet-bundler exporter --broker mqtt://127.0.0.1:1883 --fleet acme
  fleet-bundler exporter --broker mqtts://broker:8883 --ca-file ca.pem --username metrics --index out/index.json --listen 0.0.0.0:9810
  fleet-bundler status --broker mqtt://broker:1883 --fleet acme --serve 127.0.0.1:9810     # the same exporter
  curl -s http://127.0.0.1:9810/metrics | grep '^fleet_devices_by_state'

Subscribes to <prefix>/<fleet>/devices/+/status and .../online (retained) and updates the metrics as messages arrive; nothing is stored, so a restart shows the same fleet. With --index, the build's devices count before they report, and what they should run is the index's.
A broker that is down or goes away is retried for as long as the exporter runs (fleet_exporter_broker_connected shows it); the metrics keep the last known state meanwhile.
Metrics (the README has the table): fleet_devices, fleet_devices_by_state{state}, fleet_devices_by_online{online}, fleet_devices_by_desired_commit{commit}, fleet_devices_by_applied_commit{commit}, fleet_devices_outdated, fleet_devices_in_trouble_by_error{code}, per device (unless --no-device-metrics) fleet_device_state{device,state}, fleet_device_online{device}, fleet_device_last_report_timestamp_seconds{device}; and fleet_exporter_build_info, fleet_exporter_broker_connected, fleet_exporter_*_messages_total.
For a read-only broker account, the ACL needs only: topic read <prefix>/<fleet>/devices/+/status and topic read <prefix>/<fleet>/devices/+/online.
Prometheus scrape config:
  scrape_configs:
    - job_name: fleet
      static_configs: [{ targets: ['exporter-host:9810'] }]

Runs until Ctrl-C or SIGTERM (then exit 0).
Exit codes: 0 stopped by a signal, 1 failure at start (cannot listen on ADDR, unreadable --index or TLS files), 64 usage (bad flags, broker URL, fleet or prefix; a --index or TLS file that does not exist).")]
    Exporter(exporter::ExporterArgs),
    /// Release a build wave by wave (fleet.yaml `rollout:`), watch the devices, halt by itself.
    #[command(after_help = "Examples:
  fleet-bundler build --repo . --key keys/signing.key --out out/      # with rollout: in fleet.yaml
  fleet-bundler rollout --out out/ --broker mqtts://broker:8883 --base-url https://cdn.example/fleet \\
      --sync 'aws s3 sync out/ s3://bucket/fleet/'
  fleet-bundler rollout --out out/ --broker mqtt://127.0.0.1:1883 --base-url http://files.local/fleet --once   # one step, for cron
  fleet-bundler rollout --abort --broker mqtt://127.0.0.1:1883 --fleet acme --reason 'bad config'
  fleet-bundler rollout --out out/ --broker mqtt://n1:1883 --broker mqtt://n2:1883 --broker mqtt://n3:1883 --base-url http://files.local/fleet   # RabbitMQ: every node
  fleet-bundler status --broker mqtt://127.0.0.1:1883 --fleet acme       # shows the rollout line

How it works: when fleet.yaml declares `rollout:`, `build` records the waves in DIR/index.json and writes the new pointer files to DIR/devices.next/ (devices keep polling their previous pointer file). This command releases one wave at a time: it moves the wave's pointer files into DIR/devices/, runs --sync (the upload), announces the wave's devices over MQTT at the declared pace with jitter (as `publish` does), and watches their retained statuses. A wave whose devices all converged (or failed within the halt limits) soaks, then the next wave is released.
It halts when more devices failed or rolled back than halt.max_failed, when the failed share of the reporting devices exceeds halt.max_failed_rate (once halt.min_reporting reported), or when a wave is not settled within halt.wave_timeout: no further pointer file is moved and no device announced. Devices that updated healthily stay updated; failed ones rolled back by themselves.
The state is retained on <prefix>/<fleet>/rollout (QoS 1) after every change; nothing is kept elsewhere. Started again with the same DIR, it resumes the running rollout where it was (killed or --timeout); a halted or aborted rollout of the same commit is printed, nothing moved; a build of a newer commit supersedes a running rollout and starts again at wave 1.
A clustered broker whose nodes keep retained messages to themselves (RabbitMQ): pass --broker once per node; every retained message (announcements, the state, --abort) goes to every node, each acknowledging it, and statuses and the state are read from every node on exact topics and merged (newest report timestamp, newest state updated_at; README \"Clustered brokers\").

Exit codes: 0 done (every wave soaked; --abort: the abort was published), 3 halted (the reason is printed), 4 --timeout reached or --once done while the rollout still runs (a later run resumes), 5 (as it starts) a device already has a newer (or equal) version retained (nothing released; rebuild with --previous), 6 aborted, 1 failure (broker, I/O), 64 usage (bad flags or broker URL, no DIR/index.json, a build without rollout:, neither --base-url nor --blobs-over-mqtt, --abort without a retained rollout).")]
    Rollout(rollout::drive::RolloutArgs),
    /// Device enrollment: list the devices' claims (MQTT), accept one into devices/<id>.yaml of the work tree.
    #[command(subcommand)]
    Enroll(EnrollCommand),
}

#[derive(Subcommand)]
pub(crate) enum EnrollCommand {
    /// Show the devices' enrollment claims, each checked; with --repo, whether devices/<id>.yaml has its key.
    #[command(after_help = "Examples:
  fleet-bundler enroll list --broker mqtts://broker:8883 --repo .
  fleet-bundler enroll list --broker mqtt://127.0.0.1:1883 --fleet acme --json | jq '.[] | select(.standing == \"pending\")'

A device publishes its claim with `fleet-agent enroll` (retained on <prefix>/<fleet>/enroll/<device>): its age recipients (newest first), key id, agent version, arch, os, kernel, host name, an app-specific machine id, and when it was made.
Each claim is checked: JSON within 4 KiB, the device and fleet of its topic, every recipient a valid age X25519 recipient (Bech32 checksum), the key id its first recipient's. A claim that fails is listed as invalid with the reason; it is never used.
With --repo (the fleet repository's work tree; its fleet.yaml also names the fleet and prefix), each claim is compared with devices/<id>.yaml:
  accepted   the file lists the claim's current key
  pending    no file, or no public_key: in it (a new device)
  rotation   the file lists other keys (the device rotated its key; or another device claims this id)
  file_invalid  the device file does not load (fleet-bundler validate --worktree says why)
A claim is unsigned: before accepting, compare its key id with what `fleet-agent identity` prints on the device.
The bundler's broker account needs read access to <prefix>/<fleet>/enroll/+ (README \"Enrollment\").

--json prints an array: {device, topic, valid, reason (invalid), claim (valid: the claim's fields), standing (with --repo)}.

Exit codes: 0 listed (invalid claims included), 1 failure (broker unreachable or refused, the subscription refused, an unreadable file), 64 usage (bad flags or broker URL; no --fleet and no --repo; a bad fleet id or prefix), 65 fleet.yaml of --repo is invalid.")]
    List(enroll::ListArgs),
    /// Write a device's claimed key(s) into devices/<ID>.yaml of the work tree (not committed: commit it after review).
    #[command(after_help = "Examples:
  fleet-bundler enroll accept gw-berlin-01 --broker mqtts://broker:8883 --repo . --labels site=berlin,channel=canary
  git add devices/gw-berlin-01.yaml && git commit -m 'Enroll gw-berlin-01 (key id 3f9a0c2b7d41e5a8)'
  fleet-bundler enroll accept gw-berlin-01 --broker mqtts://broker:8883 --repo .     # after a key rotation on the device

Reads the device's retained claim from the broker and checks it (as `enroll list`); nothing is written for an invalid claim or no claim.
A new device: writes devices/<ID>.yaml with `public_key: age1...` and the --labels.
An existing device file: only its public_key: lines change (every other line, comments included, stays byte for byte; --labels is then ignored): `public_key: age1...` for one key, `public_key: [age1new, age1old]` while the device rotates its key (both accepted until the old one is removed from the file).
Compare the printed key id with `fleet-agent identity` on the device, review the change, and commit it: acceptance is a commit like every other change.

Exit codes: 0 written (or the file listed these keys already), 1 failure (no claim of ID on the broker, an invalid claim, a device file whose public_key cannot be edited line by line, broker or I/O), 64 usage (bad flags, broker URL, device id or --labels), 65 devices/<ID>.yaml or fleet.yaml is invalid (each problem printed as file:line:column).")]
    Accept(enroll::AcceptArgs),
}

/// Where the repository is.
#[derive(Args)]
pub(crate) struct Source {
    /// Repository: a clone, a bare repository or its .git directory.
    #[arg(long, default_value = ".")]
    pub(crate) repo: PathBuf,
    /// Revision: branch, tag, commit id, HEAD~1, ...
    #[arg(long, default_value = "HEAD")]
    pub(crate) rev: String,
    #[command(flatten)]
    pub(crate) limits: ReadLimits,
    #[command(flatten)]
    pub(crate) age: AgeIdentity,
}

/// The CI's age identity, which decrypts the repository's secrets.
#[derive(Args, Clone, Default)]
pub(crate) struct AgeIdentity {
    /// The CI's age identity file (as age-keygen writes it): decrypts the repository's
    /// secrets (`*.age` files, secrets.yaml.age). Without it, validate and plan check
    /// everything else and name the secrets they skipped; build refuses a repository with
    /// secrets. For CI secret stores, FLEET_AGE_IDENTITY may hold the key itself: an
    /// environment variable only, never a flag (flags show in process listings).
    #[arg(long = "age-identity", value_name = "FILE", env = "FLEET_AGE_IDENTITY_FILE")]
    pub(crate) path: Option<PathBuf>,
}

/// Limits of what is read from Git.
#[derive(Args, Clone, Copy)]
pub(crate) struct ReadLimits {
    /// Largest file read from Git, in bytes or with k/m/g (powers of 1024). A larger file
    /// is an error that names it; its size is read from the Git object header first.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, env = "FLEET_MAX_FILE_SIZE")]
    pub(crate) max_file_size: u64,
}

/// Which files leave the bundle for blobs (bundle format 5).
#[derive(Args, Clone, Copy)]
pub(crate) struct ArtifactLimits {
    /// A file larger than this travels as an artifact (its bytes in OUT/blobs/<sha256>,
    /// its sha256 and size in the signed state): bytes, or with k/m/g (KiB, MiB, GiB),
    /// at least 1.
    #[arg(long, value_name = "BYTES", default_value = "256KiB", value_parser = parse_size, env = "FLEET_ARTIFACT_THRESHOLD")]
    pub(crate) artifact_threshold: u64,
    /// When a device's inline files still total more than this, its largest ones
    /// travel as artifacts too, until they fit: the device decompresses its bundle in
    /// memory, so the bundle stays small whatever the payload.
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = parse_size, env = "FLEET_INLINE_BUDGET")]
    pub(crate) inline_budget: u64,
}

impl ArtifactLimits {
    pub(crate) fn policy(&self) -> artifacts::Policy {
        artifacts::Policy { threshold: self.artifact_threshold, inline_budget: self.inline_budget }
    }
}

#[derive(Args)]
pub(crate) struct BuildArgs {
    #[command(flatten)]
    pub(crate) source: Source,
    #[command(flatten)]
    pub(crate) artifacts: ArtifactLimits,
    /// Signing key file (repeatable, for k-of-n signing).
    #[arg(long = "key")]
    pub(crate) keys: Vec<PathBuf>,
    /// The signing key line itself, for CI secrets (used when no --key is given).
    #[arg(long = "key-env", env = "FLEET_SIGNING_KEY", hide_env_values = true, hide = true)]
    pub(crate) key_line: Option<String>,
    /// Output directory: bundles/ and index.json.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Pin image tags to digests through the Docker Registry HTTP API v2, and record
    /// each image's download size for the agents' disk check (bundle format 6).
    #[arg(long)]
    pub(crate) resolve_digests: bool,
    /// With --resolve-digests: pin only (one HEAD per image), record no sizes, so
    /// bundles stay readable by agents that read bundle format 5 at most.
    #[arg(long, requires = "resolve_digests")]
    pub(crate) no_image_sizes: bool,
    /// A registry (host[:port]) spoken to over plain HTTP (loopback ones always are).
    #[arg(long = "insecure-registry")]
    pub(crate) insecure_registries: Vec<String>,
    /// Timeout of each registry request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) registry_timeout: Duration,
    /// zstd compression level (1-22). 19 makes bundles ~10% smaller at ~10x the time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub(crate) level: i32,
    /// The published build (an http(s) URL of the uploaded output, or a directory):
    /// versions are chosen newer than its index's, and unchanged devices keep its
    /// bundles. Use it when the output directory is not kept between CI runs.
    #[arg(long, value_name = "URL|DIR")]
    pub(crate) previous: Option<String>,
    /// Timeout of each request to the --previous server.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) previous_timeout: Duration,
    /// Check the commit's date against this time (unix seconds) instead of this
    /// machine's clock; the bundles do not depend on it. For tests and for rebuilding a
    /// past commit as it was built then.
    #[arg(long, env = "FLEET_BUILD_NOW", value_name = "UNIX_SECONDS")]
    pub(crate) now: Option<i64>,
    /// The broker's MQTT-over-WebSockets URL for the live dashboard written into
    /// OUT/dashboard/ (e.g. ws://broker:9001 or wss://broker/mqtt); without it the page
    /// asks for one (`index.html?broker=ws://...` overrides it either way).
    #[arg(long, value_name = "WS_URL", env = "FLEET_DASHBOARD_BROKER", value_parser = parse_ws_url)]
    pub(crate) dashboard_broker: Option<String>,
    /// Do not write OUT/dashboard/.
    #[arg(long, conflicts_with = "dashboard_broker")]
    pub(crate) no_dashboard: bool,
    /// An agent release directory (repeatable, one per version): its release.json names
    /// the version and one binary per architecture (aarch64, arm, x86_64), as
    /// cross/build.sh writes dist/release.json. Devices whose fleet.yaml `agent:` names
    /// that version get the binaries (OUT/blobs/<sha256>, bundle format 7).
    #[arg(long = "agent-release", value_name = "DIR", env = "FLEET_AGENT_RELEASE")]
    pub(crate) agent_releases: Vec<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Progress on stderr (default: when stderr is a terminal).
    #[arg(long)]
    pub(crate) progress: bool,
}

pub(crate) fn parse_ws_url(s: &str) -> Result<String, String> {
    fleet_bundler::dashboard::check_broker_url(s).map(|()| s.to_string())
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse_duration_ms(s).map(Duration::from_millis)
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    duration::parse_bytes(s)
}
