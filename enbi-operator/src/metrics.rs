//! Prometheus metrics (`enbi_*`). Labels are bounded: results, reasons and error categories,
//! never names or tags.

use std::collections::HashSet;
use std::sync::Mutex;

use enbi_core::crd::NixBuild;
use kube::runtime::reflector::ObjectRef;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Build durations in seconds: from a few seconds (cached) to the default one-hour deadline.
const DURATION_BUCKETS: [f64; 11] = [
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Admission durations in seconds, from 1 ms: the webhook answers from caches, so most
/// answers take well under 5 ms, and the goal (p99 < 50 ms) must fall between two buckets.
const ADMISSION_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    /// `gated`, `allowed` (left as it is) or `invalid` (an unreadable review).
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finished {
    pub result: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Category {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Write {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListMode {
    /// The resource's plural (`pods`, `jobs`, ...): bounded by the types the operator watches.
    pub resource: String,
    /// `streaming` (a watch that sends the initial objects) or `paginated` (list pages first).
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub api_requests: Family<Request, Counter>,
    pub api_writes: Family<Write, Counter>,
    pub reconciliations: Counter,
    pub reconcile_errors: Family<Category, Counter>,
    pub builds_started: Counter,
    pub builds_finished: Family<Finished, Counter>,
    pub pod_triggered_builds: Counter,
    pub build_duration: Family<Outcome, Histogram>,
    /// Time the webhook takes from a request's body to its answer (TLS and HTTP not included).
    pub webhook_admission: Family<Decision, Histogram>,
    /// Watches by resource and how they list (`crate::watch::watch`).
    pub watch_list_mode: Family<ListMode, Gauge>,
    builds_queued: Gauge,
    /// Builds counted in `builds_queued`.
    queued: Mutex<HashSet<ObjectRef<NixBuild>>>,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            api_requests: Family::default(),
            api_writes: Family::default(),
            reconciliations: Counter::default(),
            reconcile_errors: Family::default(),
            builds_started: Counter::default(),
            builds_finished: Family::default(),
            pod_triggered_builds: Counter::default(),
            build_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            webhook_admission: Family::new_with_constructor(|| Histogram::new(ADMISSION_BUCKETS)),
            watch_list_mode: Family::default(),
            builds_queued: Gauge::default(),
            queued: Mutex::default(),
            registry: Registry::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics::default();
        let mut registry = Registry::with_prefix("enbi");
        registry.register(
            "api_requests",
            "Requests to the Kubernetes API, by verb (list: also a watch that starts with every object)",
            m.api_requests.clone(),
        );
        registry.register(
            "api_writes",
            "Write requests to the Kubernetes API, by resource",
            m.api_writes.clone(),
        );
        registry.register(
            "reconciliations",
            "NixBuild reconciliations",
            m.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by category",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "builds_started",
            "Builder Jobs created",
            m.builds_started.clone(),
        );
        registry.register(
            "builds_finished",
            "Builds finished, by result and reason",
            m.builds_finished.clone(),
        );
        registry.register(
            "pod_triggered_builds",
            "NixBuilds created for Pods",
            m.pod_triggered_builds.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Time from a build's first builder Job to its result, by result",
            m.build_duration.clone(),
        );
        registry.register(
            "webhook_admission_duration_seconds",
            "Time the admission webhook takes to decide on a Pod, from the request body to the answer, by decision",
            m.webhook_admission.clone(),
        );
        registry.register(
            "watch_list_mode",
            "Watches by resource and how they list: streaming (WatchList) or paginated (where the apiserver refuses streaming lists)",
            m.watch_list_mode.clone(),
        );
        registry.register(
            "builds_queued",
            "NixBuilds waiting for a free build slot",
            m.builds_queued.clone(),
        );
        m.registry = registry;
        m
    }

    /// Counts `build` as queued or not; the gauge is the set's size, so a repeated reconcile
    /// never counts a build twice.
    pub fn set_queued(&self, build: ObjectRef<NixBuild>, queued: bool) {
        if let Ok(mut set) = self.queued.lock() {
            let changed = if queued {
                set.insert(build)
            } else {
                set.remove(&build)
            };
            if changed {
                self.builds_queued
                    .set(i64::try_from(set.len()).unwrap_or(i64::MAX));
            }
        }
    }

    /// The sample of one watch of `resource` in `enbi_watch_list_mode`, none until it is set.
    pub fn watch_mode(&self, resource: String) -> WatchMode {
        WatchMode {
            family: self.watch_list_mode.clone(),
            resource,
            mode: None,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One watch in `enbi_watch_list_mode`: it counts 1 in its current mode, and 0 once dropped,
/// so each sample is the number of watches of a resource that list that way.
#[derive(Debug)]
pub struct WatchMode {
    family: Family<ListMode, Gauge>,
    resource: String,
    mode: Option<&'static str>,
}

impl WatchMode {
    /// The watch lists as `mode` (`streaming` or `paginated`) from now on.
    pub fn set(&mut self, mode: &'static str) {
        if self.mode != Some(mode) {
            self.release();
            self.sample(mode).inc();
            self.mode = Some(mode);
        }
    }

    fn release(&mut self) {
        if let Some(mode) = self.mode.take() {
            self.sample(mode).dec();
        }
    }

    fn sample(&self, mode: &'static str) -> Gauge {
        let labels = ListMode {
            resource: self.resource.clone(),
            mode,
        };
        self.family.get_or_create(&labels).clone()
    }
}

impl Drop for WatchMode {
    fn drop(&mut self) {
        self.release();
    }
}

/// The resource a request path names, with its subresource: `/apis/g/v/namespaces/ns/jobs/x`
/// is `jobs`, `/apis/g/v/namespaces/ns/nixbuilds/x/status` is `nixbuilds/status`. Bounded: the
/// operator only calls a handful of resources.
pub fn resource_of(path: &str) -> String {
    match resource_segments(path).as_deref() {
        Some([resource, _, sub, ..]) => format!("{resource}/{sub}"),
        Some([resource, ..]) => (*resource).to_owned(),
        _ => "other".to_owned(),
    }
}

/// The path's segments from the resource on: `[resource, name?, subresource?]`.
fn resource_segments(path: &str) -> Option<Vec<&str>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = match segments.iter().position(|s| *s == "namespaces") {
        Some(i) if segments.len() > i + 2 => i + 2,
        _ => usize::from(segments.first() == Some(&"apis")) + 2,
    };
    segments.get(start..).map(<[&str]>::to_vec)
}

/// The verb of a request, as RBAC names it; `list` also for a watch that starts by sending
/// every object (a streaming list), so that relists show.
pub fn verb_of(method: &::http::Method, path: &str, query: Option<&str>) -> &'static str {
    let has = |param: &str| query.is_some_and(|q| q.split('&').any(|p| p == param));
    match method.as_str() {
        "GET" if has("watch=true") || has("watch=1") => {
            if has("sendInitialEvents=true") {
                "list"
            } else {
                "watch"
            }
        }
        "GET" if resource_segments(path).is_some_and(|s| s.len() > 1) => "get",
        "GET" => "list",
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::{Metrics, resource_of, verb_of};

    #[test]
    fn watch_modes_count_each_watch_once_in_its_current_mode() {
        let metrics = Metrics::new();
        let line =
            |mode: &str| format!("enbi_watch_list_mode{{resource=\"pods\",mode=\"{mode}\"}}");
        let value = |mode: &str| {
            let text = metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix(&line(mode))?.trim().parse::<i64>().ok())
        };
        let mut a = metrics.watch_mode("pods".into());
        let mut b = metrics.watch_mode("pods".into());
        a.set("streaming");
        b.set("streaming");
        b.set("streaming");
        assert_eq!(value("streaming"), Some(2));
        b.set("paginated");
        assert_eq!((value("streaming"), value("paginated")), (Some(1), Some(1)));
        drop(b);
        assert_eq!((value("streaming"), value("paginated")), (Some(1), Some(0)));
        drop(a);
        assert_eq!(value("streaming"), Some(0));
    }

    #[test]
    fn resources_from_paths() {
        assert_eq!(resource_of("/apis/batch/v1/namespaces/b/jobs/j"), "jobs");
        assert_eq!(
            resource_of("/apis/enbi.hrzn.ee/v1alpha1/namespaces/a/nixbuilds/x/status"),
            "nixbuilds/status"
        );
        assert_eq!(
            resource_of("/apis/enbi.hrzn.ee/v1alpha1/namespaces/a/nixbuilds"),
            "nixbuilds"
        );
        assert_eq!(
            resource_of("/apis/events.k8s.io/v1/namespaces/a/events"),
            "events"
        );
        assert_eq!(resource_of("/api/v1/namespaces/a/pods/p"), "pods");
        assert_eq!(
            resource_of("/apis/coordination.k8s.io/v1/namespaces/a/leases/l"),
            "leases"
        );
        assert_eq!(resource_of("/api/v1/nodes"), "nodes");
    }

    #[test]
    fn verbs_from_requests() {
        use ::http::Method;
        let pods = "/api/v1/namespaces/a/pods";
        assert_eq!(verb_of(&Method::GET, pods, Some("limit=500")), "list");
        assert_eq!(
            verb_of(
                &Method::GET,
                "/api/v1/pods",
                Some("watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan")
            ),
            "list",
            "a streaming list"
        );
        assert_eq!(
            verb_of(&Method::GET, pods, Some("watch=true&resourceVersion=7")),
            "watch"
        );
        assert_eq!(
            verb_of(&Method::GET, "/api/v1/namespaces/a/pods/p", None),
            "get"
        );
        assert_eq!(verb_of(&Method::GET, "/api/v1/nodes/n", None), "get");
        assert_eq!(verb_of(&Method::GET, "/api/v1/nodes", None), "list");
        assert_eq!(verb_of(&Method::PATCH, pods, None), "patch");
        assert_eq!(verb_of(&Method::POST, pods, None), "create");
    }
}
