use super::*;

const KEY: &str = "fleet-ed25519-public:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("/etc/fleet-agent/agent.toml"))
}

fn minimal() -> String {
    format!("device = \"gw-01\"\nfleet = \"acme\"\nstate_dir = \"/var/lib/fleet-agent\"\nallowed_roots = [\"/srv/fleet\"]\n[trust]\npublic_keys = [\"{KEY}\"]\n")
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(&minimal()).expect("valid");
    assert_eq!(c.topic_prefix, "fleet");
    assert_eq!(c.reconcile_interval, Duration::from_secs(60));
    assert_eq!(c.health_timeout, Duration::from_secs(60));
    assert_eq!(c.engine_socket.as_deref(), Some(Path::new(DEFAULT_ENGINE_SOCKET)));
    assert!(c.mqtt.is_none());
    assert_eq!(c.trusted.threshold(), 1);
}

#[test]
fn errors_name_the_key() {
    let cases = [
        (minimal() + "bogus = 1\n", "bogus"),
        (minimal().replace("gw-01", "gw/01"), "`device`"),
        (minimal() + "[mqtt]\nurl = \"tcp://x\"\n", "`mqtt.url`"),
        (minimal() + "[engine]\nsocket = \"relative.sock\"\n", "`engine.socket`"),
        (minimal().replace("/srv/fleet", "/srv/../etc"), "`allowed_roots[0]`"),
        (minimal().replace(KEY, "fleet-ed25519-public:zz"), "`trust.public_keys[0]`"),
        (minimal() + "threshold = 2\n", "`trust`"),
        (minimal() + "[fetch]\nbase_url = \"ftp://x\"\n", "`fetch.base_url`"),
        (minimal().replace("state_dir = \"/var/lib/fleet-agent\"\n", ""), "state_dir"),
        ("log_format = \"xml\"\n".to_string() + &minimal(), "`log_format`"),
        (minimal() + "[engine.policy]\nbind_roots = [\"/srv/../etc\"]\n", "`engine.policy.bind_roots[0]`"),
        (minimal() + "[engine.policy]\nbind_roots = [\"/\"]\n", "`engine.policy.bind_roots[0]`"),
        (minimal() + "[engine.policy]\ndevices = [\"ttyUSB0\"]\n", "`engine.policy.devices[0]`"),
        (minimal() + "[engine.policy]\ncapabilities = [\"NET ADMIN\"]\n", "`engine.policy.capabilities[0]`"),
        (
            minimal() + "[engine.policy]\nregistries = [\"https://ghcr.io\"]\n",
            "`engine.policy.registries[0]`",
        ),
        (minimal() + "[engine.policy]\nallow_everything = true\n", "allow_everything"),
        (minimal() + "[engine.policy]\nhost_namespaces = [\"net\"]\n", "`engine.policy.host_namespaces[0]`"),
        (
            minimal() + "[engine.policy]\ndevice_cgroup_rules = [\"c 189 rmw\"]\n",
            "`engine.policy.device_cgroup_rules[0]`",
        ),
    ];
    for (text, key) in cases {
        let err = parse(&text).expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// Issue 20: a file with many mistakes gets them all in one run, in file order, each
/// with its line, column and key: unknown keys (with a suggestion), types, missing
/// keys, then (once those are right) every invalid value.
#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let text = format!(
            "device = \"gw-01\"\nfleet = 7\nstate_dir = \"/var/lib/fleet-agent\"\nalowed_roots = [\"/srv\"]\n\
             reconcile_interval_secs = \"60\"\n[mqtt]\nurl = \"mqtt://b\"\nkeepalive = 5\n\
             [trust]\npublic_keys = [\"{KEY}\", 3]\n[engine.policy]\nallow_privileged = \"yes\"\nbind_root = []\n"
        );
    let err = parse(&text).expect_err("invalid");
    let got: Vec<(Option<usize>, String)> = err.problems.iter().map(|p| (p.line, p.key.clone())).collect();
    let want = [
        (Some(2), "fleet"),
        (Some(4), "alowed_roots"),
        (Some(5), "reconcile_interval_secs"),
        (Some(8), "mqtt.keepalive"),
        (Some(10), "trust.public_keys[1]"),
        (Some(12), "engine.policy.allow_privileged"),
        (Some(13), "engine.policy.bind_root"),
    ];
    let want: Vec<(Option<usize>, String)> = want.iter().map(|(l, k)| (*l, k.to_string())).collect();
    assert_eq!(got, want, "{err}");
    let text = err.to_string();
    assert!(text.contains("7 problems"), "{text}");
    assert!(
        text.contains(
            "agent.toml:4:1: `alowed_roots`: unknown key at the top level (did you mean `allowed_roots`?)"
        ),
        "{text}"
    );
    assert!(
        text.contains("`mqtt.keepalive`: unknown key in [mqtt] (did you mean `keepalive_secs`?)"),
        "{text}"
    );
    assert!(text.contains("`fleet`: must be a string, not an integer"), "{text}");

    // Values: all of them too, located.
    let text = "log_format = \"xml\"\n".to_string()
        + &minimal().replace("gw-01", "gw/01")
        + "[engine.policy]\nbind_roots = [\"/\", \"rel\"]\n";
    let err = parse(&text).expect_err("invalid");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["log_format", "device", "engine.policy.bind_roots[0]", "engine.policy.bind_roots[1]"],
        "{err}"
    );
    assert_eq!((err.problems[2].line, err.problems[2].col), (Some(9), Some(15)), "{err}");

    // Types and values together: a wrong type is removed, the rest still judged.
    let text = "log_format = \"xml\"\nhealth_timeout_secs = true\n".to_string()
        + &minimal()
        + "[mqtt]\nurl = \"tcp://x\"\nkeepalive_secs = \"5\"\nbogus = 1\n";
    let err = parse(&text).expect_err("invalid");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["log_format", "health_timeout_secs", "mqtt.url", "mqtt.keepalive_secs", "mqtt.bogus"],
        "{err}"
    );

    // A missing required key, and TOML syntax errors (each located).
    let err = parse("device = \"gw\"\n").expect_err("missing");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["fleet", "state_dir", "trust"], "{err}");
    let err = parse("device = \"gw\nfleet = = 1\n").expect_err("syntax");
    assert!(err.problems.iter().all(|p| p.line.is_some()), "{err}");
}

