//! `tollgate archive`: a month of usage rows out of the ledger into a file, without losing the
//! proof of any balance (docs/RETENTION.md, "Archive").
//!
//! For each month, oldest first:
//!
//! 1. **Export.** The month's rows, ordered by (account, position), go to
//!    `DIR/usage_log-YYYY-MM.csv` through a temporary name, fsynced, then renamed. While
//!    exporting, each account's rows are cut into *runs* of consecutive chain positions, and
//!    inside a run every row must start where the previous one ended (I4): a break stops the
//!    archive with nothing dropped.
//! 2. **Verify.** The file is read back by a CSV parser (not the writer's own counts): its row
//!    count, Σ cost and SHA-256 must equal the export's, and the ledger's `COUNT(*)` and
//!    `SUM(cost)` of the month, read again.
//! 3. **Drop**, in one ledger transaction that checks the month's count and Σ cost once more: the
//!    runs and per-account month totals are inserted, the month's stored responses deleted, the
//!    rows dropped (PostgreSQL: the partition detached and dropped; SQLite: the rows deleted and
//!    their charged ids kept in `archived_charges`, then the file compacted).
//!
//! The runs stand in the chain for their rows: `verify`, reconciliation, statements and
//! `rebuilt_balance` read them (`ledger_costs`, `LedgerEntry::Archived`). Charged ids stay, so a
//! retry of an archived request is refused, never charged again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use tollgate_core::Money;

use crate::error::{StoreError, StoreResult};
use crate::ledger::Ledger;
use crate::model::{ArchivedAccountMonth, ArchivedRun, RequestStatus, UsageRow};
use crate::operations::pg;
use crate::postgres::PgLedger;
use crate::retention::month_label;
use crate::sql_rows::{Fields, money, time_of, to_i64, to_u64, usage_from};
use crate::sqlite::SqliteLedger;

/// The columns of an archive file, as the usage_log table has them: money in integer nano-units,
/// times in Unix milliseconds (UTC).
pub const ARCHIVE_COLUMNS: [&str; 22] = [
    "id", "request_id", "account_id", "api_key_id", "provider", "model", "customer_type", "price_id", "input_tokens",
    "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "usage_source", "cost",
    "balance_before", "balance_after", "ledger_seq", "status", "latency_ms", "created_at", "request_fingerprint",
];

/// A usage row as the archive writes it.
#[derive(Clone, Debug)]
pub struct ArchiveRow {
    pub row: UsageRow,
    pub request_fingerprint: Option<String>,
}

/// What the drop step writes and checks, built by the export.
#[derive(Clone, Debug)]
pub struct MonthArchive {
    /// `YYYY-MM`.
    pub month: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub usage_rows: u64,
    pub cost: Money,
    pub runs: Vec<ArchivedRun>,
    pub account_months: Vec<ArchivedAccountMonth>,
    /// The ids of the month's rows, by account: what the drop deletes, exactly.
    pub row_ids: BTreeMap<String, Vec<i64>>,
    /// The file's name in the output directory.
    pub file: String,
    pub sha256: String,
    pub archived_at_ms: i64,
}

/// A month's archive file as the ledger records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveRecord {
    pub file: String,
    pub sha256: String,
    /// Whether all its rows were dropped; `false`: an archive run stopped while dropping them,
    /// and the next one finishes it from the file.
    pub complete: bool,
}

/// A month archived, as the command reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MonthArchived {
    pub month: String,
    pub file: PathBuf,
    pub usage_rows: u64,
    pub cost: Money,
    pub accounts: u64,
    pub runs: u64,
    pub sha256: String,
    /// How long each step took: the export, the read-back check, the drop (the one transaction:
    /// writers of the ledger wait for it on SQLite, for its detach on PostgreSQL).
    pub export_ms: u64,
    pub verify_ms: u64,
    pub drop_ms: u64,
}

/// What each ledger does for the archive; the steps around them are [`archive_before`]'s.
#[async_trait]
pub trait Archive {
    /// The usage rows dated in `[start_ms, end_ms)`: count and Σ cost.
    async fn month_totals(&self, start_ms: i64, end_ms: i64) -> StoreResult<(u64, Money)>;
    /// The oldest usage row's time, if there is a row.
    async fn oldest_usage_ms(&self) -> StoreResult<Option<i64>>;
    /// Hands every usage row dated in `[start_ms, end_ms)` to `visit`, ordered by account, then
    /// position, streaming (a month does not have to fit in memory).
    async fn visit_month_rows(&self, start_ms: i64, end_ms: i64, visit: &mut (dyn FnMut(ArchiveRow) -> StoreResult<()> + Send)) -> StoreResult<()>;
    /// The files earlier archive runs of `month` wrote, oldest first.
    async fn archive_records(&self, month: &str) -> StoreResult<Vec<ArchiveRecord>>;
    /// Drops the archive's rows, inserting its runs, account totals and record, and deletes
    /// their stored responses. PostgreSQL: one transaction that checks the month still holds
    /// exactly the archive's rows and drops its partition (`Conflict` otherwise: nothing
    /// dropped). SQLite: the record first (incomplete), then the rows by id in transactions of
    /// a few accounts each, each checking its accounts' rows are all there (`Conflict` if some
    /// but not all are; none: an earlier run dropped them), then the record complete. Rows of the
    /// month that are not in the archive (written late) stay.
    async fn drop_archived_month(&self, archive: &MonthArchive) -> StoreResult<()>;
    /// An account's archived months within `[from, to)` (`YYYY-MM`, either open), oldest first.
    async fn archived_account_months(&self, account_id: &str, from: Option<&str>, to: Option<&str>) -> StoreResult<Vec<ArchivedAccountMonth>>;
}

