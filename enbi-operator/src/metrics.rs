//! Prometheus metrics (`enbi_*`). Labels are bounded: results, reasons, purposes, states and
//! error categories, never names, tags, namespaces or nodes.
//!
//! Most metrics are counted where things happen. The gauges of what waits and what is where
//! (`enbi_gated_pods`, `enbi_waiting_pods`, `enbi_gated_pod_oldest_seconds`,
//! `enbi_image_node_pairs`) are computed at scrape time from the leader's caches
//! (`enbi_core::census`), so they can never drift from what the operator sees; a replica that
//! does not lead has no such caches and leaves them out, so that `max()` over replicas is the
//! leader's figure. `enbi_webhook_certificate_expiry_timestamp_seconds` is left out until the
//! webhook has loaded a certificate (and without the webhook), so that an alert on it never
//! fires on a value that means "unknown".

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use enbi_core::census;
use enbi_core::crd::NixBuild;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobFinished {
    /// `build`, `load` or `release` (`enbi_core::census::Purpose`).
    pub purpose: &'static str,
    /// `succeeded` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Waiting {
    /// One of `enbi_core::census::WAITING_REASONS`.
    reason: &'static str,
}

/// The label of `enbi_image_node_pairs`. Where images are is counted as (NixBuild, node) pairs
/// by state, with no node or build label: node names are unbounded (nodes come and go with
/// autoscaling), and one series per node and image would grow with both. The sum is what a disk
/// alert needs ("how many images does enbi keep on nodes"); which node holds what is in each
/// NixBuild's `status.imageNodes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairState {
    /// `loaded`, `loading` or `failed`.
    state: &'static str,
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
    /// Jobs finished, by purpose and result: count one with [`Metrics::job_finished`].
    jobs_finished: Family<JobFinished, Counter>,
    /// Deleted NixBuilds whose image is being released on their nodes now (each for at most
    /// the release timeout); a release that ends incomplete counts as a failed release Job.
    releases_pending: Gauge,
    /// Builds counted in `releases_pending`.
    releasing: Mutex<HashSet<ObjectRef<NixBuild>>>,
    /// What the scrape-time gauges read.
    scraped: Arc<Scraped>,
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
            jobs_finished: Family::default(),
            releases_pending: Gauge::default(),
            releasing: Mutex::default(),
            scraped: Arc::default(),
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
        registry.register(
            "jobs_finished",
            "Jobs finished, by purpose (build, load, release) and result (succeeded, failed)",
            m.jobs_finished.clone(),
        );
        for purpose in [
            census::Purpose::Build,
            census::Purpose::Load,
            census::Purpose::Release,
        ] {
            for result in ["succeeded", "failed"] {
                // Every series from the start, so that rate() and increase() see the first one.
                let _ = m.jobs_finished.get_or_create(&JobFinished {
                    purpose: purpose.as_str(),
                    result,
                });
            }
        }
        registry.register(
            "releases_pending",
            "Images waiting to be released from nodes whose release has not succeeded yet",
            m.releases_pending.clone(),
        );
        registry.register_collector(Box::new(m.scraped.clone()));
        m.registry = registry;
        m
    }

    /// Counts a Job that finished: `purpose` is `build`, `load` or `release`
    /// (`enbi_core::census::Purpose::as_str`).
    pub fn job_finished(&self, purpose: &'static str, succeeded: bool) {
        let result = if succeeded { "succeeded" } else { "failed" };
        self.jobs_finished
            .get_or_create(&JobFinished { purpose, result })
            .inc();
    }

    /// Counts the build and load Jobs whose end the status change from `before` to `after`
    /// records (`enbi_core::census::jobs_finished`).
    pub fn status_written(
        &self,
        before: Option<&enbi_core::crd::NixBuildStatus>,
        after: &enbi_core::crd::NixBuildStatus,
    ) {
        for job in census::jobs_finished(before, after) {
            self.job_finished(job.purpose.as_str(), job.succeeded);
        }
    }

    /// From now on, the scrape-time gauges count the Pods in `pods` and the NixBuilds in
    /// `builds` (the leader's caches). Only the first call counts.
    pub fn count_caches(&self, builds: Store<NixBuild>, pods: Vec<Store<Pod>>) {
        let _ = self.scraped.caches.set(Caches { builds, pods });
    }

    /// `enbi_ready` asks `ready` at each scrape. Only the first call counts.
    pub fn report_readiness(&self, ready: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.scraped.readiness.set(Box::new(ready));
    }

    /// The webhook now serves a certificate that expires at `not_after` (Unix seconds).
    pub fn webhook_certificate_expires(&self, not_after: i64) {
        if let Ok(mut expiry) = self.scraped.certificate_expiry.lock() {
            *expiry = Some(not_after);
        }
    }

    /// Counts `build` as queued or not; the gauge is the set's size, so a repeated reconcile
    /// never counts a build twice.
    pub fn set_queued(&self, build: ObjectRef<NixBuild>, queued: bool) {
        count_in(&self.queued, &self.builds_queued, build, queued);
    }

    /// Counts `build` as releasing its image or not, as [`Self::set_queued`].
    pub fn set_releasing(&self, build: ObjectRef<NixBuild>, releasing: bool) {
        count_in(&self.releasing, &self.releases_pending, build, releasing);
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

/// The leader's caches, which the scrape-time gauges count.
struct Caches {
    builds: Store<NixBuild>,
    pods: Vec<Store<Pod>>,
}

/// Whether the operator is ready, as `/readyz` says.
type Readiness = Box<dyn Fn() -> bool + Send + Sync>;

/// The metrics computed at each scrape (see the module's documentation).
#[derive(Default)]
struct Scraped {
    readiness: OnceLock<Readiness>,
    caches: OnceLock<Caches>,
    /// When the webhook's serving certificate expires (Unix seconds), once one is loaded.
    certificate_expiry: Mutex<Option<i64>>,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped").finish_non_exhaustive()
    }
}

