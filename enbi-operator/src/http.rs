//! `/livez`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// Binds `address` (a taken port stops the operator at once) and returns the server, which
/// serves until the process ends. Ready once `ready` is set (the CRD is served and the caches
/// are filled), whether or not this replica leads.
pub async fn bind(
    address: SocketAddr,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let app = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route("/metrics", get(move || async move { metrics.encode() }));
    let listener = tokio::net::TcpListener::bind(address).await?;
    Ok(async move { axum::serve(listener, app).await })
}