#[test]
fn the_documented_example_is_valid() {
    let text = include_str!("../../agent.toml.example")
        .replace(&"0".repeat(64), KEY.split(':').nth(1).expect("hex"));
    let c = parse(&text).expect("agent.toml.example parses");
    assert_eq!(c.device, "gw-01");
    assert!(c.mqtt.expect("mqtt").tls);
    assert_eq!(c.fetch.base_url.as_deref(), Some("https://bundles.example.com/acme"));
}

#[test]
fn engine_policy_defaults_to_closed_and_parses_every_key() {
    let c = parse(&minimal()).expect("valid");
    assert_eq!(c.engine_policy.policy, fleet_spec::policy::EnginePolicy::default());
    assert_eq!(c.engine_policy.config_dir, Path::new("/etc/fleet-agent"));
    let text = minimal()
        + "[engine.policy]\nallow_privileged = true\nallow_host_network = true\nallow_engine_socket = true\n"
        + "bind_roots = [\"/data\"]\ndevices = [\"/dev/ttyUSB0\"]\ncapabilities = [\"NET_ADMIN\"]\n"
        + "registries = [\"ghcr.io/acme\"]\nrequire_digest = true\nallow_unconfined = true\n"
        + "host_namespaces = [\"pid\", \"uts\"]\ndevice_cgroup_rules = [\"c 189:* rmw\"]\n";
    let p = parse(&text).expect("valid").engine_policy.policy;
    assert!(p.allow_privileged && p.allow_host_network && p.allow_engine_socket && p.require_digest);
    assert_eq!(p.bind_roots, ["/data"]);
    assert_eq!(p.devices, ["/dev/ttyUSB0"]);
    assert_eq!(p.capabilities, ["NET_ADMIN"]);
    assert_eq!(p.registries, ["ghcr.io/acme"]);
    assert!(p.allow_unconfined);
    assert_eq!(p.host_namespaces, ["pid", "uts"]);
    assert_eq!(p.device_cgroup_rules, ["c 189:* rmw"]);
}