/// Writes one gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let sample = ConstGauge::new(value);
    sample.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if let Some(ready) = self.readiness.get() {
            gauge(
                &mut encoder,
                "ready",
                "1 when the operator is ready (/readyz answers 200), else 0: starting, or an installation fault holds builds up",
                i64::from(ready()),
            )?;
        }
        if let Some(not_after) = self.certificate_expiry.lock().ok().and_then(|e| *e) {
            gauge(
                &mut encoder,
                "webhook_certificate_expiry_timestamp_seconds",
                "When the admission webhook's serving certificate expires (Unix seconds); enbi renews it 120 days before",
                not_after,
            )?;
        }
        let Some(caches) = self.caches.get() else {
            return Ok(());
        };
        let pods: Vec<Arc<Pod>> = caches.pods.iter().flat_map(Store::state).collect();
        let now = k8s_openapi::jiff::Timestamp::now();
        let pods = census::pods(pods.iter().map(Arc::as_ref), now);
        gauge(
            &mut encoder,
            "gated_pods",
            "Pods held by enbi's scheduling gate",
            count(pods.gated()),
        )?;
        gauge(
            &mut encoder,
            "gated_pod_oldest_seconds",
            "Seconds since the oldest Pod held by enbi's scheduling gate was created (0: none is)",
            count(pods.oldest_gated_seconds),
        )?;
        let mut family = encoder.encode_descriptor(
            "waiting_pods",
            "Pods waiting for an enbi image, by reason: SchedulingGated (enbi's gate) or the kubelet's ErrImagePull, ImagePullBackOff, ErrImageNeverPull",
            None,
            MetricType::Gauge,
        )?;
        for reason in census::WAITING_REASONS {
            let n = pods.waiting.get(reason).copied().unwrap_or(0);
            ConstGauge::new(count(n)).encode(family.encode_family(&Waiting { reason })?)?;
        }
        let builds: Vec<Arc<NixBuild>> = caches.builds.state();
        let pairs = census::image_nodes(builds.iter().map(Arc::as_ref));
        let mut family = encoder.encode_descriptor(
            "image_node_pairs",
            "(NixBuild, node) pairs of Succeeded builds, by state: loaded (the node holds the image), loading, failed",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("loaded", pairs.loaded),
            ("loading", pairs.loading),
            ("failed", pairs.failed),
        ] {
            ConstGauge::new(count(n)).encode(family.encode_family(&PairState { state })?)?;
        }
        Ok(())
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

