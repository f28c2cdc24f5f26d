//! The audit trail (`--audit-log PATH`, or `-` for standard output): one
//! JSON line per event that starts, renews or ends a session, or refuses to
//! (the schema: docs/src/audit.md).
//!
//! - [`Event`] and its constructors: what a line says. Never a token, a
//!   password, a hash, a password version or a refresh record: only names,
//!   session ids, addresses, user agents and codes.
//! - [`Counters`]: `tokenpolicy_audit_events_total{event=...}` on
//!   `/metrics`, counted whether or not a log is written.
//! - [`AuditLog`]: the writer. A request never waits on the disk: a line
//!   goes into a bounded queue (`std::sync::mpsc::sync_channel`, a
//!   non-blocking `try_send`), and one thread of its own writes the queue
//!   out and flushes whenever it is empty. A full queue (the disk far
//!   behind) drops the line and counts it
//!   (`tokenpolicy_audit_events_dropped_total`): forward-auth is never held
//!   up by the audit trail. SIGHUP reopens the file (for logrotate).
//!   Without `--audit-log` nothing is formatted and nothing is queued.

use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::clock::Millis;
use crate::service::client::Client;
use crate::service::error::Code;
use crate::service::jwt::Claims;

/// A name set: an enum whose every value has a documented name, and the
/// list of them all (so that a test can check each is documented).
macro_rules! names {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

names! {
    /// The events (the `event` field).
    Kind {
        LoginSucceeded => "login_succeeded",
        LoginFailed => "login_failed",
        LoginRefused => "login_refused",
        TokenRenewed => "token_renewed",
        RefreshReuseDetected => "refresh_reuse_detected",
        Logout => "logout",
        SessionRevoked => "session_revoked",
        SessionExpired => "session_expired",
        SessionIdle => "session_idle",
    }
}

names! {
    /// The `result` field: what came of the action.
    Outcome {
        Success => "success",
        Failure => "failure",
        Refused => "refused",
        Revoked => "revoked",
    }
}

names! {
    /// Who ended a session (`by`, in `session_revoked`).
    By {
        User => "user",
        Admin => "admin",
        SessionLimit => "session_limit",
        PasswordChange => "password_change",
        Provider => "provider",
    }
}

names! {
    /// Why (`reason`) a session was revoked or a login refused. A
    /// `login_failed` gives the answer's error code as its reason instead.
    Reason {
        /// `DELETE /v1/sessions/{sid}`: the user ended one of their sessions.
        EndedByUser => "ended_by_user",
        /// `POST /v1/logout?everywhere=true`: one of the user's other sessions.
        LogoutEverywhere => "logout_everywhere",
        /// `DELETE /v1/admin/sessions/{sid}`.
        AdminSession => "admin_ended_session",
        /// `DELETE /v1/admin/sessions?user=NAME`.
        AdminUser => "admin_ended_user",
        /// The oldest session, ended by a login past `spec.maxSessionsPerUser`.
        MaxSessions => "max_sessions_per_user",
        /// The user's password changed in the users file.
        PasswordChanged => "password_changed",
        /// The user is no longer in the users file.
        UserRemoved => "user_removed",
        /// The provider's back-channel logout.
        BackchannelLogout => "backchannel_logout",
        /// The provider refused to renew the session (`recheckOnRenew`).
        RenewalRefused => "renewal_refused",
        /// A login refused by the login throttle (`TOO_MANY_ATTEMPTS`).
        Throttled => "throttled",
        /// A login refused by `spec.maxSessionsPerUser` with `RefuseNew`
        /// (`SESSION_LIMIT`).
        SessionLimit => "session_limit",
    }
}

names! {
    /// Which limit refused a login (`limit`, in `login_refused`).
    Limit {
        FailedPerUser => "max_failed_logins_per_user",
        FailedPerAddress => "max_failed_logins_per_address",
        LoginsPerUser => "max_logins_per_user",
        SessionsPerUser => "max_sessions_per_user",
    }
}

names! {
    /// How a session was signed in to (`method`, in login events).
    Method {
        Password => "password",
        Oidc => "oidc",
    }
}

names! {
    /// Which request renewed a token or presented a spent one (`via`).
    Via {
        Refresh => "refresh",
        Verify => "verify",
    }
}

/// Whose session an event is about.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// The user: the name of a password user, the provider's subject of an
    /// OpenID Connect one (as the token's `sub`).
    pub user: Option<&'a str>,
    /// The provider's issuer URL, for an OpenID Connect user.
    pub provider: Option<&'a str>,
    pub sid: Option<&'a str>,
}

