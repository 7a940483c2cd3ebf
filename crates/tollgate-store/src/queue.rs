//! The log that carries usage events from `settle` to the worker, and its embedded
//! implementation: an in-process bounded channel whose deliveries are acknowledged after the
//! ledger commit. The Redis implementation is a set of shard streams read by a consumer group.
//!
//! In embedded mode the channel is not durable, so the hot store's `settle` waits for the
//! acknowledgement: the usage row is committed before the response's last byte leaves (I1).

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{StoreError, StoreResult};
use crate::model::UsageEvent;

/// One event handed to the worker, with what it takes to acknowledge it.
#[derive(Debug)]
pub struct Delivery {
    pub event: UsageEvent,
    pub receipt: Receipt,
}

/// How a delivery is acknowledged; each log kind has its own.
#[derive(Debug)]
pub enum Receipt {
    /// Embedded: wake the settle waiting for durability (None: nobody waits, e.g. a void).
    Channel(Option<oneshot::Sender<()>>),
    /// Redis Streams: the entry to XACK in the shard's stream.
    Stream { shard: u16, entry_id: String },
}

/// The consuming side of the usage log, read by the worker in batches.
///
/// Every method takes `&self`: the worker writes one batch (and acknowledges it) while it reads
/// the next, so a log must never hand out an event again while an earlier delivery of it is
/// still being written (it keeps track of what is in flight until acknowledged or parked).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Waits for at least one event and returns up to `max` of them; an empty batch means the
    /// log is closed and drained. Must be cancel-safe: the writer drops it when shutdown fires,
    /// and nothing it already took from the log may be lost with it.
    async fn read_batch(&self, max: usize) -> StoreResult<Vec<Delivery>>;
    /// Returns up to `max` of the events already in the log without waiting for more; empty
    /// when none is left. The worker drains the log with it on shutdown: a slow read (Redis
    /// under load) is not mistaken for an empty log.
    async fn read_remaining(&self, max: usize) -> StoreResult<Vec<Delivery>>;
    /// Acknowledges deliveries whose events are committed in the ledger.
    async fn ack(&self, deliveries: Vec<Delivery>) -> StoreResult<()>;
    /// Takes an event the ledger refuses for good (not an outage) out of the log, keeping it
    /// where an operator can see it (a dead-letter stream), so it cannot block the others.
    async fn park(&self, delivery: Delivery, reason: &str) -> StoreResult<()>;
    /// Whether an event is durable in the log itself (Redis's AOF). When not, its settle waits
    /// for the ledger's commit, and the writer must write what it has at once.
    fn durable(&self) -> bool;
}

/// The producing side of the embedded log (held by the in-process hot store).
#[derive(Clone, Debug)]
pub struct ChannelLogSender {
    sender: mpsc::Sender<Delivery>,
}

/// The consuming side of the embedded log. A delivery leaves the channel once: nothing is
/// handed out twice, so there is nothing in flight to track.
#[derive(Debug)]
pub struct ChannelLog {
    receiver: Mutex<mpsc::Receiver<Delivery>>,
}

/// A bounded in-process log: when the worker falls `capacity` events behind, settles wait.
pub fn channel_log(capacity: usize) -> (ChannelLogSender, ChannelLog) {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    (ChannelLogSender { sender }, ChannelLog { receiver: Mutex::new(receiver) })
}

impl ChannelLogSender {
    /// Takes a place in the log for one event; waits while the log is full. Taken before the
    /// hot state changes, so that a caller cancelled while it waits has changed nothing, and one
    /// that got its place cannot lose the event after changing the state.
    ///
    /// # Errors
    /// `Unavailable` when the worker is gone (the process is shutting down).
    pub async fn reserve(&self) -> StoreResult<LogSlot<'_>> {
        let permit = self.sender.reserve().await.map_err(|_| StoreError::Unavailable("usage log closed: worker stopped".into()))?;
        Ok(LogSlot { permit })
    }
}

/// A place in the embedded log, held between [`ChannelLogSender::reserve`] and the append.
pub struct LogSlot<'a> {
    permit: mpsc::Permit<'a, Delivery>,
}

impl LogSlot<'_> {
    /// Appends the event, at once; when `durable` the returned receiver fires once it is
    /// committed.
    pub fn append(self, event: UsageEvent, durable: bool) -> Option<oneshot::Receiver<()>> {
        let (sender, receiver) = if durable {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        self.permit.send(Delivery { event, receipt: Receipt::Channel(sender) });
        receiver
    }
}

#[async_trait]
impl EventLog for ChannelLog {
    async fn read_batch(&self, max: usize) -> StoreResult<Vec<Delivery>> {
        let mut batch = Vec::with_capacity(max.min(1024));
        // Cancel-safe: recv_many takes nothing from the channel unless it returns.
        self.receiver.lock().await.recv_many(&mut batch, max.max(1)).await;
        Ok(batch)
    }

    async fn read_remaining(&self, max: usize) -> StoreResult<Vec<Delivery>> {
        let mut batch = Vec::new();
        let mut receiver = self.receiver.lock().await;
        while batch.len() < max.max(1) {
            match receiver.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn ack(&self, deliveries: Vec<Delivery>) -> StoreResult<()> {
        for delivery in deliveries {
            match delivery.receipt {
                // The waiter may have given up (its request was cancelled); the row is committed
                // either way, so a closed waiter is not an error.
                Receipt::Channel(Some(waiter)) => {
                    let _ = waiter.send(());
                }
                Receipt::Channel(None) | Receipt::Stream { .. } => {}
            }
        }
        Ok(())
    }

    async fn park(&self, delivery: Delivery, reason: &str) -> StoreResult<()> {
        // In-process there is nowhere durable to park: the event is logged whole for an operator.
        metrics::counter!("tollgate_usage_dead_letters_total").increment(1);
        tracing::error!(reason, event = ?delivery.event, "usage event refused by the ledger; parked in the log output");
        // Not acknowledged: the waiting settle must not take a refused charge for a committed
        // one, or the response would leave with no usage row behind it (I1). Dropping its
        // waiter fails the settle; the hot store keeps the charge unlogged.
        drop(delivery);
        Ok(())
    }

    fn durable(&self) -> bool {
        false
    }
}
