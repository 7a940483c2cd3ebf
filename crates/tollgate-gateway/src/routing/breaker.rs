//! A circuit breaker per channel of a model: it opens after `breaker_failures` consecutive
//! failures within `breaker_window_ms`, keeps the channel out of selection for
//! `breaker_open_ms`, then lets one request through as a probe (half-open): the probe's
//! success closes it, its failure opens it again. A probe that never reports (its request was
//! dropped) is replaced by another after `breaker_open_ms`.
//!
//! Pure state: the caller passes the time, and logs and counts a change it sees in `state()`
//! (it compares before and after, as it must anyway for a state read from the shared copy).

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32, first_failure_ms: i64 },
    Open { until_ms: i64 },
    HalfOpen { probe_since_ms: i64 },
}

impl BreakerState {
    /// Every [`BreakerState::label`], for the transition series registered at zero.
    pub const LABELS: [&'static str; 3] = ["closed", "open", "half_open"];

    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// The numbers a breaker obeys (`[routing]`).
#[derive(Clone, Copy, Debug)]
pub struct BreakerPolicy {
    pub failures: u32,
    pub window_ms: i64,
    pub open_ms: i64,
}

/// How a request may use a channel, as its breaker decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: an ordinary request.
    Normal,
    /// Half-open: this request is the one probe.
    Probe,
}

#[derive(Clone, Copy, Debug)]
pub struct Breaker {
    state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { state: BreakerState::Closed { failures: 0, first_failure_ms: 0 } }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// A breaker in a state read from elsewhere (the shared copy).
    pub fn from_state(state: BreakerState) -> Breaker {
        Breaker { state }
    }

    /// From when a request could use the channel (no change of state): closed, always; open,
    /// once its time is up; half-open, once its probe is overdue.
    pub fn admits_from_ms(&self, policy: &BreakerPolicy) -> i64 {
        match self.state {
            BreakerState::Closed { .. } => i64::MIN,
            BreakerState::Open { until_ms } => until_ms,
            BreakerState::HalfOpen { probe_since_ms } => probe_since_ms.saturating_add(policy.open_ms),
        }
    }

    /// Whether a request could use the channel now (no change of state).
    pub fn admits(&self, now_ms: i64, policy: &BreakerPolicy) -> bool {
        now_ms >= self.admits_from_ms(policy)
    }

    /// Lets a request use the channel if it may: an open breaker whose time has come turns
    /// half-open with this request as its probe.
    pub fn admit(&mut self, now_ms: i64, policy: &BreakerPolicy) -> Option<Admission> {
        if !self.admits(now_ms, policy) {
            return None;
        }
        match self.state {
            BreakerState::Closed { .. } => Some(Admission::Normal),
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::HalfOpen { probe_since_ms: now_ms };
                Some(Admission::Probe)
            }
        }
    }

    /// The channel answered well (or answered about the request itself: a 400 is not the
    /// channel's failure).
    pub fn success(&mut self) {
        match self.state {
            BreakerState::Closed { .. } | BreakerState::HalfOpen { .. } => self.state = BreakerState::Closed { failures: 0, first_failure_ms: 0 },
            // An answer from a request admitted before the breaker opened: the failures that
            // opened it are newer news.
            BreakerState::Open { .. } => {}
        }
    }

    /// The channel failed a request (connection, timeout, 5xx, 429, 401/403, a broken answer).
    pub fn failure(&mut self, now_ms: i64, policy: &BreakerPolicy) {
        let open = BreakerState::Open { until_ms: now_ms.saturating_add(policy.open_ms) };
        match self.state {
            BreakerState::Closed { failures, first_failure_ms } => {
                let (failures, first_failure_ms) = if failures == 0 || now_ms.saturating_sub(first_failure_ms) > policy.window_ms {
                    (1, now_ms)
                } else {
                    (failures.saturating_add(1), first_failure_ms)
                };
                self.state = if failures >= policy.failures { open } else { BreakerState::Closed { failures, first_failure_ms } };
            }
            BreakerState::HalfOpen { .. } => self.state = open,
            BreakerState::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: BreakerPolicy = BreakerPolicy { failures: 3, window_ms: 1_000, open_ms: 5_000 };

    #[test]
    fn every_state_label_is_listed_once() {
        let every = [BreakerState::Closed { failures: 0, first_failure_ms: 0 }, BreakerState::Open { until_ms: 0 }, BreakerState::HalfOpen { probe_since_ms: 0 }];
        assert_eq!(every.map(BreakerState::label), BreakerState::LABELS);
    }

    #[test]
    fn opens_after_consecutive_failures_within_the_window_only() {
        let mut breaker = Breaker::default();
        let closed = |failures, first_failure_ms| BreakerState::Closed { failures, first_failure_ms };
        breaker.failure(0, &POLICY);
        breaker.failure(10, &POLICY);
        assert_eq!(breaker.state(), closed(2, 0));
        // A success in between starts the count again.
        breaker.success();
        assert_eq!(breaker.state(), closed(0, 0));
        breaker.failure(20, &POLICY);
        breaker.failure(30, &POLICY);
        // Past the window, the count starts again too.
        breaker.failure(2_000, &POLICY);
        assert_eq!(breaker.state(), closed(1, 2_000));
        breaker.failure(2_100, &POLICY);
        breaker.failure(2_200, &POLICY);
        assert_eq!(breaker.state(), BreakerState::Open { until_ms: 7_200 });
        assert!(!breaker.admits(7_199, &POLICY));
        assert_eq!(breaker.admit(7_199, &POLICY), None);
    }

    #[test]
    fn one_probe_at_a_time_when_half_open_and_its_answer_decides() {
        let mut breaker = Breaker { state: BreakerState::Open { until_ms: 100 } };
        assert_eq!(breaker.admit(100, &POLICY), Some(Admission::Probe));
        assert_eq!(breaker.state(), BreakerState::HalfOpen { probe_since_ms: 100 });
        assert_eq!(breaker.admit(101, &POLICY), None, "a second request waits for the probe");
        // The probe fails: open again, for the whole open time.
        breaker.failure(200, &POLICY);
        assert_eq!(breaker.state(), BreakerState::Open { until_ms: 5_200 });
        assert_eq!(breaker.admit(5_200, &POLICY), Some(Admission::Probe));
        breaker.success();
        assert_eq!(breaker.state().label(), "closed");
        assert_eq!(breaker.admit(5_201, &POLICY), Some(Admission::Normal));
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced_after_the_open_time() {
        let mut breaker = Breaker { state: BreakerState::HalfOpen { probe_since_ms: 0 } };
        assert_eq!(breaker.admit(4_999, &POLICY), None);
        assert_eq!(breaker.admit(5_000, &POLICY), Some(Admission::Probe));
    }

    #[test]
    fn a_late_success_or_failure_leaves_an_open_breaker_as_it_is() {
        let mut breaker = Breaker { state: BreakerState::Open { until_ms: 10 } };
        breaker.success();
        assert_eq!(breaker.state(), BreakerState::Open { until_ms: 10 });
        breaker.failure(5, &POLICY);
        assert_eq!(breaker.state(), BreakerState::Open { until_ms: 10 }, "not pushed further out");
    }
}
