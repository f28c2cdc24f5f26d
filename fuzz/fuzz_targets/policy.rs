//! A TokenPolicy YAML document, as `serve --policy` reads it: any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpolicy::policy::{GRACE_BOUNDS, Policy, RENEW_LIMIT_BOUNDS, SESSION_BOUNDS, TOKEN_BOUNDS};

fn within(v: u64, (min, max): (u64, u64)) -> bool {
    (min..=max).contains(&v)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Policy::from_yaml(text) else {
        return;
    };
    // Whatever is accepted keeps the policy's rules.
    assert!(within(p.session, SESSION_BOUNDS));
    assert!(within(p.token, TOKEN_BOUNDS));
    assert!(within(p.renew_limit, RENEW_LIMIT_BOUNDS));
    assert!(within(p.grace, GRACE_BOUNDS));
    assert!(p.token <= p.session, "a token outlives its session");
    assert!(p.renew_limit <= p.session);
});
