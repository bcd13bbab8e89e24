//! Structured logs on standard error: human-readable text or JSON lines.
//! Text is coloured only when standard error is a terminal: files, pipes and
//! the journal get plain text.

use std::io::IsTerminal;

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
