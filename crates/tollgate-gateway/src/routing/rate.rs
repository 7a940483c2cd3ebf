//! A channel's requests and tokens per minute against the limits its upstream sets for the
//! channel's credentials (`requests_per_minute_max`, `tokens_per_minute_max`): past either,
//! selection skips the channel as it skips a full one, so requests fail over instead of
//! collecting the upstream's 429s.
//!
//! The last minute is estimated from two fixed minutes: the previous one's count weighted by
//! the share of it still inside the last 60 s, plus the current one's count (two counters a
//! limit however busy the channel). Requests count when an attempt is sent; tokens (input,
//! cached, cache writes and output, as charged) when the request's usage is known, so the
//! requests in flight are not yet in the token count: `concurrent_requests_max` bounds those.
//!
//! Services mode: each gateway counts what it sends and, every `routing.breaker_sync_ms`, adds
//! it to the channel's shared counts in Redis and reads back the fleet's; a fleet keeps a limit
//! to within what it sends in one period. Embedded mode: the process's own counts.

pub const MINUTE_MS: i64 = 60_000;

/// What a limit counts; the index of its count in a `[requests, tokens]` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Requests = 0,
    Tokens = 1,
}

/// The rate limits of a channel; `None`: none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

impl RateLimits {
    pub fn any(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }

    fn pairs(&self) -> impl Iterator<Item = (Measure, u64)> {
        [(Measure::Requests, self.requests_per_minute), (Measure::Tokens, self.tokens_per_minute)].into_iter().filter_map(|(measure, max)| max.map(|max| (measure, max)))
    }
}

/// The counts of a channel's current and previous minute.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Unix ms / 60,000 of `current`.
    minute: i64,
    current: [u64; 2],
    previous: [u64; 2],
    /// Counted here since the last exchange with the shared counts (services mode).
    unshared: [u64; 2],
}

impl Window {
    /// Moves to the minute of `now_ms` (a clock set back stays in the later minute).
    fn roll(&mut self, now_ms: i64) {
        let minute = now_ms.div_euclid(MINUTE_MS);
        if minute > self.minute {
            self.previous = if minute == self.minute.saturating_add(1) { self.current } else { [0; 2] };
            self.current = [0; 2];
            self.minute = minute;
        }
    }

    /// The estimated count of `measure` over the 60 s up to `now_ms`.
    pub fn used(&mut self, now_ms: i64, measure: Measure) -> u64 {
        self.roll(now_ms);
        let index = measure as usize;
        let previous_left = MINUTE_MS - now_ms.rem_euclid(MINUTE_MS);
        weighted(self.previous[index], previous_left).saturating_add(self.current[index])
    }

    /// Whether every limit has room at `now_ms`.
    pub fn has_room(&mut self, now_ms: i64, limits: &RateLimits) -> bool {
        limits.pairs().all(|(measure, max)| self.used(now_ms, measure) < max)
    }

    pub fn count(&mut self, now_ms: i64, measure: Measure, amount: u64) {
        self.roll(now_ms);
        let index = measure as usize;
        self.current[index] = self.current[index].saturating_add(amount);
        self.unshared[index] = self.unshared[index].saturating_add(amount);
    }

    /// Takes back what [`Window::count`] counted in `minute` (a request that was not sent after all).
    pub fn uncount(&mut self, minute: i64, measure: Measure, amount: u64) {
        let index = measure as usize;
        if minute == self.minute {
            self.current[index] = self.current[index].saturating_sub(amount);
        } else if minute == self.minute.saturating_sub(1) {
            self.previous[index] = self.previous[index].saturating_sub(amount);
        }
        self.unshared[index] = self.unshared[index].saturating_sub(amount);
    }

    pub fn minute(&self) -> i64 {
        self.minute
    }

    /// The earliest time from `now_ms` at which every limit has room if nothing more is sent.
    pub fn room_from_ms(&mut self, now_ms: i64, limits: &RateLimits) -> i64 {
        self.roll(now_ms);
        let minute_start = self.minute.saturating_mul(MINUTE_MS);
        let from = |(measure, max): (Measure, u64)| {
            let index = measure as usize;
            let (previous, current) = (self.previous[index], self.current[index]);
            if current >= max {
                // Only once this minute is the previous one, weighing less than `max`.
                return minute_start.saturating_add(MINUTE_MS).saturating_add(MINUTE_MS - last_left_below(current, max));
            }
            // floor(previous × left / 60,000) + current < max while left ≤ the bound.
            minute_start.saturating_add(MINUTE_MS - last_left_below(previous, max - current))
        };
        limits.pairs().map(from).fold(now_ms, i64::max)
    }

