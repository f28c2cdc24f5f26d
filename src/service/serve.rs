//! `tokenpolicy serve`: builds the service from its flags and runs it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::http::HeaderName;
use tokio::sync::watch;

use crate::duration::parse_seconds;
use crate::policy::Policy;
use crate::service::admin::{AdminAuth, KubeReviewer};
use crate::service::http::oidc::OidcLogin;
use crate::service::http::{
    App, HttpConfig, TrustedProxies, admin_router, forward_auth_router, public_router, router,
};
use crate::service::jwt::{Key, KeySet};
use crate::service::listen::{self, Draining, Limits};
use crate::service::oidc::Provider;
use crate::service::oidc::flow::Sealer;
use crate::service::oidc::recheck::ProviderSessions;
use crate::service::oidc::vault::Vault;
use crate::service::session::{Throttle, TokenService};
use crate::service::store::provider::{MemoryProviderStore, ProviderStore};
use crate::service::store::redis::RedisTls;
use crate::service::store::{MemoryStore, OneTimeStore, RedisStore};
use crate::service::users::Users;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TokenPolicy YAML (the cluster schema). Without it: the recommended defaults.
    #[arg(long, env = "TOKENPOLICY_POLICY")]
    pub policy: Option<PathBuf>,
    /// Follow a TokenPolicy in the cluster instead (`NAMESPACE/NAME`): a
    /// change applies to the next request, without a restart.
    #[arg(long, env = "TOKENPOLICY_POLICY_REF", conflicts_with = "policy")]
    pub policy_ref: Option<String>,
    /// Without a cluster: a file holding the one bearer token that may call
    /// the admin API (`/v1/admin/sessions`; trailing newline ignored). With
    /// --policy-ref the cluster decides instead (TokenReview and
    /// SubjectAccessReview); with neither, the admin API answers 404.
    #[arg(
        long,
        env = "TOKENPOLICY_ADMIN_TOKEN_FILE",
        conflicts_with = "policy_ref"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// Users file: `name:hash` lines (bcrypt `$2y$` or argon2id).
    #[arg(long, env = "TOKENPOLICY_USERS")]
    pub users: Option<PathBuf>,
    #[arg(long, env = "TOKENPOLICY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A second address for /healthz, /readyz and /metrics (kubelet probes
    /// and the metrics scraper), with connection slots of its own: a flood
    /// on --listen cannot fail the probes. /metrics is then served here
    /// only. Unset: all on --listen.
    #[arg(long, env = "TOKENPOLICY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// An address for /v1/verify (and /v1/verify/...) only, with connection
    /// slots of their own and the same limits as --listen: point the
    /// ingress controller's auth URL here, and a flood of the public routes
    /// on --listen cannot take verify's slots. --listen keeps serving
    /// verify too. The two listeners share the cap that the open-files and
    /// memory limits set (half each).
    #[arg(long, env = "TOKENPOLICY_FORWARD_AUTH_LISTEN")]
    pub forward_auth_listen: Option<SocketAddr>,
    /// With --forward-auth-listen: everything on --listen (verify there
    /// included) runs on threads of its own this much nicer than the rest
    /// (0-19; 0: on the same threads as forward-auth). Under a CPU-bound
    /// flood of the public routes, forward-auth keeps the CPU it needs and
    /// the public routes get what is left.
    #[arg(
        long,
        env = "TOKENPOLICY_PUBLIC_NICENESS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u8).range(0..=19)
    )]
    pub public_niceness: u8,
    /// Redis URL shared by all replicas: `redis://[:password@]host:port[/db]`,
    /// `redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME` or
    /// `redis+cluster://[:password@]host:port[,host:port...]` (`rediss` for TLS).
    /// Without it: an in-process store, for one replica only.
    #[arg(long, env = "TOKENPOLICY_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// `rediss`: PEM certificate authorities to trust instead of the system's
    /// bundle (a private CA, as managed Redis services often use).
    #[arg(long, env = "TOKENPOLICY_REDIS_CA_FILE", requires = "redis")]
    pub redis_ca_file: Option<PathBuf>,
    /// `rediss`: PEM client certificate (chain), for a Redis that asks
    /// clients for one (`tls-auth-clients`). Needs --redis-client-key.
    #[arg(long, env = "TOKENPOLICY_REDIS_CLIENT_CERT", requires_all = ["redis_client_key", "redis"])]
    pub redis_client_cert: Option<PathBuf>,
    /// `rediss`: the client certificate's PEM private key.
    #[arg(
        long,
        env = "TOKENPOLICY_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,
    /// With `spec.oidc`: a file holding the OpenID Connect client secret
    /// (trailing newline ignored). Never in the policy or on the command line.
    #[arg(long, env = "TOKENPOLICY_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// With `spec.oidc`: PEM certificate authorities to trust for the
    /// provider instead of the system's bundle (a private CA).
    #[arg(long, env = "TOKENPOLICY_OIDC_CA_FILE")]
    pub oidc_ca_file: Option<PathBuf>,
    /// Key prefix in Redis, so that several policies can share one Redis.
    #[arg(long, env = "TOKENPOLICY_REDIS_PREFIX", default_value = "tokenpolicy")]
    pub redis_prefix: String,
    /// PKCS#8 PEM private key (Ed25519 or P-256). The first signs; all verify.
    #[arg(
        long = "signing-key",
        env = "TOKENPOLICY_SIGNING_KEY",
        value_delimiter = ','
    )]
    pub signing_keys: Vec<PathBuf>,
    /// A directory holding the key ring the operator writes: `signing.pem`
    /// signs; `next.pem` and `previous.pem`, when present, verify.
    #[arg(
        long,
        env = "TOKENPOLICY_SIGNING_KEYS_DIR",
        conflicts_with = "signing_keys"
    )]
    pub signing_keys_dir: Option<PathBuf>,
    /// `iss` of issued tokens (default: the policy's, else `tokenpolicy`).
    #[arg(long, env = "TOKENPOLICY_ISSUER")]
    pub issuer: Option<String>,
    /// `aud` of issued tokens (default: the policy's, else `tokenpolicy`).
    #[arg(long, env = "TOKENPOLICY_AUDIENCE")]
    pub audience: Option<String>,
    /// Clock skew tolerated on `iat`/`exp` between replicas.
    #[arg(long, env = "TOKENPOLICY_LEEWAY", default_value = "0s", value_parser = leeway_flag)]
    pub leeway: Duration,
    /// Also read the token from this request header.
    #[arg(long, env = "TOKENPOLICY_TOKEN_HEADER")]
    pub token_header: Option<String>,
    /// Proxies whose X-Forwarded-For entries give the client address (for
    /// login throttling): address ranges (CIDR) or addresses, comma
    /// separated, e.g. your ingress controllers' pod range. On a connection
    /// from one of them, the nearest X-Forwarded-For hop that is not one
    /// is the client; from anyone else the header is ignored.
    #[arg(long, env = "TOKENPOLICY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Take the client's host, scheme and path from X-Forwarded-Host,
    /// -Proto and -Uri (for `rd` checks, the CSRF check and redirect mode).
    /// Only behind a proxy that sets them itself, never passing the
    /// client's own: otherwise a client can make `rd` point anywhere.
    #[arg(long, env = "TOKENPOLICY_TRUST_FORWARDED_HEADERS")]
    pub trust_forwarded_headers: bool,
    /// Time a connection may take to send a request's headers; also how
    /// long an idle kept-alive connection stays open.
    #[arg(long, env = "TOKENPOLICY_HEADER_TIMEOUT", default_value = "10s", value_parser = timeout_flag)]
    pub header_timeout: Duration,
    /// Time a request may take, its body included, before a 408.
    #[arg(long, env = "TOKENPOLICY_REQUEST_TIMEOUT", default_value = "30s", value_parser = timeout_flag)]
    pub request_timeout: Duration,
    /// Open client connections at most (lowered to fit the open-files limit
    /// and, at 80 KiB each at worst, a quarter of the memory limit).
    #[arg(long, env = "TOKENPOLICY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Open connections of one client address (IPv6: of one /64) at most;
    /// more are closed at once. Behind a proxy the client is the proxy:
    /// keep it above the connections each proxy instance keeps open.
    #[arg(
        long,
        env = "TOKENPOLICY_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 256
    )]
    pub max_connections_per_client: usize,
    /// A connection older than this is closed after its current request
    /// (0s: never).
    #[arg(long, env = "TOKENPOLICY_MAX_CONNECTION_AGE", default_value = "10m", value_parser = duration_flag)]
    pub max_connection_age: Duration,
    /// Requests on one connection at most: the last answer says
    /// `Connection: close` (0: no limit).
    #[arg(
        long,
        env = "TOKENPOLICY_MAX_REQUESTS_PER_CONNECTION",
        default_value_t = 10_000
    )]
    pub max_requests_per_connection: u64,
    /// After SIGTERM: time to keep serving with /readyz unready, so that
    /// load balancers stop sending new requests.
    #[arg(long, env = "TOKENPOLICY_SHUTDOWN_DELAY", default_value = "1s", value_parser = duration_flag)]
    pub shutdown_delay: Duration,
    /// Then: time in-flight requests get to finish before the process exits.
    #[arg(long, env = "TOKENPOLICY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = duration_flag)]
    pub shutdown_timeout: Duration,
    /// Do not renew expired tokens on /v1/verify (for proxies that drop the
    /// Set-Cookie of a successful check; clients then call /v1/refresh).
    #[arg(long, env = "TOKENPOLICY_NO_RENEW_ON_VERIFY")]
    pub no_renew_on_verify: bool,
    /// Redirect mode for browsers: 302 to this sign-in URL instead of 401
    /// (not for ingress-nginx, whose auth-signin does the redirect).
    #[arg(long, env = "TOKENPOLICY_SIGNIN_URL")]
    pub signin_url: Option<String>,
    /// Domains that `rd` may point to (`.example.com` for all subdomains).
    #[arg(
        long = "redirect-domain",
        env = "TOKENPOLICY_REDIRECT_DOMAINS",
        value_delimiter = ','
    )]
    pub redirect_domains: Vec<String>,
    /// Let `rd` and `Origin` name any port of this host or of a
    /// --redirect-domain (the scheme must still match). Without it the
    /// port must be the one the client used.
    #[arg(long, env = "TOKENPOLICY_REDIRECT_ANY_PORT")]
    pub redirect_any_port: bool,
    #[arg(
        long,
        env = "TOKENPOLICY_MAX_FAILED_LOGINS_PER_USER",
        default_value_t = 5
    )]
    pub max_failed_logins_per_user: u64,
    #[arg(
        long,
        env = "TOKENPOLICY_MAX_FAILED_LOGINS_PER_ADDRESS",
        default_value_t = 20
    )]
    pub max_failed_logins_per_address: u64,
    #[arg(long, env = "TOKENPOLICY_FAILED_LOGIN_WINDOW", default_value = "15m", value_parser = duration_flag)]
    pub failed_login_window: Duration,
    /// Successful logins allowed per user per --login-window; past it, 429
    /// TOO_MANY_ATTEMPTS with Retry-After. Every session may cost a
    /// revocation to keep: this bounds how fast one account makes them.
    #[arg(long, env = "TOKENPOLICY_MAX_LOGINS_PER_USER", default_value_t = 30)]
    pub max_logins_per_user: u64,
    #[arg(long, env = "TOKENPOLICY_LOGIN_WINDOW", default_value = "15m", value_parser = duration_flag)]
    pub login_window: Duration,
    /// Password checks run at once (default: cores, at most 4). Each holds
    /// its hash's memory cost (argon2id default: 19 MiB).
    #[arg(long, env = "TOKENPOLICY_LOGIN_THREADS")]
    pub login_threads: Option<usize>,
    /// The most logins that may wait for a password check at once, however
    /// short their wait (default: 256 per thread); past it, 503
    /// SERVICE_BUSY with Retry-After.
    #[arg(long, env = "TOKENPOLICY_LOGIN_QUEUE")]
    pub login_queue: Option<usize>,
    /// The longest a login may wait for its password check to start (1s to
    /// 60s). One that would wait longer is turned away at once, 503
    /// SERVICE_BUSY with Retry-After (when the line will have drained).
    #[arg(
        long,
        env = "TOKENPOLICY_LOGIN_MAX_WAIT",
        default_value = "3s",
        value_parser = login_wait_flag
    )]
    pub login_max_wait: Duration,
    /// How many verified tokens to remember, so that a token seen before
    /// skips its signature check (0: check every time). Bounds memory: about
    /// 1 KiB per entry (measured by bench/memory.sh).
    #[arg(
        long,
        env = "TOKENPOLICY_VERIFIED_CACHE_SIZE",
        default_value_t = crate::service::verified_cache::DEFAULT_ENTRIES
    )]
    pub verified_cache_size: usize,

    /// With --redis: how many sessions known to be live to remember, so that
    /// their tokens skip a Redis round trip. Past it, other sessions are
    /// asked of Redis on each request. Bounds memory: about 170 bytes per
    /// entry (revocations are bounded apart: --max-cached-revocations).
    #[arg(
        long,
        env = "TOKENPOLICY_SESSION_CACHE_SIZE",
        default_value_t = crate::service::store::redis::DEFAULT_LIVE_SESSIONS
    )]
    pub session_cache_size: usize,

    /// How many revocations to keep in memory (at least 1). Bounds memory:
    /// about 150 bytes per entry (default: about 7.5 MiB). With --redis,
    /// Redis answers for the others. Without it, memory is the only copy:
    /// past the bound, a logout ends all of that user's sessions so far.
    #[arg(
        long,
        env = "TOKENPOLICY_MAX_CACHED_REVOCATIONS",
        default_value_t = crate::service::store::DEFAULT_MAX_REVOCATIONS
    )]
    pub max_cached_revocations: usize,

    /// With --redis: how long a replica that hears nothing from Redis (no
    /// command answered, no heartbeat on its subscription) still vouches for
    /// sessions from memory. Past it they get 503 STORE_UNAVAILABLE, never
    /// 401, until Redis answers again; a logout on another replica reaches
    /// this one within 1 s while connected, at most this long when cut off.
    #[arg(long, env = "TOKENPOLICY_MAX_REVOCATION_LAG", default_value = "10s", value_parser = timeout_flag)]
    pub max_revocation_lag: Duration,
    /// Write the audit trail here: one JSON line per login, renewal,
    /// logout and ended session (see the book's Audit trail page). `-`:
    /// standard output, apart from the diagnostic log (standard error). A
    /// file is appended to (created 0600) and reopened on SIGHUP, for
    /// logrotate. Unset: no trail (its counters are on /metrics either way).
    #[arg(long, env = "TOKENPOLICY_AUDIT_LOG")]
    pub audit_log: Option<String>,
}

