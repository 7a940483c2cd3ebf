//! `EventLog` over the shard streams, read by the consumer group `billing_workers`. Entries are
//! acknowledged only after their ledger commit; a consumer reads its own unacknowledged entries
//! first when it starts (it crashed mid-batch), takes over entries idle too long in a dead
//! consumer's pending list, and parks an entry delivered too often in the shard's dead-letter
//! stream.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::streams::{StreamPendingCountReply, StreamReadOptions, StreamReadReply};
use tokio_util::sync::CancellationToken;
use tollgate_core::Money;

use super::{CONSUMER_GROUP, Connection, KeySpace};
use crate::error::{StoreError, StoreResult};
use crate::hot::RECENT_CHARGE_MS;
use crate::model::{RequestStatus, UsageEvent};
use crate::queue::{Delivery, EventLog, Receipt};

/// Limits of the stream reader.
#[derive(Clone, Debug)]
pub struct RedisLogConfig {
    /// This consumer's name in the group; stable across restarts so it finds its own pending entries.
    pub consumer: String,
    /// Pause between polls when every shard is empty.
    pub poll_idle_ms: u64,
    /// An entry pending this long with another consumer is taken over.
    pub claim_idle_ms: u64,
    /// An entry delivered this many times goes to the dead-letter stream.
    pub deliveries_max: usize,
    /// How long a charged id stays remembered (`limits.recent_charge_ms`): an acknowledged
    /// charge whose record an older version wrote gets its id remembered that long.
    pub recent_charge_ms: i64,
}

impl Default for RedisLogConfig {
    fn default() -> Self {
        RedisLogConfig { consumer: "worker".into(), poll_idle_ms: 20, claim_idle_ms: 60_000, deliveries_max: 5, recent_charge_ms: RECENT_CHARGE_MS }
    }
}

/// The consuming side of the usage streams.
pub struct RedisLog {
    connection: Connection,
    keys: KeySpace,
    config: RedisLogConfig,
    shutdown: CancellationToken,
    /// `tollgate.lua`, whose `acked` operation acknowledges a shard's batch in one step.
    script: redis::Script,
    /// What reads keep between calls; one read at a time.
    reader: tokio::sync::Mutex<ReadState>,
    /// Entries taken from the streams and not yet acknowledged or parked, as (shard, entry id).
    /// The writer writes one batch while the next is read: a read of this consumer's pending
    /// entries, and the reclaim, must skip these, or an event would be written twice.
    in_flight: Mutex<HashSet<(u16, String)>>,
}

struct ReadState {
    /// Shards whose own pending entries must be read again (from id 0) before new ones.
    own_pending: Vec<bool>,
    /// Entries read but not yet handed to the writer. Reads happen in futures the writer may
    /// drop (its select on shutdown): what a read already took is kept here, not lost with it.
    read_ahead: Vec<Delivery>,
    next_claim: Instant,
}

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

impl RedisLog {
    /// Creates the consumer group on every shard stream (from the start of the stream, so events
    /// written before any worker existed are read too).
    ///
    /// # Errors
    /// Redis unreachable.
    pub async fn new(connection: Connection, keys: KeySpace, config: RedisLogConfig, shutdown: CancellationToken) -> StoreResult<RedisLog> {
        let mut group_connection = connection.clone();
        for shard in 0..keys.shards() {
            let created: redis::RedisResult<()> = group_connection.xgroup_create_mkstream(keys.stream(shard), CONSUMER_GROUP, "0").await;
            if let Err(error) = created
                && !error.to_string().contains("BUSYGROUP")
            {
                return Err(unavailable(error));
            }
        }
        let shards = usize::from(keys.shards());
        let reader = ReadState { own_pending: vec![true; shards], read_ahead: Vec::new(), next_claim: Instant::now() };
        Ok(RedisLog { connection, keys, config, shutdown, script: super::tollgate_script(), reader: tokio::sync::Mutex::new(reader), in_flight: Mutex::new(HashSet::new()) })
    }

    /// Entries delivered but not yet acknowledged, over all shards (a lag measure).
    ///
    /// # Errors
    /// Redis unreachable.
    pub async fn pending(&self) -> StoreResult<u64> {
        pending(&self.connection, &self.keys).await
    }