/// `YYYY-MM` → the month's first millisecond and the next month's (UTC).
///
/// # Errors
/// Not a month.
pub fn month_bounds_ms(month: &str) -> StoreResult<(i64, i64)> {
    let invalid = || StoreError::Invalid(format!("month must be YYYY-MM (e.g. 2026-11), not {month:?}"));
    let (year, number) = month.split_once('-').ok_or_else(invalid)?;
    if year.len() != 4 || number.len() != 2 {
        return Err(invalid());
    }
    let year: i32 = year.parse().map_err(|_| invalid())?;
    let month = time::Month::try_from(number.parse::<u8>().map_err(|_| invalid())?).map_err(|_| invalid())?;
    let (next_year, next_month) = if month == time::Month::December { (year + 1, time::Month::January) } else { (year, month.next()) };
    let first_ms = |year: i32, month: time::Month| -> StoreResult<i64> {
        Ok(crate::clock::ms_of(time::Date::from_calendar_date(year, month, 1).map_err(|_| invalid())?.midnight().assume_utc()))
    };
    Ok((first_ms(year, month)?, first_ms(next_year, next_month)?))
}

/// Archives every month with usage rows before `before` (`YYYY-MM`) into `dir`, oldest first.
/// Every one of those months must have ended at least `replay_window_ms` before `now_ms`: their
/// responses can no longer be replayed, so nothing the gateway still serves goes.
///
/// # Errors
/// A month too recent (nothing done), a file or ledger failure, or an export that does not match
/// the ledger (that month and the later ones are not dropped; earlier ones stay archived).
pub async fn archive_before(ledger: &dyn Ledger, before: &str, dir: &Path, now_ms: i64, replay_window_ms: i64) -> StoreResult<Vec<MonthArchived>> {
    let months = months_before(ledger, before, now_ms, replay_window_ms).await?;
    std::fs::create_dir_all(dir).map_err(|error| file_error("creating", dir, &error))?;
    let mut archived = Vec::new();
    for month in months {
        if let Some(done) = archive_month(ledger, &month, dir, now_ms).await? {
            archived.push(done);
        }
    }
    // SQLite gives the deleted rows' pages back to the file system in steps (PostgreSQL dropped
    // whole tables); stop when a step frees nothing more.
    let mut free = u64::MAX;
    loop {
        let left = ledger.compact_step(4_096).await?;
        if left == 0 || left >= free {
            break;
        }
        free = left;
    }
    Ok(archived)
}

/// A month [`archive_before`] would take, as `tollgate archive --dry-run` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MonthPlanned {
    pub month: String,
    pub usage_rows: u64,
    pub cost: Money,
}

/// What [`archive_before`] would archive, with the same checks, writing and dropping nothing.
///
/// # Errors
/// As [`archive_before`] before it writes anything.
pub async fn archive_plan(ledger: &dyn Ledger, before: &str, now_ms: i64, replay_window_ms: i64) -> StoreResult<Vec<MonthPlanned>> {
    let mut planned = Vec::new();
    for month in months_before(ledger, before, now_ms, replay_window_ms).await? {
        let (start_ms, end_ms) = month_bounds_ms(&month)?;
        let (usage_rows, cost) = ledger.month_totals(start_ms, end_ms).await?;
        if usage_rows > 0 {
            planned.push(MonthPlanned { month, usage_rows, cost });
        }
    }
    Ok(planned)
}

/// The months from the oldest usage row's to the one before `before`, once the replay window
/// has passed over all of them.
async fn months_before(ledger: &dyn Ledger, before: &str, now_ms: i64, replay_window_ms: i64) -> StoreResult<Vec<String>> {
    let (before_ms, _) = month_bounds_ms(before)?;
    if before_ms.saturating_add(replay_window_ms) > now_ms {
        return Err(StoreError::Invalid(format!(
            "the months before {before} end less than the replay window ({replay_window_ms} ms, limits.replay_window_ms) ago: a retry may still be answered from them; archive them later"
        )));
    }
    let Some(oldest_ms) = ledger.oldest_usage_ms().await? else { return Ok(Vec::new()) };
    let mut months = Vec::new();
    let mut month = month_label(oldest_ms, 0)?;
    loop {
        let (start_ms, end_ms) = month_bounds_ms(&month)?;
        if start_ms >= before_ms {
            return Ok(months);
        }
        months.push(month);
        month = month_label(end_ms, 0)?;
    }
}