/// A duration flag in whole seconds (`10s`, `1m`, the policy's syntax):
/// clap's parser, so that a bad value is an error naming its flag.
fn duration_flag(value: &str) -> Result<Duration, String> {
    parse_seconds(value)
        .map(Duration::from_secs)
        .map_err(|e| e.to_string())
}

/// The most clock skew `--leeway` may tolerate: enough for replicas whose
/// clocks drift between NTP syncs, and short enough that it cannot stand in
/// for the policy's token validity.
pub const MAX_LEEWAY_SECS: u64 = 60;

/// `--leeway`: at most [`MAX_LEEWAY_SECS`].
fn leeway_flag(value: &str) -> Result<Duration, String> {
    let d = duration_flag(value)?;
    if d.as_secs() > MAX_LEEWAY_SECS {
        return Err(format!(
            "at most {MAX_LEEWAY_SECS}s; it tolerates clock skew between replicas, it does not lengthen tokens"
        ));
    }
    Ok(d)
}

/// `--login-max-wait`: 1s to 60s (past a minute, a browser or an ingress
/// has given up on the login anyway).
fn login_wait_flag(value: &str) -> Result<Duration, String> {
    let d = duration_flag(value)?;
    if !(1..=60).contains(&d.as_secs()) {
        return Err("must be 1s to 60s".into());
    }
    Ok(d)
}

