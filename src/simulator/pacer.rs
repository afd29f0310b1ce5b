//! Pacing at a steady rate: a token bucket in its GCRA form.
//!
//! Invariant: the n-th token is due at `start + n / rate` however late the caller wakes,
//! as long as it is not more than a burst behind. A sleep per order would instead add every
//! wake-up's lateness to the schedule, and the achieved rate would drift below the target.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Pacer {
    /// `None`: unpaced, every token is due at once.
    interval: Option<Duration>,
    /// How far behind schedule the bucket may let the caller catch up.
    slack: Duration,
    /// When the next token is due; `None` before the first.
    next: Option<Instant>,
}

impl Pacer {
    /// `rate` tokens per second (0 or less, or not finite: unpaced). The bucket holds
    /// `burst` tokens (at least 2, so one late wake-up never loses time).
    pub fn new(rate: f64, burst: u32) -> Self {
        let interval =
            (rate > 0.0 && rate.is_finite()).then(|| Duration::from_secs_f64(1.0 / rate));
        let slack = interval.map_or(Duration::ZERO, |i| i * (burst.max(2) - 1));
        Pacer {
            interval,
            slack,
            next: None,
        }
    }

    /// A bucket holding a twentieth of a second's tokens (at least 2): enough to absorb
    /// the timer's granularity at thousands per second.
    pub fn for_rate(rate: f64) -> Self {
        let burst = if rate.is_finite() && rate > 0.0 {
            (rate / 20.0).ceil().min(f64::from(u32::MAX)) as u32
        } else {
            1
        };
        Pacer::new(rate, burst)
    }

    /// Takes a token at `now`; returns when it is due (`now` or later). Pure, so the
    /// schedule is tested without sleeping.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let Some(interval) = self.interval else {
            return now;
        };
        let mut due = self.next.unwrap_or(now);
        // Idle time banks at most `slack` worth of tokens.
        if let Some(earliest) = now.checked_sub(self.slack)
            && due < earliest
        {
            due = earliest;
        }
        self.next = Some(due + interval);
        due.max(now)
    }

    /// Waits until the next token is due.
    pub async fn acquire(&mut self) {
        let now = Instant::now();
        let due = self.reserve(now);
        // A due token is taken at once: even a zero sleep would wait for a timer tick.
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller who always wakes 3 ms late still gets 1,000 tokens at 100/s in 10 s.
    #[test]
    fn late_wakeups_do_not_drift() {
        let t0 = Instant::now();
        let mut p = Pacer::for_rate(100.0);
        let mut now = t0;
        for _ in 0..1000 {
            let due = p.reserve(now);
            now = due + Duration::from_millis(3);
        }
        let elapsed = now - t0;
        assert!(
            elapsed >= Duration::from_millis(9_990) && elapsed <= Duration::from_millis(10_010),
            "{elapsed:?}"
        );
    }

    /// After idling, the bucket lets at most `burst` tokens through at once.
    #[test]
    fn idle_time_banks_at_most_a_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10.0, 4);
        assert_eq!(p.reserve(t0), t0);
        let later = t0 + Duration::from_secs(60);
        let immediate = (0..10).take_while(|_| p.reserve(later) == later).count();
        assert_eq!(immediate, 4);
    }

    #[test]
    fn unpaced_never_waits() {
        let t0 = Instant::now();
        let mut p = Pacer::for_rate(0.0);
        assert!((0..100).all(|_| p.reserve(t0) == t0));
    }
}
