//! Log lines that a request cannot forge.
//!
//! Two layers. Values a client chooses (a user name) are logged with `?`,
//! quoted and escaped by `Debug` (`user="eve user=admin"`, ESC as
//! `\u{1b}`), so they cannot add fields or terminal sequences. Under that,
//! each event reaches the writer as one buffer ending in a newline; every
//! other line break in it, control character, NEL (U+0085) and line or
//! paragraph separator (U+2028, U+2029) is written escaped (`\n`, `\r`,
//! `\x07`, `\u{2028}`), so one event is always one line, whatever a value
//! logged with `%` holds. ESC itself passes this layer: the text format
//! colours its own output with it.

use std::io::{self, Write};

/// Wraps a writer; see the module documentation.
pub struct OneLine<W>(pub W);

/// The escaped form of one formatted event.
pub fn escape_event(buf: &[u8]) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match (b, body.get(i + 1), body.get(i + 2)) {
            (b'\n', ..) => out.extend_from_slice(b"\\n"),
            (b'\r', ..) => out.extend_from_slice(b"\\r"),
            // Tab is harmless; ESC starts the formatter's own colours.
            (b'\t' | 0x1b, ..) => out.push(b),
            (0..=0x1f | 0x7f, ..) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            // NEL (U+0085), and U+2028/U+2029: line breaks to some readers.
            (0xc2, Some(0x85), _) => {
                out.extend_from_slice(b"\\u{85}");
                i += 1;
            }
            (0xe2, Some(0x80), Some(&c @ (0xa8 | 0xa9))) => {
                out.extend_from_slice(if c == 0xa8 {
                    b"\\u{2028}"
                } else {
                    b"\\u{2029}"
                });
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    out.extend_from_slice(end);
    out
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(&escape_event(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Standard error, one line per event (for `fmt().with_writer`).
pub fn stderr() -> OneLine<io::Stderr> {
    OneLine(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_is_one_line() {
        let forged = b"INFO login user=eve\nINFO login user=admin\n";
        let out = escape_event(forged);
        assert_eq!(out, b"INFO login user=eve\\nINFO login user=admin\n");
        assert_eq!(escape_event(b"a\rb\x07c\td\n"), b"a\\rb\\x07c\td\n");
        assert_eq!(escape_event(b"plain"), b"plain");
        assert_eq!(escape_event(b""), b"");
        let seps = "a\u{85}b\u{2028}c\u{2029}d\u{e9}\u{2027}\n";
        assert_eq!(
            escape_event(seps.as_bytes()),
            "a\\u{85}b\\u{2028}c\\u{2029}d\u{e9}\u{2027}\n".as_bytes()
        );
        // A truncated sequence at the end is left as it is.
        assert_eq!(escape_event(b"a\xe2\x80"), b"a\xe2\x80");
    }

    #[test]
    fn through_a_subscriber() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || OneLine(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let name = "eve\n2026-01-01T00:00:00Z  INFO login user=admin";
            tracing::info!(user = %name, "login refused");
            // As the service logs a name a client chose: quoted, escaped.
            let name = "eve\u{1b}[2J\u{2028}\u{85} user=admin";
            tracing::info!(user = ?name, "login refused");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("eve\\n2026"), "{text}");
        assert!(
            text.contains(r#"user="eve\u{1b}[2J\u{2028}\u{85} user=admin""#),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }
}