/// A timeout flag: at least one second.
fn timeout_flag(value: &str) -> Result<Duration, String> {
    let d = duration_flag(value)?;
    if d.is_zero() {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// A duration in the service's milliseconds.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The `--redis-ca-file` / `--redis-client-*` files, checked to hold what
/// they are for: a file with no certificate would leave nothing to trust.
fn redis_tls(args: &ServeArgs) -> anyhow::Result<RedisTls> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let certificates = |path: &Path, bytes: &[u8]| -> anyhow::Result<()> {
        let n = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", path.display()))?
            .len();
        anyhow::ensure!(n > 0, "{}: no PEM certificate in it", path.display());
        Ok(())
    };
    let mut tls = RedisTls::default();
    if let Some(path) = &args.redis_ca_file {
        let ca = read(path)?;
        certificates(path, &ca).context("--redis-ca-file")?;
        tls.ca = Some(ca);
    }
    if let (Some(cert_path), Some(key_path)) = (&args.redis_client_cert, &args.redis_client_key) {
        let (cert, key) = (read(cert_path)?, read(key_path)?);
        certificates(cert_path, &cert).context("--redis-client-cert")?;
        // The error would quote nothing of the key, but say which file.
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|_| anyhow::anyhow!("{}: no PEM private key in it", key_path.display()))
            .context("--redis-client-key")?;
        tls.client = Some((cert, key));
    }
    Ok(tls)
}

