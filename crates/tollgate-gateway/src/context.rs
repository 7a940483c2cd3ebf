//! The billing context cache: key hash → (key, account), and the current price table. Nothing on
//! the request path reads the database once these are warm. Every change to a key, an account or
//! a price invalidates them synchronously, so the change applies to the very next request.
//!
//! Two more things keep the ledger off the request path: a key the ledger does not know is
//! remembered briefly (a stranger sending the same wrong key costs one query, not one a
//! request), and a context past its TTL is kept for when the ledger cannot answer — a
//! PostgreSQL outage then refuses only keys never seen, not every key whose TTL ran out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tollgate_store::model::{Account, ApiKey, PriceRow};

/// Who pays for a request made with a key, and under which tier.
#[derive(Clone, Debug)]
pub struct BillingContext {
    pub key: ApiKey,
    pub account: Account,
}

/// Unknown keys remembered at most; past it the list starts again (a flood of random keys is
/// limited per address before it gets here, see `auth`).
const UNKNOWN_KEYS_MAX: usize = 100_000;

/// How long each kind of entry is trusted.
#[derive(Clone, Copy, Debug)]
pub struct CacheLifetimes {
    /// A context is re-read after this long even without an invalidation.
    pub fresh: Duration,
    /// Past `fresh`, a context is still used for this long (from its load) when the ledger
    /// cannot be read.
    pub stale_if_error: Duration,
    /// A key the ledger did not know is refused without asking again for this long.
    pub unknown_key: Duration,
}

/// What the cache knows about a key.
pub enum Cached {
    /// Loaded within the TTL: use it.
    Fresh(Arc<BillingContext>),
    /// The ledger said recently that no such key exists.
    UnknownKey,
    /// Ask the ledger; `stale` may be used if it cannot answer.
    Miss { stale: Option<Arc<BillingContext>> },
}

#[derive(Default)]
struct Entries {
    known: HashMap<String, (Arc<BillingContext>, Instant)>,
    unknown: HashMap<String, Instant>,
    /// Every key the ledger has confirmed exists, kept across invalidations and TTLs: a source
    /// throttled for refused keys may still have these looked up (see `auth`). Only real keys
    /// get here, so it is bounded by the keys issued.
    confirmed: HashSet<String>,
}

/// Cached billing contexts with lifetimes and a generation counter: an answer read from the
/// ledger before an invalidation is not cached after it.
pub struct ContextCache {
    entries: RwLock<Entries>,
    generation: AtomicU64,
    lifetimes: CacheLifetimes,
}

impl ContextCache {
    pub fn new(lifetimes: CacheLifetimes) -> ContextCache {
        ContextCache { entries: RwLock::new(Entries::default()), generation: AtomicU64::new(0), lifetimes }
    }

    /// The generation to pass to `insert` after loading from the ledger.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, key_hash: &str) -> Cached {
        let Ok(entries) = self.entries.read() else { return Cached::Miss { stale: None } };
        if let Some((context, loaded_at)) = entries.known.get(key_hash) {
            let age = loaded_at.elapsed();
            if age < self.lifetimes.fresh {
                metrics::counter!("tollgate_context_cache_total", "result" => "hit").increment(1);
                return Cached::Fresh(Arc::clone(context));
            }
            metrics::counter!("tollgate_context_cache_total", "result" => "expired").increment(1);
            let stale = (age < self.lifetimes.stale_if_error).then(|| Arc::clone(context));
            return Cached::Miss { stale };
        }
        if entries.unknown.get(key_hash).is_some_and(|seen_at| seen_at.elapsed() < self.lifetimes.unknown_key) {
            metrics::counter!("tollgate_context_cache_total", "result" => "unknown_key").increment(1);
            return Cached::UnknownKey;
        }
        Cached::Miss { stale: None }
    }

    /// Caches what the ledger said of a key (`None`: no such key) unless an invalidation
    /// happened since `generation` was read. A key found is confirmed either way: that it
    /// exists does not go stale, only its context does (a key created right before its first
    /// use invalidates during that use).
    pub fn insert(&self, key_hash: String, context: Option<Arc<BillingContext>>, generation: u64) {
        metrics::counter!("tollgate_context_cache_total", "result" => "miss").increment(1);
        let Ok(mut entries) = self.entries.write() else { return };
        if context.is_some() && !entries.confirmed.contains(&key_hash) {
            entries.confirmed.insert(key_hash.clone());
        }
        // Checked under the write lock: `invalidate_all` bumps the generation under it too.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        match context {
            Some(context) => {
                entries.unknown.remove(&key_hash);
                entries.known.insert(key_hash, (context, Instant::now()));
            }
            None => {
                if entries.unknown.len() >= UNKNOWN_KEYS_MAX {
                    entries.unknown.clear();
                }
                entries.known.remove(&key_hash);
                entries.unknown.insert(key_hash, Instant::now());
            }
        }
    }

    /// Whether the ledger ever confirmed this key exists (even if its context was dropped since).
    pub fn confirmed(&self, key_hash: &str) -> bool {
        self.entries.read().is_ok_and(|entries| entries.confirmed.contains(key_hash))
    }

    /// Drops every cached context and unknown key (a key, account, or tier changed); which keys
    /// were confirmed to exist is kept.
    pub fn invalidate_all(&self) {
        if let Ok(mut entries) = self.entries.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            entries.known.clear();
            entries.unknown.clear();
        }
    }
}