impl<'a> Who<'a> {
    pub fn of(c: &'a Claims) -> Who<'a> {
        Who {
            user: Some(&c.sub),
            provider: c.idp.as_deref(),
            sid: Some(&c.sid),
        }
    }

    /// A password user by name (no session).
    pub fn named(user: &'a str) -> Who<'a> {
        Who {
            user: Some(user),
            ..Who::default()
        }
    }

    pub fn sid(self, sid: &'a str) -> Who<'a> {
        Who {
            sid: Some(sid),
            ..self
        }
    }
}

/// One line of the audit trail. The fields up to `actor` are on every line
/// (`null` when they do not apply); the others only on the events they
/// belong to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub event: Kind,
    pub user: Option<String>,
    pub provider: Option<String>,
    pub sid: Option<String>,
    pub client_address: Option<String>,
    pub user_agent: Option<String>,
    pub result: Outcome,
    /// Who acted, when it is not the session's own user: an admin's
    /// Kubernetes user name.
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<By>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// `logout`: `true` for `everywhere=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub everywhere: Option<bool>,
    /// `logout` everywhere: how many other sessions it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds.
pub fn time_ms(ms: Millis) -> String {
    let secs = crate::clock::rfc3339(ms.div_euclid(1_000));
    match secs.strip_suffix('Z') {
        Some(s) => format!("{s}.{:03}Z", ms.rem_euclid(1_000)),
        None => secs,
    }
}

impl Event {
    fn new(kind: Kind, now: Millis, who: Who<'_>, client: &Client, result: Outcome) -> Event {
        Event {
            time: time_ms(now),
            event: kind,
            user: who.user.map(str::to_string),
            provider: who.provider.map(str::to_string),
            sid: who.sid.map(str::to_string),
            client_address: client.addr.map(|a| a.to_string()),
            user_agent: client.user_agent.clone(),
            result,
            actor: None,
            method: None,
            by: None,
            reason: None,
            limit: None,
            via: None,
            everywhere: None,
            sessions: None,
        }
    }

    fn method_of(who: &Who<'_>) -> Method {
        if who.provider.is_some() {
            Method::Oidc
        } else {
            Method::Password
        }
    }

    /// A session started (password or OpenID Connect).
    pub fn login_succeeded(now: Millis, who: Who<'_>, client: &Client) -> Event {
        Event {
            method: Some(Self::method_of(&who)),
            ..Event::new(Kind::LoginSucceeded, now, who, client, Outcome::Success)
        }
    }

    /// A login that did not start a session, for `code` (bad credentials,
    /// a bad request, a busy service, a refusal of the provider...).
    pub fn login_failed(
        now: Millis,
        who: Who<'_>,
        method: Method,
        client: &Client,
        code: Code,
    ) -> Event {
        Event {
            method: Some(method),
            reason: Some(code.as_str()),
            ..Event::new(Kind::LoginFailed, now, who, client, Outcome::Failure)
        }
    }

    /// A login refused by a limit: the throttle, or the session limit.
    pub fn login_refused(
        now: Millis,
        who: Who<'_>,
        method: Method,
        client: &Client,
        limit: Limit,
    ) -> Event {
        let reason = match limit {
            Limit::SessionsPerUser => Reason::SessionLimit,
            _ => Reason::Throttled,
        };
        Event {
            method: Some(method),
            reason: Some(reason.as_str()),
            limit: Some(limit),
            ..Event::new(Kind::LoginRefused, now, who, client, Outcome::Refused)
        }
    }

    /// A token exchanged for a new one (its one refresh).
    pub fn token_renewed(now: Millis, who: Who<'_>, client: &Client, via: Via) -> Event {
        Event {
            via: Some(via),
            ..Event::new(Kind::TokenRenewed, now, who, client, Outcome::Success)
        }
    }

    /// A spent token presented again after the grace; `revoked`: the
    /// session was revoked for it.
    pub fn refresh_reuse_detected(
        now: Millis,
        who: Who<'_>,
        client: &Client,
        via: Via,
        revoked: bool,
    ) -> Event {
        let result = if revoked {
            Outcome::Revoked
        } else {
            Outcome::Refused
        };
        Event {
            via: Some(via),
            ..Event::new(Kind::RefreshReuseDetected, now, who, client, result)
        }
    }

    /// The user signed out of this session; `everywhere`: with
    /// `everywhere=true`, and how many other sessions that ended.
    pub fn logout(now: Millis, who: Who<'_>, client: &Client, everywhere: Option<usize>) -> Event {
        Event {
            everywhere: Some(everywhere.is_some()),
            sessions: everywhere,
            ..Event::new(Kind::Logout, now, who, client, Outcome::Success)
        }
    }

    /// A session ended by someone or something other than its own logout.
    pub fn session_revoked(
        now: Millis,
        who: Who<'_>,
        client: &Client,
        by: By,
        reason: Reason,
    ) -> Event {
        Event {
            by: Some(by),
            reason: Some(reason.as_str()),
            ..Event::new(Kind::SessionRevoked, now, who, client, Outcome::Success)
        }
    }

    /// A session ended by an admin of the cluster (`actor`: their
    /// Kubernetes user name).
    pub fn session_revoked_by_admin(
        now: Millis,
        who: Who<'_>,
        client: &Client,
        actor: &str,
        reason: Reason,
    ) -> Event {
        Event {
            actor: Some(actor.to_string()),
            ..Event::session_revoked(now, who, client, By::Admin, reason)
        }
    }

    /// A request refused because its session is past its end.
    pub fn session_expired(now: Millis, who: Who<'_>, client: &Client) -> Event {
        Event::new(Kind::SessionExpired, now, who, client, Outcome::Refused)
    }

    /// A request refused because its session saw no activity for the
    /// policy's idle timeout.
    pub fn session_idle(now: Millis, who: Who<'_>, client: &Client) -> Event {
        Event::new(Kind::SessionIdle, now, who, client, Outcome::Refused)
    }

    /// The line as written: JSON and a line feed. JSON escapes every
    /// control character, so one event is always one line.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

/// The audit counters on `/metrics`, resolved at start (one atomic add per
/// event, no lock).
#[derive(Clone)]
pub struct Counters {
    by_kind: Arc<[Counter]>,
    /// Lines the writer could not keep up with, dropped.
    pub dropped: Counter,
    /// Lines that failed to be written (a full disk, a removed directory).
    pub write_errors: Counter,
}

impl Counters {
    pub fn register(registry: &mut Registry) -> Counters {
        let family = Family::<EventLabel, Counter>::default();
        let by_kind = Kind::ALL
            .iter()
            .map(|k| {
                family
                    .get_or_create(&EventLabel {
                        event: k.as_str().to_string(),
                    })
                    .clone()
            })
            .collect();
        registry.register(
            "audit_events",
            "Audit events by event (counted with or without --audit-log)",
            family,
        );
        let (dropped, write_errors) = (Counter::default(), Counter::default());
        registry.register(
            "audit_events_dropped",
            "Audit lines dropped because the writer was behind",
            dropped.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Audit lines that could not be written",
            write_errors.clone(),
        );
        Counters {
            by_kind,
            dropped,
            write_errors,
        }
    }

    pub fn count(&self, kind: Kind) {
        // `by_kind` follows `Kind::ALL`, whose order is the enum's.
        if let Some(c) = self.by_kind.get(kind as usize) {
            c.inc();
        }
    }
}

/// Lines waiting for the writer at most (about 300 bytes each: a few MiB).
pub const QUEUE: usize = 16_384;

enum Msg {
    Line(Vec<u8>),
    Reopen,
    Flush(std::sync::mpsc::Sender<()>),
}

/// Where the lines go.
enum Target {
    Stdout,
    File(std::path::PathBuf),
}

impl Target {
    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        match self {
            Target::Stdout => Ok(Box::new(std::io::stdout())),
            Target::File(path) => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o600);
                }
                Ok(Box::new(o.open(path)?))
            }
        }
    }
}