/// The OpenID Connect sign-in of `policy`, if it has `spec.oidc`: the
/// provider (discovered in the background) and the flow cookies' key.
fn oidc_login(
    args: &ServeArgs,
    policy: &Policy,
    keys: &KeySet,
    store: Arc<dyn ProviderStore>,
) -> anyhow::Result<Option<Arc<OidcLogin>>> {
    let Some(config) = policy.oidc.clone() else {
        anyhow::ensure!(
            args.oidc_client_secret_file.is_none() && args.oidc_ca_file.is_none(),
            "--oidc-client-secret-file and --oidc-ca-file need spec.oidc in the policy"
        );
        return Ok(None);
    };
    let external_url = policy
        .external_url
        .as_deref()
        .context("spec.oidc needs spec.externalURL")?;
    let path = args
        .oidc_client_secret_file
        .as_deref()
        .context("spec.oidc needs --oidc-client-secret-file")?;
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("--oidc-client-secret-file: reading {}", path.display()))?;
    let secret = secret.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(
        !secret.is_empty(),
        "--oidc-client-secret-file {}: empty",
        path.display()
    );
    let ca = match &args.oidc_ca_file {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("--oidc-ca-file: reading {}", p.display()))?,
        ),
        None => None,
    };
    let provider =
        Provider::new(config, secret, external_url, ca.as_deref()).with_context(|| match &args
            .oidc_ca_file
        {
            Some(p) => format!("--oidc-ca-file {}", p.display()),
            None => "the system's certificate authorities".into(),
        })?;
    let sealer = Sealer::new(keys.signing_key().to_pem().as_bytes());
    // The provider's refresh tokens are sealed under every key of the ring
    // (the signing key seals): a rotation strands none (see oidc/vault.rs).
    let pems: Vec<(String, String)> = keys
        .keys()
        .iter()
        .map(|k| (k.kid().to_string(), k.to_pem()))
        .collect();
    let vault = Vault::new(pems.iter().map(|(kid, pem)| (kid.as_str(), pem.as_bytes())));
    let provider = Arc::new(provider);
    Ok(Some(Arc::new(OidcLogin {
        sessions: Arc::new(ProviderSessions::new(provider.clone(), vault, store)),
        provider,
        sealer,
    })))
}

