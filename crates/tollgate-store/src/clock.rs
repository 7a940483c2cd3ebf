//! Wall-clock periods the hot store counts quotas and budgets in: UTC minutes, days and months.
//!
//! Production reads the system clock (the Redis store, the server's `TIME`). A test injects a
//! [`ManualClock`] instead, into the gateway and its hot store together, to put a request at a
//! chosen moment — 23:59:59.999, then 00:00:00.000 — rather than hope a run never crosses one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use time::{Date, Month, OffsetDateTime};

/// Milliseconds since the Unix epoch; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(now_ms)
}

/// A clock that stands still where it is set: a test puts a request at an exact moment (a period's
/// last millisecond, then the next period's first) and moves past a hold's expiry without
/// sleeping. Clones share one moment, so the test keeps one and the stores read another.
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// Milliseconds since the Unix epoch.
    now_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn at(now_ms: i64) -> ManualClock {
        ManualClock { now_ms: Arc::new(AtomicI64::new(now_ms)) }
    }

    /// A clock standing at `time`.
    pub fn at_time(time: OffsetDateTime) -> ManualClock {
        ManualClock::at(ms_of(time))
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    pub fn set(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn set_time(&self, time: OffsetDateTime) {
        self.set(ms_of(time));
    }

    pub fn advance_ms(&self, by_ms: i64) {
        self.now_ms.fetch_add(by_ms, Ordering::SeqCst);
    }

    /// This clock as a [`Clock`] a store or a gateway reads.
    pub fn clock(&self) -> Clock {
        let now_ms = Arc::clone(&self.now_ms);
        Arc::new(move || now_ms.load(Ordering::SeqCst))
    }
}

/// Milliseconds since the Unix epoch, now: the one reading of the wall clock every part of the
/// project takes its times from.
pub fn now_ms() -> i64 {
    ms_of(OffsetDateTime::now_utc())
}

/// A time as milliseconds since the Unix epoch, the unit every stored time is kept in.
pub fn ms_of(time: OffsetDateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_DAY: i64 = 86_400_000;

/// The periods a moment falls in, and how long until each ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Periods {
    pub minute: i64,
    pub day: i64,
    /// Months since year 0: year * 12 + month index.
    pub month: i64,
    pub seconds_to_next_minute: u64,
    pub seconds_to_next_day: u64,
    pub seconds_to_next_month: u64,
}

impl Periods {
    pub fn at(now_ms: i64) -> Periods {
        let minute = now_ms.div_euclid(MS_PER_MINUTE);
        let day = now_ms.div_euclid(MS_PER_DAY);
        let moment = OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let month = i64::from(moment.year()) * 12 + i64::from(u8::from(moment.month())) - 1;
        let next_month_start = next_month_start_ms(moment.year(), moment.month());
        Periods {
            minute,
            day,
            month,
            seconds_to_next_minute: seconds_until((minute + 1) * MS_PER_MINUTE, now_ms),
            seconds_to_next_day: seconds_until((day + 1) * MS_PER_DAY, now_ms),
            seconds_to_next_month: seconds_until(next_month_start, now_ms),
        }
    }
}

fn seconds_until(end_ms: i64, now_ms: i64) -> u64 {
    let remaining_ms = end_ms.saturating_sub(now_ms).max(0);
    // Round up: a client told to retry after 0 s would retry too early.
    u64::try_from((remaining_ms + 999) / 1000).unwrap_or(0)
}

fn next_month_start_ms(year: i32, month: Month) -> i64 {
    let (next_year, next_month) = match month {
        Month::December => (year + 1, Month::January),
        other => (year, other.next()),
    };
    Date::from_calendar_date(next_year, next_month, 1)
        .map(|date| date.midnight().assume_utc().unix_timestamp() * 1000)
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_end_where_the_calendar_says() {
        // 2026-01-31T23:59:30Z
        let now_ms = 1_769_903_970_000;
        let periods = Periods::at(now_ms);
        assert_eq!(periods.seconds_to_next_minute, 30);
        assert_eq!(periods.seconds_to_next_day, 30);
        assert_eq!(periods.seconds_to_next_month, 30);
        let next = Periods::at(now_ms + 30_000);
        assert_eq!(next.day, periods.day + 1);
        assert_eq!(next.month, periods.month + 1);
        assert_eq!(next.seconds_to_next_month, 28 * 86_400);
    }

    #[test]
    fn a_manual_clock_is_shared_by_its_clones_and_readers() {
        let clock = ManualClock::at(1_000);
        let reader = clock.clock();
        let other = clock.clone();
        other.advance_ms(500);
        assert_eq!((clock.now_ms(), reader()), (1_500, 1_500));
        clock.set(7);
        assert_eq!((other.now_ms(), reader()), (7, 7));
    }
}
