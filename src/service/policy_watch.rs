//! `serve --policy-ref NAMESPACE/NAME`: the token service follows its
//! TokenPolicy in the cluster, so that a changed duration applies to the
//! next request, without a restart and without dropping a session.

use std::sync::Arc;

use anyhow::Context as _;
use futures_util::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::crd::TokenPolicy;
use crate::policy::Policy;
use crate::service::session::TokenService;

/// `NAMESPACE/NAME`, each a DNS-1123 name.
pub fn parse_ref(s: &str) -> Result<(String, String), String> {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && part.as_bytes()[0].is_ascii_alphanumeric()
            && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric()
    };
    match s.split_once('/') {
        Some((ns, name)) if ok(ns) && ok(name) => Ok((ns.to_string(), name.to_string())),
        _ => Err(format!(
            "--policy-ref {s:?}: expected NAMESPACE/NAME (lowercase DNS names)"
        )),
    }
}

/// Reads the TokenPolicy once at start: a missing or invalid one stops the
/// service from starting rather than letting it run a policy nobody wrote.
pub async fn initial(client: Client, ns: &str, name: &str) -> anyhow::Result<Policy> {
    let api: Api<TokenPolicy> = Api::namespaced(client, ns);
    let tp = match api.get_opt(name).await {
        Ok(Some(tp)) => tp,
        Ok(None) => {
            anyhow::bail!("TokenPolicy {ns}/{name} not found: create it, or correct --policy-ref")
        }
        Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
            "not allowed to read TokenPolicy {ns}/{name}: the service account needs get, list and watch on tokenpolicies (the operator's Role grants them)"
        ),
        Err(e) => return Err(e).with_context(|| format!("reading TokenPolicy {ns}/{name}")),
    };
    Policy::from_spec(&tp.spec).with_context(|| format!("TokenPolicy {ns}/{name}"))
}

/// Applies one observed version of the object to the running service.
fn observe(service: &TokenService, tp: &TokenPolicy, key: &str) {
    match Policy::from_spec(&tp.spec) {
        Ok(next) if *service.policy() == next => {}
        Ok(next) => {
            let current = service.policy();
            if next.issuer != current.issuer || next.audience != current.audience {
                tracing::warn!(policy = %key, "issuer/audience changes apply at the next restart");
            }
            tracing::info!(policy = %key, summary = %next.summary(), "policy changed");
            service.set_policy(next);
        }
        Err(e) => {
            tracing::error!(policy = %key, error = %e, "policy change refused; keeping the previous policy")
        }
    }
}

