//! `tokenpolicy sessions`: a command-line client of the admin API
//! (`/v1/admin/sessions`, see docs/src/http.md).
//!
//! The bearer token is the one in `--token-file`, else the current
//! kubeconfig context's credentials (a token, a token file, or an exec
//! plugin's token, as `kubectl` would send them; a client certificate
//! cannot be presented to the token service). Exit codes: 0 done, 1 the
//! service could not be reached or failed, 2 a usage error, 3 the token
//! was refused (401, 403), 4 not found (no such session, or no admin API
//! on that server).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::BodyExt as _;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

/// Ends or lists anyone's sessions through the admin API.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionsArgs {
    /// The token service (e.g. `kubectl port-forward svc/NAME 8080:8080`).
    #[arg(
        long,
        global = true,
        env = "TOKENPOLICY_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// A file holding the bearer token; without it, the current kubeconfig
    /// context's credentials.
    #[arg(long, global = true, env = "TOKENPOLICY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: SessionsCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SessionsCommand {
    /// List a user's live sessions.
    List {
        #[command(flatten)]
        user: UserArgs,
        /// Print the service's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End one session (--sid) or all of a user's (--user), on every replica.
    Revoke {
        #[command(flatten)]
        user: OptionalUserArgs,
        /// The session's id (`sid`, as `list` shows it).
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        sid: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct UserArgs {
    /// A password user's name, or an OpenID Connect user's subject (`sub`).
    #[arg(long)]
    pub user: String,
    /// For an OpenID Connect user: the provider's issuer URL (the policy's
    /// `spec.oidc.issuerURL`).
    #[arg(long)]
    pub provider: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OptionalUserArgs {
    /// A password user's name, or an OpenID Connect user's subject (`sub`).
    #[arg(long)]
    pub user: Option<String>,
    /// For an OpenID Connect user: the provider's issuer URL.
    #[arg(long, requires = "user")]
    pub provider: Option<String>,
}

/// An answer the command reports, with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        fail(1, format!("{e:#}"))
    }
}

/// Runs the command; prints what it did or why not.
pub async fn run(args: SessionsArgs) -> ExitCode {
    match execute(args).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn client(args: &SessionsArgs) -> anyhow::Result<kube::Client> {
    let url: Uri = args
        .server
        .parse()
        .with_context(|| format!("--server {:?} is not a URL", args.server))?;
    anyhow::ensure!(
        matches!(url.scheme_str(), Some("http" | "https")) && url.host().is_some(),
        "--server {:?}: an http:// or https:// URL with a host",
        args.server
    );
    let config = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file: reading {}", path.display()))?;
            let token = text.trim();
            anyhow::ensure!(!token.is_empty(), "--token-file {}: empty", path.display());
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                anyhow::anyhow!("--token-file {}: not a bearer token", path.display())
            })?;
            value.set_sensitive(true);
            let mut config = kube::Config::new(url);
            config.headers.push((header::AUTHORIZATION, value));
            config
        }
        None => {
            let mut config = kube::Config::infer().await.context(
                "no --token-file, and no kubeconfig to take credentials from (KUBECONFIG, ~/.kube/config)",
            )?;
            let auth = &mut config.auth_info;
            anyhow::ensure!(
                auth.token.is_some()
                    || auth.token_file.is_some()
                    || auth.exec.is_some()
                    || auth.auth_provider.is_some(),
                "the current kubeconfig context has no bearer token (a client certificate cannot be shown to the token service): use --token-file"
            );
            // Only the bearer token goes to the token service: nothing of
            // the cluster's TLS or other credentials.
            auth.client_certificate = None;
            auth.client_certificate_data = None;
            auth.client_key = None;
            auth.client_key_data = None;
            auth.username = None;
            auth.password = None;
            auth.impersonate = None;
            auth.impersonate_groups = None;
            auth.impersonate_uid = None;
            auth.impersonate_user_extra = None;
            config.cluster_url = url;
            config.root_cert = None;
            config.root_cert_file = None;
            config.tls_server_name = None;
            config.accept_invalid_certs = false;
            config.proxy_url = None;
            config
        }
    };
    kube::Client::try_from(config).context("building the HTTP client")
}

fn user_query(user: &str, provider: Option<&str>) -> anyhow::Result<String> {
    let mut pairs = vec![("user", user)];
    if let Some(p) = provider {
        pairs.push(("provider", p));
    }
    serde_urlencoded::to_string(pairs).context("encoding the query")
}

