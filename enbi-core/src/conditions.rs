//! Condition algebra for `status.conditions` (Kubernetes API conventions).
//!
//! Setting a condition replaces the one of the same type; `lastTransitionTime` moves only when
//! the status flips, so a reason or message update never rewrites history.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// kstatus-compatible summary: True once the image is loaded.
pub const READY: &str = "Ready";
/// Whether the build produced an image (the first enbi's `Success`/`ResultSuccess`).
pub const SUCCESS: &str = "Success";
/// Whether the build has ended either way (the first enbi's `Complete`/`BuildFinished`).
pub const COMPLETE: &str = "Complete";

/// A condition's status, as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// A condition to set, before time and generation are stamped on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

/// Sets `update` in `conditions` at `now` for `generation`, keeping the transition time unless
/// the status flips.
pub fn set(conditions: &mut Vec<Condition>, update: Update, generation: Option<i64>, now: &Time) {
    let status = update.status.as_str();
    let existing = conditions.iter_mut().find(|c| c.type_ == update.type_);
    let last_transition_time = match &existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    let next = Condition {
        type_: update.type_.to_owned(),
        status: status.to_owned(),
        reason: update.reason,
        message: update.message,
        observed_generation: generation,
        last_transition_time,
    };
    match existing {
        Some(c) => *c = next,
        None => conditions.push(next),
    }
}

/// The condition of `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether two condition lists say the same, ignoring transition times: used to skip writes
/// that would change nothing.
pub fn same_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    a.len() == b.len() && a.iter().all(|x| b.iter().any(|y| key(x) == key(y)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use proptest::prelude::*;

    use super::*;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("in range"))
    }

    fn update(status: Status, reason: &str) -> Update {
        Update {
            type_: READY,
            status,
            reason: reason.into(),
            message: format!("{reason}."),
        }
    }

    #[test]
    fn adds_then_replaces_in_place() {
        let mut c = vec![];
        set(&mut c, update(Status::False, "Pending"), Some(1), &at(10));
        set(
            &mut c,
            Update {
                type_: SUCCESS,
                ..update(Status::Unknown, "Building")
            },
            Some(1),
            &at(11),
        );
        assert_eq!(c.len(), 2);
        set(
            &mut c,
            update(Status::True, "ResultSuccess"),
            Some(2),
            &at(20),
        );
        assert_eq!(c.len(), 2);
        let ready = get(&c, READY).expect("set");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "ResultSuccess")
        );
        assert_eq!(ready.observed_generation, Some(2));
        assert_eq!(ready.last_transition_time, at(20));
    }

    #[test]
    fn same_status_keeps_transition_time_but_updates_reason() {
        let mut c = vec![];
        set(&mut c, update(Status::False, "Pending"), Some(1), &at(10));
        set(&mut c, update(Status::False, "Building"), Some(1), &at(30));
        let ready = get(&c, READY).expect("set");
        assert_eq!(ready.reason, "Building");
        assert_eq!(ready.last_transition_time, at(10));
    }

    #[test]
    fn comparison_ignores_time_only() {
        let (mut a, mut b) = (vec![], vec![]);
        set(&mut a, update(Status::False, "Pending"), Some(1), &at(10));
        set(&mut b, update(Status::False, "Pending"), Some(1), &at(99));
        assert!(same_ignoring_time(&a, &b));
        set(&mut b, update(Status::False, "Building"), Some(1), &at(99));
        assert!(!same_ignoring_time(&a, &b));
    }

    proptest! {
        /// Over any sequence of updates in time order, a transition time never moves backwards
        /// and always equals the time of the latest flip.
        #[test]
        fn transition_times_track_flips(steps in prop::collection::vec((0u8..3, 0i64..100), 1..40)) {
            let mut c = vec![];
            let (mut now, mut last_flip, mut last_status) = (0i64, 0i64, None);
            for (s, dt) in steps {
                now += dt;
                let status = [Status::True, Status::False, Status::Unknown][s as usize];
                let before = get(&c, READY).map(|x| x.last_transition_time.clone());
                set(&mut c, update(status, "R"), None, &at(now));
                if last_status != Some(status) {
                    last_flip = now;
                    last_status = Some(status);
                }
                let after = get(&c, READY).expect("set").last_transition_time.clone();
                prop_assert_eq!(&after, &at(last_flip));
                if let Some(before) = before {
                    prop_assert!(before.0 <= after.0);
                }
            }
        }
    }
}