    /// Entries of the shard streams not yet delivered to the group: how far the workers are
    /// behind the gateways.
    ///
    /// # Errors
    /// Redis unreachable.
    pub async fn lag(&self) -> StoreResult<u64> {
        lag(&self.connection, &self.keys).await
    }

    fn is_in_flight(&self, shard: u16, entry_id: &str) -> bool {
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&(shard, entry_id.to_string()))
    }

    /// Entries are settled (acknowledged or parked): reads may see them again, if they are still there.
    fn landed(&self, entries: impl IntoIterator<Item = (u16, String)>) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for entry in entries {
            in_flight.remove(&entry);
        }
    }

    /// Moves one entry from the shard's stream to its dead letters in one atomic step
    /// (`park.lua` says why). `event` empty: the entry's own event is kept. Returns false when
    /// the entry was no longer pending: acknowledged after its commit, so nothing is parked.
    async fn park_entry(&self, shard: u16, entry_id: &str, reason: &str, event: &[u8]) -> StoreResult<bool> {
        let script = redis::Script::new(include_str!("park.lua"));
        let mut invocation = script.key(self.keys.stream(shard));
        invocation.key(self.keys.dead_letters(shard)).arg(CONSUMER_GROUP).arg(entry_id).arg(reason).arg(event);
        let mut connection = self.connection.clone();
        let parked: i64 = invocation.invoke_async(&mut connection).await.map_err(unavailable)?;
        if parked == 1 {
            metrics::counter!("tollgate_usage_dead_letters_total").increment(1);
        }
        Ok(parked == 1)
    }

    /// Takes over entries idle too long in other consumers' pending lists; parks the ones
    /// delivered too often. Entries in flight here are being written: left alone.
    async fn reclaim(&self, state: &mut ReadState) -> StoreResult<()> {
        let mut connection = self.connection.clone();
        for shard in 0..self.keys.shards() {
            let stream = self.keys.stream(shard);
            let idle: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(CONSUMER_GROUP)
                .arg("IDLE")
                .arg(self.config.claim_idle_ms)
                .arg("-")
                .arg("+")
                .arg(100)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            for entry in idle.ids {
                if self.is_in_flight(shard, &entry.id) {
                    continue;
                }
                if entry.times_delivered >= self.config.deliveries_max {
                    // The entry's own event, parked as it is (the script reads it).
                    if !self.park_entry(shard, &entry.id, "delivered too often", b"").await? {
                        continue;
                    }
                    tracing::error!(shard, entry_id = entry.id, deliveries = entry.times_delivered, "usage entry parked in the dead-letter stream");
                } else if entry.consumer != self.config.consumer {
                    let _: redis::Value = redis::cmd("XCLAIM")
                        .arg(&stream)
                        .arg(CONSUMER_GROUP)
                        .arg(&self.config.consumer)
                        .arg(self.config.claim_idle_ms)
                        .arg(&entry.id)
                        .query_async(&mut connection)
                        .await
                        .map_err(unavailable)?;
                    metrics::counter!("tollgate_usage_reclaimed_total").increment(1);
                    state.own_pending[usize::from(shard)] = true;
                } else {
                    state.own_pending[usize::from(shard)] = true;
                }
            }
        }
        Ok(())
    }

    /// Reads up to `max` entries of one shard into `read_ahead`. Cancel-safe: until the entries
    /// are in `read_ahead`, the shard stays marked `own_pending`, so if this future is dropped
    /// (or fails) after Redis delivered them, the next read takes them from this consumer's
    /// pending entries.
    /// Own pending entries come first; when none is left but those in flight, the new ones are
    /// read in the same call, so one empty call means the shard has nothing to hand out (a
    /// drain stops at the first empty pass).
    async fn read_shard(&self, state: &mut ReadState, shard: u16, max: usize) -> StoreResult<()> {
        let index = usize::from(shard);
        let mut from = if state.own_pending[index] { "0" } else { ">" };
        let mut connection = self.connection.clone();
        let entries = loop {
            // Own pending entries include those in flight (skipped below): read past them.
            let count = if from == "0" { max + self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() } else { max };
            let options = StreamReadOptions::default().group(CONSUMER_GROUP, &self.config.consumer).count(count);
            state.own_pending[index] = true;
            let reply: Option<StreamReadReply> = connection.xread_options(&[self.keys.stream(shard)], &[from], &options).await.map_err(unavailable)?;
            let entries: Vec<_> = reply
                .into_iter()
                .flat_map(|reply| reply.keys)
                .flat_map(|key| key.ids)
                .filter(|entry| from == ">" || !self.is_in_flight(shard, &entry.id))
                .collect();
            if from == "0" && entries.is_empty() {
                from = ">";
                continue;
            }
            break entries;
        };
        // Own pending entries (found: the loop reads new ones only once none is left) are read
        // again next time, until none is left but those in flight; new ones once.
        let pending_left = from == "0";
        let mut delivered = Vec::with_capacity(entries.len());
        let mut taken = Vec::with_capacity(entries.len());
        for mut entry in entries {
            // Taken out of the entry, not copied: it holds the response body, most of its bytes.
            let event_bytes: Option<Vec<u8>> = match entry.map.remove("event") {
                Some(redis::Value::BulkString(bytes)) => Some(bytes),
                Some(other) => redis::from_redis_value::<String>(other).ok().map(String::into_bytes),
                None => None,
            };
            let balance: Option<i64> = entry.get("hot_balance_after");
            let parsed = event_bytes.as_deref().and_then(|bytes| serde_json::from_slice::<UsageEvent>(bytes).ok());
            let receipt = Receipt::Stream { shard, entry_id: entry.id.clone() };
            match parsed {
                Some(mut event) => {
                    event.hot_balance_after = Money::from_nanos(balance.unwrap_or(0));
                    taken.push((shard, entry.id.clone()));
                    delivered.push(Delivery { event, receipt });
                }
                None => {
                    // Unreadable: never retried forever, parked as it is (the script keeps the
                    // entry's own bytes).
                    if self.park_entry(shard, &entry.id, "unreadable", b"").await? {
                        tracing::error!(shard, entry_id = entry.id, "unreadable usage entry parked in the dead-letter stream");
                    }
                }
            }
        }
        // No await from here on: the entries, what is in flight and the flag change together.
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(taken);
        state.read_ahead.extend(delivered);
        state.own_pending[index] = pending_left;
        Ok(())
    }

    /// One pass over the shards into `read_ahead`: this consumer's own pending entries first
    /// (after a crash), then new ones.
    async fn read_pass(&self, state: &mut ReadState, max: usize) -> StoreResult<Vec<Delivery>> {
        for shard in 0..self.keys.shards() {
            let room = max.max(1).saturating_sub(state.read_ahead.len());
            if room == 0 {
                break;
            }
            self.read_shard(state, shard, room).await?;
        }
        Ok(std::mem::take(&mut state.read_ahead))
    }
}

