//! The admission webhooks, over TLS with a certificate the operator makes and rotates itself:
//! the mutating one gates annotated Pods at creation (`enbi_core::pod::admission::admit`), the
//! validating one refuses a NixBuild the policy forbids (`enbi_core::policy::check`), so that
//! its author reads the rule at once rather than in a Failed status.
//!
//! Every replica serves it (the Service spreads requests), leader or not: it only answers, it
//! writes nothing (`sideEffects: None`); the leader's Pod watcher sees the gated Pod and
//! creates its NixBuild. The certificate is self-managed so that no cert-manager is needed: a
//! self-signed CA and a serving certificate (rcgen, in-process) in a Secret of the operator's
//! namespace that every replica loads, the CA bundle patched into the
//! MutatingWebhookConfiguration, both renewed before they expire (`enbi_core::servingcert`).
//! With the operator down, `failurePolicy: Ignore` lets Pods through ungated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;
use enbi_core::crd::NixBuild;
use enbi_core::keys;
use enbi_core::pod::admission::{self, Admission};
use enbi_core::policy::{self, Policy};
use enbi_core::servingcert;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::metrics::{Decision, Metrics};
use crate::optin::OptIn;
use crate::patch;

/// Path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/mutate-pods";
/// Path the ValidatingWebhookConfiguration calls.
pub const VALIDATE_PATH: &str = "/validate-nixbuilds";
/// How often each replica re-reads the Secret (a rotation by another replica reaches it).
const SYNC_PERIOD: Duration = Duration::from_secs(60);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the webhook's certificate lives and what it names.
#[derive(Debug, Clone)]
pub struct Settings {
    pub address: SocketAddr,
    /// The Mutating- and ValidatingWebhookConfiguration (one name) to patch the CA bundle into.
    pub configuration: String,
    /// The Secret (in `namespace`) holding CA and serving certificate.
    pub secret: String,
    pub namespace: String,
    /// Host names (or IP addresses) the serving certificate is valid for.
    pub hosts: Vec<String>,
}

/// What the webhook decides with.
pub struct Admitter {
    pub opt_in: OptIn,
    pub nodes: Store<Node>,
    /// NixBuilds, kept on every replica (the controller's cache fills only on the leader).
    pub builds: Store<NixBuild>,
    /// Which builds (NixBuilds, and Pods' requests) are refused.
    pub policy: Policy,
    /// Where each answer's duration goes (`enbi_webhook_admission_duration_seconds`).
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitter").finish_non_exhaustive()
    }
}

/// Binds the webhook's port (a taken port stops the operator at once), then keeps the
/// certificate and serves until the process ends.
pub async fn bind(
    client: Client,
    settings: Settings,
    admitter: Arc<Admitter>,
) -> std::io::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(settings.address).await?;
    let resolver = Arc::new(Resolver::default());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let metrics = admitter.metrics.clone();
    let app = Router::new()
        .route(PATH, post(mutate))
        .route(VALIDATE_PATH, post(validate))
        .with_state(admitter);
    Ok(async move {
        tokio::spawn(keep_certificate(client, settings, resolver, metrics));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let address = listener.local_addr().ok();
        tokio::spawn(accept(listener, acceptor, tx));
        if let Err(e) = axum::serve(TlsListener { rx, address }, app).await {
            warn!(error = %e, "admission webhook stopped");
        }
    })
}

/// Accepts TCP connections and runs each TLS handshake in its own task, so that a slow client
/// never holds up the others.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admission webhook: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => debug!(error = %e, %peer, "admission webhook: TLS handshake"),
                Err(_) => debug!(%peer, "admission webhook: TLS handshake timed out"),
            }
        });
    }
}

/// The connections whose handshake completed, for axum.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    address: Option<SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(connection) => connection,
            // The accept task never ends while the process runs.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.address
            .ok_or_else(|| std::io::Error::other("TLS listener"))
    }
}