/// One month: export, verify, drop. `None` when the month has no rows.
async fn archive_month(ledger: &dyn Ledger, month: &str, dir: &Path, now_ms: i64) -> StoreResult<Option<MonthArchived>> {
    let (start_ms, end_ms) = month_bounds_ms(month)?;
    let records = ledger.archive_records(month).await?;
    if let Some(open) = records.iter().find(|record| !record.complete) {
        return finish_stopped_archive(ledger, month, dir, now_ms, open).await.map(Some);
    }
    let (ledger_rows, ledger_cost) = ledger.month_totals(start_ms, end_ms).await?;
    if ledger_rows == 0 {
        return Ok(None);
    }
    // A month archived before and holding rows again (written late) goes to a second file. A
    // file of this name the ledger does not record is a run that stopped before its drop: the
    // rows are still in the ledger, so it is written again.
    let file = if records.is_empty() { format!("usage_log-{month}.csv") } else { format!("usage_log-{month}-{}.csv", records.len() + 1) };
    let path = dir.join(&file);
    // Named for this run alone: two archives started at once never write into one file.
    let partial = dir.join(format!(".{file}.{}.partial", uuid::Uuid::new_v4().simple()));
    let started = std::time::Instant::now();
    let mut export = Export::create(&partial, month)?;
    let visited = ledger.visit_month_rows(start_ms, end_ms, &mut |row| export.push(row)).await;
    let exported = match visited.and_then(|()| export.finish(month, start_ms, end_ms, &file, now_ms)) {
        Ok(exported) => exported,
        Err(error) => {
            // Nothing recorded it: the unfinished file goes (a full disk, a ledger gone away).
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, &path).map_err(|error| file_error("renaming", &partial, &error))?;
    sync_dir(dir)?;
    let export_ms = elapsed_ms(started);

    // The file parsed again, independently of the writer, must give the same rows, runs and
    // totals; and the ledger must still have the month the export read.
    let started = std::time::Instant::now();
    let read = read_archive(&path, month, start_ms, end_ms, now_ms)?;
    let (ledger_rows_now, ledger_cost_now) = ledger.month_totals(start_ms, end_ms).await?;
    if !read.same_rows_as(&exported) || (ledger_rows_now, ledger_cost_now) != (exported.usage_rows, exported.cost) {
        return Err(StoreError::Archive(format!(
            "{month}: the file read back has {} rows, Σ cost {}, sha256 {}; the export wrote {} rows, Σ cost {}, sha256 {}; the ledger has {ledger_rows_now} rows, Σ cost {ledger_cost_now} (before the export: {ledger_rows}, {ledger_cost}): nothing dropped",
            read.usage_rows, read.cost, read.sha256, exported.usage_rows, exported.cost, exported.sha256
        )));
    }
    write_manifest(dir, &exported)?;
    let verify_ms = elapsed_ms(started);
    let started = std::time::Instant::now();
    ledger.drop_archived_month(&exported).await?;
    let drop_ms = elapsed_ms(started);
    tracing::info!(month, file = %path.display(), rows = exported.usage_rows, cost = %exported.cost, runs = exported.runs.len(), export_ms, verify_ms, drop_ms, "month archived");
    Ok(Some(archived_report(&exported, path, (export_ms, verify_ms, drop_ms))))
}

/// An archive run stopped while dropping a month's rows (SQLite drops them in chunks): the
/// ledger recorded the file, verified then; it must be in `dir` unchanged, and what is left of
/// its rows is dropped from it.
async fn finish_stopped_archive(ledger: &dyn Ledger, month: &str, dir: &Path, now_ms: i64, open: &ArchiveRecord) -> StoreResult<MonthArchived> {
    let (start_ms, end_ms) = month_bounds_ms(month)?;
    let path = dir.join(&open.file);
    if !path.exists() {
        return Err(StoreError::Archive(format!(
            "the archive of {month} stopped while its rows were being dropped; give the directory holding its file {} as --out to finish it",
            open.file
        )));
    }
    let started = std::time::Instant::now();
    let mut archive = read_archive(&path, month, start_ms, end_ms, now_ms)?;
    if archive.sha256 != open.sha256 {
        return Err(StoreError::Archive(format!("{} changed since it was archived (sha256 {}, recorded {}): nothing dropped", path.display(), archive.sha256, open.sha256)));
    }
    archive.file.clone_from(&open.file);
    let verify_ms = elapsed_ms(started);
    let started = std::time::Instant::now();
    ledger.drop_archived_month(&archive).await?;
    let drop_ms = elapsed_ms(started);
    tracing::info!(month, file = %path.display(), rows = archive.usage_rows, drop_ms, "stopped archive finished");
    Ok(archived_report(&archive, path, (0, verify_ms, drop_ms)))
}

fn archived_report(archive: &MonthArchive, file: PathBuf, (export_ms, verify_ms, drop_ms): (u64, u64, u64)) -> MonthArchived {
    MonthArchived {
        month: archive.month.clone(),
        file,
        usage_rows: archive.usage_rows,
        cost: archive.cost,
        accounts: archive.account_months.len() as u64,
        runs: archive.runs.len() as u64,
        sha256: archive.sha256.clone(),
        export_ms,
        verify_ms,
        drop_ms,
    }
}

fn elapsed_ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn file_error(doing: &str, path: &Path, error: &std::io::Error) -> StoreError {
    StoreError::Archive(format!("{doing} {}: {error}", path.display()))
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    std::fs::File::open(dir).and_then(|handle| handle.sync_all()).map_err(|error| file_error("syncing", dir, &error))
}

/// Bytes on their way to the file, hashed as they go.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hash.update(&bytes[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What the runs and totals need of a row: from the ledger when exporting, from the file when
/// reading it back.
struct RowFacts {
    id: i64,
    account_id: String,
    ledger_seq: i64,
    cost: Money,
    balance_before: Money,
    balance_after: Money,
    created_at_ms: i64,
    charged: bool,
    /// Input, cached input, cache write, output.
    tokens: [u64; 4],
}

/// A month's rows, in (account, position) order, turned into what the drop writes.
#[derive(Default)]
struct MonthBuilder {
    runs: Vec<ArchivedRun>,
    accounts: BTreeMap<String, ArchivedAccountMonth>,
    row_ids: BTreeMap<String, Vec<i64>>,
    usage_rows: u64,
    cost: Money,
}

impl MonthBuilder {
    fn add(&mut self, row: RowFacts) -> StoreResult<()> {
        self.extend_run(&row)?;
        self.usage_rows += 1;
        self.cost = self.cost.checked_add(row.cost).ok_or(StoreError::Overflow("archived month cost"))?;
        let totals = self.accounts.entry(row.account_id.clone()).or_insert_with(|| ArchivedAccountMonth { account_id: row.account_id.clone(), ..ArchivedAccountMonth::default() });
        totals.usage_rows += 1;
        totals.requests += u64::from(row.charged);
        totals.input_tokens += row.tokens[0];
        totals.cached_input_tokens += row.tokens[1];
        totals.cache_write_tokens += row.tokens[2];
        totals.output_tokens += row.tokens[3];
        totals.cost = totals.cost.checked_add(row.cost).ok_or(StoreError::Overflow("archived account cost"))?;
        self.row_ids.entry(row.account_id).or_default().push(row.id);
        Ok(())
    }

    /// The row joins the account's current run if it takes the next position; inside a run each
    /// row must start at the balance the previous one ended at (I4).
    fn extend_run(&mut self, row: &RowFacts) -> StoreResult<()> {
        let created_at = time_of(row.created_at_ms)?;
        if let Some(run) = self.runs.last_mut()
            && run.account_id == row.account_id
        {
            if row.ledger_seq <= run.last_seq {
                return Err(StoreError::Corrupt(format!("{}: ledger_seq {} comes after {}: positions repeat or are out of order", row.account_id, row.ledger_seq, run.last_seq)));
            }
            if row.ledger_seq == run.last_seq + 1 {
                if row.balance_before != run.balance_after {
                    return Err(StoreError::Corrupt(format!(
                        "{}: the chain breaks at ledger_seq {} (balance_before {}, the previous row ended at {}): nothing archived",
                        row.account_id, row.ledger_seq, row.balance_before, run.balance_after
                    )));
                }
                run.last_seq = row.ledger_seq;
                run.usage_rows += 1;
                run.cost = run.cost.checked_add(row.cost).ok_or(StoreError::Overflow("archived run cost"))?;
                run.balance_after = row.balance_after;
                run.last_at = run.last_at.max(created_at);
                run.created_at = run.created_at.min(created_at);
                return Ok(());
            }
        }
        self.runs.push(ArchivedRun {
            account_id: row.account_id.clone(),
            first_seq: row.ledger_seq,
            last_seq: row.ledger_seq,
            usage_rows: 1,
            cost: row.cost,
            balance_before: row.balance_before,
            balance_after: row.balance_after,
            month: String::new(),
            created_at,
            last_at: created_at,
        });
        Ok(())
    }

    fn finish(self, month: &str, (start_ms, end_ms): (i64, i64), file: &str, sha256: String, now_ms: i64) -> MonthArchive {
        MonthArchive {
            month: month.to_string(),
            start_ms,
            end_ms,
            usage_rows: self.usage_rows,
            cost: self.cost,
            runs: self.runs.into_iter().map(|run| ArchivedRun { month: month.to_string(), ..run }).collect(),
            account_months: self.accounts.into_values().map(|totals| ArchivedAccountMonth { month: month.to_string(), ..totals }).collect(),
            row_ids: self.row_ids,
            file: file.to_string(),
            sha256,
            archived_at_ms: now_ms,
        }
    }
}

impl MonthArchive {
    /// The same rows, runs and totals, and the same bytes.
    fn same_rows_as(&self, other: &MonthArchive) -> bool {
        (self.usage_rows, self.cost, &self.runs, &self.account_months, &self.row_ids, &self.sha256)
            == (other.usage_rows, other.cost, &other.runs, &other.account_months, &other.row_ids, &other.sha256)
    }
}

/// The export of one month: the CSV writer, and the runs and totals built from the rows.
struct Export {
    path: PathBuf,
    writer: csv::Writer<Hashing<std::io::BufWriter<std::fs::File>>>,
    month: MonthBuilder,
}

impl Export {
    fn create(path: &Path, month: &str) -> StoreResult<Export> {
        let file = std::fs::File::create(path).map_err(|error| file_error("creating", path, &error))?;
        let mut writer = csv::Writer::from_writer(Hashing { inner: std::io::BufWriter::with_capacity(1 << 20, file), hash: Sha256::new() });
        writer.write_record(ARCHIVE_COLUMNS).map_err(|error| StoreError::Archive(format!("{month}: {error}")))?;
        Ok(Export { path: path.to_path_buf(), writer, month: MonthBuilder::default() })
    }

    fn push(&mut self, archived: ArchiveRow) -> StoreResult<()> {
        let row = &archived.row;
        let created_at_ms = crate::clock::ms_of(row.created_at);
        let fields = [
            row.id.to_string(),
            row.request_id.clone(),
            row.account_id.clone(),
            row.api_key_id.clone(),
            row.provider.clone(),
            row.model.clone(),
            row.customer_type.clone(),
            row.price_id.map(|id| id.to_string()).unwrap_or_default(),
            row.usage.input_tokens.to_string(),
            row.usage.cached_input_tokens.to_string(),
            row.usage.cache_write_tokens.to_string(),
            row.usage.output_tokens.to_string(),
            row.usage.reasoning_tokens.to_string(),
            row.usage_source.as_str().to_string(),
            row.cost.nanos().to_string(),
            row.balance_before.nanos().to_string(),
            row.balance_after.nanos().to_string(),
            row.ledger_seq.to_string(),
            row.status.as_str().to_string(),
            row.latency_ms.to_string(),
            created_at_ms.to_string(),
            archived.request_fingerprint.clone().unwrap_or_default(),
        ];
        self.writer.write_record(&fields).map_err(|error| StoreError::Archive(format!("writing {}: {error}", self.path.display())))?;
        self.month.add(RowFacts {
            id: row.id,
            account_id: row.account_id.clone(),
            ledger_seq: row.ledger_seq,
            cost: row.cost,
            balance_before: row.balance_before,
            balance_after: row.balance_after,
            created_at_ms,
            charged: row.status != RequestStatus::Failed,
            tokens: [row.usage.input_tokens, row.usage.cached_input_tokens, row.usage.cache_write_tokens, row.usage.output_tokens],
        })
    }

    /// Flushes and fsyncs the file; what the drop step needs.
    fn finish(self, month: &str, start_ms: i64, end_ms: i64, file: &str, now_ms: i64) -> StoreResult<MonthArchive> {
        let path = self.path;
        let hashing = self.writer.into_inner().map_err(|error| StoreError::Archive(format!("flushing {}: {error}", path.display())))?;
        let sha256 = hex::encode(hashing.hash.finalize());
        let handle = hashing.inner.into_inner().map_err(|error| StoreError::Archive(format!("flushing {}: {error}", path.display())))?;
        handle.sync_all().map_err(|error| file_error("syncing", &path, &error))?;
        Ok(self.month.finish(month, (start_ms, end_ms), file, sha256, now_ms))
    }
}

/// What a CSV parser finds in an archive file.
#[derive(Debug, PartialEq, Eq)]
pub struct FileTotals {
    pub rows: u64,
    pub cost: Money,
    pub sha256: String,
}

/// Reads an archive file back: its header must be [`ARCHIVE_COLUMNS`], every record complete,
/// every number an integer.
///
/// # Errors
/// The file cannot be read or is not such a file.
pub fn read_back(path: &Path) -> StoreResult<FileTotals> {
    let archive = read_archive(path, "", 0, 0, 0)?;
    Ok(FileTotals { rows: archive.usage_rows, cost: archive.cost, sha256: archive.sha256 })
}

/// An archive file parsed into what its drop writes (runs, account totals, row ids), by a CSV
/// reader, independently of the writer.
fn read_archive(path: &Path, month: &str, start_ms: i64, end_ms: i64, now_ms: i64) -> StoreResult<MonthArchive> {
    let bytes = std::fs::read(path).map_err(|error| file_error("reading", path, &error))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let bad = |what: String| StoreError::Archive(format!("{}: {what}", path.display()));
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes.as_slice());
    let header = reader.headers().map_err(|error| bad(error.to_string()))?.clone();
    if header.iter().ne(ARCHIVE_COLUMNS) {
        return Err(bad(format!("unexpected header {header:?}")));
    }
    let column = |name: &str| ARCHIVE_COLUMNS.iter().position(|column| *column == name).unwrap_or_default();
    let mut month_rows = MonthBuilder::default();
    for (index, record) in reader.records().enumerate() {
        let record = record.map_err(|error| bad(error.to_string()))?;
        let text = |name: &str| record.get(column(name)).unwrap_or_default();
        let int = |name: &str| -> StoreResult<i64> {
            let field = text(name);
            field.parse().map_err(|_| bad(format!("record {}: {name} {field:?} is not an integer", index + 1)))
        };
        let count = |name: &str| -> StoreResult<u64> { u64::try_from(int(name)?).map_err(|_| bad(format!("record {}: negative {name}", index + 1))) };
        month_rows.add(RowFacts {
            id: int("id")?,
            account_id: text("account_id").to_string(),
            ledger_seq: int("ledger_seq")?,
            cost: Money::from_nanos(int("cost")?),
            balance_before: Money::from_nanos(int("balance_before")?),
            balance_after: Money::from_nanos(int("balance_after")?),
            created_at_ms: int("created_at")?,
            charged: text("status") != RequestStatus::Failed.as_str(),
            tokens: [count("input_tokens")?, count("cached_input_tokens")?, count("cache_write_tokens")?, count("output_tokens")?],
        })?;
    }
    let file = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(month_rows.finish(month, (start_ms, end_ms), &file, sha256, now_ms))
}