#[async_trait]
impl EventLog for RedisLog {
    async fn read_batch(&self, max: usize) -> StoreResult<Vec<Delivery>> {
        let max = max.max(1);
        let mut state = self.reader.lock().await;
        loop {
            let draining = self.shutdown.is_cancelled();
            if !draining && Instant::now() >= state.next_claim {
                self.reclaim(&mut state).await?;
                // Lag: entries delivered and not yet in the ledger, for the alert on a slow worker.
                metrics::gauge!("tollgate_usage_pending_entries").set(self.pending().await? as f64);
                metrics::gauge!("tollgate_usage_stream_lag_entries").set(self.lag().await? as f64);
                state.next_claim = Instant::now() + Duration::from_millis((self.config.claim_idle_ms / 2).max(100));
            }
            let batch = self.read_pass(&mut state, max).await?;
            // Shutting down: hand over what is already in the streams, then report the end.
            if !batch.is_empty() || draining {
                return Ok(batch);
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(self.config.poll_idle_ms)) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }

    async fn read_remaining(&self, max: usize) -> StoreResult<Vec<Delivery>> {
        let mut state = self.reader.lock().await;
        self.read_pass(&mut state, max).await
    }

    async fn ack(&self, deliveries: Vec<Delivery>) -> StoreResult<()> {
        // Per shard: the entries, and the (account, request id) of their charges.
        let mut by_shard: BTreeMap<u16, (Vec<String>, Vec<(String, String)>)> = BTreeMap::new();
        for delivery in deliveries {
            if let Receipt::Stream { shard, entry_id } = delivery.receipt {
                let (entry_ids, charged) = by_shard.entry(shard).or_default();
                entry_ids.push(entry_id);
                let event = delivery.event;
                if event.status != RequestStatus::Failed {
                    charged.push((event.account_id, event.request_id));
                }
            }
        }
        let mut connection = self.connection.clone();
        let window = self.config.recent_charge_ms.to_string();
        for (shard, (entry_ids, charged)) in by_shard {
            // One script call (`acked`): the entries leave the stream, each charge's record
            // gives way to its remembered id, the unlogged index forgets it — all or nothing.
            let base = self.keys.base(shard);
            let mut invocation = self.script.key(self.keys.stream(shard));
            invocation.arg("acked").arg(&base).arg(CONSUMER_GROUP).arg(&window).arg(entry_ids.len()).arg(&entry_ids);
            for (account_id, request_id) in &charged {
                invocation.arg(account_id).arg(request_id);
            }
            let _: i64 = invocation.invoke_async(&mut connection).await.map_err(unavailable)?;
            // Only now: if the acknowledgement failed, the entries stay in flight, so this
            // consumer does not write them again (they are committed); after a restart they are
            // read again and skipped as duplicates.
            self.landed(entry_ids.into_iter().map(|entry_id| (shard, entry_id)));
        }
        Ok(())
    }

    async fn park(&self, delivery: Delivery, reason: &str) -> StoreResult<()> {
        let Receipt::Stream { shard, ref entry_id } = delivery.receipt else { return Ok(()) };
        // Should it not serialize, empty keeps the entry's own event, as the gateway wrote it.
        let event = serde_json::to_vec(&delivery.event).unwrap_or_default();
        // It lives on in the dead letters; the stream keeps only what the workers still owe.
        let parked = self.park_entry(shard, entry_id, reason, &event).await?;
        self.landed([(shard, entry_id.clone())]);
        if parked {
            tracing::error!(shard, entry_id, reason, "usage event parked in the dead-letter stream");
        }
        Ok(())
    }

    fn durable(&self) -> bool {
        true
    }
}

/// How far the workers are behind, over all shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Entries not yet delivered to the group (XINFO GROUPS `lag`).
    pub lag: u64,
    /// Entries delivered and not yet acknowledged (in a batch being written, or of a dead worker).
    pub pending: u64,
    /// Entries parked in the dead-letter streams, waiting for an operator.
    pub dead_letters: u64,
}

