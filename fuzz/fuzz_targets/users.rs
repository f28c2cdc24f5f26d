//! The users file (`name:hash` lines, bcrypt or argon2id): any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpolicy::service::users::Users;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(users) = Users::parse(text, "fuzz") else {
        return;
    };
    // Accepted means every user line was read, once, under its own name.
    let mut lines = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        lines += 1;
        let (name, _) = line.split_once(':').expect("an accepted line has a colon");
        let user = users.get(name).expect("an accepted line's user is known");
        assert_eq!(user.name, name);
        assert!(!name.is_empty() && !name.chars().any(char::is_whitespace));
    }
    assert_eq!(users.len(), lines);
});
