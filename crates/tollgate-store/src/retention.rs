//! What the ledger keeps, and for how long.
//!
//! A charged non-streaming request's response is stored so that a retry within the replay
//! window is answered with it (`limits.replay_window_ms`); past the window the gateway answers
//! 409 `duplicate_request` whatever is still stored (it decides by the charge's time), and the
//! `prune` job deletes the body. The usage row stays: the ledger still knows the id was charged.
//!
//! Pruning reads only the head of `stored_responses`: its key is the usage row's id, which grows
//! with time (roughly: rows are numbered when the worker writes them, dated when the gateway
//! settled them), so the oldest rows are at the head and a batch costs the same however large
//! the table is. A batch deletes, among the head's `rows_max` rows, those older than the
//! cut-off; a body out of order further back waits until the rows ahead of it go — pruned late,
//! never early, and never replayed past its window either way.
//!
//! Upstream attempts (which channels a request tried, for reconciling a provider's bill) are
//! kept `jobs.upstream_attempts_retention_ms` and pruned the same way from the head of their
//! table; the archive of a month drops those of its usage rows.

use async_trait::async_trait;

use crate::error::{StoreError, StoreResult};
use crate::operations::pg;
use crate::postgres::PgLedger;
use crate::sqlite::SqliteLedger;

/// What one pruning batch removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub rows: u64,
    /// The bodies' bytes (the rows' own overhead is not counted).
    pub bytes: u64,
}

#[async_trait]
pub trait Retention {
    /// Deletes stored responses charged before `before_ms` among the `rows_max` oldest by key.
    /// Fewer than `rows_max` deleted means the head reached rows inside the window: the run is
    /// done.
    async fn prune_stored_responses(&self, before_ms: i64, rows_max: u32) -> StoreResult<Pruned>;
    /// Deletes upstream attempts (table `upstream_attempts`) recorded before `before_ms` among
    /// the `rows_max` oldest by key, as [`Retention::prune_stored_responses`] does bodies;
    /// returns how many.
    async fn prune_upstream_attempts(&self, before_ms: i64, rows_max: u32) -> StoreResult<u64>;
    /// When the oldest stored response kept was charged (Unix ms), if any is.
    async fn oldest_stored_response_ms(&self) -> StoreResult<Option<i64>>;
    /// Gives up to `pages_max` pages freed by pruning back to the file system, where the
    /// database does not do it by itself (SQLite's incremental vacuum; PostgreSQL's autovacuum
    /// reuses them in place); returns how many free pages remain. One step holds the write lock
    /// for its pages only (about 40 ms for 1,024 pages here), so the caller pauses between steps.
    async fn compact_step(&self, pages_max: u32) -> StoreResult<u64>;
    /// Makes the usage log's monthly partitions (PostgreSQL, migration 0008) for the month of
    /// `now_ms` and the `months_ahead` after it, and for every month with rows in the default
    /// partition (they move into it). A ledger that does not partition (SQLite) does nothing.
    async fn ensure_usage_partitions(&self, now_ms: i64, months_ahead: u32) -> StoreResult<UsagePartitions>;
}

/// The usage log's monthly partitions after [`Retention::ensure_usage_partitions`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsagePartitions {
    /// Whether the ledger partitions the usage log at all.
    pub partitioned: bool,
    /// The months (`YYYY-MM`) whose partitions this call made.
    pub made: Vec<String>,
    /// Every month with a partition, oldest first.
    pub months: Vec<String>,
    /// Rows in the default partition: dated in a month without one (none after a call, unless
    /// written meanwhile).
    pub default_rows: u64,
}

/// `YYYY-MM` of a Unix-ms time, moved `ahead` months on (UTC).
///
/// # Errors
/// The time is outside what a date can hold.
pub fn month_label(at_ms: i64, ahead: u32) -> StoreResult<String> {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .map_err(|_| StoreError::Invalid(format!("impossible time {at_ms}")))?;
    let index = i64::from(at.year()) * 12 + i64::from(u8::from(at.month())) - 1 + i64::from(ahead);
    Ok(format!("{:04}-{:02}", index.div_euclid(12), index.rem_euclid(12) + 1))
}

/// The head of the table by key, and of it the rows past the cut-off; their body sizes.
const PRUNE_HEAD: &str = "DELETE FROM stored_responses WHERE usage_id IN (
        SELECT usage_id FROM (SELECT usage_id, created_at FROM stored_responses ORDER BY usage_id LIMIT ?) head
        WHERE created_at < ?)
    RETURNING CAST(LENGTH(body) AS BIGINT)";
/// The same for upstream attempts, whose key (usage row id, attempt) also grows with time.
const PRUNE_ATTEMPTS_HEAD: &str = "DELETE FROM upstream_attempts WHERE (usage_id, attempt) IN (
        SELECT usage_id, attempt FROM (SELECT usage_id, attempt, created_at FROM upstream_attempts ORDER BY usage_id, attempt LIMIT ?) head
        WHERE created_at < ?)";
const OLDEST_KEPT: &str = "SELECT created_at FROM stored_responses ORDER BY usage_id LIMIT 1";

