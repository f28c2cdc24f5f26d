//! Every rejection the service gives: a stable code and its message.
//! How a rejection looks on the wire (status, headers, JSON body) is
//! `http::error`'s.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    EmptyToken,
    InvalidToken,
    ExpiredToken,
    ExpiredSession,
    TokenAlreadyRefreshed,
    RevokedSession,
    InvalidCredentials,
    TooManyAttempts,
    StoreUnavailable,
    InvalidRequest,
    PayloadTooLarge,
    InvalidRedirect,
    /// Every password check is busy and the waiting line is full.
    ServiceBusy,
    CrossSiteRequest,
    UnsupportedMediaType,
    RequestTimeout,
    ShuttingDown,
    /// An OpenID Connect callback whose `state` is missing, unknown,
    /// expired, replayed or from another browser.
    InvalidState,
    /// The OpenID Connect provider is not discovered or cannot be reached.
    ProviderUnavailable,
    /// The provider refused the sign-in (an error answer, a code used twice).
    ProviderRefused,
    /// The provider's ID token failed a check.
    InvalidIdToken,
    /// `allowedGroups` / `allowedEmailDomains` refuse this user.
    ForbiddenUser,
    /// `/v1/verify?allowed_groups=`: the user is in none of them.
    ForbiddenGroup,
    /// The user has as many sessions as the policy allows (`RefuseNew`).
    SessionLimit,
    /// No session of the caller's with that id.
    SessionNotFound,
    /// A back-channel logout token failed a check, or was used before.
    InvalidLogoutToken,
    /// The admin API: a bearer token nobody (the cluster, the admin token) knows.
    AdminUnauthenticated,
    /// The admin API: the cluster's RBAC does not allow the caller this.
    AdminForbidden,
    /// The admin API: the Kubernetes API server cannot review the token now.
    ReviewUnavailable,
    /// The session saw no activity for `sessionIdleTimeout`.
    IdleSession,
}

impl Code {
    pub const ALL: [Code; 30] = [
        Code::EmptyToken,
        Code::InvalidToken,
        Code::ExpiredToken,
        Code::ExpiredSession,
        Code::TokenAlreadyRefreshed,
        Code::RevokedSession,
        Code::InvalidCredentials,
        Code::TooManyAttempts,
        Code::StoreUnavailable,
        Code::InvalidRequest,
        Code::PayloadTooLarge,
        Code::InvalidRedirect,
        Code::ServiceBusy,
        Code::CrossSiteRequest,
        Code::UnsupportedMediaType,
        Code::RequestTimeout,
        Code::ShuttingDown,
        Code::InvalidState,
        Code::ProviderUnavailable,
        Code::ProviderRefused,
        Code::InvalidIdToken,
        Code::ForbiddenUser,
        Code::ForbiddenGroup,
        Code::SessionLimit,
        Code::SessionNotFound,
        Code::InvalidLogoutToken,
        Code::AdminUnauthenticated,
        Code::AdminForbidden,
        Code::ReviewUnavailable,
        Code::IdleSession,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::EmptyToken => "EMPTY_TOKEN",
            Code::InvalidToken => "INVALID_TOKEN",
            Code::ExpiredToken => "EXPIRED_TOKEN",
            Code::ExpiredSession => "EXPIRED_SESSION",
            Code::TokenAlreadyRefreshed => "TOKEN_ALREADY_REFRESHED",
            Code::RevokedSession => "REVOKED_SESSION",
            Code::InvalidCredentials => "INVALID_CREDENTIALS",
            Code::TooManyAttempts => "TOO_MANY_ATTEMPTS",
            Code::StoreUnavailable => "STORE_UNAVAILABLE",
            Code::InvalidRequest => "INVALID_REQUEST",
            Code::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Code::InvalidRedirect => "INVALID_REDIRECT",
            Code::ServiceBusy => "SERVICE_BUSY",
            Code::CrossSiteRequest => "CSRF_REJECTED",
            Code::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Code::RequestTimeout => "REQUEST_TIMEOUT",
            Code::ShuttingDown => "SHUTTING_DOWN",
            Code::InvalidState => "INVALID_STATE",
            Code::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            Code::ProviderRefused => "PROVIDER_REFUSED",
            Code::InvalidIdToken => "INVALID_ID_TOKEN",
            Code::ForbiddenUser => "FORBIDDEN_USER",
            Code::ForbiddenGroup => "FORBIDDEN_GROUP",
            Code::SessionLimit => "SESSION_LIMIT",
            Code::SessionNotFound => "SESSION_NOT_FOUND",
            Code::InvalidLogoutToken => "INVALID_LOGOUT_TOKEN",
            Code::AdminUnauthenticated => "ADMIN_UNAUTHENTICATED",
            Code::AdminForbidden => "ADMIN_FORBIDDEN",
            Code::ReviewUnavailable => "REVIEW_UNAVAILABLE",
            Code::IdleSession => "IDLE_SESSION",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl From<crate::service::store::StoreError> for ApiError {
    fn from(e: crate::service::store::StoreError) -> Self {
        tracing::warn!(error = %e, "store error");
        ApiError::new(
            Code::StoreUnavailable,
            "the session store is unavailable; try again shortly",
        )
        .retry_after(1)
    }
}

#[cfg(test)]
mod contract {
    use super::Code;

    /// `Code::ALL` holds every code: this match fails to compile when a
    /// code is added, and the test below when it is left out of `ALL`.
    #[test]
    fn all_holds_every_code() {
        use Code::*;
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            match c {
                EmptyToken
                | InvalidToken
                | ExpiredToken
                | ExpiredSession
                | TokenAlreadyRefreshed
                | RevokedSession
                | InvalidCredentials
                | TooManyAttempts
                | StoreUnavailable
                | InvalidRequest
                | PayloadTooLarge
                | InvalidRedirect
                | ServiceBusy
                | CrossSiteRequest
                | UnsupportedMediaType
                | RequestTimeout
                | ShuttingDown
                | InvalidState
                | ProviderUnavailable
                | ProviderRefused
                | InvalidIdToken
                | ForbiddenUser
                | ForbiddenGroup
                | SessionLimit
                | SessionNotFound
                | InvalidLogoutToken
                | AdminUnauthenticated
                | AdminForbidden
                | ReviewUnavailable
                | IdleSession => seen.insert(c),
            };
        }
        assert_eq!(
            seen.len(),
            30,
            "a code is missing from Code::ALL or listed twice"
        );
    }
}
