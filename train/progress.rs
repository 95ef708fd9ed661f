//! Progress of long jobs (import, regenerate, distill, train, eval), visible wherever the output
//! goes. On a terminal it is an indicatif bar. Anywhere else (a log file, `nohup`, Slurm, `| tee`)
//! a bar would be invisible, so a plain line is printed to stderr at a steady interval instead,
//! from a small ticker thread, so even a job whose unit of work takes minutes leaves a line:
//!
//! ```text
//! [train] 120/400 (30.0%) 0.52/s elapsed 3m50s eta 8m58s | loss 27.9612 | 301 tok/s
//! ```
//!
//! The interval is 30 s, or `CLOVER_PROGRESS_SECS` when set (0.1 s to a day; a value outside is
//! reported once and the default kept).

use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between plain progress lines when stderr is not a terminal.
pub const DEFAULT_INTERVAL_SECS: f64 = 30.0;

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    plain: Option<Arc<Shared>>,
    ticker: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    done: u64,
    total: u64,
    /// Position at creation (a resumed job): the rate counts only this run's work.
    start_pos: u64,
    message: String,
    started: Instant,
    finished: bool,
}

impl Progress {
    /// A progress display for `total` units of work named `label` (e.g. "train", "distill").
    pub fn new(label: &str, total: u64) -> Self {
        Self::with_mode(label, total, std::io::stderr().is_terminal())
    }

    /// No output at all (tests, or a config that turns progress off).
    pub fn hidden(label: &str) -> Self {
        Progress {
            label: label.to_string(),
            bar: None,
            plain: None,
            ticker: None,
        }
    }

    fn with_mode(label: &str, total: u64, terminal: bool) -> Self {
        if terminal {
            let bar = ProgressBar::new(total);
            let template = format!(
                "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta}}] {{msg}}"
            );
            bar.set_style(
                ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            return Progress {
                label: label.to_string(),
                bar: Some(bar),
                plain: None,
                ticker: None,
            };
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                done: 0,
                total,
                start_pos: 0,
                message: String::new(),
                started: Instant::now(),
                finished: false,
            }),
            wake: Condvar::new(),
        });
        let interval = interval();
        let ticker = {
            let shared = Arc::clone(&shared);
            let label = label.to_string();
            std::thread::spawn(move || tick(&label, &shared, interval))
        };
        Progress {
            label: label.to_string(),
            bar: None,
            plain: Some(shared),
            ticker: Some(ticker),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        if let Some(shared) = &self.plain {
            if let Ok(mut state) = shared.state.lock() {
                f(&mut state);
            }
        }
    }

    /// Sets the position.
    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
        }
        self.update(|s| s.done = pos);
    }

    /// A resumed job starts at `pos`: the rate and ETA count only this run's work.
    pub fn resume_from(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.reset_eta();
        }
        self.update(|s| {
            s.done = pos;
            s.start_pos = pos;
            s.started = Instant::now();
        });
    }

    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        self.update(|s| s.done += n);
    }

    /// A short status (loss, tokens/s) shown after the counts.
    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        if let Some(bar) = &self.bar {
            bar.set_message(message.clone());
        }
        self.update(|s| s.message = message);
    }

    /// A whole line (an eval result, a warning) that does not disturb the bar.
    pub fn println(&self, line: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(line.as_ref()),
            None => eprintln!("[{}] {}", self.label, line.as_ref()),
        }
    }

    /// Ends the display; in plain mode prints the final line.
    pub fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        if let Some(shared) = self.plain.take() {
            let line = shared.state.lock().ok().map(|mut s| {
                s.finished = true;
                render(&self.label, &s)
            });
            shared.wake.notify_all();
            if let Some(t) = self.ticker.take() {
                let _ = t.join();
            }
            if let Some(line) = line {
                eprintln!("{line} done");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Stop the ticker quietly when a job ends early (an error); `finish` prints the last line.
        if let Some(shared) = self.plain.take() {
            if let Ok(mut s) = shared.state.lock() {
                s.finished = true;
            }
            shared.wake.notify_all();
            if let Some(t) = self.ticker.take() {
                let _ = t.join();
            }
        }
    }
}

/// The range CLOVER_PROGRESS_SECS may set: at most ten lines a second (faster floods a log with
/// nothing new), at least one a day.
pub const INTERVAL_RANGE_SECS: std::ops::RangeInclusive<f64> = 0.1..=86400.0;

fn interval() -> Duration {
    let default = Duration::from_secs_f64(DEFAULT_INTERVAL_SECS);
    let Ok(text) = std::env::var("CLOVER_PROGRESS_SECS") else {
        return default;
    };
    crate::checks::seconds_in("CLOVER_PROGRESS_SECS", &text, INTERVAL_RANGE_SECS).unwrap_or_else(
        |problem| {
            // Progress is only a display: a bad value must not stop a job, but must not pass
            // silently either. Said once, not once per progress display.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!("warning: {problem}; printing progress every {DEFAULT_INTERVAL_SECS} s")
            });
            default
        },
    )
}

/// The ticker: one plain line per interval until the job finishes.
fn tick(label: &str, shared: &Shared, interval: Duration) {
    let Ok(mut state) = shared.state.lock() else {
        return;
    };
    loop {
        let deadline = Instant::now() + interval;
        while !state.finished {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = match shared.wake.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(_) => return,
            };
        }
        if state.finished {
            return;
        }
        eprintln!("{}", render(label, &state));
    }
}

fn render(label: &str, s: &State) -> String {
    let elapsed = s.started.elapsed().as_secs_f64();
    let done_here = s.done.saturating_sub(s.start_pos) as f64;
    let rate = done_here / elapsed.max(1e-9);
    let pct = 100.0 * s.done as f64 / (s.total.max(1)) as f64;
    let eta = if rate > 0.0 {
        format_secs(s.total.saturating_sub(s.done) as f64 / rate)
    } else {
        "?".into()
    };
    let mut line = format!(
        "[{label}] {}/{} ({pct:.1}%) {rate:.2}/s elapsed {} eta {eta}",
        s.done,
        s.total,
        format_secs(elapsed)
    );
    if !s.message.is_empty() {
        line.push_str(" | ");
        line.push_str(&s.message);
    }
    line
}

fn format_secs(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_names_counts_rate_and_message() {
        let s = State {
            done: 30,
            total: 120,
            start_pos: 10,
            message: "loss 1.5".into(),
            started: Instant::now() - Duration::from_secs(10),
            finished: false,
        };
        let line = render("train", &s);
        assert!(line.starts_with("[train] 30/120 (25.0%) 2.0"), "{line}");
        assert!(line.ends_with("| loss 1.5"), "{line}");
        assert_eq!(format_secs(3725.0), "1h02m");
        assert_eq!(format_secs(125.0), "2m05s");
    }
}
