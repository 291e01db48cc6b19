//! Rate limiting of the log lines a guest or a frontend can cause: a device whose guest keeps
//! failing requests, or whose frontend keeps restarting rings, must not flood the host's logs
//! (one such guest wrote 400 MB in 10 s before this existed).
//!
//! A [`LogLimit`] lets `burst` lines through per `window`, then counts the rest and reports how
//! many were suppressed on the next line it lets through ([`LogLimit::allow`] returns the
//! count; the [`limited!`](crate::limited) macro adds it to the line as `suppressed=N`), or on
//! a summary at the end of a session ([`LogLimit::take_suppressed`]).
//!
//! It is shared by every thread that logs for the device (each poller serving one of its
//! queues, the control thread): two atomics, no lock. It is only asked when a line would be
//! logged, so a device that logs nothing costs nothing. A line it lets through reads the clock
//! (it is about to be formatted and written anyway); a line it suppresses costs one atomic add,
//! and only every [`CHECK_EVERY`]-th suppressed line (and the 1st, 2nd, 4th, ... of a flood, so
//! that a short one is summed up soon) reads the clock to see whether the window is over. So
//! a flood after which the device goes quiet is reported with the next line that gets
//! through, at most [`CHECK_EVERY`] lines later; nothing is lost, it is only counted.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A suppressed line looks at the clock at most once per this many (see the module doc).
pub const CHECK_EVERY: u64 = 64;

/// Lets `burst` lines through per window; see the module documentation.
#[derive(Debug)]
pub struct LogLimit {
    /// Grows with what the device does ([`LogLimit::raise`]), never shrinks.
    burst: AtomicU64,
    window_ms: u64,
    /// Lines asked for since the current window began, let through or not.
    count: AtomicU64,
    /// When the current window began: milliseconds since [`epoch`].
    start: AtomicU64,
}

/// What [`LogLimit::allow`] decided.
pub type Allowed = Option<u64>;

impl LogLimit {
    /// A limiter that lets `burst` lines through per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst: AtomicU64::new(burst as u64),
            window_ms: window.as_millis() as u64,
            count: AtomicU64::new(0),
            start: AtomicU64::new(0),
        }
    }

    /// Asks to log one line. `Some(n)`: log it, and say that `n` lines were suppressed since
    /// the last one let through (0 most of the time). `None`: do not log it (it is counted).
    #[inline]
    pub fn allow(&self) -> Allowed {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let burst = self.burst.load(Ordering::Relaxed);
        if n < burst {
            if n == 0 {
                // The first line ever (or since `take_suppressed`) opens the window.
                self.start.store(now_ms(), Ordering::Relaxed);
            }
            return Some(0);
        }
        // Lines suppressed in this window, this one included.
        let over = n + 1 - burst;
        if over % CHECK_EVERY != 0 && !over.is_power_of_two() {
            return None;
        }
        self.roll(burst)
    }

    /// A suppressed line's look at the clock: if the window is over, this line opens the next
    /// one and is let through with the count of the lines suppressed before it.
    #[cold]
    #[inline(never)]
    fn roll(&self, burst: u64) -> Allowed {
        let now = now_ms();
        let start = self.start.load(Ordering::Acquire);
        if now.saturating_sub(start) < self.window_ms {
            return None;
        }
        // Several threads may look at once: the one that moves the window lets its line
        // through, the others stay suppressed (and are counted in the new window).
        if self
            .start
            .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        let seen = self.count.swap(1, Ordering::AcqRel);
        // `seen` counts this line and the `burst` let through before the suppressed ones.
        Some(seen.saturating_sub(burst + 1))
    }

    /// Lets `n` more lines through per window from now on: the device can now cause more of
    /// them (a queue its frontend started).
    pub fn raise(&self, n: u32) {
        self.burst.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// Lines suppressed and not yet reported, which are then forgotten: for a summary line
    /// when the device's session ends. The next line is let through.
    pub fn take_suppressed(&self) -> u64 {
        self.count
            .swap(0, Ordering::AcqRel)
            .saturating_sub(self.burst.load(Ordering::Relaxed))
    }
}

/// Milliseconds since the first time any limiter looked at the clock.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Logs a line through a [`LogLimit`]: `limited!(limit, Level::WARN, field = value, "message")`
/// logs it as `tracing::event!` would if the limiter lets it through, with `suppressed = N`
/// added when lines were suppressed before it.
#[macro_export]
macro_rules! limited {
    ($limit:expr, $level:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            if suppressed == 0 {
                tracing::event!($level, $($arg)+);
            } else {
                tracing::event!($level, suppressed, $($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of `n` lines asked for at once are let through, and the counts they report.
    fn ask(limit: &LogLimit, n: usize) -> (usize, u64) {
        let mut through = 0;
        let mut reported = 0;
        for _ in 0..n {
            if let Some(s) = limit.allow() {
                through += 1;
                reported += s;
            }
        }
        (through, reported)
    }

    #[test]
    fn a_flood_lets_the_burst_through_and_counts_the_rest() {
        let limit = LogLimit::new(3, Duration::from_secs(3600));
        assert_eq!(ask(&limit, 1_000_000), (3, 0));
        assert_eq!(limit.take_suppressed(), 1_000_000 - 3);
        // Forgotten once taken: the next lines get through again.
        assert_eq!(ask(&limit, 2), (2, 0));
    }

    #[test]
    fn a_raised_limit_lets_more_through_in_the_same_window() {
        let limit = LogLimit::new(2, Duration::from_secs(3600));
        assert_eq!(ask(&limit, 3), (2, 0));
        limit.raise(4);
        assert_eq!(
            ask(&limit, 10),
            (3, 0),
            "six in all, one of which was suppressed"
        );
        assert_eq!(limit.take_suppressed(), 13 - 6);
    }

    #[test]
    fn the_next_window_reports_what_the_last_one_suppressed() {
        let limit = LogLimit::new(2, Duration::from_millis(30));
        assert_eq!(ask(&limit, 2 + 40), (2, 0));
        std::thread::sleep(Duration::from_millis(60));
        // The window is over, but suppressed lines look at the clock only now and then: the
        // line that does is let through with the count, at most CHECK_EVERY lines later.
        let (through, reported) = ask(&limit, CHECK_EVERY as usize);
        assert!(through >= 1, "a line of the new window gets through");
        assert!(
            reported >= 40,
            "the new window reports the 40 lines suppressed before it: {reported}"
        );
    }

    #[test]
    fn rare_lines_all_get_through() {
        let limit = LogLimit::new(1, Duration::from_millis(5));
        for _ in 0..5 {
            assert_eq!(limit.allow(), Some(0));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn threads_sharing_a_limiter_let_the_burst_through_once() {
        let limit = LogLimit::new(4, Duration::from_secs(3600));
        let through: usize = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4).map(|_| s.spawn(|| ask(&limit, 10_000).0)).collect();
            runs.into_iter().map(|r| r.join().expect("thread")).sum()
        });
        assert_eq!(through, 4);
        assert_eq!(limit.take_suppressed(), 40_000 - 4);
    }
}