/// Reads the backlog of the usage streams (for the stream-lag job; any process may call it).
///
/// # Errors
/// Redis unreachable.
pub async fn backlog(connection: &Connection, keys: &KeySpace) -> StoreResult<Backlog> {
    let mut dead_letters = 0u64;
    let mut reader = connection.clone();
    for shard in 0..keys.shards() {
        let length: u64 = reader.xlen(keys.dead_letters(shard)).await.map_err(unavailable)?;
        dead_letters += length;
    }
    Ok(Backlog { lag: lag(connection, keys).await?, pending: pending(connection, keys).await?, dead_letters })
}

async fn pending(connection: &Connection, keys: &KeySpace) -> StoreResult<u64> {
    let mut connection = connection.clone();
    let mut pending = 0u64;
    for shard in 0..keys.shards() {
        let reply: redis::streams::StreamPendingReply = connection.xpending(keys.stream(shard), CONSUMER_GROUP).await.map_err(unavailable)?;
        pending += reply.count() as u64;
    }
    Ok(pending)
}

/// XINFO GROUPS `lag` of the workers' group, summed over the shards; a stream without the group
/// yet (no worker ever started) counts its length.
async fn lag(connection: &Connection, keys: &KeySpace) -> StoreResult<u64> {
    let mut connection = connection.clone();
    let mut lag = 0u64;
    for shard in 0..keys.shards() {
        let stream = keys.stream(shard);
        let exists: bool = connection.exists(&stream).await.map_err(unavailable)?;
        if !exists {
            continue;
        }
        let groups: redis::streams::StreamInfoGroupsReply = connection.xinfo_groups(&stream).await.map_err(unavailable)?;
        match groups.groups.iter().find(|group| group.name == CONSUMER_GROUP) {
            Some(group) => lag += group.lag.unwrap_or(0) as u64,
            None => {
                let length: u64 = connection.xlen(&stream).await.map_err(unavailable)?;
                lag += length;
            }
        }
    }
    Ok(lag)
}