/// `usage_log-YYYY-MM.csv.manifest.json` beside the file, written as the file was.
fn write_manifest(dir: &Path, archive: &MonthArchive) -> StoreResult<()> {
    let manifest = serde_json::json!({
        "month": archive.month,
        "file": archive.file,
        "usage_rows": archive.usage_rows,
        "cost_nanos": archive.cost.nanos(),
        "cost": archive.cost,
        "sha256": archive.sha256,
        "accounts": archive.account_months.len(),
        "runs": archive.runs.len(),
        "columns": ARCHIVE_COLUMNS,
        "units": "money in integer nano-units (1e-9 of the currency unit); created_at in Unix milliseconds, UTC",
        "archived_at_ms": archive.archived_at_ms,
    });
    let path = dir.join(format!("{}.manifest.json", archive.file));
    let partial = dir.join(format!(".{}.manifest.json.partial", archive.file));
    let text = serde_json::to_vec_pretty(&manifest).map_err(|error| StoreError::Archive(error.to_string()))?;
    let mut handle = std::fs::File::create(&partial).map_err(|error| file_error("creating", &partial, &error))?;
    handle.write_all(&text).and_then(|()| handle.sync_all()).map_err(|error| file_error("writing", &partial, &error))?;
    std::fs::rename(&partial, &path).map_err(|error| file_error("renaming", &partial, &error))?;
    sync_dir(dir)
}

