//! How an [`ApiError`] looks on the wire: each code's status, one JSON
//! shape, `WWW-Authenticate` on 401s and `Retry-After` where given,
//! rendered in one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::service::error::{ApiError, Code};

impl Code {
    pub fn status(self) -> StatusCode {
        match self {
            Code::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
            Code::StoreUnavailable
            | Code::ServiceBusy
            | Code::ShuttingDown
            | Code::ProviderUnavailable
            | Code::ReviewUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::CrossSiteRequest
            | Code::ForbiddenUser
            | Code::ForbiddenGroup
            | Code::AdminForbidden => StatusCode::FORBIDDEN,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::InvalidRequest
            | Code::InvalidRedirect
            | Code::InvalidState
            | Code::InvalidLogoutToken => StatusCode::BAD_REQUEST,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::SessionLimit => StatusCode::CONFLICT,
            Code::SessionNotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code.as_str(), "message": self.message }
        });
        let mut resp = (self.code.status(), axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        if self.code.status() == StatusCode::UNAUTHORIZED {
            let value = format!(
                r#"Bearer error="invalid_token", error_description="{}""#,
                self.code.as_str()
            );
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

#[cfg(test)]
mod contract {
    use crate::service::error::Code;

    #[test]
    fn docs_contract_lists_every_code_with_its_status() {
        let doc = include_str!("../../../docs/src/contract.md");
        for c in Code::ALL {
            let row = format!("| `{}` | {} |", c.as_str(), c.status().as_u16());
            assert!(
                doc.contains(&row),
                "docs/src/contract.md lacks the row {row}"
            );
        }
    }
}