/// Who may call the admin API: the cluster (with --policy-ref), the one
/// token of --admin-token-file, or nobody.
fn admin_auth(
    args: &ServeArgs,
    cluster: Option<&(kube::Client, String, String)>,
) -> anyhow::Result<Option<Arc<AdminAuth>>> {
    if let Some((client, ns, name)) = cluster {
        let reviewer = KubeReviewer::new(client.clone(), ns, name);
        return Ok(Some(Arc::new(AdminAuth::reviewed(Arc::new(reviewer)))));
    }
    let Some(path) = &args.admin_token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--admin-token-file: reading {}", path.display()))?;
    let auth = AdminAuth::token(&text)
        .map_err(|why| anyhow::anyhow!("--admin-token-file {}: {why}", path.display()))?;
    Ok(Some(Arc::new(auth)))
}

fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Policy::from_yaml(&text).with_context(|| format!("{}", path.display()))
}

/// Follows the policy and users files: a change applies to the next request
/// without a restart; a broken edit is logged and the last good one stays.
fn watch_files(service: Arc<TokenService>, policy: Option<PathBuf>, users: Option<PathBuf>) {
    tokio::spawn(async move {
        let mut seen_policy = policy.as_deref().and_then(modified);
        let mut seen_users = users.as_deref().and_then(modified);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            if let Some(p) = &policy {
                let now = modified(p);
                if now != seen_policy {
                    seen_policy = now;
                    match load_policy(p) {
                        Ok(next) => {
                            tracing::info!(policy = %next.summary(), "policy reloaded");
                            service.set_policy(next);
                        }
                        Err(e) => tracing::error!(
                            error = format!("{e:#}"),
                            "policy change refused; keeping the previous policy"
                        ),
                    }
                }
            }
            if let Some(u) = &users {
                let now = modified(u);
                if now != seen_users {
                    seen_users = now;
                    match Users::load(u) {
                        Ok(next) => {
                            tracing::info!(users = next.len(), "users reloaded");
                            service.set_users(next);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "users change refused; keeping the previous users")
                        }
                    }
                }
            }
        }
    });
}

/// `tokenpolicy serve`: checks the flags, wires the store, the service and
/// the listeners, follows the files, and serves until SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let flags = check_flags(&args)?;
    let cluster = cluster(&args).await?;
    let admin = admin_auth(&args, cluster.as_ref())?;
    let (service, oidc) = wire_service(&args, cluster.as_ref()).await?;
    let audit_log = service.audit_log().clone();
    let service = Arc::new(service);
    // What a password check costs here, before the first burst of logins.
    tokio::spawn({
        let service = service.clone();
        async move { service.calibrate_logins().await }
    });
    watch_files(service.clone(), args.policy.clone(), args.users.clone());
    if let Some(o) = &oidc {
        o.provider.start();
    }
    if let Some((client, ns, name)) = cluster {
        tokio::spawn(crate::service::policy_watch::follow(
            client,
            ns,
            name,
            service.clone(),
        ));
    }
    let app = Arc::new(App {
        service,
        config: HttpConfig {
            token_header: flags.token_header,
            trusted_proxies: flags.trusted_proxies,
            trust_forwarded_headers: args.trust_forwarded_headers,
            request_timeout: args.request_timeout,
            renew_on_verify: !args.no_renew_on_verify,
            signin_url: args.signin_url.clone(),
            redirect_domains: args.redirect_domains.clone(),
            redirect_any_port: args.redirect_any_port,
            oidc,
            admin,
        },
    });
    serve_listeners(&args, app).await?;
    audit_log.flush(AUDIT_FLUSH);
    tracing::info!("stopped");
    Ok(())
}

