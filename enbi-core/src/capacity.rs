//! Concurrency limits: whether another build may start now.
//!
//! Builds are heavy, so the operator caps how many run in the cluster and on one node. A build
//! that would exceed a cap waits (`Pending`, reason `Queued`) and starts when one finishes.

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

    #[test]
    fn zero_means_no_cap() {
        let running = vec![n("a"); 100];
        assert_eq!(
            check(&running, &["a".to_owned()], Limits::default()),
            Ok(())
        );
    }
}
