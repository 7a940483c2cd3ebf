//! Which upstream channel serves a request: a model routes to one or more channels; each
//! attempt takes the highest-priority channel still available — enabled, not tried yet in this
//! request, its breaker admitting it, no `Retry-After` pending, under its concurrency limit and
//! its rate limits ([`rate`]) — by weighted chance among channels of that priority.
//!
//! What an attempt's answer means for the request (retry or not) and for the channel (its
//! breaker) is decided in one place, [`classify`].
//!
//! Breakers are the process's own in embedded mode. In services mode each gateway keeps a
//! mirror that selection reads (no round trip per request) and every change — a failure, the
//! success that resets a count, the claim of the one probe — lands in Redis by compare-and-set
//! on the version it was decided from ([`SharedBreakers`]); a conflict is decided again from
//! the stored state. The mirrors follow Redis every `routing.breaker_sync_ms`, when the
//! gateway also shares its rate counts ([`run_channel_sync`]).

pub mod breaker;
pub mod rate;
pub mod session_lock;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use breaker::{Admission, Breaker, BreakerPolicy, BreakerState};
use rate::{Measure, RateLimits, Window};
use tollgate_store::redis_store::{CountsOfMinutes, VersionedValues};

use crate::upstream::Provider;

/// One upstream channel of one model: what it is ([`ChannelSpec`]) and how it does now.
pub struct Channel {
    pub model: String,
    pub spec: ChannelSpec,
    in_flight: AtomicU32,
    /// As configured or added (`spec.enabled`) unless an operator said otherwise.
    enabled: AtomicBool,
    /// Unix ms before which an upstream's `Retry-After` keeps the channel out.
    cooling_until_ms: AtomicI64,
    breaker: Mutex<Mirror>,
    /// Requests and tokens of the last minute, when the channel has rate limits.
    window: Mutex<Window>,
    /// Services mode: where the breaker and the rate counts are shared, and their keys there.
    shared: Option<Shared>,
    /// This channel's attempt counters, registered once: a labelled lookup per request is not
    /// free on the hot path.
    pub attempts_counted: metrics::Counter,
    pub attempt_failures_counted: metrics::Counter,
    /// Seconds from an attempt's start to its upstream's first byte.
    pub first_byte_seconds: metrics::Histogram,
}

/// A breaker as this process last knew it, with the shared version it was read at.
#[derive(Clone, Copy, Default)]
struct Mirror {
    breaker: Breaker,
    version: u64,
}

/// Where the gateways of a deployment keep their channels' breakers and rate counts together
/// (Redis).
#[derive(Clone)]
pub struct SharedChannels {
    pub breakers: VersionedValues,
    pub counts: CountsOfMinutes,
}

/// A channel's place in the shared state: its breaker's key, its rate counts' key.
#[derive(Clone)]
struct Shared {
    channels: SharedChannels,
    breaker_key: String,
    counts_key: String,
}

/// Keeps every channel's shared state in step (services mode) until `shutdown`. Each period,
/// for the channels routed now (`channels`: they change as operators add and remove some):
/// one read of their breakers, a mirror whose version differs taking the stored state; and for
/// those with rate limits, what this gateway counted since the last period added to the
/// shared counts, the fleet's read back.
pub async fn run_channel_sync(
    channels: impl Fn() -> Vec<Arc<Channel>> + Send,
    now_ms: impl Fn() -> i64 + Send,
    period: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => return,
        }
        let shared: Vec<(Arc<Channel>, Shared)> = channels().into_iter().filter_map(|channel| channel.shared.clone().map(|shared| (channel, shared))).collect();
        let Some((_, first)) = shared.first() else {
            continue;
        };
        let keys: Vec<String> = shared.iter().map(|(_, shared)| shared.breaker_key.clone()).collect();
        match first.channels.breakers.read(&keys).await {
            Ok(stored) => {
                for ((channel, _), (version, value)) in shared.iter().zip(stored) {
                    channel.follow(version, &value);
                }
            }
            Err(error) => tracing::debug!(%error, "reading the shared circuit breakers failed; retried next period"),
        }
        let now_ms = now_ms();
        let exchanges = shared.iter().filter(|(channel, _)| channel.spec.rates.any()).map(|(channel, shared)| channel.exchange_counts(shared, now_ms));
        futures_util::future::join_all(exchanges).await;
    }
}

