//! The spans of refresh, verify and logout carry no secret: the token never
//! appears in a field, only its length.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::service::jwt::Claims;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

#[tokio::test]
async fn spans_name_the_operation_and_never_hold_the_token() {
    let buf = Buf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(buf.clone())
        .with_span_events(FmtSpan::CLOSE)
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = crate::testing::service().build();
    let now = 1_800_000_000;
    let claims = Claims {
        iss: s.keys().issuer().into(),
        aud: s.keys().audience().into(),
        sid: "sid-span".into(),
        jti: "jti-span".into(),
        ..crate::testing::claims_at(now)
    };
    let token = s.keys().sign(&claims);
    let at = now * 1_000 + 1_000;
    // The service has no users, so these are refused; the spans are the point.
    s.verify(&token, true, at).await.ok();
    let renewed = s.refresh(&token, at).await;
    s.logout(&token, at).await.ok();

    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    for name in ["verify", "refresh", "logout"] {
        assert!(
            out.contains(&format!("{name}{{")),
            "no {name} span in:\n{out}"
        );
    }
    assert!(out.contains(&format!("token_len={}", token.len())), "{out}");
    assert!(out.contains("may_renew=true"), "{out}");
    let signature = token.rsplit_once('.').unwrap().1;
    let mut secrets = vec![token.as_str(), signature];
    if let Ok(issued) = &renewed {
        secrets.push(issued.token.as_str());
    }
    for secret in secrets {
        assert!(!out.contains(secret), "a token reached the log:\n{out}");
    }
}