#[test]
fn mqtt_url_and_engine_none() {
    let c = parse(&(minimal() + "[mqtt]\nurl = \"mqtt://broker.local:1884\"\n[engine]\nsocket = \"none\"\n"))
        .expect("valid");
    let m = c.mqtt.expect("mqtt");
    assert_eq!(
        (m.host.as_str(), m.port, m.tls, m.client_id.as_str()),
        ("broker.local", 1884, false, "gw-01")
    );
    assert!(c.engine_socket.is_none());
    let c = parse(&(minimal() + "[mqtt]\nurl = \"mqtts://broker\"\n")).expect("valid");
    assert_eq!(c.mqtt.expect("mqtt").port, 8883);
}
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

/// A file holding `text`, in a temp dir that lives as long as the returned guard.
fn file_with(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("file.pem");
    std::fs::write(&path, text).expect("write");
    (dir, path)
}

const PEM_WRAPPED_GARBAGE: &str =
    "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";
const PEM_WRAPPED_GARBAGE_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n";

fn mqtts(lines: &str) -> String {
    minimal() + "[mqtt]\nurl = \"mqtts://broker\"\n" + lines
}

fn assert_key_and_file(err: ConfigErrors, key: &str, file: &Path) {
    let text = err.to_string();
    assert!(text.contains(&format!("`{key}`")), "names {key}: {text}");
    assert!(text.contains(&file.display().to_string()), "names {}: {text}", file.display());
}

#[test]
fn mqtt_ca_file_without_a_certificate_is_refused() {
    let (_d, garbage) = file_with("this is not PEM\n");
    let err = parse(&mqtts(&format!("ca_file = {garbage:?}\n"))).expect_err("garbage CA");
    assert_key_and_file(err, "mqtt.ca_file", &garbage);
}

#[test]
fn mqtt_ca_file_with_a_certificate_that_does_not_parse_is_refused() {
    let (_d, garbage) = file_with(PEM_WRAPPED_GARBAGE);
    let err = parse(&mqtts(&format!("ca_file = {garbage:?}\n"))).expect_err("garbage CA");
    assert_key_and_file(err, "mqtt.ca_file", &garbage);
}

#[test]
fn fetch_ca_file_with_garbage_is_refused() {
    let (_d, garbage) = file_with(PEM_WRAPPED_GARBAGE);
    let err = parse(&(minimal() + &format!("[fetch]\nca_file = {garbage:?}\n"))).expect_err("garbage");
    assert_key_and_file(err, "fetch.ca_file", &garbage);
}

#[test]
fn client_cert_file_without_a_certificate_is_refused() {
    let (_d, garbage) = file_with("-----BEGIN NOTHING-----\n-----END NOTHING-----\n");
    let key = fixture("client-key.pem");
    let err = parse(&mqtts(&format!("client_cert = {garbage:?}\nclient_key = {key:?}\n")))
        .expect_err("no certificate");
    assert_key_and_file(err, "mqtt.client_cert", &garbage);
}

#[test]
fn client_cert_that_does_not_parse_is_refused() {
    let (_d, garbage) = file_with(PEM_WRAPPED_GARBAGE);
    let key = fixture("client-key.pem");
    let err = parse(&mqtts(&format!("client_cert = {garbage:?}\nclient_key = {key:?}\n")))
        .expect_err("garbage certificate");
    assert_key_and_file(err, "mqtt.client_cert", &garbage);
}

#[test]
fn client_key_that_is_not_pem_is_refused() {
    let (_d, garbage) = file_with("not a key\n");
    let cert = fixture("client.pem");
    let err = parse(&mqtts(&format!("client_cert = {cert:?}\nclient_key = {garbage:?}\n")))
        .expect_err("garbage key");
    assert_key_and_file(err, "mqtt.client_key", &garbage);
}

