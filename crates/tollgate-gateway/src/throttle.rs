//! Failed authentications counted per source address: past the limit in a window, the address
//! is refused (429 `rate_limited`) until the window ends, without its credential being checked.
//! A stranger guessing the operator token, or cycling random client keys (each one a ledger
//! query: the unknown-key cache only catches repeats), is bounded by the limit per minute.
//!
//! The address is the TCP peer's (`ConnectInfo`); a request without one (a router driven
//! without a socket) is not limited. Behind a reverse proxy every client shares the proxy's
//! address: README "Security" says what that means for the setting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::Extensions;

/// Addresses tracked at most per throttle. When full, expired windows are pruned (at most once
/// per [`PRUNE_INTERVAL`], so a flood of new addresses does not make every failure a scan);
/// an address that still finds no room is not limited — the map's memory is the bound kept.
const ADDRESSES_MAX: usize = 65_536;
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// The counting window.
const WINDOW: Duration = Duration::from_secs(60);

/// Where a request came from, when the server recorded it.
pub fn source_address(extensions: &Extensions) -> Option<IpAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(address)| address.ip())
}

/// One IPv6 host usually holds a whole /64, so that is what is counted as one source; an
/// IPv4 address mapped into IPv6 counts as itself.
fn source_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

struct Window {
    started: Instant,
    failures: u32,
}

struct Entries {
    windows: HashMap<IpAddr, Window>,
    pruned_at: Instant,
}

/// Failures per source address in fixed one-minute windows (the first failure opens one).
pub struct FailureThrottle {
    /// Failures allowed per window; 0 turns the throttle off.
    failures_per_window_max: u32,
    /// A std mutex: held for a map lookup, never across an await.
    entries: Mutex<Entries>,
}

impl FailureThrottle {
    pub fn new(failures_per_minute_max: u32) -> FailureThrottle {
        FailureThrottle {
            failures_per_window_max: failures_per_minute_max,
            entries: Mutex::new(Entries { windows: HashMap::new(), pruned_at: Instant::now() }),
        }
    }

    /// Seconds until the source may try again, when it has used up its failures this window.
    pub fn refused_for_secs(&self, source: Option<IpAddr>, now: Instant) -> Option<u64> {
        let source = source.filter(|_| self.failures_per_window_max > 0)?;
        let Ok(entries) = self.entries.lock() else { return None };
        let window = entries.windows.get(&source_key(source))?;
        let remaining = WINDOW.checked_sub(now.saturating_duration_since(window.started)).filter(|remaining| !remaining.is_zero())?;
        (window.failures >= self.failures_per_window_max).then(|| remaining.as_secs().max(1))
    }

    /// Counts one failed authentication from the source.
    pub fn record_failure(&self, source: Option<IpAddr>, now: Instant) {
        let Some(source) = source.filter(|_| self.failures_per_window_max > 0) else { return };
        let Ok(mut entries) = self.entries.lock() else { return };
        let key = source_key(source);
        if !entries.windows.contains_key(&key) && entries.windows.len() >= ADDRESSES_MAX {
            if now.saturating_duration_since(entries.pruned_at) < PRUNE_INTERVAL {
                return;
            }
            entries.pruned_at = now;
            entries.windows.retain(|_, window| now.saturating_duration_since(window.started) < WINDOW);
            if entries.windows.len() >= ADDRESSES_MAX {
                return;
            }
        }
        let window = entries.windows.entry(key).or_insert(Window { started: now, failures: 0 });
        if now.saturating_duration_since(window.started) >= WINDOW {
            *window = Window { started: now, failures: 0 };
        }
        window.failures = window.failures.saturating_add(1);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.entries.lock().map(|entries| entries.windows.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)))
    }

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_ends() {
        let throttle = FailureThrottle::new(3);
        let start = Instant::now();
        let stranger = address("192.0.2.7");
        for _ in 0..3 {
            assert_eq!(throttle.refused_for_secs(stranger, start), None);
            throttle.record_failure(stranger, start);
        }
        assert_eq!(throttle.refused_for_secs(stranger, start + Duration::from_secs(10)), Some(50));
        assert_eq!(throttle.refused_for_secs(address("192.0.2.8"), start), None, "another address is not refused");
        assert_eq!(throttle.refused_for_secs(stranger, start + WINDOW), None, "a new window starts afresh");
        throttle.record_failure(stranger, start + WINDOW);
        assert_eq!(throttle.refused_for_secs(stranger, start + WINDOW), None, "one failure in the new window");
    }

    #[test]
    fn no_address_or_a_zero_limit_is_never_refused() {
        let off = FailureThrottle::new(0);
        let now = Instant::now();
        off.record_failure(address("192.0.2.7"), now);
        assert_eq!(off.refused_for_secs(address("192.0.2.7"), now), None);
        assert_eq!(off.tracked(), 0);
        let on = FailureThrottle::new(1);
        on.record_failure(None, now);
        assert_eq!(on.refused_for_secs(None, now), None);
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_source_and_a_mapped_ipv4_as_itself() {
        let throttle = FailureThrottle::new(2);
        let now = Instant::now();
        throttle.record_failure(address("2001:db8:1:2::1"), now);
        throttle.record_failure(address("2001:db8:1:2:ffff::9"), now);
        assert!(throttle.refused_for_secs(address("2001:db8:1:2::77"), now).is_some());
        assert_eq!(throttle.refused_for_secs(address("2001:db8:1:3::1"), now), None);
        throttle.record_failure(address("::ffff:192.0.2.1"), now);
        throttle.record_failure(address("192.0.2.1"), now);
        assert!(throttle.refused_for_secs(address("192.0.2.1"), now).is_some());
    }

    #[test]
    fn the_map_stays_bounded_and_expired_windows_make_room() {
        let throttle = FailureThrottle::new(1);
        let start = Instant::now();
        for index in 0..=ADDRESSES_MAX as u32 {
            throttle.record_failure(Some(IpAddr::V4(index.into())), start);
        }
        assert_eq!(throttle.tracked(), ADDRESSES_MAX, "past the cap a new address is not tracked");
        let later = start + WINDOW;
        throttle.record_failure(address("198.51.100.1"), later);
        assert_eq!(throttle.tracked(), 1, "the expired windows were pruned for it");
        assert!(throttle.refused_for_secs(address("198.51.100.1"), later).is_some());
    }
}