fn archive_row_from(row: &impl Fields) -> StoreResult<ArchiveRow> {
    Ok(ArchiveRow { row: usage_from(row)?, request_fingerprint: row.optional_text("request_fingerprint")? })
}

fn account_month_from(row: &impl Fields) -> StoreResult<ArchivedAccountMonth> {
    let count = |column: &str| to_u64(row.int(column)?, "archived count");
    let files: Option<String> = row.optional_text("files")?;
    Ok(ArchivedAccountMonth {
        account_id: row.text("account_id")?,
        month: row.text("month")?,
        usage_rows: count("usage_rows")?,
        requests: count("requests")?,
        input_tokens: count("input_tokens")?,
        cached_input_tokens: count("cached_input_tokens")?,
        cache_write_tokens: count("cache_write_tokens")?,
        output_tokens: count("output_tokens")?,
        cost: money(row, "cost")?,
        files: files.map(|files| files.split(',').map(str::to_string).collect()).unwrap_or_default(),
    })
}

/// The runs, account totals and the month's record as JSON arrays of arrays, for one statement
/// each (PostgreSQL's `jsonb_array_elements`, SQLite's `json_each`).
fn runs_json<'a>(runs_of: impl Iterator<Item = &'a ArchivedRun>) -> StoreResult<String> {
    let mut runs = Vec::new();
    for run in runs_of {
        runs.push(serde_json::json!([
            run.account_id,
            run.first_seq,
            run.last_seq,
            to_i64(run.usage_rows, "usage_rows")?,
            run.cost.nanos(),
            run.balance_before.nanos(),
            run.balance_after.nanos(),
            crate::clock::ms_of(run.created_at),
            crate::clock::ms_of(run.last_at),
        ]));
    }
    Ok(serde_json::Value::Array(runs).to_string())
}

