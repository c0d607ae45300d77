//! A scripted API server for the controllers' unit tests (and caches filled by hand), in the style of kube-rs's
//! controller-rs: a `kube::Client` over a `tower_test` mock Service, and a task that expects
//! the client's requests in order (method, path, query, and the JSON body where it matters),
//! answering each with a canned response. A request out of order, one too many or one missing
//! fails the test.
//!
//! ```ignore
//! let (client, server) = mock::client();
//! let scenario = server.expect(vec![
//!     Exchange::get("/api/v1/namespaces/apps/pods/p").ok(pod),
//!     Exchange::patch("/api/v1/namespaces/apps/pods/p").json_patch(ops).ok(pod),
//! ]);
//! do_the_work(client).await;
//! scenario.verify().await; // every client dropped first
//! ```

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

/// The content type of a JSON patch (RFC 6902).
const JSON_PATCH: &str = "application/json-patch+json";
/// The content type of a server-side apply.
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// A client whose requests go to the returned [`ApiServer`].
pub fn client() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer(handle))
}

/// The server side of [`client`]: it answers nothing until told what to expect.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Serves `exchanges` in order, in a task; then expects no further request.
    pub fn expect(self, exchanges: Vec<Exchange>) -> Scenario {
        let mut handle = self.0;
        Scenario(tokio::spawn(async move {
            for (i, exchange) in exchanges.into_iter().enumerate() {
                let Some((request, send)) = handle.next_request().await else {
                    panic!(
                        "request {i}: expected {}, but the client made no more requests",
                        exchange.line
                    );
                };
                let response = exchange.serve(i, request).await;
                send.send_response(response);
            }
            if let Some((request, _)) = handle.next_request().await {
                panic!("unexpected request: {}", line(&request));
            }
        }))
    }
}

/// The task serving the expected requests.
#[derive(Debug)]
pub struct Scenario(JoinHandle<()>);

