//! Where request bodies are parsed and tokenized. A small body is counted on the request's own
//! task (well under a millisecond); a large one on tokio's blocking threads, at most
//! `limits.tokenizer_threads` at a time, so a flood of 4 MiB bodies queues for those threads
//! instead of stalling the async workers every other request (and every stream) runs on.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Bodies up to this many bytes are parsed and tokenized inline.
pub const INLINE_BYTES_MAX: usize = 16 * 1024;

/// The bounded pool, and how much it did (tests and metrics read the counts).
pub struct TokenizerPool {
    slots: Semaphore,
    inline_runs: AtomicU64,
    pool_runs: AtomicU64,
}

impl TokenizerPool {
    pub fn new(threads: usize) -> TokenizerPool {
        TokenizerPool { slots: Semaphore::new(threads.max(1)), inline_runs: AtomicU64::new(0), pool_runs: AtomicU64::new(0) }
    }

    /// Runs `work` (parsing or counting `body_bytes` of a request) inline when the body is
    /// small, else on a blocking thread once one of the pool's slots is free.
    ///
    /// # Errors
    /// `Internal` if the blocking task panicked.
    pub async fn run<T: Send + 'static>(&self, body_bytes: usize, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        if body_bytes <= INLINE_BYTES_MAX {
            self.inline_runs.fetch_add(1, Ordering::Relaxed);
            return Ok(work());
        }
        let _slot = self.slots.acquire().await.map_err(|_| ApiError::Internal("the tokenizer pool is closed".into()))?;
        self.pool_runs.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tollgate_tokenizer_pool_runs_total").increment(1);
        metrics::counter!("tollgate_tokenizer_pool_bytes_total").increment(body_bytes as u64);
        tokio::task::spawn_blocking(work).await.map_err(|error| ApiError::Internal(format!("tokenizer task failed: {error}")))
    }

    /// (inline runs, pool runs) since start.
    pub fn runs(&self) -> (u64, u64) {
        (self.inline_runs.load(Ordering::Relaxed), self.pool_runs.load(Ordering::Relaxed))
    }
}

/// The default pool size: every core but one for the async workers, at least one.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().saturating_sub(1).max(1))
}