fn account_months_json<'a>(months_of: impl Iterator<Item = &'a ArchivedAccountMonth>) -> StoreResult<String> {
    let mut months = Vec::new();
    for totals in months_of {
        months.push(serde_json::json!([
            totals.account_id,
            to_i64(totals.usage_rows, "usage_rows")?,
            to_i64(totals.requests, "requests")?,
            to_i64(totals.input_tokens, "tokens")?,
            to_i64(totals.cached_input_tokens, "tokens")?,
            to_i64(totals.cache_write_tokens, "tokens")?,
            to_i64(totals.output_tokens, "tokens")?,
            totals.cost.nanos(),
        ]));
    }
    Ok(serde_json::Value::Array(months).to_string())
}

const MONTH_TOTALS: &str = "SELECT COUNT(*) AS usage_rows, CAST(COALESCE(SUM(cost), 0) AS BIGINT) AS cost FROM usage_log WHERE created_at >= ? AND created_at < ?";
const OLDEST_USAGE: &str = "SELECT MIN(created_at) FROM usage_log";
const MONTH_ROWS: &str = "SELECT * FROM usage_log WHERE created_at >= ? AND created_at < ? ORDER BY account_id, ledger_seq";
const ARCHIVE_RECORDS: &str = "SELECT file, sha256, complete FROM archived_months WHERE month = ? ORDER BY archived_at, length(file), file";
const INSERT_MONTH: &str = "INSERT INTO archived_months (month, archived_at, usage_rows, cost, accounts, runs, file, sha256, complete)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (month, file) DO NOTHING";
/// An account's archived months, with the files each went to.
const ACCOUNT_MONTHS: &str = "SELECT a.*, (SELECT string_agg(m.file, ',' ORDER BY m.archived_at, length(m.file), m.file) FROM archived_months m WHERE m.month = a.month) AS files
    FROM archived_account_months a WHERE a.account_id = ? AND a.month >= ? AND a.month < ? ORDER BY a.month";
const ADD_ACCOUNT_MONTH: &str = "ON CONFLICT (account_id, month) DO UPDATE SET
    usage_rows = archived_account_months.usage_rows + excluded.usage_rows, requests = archived_account_months.requests + excluded.requests,
    input_tokens = archived_account_months.input_tokens + excluded.input_tokens,
    cached_input_tokens = archived_account_months.cached_input_tokens + excluded.cached_input_tokens,
    cache_write_tokens = archived_account_months.cache_write_tokens + excluded.cache_write_tokens,
    output_tokens = archived_account_months.output_tokens + excluded.output_tokens, cost = archived_account_months.cost + excluded.cost";

/// [`INSERT_MONTH`] with the archive's values bound, for either database.
fn insert_month<'q, DB: sqlx::Database>(query: sqlx::query::Query<'q, DB, DB::Arguments>, archive: &'q MonthArchive, complete: bool) -> StoreResult<sqlx::query::Query<'q, DB, DB::Arguments>>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    Ok(query
        .bind(&archive.month)
        .bind(archive.archived_at_ms)
        .bind(to_i64(archive.usage_rows, "usage_rows")?)
        .bind(archive.cost.nanos())
        .bind(archive.account_months.len() as i64)
        .bind(archive.runs.len() as i64)
        .bind(&archive.file)
        .bind(&archive.sha256)
        .bind(i64::from(complete)))
}

fn record_from(row: &impl Fields) -> StoreResult<ArchiveRecord> {
    Ok(ArchiveRecord { file: row.text("file")?, sha256: row.text("sha256")?, complete: row.int("complete")? == 1 })
}

fn totals_of(row: &impl Fields) -> StoreResult<(u64, Money)> {
    Ok((to_u64(row.int("usage_rows")?, "usage_rows")?, money(row, "cost")?))
}

fn changed_since_export(month: &str, expected: (u64, Money), found: (u64, Money)) -> StoreResult<()> {
    if found == expected {
        return Ok(());
    }
    Err(StoreError::Conflict(format!(
        "{month}: the ledger now has {} of the archive's rows, Σ cost {}, the export {} rows, Σ cost {}: rows changed since; nothing more dropped, run the archive again",
        found.0, found.1, expected.0, expected.1
    )))
}

/// `[from, to)` months, open ends as the widest labels.
fn month_range<'a>(from: Option<&'a str>, to: Option<&'a str>) -> (&'a str, &'a str) {
    (from.unwrap_or("0000-00"), to.unwrap_or("9999-99"))
}

#[async_trait]
impl Archive for PgLedger {
    async fn month_totals(&self, start_ms: i64, end_ms: i64) -> StoreResult<(u64, Money)> {
        totals_of(&sqlx::query(pg(MONTH_TOTALS)).bind(start_ms).bind(end_ms).fetch_one(self.pool()).await?)
    }

