//! The other end of a request, as the token service sees it.

/// Who is at the other end of a request that starts or acts on a session:
/// for the login throttle, the session registry and the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    /// The client's address (see `--trusted-proxies`).
    pub addr: Option<std::net::IpAddr>,
    /// Its `User-Agent`, as sent (at most a few hundred bytes are kept).
    pub user_agent: Option<String>,
}

impl From<Option<std::net::IpAddr>> for Client {
    fn from(addr: Option<std::net::IpAddr>) -> Self {
        Client {
            addr,
            user_agent: None,
        }
    }
}
