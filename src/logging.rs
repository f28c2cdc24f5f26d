//! Log lines that a request cannot forge: the text format writes values
//! (a user name, a path) as they are, so a name holding a newline could
//! start a line of its own. Each event reaches the writer as one buffer
//! ending in a newline; every other line break or control character in it
//! is written escaped (`\n`, `\r`, `\x07`), so one event is always one line.

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
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            // Tab is harmless; ESC starts the formatter's own colours (and
            // tracing-subscriber escapes it in values already).
            b'\t' | 0x1b => out.push(b),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
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
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("eve\\n2026"), "{text}");
    }
}
