//! A circuit breaker per channel of a model: it opens after `breaker_failures` consecutive
//! failures within `breaker_window_ms`, keeps the channel out of selection for
//! `breaker_open_ms`, then lets one request through as a probe (half-open): the probe's
//! success closes it, its failure opens it again. A probe that never reports (its request was
//! dropped) is replaced by another after `breaker_open_ms`.
//!
//! Pure state: the caller passes the time and logs and counts the transitions it is handed.

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32, first_failure_ms: i64 },
    Open { until_ms: i64 },
    HalfOpen { probe_since_ms: i64 },
}

impl BreakerState {
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

/// A change of state, for the caller's log line and metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
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

    /// Whether a request could use the channel now (no change of state).
    pub fn admits(&self, now_ms: i64, policy: &BreakerPolicy) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until_ms } => now_ms >= until_ms,
            BreakerState::HalfOpen { probe_since_ms } => now_ms.saturating_sub(probe_since_ms) >= policy.open_ms,
        }
    }

    /// Lets a request use the channel if it may: an open breaker whose time has come turns
    /// half-open with this request as its probe.
    pub fn admit(&mut self, now_ms: i64, policy: &BreakerPolicy) -> Option<(Admission, Option<Transition>)> {
        if !self.admits(now_ms, policy) {
            return None;
        }
        match self.state {
            BreakerState::Closed { .. } => Some((Admission::Normal, None)),
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {
                let transition = self.set(BreakerState::HalfOpen { probe_since_ms: now_ms });
                Some((Admission::Probe, transition))
            }
        }
    }

    /// The channel answered well (or answered about the request itself: a 400 is not the
    /// channel's failure).
    pub fn success(&mut self) -> Option<Transition> {
        match self.state {
            BreakerState::Closed { failures: 0, .. } => None,
            BreakerState::Closed { .. } | BreakerState::HalfOpen { .. } => self.set(BreakerState::Closed { failures: 0, first_failure_ms: 0 }),
            // An answer from a request admitted before the breaker opened: the failures that
            // opened it are newer news.
            BreakerState::Open { .. } => None,
        }
    }

    /// The channel failed a request (connection, timeout, 5xx, 429, 401/403, a broken answer).
    pub fn failure(&mut self, now_ms: i64, policy: &BreakerPolicy) -> Option<Transition> {
        match self.state {
            BreakerState::Closed { failures, first_failure_ms } => {
                let (failures, first_failure_ms) = if failures == 0 || now_ms.saturating_sub(first_failure_ms) > policy.window_ms {
                    (1, now_ms)
                } else {
                    (failures.saturating_add(1), first_failure_ms)
                };
                if failures >= policy.failures {
                    self.set(BreakerState::Open { until_ms: now_ms.saturating_add(policy.open_ms) })
                } else {
                    self.state = BreakerState::Closed { failures, first_failure_ms };
                    None
                }
            }
            BreakerState::HalfOpen { .. } => self.set(BreakerState::Open { until_ms: now_ms.saturating_add(policy.open_ms) }),
            BreakerState::Open { .. } => None,
        }
    }

    fn set(&mut self, to: BreakerState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from.label() != to.label()).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: BreakerPolicy = BreakerPolicy { failures: 3, window_ms: 1_000, open_ms: 5_000 };

    #[test]
    fn opens_after_consecutive_failures_within_the_window_only() {
        let mut breaker = Breaker::default();
        assert_eq!(breaker.failure(0, &POLICY), None);
        assert_eq!(breaker.failure(10, &POLICY), None);
        // A success in between starts the count again.
        assert!(breaker.success().is_none(), "closed stays closed");
        assert_eq!(breaker.failure(20, &POLICY), None);
        assert_eq!(breaker.failure(30, &POLICY), None);
        // Past the window, the count starts again too.
        assert_eq!(breaker.failure(2_000, &POLICY), None);
        assert_eq!(breaker.failure(2_100, &POLICY), None);
        let opened = breaker.failure(2_200, &POLICY).unwrap();
        assert_eq!(opened.to, BreakerState::Open { until_ms: 7_200 });
        assert!(!breaker.admits(7_199, &POLICY));
        assert_eq!(breaker.admit(7_199, &POLICY), None);
    }

    #[test]
    fn one_probe_at_a_time_when_half_open_and_its_answer_decides() {
        let mut breaker = Breaker { state: BreakerState::Open { until_ms: 100 } };
        let (admission, transition) = breaker.admit(100, &POLICY).unwrap();
        assert_eq!(admission, Admission::Probe);
        assert_eq!(transition.unwrap().to.label(), "half_open");
        assert_eq!(breaker.admit(101, &POLICY), None, "a second request waits for the probe");
        // The probe fails: open again, for the whole open time.
        assert_eq!(breaker.failure(200, &POLICY).unwrap().to, BreakerState::Open { until_ms: 5_200 });
        let (admission, _) = breaker.admit(5_200, &POLICY).unwrap();
        assert_eq!(admission, Admission::Probe);
        assert_eq!(breaker.success().unwrap().to.label(), "closed");
        assert_eq!(breaker.admit(5_201, &POLICY), Some((Admission::Normal, None)));
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced_after_the_open_time() {
        let mut breaker = Breaker { state: BreakerState::HalfOpen { probe_since_ms: 0 } };
        assert_eq!(breaker.admit(4_999, &POLICY), None);
        assert_eq!(breaker.admit(5_000, &POLICY).unwrap().0, Admission::Probe);
    }

    #[test]
    fn a_late_success_does_not_close_an_open_breaker() {
        let mut breaker = Breaker { state: BreakerState::Open { until_ms: 10 } };
        assert_eq!(breaker.success(), None);
        assert_eq!(breaker.state(), BreakerState::Open { until_ms: 10 });
    }
}