/// A shared breaker is forgotten this long after its last change (it is then closed).
const SHARED_BREAKER_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Compare-and-set rounds before a change is kept locally only (a fleet's concurrent failures
/// of one channel conflict; each round reads the winner's state).
const SHARED_CHANGE_ROUNDS: usize = 4;

/// Whether a change is this process's own or learned from the shared state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Here,
    Shared,
}

/// What a channel is: configured, or added by an operator.
#[derive(Clone)]
pub struct ChannelSpec {
    pub name: String,
    pub provider: Provider,
    pub upstream_model: String,
    pub priority: i32,
    pub weight: u32,
    pub concurrent_requests_max: Option<u32>,
    pub rates: RateLimits,
    /// Enabled unless an operator's word (`/internal/channels`) overrides.
    pub enabled: bool,
    /// Added through `/internal/channels` rather than configured (only those can be removed).
    pub added: bool,
}

impl ChannelSpec {
    /// Whether `other` describes the same channel (a rebuilt route keeps its live state).
    pub fn same_as(&self, other: &ChannelSpec) -> bool {
        self.name == other.name
            && self.provider.name == other.provider.name
            && self.upstream_model == other.upstream_model
            && (self.priority, self.weight, self.concurrent_requests_max, self.rates, self.enabled, self.added)
                == (other.priority, other.weight, other.concurrent_requests_max, other.rates, other.enabled, other.added)
    }
}

impl Channel {
    pub fn new(model: &str, mut spec: ChannelSpec) -> Channel {
        spec.weight = spec.weight.max(1);
        let labels = [("model", model.to_string()), ("channel", spec.name.clone())];
        Channel {
            attempts_counted: metrics::counter!("tollgate_upstream_attempts_total", &labels),
            attempt_failures_counted: metrics::counter!("tollgate_upstream_attempt_failures_total", &labels),
            first_byte_seconds: metrics::histogram!("tollgate_upstream_first_byte_seconds", &labels),
            model: model.to_string(),
            enabled: AtomicBool::new(spec.enabled),
            spec,
            in_flight: AtomicU32::new(0),
            cooling_until_ms: AtomicI64::new(0),
            breaker: Mutex::new(Mirror::default()),
            window: Mutex::new(Window::default()),
            shared: None,
        }
    }

