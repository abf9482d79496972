//! Typed status conditions. `lastTransitionTime` moves only when a condition's status
//! flips, so "Ready since" stays meaningful across reconciles.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types a FalFunction carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// The function can serve: objects applied and a replica ready (or scaled to zero).
    Ready,
    /// `spec.machineType` resolved against the machine catalog.
    MachineTypeResolved,
    /// A served file's environment (`spec.source`) is built for its newest revision.
    EnvironmentReady,
}

impl ConditionType {
    /// The `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::MachineTypeResolved => "MachineTypeResolved",
            ConditionType::EnvironmentReady => "EnvironmentReady",
        }
    }
}

/// Machine-readable `reason`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Machine type found.
    Resolved,
    /// Machine type not in the catalog.
    UnknownMachineType,
    /// Some other field cannot be used.
    InvalidSpec,
    /// At least one replica is ready.
    Available,
    /// No replica wanted; the next request wakes the function.
    ScaledToZero,
    /// Replicas wanted, none ready yet.
    Starting,
    /// The Deployment gave up on its rollout.
    ProgressDeadlineExceeded,
    /// The environment of the newest revision is built.
    Built,
    /// Its build Job runs; the previous revision (if any) serves meanwhile.
    Building,
    /// Its build failed (pip's error in the message); the previous revision serves.
    EnvironmentFailed,
}

impl Reason {
    /// The `reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Resolved => "Resolved",
            Reason::UnknownMachineType => "UnknownMachineType",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::Available => "Available",
            Reason::ScaledToZero => "ScaledToZero",
            Reason::Starting => "Starting",
            Reason::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Reason::Built => "Built",
            Reason::Building => "Building",
            Reason::EnvironmentFailed => "EnvironmentFailed",
        }
    }
}

/// A condition's desired state, before timestamps.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionState {
    /// Which condition.
    pub type_: ConditionType,
    /// True or False.
    pub status: bool,
    /// Why, for machines.
    pub reason: Reason,
    /// Why, for people.
    pub message: String,
}

impl ConditionState {
    /// A condition that holds.
    pub fn ok(type_: ConditionType, reason: Reason, message: impl Into<String>) -> Self {
        ConditionState {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn failed(type_: ConditionType, reason: Reason, message: impl Into<String>) -> Self {
        ConditionState {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }
}

fn status_str(status: bool) -> &'static str {
    if status {
        "True"
    } else {
        "False"
    }
}

/// Sets `state` in `conditions`: keeps the old `lastTransitionTime` when the status did
/// not change, stamps `now` when it flipped or is new.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    state: ConditionState,
    observed_generation: Option<i64>,
    now: &Time,
) {
    let type_ = state.type_.as_str();
    let status = status_str(state.status);
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => now.clone(),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: state.reason.as_str().to_string(),
        message: state.message,
        observed_generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// The condition of `type_`, if present.
pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_changes_only_on_flip() {
        let mut conds = Vec::new();
        let ready = |status, msg: &str| ConditionState {
            type_: ConditionType::Ready,
            status,
            reason: if status {
                Reason::Available
            } else {
                Reason::Starting
            },
            message: msg.to_string(),
        };
        set_condition(&mut conds, ready(false, "0/1"), Some(1), &t(100));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, t(100));
        assert_eq!(conds[0].status, "False");

        // Same status, new message and generation: time kept, rest updated.
        set_condition(&mut conds, ready(false, "still 0/1"), Some(2), &t(200));
        assert_eq!(conds[0].last_transition_time, t(100));
        assert_eq!(conds[0].message, "still 0/1");
        assert_eq!(conds[0].observed_generation, Some(2));

        // Flip: time moves.
        set_condition(&mut conds, ready(true, "1/1"), Some(2), &t(300));
        assert_eq!(conds[0].last_transition_time, t(300));
        assert_eq!(conds[0].reason, "Available");
        assert!(is_true(&conds, ConditionType::Ready));

        // A second type is added, not replacing the first.
        set_condition(
            &mut conds,
            ConditionState::ok(ConditionType::MachineTypeResolved, Reason::Resolved, "XS"),
            Some(2),
            &t(400),
        );
        assert_eq!(conds.len(), 2);
        assert_eq!(
            find(&conds, ConditionType::MachineTypeResolved)
                .unwrap()
                .last_transition_time,
            t(400)
        );
        assert!(!is_true(&[], ConditionType::Ready));
    }
}
