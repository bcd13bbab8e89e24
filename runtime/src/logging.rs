//! Structured logs on standard error: human-readable text or JSON lines.
//! Text is coloured only when standard error is a terminal: files, pipes and
//! the journal get plain text.

use std::fmt::Display;
use std::io::IsTerminal;

/// `items` as one log field, space-separated (`0 1 5`): JSON logs carry a
/// plain string rather than Rust's debug syntax (`[0, 1, 5]`).
pub fn listed<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
}

/// A map as one log field, `key=value` pairs space-separated (`0=120 1=96`),
/// rather than Rust's debug syntax (`{0: 120, 1: 96}`).
pub fn pairs<K: Display, V: Display>(items: impl IntoIterator<Item = (K, V)>) -> String {
    items.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

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
