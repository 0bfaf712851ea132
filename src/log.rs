//! Log output on stderr: `CANVAS_LOG` filters it (default `warn`), colour only on a terminal,
//! and every line passes through [`redact`] on its way out, so a password in a URL that some
//! message quotes — ours, sqlx's, a channel's — never reaches the log.

use std::io::{IsTerminal, Write};

use canvas_engine::store::redact;

pub fn init() {
    // Escape codes in a file or a log collector are noise: colour only for a person.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CANVAS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(ansi)
        .with_writer(|| RedactingStderr)
        .init();
}

/// Stderr, with secrets masked. The formatter writes each event with one `write_all`, so a
/// URL is never split across two writes.
struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