/// (provider, model, customer_type).
type PriceKey = (String, String, String);

/// The price of every (provider, model, customer_type), replaced whole on every price change.
#[derive(Default)]
pub struct PriceTable {
    current: RwLock<Arc<HashMap<PriceKey, PriceRow>>>,
}

impl PriceTable {
    pub fn replace(&self, rows: Vec<PriceRow>) {
        let table = rows
            .into_iter()
            .map(|row| ((row.provider.clone(), row.model.clone(), row.customer_type.clone()), row))
            .collect();
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(table);
        }
    }

    /// The current price; `None` means the request must be refused (no silent price, I5).
    pub fn get(&self, provider: &str, model: &str, customer_type: &str) -> Option<PriceRow> {
        let current = self.current.read().ok()?;
        current
            .get(&(provider.to_string(), model.to_string(), customer_type.to_string()))
            .cloned()
    }

    pub fn all(&self) -> Vec<PriceRow> {
        self.current.read().map(|current| current.values().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use tollgate_core::Money;
    use tollgate_store::model::{AccountKind, AccountStatus, KeyStatus};

    fn context() -> Option<Arc<BillingContext>> {
        let now = OffsetDateTime::UNIX_EPOCH;
        let key = ApiKey {
            id: "k".into(), account_id: "a".into(), name: String::new(), prefix: "tg_".into(), status: KeyStatus::Active,
            budget_daily: None, budget_monthly: None, budget_total: None, rpm: None, tpm: None, allowed_models: None, session_lock: None,
            expires_at: None, created_at: now, revoked_at: None,
        };
        let account = Account {
            id: "a".into(), kind: AccountKind::User, name: String::new(), customer_type: "standard".into(), status: AccountStatus::Active,
            credit_limit: Money::ZERO, daily_request_quota: None, monthly_request_quota: None, low_balance_threshold: None,
            created_at: now, updated_at: now,
        };
        Some(Arc::new(BillingContext { key, account }))
    }

    fn cache(fresh: u64, stale_if_error: u64, unknown_key: u64) -> ContextCache {
        let lifetimes = CacheLifetimes {
            fresh: Duration::from_secs(fresh),
            stale_if_error: Duration::from_secs(stale_if_error),
            unknown_key: Duration::from_secs(unknown_key),
        };
        ContextCache::new(lifetimes)
    }

    #[test]
    fn a_context_past_its_ttl_is_offered_as_stale_only_within_the_stale_window() {
        let within = cache(0, 3_600, 0);
        within.insert("h".into(), context(), within.generation());
        assert!(matches!(within.get("h"), Cached::Miss { stale: Some(_) }));
        let past = cache(0, 0, 0);
        past.insert("h".into(), context(), past.generation());
        assert!(matches!(past.get("h"), Cached::Miss { stale: None }));
        let fresh = cache(3_600, 3_600, 0);
        fresh.insert("h".into(), context(), fresh.generation());
        assert!(matches!(fresh.get("h"), Cached::Fresh(_)));
    }

    #[test]
    fn an_unknown_key_is_remembered_until_its_time_or_an_invalidation() {
        let remembered = cache(3_600, 3_600, 3_600);
        remembered.insert("h".into(), None, remembered.generation());
        assert!(matches!(remembered.get("h"), Cached::UnknownKey));
        // A key created (or any key change) invalidates: the next request asks the ledger.
        remembered.invalidate_all();
        assert!(matches!(remembered.get("h"), Cached::Miss { stale: None }));
        let forgotten = cache(3_600, 3_600, 0);
        forgotten.insert("h".into(), None, forgotten.generation());
        assert!(matches!(forgotten.get("h"), Cached::Miss { stale: None }));
    }

    #[test]
    fn an_invalidation_drops_stale_contexts_and_answers_read_before_it() {
        let contexts = cache(0, 3_600, 3_600);
        contexts.insert("h".into(), context(), contexts.generation());
        contexts.invalidate_all();
        // A revoked key is never served from a stale copy; that it once existed is remembered.
        assert!(matches!(contexts.get("h"), Cached::Miss { stale: None }));
        assert!(contexts.confirmed("h") && !contexts.confirmed("u"));
        let read_before = contexts.generation();
        contexts.invalidate_all();
        contexts.insert("h".into(), context(), read_before);
        contexts.insert("u".into(), None, read_before);
        assert!(matches!(contexts.get("h"), Cached::Miss { stale: None }));
        assert!(matches!(contexts.get("u"), Cached::Miss { stale: None }));
    }

    #[test]
    fn a_key_found_during_an_invalidation_is_confirmed_though_not_cached() {
        let contexts = cache(3_600, 3_600, 3_600);
        let read_before = contexts.generation();
        contexts.invalidate_all();
        contexts.insert("h".into(), context(), read_before);
        contexts.insert("u".into(), None, read_before);
        assert!(matches!(contexts.get("h"), Cached::Miss { stale: None }), "the context read before is not kept");
        assert!(contexts.confirmed("h"), "but the key exists");
        assert!(!contexts.confirmed("u"));
    }
}
