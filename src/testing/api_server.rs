//! Test fixtures: a mock Kubernetes API server in kube-rs controller-rs's
//! style (tower-test). A test takes each request in order, checks its
//! method, exact URI and body, and answers as the API server would.

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub struct ApiServer(pub Handle);

/// A client whose every request reaches the returned [`ApiServer`].
pub fn mock_client() -> (Client, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), ApiServer(handle))
}

/// The API server's `Status` body for a failure.
pub fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub fn not_found(kind: &str, name: &str) -> Value {
    api_status(404, "NotFound", &format!("{kind} \"{name}\" not found"))
}

pub fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

impl ApiServer {
    /// Takes the next request, checks it, answers with `status` and `body`,
    /// and returns the request body as JSON (Null when empty).
    pub async fn expect(&mut self, method: &str, uri: &str, status: u16, body: Value) -> Value {
        let (req, send) = self
            .0
            .next_request()
            .await
            .expect("no further call was made");
        assert_eq!(req.method().as_str(), method, "method of {}", req.uri());
        assert_eq!(req.uri().to_string(), uri);
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        respond(send, status, &body);
        sent
    }

    /// Answers a server-side apply with the applied object (plus `status`).
    pub async fn apply(&mut self, uri: &str, status: Value) -> Value {
        let (req, send) = self
            .0
            .next_request()
            .await
            .expect("no further call was made");
        assert_eq!(req.method().as_str(), "PATCH", "method of {}", req.uri());
        assert_eq!(req.uri().to_string(), uri);
        assert_eq!(
            req.headers().get("content-type").unwrap(),
            "application/apply-patch+yaml"
        );
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let sent: Value = serde_json::from_slice(&bytes).unwrap();
        let mut answer = sent.clone();
        answer["metadata"]["generation"] = json!(1);
        answer["metadata"]["resourceVersion"] = json!("1");
        if !status.is_null() {
            answer["status"] = status;
        }
        respond(send, 200, &answer);
        sent
    }

    /// Fails on any further request within `ms`.
    pub async fn no_more_calls(&mut self, ms: u64) {
        let wait = std::time::Duration::from_millis(ms);
        if let Ok(Some((req, _))) = tokio::time::timeout(wait, self.0.next_request()).await {
            panic!("unexpected call {} {}", req.method(), req.uri());
        }
    }
}

/// A header map from name/value pairs (repeated names are appended).
pub fn headers(pairs: &[(&'static str, &str)]) -> axum::http::HeaderMap {
    let mut h = axum::http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, axum::http::HeaderValue::from_str(v).unwrap());
    }
    h
}