/// Follows the TokenPolicy until the process ends. Watch errors are retried
/// with backoff; a deleted object leaves the last policy in force.
pub async fn follow(client: Client, ns: String, name: String, service: Arc<TokenService>) {
    let key = format!("{ns}/{name}");
    let api: Api<TokenPolicy> = Api::namespaced(client, &ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(tp) | watcher::Event::InitApply(tp)) => {
                observe(&service, &tp, &key)
            }
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!(policy = %key, "TokenPolicy deleted; keeping the last policy")
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(e) => {
                tracing::warn!(policy = %key, error = %e, "watching the TokenPolicy failed; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Millis;
    use crate::crd::TokenPolicySpec;
    use crate::testing::api_server::{ApiServer, mock_client, not_found};
    use http::Response;
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::time::Duration;
    use tokio::sync::oneshot;

    const LIST: &str = "/apis/auth.tokenpolicy.io/v1alpha1/namespaces/team/tokenpolicies?&fieldSelector=metadata.name%3Ddemo&limit=500";
    const WATCH: &str = "/apis/auth.tokenpolicy.io/v1alpha1/namespaces/team/tokenpolicies?&watch=true&timeoutSeconds=290&fieldSelector=metadata.name%3Ddemo&allowWatchBookmarks=true&resourceVersion=10";

    fn object(session: &str, token: &str, rv: &str) -> Value {
        let mut tp = TokenPolicy::new(
            "demo",
            TokenPolicySpec {
                session_expiration_time: session.into(),
                token_expiration_time: token.into(),
                expired_token_renew_limit: "0s".into(),
                ..Default::default()
            },
        );
        tp.metadata.namespace = Some("team".into());
        tp.metadata.resource_version = Some(rv.into());
        serde_json::to_value(tp).unwrap()
    }

    /// Plays the API server for the watcher: the list, then one watch whose
    /// stream carries `events` (newline-delimited, as the API server sends).
    /// `consumed` fires when the watcher comes back for more, i.e. after it
    /// has read every event of the stream.
    async fn serve_watch(
        mut server: ApiServer,
        initial: Value,
        events: Vec<Value>,
        consumed: oneshot::Sender<()>,
    ) {
        let list = json!({"apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicyList",
                          "metadata": {"resourceVersion": "10"}, "items": [initial]});
        server.expect("GET", LIST, 200, list).await;
        let (req, send) = server.0.next_request().await.expect("watch");
        assert_eq!(req.uri().to_string(), WATCH);
        let mut body = Vec::new();
        for e in events {
            body.extend(serde_json::to_vec(&e).unwrap());
            body.push(b'\n');
        }
        send.send_response(Response::builder().body(Body::from(body)).unwrap());
        // The watcher watches again when the stream ends; leave that one open.
        let _again = server.0.next_request().await;
        let _ = consumed.send(());
        std::future::pending::<()>().await;
    }

    /// A service following a mock TokenPolicy; the tasks stop when dropped.
    struct Following {
        service: Arc<TokenService>,
        consumed: oneshot::Receiver<()>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Following {
        fn start(service: Arc<TokenService>, initial: Value, events: Vec<Value>) -> Self {
            let (client, server) = mock_client();
            let (tx, consumed) = oneshot::channel();
            let tasks = vec![
                tokio::spawn(serve_watch(server, initial, events, tx)),
                tokio::spawn(follow(
                    client,
                    "team".into(),
                    "demo".into(),
                    service.clone(),
                )),
            ];
            Following {
                service,
                consumed,
                tasks,
            }
        }

        /// Waits until the watcher has read every event.
        async fn consumed(&mut self) {
            tokio::time::timeout(Duration::from_secs(2), &mut self.consumed)
                .await
                .expect("the watcher did not read the stream")
                .unwrap();
        }

        fn times(&self) -> (u64, u64) {
            let p = self.service.policy();
            (p.session, p.token)
        }
    }

    impl Drop for Following {
        fn drop(&mut self) {
            self.tasks.iter().for_each(|t| t.abort());
        }
    }

    fn service() -> Arc<TokenService> {
        let users = crate::service::users::Users::parse(
            &format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
            "t",
        )
        .unwrap();
        let s = crate::testing::service().build();
        s.set_users(users);
        Arc::new(s)
    }

    const T0: Millis = 1_800_000_000_000;

    #[tokio::test]
    async fn a_changed_policy_changes_the_running_services_decisions() {
        let service = service();
        let token = service
            .login("alice", "pw", None, || T0)
            .await
            .unwrap()
            .token;
        let modified = json!({"type": "MODIFIED", "object": object("1m", "1m", "12")});
        let mut f = Following::start(service.clone(), object("8h", "30m", "11"), vec![modified]);
        f.consumed().await;
        assert_eq!(f.times(), (60, 60));
        // 90 s after login: valid under 8h/30m, but the new policy (session 1m)
        // ended that session at T0 + 60 s.
        let err = service
            .verify(&token, false, T0 + 90_000)
            .await
            .unwrap_err();
        assert_eq!(err.code.as_str(), "EXPIRED_SESSION");
        assert!(service.verify(&token, false, T0 + 30_000).await.is_ok());
    }

    #[tokio::test]
    async fn the_initial_list_applies_and_an_invalid_change_is_refused() {
        // Token longer than session: refused.
        let invalid = json!({"type": "MODIFIED", "object": object("1h", "2h", "12")});
        let mut f = Following::start(service(), object("2h", "15m", "11"), vec![invalid]);
        f.consumed().await;
        // The listed 2h/15m policy replaced the service's 8h/30m, and stays.
        assert_eq!(f.times(), (7_200, 900));
    }

    #[tokio::test]
    async fn fields_from_a_newer_crd_do_not_stop_the_service() {
        // The CRD in the cluster may be newer than this image: a spec field we
        // do not know is ignored, not a reason to stop following the policy.
        let mut newer = object("4h", "20m", "12");
        newer["spec"]["someFutureField"] = json!({"enabled": true});
        let modified = json!({"type": "MODIFIED", "object": newer});
        let mut f = Following::start(service(), object("2h", "15m", "11"), vec![modified]);
        f.consumed().await;
        assert_eq!(f.times(), (14_400, 1_200));
    }

    #[tokio::test]
    async fn initial_read_names_what_is_wrong() {
        let (client, mut api) = mock_client();
        let server = tokio::spawn(async move {
            let uri = "/apis/auth.tokenpolicy.io/v1alpha1/namespaces/team/tokenpolicies/demo";
            api.expect("GET", uri, 404, not_found("tokenpolicies", "demo"))
                .await;
            api.expect("GET", uri, 200, object("1h", "2h", "1")).await;
        });
        let err = initial(client.clone(), "team", "demo").await.unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "TokenPolicy team/demo not found: create it, or correct --policy-ref"
        );
        let err = initial(client, "team", "demo").await.unwrap_err();
        assert!(
            format!("{err:#}").contains("tokenExpirationTime: must not be longer"),
            "{err:#}"
        );
        server.await.unwrap();
    }

    #[test]
    fn policy_refs() {
        assert_eq!(parse_ref("team/demo"), Ok(("team".into(), "demo".into())));
        assert_eq!(parse_ref("a-1/b.c"), Ok(("a-1".into(), "b.c".into())));
        for bad in [
            "demo",
            "/demo",
            "team/",
            "Team/demo",
            "team/demo/x",
            "team/-demo",
            "a b/c",
        ] {
            assert!(parse_ref(bad).is_err(), "{bad}");
        }
    }
}