/// Puts `build` in `set` or takes it out; `gauge` is the set's size, so a repeated reconcile
/// counts once.
fn count_in(
    set: &Mutex<HashSet<ObjectRef<NixBuild>>>,
    gauge: &Gauge,
    build: ObjectRef<NixBuild>,
    member: bool,
) {
    if let Ok(mut set) = set.lock() {
        let changed = if member {
            set.insert(build)
        } else {
            set.remove(&build)
        };
        if changed {
            gauge.set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Metrics, resource_of, verb_of};

    /// The value of the sample that `line` starts (metric name and labels) in the scrape.
    fn sample(metrics: &Metrics, line: &str) -> Option<f64> {
        metrics.encode().lines().find_map(|l| {
            let rest = l.strip_prefix(line)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    fn store<K>(objects: Vec<K>) -> kube::runtime::reflector::Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = kube::runtime::reflector::store();
        for object in objects {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(object));
        }
        store
    }

    #[test]
    fn scrape_time_gauges_count_the_caches_once_attached() {
        use enbi_core::keys;
        use k8s_openapi::api::core::v1::Pod;
        let metrics = Metrics::new();
        assert_eq!(
            sample(&metrics, "enbi_gated_pods"),
            None,
            "no caches (not the leader): no sample"
        );
        let pod = |name: &str, extra: serde_json::Value| -> Pod {
            let mut pod = serde_json::json!({
                "metadata": {"name": name, "namespace": "apps",
                    "creationTimestamp": "2020-01-01T00:00:00Z",
                    "annotations": {keys::POD_IMAGE_TAG: "example.test/app:v1"}},
                "spec": {"containers": [{"name": "app", "image": "example.test/app:v1"}]},
            });
            for (k, v) in extra.as_object().expect("object") {
                pod[k] = v.clone();
            }
            serde_json::from_value(pod).expect("pod")
        };
        let gated = serde_json::json!({"spec": {
            "containers": [{"name": "app", "image": "example.test/app:v1"}],
            "schedulingGates": [{"name": keys::GATE}],
        }});
        let back_off = serde_json::json!({"status": {"containerStatuses": [{
            "name": "app", "image": "example.test/app:v1", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}});
        let pods = store(vec![
            pod("a", gated.clone()),
            pod("b", gated),
            pod("c", back_off),
            pod("d", serde_json::json!({})),
        ]);
        let mut build = enbi_core::crd::NixBuild::new(
            "b",
            serde_json::from_value(serde_json::json!({
                "flakeUrl": "github:example/app", "packageName": "app",
                "imageTag": "example.test/app:v1", "system": "x86_64-linux"}))
            .expect("spec"),
        );
        build.metadata.namespace = Some("apps".into());
        build.status = Some(
            serde_json::from_value(serde_json::json!({
                "phase": "Succeeded", "buildNode": "n1",
                "imageNodes": [{"node": "n2", "state": "Loading", "since": "2020-01-01T00:00:00Z"}],
            }))
            .expect("status"),
        );
        metrics.count_caches(store(vec![build]), vec![pods]);
        assert_eq!(sample(&metrics, "enbi_gated_pods"), Some(2.0));
        let oldest = sample(&metrics, "enbi_gated_pod_oldest_seconds").expect("oldest");
        assert!(oldest > 6.0 * 365.0 * 86400.0, "since 2020: {oldest}");
        let waiting = |reason: &str| {
            sample(
                &metrics,
                &format!("enbi_waiting_pods{{reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(waiting("SchedulingGated"), Some(2.0));
        assert_eq!(waiting("ImagePullBackOff"), Some(1.0));
        assert_eq!(waiting("ErrImagePull"), Some(0.0), "every reason, 0 too");
        let pairs = |state: &str| {
            sample(
                &metrics,
                &format!("enbi_image_node_pairs{{state=\"{state}\"}}"),
            )
        };
        assert_eq!(
            (pairs("loaded"), pairs("loading"), pairs("failed")),
            (Some(1.0), Some(1.0), Some(0.0))
        );
    }

    #[test]
    fn jobs_finished_count_by_purpose_and_result() {
        let metrics = Metrics::new();
        let line = |purpose: &str, result: &str| {
            format!("enbi_jobs_finished_total{{purpose=\"{purpose}\",result=\"{result}\"}}")
        };
        assert_eq!(sample(&metrics, &line("release", "failed")), Some(0.0));
        metrics.job_finished("release", true);
        let building: enbi_core::crd::NixBuildStatus =
            serde_json::from_value(serde_json::json!({"phase": "Building"})).expect("status");
        let failed: enbi_core::crd::NixBuildStatus =
            serde_json::from_value(serde_json::json!({"phase": "Failed"})).expect("status");
        metrics.status_written(Some(&building), &failed);
        metrics.status_written(Some(&failed), &failed);
        assert_eq!(sample(&metrics, &line("release", "succeeded")), Some(1.0));
        assert_eq!(sample(&metrics, &line("build", "failed")), Some(1.0));
        assert_eq!(sample(&metrics, &line("build", "succeeded")), Some(0.0));
    }

    #[test]
    fn the_certificate_expiry_shows_once_known() {
        let metrics = Metrics::new();
        let name = "enbi_webhook_certificate_expiry_timestamp_seconds";
        assert_eq!(sample(&metrics, name), None);
        metrics.webhook_certificate_expires(1_900_000_000);
        assert_eq!(sample(&metrics, name), Some(1_900_000_000.0));
    }

    #[test]
    fn readiness_is_asked_at_each_scrape() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let metrics = Metrics::new();
        assert_eq!(sample(&metrics, "enbi_ready"), None);
        let ready = Arc::new(AtomicBool::new(false));
        metrics.report_readiness({
            let ready = ready.clone();
            move || ready.load(Ordering::Relaxed)
        });
        assert_eq!(sample(&metrics, "enbi_ready"), Some(0.0));
        ready.store(true, Ordering::Relaxed);
        assert_eq!(sample(&metrics, "enbi_ready"), Some(1.0));
    }

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