    /// Shares the breaker and the rate counts with the other gateways ([`SharedChannels`]).
    pub fn with_shared_state(mut self, channels: SharedChannels) -> Channel {
        let name = format!("{}/{}", self.model, self.spec.name);
        let (breaker_key, counts_key) = (channels.breakers.key("breaker", &name), channels.counts.key(&name));
        self.shared = Some(Shared { channels, breaker_key, counts_key });
        self
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn set_enabled(&self, enabled: bool) {
        let was = self.enabled.swap(enabled, Ordering::AcqRel);
        if was != enabled {
            tracing::warn!(model = self.model, channel = self.spec.name, enabled, "channel {}", if enabled { "enabled" } else { "disabled" });
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.lock_breaker().breaker.state()
    }

    pub fn cooling_until_ms(&self) -> i64 {
        self.cooling_until_ms.load(Ordering::Acquire)
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Mirror> {
        // Every change is one assignment of a Copy value: a poisoned lock still holds a whole state.
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_window(&self) -> std::sync::MutexGuard<'_, Window> {
        // Counts only ever move by whole additions: a poisoned lock still holds usable counts.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The requests and tokens of the last minute as counted now, for the channel listing.
    pub fn rate_used(&self, now_ms: i64) -> [u64; 2] {
        let mut window = self.lock_window();
        [window.used(now_ms, Measure::Requests), window.used(now_ms, Measure::Tokens)]
    }

    /// Counts the tokens of a request the channel served against its tokens-per-minute limit.
    pub fn count_tokens(&self, now_ms: i64, tokens: u64) {
        if self.spec.rates.tokens_per_minute.is_some() {
            self.lock_window().count(now_ms, Measure::Tokens, tokens);
        }
    }

    /// Adds what this gateway counted since the last period to the shared counts and takes the
    /// fleet's; a Redis that does not answer leaves the counts to be added next period.
    async fn exchange_counts(&self, shared: &Shared, now_ms: i64) {
        let (minute, taken) = self.lock_window().take_unshared(now_ms);
        match shared.channels.counts.add_and_read(&shared.counts_key, minute, taken).await {
            Ok((current, previous)) => self.lock_window().adopt_shared(minute, current, previous),
            Err(error) => {
                self.lock_window().restore_unshared(taken);
                tracing::debug!(model = self.model, channel = self.spec.name, %error, "sharing the channel's rate counts failed; retried next period");
            }
        }
    }

    /// From when selection could take this channel as far as time decides — its breaker, an
    /// upstream's `Retry-After`, its rate limits — or `None` while it is disabled.
    fn available_from_ms(&self, now_ms: i64, policy: &BreakerPolicy) -> Option<i64> {
        if !self.enabled() {
            return None;
        }
        let from_ms = self.lock_breaker().breaker.admits_from_ms(policy).max(self.cooling_until_ms());
        Some(if self.spec.rates.any() { from_ms.max(self.lock_window().room_from_ms(now_ms, &self.spec.rates)) } else { from_ms })
    }

    /// Whether selection could take this channel now (nothing changed).
    fn available(&self, now_ms: i64, policy: &BreakerPolicy) -> bool {
        self.available_from_ms(now_ms, policy).is_some_and(|from_ms| now_ms >= from_ms) && self.spec.concurrent_requests_max.is_none_or(|max| self.in_flight() < max)
    }

    /// Applies `change` to the breaker and returns what it said. Embedded: to the mirror.
    /// Services: to the shared state first, by compare-and-set on the version the mirror was
    /// read at; on a conflict `change` is decided again from the stored state. A Redis that
    /// does not answer leaves the change to this process alone.
    async fn change_breaker<R>(&self, change: impl Fn(&mut Breaker) -> R) -> R {
        let Some(Shared { channels, breaker_key: key, .. }) = &self.shared else {
            let mut next = self.lock_breaker().breaker;
            let said = change(&mut next);
            self.adopt(None, next.state(), Origin::Here);
            return said;
        };
        let Mirror { mut breaker, mut version } = *self.lock_breaker();
        for _ in 0..SHARED_CHANGE_ROUNDS {
            let mut next = breaker;
            let said = change(&mut next);
            if next.state() == breaker.state() {
                return said;
            }
            match channels.breakers.compare_and_set(key, version, &encode(next.state()), SHARED_BREAKER_TTL_MS).await {
                Ok((true, (stored_version, _))) => {
                    self.adopt(Some(stored_version), next.state(), Origin::Here);
                    return said;
                }
                Ok((false, (stored_version, stored))) => {
                    let stored = decode(&stored);
                    self.adopt(Some(stored_version), stored, Origin::Shared);
                    (breaker, version) = (Breaker::from_state(stored), stored_version);
                }
                Err(error) => {
                    tracing::warn!(model = self.model, channel = self.spec.name, %error, "the shared circuit breaker could not be written; this gateway keeps the change to itself");
                    self.adopt(None, next.state(), Origin::Here);
                    return said;
                }
            }
        }
        let mut next = breaker;
        let said = change(&mut next);
        self.adopt(None, next.state(), Origin::Here);
        said
    }

    /// Takes `state` into the mirror (with the shared version it has, if known) and announces
    /// a change of state.
    fn adopt(&self, version: Option<u64>, state: BreakerState, origin: Origin) {
        let from = {
            let mut mirror = self.lock_breaker();
            let from = mirror.breaker.state();
            mirror.breaker = Breaker::from_state(state);
            if let Some(version) = version {
                mirror.version = version;
            }
            from
        };
        if from.label() != state.label() {
            self.announce(from, state, origin);
        }
    }

    /// Follows the shared state read by the sync loop.
    fn follow(&self, version: u64, stored: &str) {
        if self.lock_breaker().version != version {
            self.adopt(Some(version), decode(stored), Origin::Shared);
        }
    }

    /// Takes a request slot, a request of the rate limit and the breaker's admission, or nothing.
    async fn lease(self: &Arc<Channel>, now_ms: i64, policy: BreakerPolicy) -> Option<Lease> {
        let slot = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_flight| {
            self.spec.concurrent_requests_max.is_none_or(|max| in_flight < max).then(|| in_flight.saturating_add(1))
        });
        if slot.is_err() {
            return None;
        }
        // The slot is the lease's from here: dropped with it if a limit or the breaker refuses.
        let mut lease = Lease { channel: Arc::clone(self), admission: Admission::Normal, policy, reported: false };
        // Counted before the breaker is asked (a probe's admission is not to be wasted), taken
        // back if it refuses.
        let counted_in = if self.spec.rates.any() {
            let mut window = self.lock_window();
            if !window.has_room(now_ms, &self.spec.rates) {
                return None;
            }
            window.count(now_ms, Measure::Requests, 1);
            Some(window.minute())
        } else {
            None
        };
        match self.change_breaker(|breaker| breaker.admit(now_ms, &policy)).await {
            Some(admission) => {
                lease.admission = admission;
                Some(lease)
            }
            None => {
                if let Some(minute) = counted_in {
                    self.lock_window().uncount(minute, Measure::Requests, 1);
                }
                None
            }
        }
    }

    fn announce(&self, from: BreakerState, to: BreakerState, origin: Origin) {
        let open = if matches!(to, BreakerState::Closed { .. }) { 0.0 } else { 1.0 };
        metrics::gauge!("tollgate_breaker_open", "model" => self.model.clone(), "channel" => self.spec.name.clone()).set(open);
        if origin == Origin::Shared {
            tracing::info!(model = self.model, channel = self.spec.name, from = from.label(), to = to.label(), "circuit breaker changed by another gateway");
            return;
        }
        metrics::counter!("tollgate_breaker_transitions_total", "model" => self.model.clone(), "channel" => self.spec.name.clone(), "to" => to.label()).increment(1);
        match to {
            BreakerState::Open { until_ms } => {
                tracing::warn!(model = self.model, channel = self.spec.name, from = from.label(), until_ms, "circuit breaker opened: the channel is left out until a probe succeeds");
            }
            BreakerState::HalfOpen { .. } => tracing::info!(model = self.model, channel = self.spec.name, "circuit breaker half-open: one request probes the channel"),
            BreakerState::Closed { .. } => tracing::info!(model = self.model, channel = self.spec.name, from = from.label(), "circuit breaker closed: the channel serves again"),
        }
    }
}

/// A breaker state as the shared value spells it: `c:<failures>:<first failure ms>`,
/// `o:<until ms>`, `h:<probe since ms>`; anything else (never written, expired) is closed.
fn encode(state: BreakerState) -> String {
    match state {
        BreakerState::Closed { failures, first_failure_ms } => format!("c:{failures}:{first_failure_ms}"),
        BreakerState::Open { until_ms } => format!("o:{until_ms}"),
        BreakerState::HalfOpen { probe_since_ms } => format!("h:{probe_since_ms}"),
    }
}

fn decode(text: &str) -> BreakerState {
    let mut parts = text.split(':');
    let mut number = || parts.next().and_then(|part| part.parse::<i64>().ok());
    let closed = BreakerState::Closed { failures: 0, first_failure_ms: 0 };
    match text.get(..1) {
        Some("c") => {
            let _ = number();
            match (number(), number()) {
                (Some(failures), Some(first_failure_ms)) => BreakerState::Closed { failures: u32::try_from(failures).unwrap_or(0), first_failure_ms },
                _ => closed,
            }
        }
        Some("o") => {
            let _ = number();
            number().map_or(closed, |until_ms| BreakerState::Open { until_ms })
        }
        Some("h") => {
            let _ = number();
            number().map_or(closed, |probe_since_ms| BreakerState::HalfOpen { probe_since_ms })
        }
        _ => closed,
    }
}

/// A request's use of a channel: a slot under its concurrency limit until dropped, and the
/// duty to tell its breaker how the channel did.
pub struct Lease {
    pub channel: Arc<Channel>,
    admission: Admission,
    policy: BreakerPolicy,
    reported: bool,
}

impl Lease {
    pub fn is_probe(&self) -> bool {
        self.admission == Admission::Probe
    }

    /// Tells the channel's breaker how the channel did; the first word counts.
    pub async fn report(&mut self, health: Health, now_ms: i64) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let policy = self.policy;
        match health {
            Health::Good => self.channel.change_breaker(|breaker| breaker.success()).await,
            Health::Bad => self.channel.change_breaker(|breaker| breaker.failure(now_ms, &policy)).await,
        };
    }

    /// An upstream's `Retry-After`: the channel is left out of selection until then.
    pub fn cool_until(&self, until_ms: i64) {
        self.channel.cooling_until_ms.fetch_max(until_ms, Ordering::AcqRel);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.channel.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How an attempt's answer reflects on its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Good,
    Bad,
}

/// What an attempt's failure means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Another channel may be tried (nothing reached the client yet).
    pub retry: bool,
    pub health: Health,
}

/// The upstream HTTP status of a failed attempt (`None`: no answer — connection refused or
/// reset, a timeout, a broken body) → retry or not, and the channel's health. Refusals about
/// the request itself (400, 404, 413, 422: a context too long, a content policy, an unknown
/// model) are the client's on any channel: never retried, not the channel's fault.
pub fn classify(status: Option<u16>) -> Verdict {
    match status {
        Some(400 | 404 | 413 | 422) => Verdict { retry: false, health: Health::Good },
        _ => Verdict { retry: true, health: Health::Bad },
    }
}

/// Where a model goes: the provider its prices name and the channels that serve it.
pub struct Route {
    pub model: String,
    /// The provider of the model's prices (`models.provider`).
    pub provider: Provider,
    /// In configuration order.
    pub channels: Vec<Arc<Channel>>,
    pub session_lock: crate::config::SessionLockMode,
}

impl Route {
    /// Leases the channel for a request's next attempt among `candidates` (indices into
    /// `channels`) less those `tried`: the highest priority available, by weight within it.
    /// `preferred` (a pinned channel) is leased first if it is among them and available.
    pub async fn select(&self, candidates: &[usize], tried: &[usize], preferred: Option<usize>, now_ms: i64, policy: BreakerPolicy) -> Option<Lease> {
        let mut refused: Vec<usize> = Vec::new();
        if let Some(index) = preferred.filter(|index| candidates.contains(index) && !tried.contains(index))
            && let Some(channel) = self.channels.get(index).filter(|channel| channel.available(now_ms, &policy))
        {
            match channel.lease(now_ms, policy).await {
                Some(lease) => return Some(lease),
                None => refused.push(index),
            }
        }
        loop {
            let available: Vec<usize> = candidates
                .iter()
                .copied()
                .filter(|index| !tried.contains(index) && !refused.contains(index))
                .filter(|index| self.channels.get(*index).is_some_and(|channel| channel.available(now_ms, &policy)))
                .collect();
            let top = available.iter().filter_map(|index| self.channels.get(*index)).map(|channel| channel.spec.priority).max()?;
            let group: Vec<&Arc<Channel>> = available.iter().filter_map(|index| self.channels.get(*index)).filter(|channel| channel.spec.priority == top).collect();
            let chosen = pick_weighted(&group)?;
            // Another request may have taken the last slot or the probe since `available`.
            match chosen.lease(now_ms, policy).await {
                Some(lease) => return Some(lease),
                None => refused.extend(self.channels.iter().position(|channel| Arc::ptr_eq(channel, chosen))),
            }
        }
    }

    /// Whether any of `candidates` could be chosen now.
    pub fn any_available(&self, candidates: &[usize], now_ms: i64, policy: BreakerPolicy) -> bool {
        candidates.iter().filter_map(|index| self.channels.get(*index)).any(|channel| channel.available(now_ms, &policy))
    }

    /// The index of a channel of this route.
    pub fn index_of(&self, channel: &Arc<Channel>) -> Option<usize> {
        self.channels.iter().position(|candidate| Arc::ptr_eq(candidate, channel))
    }

    /// When the first of `candidates` that is enabled could be chosen again (its breaker's
    /// open time, its `Retry-After` past, room under its rate limits), for a client told that
    /// none is available now.
    pub fn next_available_ms(&self, candidates: &[usize], now_ms: i64, policy: BreakerPolicy) -> Option<i64> {
        candidates.iter().filter_map(|index| self.channels.get(*index)).filter_map(|channel| channel.available_from_ms(now_ms, &policy)).min().map(|from_ms| from_ms.max(now_ms))
    }
}

fn pick_weighted<'a>(group: &[&'a Arc<Channel>]) -> Option<&'a Arc<Channel>> {
    let total: u64 = group.iter().map(|channel| u64::from(channel.spec.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rand::random_range(0..total);
    for channel in group {
        let weight = u64::from(channel.spec.weight);
        if ticket < weight {
            return Some(channel);
        }
        ticket -= weight;
    }
    group.last().copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::ProviderKind;

    const POLICY: BreakerPolicy = BreakerPolicy { failures: 2, window_ms: 10_000, open_ms: 1_000 };

    fn route(channels: &[(&str, i32, u32, Option<u32>)]) -> Route {
        route_limited(channels, RateLimits::default())
    }

    fn route_limited(channels: &[(&str, i32, u32, Option<u32>)], rates: RateLimits) -> Route {
        let provider = Provider::for_tests("p", ProviderKind::Mock, "http://127.0.0.1:1");
        let channels = channels
            .iter()
            .map(|(name, priority, weight, max)| {
                Arc::new(Channel::new("m", ChannelSpec {
                    name: (*name).into(),
                    provider: provider.clone(),
                    upstream_model: "m".into(),
                    priority: *priority,
                    weight: *weight,
                    concurrent_requests_max: *max,
                    rates,
                    enabled: true,
                    added: false,
                }))
            })
            .collect();
        Route { model: "m".into(), provider, channels, session_lock: crate::config::SessionLockMode::Off }
    }

    fn all(route: &Route) -> Vec<usize> {
        (0..route.channels.len()).collect()
    }

    #[tokio::test]
    async fn highest_priority_first_then_down_skipping_what_was_tried() {
        let route = route(&[("low", 0, 1, None), ("high", 5, 1, None), ("mid", 2, 1, None)]);
        let candidates = all(&route);
        let mut tried = Vec::new();
        for expected in ["high", "mid", "low"] {
            let lease = route.select(&candidates, &tried, None, 0, POLICY).await.unwrap();
            assert_eq!(lease.channel.spec.name, expected);
            tried.push(route.index_of(&lease.channel).unwrap());
        }
        assert!(route.select(&candidates, &tried, None, 0, POLICY).await.is_none(), "every channel tried");
    }

    #[tokio::test]
    async fn weights_share_a_priority_and_lower_priorities_get_nothing() {
        let route = route(&[("a", 1, 3, None), ("b", 1, 1, None), ("c", 0, 100, None)]);
        let candidates = all(&route);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..4_000 {
            let lease = route.select(&candidates, &[], None, 0, POLICY).await.unwrap();
            *counts.entry(lease.channel.spec.name.clone()).or_insert(0u32) += 1;
        }
        assert_eq!(counts.get("c"), None);
        let a = f64::from(counts["a"]);
        let share = a / 4_000.0;
        // 3:1 → 0.75; five standard deviations of a binomial share at n = 4,000 is ±0.034.
        assert!((share - 0.75).abs() < 0.035, "share of a: {share}");
    }

    #[tokio::test]
    async fn open_disabled_cooling_and_full_channels_are_skipped_and_failover_goes_down() {
        let route = route(&[("first", 2, 1, Some(1)), ("second", 1, 1, None), ("third", 0, 1, None)]);
        let candidates = all(&route);
        // A full channel: its one slot is leased.
        let held = route.select(&candidates, &[], None, 0, POLICY).await.unwrap();
        assert_eq!(held.channel.spec.name, "first");
        assert_eq!(route.select(&candidates, &[], None, 0, POLICY).await.unwrap().channel.spec.name, "second");
        drop(held);
        assert_eq!(route.select(&candidates, &[], None, 0, POLICY).await.unwrap().channel.spec.name, "first", "the slot came back");
        // Disabled.
        route.channels[0].set_enabled(false);
        assert_eq!(route.select(&candidates, &[], None, 0, POLICY).await.unwrap().channel.spec.name, "second");
        route.channels[0].set_enabled(true);
        // Cooling after a Retry-After.
        route.select(&candidates, &[], None, 0, POLICY).await.unwrap().cool_until(500);
        assert_eq!(route.select(&candidates, &[], None, 499, POLICY).await.unwrap().channel.spec.name, "second");
        assert_eq!(route.select(&candidates, &[], None, 500, POLICY).await.unwrap().channel.spec.name, "first");
        // Open breaker: two failures.
        for _ in 0..2 {
            route.select(&candidates, &[], None, 600, POLICY).await.unwrap().report(Health::Bad, 600).await;
        }
        assert!(matches!(route.channels[0].breaker_state(), BreakerState::Open { until_ms: 1_600 }));
        assert_eq!(route.select(&candidates, &[], None, 700, POLICY).await.unwrap().channel.spec.name, "second");
        assert_eq!(route.next_available_ms(&[0], 700, POLICY), Some(1_600));
        // Its time come, one probe goes to it and the next request elsewhere until it reports.
        let mut probe = route.select(&candidates, &[], None, 1_600, POLICY).await.unwrap();
        assert!(probe.is_probe());
        assert_eq!(probe.channel.spec.name, "first");
        assert_eq!(route.select(&candidates, &[], None, 1_601, POLICY).await.unwrap().channel.spec.name, "second");
        probe.report(Health::Good, 1_650).await;
        // Its one request slot is the probe's until the probe's request ends.
        assert_eq!(route.select(&candidates, &[], None, 1_650, POLICY).await.unwrap().channel.spec.name, "second");
        drop(probe);
        assert_eq!(route.select(&candidates, &[], None, 1_700, POLICY).await.unwrap().channel.spec.name, "first");
    }

    /// A pinned channel of a low priority that fails sends the next attempt to the highest
    /// priority left, not the next below the pin (new-api #6021).
    #[tokio::test]
    async fn after_a_pinned_channel_fails_selection_starts_again_from_the_top() {
        let route = route(&[("top", 2, 1, None), ("middle", 1, 1, None), ("pinned", 0, 1, None)]);
        let candidates = all(&route);
        let first = route.select(&candidates, &[], Some(2), 0, POLICY).await.unwrap();
        assert_eq!(first.channel.spec.name, "pinned");
        assert_eq!(route.select(&candidates, &[2], None, 0, POLICY).await.unwrap().channel.spec.name, "top");
        // A pin that is not available is passed over for the usual order.
        route.channels[2].set_enabled(false);
        assert_eq!(route.select(&candidates, &[], Some(2), 0, POLICY).await.unwrap().channel.spec.name, "top");
    }

    /// A channel past its requests or tokens per minute is passed over like a full one, and
    /// the time given to a client is when it has room again.
    #[tokio::test]
    async fn a_channel_past_its_rate_limits_is_skipped_until_the_minute_has_room() {
        let rates = RateLimits { requests_per_minute: Some(2), tokens_per_minute: Some(1_000) };
        let route = route_limited(&[("limited", 1, 1, None)], rates);
        let candidates = all(&route);
        let start = 60_000 * 1_000;
        for _ in 0..2 {
            drop(route.select(&candidates, &[], None, start, POLICY).await.unwrap());
        }
        assert!(route.select(&candidates, &[], None, start + 1, POLICY).await.is_none(), "two requests this minute");
        assert!(!route.any_available(&candidates, start + 1, POLICY));
        // Next minute the two weigh 2 × (60,000 − 1) / 60,000 → 1 from its first millisecond on.
        assert_eq!(route.next_available_ms(&candidates, start + 1, POLICY), Some(start + 60_001));
        assert!(route.select(&candidates, &[], None, start + 60_000, POLICY).await.is_none());
        let lease = route.select(&candidates, &[], None, start + 60_001, POLICY).await.unwrap();
        // Its tokens fill the other limit until the minute after.
        lease.channel.count_tokens(start + 60_001, 1_000);
        drop(lease);
        assert_eq!(route.channels[0].rate_used(start + 60_001), [2, 1_000]);
        assert!(!route.any_available(&candidates, start + 60_002, POLICY));
        assert_eq!(route.next_available_ms(&candidates, start + 60_002, POLICY), Some(start + 120_001));
        // A request the breaker refuses after the limit counted it is taken back.
        let open = route_limited(&[("open", 1, 1, None)], RateLimits { requests_per_minute: Some(1), tokens_per_minute: None });
        for _ in 0..2 {
            open.channels[0].change_breaker(|breaker| breaker.failure(start, &POLICY)).await;
        }
        assert!(open.channels[0].lease(start, POLICY).await.is_none(), "open");
        assert_eq!(open.channels[0].rate_used(start), [0, 0], "the refused request is not counted");
    }

    #[test]
    fn failures_are_retried_but_refusals_about_the_request_are_not() {
        for status in [400, 404, 413, 422] {
            assert_eq!(classify(Some(status)), Verdict { retry: false, health: Health::Good }, "{status}");
        }
        for status in [None, Some(401), Some(403), Some(408), Some(429), Some(500), Some(502), Some(503), Some(529)] {
            assert_eq!(classify(status), Verdict { retry: true, health: Health::Bad }, "{status:?}");
        }
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    #[test]
    fn breaker_states_survive_their_shared_spelling() {
        for state in [
            BreakerState::Closed { failures: 0, first_failure_ms: 0 },
            BreakerState::Closed { failures: 3, first_failure_ms: 1_700_000_000_123 },
            BreakerState::Open { until_ms: 1_700_000_030_000 },
            BreakerState::HalfOpen { probe_since_ms: 42 },
        ] {
            assert_eq!(decode(&encode(state)), state);
        }
        for unreadable in ["", "x:1", "o:", "c:1", "h:nope"] {
            assert_eq!(decode(unreadable), BreakerState::Closed { failures: 0, first_failure_ms: 0 }, "{unreadable:?}");
        }
    }
}