fn pruned_from(sizes: &[i64]) -> Pruned {
    Pruned { rows: sizes.len() as u64, bytes: sizes.iter().map(|size| u64::try_from(*size).unwrap_or(0)).sum() }
}

#[async_trait]
impl Retention for PgLedger {
    async fn prune_stored_responses(&self, before_ms: i64, rows_max: u32) -> StoreResult<Pruned> {
        // LENGTH of a bytea is its byte count in PostgreSQL, as of a blob in SQLite.
        let sizes: Vec<i64> = sqlx::query_scalar(pg(PRUNE_HEAD)).bind(i64::from(rows_max)).bind(before_ms).fetch_all(self.pool()).await?;
        Ok(pruned_from(&sizes))
    }

    async fn prune_upstream_attempts(&self, before_ms: i64, rows_max: u32) -> StoreResult<u64> {
        let deleted = sqlx::query(pg(PRUNE_ATTEMPTS_HEAD)).bind(i64::from(rows_max)).bind(before_ms).execute(self.pool()).await?;
        Ok(deleted.rows_affected())
    }

    async fn oldest_stored_response_ms(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(OLDEST_KEPT).fetch_optional(self.pool()).await?)
    }

    async fn compact_step(&self, _pages_max: u32) -> StoreResult<u64> {
        Ok(0)
    }

    async fn ensure_usage_partitions(&self, now_ms: i64, months_ahead: u32) -> StoreResult<UsagePartitions> {
        let mut wanted = std::collections::BTreeSet::new();
        for ahead in 0..=months_ahead {
            wanted.insert(month_label(now_ms, ahead)?);
        }
        // Normally empty: rows land here only for a month nobody made a partition for.
        let stray: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT to_char(to_timestamp(floor(created_at / 1000.0)::DOUBLE PRECISION) AT TIME ZONE 'UTC', 'YYYY-MM') FROM usage_log_default",
        )
        .fetch_all(self.pool())
        .await?;
        wanted.extend(stray);
        let mut made = Vec::new();
        for month in wanted {
            // One transaction per month; it waits for the writers in flight and makes the next
            // wait for it, so it gives up rather than queue behind a long transaction.
            let mut transaction = self.pool().begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '2s'").execute(&mut *transaction).await?;
            let created: bool =
                sqlx::query_scalar("SELECT tollgate_usage_partition(($1 || '-01')::DATE)").bind(&month).fetch_one(&mut *transaction).await?;
            transaction.commit().await?;
            if created {
                made.push(month);
            }
        }
        let months: Vec<String> = sqlx::query_scalar(
            "SELECT replace(substr(c.relname, 11), '_', '-') FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'usage_log'::regclass AND c.relname ~ '^usage_log_[0-9]{4}_[0-9]{2}$' ORDER BY c.relname",
        )
        .fetch_all(self.pool())
        .await?;
        let default_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_log_default").fetch_one(self.pool()).await?;
        Ok(UsagePartitions { partitioned: true, made, months, default_rows: u64::try_from(default_rows).unwrap_or(0) })
    }
}

#[async_trait]
impl Retention for SqliteLedger {
    async fn prune_stored_responses(&self, before_ms: i64, rows_max: u32) -> StoreResult<Pruned> {
        let mut transaction = self.write().await?;
        let sizes: Vec<i64> = sqlx::query_scalar(PRUNE_HEAD).bind(i64::from(rows_max)).bind(before_ms).fetch_all(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(pruned_from(&sizes))
    }

    async fn prune_upstream_attempts(&self, before_ms: i64, rows_max: u32) -> StoreResult<u64> {
        let mut transaction = self.write().await?;
        let deleted = sqlx::query(PRUNE_ATTEMPTS_HEAD).bind(i64::from(rows_max)).bind(before_ms).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(deleted.rows_affected())
    }

    async fn oldest_stored_response_ms(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(OLDEST_KEPT).fetch_optional(self.pool()).await?)
    }

    async fn compact_step(&self, pages_max: u32) -> StoreResult<u64> {
        // The file is in incremental auto-vacuum mode (set when it is opened): free pages are
        // returned to the file system here, not at every delete. All of a large prune's pages
        // at once held the write lock for 2.6 s (280 MB); a step holds it for its pages.
        let mut transaction = self.write().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA incremental_vacuum({pages_max})"))).execute(&mut *transaction).await?;
        let free: i64 = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(u64::try_from(free).unwrap_or(0))
    }

    async fn ensure_usage_partitions(&self, _now_ms: i64, _months_ahead: u32) -> StoreResult<UsagePartitions> {
        Ok(UsagePartitions::default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::month_label;

    #[test]
    fn months_are_counted_on_across_year_ends_in_utc() {
        // 2026-12-31 23:59:59.999 UTC, and the millisecond after it.
        let last_ms = 1_798_761_599_999;
        assert_eq!(month_label(last_ms, 0).unwrap(), "2026-12");
        assert_eq!(month_label(last_ms + 1, 0).unwrap(), "2027-01");
        assert_eq!(month_label(last_ms, 1).unwrap(), "2027-01");
        assert_eq!(month_label(last_ms, 14).unwrap(), "2028-02");
        assert_eq!(month_label(-1, 0).unwrap(), "1969-12");
        assert!(month_label(i64::MAX, 0).is_err());
    }
}