/// The flags that clap's types do not check, read before anything starts.
struct Flags {
    token_header: Option<HeaderName>,
    trusted_proxies: TrustedProxies,
}

fn check_flags(args: &ServeArgs) -> anyhow::Result<Flags> {
    let token_header = match &args.token_header {
        Some(h) => Some(
            HeaderName::try_from(h.as_str()).with_context(|| format!("--token-header {h:?}"))?,
        ),
        None => None,
    };
    if let Some(s) = &args.signin_url {
        url::Url::parse(s)
            .map(|_| ())
            .or_else(|e| if s.starts_with('/') { Ok(()) } else { Err(e) })
            .with_context(|| format!("--signin-url {s:?}"))?;
    }
    let trusted_proxies = TrustedProxies::parse(&args.trusted_proxies)
        .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))?;
    Ok(Flags {
        token_header,
        trusted_proxies,
    })
}

/// The cluster `--policy-ref` names: a client, the namespace and the name.
type Cluster = (kube::Client, String, String);

async fn cluster(args: &ServeArgs) -> anyhow::Result<Option<Cluster>> {
    Ok(match &args.policy_ref {
        Some(r) => {
            let (ns, name) =
                crate::service::policy_watch::parse_ref(r).map_err(anyhow::Error::msg)?;
            let client = kube::Client::try_default().await.context(
                "--policy-ref needs a Kubernetes configuration (in-cluster or KUBECONFIG)",
            )?;
            Some((client, ns, name))
        }
        None => None,
    })
}

/// The policy, users, keys and store, and the token service over them
/// (with its OpenID Connect sign-in, when the policy has one).
async fn wire_service(
    args: &ServeArgs,
    cluster: Option<&Cluster>,
) -> anyhow::Result<(TokenService, Option<Arc<OidcLogin>>)> {
    let policy = match (&args.policy, cluster) {
        (_, Some((client, ns, name))) => {
            crate::service::policy_watch::initial(client.clone(), ns, name).await?
        }
        (Some(p), None) => load_policy(p)?,
        (None, None) => {
            tracing::warn!("no --policy given: using the recommended defaults");
            Policy::default()
        }
    };
    let users = match &args.users {
        Some(p) => Users::load(p)?,
        None => Users::default(),
    };
    if users.is_empty() && policy.oidc.is_none() {
        tracing::warn!("no users: nobody can log in (see --users and `tokenpolicy hash-password`)");
    }
    let key_files: Vec<PathBuf> = match &args.signing_keys_dir {
        Some(dir) => crate::keyring::files(dir),
        None => args.signing_keys.clone(),
    };
    let keys = if key_files.is_empty() {
        tracing::warn!(
            "no --signing-key: generated a key in memory; tokens die with this process and other replicas cannot verify them"
        );
        vec![Key::generate()]
    } else {
        KeySet::load(&key_files)?
    };
    let issuer = args
        .issuer
        .clone()
        .or_else(|| policy.issuer.clone())
        .unwrap_or_else(|| "tokenpolicy".into());
    let audience = args
        .audience
        .clone()
        .or_else(|| policy.audience.clone())
        .unwrap_or_else(|| "tokenpolicy".into());
    let keys = KeySet::new(keys, &issuer, &audience)?;
    let (store, provider_store): (Arc<dyn OneTimeStore>, Arc<dyn ProviderStore>) = match &args.redis
    {
        Some(url) => {
            let redis = Arc::new(
                RedisStore::with_tls(url, &args.redis_prefix, &redis_tls(args)?)?
                    .with_live_session_limit(args.session_cache_size)
                    .with_revocation_limit(args.max_cached_revocations)
                    .with_max_revocation_lag(args.max_revocation_lag),
            );
            (redis.clone(), redis)
        }
        None => (
            Arc::new(MemoryStore::new().with_revocation_limit(args.max_cached_revocations)),
            Arc::new(MemoryProviderStore::new()),
        ),
    };
    let oidc = oidc_login(args, &policy, &keys, provider_store)?;
    let throttle = Throttle {
        max_per_user: args.max_failed_logins_per_user,
        max_per_address: args.max_failed_logins_per_address,
        window: millis(args.failed_login_window),
        max_logins_per_user: args.max_logins_per_user,
        login_window: millis(args.login_window),
    };
    tracing::info!(
        policy = %policy.summary(),
        store = %store.describe(),
        signing_key = %keys.signing_key().kid(),
        verify_keys = key_files.len().max(1),
        users = users.len(),
        oidc = policy.oidc.as_ref().map_or("", |o| o.issuer_url.as_str()),
        "starting token service"
    );
    let login_threads = args
        .login_threads
        .unwrap_or_else(crate::service::hashing::HashPool::default_threads)
        .max(1);
    let login_queue = args
        .login_queue
        .unwrap_or_else(|| crate::service::hashing::HashPool::default_queue(login_threads));
    let mut service = TokenService::new(policy, users, keys, store, millis(args.leeway), throttle)
        .with_login_capacity(login_threads, login_queue, args.login_max_wait)
        .with_verified_cache(args.verified_cache_size);
    if let Some(o) = &oidc {
        service = service.with_provider_check(o.sessions.clone());
    }
    if let Some(target) = &args.audit_log {
        let log = crate::service::audit::AuditLog::open(target, &service.metrics.audit)?;
        log.reopen_on_sighup();
        tracing::info!(audit_log = %target, "audit trail on");
        service = service.with_audit_log(log);
    }
    Ok((service, oidc))
}

