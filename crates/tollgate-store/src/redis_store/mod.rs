//! The production hot store on Redis (single node or Redis Cluster) and the usage log on Redis
//! Streams. Every step of the charge protocol is one call of `tollgate.lua` (its header lists the
//! keys, the money range and the invariants); every key of an account carries the hash tag of
//! the account's shard, so a call touches one slot and the shard's stream lives beside its
//! accounts.
//!
//! URL forms: `redis://host:port[/db]` (one node) and `redis+cluster://host:port,host:port,…`
//! (a cluster, given by some of its nodes). Production Redis runs with AOF on
//! (`appendonly yes`, `appendfsync everysec` or `always`) and `maxmemory-policy noeviction`: the
//! hot balances and the usage streams are state, not cache.

mod hot;
mod log;
mod minute_counts;
mod versioned;

pub use hot::{LOAD_IDS_PER_CALL, RedisHotStore};
pub use log::{Backlog, RedisLog, RedisLogConfig, backlog};
pub use minute_counts::{CountsOfMinutes, MinuteCounts};
pub use versioned::{Versioned, VersionedValues};

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::error::{StoreError, StoreResult};

/// Shards (streams, hash tags) unless configured otherwise.
pub const SHARDS_DEFAULT: u16 = 16;
/// Consumer group of the workers.
pub const CONSUMER_GROUP: &str = "billing_workers";

/// `tollgate.lua`, the one script every hot-store operation and the worker's acknowledgement call.
fn tollgate_script() -> redis::Script {
    redis::Script::new(include_str!("tollgate.lua"))
}

/// One multiplexed connection to a node or a cluster; cheap to clone, shared by all requests.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, command: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(command),
            Connection::Cluster(connection) => connection.req_packed_command(command),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

/// How long one command may wait for its reply. Every request of a process shares one
/// multiplexed connection, so under a burst a reply waits behind the others' (the client's own
/// default, 500 ms, turned bursts of a thousand requests on two cores into spurious 503s); a
/// Redis that is down fails at once (connection refused), so this bounds only a hung one.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a (re)connection attempt may take.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection attempts a command waits for when the connection is lost (100 ms, then 200 ms
/// apart), so that with Redis down a request is refused `billing_unavailable` in well under a
/// second instead of after the client's default six attempts (about 6 s); the next command
/// starts reconnecting again.
const RECONNECT_ATTEMPTS: usize = 2;
const RECONNECT_DELAY_MAX: Duration = Duration::from_millis(200);

/// Connects to the node or cluster a URL names.
///
/// # Errors
/// A malformed URL or an unreachable server.
pub async fn connect(url: &str) -> StoreResult<Connection> {
    if let Some(nodes) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = nodes.split(',').filter(|node| !node.is_empty()).map(|node| format!("redis://{node}")).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .tcp_settings(no_delay())
            .response_timeout(RESPONSE_TIMEOUT)
            .connection_timeout(CONNECTION_TIMEOUT)
            .build()
            .map_err(unavailable)?;
        return Ok(Connection::Cluster(client.get_async_connection().await.map_err(unavailable)?));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(unavailable)?.set_tcp_settings(no_delay());
    let client = redis::Client::open(info).map_err(unavailable)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_number_of_retries(RECONNECT_ATTEMPTS)
        .set_max_delay(RECONNECT_DELAY_MAX);
    Ok(Connection::Single(client.get_connection_manager_with_config(config).await.map_err(unavailable)?))
}

/// TCP_NODELAY on every Redis connection (redis-rs leaves Nagle on): a command whose tail goes
/// out as a small segment behind a full one (a settle with its usage event, a long batch
/// acknowledgement) must not wait for Redis's delayed ACK.
fn no_delay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// Where an account's keys live: a shard number (FNV-1a 64 of the id, mod `shards` — stable
/// across processes and versions, unlike std's hasher) and the key base with its hash tag.
#[derive(Clone, Debug)]
pub struct KeySpace {
    prefix: String,
    shards: u16,
}

impl KeySpace {
    /// # Errors
    /// A prefix with braces (it would break the hash tag) or zero shards.
    pub fn new(prefix: &str, shards: u16) -> StoreResult<KeySpace> {
        if prefix.is_empty() || prefix.contains(['{', '}']) || shards == 0 {
            return Err(StoreError::Invalid("redis key prefix must be non-empty without braces, shards > 0".into()));
        }
        Ok(KeySpace { prefix: prefix.to_string(), shards })
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn shard_of(&self, account_id: &str) -> u16 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in account_id.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // The remainder is below `shards`, a u16.
        u16::try_from(hash % u64::from(self.shards)).unwrap_or(0)
    }

    /// `<prefix>:{<prefix>:<shard>}`: every key of the shard starts with it.
    pub fn base(&self, shard: u16) -> String {
        format!("{0}:{{{0}:{shard}}}", self.prefix)
    }

    pub fn account_base(&self, account_id: &str) -> String {
        self.base(self.shard_of(account_id))
    }

    /// The hash holding an account's balance, holds and fund position.
    pub fn account_key(&self, account_id: &str) -> String {
        format!("{}:acct:{account_id}", self.account_base(account_id))
    }

    /// The idempotency record of a charged request (as `tollgate.lua` names it).
    pub fn charged_key(&self, account_id: &str, request_id: &str) -> String {
        format!("{}:charged:{account_id}:{request_id}", self.account_base(account_id))
    }

    /// The index of an account's charges the ledger may not have yet (as `tollgate.lua` names it).
    pub fn unlogged_key(&self, account_id: &str) -> String {
        format!("{}:unlogged:{account_id}", self.account_base(account_id))
    }

    pub fn stream(&self, shard: u16) -> String {
        format!("{}:usage", self.base(shard))
    }

    pub fn dead_letters(&self, shard: u16) -> String {
        format!("{}:usage:dead", self.base(shard))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        let space = KeySpace::new("tg", 16).unwrap();
        assert_eq!(space.shard_of("demo"), space.shard_of("demo"));
        assert_eq!(space.base(3), "tg:{tg:3}");
        assert_eq!(space.stream(3), "tg:{tg:3}:usage");
        let mut used = std::collections::HashSet::new();
        for index in 0..200 {
            used.insert(space.shard_of(&format!("acct_{index}")));
        }
        assert_eq!(used.len(), 16, "200 accounts reach every shard");
        assert!(KeySpace::new("a{b", 16).is_err());
    }
}
