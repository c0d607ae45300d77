//! Which finished NixBuilds to delete (the first enbi's to-do: "limit leftover NixBuilds").
//!
//! Per namespace, the newest `keep_succeeded` Succeeded and `keep_failed` Failed builds stay;
//! older ones go, as do any past `max_age`. A build a Pod is still waiting on never goes: deleting
//! it would only make the Pod watcher create it again. Nor does a Succeeded build whose image a
//! Pod uses, until `retain_after_last_use` after it was last seen in use: its NixBuild is what
//! tells enbi the image is on the nodes, and without it the next replica would be gated and
//! built again. Whether a Pod uses it is asked only of the builds the limits would delete
//! ([`to_delete`] first, then [`in_use_now`] for those a Pod runs).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::Phase;

/// A finished build, as GC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub namespace: String,
    pub name: String,
    pub phase: Phase,
    pub completed: Timestamp,
    /// A Pod is waiting for this build's image.
    pub waited_on: bool,
    /// When a Pod was last seen running the build's image (`None`: never seen).
    pub last_used: Option<Timestamp>,
}

/// How much history to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub keep_succeeded: usize,
    pub keep_failed: usize,
    pub max_age: Option<Duration>,
    /// How long a Succeeded build is kept after the last Pod using its image is gone.
    pub retain_after_last_use: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            keep_succeeded: 10,
            keep_failed: 5,
            max_age: None,
            retain_after_last_use: Duration::from_secs(24 * 3600),
        }
    }
}

/// `(namespace, name)` of every build to delete, in a stable order.
pub fn to_delete(builds: &[Finished], limits: &Limits, now: Timestamp) -> Vec<(String, String)> {
    let mut groups: BTreeMap<(&str, bool), Vec<&Finished>> = BTreeMap::new();
    for b in builds
        .iter()
        .filter(|b| matches!(b.phase, Phase::Succeeded | Phase::Failed))
    {
        groups
            .entry((&b.namespace, b.phase == Phase::Succeeded))
            .or_default()
            .push(b);
    }
    let too_old = |b: &Finished| {
        limits.max_age.is_some_and(|age| {
            Duration::try_from(now.duration_since(b.completed)).is_ok_and(|elapsed| elapsed > age)
        })
    };
    let retained = |b: &Finished| {
        b.last_used.is_some_and(|seen| {
            Duration::try_from(now.duration_since(seen))
                .map_or(true, |elapsed| elapsed < limits.retain_after_last_use)
        })
    };
    let mut out = vec![];
    for ((_, succeeded), mut group) in groups {
        // Newest first; names break ties so the choice is stable.
        group.sort_by(|a, b| {
            b.completed
                .cmp(&a.completed)
                .then_with(|| a.name.cmp(&b.name))
        });
        let keep = if succeeded {
            limits.keep_succeeded
        } else {
            limits.keep_failed
        };
        for (i, b) in group.into_iter().enumerate() {
            if (i >= keep || too_old(b)) && !b.waited_on && !(succeeded && retained(b)) {
                out.push((b.namespace.clone(), b.name.clone()));
            }
        }
    }
    out.sort();
    out
}