    async fn oldest_usage_ms(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(OLDEST_USAGE).fetch_one(self.pool()).await?)
    }

    async fn visit_month_rows(&self, start_ms: i64, end_ms: i64, visit: &mut (dyn FnMut(ArchiveRow) -> StoreResult<()> + Send)) -> StoreResult<()> {
        let mut rows = sqlx::query(pg(MONTH_ROWS)).bind(start_ms).bind(end_ms).fetch(self.pool());
        while let Some(row) = rows.try_next().await? {
            visit(archive_row_from(&row)?)?;
        }
        Ok(())
    }

    async fn archive_records(&self, month: &str) -> StoreResult<Vec<ArchiveRecord>> {
        sqlx::query(pg(ARCHIVE_RECORDS)).bind(month).fetch_all(self.pool()).await?.iter().map(record_from).collect()
    }

    async fn drop_archived_month(&self, archive: &MonthArchive) -> StoreResult<()> {
        // The month's rows in a partition of their own (moved out of the default if they were
        // there), so that dropping it drops them and nothing else: in a transaction of its own, as
        // the partitions job makes one.
        let partition = format!("usage_log_{}", archive.month.replace('-', "_"));
        let mut transaction = self.pool().begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
        sqlx::query("SELECT tollgate_usage_partition(($1 || '-01')::DATE)").bind(&archive.month).execute(&mut *transaction).await?;
        transaction.commit().await?;

        // The archive's records first, taking no lock on usage_log; then usage_log itself, whole,
        // for the end: the check that the month is what was exported, and the drop. Taken any
        // earlier (or a partition first, then usage_log), a reader or writer holding usage_log
        // while it waits for a partition would deadlock with this transaction.
        let mut transaction = self.pool().begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
        sqlx::query(
            "INSERT INTO archived_runs (account_id, first_seq, last_seq, usage_rows, cost, balance_before, balance_after, month, created_at, last_at)
             SELECT r->>0, (r->>1)::BIGINT, (r->>2)::BIGINT, (r->>3)::BIGINT, (r->>4)::BIGINT, (r->>5)::BIGINT, (r->>6)::BIGINT, $2, (r->>7)::BIGINT, (r->>8)::BIGINT
             FROM jsonb_array_elements($1::JSONB) r",
        )
        .bind(runs_json(archive.runs.iter())?)
        .bind(&archive.month)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO archived_account_months (account_id, month, usage_rows, requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, cost)
             SELECT a->>0, $2, (a->>1)::BIGINT, (a->>2)::BIGINT, (a->>3)::BIGINT, (a->>4)::BIGINT, (a->>5)::BIGINT, (a->>6)::BIGINT, (a->>7)::BIGINT
             FROM jsonb_array_elements($1::JSONB) a {ADD_ACCOUNT_MONTH}"
        )))
        .bind(account_months_json(archive.account_months.iter())?)
        .bind(&archive.month)
        .execute(&mut *transaction)
        .await?;
        insert_month(sqlx::query(pg(INSERT_MONTH)), archive, true)?.execute(&mut *transaction).await?;
        // From here to the commit every reader and writer of usage_log waits: a count of the
        // month, the delete of its (usually pruned) bodies and upstream attempts, the detach. The drop column of
        // docs/BENCHMARKS.md's archive table bounds it.
        sqlx::query("LOCK TABLE usage_log IN ACCESS EXCLUSIVE MODE").execute(&mut *transaction).await?;
        let found = totals_of(
            &sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) AS usage_rows, CAST(COALESCE(SUM(cost), 0) AS BIGINT) AS cost FROM {partition}")))
                .fetch_one(&mut *transaction)
                .await?,
        )?;
        changed_since_export(&archive.month, (archive.usage_rows, archive.cost), found)?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM stored_responses WHERE usage_id IN (SELECT id FROM {partition})"))).execute(&mut *transaction).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM upstream_attempts WHERE usage_id IN (SELECT id FROM {partition})"))).execute(&mut *transaction).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE usage_log DETACH PARTITION {partition}"))).execute(&mut *transaction).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {partition}"))).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn archived_account_months(&self, account_id: &str, from: Option<&str>, to: Option<&str>) -> StoreResult<Vec<ArchivedAccountMonth>> {
        let (from, to) = month_range(from, to);
        sqlx::query(pg(ACCOUNT_MONTHS)).bind(account_id).bind(from).bind(to).fetch_all(self.pool()).await?.iter().map(account_month_from).collect()
    }
}

#[async_trait]
impl Archive for SqliteLedger {
    async fn month_totals(&self, start_ms: i64, end_ms: i64) -> StoreResult<(u64, Money)> {
        totals_of(&sqlx::query(MONTH_TOTALS).bind(start_ms).bind(end_ms).fetch_one(self.pool()).await?)
    }

