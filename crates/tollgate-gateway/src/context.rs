//! The billing context cache: key hash → (key, account), and the current price table. Nothing on
//! the request path reads the database once these are warm. Every change to a key, an account or
//! a price invalidates them synchronously, so the change applies to the very next request.

use std::collections::HashMap;
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

/// Cached billing contexts with a TTL and a generation counter: a context read from the ledger
/// before an invalidation is not cached after it.
pub struct ContextCache {
    entries: RwLock<HashMap<String, (Arc<BillingContext>, Instant)>>,
    generation: AtomicU64,
    ttl: Duration,
}

impl ContextCache {
    pub fn new(ttl: Duration) -> ContextCache {
        ContextCache { entries: RwLock::new(HashMap::new()), generation: AtomicU64::new(0), ttl }
    }

    /// The generation to pass to `insert` after loading from the ledger.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, key_hash: &str) -> Option<Arc<BillingContext>> {
        let entries = self.entries.read().ok()?;
        let (context, loaded_at) = entries.get(key_hash)?;
        if loaded_at.elapsed() > self.ttl {
            metrics::counter!("tollgate_context_cache_total", "result" => "expired").increment(1);
            return None;
        }
        metrics::counter!("tollgate_context_cache_total", "result" => "hit").increment(1);
        Some(Arc::clone(context))
    }

    /// Caches a context unless an invalidation happened since `generation` was read.
    pub fn insert(&self, key_hash: String, context: Arc<BillingContext>, generation: u64) {
        metrics::counter!("tollgate_context_cache_total", "result" => "miss").increment(1);
        if let Ok(mut entries) = self.entries.write() {
            // Checked under the write lock: `invalidate_all` bumps the generation under it too.
            if self.generation.load(Ordering::Acquire) == generation {
                entries.insert(key_hash, (context, Instant::now()));
            }
        }
    }

    /// Drops every cached context (a key, account, or tier changed).
    pub fn invalidate_all(&self) {
        if let Ok(mut entries) = self.entries.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            entries.clear();
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
