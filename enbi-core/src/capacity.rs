//! Concurrency limits: whether another build may start now.
//!
//! Builds are heavy, so the operator caps how many run in the cluster and on one node. A build
//! that would exceed a cap waits (`Pending`, reason `Queued`) and starts when one finishes.
//!
//! **Fair turns.** When the cluster-wide cap is reached, the slots that free up are shared
//! across namespaces ([`turn`]): each goes to the namespace with the fewest running builds,
//! to its oldest waiting build. A namespace that queues many builds therefore delays another
//! namespace's single build by at most one slot. The turn is only about the cluster-wide cap: a
//! build whose turn it is may still wait for a node under the per-node cap.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;

/// Caps on running builds; 0 means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub global: usize,
    pub per_node: usize,
}

/// Which cap keeps a build from starting now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("{running} builds are running, the cluster-wide limit")]
    Cluster { running: usize },
    #[error("every eligible node ({}) runs {per_node} build(s), the per-node limit", nodes.join(", "))]
    Nodes { nodes: Vec<String>, per_node: usize },
    #[error(
        "the next free build slot goes to namespace {namespace} (fewest running builds, then oldest waiting build first)"
    )]
    Turn { namespace: String },
}

/// A build waiting for a slot (`Pending`, new or `Queued`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub namespace: String,
    pub name: String,
    pub created: Option<Timestamp>,
}

/// Whether `candidate` (one of `waiting`) is among the builds the `free` cluster-wide slots go
/// to, given the builds running per namespace; `Err` names the namespace whose turn comes
/// first. Each slot in turn goes to the namespace with the fewest running builds (those given a
/// slot before it counted), to its oldest waiting build; ties go to the namespace first by name.
pub fn turn(
    candidate: &Waiting,
    waiting: &[Waiting],
    running: &BTreeMap<String, usize>,
    free: usize,
) -> Result<(), Full> {
    let mut queues: BTreeMap<&str, Vec<&Waiting>> = BTreeMap::new();
    for w in waiting {
        queues.entry(&w.namespace).or_default().push(w);
    }
    for queue in queues.values_mut() {
        queue.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        queue.reverse();
    }
    let mut running = running.clone();
    let mut first = None;
    for _ in 0..free {
        let Some(namespace) = queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .min_by_key(|(ns, _)| running.get(**ns).copied().unwrap_or(0))
            .map(|(ns, _)| *ns)
        else {
            break;
        };
        let next = queues.get_mut(namespace).and_then(Vec::pop);
        if next == Some(candidate) {
            return Ok(());
        }
        first.get_or_insert(namespace);
        *running.entry(namespace.to_owned()).or_default() += 1;
    }
    Err(Full::Turn {
        namespace: first.unwrap_or(&candidate.namespace).to_owned(),
    })
}

/// Checks whether a build may start, given the nodes of the builds running now (`None`: not
/// scheduled yet) and the nodes eligible for the new one. `Err` says which cap is reached.
pub fn check(running: &[Option<String>], eligible: &[String], limits: Limits) -> Result<(), Full> {
    if limits.global > 0 && running.len() >= limits.global {
        return Err(Full::Cluster {
            running: running.len(),
        });
    }
    if limits.per_node > 0 && !eligible.is_empty() {
        let busy = |node: &String| {
            running.iter().filter(|n| n.as_ref() == Some(node)).count() >= limits.per_node
        };
        if eligible.iter().all(busy) {
            return Err(Full::Nodes {
                nodes: eligible.to_vec(),
                per_node: limits.per_node,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Option<String> {
        Some(s.into())
    }

    #[test]
    fn global_and_per_node_caps() {
        let eligible = vec!["a".to_owned(), "b".to_owned()];
        let limits = Limits {
            global: 3,
            per_node: 1,
        };
        assert_eq!(check(&[], &eligible, limits), Ok(()));
        assert_eq!(check(&[n("a")], &eligible, limits), Ok(()));
        let err = check(&[n("a"), n("b")], &eligible, limits).unwrap_err();
        assert_eq!(
            err,
            Full::Nodes {
                nodes: eligible.clone(),
                per_node: 1
            }
        );
        assert!(
            err.to_string().contains("every eligible node (a, b)"),
            "{err}"
        );
        let err = check(&[n("x"), None, n("y")], &eligible, limits).unwrap_err();
        assert_eq!(err, Full::Cluster { running: 3 });
        assert!(err.to_string().contains("3 builds are running"), "{err}");
    }

    fn waiting(namespace: &str, name: &str, second: i64) -> Waiting {
        Waiting {
            namespace: namespace.into(),
            name: name.into(),
            created: Timestamp::from_second(second).ok(),
        }
    }

    #[test]
    fn a_free_slot_goes_to_the_namespace_with_fewest_running_then_its_oldest_build() {
        let mut queue: Vec<Waiting> = (0..20)
            .map(|i| waiting("flood", &format!("f{i}"), i))
            .collect();
        let single = waiting("quiet", "q", 100);
        queue.push(single.clone());
        let running = BTreeMap::from([("flood".to_owned(), 2)]);
        assert_eq!(turn(&single, &queue, &running, 1), Ok(()));
        assert_eq!(
            turn(&queue[0], &queue, &running, 1),
            Err(Full::Turn {
                namespace: "quiet".into()
            })
        );
        assert_eq!(
            turn(&queue[0], &queue, &running, 2),
            Ok(()),
            "the second slot"
        );
        assert!(
            turn(&queue[1], &queue, &running, 2).is_err(),
            "oldest first"
        );
        let even = BTreeMap::from([("flood".to_owned(), 1), ("quiet".to_owned(), 1)]);
        assert_eq!(turn(&queue[0], &queue, &even, 1), Ok(()), "a tie: by name");
        assert!(turn(&single, &queue, &running, 0).is_err(), "no slot");
    }

    #[test]
    fn zero_means_no_cap() {
        let running = vec![n("a"); 100];
        assert_eq!(
            check(&running, &["a".to_owned()], Limits::default()),
            Ok(())
        );
    }
}