/// The service's error code and message, from its JSON error body.
fn error_of(body: &[u8]) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    Some((
        e.get("code")?.as_str()?.to_string(),
        e.get("message")?.as_str()?.to_string(),
    ))
}

async fn call(
    client: &kube::Client,
    server: &str,
    method: Method,
    path_and_query: String,
) -> Result<Vec<u8>, Failure> {
    let req = Request::builder()
        .method(method)
        .uri(path_and_query.as_str())
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| fail(1, format!("building the request: {e}")))?;
    let resp = client
        .send(req)
        .await
        .map_err(|e| fail(1, format!("cannot reach {server}: {e}")))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(1, format!("{server}: reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    if status.is_success() {
        return Ok(body);
    }
    let described = match error_of(&body) {
        Some((code, message)) => format!("{server}: {} {code}: {message}", status.as_u16()),
        None => format!("{server}: {status}"),
    };
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => fail(3, described),
        StatusCode::NOT_FOUND if error_of(&body).is_none() => fail(
            4,
            format!(
                "{server}: no admin API here (the service runs without --policy-ref or --admin-token-file)"
            ),
        ),
        StatusCode::NOT_FOUND => fail(4, described),
        _ => fail(1, described),
    })
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v.get(name).and_then(|f| f.as_str()).unwrap_or("-")
}

/// The list as a table, one session a line.
fn table(answer: &serde_json::Value) -> String {
    let mut out = String::from("SID\tMETHOD\tSTARTED\tEXPIRES\tLAST ACTIVE\tADDRESS\tUSER AGENT\n");
    for s in answer
        .get("sessions")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        let cells = [
            "sid",
            "method",
            "started_at",
            "expires_at",
            "last_active_at",
            "client_address",
            "user_agent",
        ]
        .map(|f| field(s, f).replace(['\t', '\n', '\r'], " "));
        out.push_str(&cells.join("\t"));
        out.push('\n');
    }
    out
}

async fn execute(args: SessionsArgs) -> Result<String, Failure> {
    let client = client(&args).await?;
    let server = args.server.trim_end_matches('/').to_string();
    match &args.command {
        SessionsCommand::List { user, json } => {
            let q = user_query(&user.user, user.provider.as_deref())?;
            let body = call(
                &client,
                &server,
                Method::GET,
                format!("/v1/admin/sessions?{q}"),
            )
            .await?;
            let answer: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| fail(1, format!("{server}: an answer that is not JSON: {e}")))?;
            Ok(if *json {
                format!("{answer}\n")
            } else {
                table(&answer)
            })
        }
        SessionsCommand::Revoke { user, sid } => match (sid, &user.user) {
            (Some(sid), _) => {
                let path = format!(
                    "/v1/admin/sessions/{}",
                    utf8_percent_encode(sid, NON_ALPHANUMERIC)
                );
                call(&client, &server, Method::DELETE, path).await?;
                Ok(format!("session {sid} revoked\n"))
            }
            (None, Some(name)) => {
                let q = user_query(name, user.provider.as_deref())?;
                let body = call(
                    &client,
                    &server,
                    Method::DELETE,
                    format!("/v1/admin/sessions?{q}"),
                )
                .await?;
                let n = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("revoked").and_then(|n| n.as_u64()))
                    .ok_or_else(|| fail(1, format!("{server}: an answer without `revoked`")))?;
                Ok(format!("{n} session(s) of {name} revoked\n"))
            }
            (None, None) => Err(fail(2, "give --sid SID or --user NAME")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded() {
        assert_eq!(user_query("a b&c", None).unwrap(), "user=a+b%26c");
        assert_eq!(
            user_query("x", Some("https://idp.example/realms/r")).unwrap(),
            "user=x&provider=https%3A%2F%2Fidp.example%2Frealms%2Fr"
        );
    }

    #[test]
    fn a_table_holds_one_line_per_session_and_no_control_characters() {
        let answer = serde_json::json!({"sessions": [
            {"sid": "s1", "method": "password", "started_at": "t0", "expires_at": "t1",
             "last_active_at": "t0", "client_address": null, "user_agent": "a\tb\nc"}
        ]});
        let t = table(&answer);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], "s1\tpassword\tt0\tt1\tt0\t-\ta b c");
    }

    #[test]
    fn error_bodies_are_read() {
        assert_eq!(
            error_of(br#"{"error":{"code":"ADMIN_FORBIDDEN","message":"no"}}"#),
            Some(("ADMIN_FORBIDDEN".into(), "no".into()))
        );
        assert_eq!(error_of(b""), None);
    }
}