/// Answers one AdmissionReview of a Pod; the time from the request's body to the answer's goes
/// into `enbi_webhook_admission_duration_seconds`.
async fn mutate(
    State(admitter): State<Arc<Admitter>>,
    body: Bytes,
) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
    let started = std::time::Instant::now();
    let (response, decision) = match read::<Pod>(&body) {
        Ok(request) => admitter.review(&request).await,
        Err(e) => (AdmissionResponse::invalid(e), "invalid"),
    };
    admitter.answer(response, decision, started)
}

/// Answers one AdmissionReview of a NixBuild: denied with the policy's rule, or allowed.
async fn validate(
    State(admitter): State<Arc<Admitter>>,
    body: Bytes,
) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
    let started = std::time::Instant::now();
    let (response, decision) = match read::<NixBuild>(&body) {
        Ok(request) => admitter.review_build(&request),
        Err(e) => (AdmissionResponse::invalid(e), "invalid"),
    };
    admitter.answer(response, decision, started)
}

/// The request of an AdmissionReview, or why it cannot be read.
fn read<K>(body: &[u8]) -> Result<AdmissionRequest<K>, String>
where
    K: kube::Resource + serde::de::DeserializeOwned,
{
    serde_json::from_slice::<AdmissionReview<K>>(body)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            r.try_into()
                .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
        })
        .inspect_err(|e| warn!(error = %e, "admission webhook: unreadable request"))
}

impl Admitter {
    /// The review carrying `response`; its duration goes into
    /// `enbi_webhook_admission_duration_seconds` under `decision`.
    fn answer(
        &self,
        response: AdmissionResponse,
        decision: &'static str,
        started: std::time::Instant,
    ) -> ([(axum::http::HeaderName, &'static str); 1], Vec<u8>) {
        let body = serde_json::to_vec(&response.into_review()).unwrap_or_default();
        self.metrics
            .webhook_admission
            .get_or_create(&Decision { decision })
            .observe(started.elapsed().as_secs_f64());
        ([(CONTENT_TYPE, "application/json")], body)
    }

    /// A NixBuild being created: denied when the policy refuses it, the message naming the
    /// field and the rule.
    fn review_build(
        &self,
        request: &AdmissionRequest<NixBuild>,
    ) -> (AdmissionResponse, &'static str) {
        let response = AdmissionResponse::from(request);
        let (Some(build), Some(namespace)) = (&request.object, &request.namespace) else {
            return (response, "allowed");
        };
        if request.operation != Operation::Create {
            return (response, "allowed");
        }
        match policy::check(&self.policy, namespace, &build.spec) {
            Ok(()) => (response, "allowed"),
            Err(denial) => {
                debug!(%namespace, build = %build.name_any(), %denial, "refused a NixBuild");
                (response.deny(denial.to_string()), "denied")
            }
        }
    }

    /// The answer, and whether it gates the Pod (`gated`) or not (`allowed`).
    async fn review(&self, request: &AdmissionRequest<Pod>) -> (AdmissionResponse, &'static str) {
        let mut response = AdmissionResponse::from(request);
        let (Some(pod), Some(namespace)) = (&request.object, &request.namespace) else {
            return (response, "allowed");
        };
        if request.operation != Operation::Create || !self.opt_in.allows(namespace).await {
            return (response, "allowed");
        }
        let node_archs: BTreeMap<String, String> = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| {
                let arch = n.labels().get(keys::ARCH_LABEL)?;
                Some((n.name_any(), arch.clone()))
            })
            .collect();
        let phase_of = |name: &str| {
            self.builds
                .get(&ObjectRef::new(name).within(namespace))
                .map(|b| b.phase())
        };
        match admission::admit(pod, namespace, &node_archs, &self.policy, phase_of) {
            Admission::Gate { build, patch } => {
                match patch::operations(patch)
                    .map_err(|e| e.to_string())
                    .and_then(|p| response.clone().with_patch(p).map_err(|e| e.to_string()))
                {
                    Ok(patched) => {
                        debug!(%namespace, pod = %pod.name_any(), %build, "gated a Pod until its image is built");
                        return (patched, "gated");
                    }
                    Err(e) => warn!(error = %e, "admission webhook: the gate's patch"),
                }
            }
            Admission::Allow { warning } => response.warnings = warning.map(|w| vec![w]),
        }
        (response, "allowed")
    }
}

/// The serving certificate, swapped when it is renewed; none until the first is loaded
/// (handshakes fail until then, and `failurePolicy: Ignore` admits the Pods ungated).
#[derive(Debug, Default)]
struct Resolver(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok()?.clone()
    }
}

