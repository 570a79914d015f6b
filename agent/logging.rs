//! Logging set-up and the rate limiter that keeps a day-long outage from writing a million
//! identical lines.
//!
//! Logs go to stderr, one line per event; under systemd (JOURNAL_STREAM set) timestamps are
//! left to the journal and each line starts with its syslog priority (`<3>` error, `<4>` warning,
//! `<6>` info, `<7>` debug), which journald strips and records, so `journalctl -p warning`
//! works. `EDGESHIP_LOG` (or `RUST_LOG`) sets the filter; `EDGESHIP_LOG_FORMAT=json` switches
//! to JSON lines. Nothing here ever formats a payload or a secret.

use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `default_filter` applies when no variable sets one.
pub fn init(default_filter: &str) {
    let filter = std::env::var("EDGESHIP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let json = std::env::var("EDGESHIP_LOG_FORMAT").is_ok_and(|f| f == "json");
    let _ = if json {
        builder.json().try_init()
    } else if under_journal {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_target(false)
            .with_ansi(false);
        builder
            .with_ansi(false)
            .event_format(JournalPriority(format))
            .try_init()
    } else {
        builder.try_init()
    };
}

/// Prefixes each line with the syslog priority of its level, for journald.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

fn syslog_priority(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// Lets the first occurrence of a repeating condition through, then at most one line per
/// `every`, carrying how many occurrences were not logged in between.
pub(crate) struct Repeated {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
    occurrences: u64,
}

impl Repeated {
    pub(crate) fn new(every: Duration) -> Repeated {
        Repeated {
            every,
            last: None,
            suppressed: 0,
            occurrences: 0,
        }
    }

    /// Records an occurrence; `Some(suppressed_since_last_line)` when it should be logged.
    pub(crate) fn should_log(&mut self) -> Option<u64> {
        self.occurrences += 1;
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Ends the condition: calls `f` with the number of occurrences if there were any.
    pub(crate) fn recovered(&mut self, f: impl FnOnce(u64)) {
        if self.occurrences > 0 {
            f(self.occurrences);
        }
        self.occurrences = 0;
        self.suppressed = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_summarised() {
        let mut r = Repeated::new(Duration::from_secs(3600));
        assert_eq!(r.should_log(), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.should_log(), None);
        }
        let mut seen = 0;
        r.recovered(|n| seen = n);
        assert_eq!(seen, 1001);
        assert_eq!(r.should_log(), Some(0));
    }
}