    /// Takes what was counted here since the last exchange, to add to the shared counts of
    /// the minute of `now_ms` — the window moved there first: a gateway that has sent the
    /// channel nothing this minute must still read the fleet's count of it.
    pub fn take_unshared(&mut self, now_ms: i64) -> (i64, [u64; 2]) {
        self.roll(now_ms);
        (self.minute, std::mem::take(&mut self.unshared))
    }

    /// Gives back what [`Window::take_unshared`] took, when it could not be shared.
    pub fn restore_unshared(&mut self, taken: [u64; 2]) {
        for (unshared, taken) in self.unshared.iter_mut().zip(taken) {
            *unshared = unshared.saturating_add(taken);
        }
    }

    /// Takes the fleet's counts of `minute` and the one before, read after this process's were
    /// added; what was counted here since then comes on top. A count never goes down: what
    /// this process knows it sent stays counted.
    pub fn adopt_shared(&mut self, minute: i64, current: [u64; 2], previous: [u64; 2]) {
        let raise = |mine: &mut [u64; 2], theirs: [u64; 2], unshared: [u64; 2]| {
            for ((mine, theirs), unshared) in mine.iter_mut().zip(theirs).zip(unshared) {
                *mine = (*mine).max(theirs.saturating_add(unshared));
            }
        };
        if minute == self.minute {
            raise(&mut self.current, current, self.unshared);
            raise(&mut self.previous, previous, [0; 2]);
        } else if minute == self.minute.saturating_sub(1) {
            raise(&mut self.previous, current, [0; 2]);
        }
    }
}

/// `count × left / 60,000`, rounded down.
fn weighted(count: u64, left_ms: i64) -> u64 {
    let left = u128::try_from(left_ms.clamp(0, MINUTE_MS)).unwrap_or(0);
    u64::try_from(u128::from(count) * left / MINUTE_MS as u128).unwrap_or(u64::MAX)
}

