//! Who may call the admin API (`/v1/admin/sessions`): the one bearer token
//! of `--admin-token-file`, or, with `--policy-ref`, whoever the cluster
//! says: the caller's Kubernetes bearer token is checked with a
//! `TokenReview` and authorised with a `SubjectAccessReview` (group
//! `auth.tokenpolicy.io`, resource `tokenpolicies`, subresource `sessions`,
//! the TokenPolicy's name and namespace, verb `list` or `delete`), as
//! kube-rbac-proxy does.
//!
//! Decisions are cached for at most [`DECISION_TTL`], keyed by a digest of
//! the token and the verb (never the token), in a bounded cache: a burst of
//! admin calls is not a burst on the API server. At most
//! [`MAX_REVIEWS_AT_ONCE`] reviews are in flight at once. An API server
//! that cannot be asked is `503 REVIEW_UNAVAILABLE`: never a 200, never a
//! 401 the caller did not earn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::service::error::{ApiError, Code};

/// How long a decision is reused.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Decisions remembered at most.
pub const MAX_CACHED_DECISIONS: usize = 1_024;
/// Reviews asked of the API server at once, at most; more wait their turn.
pub const MAX_REVIEWS_AT_ONCE: usize = 4;
/// Time the API server gets to answer one review.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest bearer token looked at.
pub const MAX_ADMIN_TOKEN_LEN: usize = 16 * 1024;
/// Who `--admin-token-file`'s token is, for the log.
pub const TOKEN_FILE_ADMIN: &str = "admin-token";

/// What the caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `GET`: list sessions.
    List,
    /// `DELETE`: end sessions.
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Delete => "delete",
        }
    }
}

/// The answer of a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The token is the user `username`'s, and RBAC allows the verb.
    Allowed { username: String },
    /// The token is nobody's (garbage, expired, another cluster's).
    Unauthenticated,
    /// The token is `username`'s, and RBAC does not allow the verb.
    Denied { username: String },
}

/// The API server could not be asked (or answered nonsense).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ReviewError(pub String);

/// Asks who a token is and whether they may do `verb` (the API server, or
/// a stand-in in tests).
#[async_trait]
pub trait Reviewer: Send + Sync + 'static {
    async fn review(&self, token: &str, verb: Verb) -> Result<Decision, ReviewError>;
}

/// The reviewer of a TokenPolicy in a cluster.
pub struct KubeReviewer {
    client: kube::Client,
    namespace: String,
    name: String,
}

impl KubeReviewer {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        KubeReviewer {
            client,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

fn api_failure(what: &str, e: kube::Error) -> ReviewError {
    ReviewError(format!("{what}: {e}"))
}

#[async_trait]
impl Reviewer for KubeReviewer {
    async fn review(&self, token: &str, verb: Verb) -> Result<Decision, ReviewError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        use kube::api::{Api, PostParams};

        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let asked = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &asked)
            .await
            .map_err(|e| api_failure("TokenReview", e))?;
        let status = answer.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => {
                user
            }
            _ => {
                tracing::debug!(
                    reason = status.error.as_deref().unwrap_or(""),
                    "admin API: token not authenticated"
                );
                return Ok(Decision::Unauthenticated);
            }
        };
        let username = user.username.clone().unwrap_or_default();
        let access: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let asked = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some("auth.tokenpolicy.io".into()),
                    resource: Some("tokenpolicies".into()),
                    subresource: Some("sessions".into()),
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    verb: Some(verb.as_str().into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = access
            .create(&PostParams::default(), &asked)
            .await
            .map_err(|e| api_failure("SubjectAccessReview", e))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        Ok(if allowed {
            Decision::Allowed { username }
        } else {
            Decision::Denied { username }
        })
    }
}

type DecisionKey = ([u8; 32], Verb);