/// Binds `--listen` (and `--forward-auth-listen`, `--metrics-listen`) and
/// serves `app` on them until the shutdown signal has drained them.
async fn serve_listeners(args: &ServeArgs, app: Arc<App>) -> anyhow::Result<()> {
    let fd_limit = listen::raise_fd_limit();
    let memory_limit = listen::memory_limit();
    // A forward-auth listener takes its connections from the same
    // descriptors and memory: each listener gets half of what they allow.
    let (fd_share, memory_share) = match args.forward_auth_listen {
        Some(_) => (
            fd_limit.map(|n| listen::FD_RESERVE + n.saturating_sub(listen::FD_RESERVE) / 2),
            memory_limit.map(|m| m / 2),
        ),
        None => (fd_limit, memory_limit),
    };
    let max_connections = listen::connection_cap(args.max_connections, fd_share, memory_share);
    let age = args.max_connection_age;
    let limits = Limits {
        header_timeout: args.header_timeout,
        max_connections,
        max_connections_per_client: args.max_connections_per_client.min(max_connections),
        max_connection_age: (!age.is_zero()).then_some(age),
        max_requests_per_connection: (args.max_requests_per_connection > 0)
            .then_some(args.max_requests_per_connection),
        shutdown_delay: args.shutdown_delay,
        shutdown_timeout: args.shutdown_timeout,
    };
    if limits.max_connections < args.max_connections {
        tracing::warn!(
            max_connections = limits.max_connections,
            open_files_limit = fd_limit,
            memory_limit_bytes = memory_limit,
            forward_auth_listener = args.forward_auth_listen.is_some(),
            "--max-connections lowered to fit the open-files and memory limits"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(address = %args.listen, max_connections = limits.max_connections, "listening");
    let forward_auth_listener = match args.forward_auth_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} (--forward-auth-listen)"))?;
            tracing::info!(address = %addr, max_connections = limits.max_connections, "forward-auth listening");
            Some(l)
        }
        None => None,
    };
    let metrics_listener = match args.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} (--metrics-listen)"))?;
            tracing::info!(address = %addr, "probes and metrics listening");
            Some(l)
        }
        None => None,
    };
    let draining = Draining::default();
    let with_draining = |r: axum::Router| r.layer(axum::Extension(draining.clone()));

    // The shutdown signal reaches every client-facing listener at once:
    // each keeps serving for the shutdown delay, then drains.
    let (stopping, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown().await;
        let _ = stopping.send(true);
    });
    let signal = move || {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let mut fronts = tokio::task::JoinSet::new();
    // With a forward-auth listener, --listen's routes yield the CPU to it.
    let public_niceness = match forward_auth_listener {
        Some(_) => i32::from(args.public_niceness),
        None => 0,
    };
    if let Some(l) = forward_auth_listener {
        fronts.spawn(listen::serve(
            l,
            with_draining(forward_auth_router(app.clone())),
            limits.clone(),
            draining.clone(),
            signal(),
        ));
    }
    let Some(metrics_listener) = metrics_listener else {
        let (r, lim, d, sig) = (
            with_draining(router(app)),
            limits,
            draining.clone(),
            signal(),
        );
        fronts.spawn(on_threads_below(public_niceness, listener, move |l| {
            listen::serve(l, r, lim, d, sig)
        })?);
        while fronts.join_next().await.is_some() {}
        return Ok(());
    };
    let (r, lim, d, sig) = (
        with_draining(public_router(app.clone())),
        limits.clone(),
        draining.clone(),
        signal(),
    );
    fronts.spawn(on_threads_below(public_niceness, listener, move |l| {
        listen::serve(l, r, lim, d, sig)
    })?);
    // Probes and metrics answer until the client-facing listeners have
    // drained.
    let admin_limits = Limits {
        max_connections: ADMIN_CONNECTIONS,
        max_connections_per_client: ADMIN_CONNECTIONS,
        max_connection_age: None,
        max_requests_per_connection: None,
        shutdown_delay: Duration::ZERO,
        ..limits
    };
    let (done, fronts_done) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(listen::serve(
        metrics_listener,
        with_draining(admin_router(app)),
        admin_limits,
        draining.clone(),
        async {
            let _ = fronts_done.await;
        },
    ));
    while fronts.join_next().await.is_some() {}
    let _ = done.send(());
    let _ = admin_task.await;
    Ok(())
}