/// Which of `tags` (normalised) the containers of `pods` run, counting only Pods that have not
/// finished: their image must stay.
pub fn in_use_now<'a>(
    pods: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Pod>,
    tags: &[&str],
) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(spec) = pod.spec.as_ref() else {
            continue;
        };
        for tag in tags {
            if crate::pod::using_tag(spec, tag).next().is_some() {
                used.insert((*tag).to_owned());
            }
        }
    }
    used
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("in range")
    }

    fn b(ns: &str, name: &str, phase: Phase, t: i64) -> Finished {
        Finished {
            namespace: ns.into(),
            name: name.into(),
            phase,
            completed: at(t),
            waited_on: false,
            last_used: None,
        }
    }

    fn names(v: Vec<(String, String)>) -> Vec<String> {
        v.into_iter().map(|(ns, n)| format!("{ns}/{n}")).collect()
    }

    #[test]
    fn keeps_newest_per_namespace_and_phase() {
        let builds = vec![
            b("a", "s1", Phase::Succeeded, 1),
            b("a", "s2", Phase::Succeeded, 2),
            b("a", "s3", Phase::Succeeded, 3),
            b("a", "f1", Phase::Failed, 1),
            b("a", "f2", Phase::Failed, 2),
            b("b", "s1", Phase::Succeeded, 1),
            b("a", "running", Phase::Building, 0),
        ];
        let limits = Limits {
            keep_succeeded: 2,
            keep_failed: 1,
            max_age: None,
            ..Limits::default()
        };
        assert_eq!(names(to_delete(&builds, &limits, at(10))), ["a/f1", "a/s1"]);
    }

    #[test]
    fn age_limit_and_waited_on() {
        let mut builds = vec![
            b("a", "old", Phase::Succeeded, 0),
            b("a", "new", Phase::Succeeded, 100),
        ];
        let limits = Limits {
            keep_succeeded: 10,
            keep_failed: 10,
            max_age: Some(Duration::from_secs(50)),
            ..Limits::default()
        };
        assert_eq!(names(to_delete(&builds, &limits, at(120))), ["a/old"]);
        builds[0].waited_on = true;
        assert!(to_delete(&builds, &limits, at(120)).is_empty());
    }

    #[test]
    fn a_build_whose_image_pods_use_stays_until_the_retention_after_its_last_use() {
        let limits = Limits {
            keep_succeeded: 0,
            keep_failed: 0,
            max_age: Some(Duration::from_secs(1)),
            retain_after_last_use: Duration::from_secs(100),
        };
        let with = |last_used| Finished {
            last_used,
            ..b("a", "s", Phase::Succeeded, 0)
        };
        let gone = |last_used| !to_delete(&[with(last_used)], &limits, at(1000)).is_empty();
        assert!(gone(None), "never used: history limits apply");
        assert!(
            !gone(Some(at(1000))),
            "in use now: kept whatever the limits"
        );
        assert!(!gone(Some(at(950))), "within the retention");
        assert!(gone(Some(at(899))), "past the retention");
        let failed = Finished {
            last_used: Some(at(1000)),
            ..b("a", "f", Phase::Failed, 0)
        };
        assert_eq!(to_delete(&[failed], &limits, at(1000)).len(), 1);
    }

    #[test]
    fn only_pods_that_have_not_finished_use_an_image() {
        let pod = |image: &str, phase: &str| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": image}]},
                "status": {"phase": phase},
            }))
            .expect("pod")
        };
        let pods = [
            pod("nginx:1", "Running"),
            pod("example.test/done:1", "Succeeded"),
            pod("example.test/app:1", "Pending"),
        ];
        let tags = [
            "docker.io/library/nginx:1",
            "example.test/done:1",
            "example.test/app:1",
            "example.test/other:1",
        ];
        assert_eq!(
            in_use_now(&pods, &tags),
            BTreeSet::from([
                "docker.io/library/nginx:1".to_owned(),
                "example.test/app:1".to_owned()
            ])
        );
    }

    proptest! {
        #[test]
        fn limits_hold_and_waited_on_survive(
            items in prop::collection::vec((0u8..3, any::<bool>(), 0i64..1000, any::<bool>()), 0..60),
            keep_s in 0usize..5, keep_f in 0usize..5,
        ) {
            let builds: Vec<Finished> = items.iter().enumerate().map(|(i, (ns, ok, t, waited))| Finished {
                namespace: format!("ns{ns}"),
                name: format!("b{i}"),
                phase: if *ok { Phase::Succeeded } else { Phase::Failed },
                completed: at(*t),
                waited_on: *waited,
                last_used: None,
            }).collect();
            let limits = Limits { keep_succeeded: keep_s, keep_failed: keep_f, max_age: None, ..Limits::default() };
            let gone = to_delete(&builds, &limits, at(2000));
            for ns in 0..3 {
                for ok in [true, false] {
                    let kept = builds.iter().filter(|b| b.namespace == format!("ns{ns}") && (b.phase == Phase::Succeeded) == ok)
                        .filter(|b| !gone.contains(&(b.namespace.clone(), b.name.clone())))
                        .filter(|b| !b.waited_on).count();
                    let limit = if ok { keep_s } else { keep_f };
                    prop_assert!(kept <= limit);
                }
            }
            for b in builds.iter().filter(|b| b.waited_on) {
                prop_assert!(!gone.contains(&(b.namespace.clone(), b.name.clone())));
            }
        }
    }
}
