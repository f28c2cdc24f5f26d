//! The Redis address of a token service (`--redis`, or the Secret a
//! TokenPolicy names), in one of three forms:
//!
//! - `redis://[:password@]host:port[/db]` (`rediss://` for TLS): one server;
//! - `redis+sentinel://[:password@]host:port[,host:port…]/MASTER_NAME`
//!   (`rediss+sentinel://` for TLS): Sentinels and the name of the master
//!   they watch. The password is the master's; `?sentinel_password=…` when
//!   the Sentinels have one of their own;
//! - `redis+cluster://[:password@]host:port[,host:port…]`
//!   (`rediss+cluster://` for TLS): seed nodes of a Redis Cluster.
//!
//! Nothing here ever puts a password into an error message or a `Debug`
//! line: errors name the form expected and the address without credentials.

use std::fmt;

use percent_encoding::percent_decode_str;

/// What every error message shows, so that a wrong value can be put right
/// without the documentation at hand.
pub const EXPECTED_FORMS: &str = "expected redis://[:password@]host:port[/db] (rediss:// for TLS), \
redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[?sentinel_password=...] \
(rediss+sentinel:// for TLS) or redis+cluster://[:password@]host:port[,host:port...] \
(rediss+cluster:// for TLS)";

const DEFAULT_PORT: u16 = 6379;
const DEFAULT_SENTINEL_PORT: u16 = 26379;

#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// ACL user name and password, both optional.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server; `url` goes to the `redis` crate as it is.
    Single { url: String },
    Sentinel {
        sentinels: Vec<Node>,
        master: String,
        /// The master's (and its replicas') credentials.
        auth: Auth,
        /// The Sentinels' own password, if they have one.
        sentinel_password: Option<String>,
        db: i64,
        tls: bool,
    },
    Cluster {
        nodes: Vec<Node>,
        auth: Auth,
        tls: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Redis URL {shown}: {why}; {EXPECTED_FORMS}")]
pub struct RedisUrlError {
    /// The address without credentials.
    shown: String,
    why: String,
}

/// The address without credentials (and without the query, which may hold
/// the Sentinels' password), for logs and errors.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let scheme: String = scheme
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                .take(32)
                .collect();
            format!("{scheme}://{hosts}{path}")
        }
        None => "(not a URL)".into(),
    }
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, RedisUrlError> {
        let fail = |why: &str| RedisUrlError {
            shown: redacted(url),
            why: why.to_string(),
        };
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(fail("no scheme"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "redis" | "rediss" => {
                // The redis crate reads this form itself; checked here so that
                // a bad value stops the start with the forms expected.
                redis::Client::open(url).map_err(|_| fail("not a valid single-server address"))?;
                // The crate's one fragment turns the certificate check off.
                if url::Url::parse(url).is_ok_and(|u| u.fragment().is_some()) {
                    return Err(fail(
                        "#insecure (no certificate check) is refused; \
                         trust a private CA with --redis-ca-file",
                    ));
                }
                Ok(RedisTarget::Single {
                    url: url.to_string(),
                })
            }
            s @ ("redis+sentinel" | "rediss+sentinel") => {
                let parts = split(rest, DEFAULT_SENTINEL_PORT).map_err(|w| fail(&w))?;
                let mut sentinel_password = None;
                for (k, v) in parts.query {
                    match k.as_str() {
                        "sentinel_password" if !v.is_empty() => sentinel_password = Some(v),
                        "sentinel_password" => {}
                        _ => return Err(fail(&format!("unknown parameter {k:?}"))),
                    }
                }
                let path = parts.path.trim_matches('/');
                let (master, db) = match path.split_once('/') {
                    Some((m, db)) => (
                        m,
                        db.parse::<i64>().ok().filter(|d| *d >= 0).ok_or_else(|| {
                            fail("the database after the master name is not a number")
                        })?,
                    ),
                    None => (path, 0),
                };
                let master = decode(master).map_err(|w| fail(&w))?;
                if master.is_empty() {
                    return Err(fail("the master name is missing (…/MASTER_NAME)"));
                }
                Ok(RedisTarget::Sentinel {
                    sentinels: parts.nodes,
                    master,
                    auth: parts.auth,
                    sentinel_password,
                    db,
                    tls: s.starts_with("rediss"),
                })
            }
            s @ ("redis+cluster" | "rediss+cluster") => {
                let parts = split(rest, DEFAULT_PORT).map_err(|w| fail(&w))?;
                if let Some((k, _)) = parts.query.first() {
                    return Err(fail(&format!("unknown parameter {k:?}")));
                }
                match parts.path.trim_matches('/') {
                    "" | "0" => {}
                    _ => return Err(fail("Redis Cluster has database 0 only: no path")),
                }
                Ok(RedisTarget::Cluster {
                    nodes: parts.nodes,
                    auth: parts.auth,
                    tls: s.starts_with("rediss"),
                })
            }
            _ => Err(fail("unsupported scheme")),
        }
    }

    /// For the log: the mode and the nodes, no credentials.
    /// Dialled over TLS (`rediss`).
    pub fn is_tls(&self) -> bool {
        match self {
            RedisTarget::Single { url } => url
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("rediss://")),
            RedisTarget::Sentinel { tls, .. } | RedisTarget::Cluster { tls, .. } => *tls,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RedisTarget::Single { url } => redacted(url),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => format!("Sentinel {sentinels:?} master {master:?}"),
            RedisTarget::Cluster { nodes, .. } => format!("Cluster seeds {nodes:?}"),
        }
    }
}