#[derive(Debug, thiserror::Error)]
enum CertError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("making the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("loading the certificate: {0}")]
    Load(String),
}

/// Keeps the Secret's certificate current, the CA bundle patched and the newest certificate
/// loaded, every `SYNC_PERIOD`; its expiry goes to `enbi_webhook_certificate_expiry_timestamp_seconds`.
async fn keep_certificate(
    client: Client,
    settings: Settings,
    resolver: Arc<Resolver>,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(SYNC_PERIOD);
    loop {
        tick.tick().await;
        // A conflict means another replica wrote the Secret just now: read it again at once.
        for _ in 0..3 {
            match sync(&client, &settings, &resolver, &metrics).await {
                Ok(()) => break,
                Err(CertError::Kube(kube::Error::Api(s))) if s.code == 409 => continue,
                Err(e) => {
                    warn!(error = %e, secret = %settings.secret, "admission webhook certificate");
                    break;
                }
            }
        }
    }
}

async fn sync(
    client: &Client,
    settings: &Settings,
    resolver: &Resolver,
    metrics: &Metrics,
) -> Result<(), CertError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &settings.namespace);
    let hosts = settings.hosts.join(",");
    let current = secrets.get_opt(&settings.secret).await?;
    let annotation = |key: &str| {
        current
            .as_ref()
            .and_then(|s| s.annotations().get(key).cloned())
    };
    let reason = servingcert::renewal(
        Timestamp::now(),
        annotation(keys::CERT_NOT_AFTER).as_deref(),
        annotation(keys::CERT_HOSTS).as_deref(),
        &hosts,
    );
    let secret = match (reason, current) {
        (None, Some(secret)) => secret,
        (reason, current) => {
            let previous_ca = current.as_ref().and_then(|s| first_pem(data(s, "ca.crt")?));
            let mut fresh = generate(settings, previous_ca.as_deref())?;
            let written = match current {
                Some(old) => {
                    fresh.metadata.resource_version = old.resource_version();
                    secrets
                        .replace(&settings.secret, &PostParams::default(), &fresh)
                        .await?
                }
                None => secrets.create(&PostParams::default(), &fresh).await?,
            };
            info!(secret = %settings.secret, reason = reason.unwrap_or_default(), "admission webhook certificate made");
            written
        }
    };
    let bundle = data(&secret, "ca.crt").ok_or_else(|| CertError::Load("no ca.crt".into()))?;
    patch_bundle(client, &settings.configuration, bundle).await?;
    let key = certified_key(&secret)?;
    if let Ok(mut slot) = resolver.0.write() {
        *slot = Some(Arc::new(key));
    }
    if let Some(not_after) = secret
        .annotations()
        .get(keys::CERT_NOT_AFTER)
        .and_then(|t| t.parse::<Timestamp>().ok())
    {
        metrics.webhook_certificate_expires(not_after.as_second());
    }
    Ok(())
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

/// The first PEM block of a bundle (the newest CA).
fn first_pem(bundle: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bundle).ok()?;
    let end = "-----END CERTIFICATE-----";
    let at = text.find(end)?;
    Some(format!("{}\n", &text[..at + end.len()]))
}