impl Scenario {
    /// Waits until the client is gone (so drop every clone of it first: whatever holds it) and
    /// fails if a request was not as expected, missing, or one too many.
    pub async fn verify(self) {
        match tokio::time::timeout(Duration::from_secs(10), self.0).await {
            Err(_) => panic!("the mock API server still waits: is a clone of the client alive?"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("the mock API server task: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// How a request's body must look.
#[derive(Debug, Clone)]
enum BodyCheck {
    /// Not looked at.
    Any,
    /// Exactly this JSON.
    Exact(Value),
    /// This JSON, with any other fields in objects (arrays must have the same length).
    Includes(Value),
}

/// What to answer.
#[derive(Debug, Clone)]
enum Answer {
    Json(StatusCode, Value),
    /// The request's own body, as the apiserver returns an object it created or applied.
    Echo(StatusCode),
}

/// One expected request and its response.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `METHOD path[?query]`, as [`line`] prints a request.
    line: String,
    content_type: Option<&'static str>,
    body: BodyCheck,
    answer: Answer,
}

impl Exchange {
    /// A request of `method` to `uri` (`path[?query]`) answered with `200 {}` unless told
    /// otherwise.
    pub fn new(method: Method, uri: &str) -> Self {
        Self {
            line: format!("{method} {uri}"),
            content_type: None,
            body: BodyCheck::Any,
            answer: Answer::Json(StatusCode::OK, json!({})),
        }
    }

    pub fn get(uri: &str) -> Self {
        Self::new(Method::GET, uri)
    }

    pub fn post(uri: &str) -> Self {
        Self::new(Method::POST, uri)
    }

    pub fn patch(uri: &str) -> Self {
        Self::new(Method::PATCH, uri)
    }

    pub fn delete(uri: &str) -> Self {
        Self::new(Method::DELETE, uri)
    }

    /// The body is exactly `body`.
    pub fn body(mut self, body: Value) -> Self {
        self.body = BodyCheck::Exact(body);
        self
    }

    /// The body has at least what `body` has.
    pub fn includes(mut self, body: Value) -> Self {
        self.body = BodyCheck::Includes(body);
        self
    }

    /// A JSON patch of exactly these operations.
    pub fn json_patch(mut self, ops: Value) -> Self {
        self.content_type = Some(JSON_PATCH);
        self.body(ops)
    }

    /// A server-side apply whose body has at least what `body` has.
    pub fn apply(mut self, body: Value) -> Self {
        self.content_type = Some(APPLY_PATCH);
        self.includes(body)
    }

    /// Answers `200` with `object`.
    pub fn ok(mut self, object: impl serde::Serialize) -> Self {
        let object = serde_json::to_value(object).expect("a response body");
        self.answer = Answer::Json(StatusCode::OK, object);
        self
    }

    /// Answers `201` with the request's body, as the apiserver does to a create.
    pub fn created(mut self) -> Self {
        self.answer = Answer::Echo(StatusCode::CREATED);
        self
    }

    /// Answers `200` with the request's body, as the apiserver does to an apply.
    pub fn echo(mut self) -> Self {
        self.answer = Answer::Echo(StatusCode::OK);
        self
    }

    /// Answers `code` with a failure `Status` of `reason`, as the apiserver does.
    pub fn fails(mut self, code: u16, reason: &str) -> Self {
        let status = json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("mock: {reason}"), "reason": reason, "code": code,
        });
        let code = StatusCode::from_u16(code).expect("an HTTP status");
        self.answer = Answer::Json(code, status);
        self
    }

    /// Checks request number `i` against this exchange and makes its response.
    async fn serve(self, i: usize, request: Request<Body>) -> Response<Body> {
        let actual = line(&request);
        assert_eq!(actual, self.line, "request {i}");
        if let Some(want) = self.content_type {
            let got = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            assert_eq!(got, Some(want), "request {i} ({actual}): content type");
        }
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("a request body");
        let body = || -> Value {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("request {i} ({actual}): body is not JSON: {e}"))
        };
        match &self.body {
            BodyCheck::Any => {}
            BodyCheck::Exact(want) => {
                let got = body();
                assert!(
                    &got == want,
                    "request {i} ({actual}): body\n{}\nis not\n{}",
                    pretty(&got),
                    pretty(want)
                );
            }
            BodyCheck::Includes(want) => {
                let got = body();
                assert!(
                    includes(&got, want),
                    "request {i} ({actual}): body\n{}\ndoes not include\n{}",
                    pretty(&got),
                    pretty(want)
                );
            }
        }
        let (status, body) = match self.answer {
            Answer::Json(status, value) => (status, value),
            Answer::Echo(status) => (status, body()),
        };
        Response::builder()
            .status(status)
            .body(Body::from(
                serde_json::to_vec(&body).expect("a response body"),
            ))
            .expect("a response")
    }
}

/// A cache holding `objects`, as a watch would have filled it.
pub fn store<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }
    store
}

/// `METHOD path[?query]`.
fn line(request: &Request<Body>) -> String {
    let uri = request.uri();
    match uri.query().filter(|q| !q.is_empty()) {
        Some(query) => format!("{} {}?{query}", request.method(), uri.path()),
        None => format!("{} {}", request.method(), uri.path()),
    }
}

/// Whether `actual` has everything `expected` has: objects may have more fields, arrays must
/// have as many elements, each including the expected one.
pub fn includes(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| includes(av, v))),
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(av, ev)| includes(av, ev))
        }
        _ => actual == expected,
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

mod tests {
    use super::*;

    #[test]
    fn includes_allows_more_fields_but_not_other_values() {
        let actual = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}});
        assert!(includes(&actual, &json!({"b": {"c": [1, {"d": 2}]}})));
        assert!(!includes(&actual, &json!({"b": {"c": [1]}})));
        assert!(!includes(&actual, &json!({"a": 2})));
        assert!(!includes(&actual, &json!({"f": null})));
    }
}
