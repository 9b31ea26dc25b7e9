//! Logging setup: `RUST_LOG` filtering (default `info`), text or JSON lines on stderr.
//!
//! Log lines carry values from outside (payload samples, channel names,
//! client codes). In text format every field and message is written with
//! control characters escaped, so no value can end a line early and forge
//! another, or steer a terminal; JSON lines escape them by construction.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::Field;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::field::delimited::Delimited;
use tracing_subscriber::fmt::format::{self, Writer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.fmt_fields(escaped_fields()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// How [`write_field`] is held by the field formatter.
type FieldWriter = fn(&mut Writer<'_>, &Field, &dyn fmt::Debug) -> fmt::Result;

/// The text format's field formatter: every field through [`write_field`],
/// space-separated. One definition, so the tests check what `init` installs.
fn escaped_fields() -> Delimited<&'static str, format::FieldFn<FieldWriter>> {
    format::debug_fn(write_field as FieldWriter).delimited(" ")
}

/// Writes one field as `name=value` (the message bare), escaping control
/// characters in the value whichever way (`%` or `?`) it was recorded.
fn write_field(writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    if field.name() != "message" {
        write!(writer, "{}=", field.name())?;
    }
    write!(Escaping(writer), "{value:?}")
}

/// A `fmt::Write` that passes text through with every character that is not
/// printable escaped: control characters (`\n`, `\r`, `\u{1b}`), line and
/// paragraph separators, and invisible format characters such as bidi
/// overrides (`\u{202e}`), which could make a line read as something else.
struct Escaping<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let odd = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "{}", odd.escape_debug())?;
            rest = &rest[at + odd.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Whether `c` is shown escaped: an ASCII control character, or a non-ASCII
/// one that Rust's `Debug` would escape (not printable).
fn needs_escape(c: char) -> bool {
    c.is_ascii_control() || (!c.is_ascii() && c.escape_debug().len() > 1)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(json: bool, log: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        if json {
            let subscriber = builder.json().flatten_event(true).finish();
            tracing::subscriber::with_default(subscriber, log);
        } else {
            let subscriber = builder.fmt_fields(escaped_fields()).finish();
            tracing::subscriber::with_default(subscriber, log);
        }
        let bytes = captured.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("log lines are UTF-8")
    }

    #[test]
    fn outside_values_cannot_forge_a_log_line() {
        let hostile = "x\n2026-01-01T00:00:00Z  INFO forged: admin logged in\r\u{1b}[2J";
        for json in [false, true] {
            let out = logged(json, || {
                tracing::warn!(sample = %hostile, channel = ?hostile, "rejected {hostile}");
            });
            assert_eq!(out.lines().count(), 1, "one event, one line: {out:?}");
            assert!(out.ends_with('\n'));
            assert!(!out.contains('\r') && !out.contains('\u{1b}'), "{out:?}");
            assert!(
                out.contains(r"x\n2026"),
                "the newline is shown escaped: {out:?}"
            );
        }
    }

    #[test]
    fn invisible_and_reordering_characters_are_shown_escaped() {
        let hostile = "ok\u{202e}nimda\u{2028}next";
        let out = logged(false, || tracing::warn!(channel = %hostile, "x"));
        assert!(
            !out.contains('\u{202e}') && !out.contains('\u{2028}'),
            "{out:?}"
        );
        assert!(out.contains(r"ok\u{202e}nimda\u{2028}next"), "{out:?}");
        let accents = logged(false, || tracing::info!(name = %"café €", "x"));
        assert!(
            accents.contains("name=café €"),
            "printable text stays as is: {accents:?}"
        );
    }

    #[test]
    fn ordinary_text_is_written_as_is() {
        let out = logged(
            false,
            || tracing::info!(client = %"acme", count = 3, "listening"),
        );
        assert!(out.contains("listening client=acme count=3"), "{out:?}");
    }
}