/// Who may call the admin API.
pub enum AdminAuth {
    /// `--admin-token-file`: a digest of the one token (compared in
    /// constant time, digest to digest).
    Token([u8; 32]),
    /// `--policy-ref`: the API server decides.
    Reviewed {
        reviewer: Arc<dyn Reviewer>,
        cache: quick_cache::sync::Cache<DecisionKey, (Instant, Decision)>,
        at_once: tokio::sync::Semaphore,
    },
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdminAuth::Token(_) => "AdminAuth::Token",
            AdminAuth::Reviewed { .. } => "AdminAuth::Reviewed",
        })
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        Code::AdminUnauthenticated,
        "the admin API needs a bearer token that the cluster (or --admin-token-file) knows",
    )
}

impl AdminAuth {
    /// The admin token (trailing line break ignored; an empty one refused).
    pub fn token(token: &str) -> Result<AdminAuth, &'static str> {
        let token = token.trim_end_matches(['\r', '\n']);
        if token.is_empty() {
            return Err("empty");
        }
        if token.len() > MAX_ADMIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
            return Err("not one bearer token: longer than 16 KiB, or holds white space");
        }
        Ok(AdminAuth::Token(digest(token)))
    }

    pub fn reviewed(reviewer: Arc<dyn Reviewer>) -> AdminAuth {
        AdminAuth::Reviewed {
            reviewer,
            cache: quick_cache::sync::Cache::new(MAX_CACHED_DECISIONS),
            at_once: tokio::sync::Semaphore::new(MAX_REVIEWS_AT_ONCE),
        }
    }

    /// Who the holder of `token` is, if they may do `verb`: their name, or
    /// `401 ADMIN_UNAUTHENTICATED`, `403 ADMIN_FORBIDDEN`, `503 REVIEW_UNAVAILABLE`.
    pub async fn authorize(&self, token: &str, verb: Verb) -> Result<String, ApiError> {
        if token.is_empty() || token.len() > MAX_ADMIN_TOKEN_LEN {
            return Err(unauthenticated());
        }
        match self {
            AdminAuth::Token(expected) => {
                if bool::from(digest(token).ct_eq(expected)) {
                    Ok(TOKEN_FILE_ADMIN.to_string())
                } else {
                    Err(unauthenticated())
                }
            }
            AdminAuth::Reviewed {
                reviewer,
                cache,
                at_once,
            } => {
                let key = (digest(token), verb);
                let cached = cache
                    .get(&key)
                    .filter(|(at, _)| at.elapsed() < DECISION_TTL)
                    .map(|(_, d)| d);
                let decision = match cached {
                    Some(d) => d,
                    None => {
                        let _turn = tokio::time::timeout(REVIEW_TIMEOUT, at_once.acquire())
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .ok_or_else(|| unavailable("too many reviews waiting"))?;
                        let d = tokio::time::timeout(REVIEW_TIMEOUT, reviewer.review(token, verb))
                            .await
                            .map_err(|_| unavailable("the API server did not answer in time"))?
                            .map_err(|e| unavailable(&e.0))?;
                        cache.insert(key, (Instant::now(), d.clone()));
                        d
                    }
                };
                match decision {
                    Decision::Allowed { username } => Ok(username),
                    Decision::Unauthenticated => Err(unauthenticated()),
                    Decision::Denied { username } => Err(ApiError::new(
                        Code::AdminForbidden,
                        format!(
                            "{username} may not {} tokenpolicies/sessions of this TokenPolicy",
                            verb.as_str()
                        ),
                    )),
                }
            }
        }
    }
}

fn unavailable(why: &str) -> ApiError {
    tracing::warn!(reason = %why, "admin API: cannot ask the API server");
    ApiError::new(
        Code::ReviewUnavailable,
        "the Kubernetes API server cannot review the token now; try again shortly",
    )
    .retry_after(1)
}

#[cfg(test)]
mod tests {
    //! The reviews as the API server sees them (a mock API server: each
    //! request checked, answered as Kubernetes would).
    use super::*;
    use crate::testing::api_server::{api_status, mock_client};
    use serde_json::{Value, json};

    const TR: &str = "/apis/authentication.k8s.io/v1/tokenreviews?";
    const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews?";

