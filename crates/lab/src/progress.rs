//! A status line on stderr, rewritten in place while a run goes on.

use std::io::Write;
use std::time::{Duration, Instant};

pub struct Progress {
    every: Duration,
    last: Instant,
}

impl Progress {
    /// A line at most once `every`, the first one `every` from now.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            last: Instant::now(),
        }
    }

    /// True when the next line is due; then not again for `every`.
    pub fn due(&mut self) -> bool {
        if self.last.elapsed() > self.every {
            self.last = Instant::now();
            return true;
        }
        false
    }

    /// Writes `line` over the previous one.
    pub fn show(&self, line: &str) {
        eprint!("\r{line}   ");
        let _ = std::io::stderr().flush();
    }

    /// Ends the line, so that what follows starts on a fresh one.
    pub fn end(&self) {
        eprintln!();
    }
}