/// The largest `left` (ms of the previous minute still inside the last 60 s) at which
/// `weighted(count, left) < room`, for `room` ≥ 1: left < room × 60,000 / count.
fn last_left_below(count: u64, room: u64) -> i64 {
    if count == 0 {
        return MINUTE_MS;
    }
    let bound = (u128::from(room) * MINUTE_MS as u128).div_ceil(u128::from(count)) - 1;
    i64::try_from(bound.min(MINUTE_MS as u128)).unwrap_or(MINUTE_MS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: RateLimits = RateLimits { requests_per_minute: Some(10), tokens_per_minute: None };

    /// A steady rate is never undercounted: after a full minute of one request a second, the
    /// estimate is 60 at every moment of the next minute (the true count of the last 60 s).
    #[test]
    fn a_steady_rate_is_counted_as_it_is() {
        let mut window = Window::default();
        let start = 10 * MINUTE_MS;
        for second in 0..120 {
            let now_ms = start + second * 1_000;
            window.count(now_ms, Measure::Requests, 1);
            if second >= 60 {
                let used = window.used(now_ms, Measure::Requests);
                assert!((60..=61).contains(&used), "second {second}: {used}");
            }
        }
    }

    #[test]
    fn a_burst_fades_over_the_next_minute() {
        let mut window = Window::default();
        let start = 5 * MINUTE_MS;
        for _ in 0..10 {
            window.count(start + 59_000, Measure::Requests, 1);
        }
        assert!(!window.has_room(start + 59_999, &LIMITS));
        // A quarter into the next minute three quarters of the burst still count.
        assert_eq!(window.used(start + MINUTE_MS + 15_000, Measure::Requests), 7);
        assert!(window.has_room(start + MINUTE_MS + 15_000, &LIMITS));
        assert_eq!(window.used(start + 3 * MINUTE_MS, Measure::Requests), 0, "two minutes on, nothing");
    }

    /// `room_from_ms` against a search of every millisecond: room then, none the ms before.
    #[test]
    fn room_comes_back_exactly_when_said() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for case in 0..300 {
            let limits = RateLimits { requests_per_minute: Some(1 + next(20)), tokens_per_minute: (next(2) == 0).then(|| 1 + next(5_000)) };
            let mut window = Window::default();
            let base = 100 * MINUTE_MS;
            for _ in 0..next(40) {
                let at = base + i64::try_from(next(2 * MINUTE_MS as u64)).unwrap();
                window.count(at, Measure::Requests, 1);
                window.count(at, Measure::Tokens, next(600));
            }
            let now_ms = base + 2 * MINUTE_MS - 1 + i64::try_from(next(1_000)).unwrap();
            let said = window.clone().room_from_ms(now_ms, &limits);
            assert!(said >= now_ms);
            assert!(window.clone().has_room(said, &limits), "case {case}: no room at {said}");
            if said > now_ms {
                assert!(!window.clone().has_room(said - 1, &limits), "case {case}: room before {said}");
            }
            let searched = (now_ms..now_ms + 3 * MINUTE_MS).find(|at| window.clone().has_room(*at, &limits));
            assert_eq!(searched, Some(said), "case {case}");
        }
    }

    #[test]
    fn a_request_not_sent_is_taken_back_and_unlimited_channels_always_have_room() {
        let mut window = Window::default();
        window.count(MINUTE_MS, Measure::Requests, 10);
        assert!(!window.has_room(MINUTE_MS, &LIMITS));
        window.uncount(window.minute(), Measure::Requests, 1);
        assert!(window.has_room(MINUTE_MS, &LIMITS));
        assert!(window.has_room(MINUTE_MS, &RateLimits::default()));
        window.count(MINUTE_MS, Measure::Tokens, u64::MAX);
        assert!(window.has_room(MINUTE_MS, &LIMITS), "tokens unlimited");
    }

    /// Two gateways each sending 6 of a limit of 10 would each think they had room; through
    /// the shared counts each sees 12 and stops.
    #[test]
    fn shared_counts_include_the_other_gateways_and_keep_this_ones() {
        let (mut first, mut second) = (Window::default(), Window::default());
        let now_ms = 7 * MINUTE_MS + 1_000;
        first.count(now_ms, Measure::Requests, 6);
        second.count(now_ms, Measure::Requests, 6);
        assert!(first.has_room(now_ms, &LIMITS) && second.has_room(now_ms, &LIMITS));
        let mut shared = [0u64; 2];
        for window in [&mut first, &mut second] {
            let (minute, taken) = window.take_unshared(now_ms);
            shared[0] += taken[0];
            window.adopt_shared(minute, shared, [0; 2]);
        }
        // The first exchanged before the second had added: it learns the rest next period.
        assert!(first.has_room(now_ms, &LIMITS));
        assert!(!second.has_room(now_ms, &LIMITS));
        let (minute, taken) = first.take_unshared(now_ms);
        assert_eq!(taken, [0, 0], "nothing new here");
        first.count(now_ms, Measure::Requests, 1);
        first.adopt_shared(minute, shared, [0; 2]);
        assert_eq!(first.used(now_ms, Measure::Requests), 13, "the fleet's 12 and the one sent since");
        // A Redis that does not answer: the taken counts go back and are added next time.
        let (_, taken) = first.take_unshared(now_ms);
        first.restore_unshared(taken);
        assert_eq!(first.take_unshared(now_ms).1, [1, 0]);
        // A lower shared count (Redis lost it) never lowers what this process counted.
        first.adopt_shared(minute, [0; 2], [0; 2]);
        assert_eq!(first.used(now_ms, Measure::Requests), 13);
        // A gateway that has sent the channel nothing yet exchanges for this minute all the same.
        let mut idle = Window::default();
        let (minute, taken) = idle.take_unshared(now_ms);
        assert_eq!((minute, taken), (now_ms / MINUTE_MS, [0, 0]));
        idle.adopt_shared(minute, shared, [0; 2]);
        assert!(!idle.has_room(now_ms, &LIMITS), "it learned the fleet's 12");
    }
}
