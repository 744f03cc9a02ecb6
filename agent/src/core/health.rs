//! Deciding whether an applied state is healthy: every desired container runs (or, as
//! a one-shot, completed), and is healthy where it has a healthcheck.
//!
//! Pure: the driver observes the engine and the clock, and passes both in.

use std::collections::BTreeMap;

use fleet_spec::model::{DesiredState, RestartPolicy};

use crate::engine::{Health, ObservedContainer};

/// Restarts during the health wait from which a container counts as crash-looping.
pub const CRASH_LOOP_RESTARTS: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Not yet: keep waiting (until the timeout).
    Waiting {
        reason: String,
    },
    /// Will not become healthy: roll back now.
    Failed {
        code: &'static str,
        reason: String,
    },
}

/// Judges the observed containers against the desired ones. `baseline` holds each
/// container's restart count when the wait began.
pub fn judge(
    desired: &DesiredState,
    observed: &[ObservedContainer],
    baseline: &BTreeMap<String, u64>,
) -> Verdict {
    let mut waiting = Vec::new();
    for spec in &desired.containers {
        let Some(c) = observed.iter().find(|c| c.name == spec.name) else {
            return Verdict::Failed {
                code: "container_missing",
                reason: format!("container {} disappeared", spec.name),
            };
        };
        let restarts =
            c.restart_count.saturating_sub(baseline.get(&c.name).copied().unwrap_or(c.restart_count));
        if restarts >= CRASH_LOOP_RESTARTS {
            return Verdict::Failed {
                code: "crash_loop",
                reason: format!("container {} restarted {restarts} times", c.name),
            };
        }
        if !c.running {
            match (spec.restart, c.exit_code) {
                (RestartPolicy::No, Some(0)) => continue,
                (RestartPolicy::No, code) => {
                    return Verdict::Failed {
                        code: "container_exited",
                        reason: format!("container {} exited with code {}", c.name, code.unwrap_or(-1)),
                    }
                }
                _ => {
                    waiting.push(format!("{} is not running", c.name));
                    continue;
                }
            }
        }
        match c.health {
            Health::Unhealthy => {
                return Verdict::Failed {
                    code: "unhealthy",
                    reason: format!("container {} is unhealthy", c.name),
                }
            }
            Health::Starting => waiting.push(format!("{} is starting", c.name)),
            Health::Healthy | Health::None => {}
        }
    }
    if waiting.is_empty() {
        Verdict::Healthy
    } else {
        Verdict::Waiting { reason: waiting.join(", ") }
    }
}

/// The verdict once the health timeout has passed: still waiting means failed.
pub fn at_timeout(verdict: Verdict, timeout_secs: u64) -> Verdict {
    match verdict {
        Verdict::Waiting { reason } if reason.contains("not running") => {
            Verdict::Failed { code: "container_exited", reason: format!("after {timeout_secs} s: {reason}") }
        }
        Verdict::Waiting { reason } => Verdict::Failed {
            code: "health_timeout",
            reason: format!("not healthy after {timeout_secs} s: {reason}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_spec::model::ContainerSpec;

    fn obs(name: &str, running: bool, health: Health, exit: Option<i64>, restarts: u64) -> ObservedContainer {
        ObservedContainer {
            id: name.into(),
            name: name.into(),
            image: "i".into(),
            labels: Default::default(),
            running,
            health,
            restart_count: restarts,
            exit_code: exit,
        }
    }

    fn state(restart: RestartPolicy) -> DesiredState {
        DesiredState {
            containers: vec![ContainerSpec { name: "a".into(), restart, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn verdicts() {
        let none = BTreeMap::new();
        let s = state(RestartPolicy::Always);
        assert_eq!(judge(&s, &[obs("a", true, Health::None, None, 0)], &none), Verdict::Healthy);
        assert_eq!(judge(&s, &[obs("a", true, Health::Healthy, None, 0)], &none), Verdict::Healthy);
        assert!(matches!(
            judge(&s, &[obs("a", true, Health::Starting, None, 0)], &none),
            Verdict::Waiting { .. }
        ));
        assert!(matches!(
            judge(&s, &[obs("a", true, Health::Unhealthy, None, 0)], &none),
            Verdict::Failed { code: "unhealthy", .. }
        ));
        assert!(matches!(judge(&s, &[], &none), Verdict::Failed { code: "container_missing", .. }));
        let baseline = BTreeMap::from([("a".to_string(), 1)]);
        assert!(matches!(
            judge(&s, &[obs("a", true, Health::None, None, 3)], &baseline),
            Verdict::Failed { code: "crash_loop", .. }
        ));
        let one_shot = state(RestartPolicy::No);
        assert_eq!(judge(&one_shot, &[obs("a", false, Health::None, Some(0), 0)], &none), Verdict::Healthy);
        assert!(matches!(
            judge(&one_shot, &[obs("a", false, Health::None, Some(1), 0)], &none),
            Verdict::Failed { code: "container_exited", .. }
        ));
        let waiting = judge(&s, &[obs("a", true, Health::Starting, None, 0)], &none);
        assert!(matches!(at_timeout(waiting, 60), Verdict::Failed { code: "health_timeout", .. }));
        let stopped = judge(&s, &[obs("a", false, Health::None, Some(1), 0)], &none);
        assert!(matches!(at_timeout(stopped, 60), Verdict::Failed { code: "container_exited", .. }));
    }
}
