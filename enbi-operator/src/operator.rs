//! `enbi-operator run`: waits for the CRD, fills the caches, takes the leader Lease (if asked),
//! then runs the NixBuild controller, the Pod watcher and garbage collection.

use std::sync::Arc;

use enbi_core::crd::NixBuild;
use enbi_core::keys;
use enbi_core::{capacity, fault, job};
use futures::channel::mpsc;
use futures::{StreamExt, future};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher::Config;
use kube::runtime::{Controller, WatchStreamExt};
use kube::{Api, Client, CustomResourceExt};
use tracing::{debug, info, warn};

use crate::config::RunArgs;
use crate::controller::{self, Context};
use crate::http::Health;
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::optin::OptIn;
use crate::pods::PodWatcher;
use crate::watch::{notify, owner_of, spawn_cache, strip_managed_fields, strip_node, watch};
use crate::{gc, http, webhook};

/// Runs the operator until a signal stops it; `tracing`: spans are exported, so builds get a
/// trace context.
pub async fn run(args: RunArgs, tracing: bool) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = Arc::new(Metrics::new());
    let client = counting_client(metrics.clone()).await?;
    let health = Arc::new(Health::default());
    metrics.report_readiness({
        let health = health.clone();
        move || health.is_ready()
    });
    let builder = args.builder();
    let settings_fault = fault::of_settings(&builder);
    if let Some(f) = &settings_fault {
        health.raise(f.clone());
    }
    let server =
        tokio::spawn(http::bind(args.listen_address, health.clone(), metrics.clone()).await?);

    let crd_name = NixBuild::crd_name();
    info!(crd = crd_name, "waiting for the CRD to be Established");
    await_condition(
        Api::<CustomResourceDefinition>::all(client.clone()),
        crd_name,
        conditions::is_crd_established(),
    )
    .await?;

    let builder_selector = format!("{}={}", keys::NAME, job::BUILDER_NAME);
    let build_ns = args.build_namespace.clone();
    let (trigger, triggers) = mpsc::unbounded();
    let (builds, writer) = reflector::store();
    let controller = Controller::for_stream(
        watch(
            Api::<NixBuild>::all(client.clone()),
            Config::default(),
            &metrics,
        )
        .reflect(writer)
        .applied_objects(),
        builds.clone(),
    );

    let builder_config = Config::default().labels(&builder_selector);
    let jobs = spawn_cache(
        Api::<Job>::namespaced(client.clone(), &build_ns),
        builder_config.clone(),
        &metrics,
        strip_managed_fields,
        {
            let (trigger, builds) = (trigger.clone(), builds.clone());
            move |j: &Job| notify(&trigger, &builds, owner_of(j))
        },
    );
    let builder_pods = spawn_cache(
        Api::<Pod>::namespaced(client.clone(), &build_ns),
        builder_config,
        &metrics,
        strip_managed_fields,
        {
            let (trigger, builds) = (trigger.clone(), builds.clone());
            move |p: &Pod| notify(&trigger, &builds, owner_of(p))
        },
    );
    let nodes = spawn_cache(
        Api::<Node>::all(client.clone()),
        Config::default(),
        &metrics,
        strip_node,
        {
            let (trigger, builds) = (trigger.clone(), builds.clone());
            move |_: &Node| notify(&trigger, &builds, None)
        },
    );
    jobs.wait_until_ready().await?;
    builder_pods.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    let opt_in = OptIn::new(
        client.clone(),
        args.pod_builds_namespaces,
        args.watch_namespaces.clone(),
        &metrics,
    );
    if let Some(settings) = args.webhook() {
        // Every replica answers admission requests, so each keeps its own NixBuild cache.
        let builds = spawn_cache(
            Api::<NixBuild>::all(client.clone()),
            Config::default(),
            &metrics,
            strip_managed_fields,
            |_: &NixBuild| {},
        );
        let admitter = Arc::new(webhook::Admitter {
            opt_in: opt_in.clone(),
            nodes: nodes.clone(),
            builds,
            policy: args.policy(),
            metrics: metrics.clone(),
        });
        info!(address = %settings.address, configuration = %settings.configuration, "serving the admission webhook");
        tokio::spawn(webhook::bind(client.clone(), settings, admitter).await?);
    }
    health.started();

    if args.leader_election {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("enbi-{}", std::process::id()));
        let mut elector = Elector::new(client.clone(), &namespace, identity);
        info!(%namespace, "waiting to become leader");
        elector.acquire().await;
        tokio::spawn(elector.keep());
    }

    if args.narrow_gated_pods && args.image_mirror {
        warn!("--narrow-gated-pods is ignored with --image-mirror: the mirror serves every node");
    }
    let reporter = Context::reporter(std::env::var("POD_NAME").ok());
    let watcher = Arc::new(PodWatcher::new(
        client.clone(),
        nodes.clone(),
        builds.clone(),
        trigger,
        reporter.clone(),
        metrics.clone(),
        crate::pods::Settings {
            opt_in,
            policy: args.policy(),
            actions: enbi_core::pod::actions::Settings {
                recreate: args.recreate_waiting_pods,
                narrow: args.narrow(),
            },
            tracing,
        },
    ));
    let namespaces: Vec<Option<String>> = if args.watch_namespaces.is_empty() {
        vec![None]
    } else {
        args.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let mut pod_stores = vec![];
    for namespace in namespaces {
        let (store, writer) = reflector::store();
        pod_stores.push(store);
        tokio::spawn(watcher.clone().run(namespace, writer));
    }
    metrics.count_caches(builds.clone(), pod_stores.clone());
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context {
        client: client.clone(),
        builder,
        machine: args.machine(),
        policy: args.policy(),
        capacity: capacity::Limits {
            global: args.max_concurrent_builds,
            per_node: args.max_builds_per_node,
        },
        node_repel: args.node_repel.clone(),
        release_timeout: args.release_timeout(),
        builds: builds.clone(),
        jobs,
        builder_pods,
        nodes: nodes.clone(),
        pods: watcher,
        pod_stores: pod_stores.clone(),
        recorder,
        metrics: metrics.clone(),
        health,
        settings_fault,
        tracing,
        failures: Default::default(),
    });

    let gc_period = std::time::Duration::from_secs(args.gc_interval_seconds.max(1));
    tokio::spawn(gc::run(
        client.clone(),
        builds,
        pod_stores,
        nodes,
        gc::Settings {
            limits: args.gc(),
            period: gc_period,
            namespaces: args.watch_namespaces.clone(),
        },
    ));

    info!("running");
    controller
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| {
            match result {
                // A trigger for a NixBuild deleted meanwhile (e.g. its Job finishing after GC).
                Err(kube::runtime::controller::Error::ObjectNotFound(r)) => {
                    debug!(object = %r, "gone")
                }
                Err(e) => warn!(error = %e, "controller"),
                Ok(_) => {}
            }
            future::ready(())
        })
        .await;
    server.abort();
    Ok(())
}

/// A client that counts every request in `enbi_api_requests_total` and every write in
/// `enbi_api_writes_total`.
async fn counting_client(metrics: Arc<Metrics>) -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let count =
        tower::util::MapRequestLayer::new(move |request: ::http::Request<kube::client::Body>| {
            let verb = crate::metrics::verb_of(
                request.method(),
                request.uri().path(),
                request.uri().query(),
            );
            metrics
                .api_requests
                .get_or_create(&crate::metrics::Request { verb })
                .inc();
            if request.method() != ::http::Method::GET {
                let resource = crate::metrics::resource_of(request.uri().path());
                debug!(method = %request.method(), path = request.uri().path(), "API write");
                metrics
                    .api_writes
                    .get_or_create(&crate::metrics::Write { resource })
                    .inc();
            }
            request
        });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&count)
        .build())
}
