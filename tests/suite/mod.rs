mod charging;
mod concurrency;
mod crash;
mod funds;
mod idempotency;
mod limits;
mod notifications;
mod streaming;