/// Never shows a password.
impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

struct Parts {
    auth: Auth,
    nodes: Vec<Node>,
    path: String,
    query: Vec<(String, String)>,
}

fn decode(s: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "not UTF-8 after percent-decoding".to_string())
}

/// `[user[:password]@]host[:port][,host[:port]…][/path][?query]`
fn split(rest: &str, default_port: u16) -> Result<Parts, String> {
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((u, r)) => (Some(u), r),
        None => (None, rest),
    };
    let (hosts, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let mut auth = Auth::default();
    if let Some(u) = userinfo {
        let (user, pass) = match u.split_once(':') {
            Some((user, pass)) => (user, Some(pass)),
            None => (u, None),
        };
        if !user.is_empty() {
            auth.username = Some(decode(user)?);
        }
        if let Some(p) = pass.filter(|p| !p.is_empty()) {
            auth.password = Some(decode(p).map_err(|_| "the password is not UTF-8".to_string())?);
        }
    }
    let mut nodes = Vec::new();
    for h in hosts.split(',') {
        nodes.push(node(h.trim(), default_port)?);
    }
    let query = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .map_err(|_| "the query string does not parse".to_string())?;
    Ok(Parts {
        auth,
        nodes,
        path: path.to_string(),
        query,
    })
}

fn node(s: &str, default_port: u16) -> Result<Node, String> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 address lacks its ']'".to_string())?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("cannot read the node {s:?}")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("a host is missing (host:port,host:port)".into());
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Err(format!("cannot read the host {host:?}"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("the port of {host:?} is not a number from 1 to 65535"))?,
    };
    Ok(Node {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(host: &str, port: u16) -> Node {
        Node {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn single_server_passes_through() {
        for u in [
            "redis://127.0.0.1:6379/",
            "redis://:pw@r:6379/2",
            "rediss://user:pw@r.example:6380",
        ] {
            assert_eq!(
                RedisTarget::parse(u).unwrap(),
                RedisTarget::Single { url: u.into() }
            );
        }
    }

    #[test]
    fn the_certificate_check_cannot_be_turned_off() {
        let err = RedisTarget::parse("rediss://:pw@r:6380/0#insecure").unwrap_err();
        assert!(err.to_string().contains("#insecure"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn tls_is_told_by_the_scheme() {
        let tls = |u: &str| RedisTarget::parse(u).unwrap().is_tls();
        assert!(tls("rediss://r:6380"));
        assert!(tls("REDISS://r:6380"));
        assert!(tls("rediss+sentinel://s1/m"));
        assert!(tls("rediss+cluster://c1:7000"));
        assert!(!tls("redis://r:6379"));
        assert!(!tls("redis+sentinel://s1/m"));
        assert!(!tls("redis+cluster://c1:7000"));
    }

    #[test]
    fn sentinel_form() {
        let t = RedisTarget::parse(
            "redis+sentinel://:m%40ster@s1:26379,s2,[::1]:26380/mymaster?sentinel_password=s%26p",
        )
        .unwrap();
        assert_eq!(
            t,
            RedisTarget::Sentinel {
                sentinels: vec![n("s1", 26379), n("s2", 26379), n("::1", 26380)],
                master: "mymaster".into(),
                auth: Auth {
                    username: None,
                    password: Some("m@ster".into())
                },
                sentinel_password: Some("s&p".into()),
                db: 0,
                tls: false,
            }
        );
        // An empty Sentinel password is no password (a template left blank).
        let t = RedisTarget::parse("redis+sentinel://s1/m?sentinel_password=").unwrap();
        let RedisTarget::Sentinel {
            sentinel_password, ..
        } = t
        else {
            panic!("not sentinel")
        };
        assert_eq!(sentinel_password, None);
        let t = RedisTarget::parse("rediss+sentinel://app:pw@s1:1/m/3").unwrap();
        let RedisTarget::Sentinel { tls, db, auth, .. } = t else {
            panic!("not sentinel")
        };
        assert!(tls);
        assert_eq!(db, 3);
        assert_eq!(auth.username.as_deref(), Some("app"));
    }

    #[test]
    fn cluster_form() {
        let t = RedisTarget::parse("rediss+cluster://:pw@a:7000,b:7001").unwrap();
        assert_eq!(
            t,
            RedisTarget::Cluster {
                nodes: vec![n("a", 7000), n("b", 7001)],
                auth: Auth {
                    username: None,
                    password: Some("pw".into())
                },
                tls: true,
            }
        );
        let t = RedisTarget::parse("redis+cluster://a/").unwrap();
        assert_eq!(
            t,
            RedisTarget::Cluster {
                nodes: vec![n("a", 6379)],
                auth: Auth::default(),
                tls: false
            }
        );
    }

    #[test]
    fn bad_values_name_the_forms_and_never_the_password() {
        let secret = "hunter2-secret";
        for u in [
            format!("http://:{secret}@host:80/"),
            format!("redis+sentinel://:{secret}@s1:26379"),
            format!("redis+sentinel://:{secret}@s1:26379/"),
            format!("redis+sentinel://:{secret}@s1:99999/m"),
            format!("redis+sentinel://:{secret}@s1/m?sentinel_pasword={secret}"),
            format!("redis+sentinel://:{secret}@s1/m/x"),
            format!("redis+cluster://:{secret}@a:7000/1"),
            format!("redis+cluster://:{secret}@a:7000,,b:1"),
            format!("redis+cluster://:{secret}@a b:7000"),
            format!("redis+cluster://:{secret}@a:7000?x={secret}"),
            format!("redis://:{secret}@host:notaport/"),
            format!(":{secret}@host:6379"),
            format!("redis+sentinel://:{secret}@[::1/m"),
        ] {
            let err = RedisTarget::parse(&u).unwrap_err().to_string();
            assert!(!err.contains(secret), "{err}");
            assert!(err.contains("redis+sentinel://"), "{err}");
            assert!(err.contains("redis+cluster://"), "{err}");
            assert!(err.contains("invalid Redis URL"), "{err}");
        }
    }

    #[test]
    fn debug_and_describe_hide_passwords() {
        for u in [
            "redis+sentinel://u:topsecret@s1/m?sentinel_password=topsecret",
            "redis+cluster://:topsecret@a:1",
            "redis://:topsecret@a:1/0",
        ] {
            let t = RedisTarget::parse(u).unwrap();
            assert!(!t.describe().contains("topsecret"), "{}", t.describe());
            assert!(!format!("{t:?}").contains("topsecret"), "{t:?}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://10.0.0.1:6379/0"
        );
        assert_eq!(redacted("rediss://user:pw@host"), "rediss://host");
        assert_eq!(
            redacted("redis+sentinel://:pw@a,b/m?sentinel_password=pw"),
            "redis+sentinel://a,b/m"
        );
        assert_eq!(redacted("garbage"), "(not a URL)");
    }
}
