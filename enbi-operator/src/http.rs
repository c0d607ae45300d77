//! `/livez`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use enbi_core::fault::Fault;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// What `/readyz` says: ready once the CRD is served and the caches are filled (whether or not
/// this replica leads), and not while a fault of the installation holds builds up.
#[derive(Debug, Default)]
pub struct Health {
    started: AtomicBool,
    /// Faults seen and not since cleared, each once (by `Fault::key`).
    faults: Mutex<Vec<Fault>>,
}

impl Health {
    pub fn started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// Records a fault (logged once, when it is new).
    pub fn raise(&self, fault: Fault) {
        let Ok(mut faults) = self.faults.lock() else {
            return;
        };
        match faults.iter_mut().find(|f| f.key() == fault.key()) {
            Some(known) => *known = fault,
            None => {
                warn!(reason = fault.reason(), message = %fault.message(), "operator fault");
                faults.push(fault);
            }
        }
    }

    /// A request on `resource` (`jobs.batch`, `nixbuilds.enbi.hrzn.ee`) succeeded: the faults it
    /// disproves are gone.
    pub fn succeeded(&self, resource: &str) {
        if let Ok(mut faults) = self.faults.lock() {
            faults.retain(|f| {
                let gone = f.cleared_by(resource);
                if gone {
                    info!(reason = f.reason(), "operator fault cleared");
                }
                !gone
            });
        }
    }

    /// Whether `/readyz` answers 200 now (`enbi_ready`).
    pub fn is_ready(&self) -> bool {
        self.readiness().0 == StatusCode::OK
    }

    fn readiness(&self) -> (StatusCode, String) {
        let faults = self.faults.lock().map(|f| f.clone()).unwrap_or_default();
        if !faults.is_empty() {
            let lines: Vec<String> = faults
                .iter()
                .map(|f| format!("{}: {}", f.reason(), f.message()))
                .collect();
            return (StatusCode::SERVICE_UNAVAILABLE, lines.join("\n") + "\n");
        }
        if self.started.load(Ordering::Relaxed) {
            (StatusCode::OK, "ok".into())
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "starting".into())
        }
    }
}

/// Binds `address` (a taken port stops the operator at once) and returns the server, which
/// serves until the process ends.
pub async fn bind(
    address: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(move || async move { health.readiness() }))
        .route("/metrics", get(move || async move { metrics.encode() }));
    let listener = tokio::net::TcpListener::bind(address).await?;
    Ok(async move { axum::serve(listener, app).await })
}