    async fn oldest_usage_ms(&self) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(OLDEST_USAGE).fetch_one(self.pool()).await?)
    }

    async fn visit_month_rows(&self, start_ms: i64, end_ms: i64, visit: &mut (dyn FnMut(ArchiveRow) -> StoreResult<()> + Send)) -> StoreResult<()> {
        let mut rows = sqlx::query(MONTH_ROWS).bind(start_ms).bind(end_ms).fetch(self.pool());
        while let Some(row) = rows.try_next().await? {
            visit(archive_row_from(&row)?)?;
        }
        Ok(())
    }

    async fn archive_records(&self, month: &str) -> StoreResult<Vec<ArchiveRecord>> {
        sqlx::query(ARCHIVE_RECORDS).bind(month).fetch_all(self.pool()).await?.iter().map(record_from).collect()
    }

    async fn drop_archived_month(&self, archive: &MonthArchive) -> StoreResult<()> {
        let ids: usize = archive.row_ids.values().map(Vec::len).sum();
        let by_account: u64 = archive.account_months.iter().map(|totals| totals.usage_rows).sum();
        if ids as u64 != archive.usage_rows || by_account != archive.usage_rows {
            return Err(StoreError::Conflict(format!(
                "{}: the archive's rows do not add up ({} rows, {ids} ids, {by_account} by account): nothing dropped",
                archive.month, archive.usage_rows
            )));
        }
        // The record first, incomplete: a run that stops midway is finished from the file.
        let mut transaction = self.write().await?;
        insert_month(sqlx::query(INSERT_MONTH), archive, false)?.execute(&mut *transaction).await?;
        transaction.commit().await?;
        // Then the rows, a few accounts per write transaction: each holds the write lock (and
        // embedded mode's settles) only for its chunk, and leaves each account's chain whole.
        let mut chunk: Vec<&str> = Vec::new();
        let mut chunk_rows = 0_u64;
        for (account_id, ids) in &archive.row_ids {
            chunk.push(account_id);
            chunk_rows += ids.len() as u64;
            if chunk_rows >= self.archive_chunk_rows {
                self.drop_archived_accounts(archive, &chunk).await?;
                chunk.clear();
                chunk_rows = 0;
                tokio::time::sleep(std::time::Duration::from_millis(ARCHIVE_CHUNK_PAUSE_MS)).await;
            }
        }
        if !chunk.is_empty() {
            self.drop_archived_accounts(archive, &chunk).await?;
        }
        let mut transaction = self.write().await?;
        sqlx::query("UPDATE archived_months SET complete = 1 WHERE month = ? AND file = ?").bind(&archive.month).bind(&archive.file).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(())
    }

    async fn archived_account_months(&self, account_id: &str, from: Option<&str>, to: Option<&str>) -> StoreResult<Vec<ArchivedAccountMonth>> {
        let (from, to) = month_range(from, to);
        sqlx::query(ACCOUNT_MONTHS).bind(account_id).bind(from).bind(to).fetch_all(self.pool()).await?.iter().map(account_month_from).collect()
    }
}

/// Between two chunks of a SQLite archive's drop, for the writers waiting.
const ARCHIVE_CHUNK_PAUSE_MS: u64 = 10;

impl SqliteLedger {
    /// One chunk of [`Archive::drop_archived_month`]: these accounts' archived rows, all of them
    /// or none (an earlier run of the archive dropped them), with their runs and totals.
    async fn drop_archived_accounts(&self, archive: &MonthArchive, accounts: &[&str]) -> StoreResult<()> {
        let ids: Vec<i64> = accounts.iter().flat_map(|account| archive.row_ids.get(*account).into_iter().flatten().copied()).collect();
        let ids = serde_json::Value::from(ids).to_string();
        let accounts: std::collections::BTreeSet<&str> = accounts.iter().copied().collect();
        let in_chunk = |account: &str| accounts.contains(account);
        let expected = archive.account_months.iter().filter(|totals| in_chunk(&totals.account_id)).try_fold((0_u64, Money::ZERO), |(rows, cost), totals| {
            cost.checked_add(totals.cost).map(|cost| (rows + totals.usage_rows, cost)).ok_or(StoreError::Overflow("archived chunk cost"))
        })?;
        let mut transaction = self.write().await?;
        let found = totals_of(
            &sqlx::query("SELECT COUNT(*) AS usage_rows, CAST(COALESCE(SUM(cost), 0) AS BIGINT) AS cost FROM usage_log WHERE id IN (SELECT value FROM json_each(?))")
                .bind(&ids)
                .fetch_one(&mut *transaction)
                .await?,
        )?;
        if found.0 == 0 {
            return Ok(());
        }
        changed_since_export(&archive.month, expected, found)?;
        sqlx::query(
            "INSERT INTO archived_runs (account_id, first_seq, last_seq, usage_rows, cost, balance_before, balance_after, month, created_at, last_at)
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, ?, value ->> 7, value ->> 8 FROM json_each(?)",
        )
        .bind(&archive.month)
        .bind(runs_json(archive.runs.iter().filter(|run| in_chunk(&run.account_id)))?)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO archived_account_months (account_id, month, usage_rows, requests, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, cost)
             SELECT value ->> 0, ?, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7 FROM json_each(?) WHERE true {ADD_ACCOUNT_MONTH}"
        )))
        .bind(&archive.month)
        .bind(account_months_json(archive.account_months.iter().filter(|totals| in_chunk(&totals.account_id)))?)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT OR IGNORE INTO archived_charges (account_id, request_id)
             SELECT account_id, request_id FROM usage_log WHERE id IN (SELECT value FROM json_each(?)) AND status <> 'failed'",
        )
        .bind(&ids)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("DELETE FROM stored_responses WHERE usage_id IN (SELECT value FROM json_each(?))").bind(&ids).execute(&mut *transaction).await?;
        sqlx::query("DELETE FROM upstream_attempts WHERE usage_id IN (SELECT value FROM json_each(?))").bind(&ids).execute(&mut *transaction).await?;
        sqlx::query("DELETE FROM usage_log WHERE id IN (SELECT value FROM json_each(?))").bind(&ids).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::month_bounds_ms;

    #[test]
    fn a_month_runs_from_its_first_millisecond_to_the_next_months() {
        assert_eq!(month_bounds_ms("2026-12").unwrap(), (1_796_083_200_000, 1_798_761_600_000));
        assert_eq!(month_bounds_ms("2027-01").unwrap().0, 1_798_761_600_000);
        for bad in ["2026-13", "2026-00", "26-11", "2026-1", "2026/11", "", "2026-11-01"] {
            assert!(month_bounds_ms(bad).is_err(), "{bad}");
        }
    }
}