/// `serve(listener)` as it is (niceness 0), or on a runtime of its own
/// whose threads run `niceness` below the rest of the process, the listener
/// and its connections on that runtime's reactor: the future returned ends
/// when serving has.
fn on_threads_below<F, S>(
    niceness: i32,
    listener: tokio::net::TcpListener,
    serve: S,
) -> anyhow::Result<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>
where
    S: FnOnce(tokio::net::TcpListener) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    if niceness == 0 {
        return Ok(Box::pin(serve(listener)));
    }
    let listener = listener.into_std().context("--listen")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("public")
        .on_thread_start(move || lower_this_thread(niceness))
        .enable_all()
        .build()
        .context("starting the threads of --listen")?;
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("public".into())
        .spawn(move || {
            // The accept loop runs on this thread: below the rest too.
            lower_this_thread(niceness);
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l).await,
                    Err(e) => tracing::error!(error = %e, "--listen: cannot serve"),
                }
            });
            let _ = done.send(());
        })
        .context("starting the threads of --listen")?;
    Ok(Box::pin(async move {
        let _ = ended.await;
    }))
}

/// Lowers the calling thread's CPU priority by `niceness` (capped at 19).
/// On Linux a priority is per thread; lowering one's own needs no privilege.
fn lower_this_thread(niceness: i32) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let lower = (getpriority_process(me).unwrap_or(0) + niceness).min(19);
        if let Err(e) = setpriority_process(me, lower) {
            tracing::warn!(error = %e, "cannot lower the priority of a --listen thread");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = niceness;
}

/// At shutdown, how long the audit trail's last lines may take to be written.
const AUDIT_FLUSH: Duration = Duration::from_secs(2);

/// Connection slots of the probes and metrics listener (kubelet probes and a
/// scraper or two need a handful).
const ADMIN_CONNECTIONS: usize = 64;

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The duration flags as `tokenpolicy serve` sees them.
    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(flags: &[&str]) -> Result<ServeArgs, String> {
        use clap::Parser as _;
        let argv = std::iter::once("serve").chain(flags.iter().copied());
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn leeway_is_at_most_a_minute() {
        assert_eq!(leeway_flag("0s"), Ok(Duration::ZERO));
        assert_eq!(leeway_flag("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(leeway_flag("1m"), Ok(Duration::from_secs(60)));
        for too_long in ["61s", "1h"] {
            let e = parse(&["--leeway", too_long]).unwrap_err();
            assert!(e.contains("at most 60s") && e.contains("--leeway"), "{e}");
        }
        let e = parse(&["--leeway", "soon"]).unwrap_err();
        assert!(
            e.contains("--leeway") && e.contains("invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn duration_flags_take_the_policy_syntax_and_keep_their_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.leeway, Duration::ZERO);
        assert_eq!(a.header_timeout, Duration::from_secs(10));
        assert_eq!(a.request_timeout, Duration::from_secs(30));
        assert_eq!(a.max_connection_age, Duration::from_secs(600));
        assert_eq!(a.shutdown_delay, Duration::from_secs(1));
        assert_eq!(a.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(a.failed_login_window, Duration::from_secs(900));
        assert_eq!(a.login_window, Duration::from_secs(900));
        assert_eq!(a.max_revocation_lag, Duration::from_secs(10));
        let a = parse(&["--max-connection-age", "0s", "--login-window", "1h30m"]).unwrap();
        assert_eq!(a.max_connection_age, Duration::ZERO);
        assert_eq!(a.login_window, Duration::from_secs(5_400));
        for flag in [
            "--header-timeout",
            "--request-timeout",
            "--max-revocation-lag",
        ] {
            let e = parse(&[flag, "0s"]).unwrap_err();
            assert!(e.contains(flag) && e.contains("at least 1s"), "{e}");
        }
        let e = parse(&["--shutdown-delay", "1.5s"]).unwrap_err();
        assert!(
            e.contains("--shutdown-delay") && e.contains("whole numbers"),
            "{e}"
        );
    }
}