/// The audit log's writer; `AuditLog::default()` writes nothing.
#[derive(Clone, Default)]
pub struct AuditLog {
    tx: Option<SyncSender<Msg>>,
    dropped: Option<Counter>,
    reopenable: bool,
}

impl AuditLog {
    /// Opens `target` (a path, appended to and created `0600` if missing;
    /// `-`: standard output) and starts its writer thread.
    pub fn open(target: &str, counters: &Counters) -> anyhow::Result<AuditLog> {
        Self::open_with_queue(target, counters, QUEUE)
    }

    fn open_with_queue(
        target: &str,
        counters: &Counters,
        queue: usize,
    ) -> anyhow::Result<AuditLog> {
        use anyhow::Context as _;
        let t = match target {
            "-" => Target::Stdout,
            "" => anyhow::bail!("--audit-log: give a file, or - for standard output"),
            path => Target::File(path.into()),
        };
        let out = t
            .open()
            .with_context(|| format!("--audit-log {target}: cannot open it for appending"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let reopenable = matches!(t, Target::File(_));
        let errors = counters.write_errors.clone();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_out(rx, t, out, errors))
            .context("starting the audit log's writer")?;
        Ok(AuditLog {
            tx: Some(tx),
            dropped: Some(counters.dropped.clone()),
            reopenable,
        })
    }

    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one event's line; never waits. A full queue drops it.
    pub fn write(&self, e: &Event) {
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            tx.try_send(Msg::Line(e.line()))
            && let Some(d) = &self.dropped
        {
            d.inc();
        }
    }

    /// Closes and opens the file again (after logrotate moved it away).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            // Blocking here is fine: it runs on a signal task, never a request.
            let _ = tx.send(Msg::Reopen);
        }
    }

    /// Waits up to `timeout` for every line queued so far to be written.
    pub fn flush(&self, timeout: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }

    /// Reopens the file on every SIGHUP (a file only; standard output is
    /// never reopened, and without a file SIGHUP keeps its default).
    pub fn reopen_on_sighup(&self) {
        #[cfg(unix)]
        if self.reopenable {
            use tokio::signal::unix::{SignalKind, signal};
            let log = self.clone();
            match signal(SignalKind::hangup()) {
                Ok(mut s) => {
                    tokio::spawn(async move {
                        while s.recv().await.is_some() {
                            let l = log.clone();
                            let _ = tokio::task::spawn_blocking(move || l.reopen()).await;
                            tracing::info!("audit log reopened (SIGHUP)");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "SIGHUP will not reopen the audit log"),
            }
        }
    }
}

/// The writer thread: writes what is queued, flushing whenever the queue
/// is empty; ends when every sender is gone.
fn write_out(rx: Receiver<Msg>, target: Target, mut out: Box<dyn Write + Send>, errors: Counter) {
    let mut failing = false;
    let mut dirty = false;
    loop {
        let msg = if dirty {
            match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    flush(&mut out, &errors, &mut failing);
                    dirty = false;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        match msg {
            Msg::Line(line) => {
                if let Err(e) = out.write_all(&line) {
                    errors.inc();
                    if !failing {
                        tracing::error!(error = %e, "cannot write the audit log");
                        failing = true;
                    }
                } else {
                    dirty = true;
                }
            }
            Msg::Reopen => {
                flush(&mut out, &errors, &mut failing);
                dirty = false;
                match target.open() {
                    Ok(new) => {
                        out = new;
                        failing = false;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reopen the audit log; writing on to the file open before")
                    }
                }
            }
            Msg::Flush(done) => {
                flush(&mut out, &errors, &mut failing);
                dirty = false;
                let _ = done.send(());
            }
        }
    }
    flush(&mut out, &errors, &mut failing);
}

fn flush(out: &mut Box<dyn Write + Send>, errors: &Counter, failing: &mut bool) {
    if let Err(e) = out.flush() {
        errors.inc();
        if !*failing {
            tracing::error!(error = %e, "cannot write the audit log");
            *failing = true;
        }
    }
}

/// How many session ids a replica remembers having reported ended, so
/// that a session refused again and again is reported once.
const SEEN_ENDED: usize = 10_000;

/// What the token service audits with: the counters (always) and the log
/// (when there is one), and the sessions already reported ended here.
#[derive(Clone)]
pub struct Audit {
    counters: Counters,
    log: AuditLog,
    ended: Arc<quick_cache::sync::Cache<String, ()>>,
}

impl Audit {
    pub fn new(counters: Counters, log: AuditLog) -> Audit {
        Audit {
            counters,
            log,
            ended: Arc::new(quick_cache::sync::Cache::new(SEEN_ENDED)),
        }
    }

    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Counts the event and writes it (when there is a log).
    pub fn emit(&self, e: Event) {
        self.counters.count(e.event);
        self.log.write(&e);
    }

    /// Whether this replica has not reported `sid` ended (as `kind`) yet;
    /// remembers it now.
    pub fn first_report(&self, kind: Kind, sid: &str) -> bool {
        let key = format!("{}\n{sid}", kind.as_str());
        if self.ended.get(&key).is_some() {
            return false;
        }
        self.ended.insert(key, ());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client {
            addr: "192.0.2.7".parse().ok(),
            user_agent: Some("test\nagent".into()),
        }
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        assert_eq!(time_ms(1_767_323_045_007), "2026-01-02T03:04:05.007Z");
        assert_eq!(time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_line_is_one_json_object_with_the_common_fields() {
        let e = Event::login_failed(
            1_767_323_045_000,
            Who::named("eve\n{\"event\":\"x\"}"),
            Method::Password,
            &client(),
            Code::InvalidCredentials,
        );
        let line = e.line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        for f in [
            "time",
            "event",
            "user",
            "provider",
            "sid",
            "client_address",
            "user_agent",
            "result",
            "actor",
        ] {
            assert!(v.get(f).is_some(), "{f} missing: {v}");
        }
        assert_eq!(v["event"], "login_failed");
        assert_eq!(v["reason"], "INVALID_CREDENTIALS");
        assert_eq!(v["result"], "failure");
        assert_eq!(v["method"], "password");
        assert_eq!(v["user"], "eve\n{\"event\":\"x\"}");
        assert_eq!(v["client_address"], "192.0.2.7");
        assert!(v.get("by").is_none());
        let admin = Event::session_revoked_by_admin(
            0,
            Who::named("alice").sid("s1"),
            &Client::default(),
            "system:serviceaccount:ops:oncall",
            Reason::AdminSession,
        );
        let v: serde_json::Value = serde_json::from_slice(&admin.line()).unwrap();
        assert_eq!(v["by"], "admin");
        assert_eq!(v["actor"], "system:serviceaccount:ops:oncall");
        assert_eq!(v["client_address"], serde_json::Value::Null);
    }

    #[test]
    fn counters_follow_the_kinds() {
        let mut r = Registry::with_prefix("tokenpolicy");
        let c = Counters::register(&mut r);
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        c.count(Kind::SessionIdle);
        c.count(Kind::SessionIdle);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains("tokenpolicy_audit_events_total{event=\"session_idle\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tokenpolicy_audit_events_total{event=\"login_succeeded\"} 0"),
            "{text}"
        );
        assert!(text.contains("tokenpolicy_audit_events_dropped_total 0"));
    }

    #[test]
    fn the_log_writes_reopens_and_drops_when_full() {
        let dir = std::env::temp_dir().join(format!("tp-audit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let mut r = Registry::default();
        let c = Counters::register(&mut r);
        let log = AuditLog::open(path.to_str().unwrap(), &c).unwrap();
        let e = Event::session_expired(0, Who::named("a").sid("s"), &client());
        log.write(&e);
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        // Moved away (logrotate), then reopened: the next line goes to a
        // new file of the same name.
        let rotated = dir.join("audit.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.write(&e);
        log.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        // A queue of one, its writer held up: lines beyond are dropped and
        // counted, and writing never waits.
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let stuck = AuditLog {
            tx: Some(tx),
            dropped: Some(c.dropped.clone()),
            reopenable: false,
        };
        let started = std::time::Instant::now();
        for _ in 0..100 {
            stuck.write(&e);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(c.dropped.get(), 99);
        // No log: nothing at all.
        AuditLog::default().write(&e);
        assert!(!AuditLog::default().is_on());
        assert!(AuditLog::open(dir.join("no/such/dir").to_str().unwrap(), &c).is_err());
        assert!(AuditLog::open("", &c).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_ended_session_is_reported_once_per_replica() {
        let mut r = Registry::default();
        let a = Audit::new(Counters::register(&mut r), AuditLog::default());
        assert!(a.first_report(Kind::SessionExpired, "s1"));
        assert!(!a.first_report(Kind::SessionExpired, "s1"));
        assert!(a.first_report(Kind::SessionIdle, "s1"));
        assert!(a.first_report(Kind::SessionExpired, "s2"));
    }

    /// Every event, and every value of `by`, `reason`, `limit`, `method`,
    /// `via` and `result` that the code can write, is documented in
    /// docs/src/audit.md; and the page documents no event the code lacks.
    #[test]
    fn every_event_and_value_is_documented() {
        let page = include_str!("../../docs/src/audit.md");
        let headings: Vec<&str> = page
            .lines()
            .filter_map(|l| l.strip_prefix("### `"))
            .filter_map(|l| l.strip_suffix('`'))
            .collect();
        for k in Kind::ALL {
            assert!(
                headings.contains(&k.as_str()),
                "event {} is not documented under its own `### `{}`` heading",
                k.as_str(),
                k.as_str()
            );
        }
        for h in &headings {
            assert!(
                Kind::ALL.iter().any(|k| k.as_str() == *h),
                "the page documents an event the code does not emit: {h}"
            );
        }
        let values = By::ALL
            .iter()
            .map(|v| v.as_str())
            .chain(Reason::ALL.iter().map(|v| v.as_str()))
            .chain(Limit::ALL.iter().map(|v| v.as_str()))
            .chain(Method::ALL.iter().map(|v| v.as_str()))
            .chain(Via::ALL.iter().map(|v| v.as_str()))
            .chain(Outcome::ALL.iter().map(|v| v.as_str()));
        for v in values {
            assert!(
                page.contains(&format!("`{v}`")),
                "value {v} is not documented"
            );
        }
        // Every field a line can carry is in the field table.
        let full = Event {
            actor: Some("a".into()),
            method: Some(Method::Password),
            by: Some(By::User),
            reason: Some("r"),
            limit: Some(Limit::LoginsPerUser),
            via: Some(Via::Refresh),
            everywhere: Some(true),
            sessions: Some(1),
            ..Event::session_idle(0, Who::named("u"), &client())
        };
        let v: serde_json::Value = serde_json::from_slice(&full.line()).unwrap();
        for field in v.as_object().unwrap().keys() {
            assert!(
                page.contains(&format!("| `{field}` |")),
                "field {field} is not in the field table"
            );
        }
    }
}
