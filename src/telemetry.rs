//! Logging set-up: `tracing` to stderr (or another writer), text or JSON.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Logs to stderr, in colour on a terminal only (log files and collectors
/// get plain text).
pub fn init(settings: &LogSettings) {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_to(settings, std::io::stderr, ansi);
}

/// Logs to `writer`. `RUST_LOG`, when set, overrides the configured level.
pub fn init_to<W>(settings: &LogSettings, writer: W, ansi: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
