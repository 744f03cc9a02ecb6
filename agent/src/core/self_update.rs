//! Self-update, decided: given the agent release the committed state declares, what
//! this agent is (its version, its binary's digest, its architecture, whether
//! `fleet-agent launch` runs it) and the binaries that already failed, whether to switch
//! and, when not, why (a reason code for status and events).
//!
//! The rules: a state without a release leaves the agent alone; the binary for this
//! architecture is the one wanted; the one running is kept; a binary that failed its
//! check or its trial is never tried again; a release older than the running agent is
//! refused unless the (newer, signed) bundle allows the downgrade; and only an agent
//! that `fleet-agent launch` supervises may switch, since only the launcher can bring
//! the previous binary back.

use fleet_spec::model::{compare_versions, AgentBinary, AgentRelease};

/// What the running agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running<'a> {
    /// Its version (`fleet-agent --version`).
    pub version: &'a str,
    /// The sha256 (hex) of its binary.
    pub sha256: &'a str,
    /// `std::env::consts::ARCH`.
    pub arch: &'a str,
    /// Started by `fleet-agent launch` (`FLEET_AGENT_LAUNCHER=1`).
    pub launched: bool,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Nothing to do: no release declared, or its binary is the one running.
    Keep,
    /// Switch to this binary (after staging and checking it).
    Switch(&'a AgentBinary),
    /// Not taken: a reason code and a sentence for status and events.
    Refuse { code: &'static str, reason: String, digest: Option<String> },
}

/// Decides. `failed` gives the reason a binary (by sha256 hex) failed before, if it did.
pub fn decide<'a>(
    release: Option<&'a AgentRelease>,
    running: &Running<'_>,
    failed: impl Fn(&str) -> Option<String>,
) -> Decision<'a> {
    let Some(release) = release else { return Decision::Keep };
    let Some(binary) = release.binary(running.arch) else {
        let archs: Vec<&str> = release.binaries.iter().map(|b| b.arch.as_str()).collect();
        return Decision::Refuse {
            code: "agent_no_binary",
            reason: format!(
                "agent release {} has no binary for this device's architecture {} (it has: {}): build it for {} too (cross/build.sh --targets) and pass that directory to `fleet-bundler build --agent-release`",
                release.version,
                running.arch,
                archs.join(", "),
                running.arch
            ),
            digest: None,
        };
    };
    let sha = binary.sha256_hex();
    if sha == running.sha256 {
        return Decision::Keep;
    }
    let digest = Some(sha.clone());
    if let Some(why) = failed(&sha) {
        return Decision::Refuse {
            code: "agent_update_failed",
            reason: format!(
                "agent {} (binary {}) failed before and is never tried again: {why}; the agent stays at {} (declare a fixed release in fleet.yaml `agent:`)",
                release.version,
                &sha[..12],
                running.version
            ),
            digest,
        };
    }
    let older = compare_versions(&release.version, running.version) == Some(std::cmp::Ordering::Less);
    if older && !release.allow_downgrade {
        return Decision::Refuse {
            code: "agent_downgrade_refused",
            reason: format!(
                "agent release {} is older than the running agent {}: a downgrade needs `allow_downgrade: true` beside the version in fleet.yaml `agent:`",
                release.version, running.version
            ),
            digest,
        };
    }
    if !running.launched {
        return Decision::Refuse {
            code: "agent_not_launched",
            reason: format!(
                "agent release {} is declared, but this agent was not started by `fleet-agent launch`, which tries a new binary and restores this one if it fails: run the service as `fleet-agent launch --config ...` (the packaged unit does)",
                release.version
            ),
            digest,
        };
    }
    Decision::Switch(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, allow_downgrade: bool) -> AgentRelease {
        AgentRelease {
            version: version.into(),
            allow_downgrade,
            binaries: vec![
                AgentBinary { arch: "aarch64".into(), sha256: [1; 32], size: 10 },
                AgentBinary { arch: "x86_64".into(), sha256: [2; 32], size: 10 },
            ],
        }
    }

    const RUNNING_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn running(arch: &str) -> Running<'_> {
        Running { version: "1.0.0", sha256: RUNNING_SHA, arch, launched: true }
    }

    fn code(d: &Decision<'_>) -> Option<&'static str> {
        match d {
            Decision::Refuse { code, .. } => Some(code),
            _ => None,
        }
    }

    #[test]
    fn the_binary_of_this_architecture_is_taken_unless_it_runs() {
        let r = release("1.1.0", false);
        assert_eq!(decide(Some(&r), &running("x86_64"), |_| None), Decision::Switch(&r.binaries[1]));
        assert_eq!(decide(Some(&r), &running("aarch64"), |_| None), Decision::Switch(&r.binaries[0]));
        assert_eq!(decide(None, &running("x86_64"), |_| None), Decision::Keep);
        let sha = r.binaries[1].sha256_hex();
        let same = Running { sha256: &sha, ..running("x86_64") };
        assert_eq!(decide(Some(&r), &same, |_| None), Decision::Keep, "already running it");
        assert_eq!(code(&decide(Some(&r), &running("arm"), |_| None)), Some("agent_no_binary"));
    }

    #[test]
    fn a_failed_binary_is_never_tried_again() {
        let r = release("1.1.0", false);
        let d = decide(Some(&r), &running("x86_64"), |_| Some("it crashed".into()));
        assert_eq!(code(&d), Some("agent_update_failed"));
        assert!(matches!(&d, Decision::Refuse { reason, .. } if reason.contains("it crashed")), "{d:?}");
    }

    #[test]
    fn downgrades_need_allow_downgrade() {
        let old = release("0.9.0", false);
        let d = decide(Some(&old), &running("x86_64"), |_| None);
        assert_eq!(code(&d), Some("agent_downgrade_refused"));
        let r = release("0.9.0", true);
        assert_eq!(decide(Some(&r), &running("x86_64"), |_| None), Decision::Switch(&r.binaries[1]));
        // The same version, another binary: not a downgrade.
        let r = release("1.0.0", false);
        assert_eq!(decide(Some(&r), &running("x86_64"), |_| None), Decision::Switch(&r.binaries[1]));
    }

    #[test]
    fn only_a_launched_agent_switches() {
        let r = release("1.1.0", false);
        let alone = Running { launched: false, ..running("x86_64") };
        assert_eq!(code(&decide(Some(&r), &alone, |_| None)), Some("agent_not_launched"));
    }
}
