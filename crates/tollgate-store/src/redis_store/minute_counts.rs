//! Counts per minute that several gateways add to together, in services mode: a channel's
//! requests and tokens against the rate limits its upstream sets. Each gateway counts what it
//! sends, and every sync period adds that to the minute's shared count and reads back the
//! fleet's: one script call per channel, both minutes' keys in the channel's slot.

use super::{Connection, unavailable};
use crate::error::StoreResult;

/// Adds `ARGV[1]` requests and `ARGV[2]` tokens to the hash `KEYS[1]` (this minute), keeps it
/// `ARGV[3]` ms, and answers both counts of it and of `KEYS[2]` (the minute before).
const ADD_AND_READ: &str = r"
if ARGV[1] ~= '0' then redis.call('HINCRBY', KEYS[1], 'r', ARGV[1]) end
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[1], 't', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local now = redis.call('HMGET', KEYS[1], 'r', 't')
local before = redis.call('HMGET', KEYS[2], 'r', 't')
return {now[1] or '0', now[2] or '0', before[1] or '0', before[2] or '0'}
";

/// A minute's counts: [requests, tokens].
pub type MinuteCounts = [u64; 2];

/// Kept this long after a minute's last addition: the minute after it still reads it.
const KEPT_MS: u64 = 3 * 60 * 1000;

#[derive(Clone)]
pub struct CountsOfMinutes {
    connection: Connection,
    prefix: String,
    script: redis::Script,
}

impl CountsOfMinutes {
    pub fn new(connection: Connection, prefix: &str) -> CountsOfMinutes {
        CountsOfMinutes { connection, prefix: prefix.to_string(), script: redis::Script::new(ADD_AND_READ) }
    }

    /// The key of the counts of `name` (every minute of it in one slot).
    pub fn key(&self, name: &str) -> String {
        super::versioned::tagged_key(&self.prefix, "rate", name)
    }

    /// Adds `added` to minute `minute` (Unix ms / 60,000) of `key`; returns the counts of that
    /// minute and of the one before, as the fleet has them now.
    ///
    /// # Errors
    /// `Unavailable` when Redis does not answer (nothing was added then, or it was: the caller
    /// cannot tell, and counts it again — a limit errs on the safe side).
    pub async fn add_and_read(&self, key: &str, minute: i64, added: MinuteCounts) -> StoreResult<(MinuteCounts, MinuteCounts)> {
        let mut connection = self.connection.clone();
        let counts: Vec<String> = self
            .script
            .key(format!("{key}:{minute}"))
            .key(format!("{key}:{}", minute.saturating_sub(1)))
            .arg(added[0])
            .arg(added[1])
            .arg(KEPT_MS)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let count = |index: usize| counts.get(index).and_then(|count| count.parse::<u64>().ok()).unwrap_or(0);
        Ok(([count(0), count(1)], [count(2), count(3)]))
    }
}
