//! Prometheus metrics (`enbi_*`). Labels are bounded: results, reasons and error categories,
//! never names or tags.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Finished {
    pub result: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Category {
    pub category: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub reconciliations: Counter,
    pub reconcile_errors: Family<Category, Counter>,
    pub builds_started: Counter,
    pub builds_finished: Family<Finished, Counter>,
    pub pod_triggered_builds: Counter,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics::default();
        let mut registry = Registry::with_prefix("enbi");
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
        m.registry = registry;
        m
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