/// A new CA and serving certificate, as the Secret to write; the CA bundle also holds
/// `previous_ca`, which replicas not yet reloaded still serve under.
fn generate(settings: &Settings, previous_ca: Option<&str>) -> Result<Secret, CertError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let now = Timestamp::now();
    let not_after = now
        .checked_add(
            SignedDuration::try_from(servingcert::LIFETIME)
                .map_err(|e| CertError::Load(e.to_string()))?,
        )
        .map_err(|e| CertError::Load(e.to_string()))?;
    // Whole days (rcgen's dates), from a day before now for clocks behind ours.
    let day = |t: Timestamp| {
        let utc = t.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC);
        rcgen::date_time_ymd(i32::from(utc.year()), utc.month() as u8, utc.day() as u8)
    };
    let validity = |params: &mut CertificateParams| {
        params.not_before = day(now - SignedDuration::from_hours(24));
        params.not_after = day(not_after);
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("enbi webhook CA {}", settings.namespace),
    );
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(settings.hosts.clone())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        settings.hosts.first().cloned().unwrap_or_default(),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut leaf);
    let cert = leaf.signed_by(&key, &issuer)?;

    let mut bundle = ca_cert.pem();
    if let Some(previous) = previous_ca {
        bundle.push_str(previous);
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                keys::MANAGER.into(),
            )])),
            annotations: Some(BTreeMap::from([
                (keys::CERT_NOT_AFTER.into(), not_after.to_string()),
                (keys::CERT_HOSTS.into(), settings.hosts.join(",")),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".into(), ByteString(bundle.into_bytes())),
            ("tls.crt".into(), ByteString(cert.pem().into_bytes())),
            (
                "tls.key".into(),
                ByteString(key.serialize_pem().into_bytes()),
            ),
        ])),
        ..Secret::default()
    })
}

fn certified_key(secret: &Secret) -> Result<CertifiedKey, CertError> {
    let load = |e: &dyn std::fmt::Display| CertError::Load(e.to_string());
    let chain = CertificateDer::pem_slice_iter(data(secret, "tls.crt").unwrap_or_default())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load(&e))?;
    let key = PrivateKeyDer::from_pem_slice(data(secret, "tls.key").unwrap_or_default())
        .map_err(|e| load(&e))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| load(&e))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Sets every webhook's `clientConfig.caBundle` of the Mutating- and the
/// ValidatingWebhookConfiguration named `name` to `bundle`, where it is not already; a missing
/// ValidatingWebhookConfiguration (an installation from before it) is left alone.
async fn patch_bundle(client: &Client, name: &str, bundle: &[u8]) -> Result<(), kube::Error> {
    patch_bundle_of(
        &Api::<MutatingWebhookConfiguration>::all(client.clone()),
        name,
        bundle,
    )
    .await?;
    match patch_bundle_of(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        name,
        bundle,
    )
    .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// Patches one configuration's bundles; each change is guarded by a test of the webhook's name
/// at that index.
async fn patch_bundle_of<K>(api: &Api<K>, name: &str, bundle: &[u8]) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    let config = serde_json::to_value(api.get(name).await?).map_err(kube::Error::SerdeError)?;
    let wanted = ByteString(bundle.to_vec());
    let wanted_json = serde_json::to_value(&wanted).map_err(kube::Error::SerdeError)?;
    let webhooks = config["webhooks"].as_array().cloned().unwrap_or_default();
    let ops: Vec<serde_json::Value> = webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| w["clientConfig"]["caBundle"] != wanted_json)
        .flat_map(|(i, w)| {
            [
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w["name"]}),
                json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": wanted}),
            ]
        })
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let patch = patch::json_patch(ops).map_err(kube::Error::SerdeError)?;
    api.patch(name, &PatchParams::default(), &patch).await?;
    info!(configuration = %name, kind = %K::kind(&()), "admission webhook CA bundle patched");
    Ok(())
}