#[test]
fn client_key_that_does_not_parse_is_refused() {
    let (_d, garbage) = file_with(PEM_WRAPPED_GARBAGE_KEY);
    let cert = fixture("client.pem");
    let err = parse(&mqtts(&format!("client_cert = {cert:?}\nclient_key = {garbage:?}\n")))
        .expect_err("garbage key");
    assert_key_and_file(err, "mqtt.client_key", &garbage);
}

#[test]
fn client_key_of_another_certificate_is_refused() {
    let (cert, other) = (fixture("client.pem"), fixture("other-key.pem"));
    let err = parse(&mqtts(&format!("client_cert = {cert:?}\nclient_key = {other:?}\n")))
        .expect_err("mismatched key");
    assert_key_and_file(err, "mqtt.client_key", &other);
}

#[test]
fn valid_ca_and_client_files_are_accepted() {
    let (ca, cert, key) = (fixture("ca.pem"), fixture("client.pem"), fixture("client-key.pem"));
    let c = parse(&mqtts(&format!("ca_file = {ca:?}\nclient_cert = {cert:?}\nclient_key = {key:?}\n")))
        .expect("valid TLS files");
    assert!(c.mqtt.expect("mqtt").tls);
    parse(&(minimal() + &format!("[fetch]\nca_file = {ca:?}\n"))).expect("valid fetch CA");
}

#[test]
fn password_over_plain_mqtt_warns() {
    let c =
        parse(&(minimal() + "[mqtt]\nurl = \"mqtt://broker\"\nusername = \"gw\"\npassword = \"s3cret\"\n"))
            .expect("valid");
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("mqtt.password") && warnings[0].contains("mqtt://"), "{warnings:?}");
}

#[test]
fn password_over_mqtts_or_no_password_does_not_warn() {
    let tls = parse(&mqtts("username = \"gw\"\npassword = \"s3cret\"\n")).expect("valid");
    assert!(tls.warnings().is_empty(), "{:?}", tls.warnings());
    let anonymous = parse(&(minimal() + "[mqtt]\nurl = \"mqtt://broker\"\n")).expect("valid");
    assert!(anonymous.warnings().is_empty(), "{:?}", anonymous.warnings());
}

fn with_roots(state_dir: &str, roots: &str) -> String {
    minimal()
        .replace("state_dir = \"/var/lib/fleet-agent\"", &format!("state_dir = {state_dir:?}"))
        .replace("allowed_roots = [\"/srv/fleet\"]", &format!("allowed_roots = [{roots}]"))
}

fn assert_overlap_refused(text: &str, config: &Path, key: &str, both: [&str; 2]) {
    let err = Config::parse(text, config).expect_err("overlap").to_string();
    assert!(err.contains(&format!("`{key}`")), "names {key}: {err}");
    for path in both {
        assert!(err.contains(&format!("{path:?}")), "names {path}: {err}");
    }
}

#[test]
fn allowed_root_containing_the_state_dir_is_refused() {
    let text = with_roots("/var/lib/fleet-agent", "\"/srv/fleet\", \"/var/lib\"");
    assert_overlap_refused(
        &text,
        Path::new("/etc/fleet-agent/agent.toml"),
        "allowed_roots[1]",
        ["/var/lib", "/var/lib/fleet-agent"],
    );
}

#[test]
fn allowed_root_equal_to_or_inside_the_state_dir_is_refused() {
    let config = Path::new("/etc/fleet-agent/agent.toml");
    let text = with_roots("/var/lib/fleet-agent", "\"/var/lib/fleet-agent\"");
    assert_overlap_refused(
        &text,
        config,
        "allowed_roots[0]",
        ["/var/lib/fleet-agent", "/var/lib/fleet-agent"],
    );
    let text = with_roots("/var/lib/fleet-agent", "\"/var/lib/fleet-agent/bundles\"");
    assert_overlap_refused(
        &text,
        config,
        "allowed_roots[0]",
        ["/var/lib/fleet-agent/bundles", "/var/lib/fleet-agent"],
    );
}

#[test]
fn allowed_root_overlapping_the_config_dir_is_refused() {
    let config = Path::new("/etc/fleet-agent/agent.toml");
    for root in ["/etc", "/etc/fleet-agent", "/etc/fleet-agent/files"] {
        let text = with_roots("/var/lib/fleet-agent", &format!("{root:?}"));
        assert_overlap_refused(&text, config, "allowed_roots[0]", [root, "/etc/fleet-agent"]);
    }
}