    fn reviewed(user: Value) -> Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
               "spec": {"token": "t"}, "status": user})
    }

    fn access(allowed: bool) -> Value {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
               "metadata": {}, "spec": {}, "status": {"allowed": allowed}})
    }

    #[tokio::test]
    async fn the_token_is_reviewed_then_its_holder_authorised_on_sessions_of_this_policy() {
        let (client, mut api) = mock_client();
        let scenario = tokio::spawn(async move {
            let sent = api
                .expect(
                    "POST",
                    TR,
                    201,
                    reviewed(json!({"authenticated": true, "user": {
                        "username": "system:serviceaccount:ops:oncall", "uid": "u-1",
                        "groups": ["system:serviceaccounts", "oncall"],
                        "extra": {"authentication.kubernetes.io/pod-name": ["p"]}}})),
                )
                .await;
            assert_eq!(sent["spec"]["token"], "the-token");
            let sent = api.expect("POST", SAR, 201, access(true)).await;
            assert_eq!(sent["spec"]["user"], "system:serviceaccount:ops:oncall");
            assert_eq!(sent["spec"]["uid"], "u-1");
            assert_eq!(
                sent["spec"]["groups"],
                json!(["system:serviceaccounts", "oncall"])
            );
            assert_eq!(
                sent["spec"]["extra"],
                json!({"authentication.kubernetes.io/pod-name": ["p"]})
            );
            assert_eq!(
                sent["spec"]["resourceAttributes"],
                json!({"group": "auth.tokenpolicy.io", "resource": "tokenpolicies",
                       "subresource": "sessions", "name": "short-term", "namespace": "auth",
                       "verb": "delete"})
            );
            // Denied by RBAC.
            api.expect(
                "POST",
                TR,
                201,
                reviewed(json!({"authenticated": true, "user": {"username": "bob"}})),
            )
            .await;
            let sent = api.expect("POST", SAR, 201, access(false)).await;
            assert_eq!(sent["spec"]["resourceAttributes"]["verb"], "list");
            // Not authenticated: no access review at all.
            api.expect(
                "POST",
                TR,
                201,
                reviewed(json!({"authenticated": false, "error": "invalid bearer token"})),
            )
            .await;
            // The API server failing is no decision.
            api.expect(
                "POST",
                TR,
                500,
                api_status(500, "InternalError", "etcd away"),
            )
            .await;
            api.expect(
                "POST",
                TR,
                201,
                reviewed(json!({"authenticated": true, "user": {"username": "carol"}})),
            )
            .await;
            api.expect(
                "POST",
                SAR,
                403,
                api_status(403, "Forbidden", "cannot create subjectaccessreviews"),
            )
            .await;
            api.no_more_calls(100).await;
        });
        let r = KubeReviewer::new(client, "auth", "short-term");
        assert_eq!(
            r.review("the-token", Verb::Delete).await.unwrap(),
            Decision::Allowed {
                username: "system:serviceaccount:ops:oncall".into()
            }
        );
        assert_eq!(
            r.review("t2", Verb::List).await.unwrap(),
            Decision::Denied {
                username: "bob".into()
            }
        );
        assert_eq!(
            r.review("t3", Verb::List).await.unwrap(),
            Decision::Unauthenticated
        );
        assert!(r.review("t4", Verb::List).await.is_err());
        // Our own ServiceAccount lacking the grant: unavailable, not a 403 of the caller's.
        assert!(r.review("t5", Verb::List).await.is_err());
        scenario.await.unwrap();
    }

    #[tokio::test]
    async fn an_api_server_that_fails_is_503_and_not_remembered() {
        let (client, mut api) = mock_client();
        let scenario = tokio::spawn(async move {
            for _ in 0..2 {
                api.expect(
                    "POST",
                    TR,
                    503,
                    api_status(503, "ServiceUnavailable", "away"),
                )
                .await;
            }
        });
        let auth = AdminAuth::reviewed(Arc::new(KubeReviewer::new(client, "auth", "p")));
        for _ in 0..2 {
            let e = auth.authorize("tok", Verb::List).await.unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.retry_after),
                ("REVIEW_UNAVAILABLE", Some(1))
            );
        }
        scenario.await.unwrap();
    }
}