#[test]
fn overlap_is_found_after_normalizing_dot_dot_and_trailing_slashes() {
    let config = Path::new("/etc/fleet-agent/../fleet-agent/./agent.toml");
    let text = with_roots("/srv/fleet/state/../agent-state/", "\"/srv/fleet\"");
    assert_overlap_refused(
        &text,
        Path::new("/etc/x/agent.toml"),
        "allowed_roots[0]",
        ["/srv/fleet", "/srv/fleet/agent-state"],
    );
    let text = with_roots("/var/lib/fleet-agent", "\"/etc/fleet-agent/keys\"");
    assert_overlap_refused(&text, config, "allowed_roots[0]", ["/etc/fleet-agent/keys", "/etc/fleet-agent"]);
}

#[test]
fn allowed_root_reaching_the_state_dir_through_a_symlink_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&state, &link).expect("symlink");
    let text = with_roots(&state.display().to_string(), &format!("{:?}", link.join("files")));
    let err = parse(&text).expect_err("symlinked root inside the state dir").to_string();
    assert!(err.contains("`allowed_roots[0]`"), "{err}");
    assert!(err.contains(&link.join("files").display().to_string()), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
}

#[test]
fn allowed_roots_beside_the_state_and_config_dirs_are_accepted() {
    let text =
        with_roots("/var/lib/fleet-agent", "\"/srv/fleet\", \"/etc/fleet\", \"/var/lib/fleet-agent2\"");
    let c = parse(&text).expect("disjoint roots");
    assert_eq!(c.allowed_roots.len(), 3);
}

fn fetch_https(lines: &str) -> String {
    minimal() + "[fetch]\nbase_url = \"https://bundles.example\"\n" + lines
}

#[test]
fn bundle_server_credentials_need_https_and_both_files_and_a_sane_token() {
    let (cert, key) = (fixture("client.pem"), fixture("client-key.pem"));
    let c = parse(&fetch_https(&format!("client_cert = {cert:?}\nclient_key = {key:?}\n"))).expect("valid");
    assert_eq!(c.fetch.client_auth, Some((cert.clone(), key.clone())));
    let (_d, token) = file_with("a-token\n");
    let c = parse(&fetch_https(&format!("bearer_token_file = {token:?}\n"))).expect("valid");
    assert_eq!(c.fetch.bearer_token_file.as_deref(), Some(token.as_path()));

    let over_http = |lines: &str| minimal() + "[fetch]\nbase_url = \"http://bundles.example\"\n" + lines;
    let err = parse(&over_http(&format!("bearer_token_file = {token:?}\n"))).expect_err("plain HTTP");
    assert!(err.to_string().contains("`fetch.bearer_token_file`: needs an https:// fetch.base_url"), "{err}");
    let err =
        parse(&over_http(&format!("client_cert = {cert:?}\nclient_key = {key:?}\n"))).expect_err("http");
    assert!(err.to_string().contains("`fetch.client_cert`: needs an https:// fetch.base_url"), "{err}");
    let err = parse(&fetch_https(&format!("client_cert = {cert:?}\n"))).expect_err("no key");
    assert!(err.to_string().contains("`fetch.client_key`: client_cert and client_key go together"), "{err}");
    let other = fixture("other-key.pem");
    let err =
        parse(&fetch_https(&format!("client_cert = {cert:?}\nclient_key = {other:?}\n"))).expect_err("pair");
    assert_key_and_file(err, "fetch.client_key", &other);
    // A token that could smuggle a header line, or none at all.
    for bad in ["tok\r\nX-Evil: 1\n", "two words\n", "\n"] {
        let (_d, token) = file_with(bad);
        let err = parse(&fetch_https(&format!("bearer_token_file = {token:?}\n"))).expect_err("bad token");
        assert_key_and_file(err, "fetch.bearer_token_file", &token);
    }
    let err = parse(&fetch_https("bearer_token_file = \"/nonexistent/token\"\n")).expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/token"), "{err}");
}
