//! `tollgate archive` (issue 22 item 3/4) against an independent model, on both ledgers: random
//! sequences of deposits and usage rows dated in three months, written in random month order (so
//! each account's chain interleaves months and fund rows), then the two older months archived.
//! The model, not the ledger, says what every file, balance, statement and month total must be;
//! `verify` must stay sound, every archived id stay charged, and a second archive of a month that
//! received a late row must go to a second file. PostgreSQL needs the test server
//! (`TOLLGATE_TEST_POSTGRES_URL`, started by `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tollgate_core::Money;
use tollgate_store::Ledger;
use tollgate_store::archive::{ARCHIVE_COLUMNS, MonthArchive, archive_before, month_bounds_ms, read_back};
use tollgate_store::model::{FundKind, LedgerEntry, NewFund, RecordOutcome, RequestStatus, StoredResponse, UsageEvent};
use tollgate_store::postgres::PgLedger;
use tollgate_store::sqlite::SqliteLedger;
use tollgate_store::verify::check_account;
use tollgate_store::StoreError;

mod support;
use support::{event, fresh_postgres_url, funded_account};

const MONTHS: [&str; 3] = ["2026-01", "2026-02", "2026-03"];
/// 2026-12-04, a day past the replay window of every month above.
const NOW_MS: i64 = 1_796_342_400_000;
const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;
const ACCOUNTS: [&str; 3] = ["a", "b", "c"];

async fn sqlite() -> Arc<dyn Ledger> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-archive-{}.db", uuid::Uuid::new_v4().simple()));
    Arc::new(SqliteLedger::connect(&format!("sqlite://{}", path.display()), 4).await.unwrap())
}

async fn postgres() -> Arc<dyn Ledger> {
    Arc::new(PgLedger::connect(&fresh_postgres_url("archive").await, 8).await.unwrap())
}

fn out_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-archive-out-{}", uuid::Uuid::new_v4().simple()))
}

/// splitmix64: the sequences are reproducible from the seed printed on failure.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// One chain position as the model sees it.
#[derive(Clone, Debug)]
struct Entry {
    /// Signed: deposits add, usage subtracts.
    amount: i64,
    /// `Some(month index)` for a usage row.
    month: Option<usize>,
    request: Option<String>,
    failed: bool,
    balance_after: i64,
    /// The archive pass (1, 2, …) that took the row out of the ledger.
    archived: Option<u32>,
}

#[derive(Default)]
struct Model {
    chains: BTreeMap<String, Vec<Entry>>,
}

impl Model {
    fn balance(&self, account: &str) -> i64 {
        self.chains.get(account).and_then(|chain| chain.last()).map_or(0, |entry| entry.balance_after)
    }

    fn push(&mut self, account: &str, amount: i64, month: Option<usize>, request: Option<String>, failed: bool) {
        let balance_after = self.balance(account) + amount;
        let chain = self.chains.entry(account.to_string()).or_default();
        chain.push(Entry { amount, month, request, failed, balance_after, archived: None });
    }

    /// What an archive pass takes: every live usage row of the months.
    fn archive(&mut self, months: &[usize], pass: u32) {
        for entry in self.chains.values_mut().flatten() {
            if entry.archived.is_none() && entry.month.is_some_and(|month| months.contains(&month)) {
                entry.archived = Some(pass);
            }
        }
    }

    /// (rows, Σ cost, charged requests) of the archived rows of a month, per account.
    fn archived_in(&self, account: &str, month: usize) -> (u64, i64, u64) {
        let rows = self.chains.get(account).into_iter().flatten().filter(|entry| entry.archived.is_some() && entry.month == Some(month));
        rows.fold((0, 0, 0), |(count, cost, requests), entry| (count + 1, cost - entry.amount, requests + u64::from(!entry.failed)))
    }

    /// (rows, Σ cost) of usage rows in the months given, per account.
    fn usage_in(&self, account: &str, months: &[usize]) -> (u64, i64) {
        let rows = self.chains.get(account).into_iter().flatten().filter(|entry| entry.month.is_some_and(|month| months.contains(&month)));
        rows.fold((0, 0), |(count, cost), entry| (count + 1, cost - entry.amount))
    }
}

fn dated_event(account: &str, request: &str, cost: i64, failed: bool, at_ms: i64, body: bool) -> UsageEvent {
    let status = if failed { RequestStatus::Failed } else { RequestStatus::Success };
    let stored_response = (body && !failed).then(|| StoredResponse { status: 200, content_type: "application/json".into(), body: format!("{{\"id\":\"{request}\"}}").into_bytes() });
    // One upstream attempt per request, which goes with its usage row when the month is archived.
    let attempt = tollgate_store::model::UpstreamAttempt {
        channel: "primary".into(),
        provider: "p".into(),
        upstream_model: "m".into(),
        status_code: Some(if failed { 503 } else { 200 }),
        served: !failed,
        error: failed.then(|| "status".into()),
        latency_ms: 3,
        first_byte_ms: Some(1),
        upstream_usage: None,
    };
    UsageEvent { created_at_ms: at_ms, stored_response, attempts: vec![attempt], ..event(account, request, if failed { 0 } else { cost }, status) }
}

/// Writes `steps` random deposits and usage batches through the ledger and the model alike.
async fn random_history(ledger: &dyn Ledger, model: &mut Model, random: &mut Random, steps: usize, months: &[usize], tag: &str) {
    for step in 0..steps {
        let account = ACCOUNTS[random.below(ACCOUNTS.len() as u64) as usize];
        if random.below(6) == 0 {
            let amount = 1_000 + random.below(5_000) as i64;
            let fund = NewFund { account_id: account.into(), kind: FundKind::Adjustment, amount: Money::from_nanos(amount), reference_id: format!("{tag}-fund-{step}"), reason: None, operator_id: None };
            assert!(ledger.record_fund(fund).await.unwrap().newly_applied);
            model.push(account, amount, None, None, false);
            continue;
        }
        let mut batch = Vec::new();
        for index in 0..=random.below(4) {
            let account = ACCOUNTS[random.below(ACCOUNTS.len() as u64) as usize];
            let month = months[random.below(months.len() as u64) as usize];
            let (start_ms, end_ms) = month_bounds_ms(MONTHS[month]).unwrap();
            let at_ms = start_ms + (random.next() % (end_ms - start_ms) as u64) as i64;
            let failed = random.below(8) == 0;
            let cost = if failed { 0 } else { random.below(700) as i64 };
            let request = format!("{tag}-r{step}-{index}");
            batch.push(dated_event(account, &request, cost, failed, at_ms, random.below(2) == 0));
            model.push(account, -cost, Some(month), Some(request), failed);
        }
        let outcomes = ledger.record_usage_batch(&batch).await.unwrap();
        assert!(outcomes.iter().all(|outcome| *outcome == RecordOutcome::Inserted), "{outcomes:?}");
    }
}

/// Everything the model says about the ledger holds: balances rebuilt from rows and runs, a
/// whole chain, live rows exactly those not archived, runs that never cover a fund row or
/// another month's row, month totals and the account months the statements show.
async fn assert_matches_model(ledger: &dyn Ledger, model: &Model) {
    for account in ACCOUNTS {
        let chain = &model.chains[account];
        let check = check_account(ledger, account).await.unwrap();
        assert!(check.is_sound(), "verify after the archive: {check:?}");
        assert_eq!(check.ledger_balance.nanos(), model.balance(account), "{account}: account_balance");
        assert_eq!(ledger.rebuilt_balance(account).await.unwrap().nanos(), model.balance(account), "{account}: Σ funds − Σ costs (runs included)");
        assert_eq!(check.usage_rows, chain.iter().filter(|entry| entry.month.is_some()).count() as u64, "{account}: usage rows, archived ones included");
        let entries = ledger.statement(account, None, None).await.unwrap();
        let mut covered = Vec::new();
        for entry in &entries {
            match entry {
                LedgerEntry::Fund(fund) => {
                    let expected = &chain[(fund.ledger_seq - 1) as usize];
                    assert!(expected.month.is_none() && expected.amount == fund.amount.nanos(), "{account}: fund row at {}", fund.ledger_seq);
                }
                LedgerEntry::Usage(row) => {
                    let expected = &chain[(row.ledger_seq - 1) as usize];
                    assert!(expected.month.is_some(), "{account}: a usage row where the model has a fund row");
                    assert!(expected.archived.is_none(), "{account}: archived row {} is still live", row.request_id);
                    assert_eq!((Some(&row.request_id), -row.cost.nanos()), (expected.request.as_ref(), expected.amount));
                }
                LedgerEntry::Archived(run) => {
                    let positions = &chain[(run.first_seq - 1) as usize..run.last_seq as usize];
                    let pass = positions[0].archived;
                    assert!(
                        pass.is_some() && positions.iter().all(|entry| entry.archived == pass && entry.month.is_some_and(|month| MONTHS[month] == run.month)),
                        "{account}: run {}..={} of {} covers {positions:?}",
                        run.first_seq,
                        run.last_seq,
                        run.month
                    );
                    assert_eq!(run.cost.nanos(), positions.iter().map(|entry| -entry.amount).sum::<i64>());
                    assert_eq!(run.usage_rows, positions.len() as u64);
                    // A run is maximal: the positions either side are not rows of its month archived with it.
                    for side in [run.first_seq - 2, run.last_seq] {
                        if let Some(neighbour) = usize::try_from(side).ok().and_then(|index| chain.get(index)) {
                            assert!(neighbour.archived != pass || neighbour.month != positions[0].month, "{account}: run {}..={} could be longer", run.first_seq, run.last_seq);
                        }
                    }
                }
            }
            covered.extend(entry.ledger_seq()..=entry.last_ledger_seq());
        }
        assert_eq!(covered, (1..=chain.len() as i64).collect::<Vec<_>>(), "{account}: every position once");
        for (index, month) in MONTHS.iter().enumerate() {
            let (start_ms, end_ms) = month_bounds_ms(month).unwrap();
            let totals = ledger.period_totals(account, start_ms, end_ms).await.unwrap();
            let (rows, cost) = model.usage_in(account, &[index]);
            assert_eq!((totals.usage.count, totals.usage.amount.nanos()), (rows, cost), "{account} {month}: the statement's usage");
            let archived = ledger.archived_account_months(account, Some(month), None).await.unwrap().into_iter().find(|archived| archived.month == *month);
            let (rows, cost, requests) = model.archived_in(account, index);
            if rows > 0 {
                let archived = archived.unwrap_or_else(|| panic!("{account} {month}: no archived totals"));
                assert_eq!((archived.usage_rows, archived.cost.nanos(), archived.requests), (rows, cost, requests), "{account} {month}: archived totals");
                assert!(!archived.files.is_empty());
            } else {
                assert!(archived.is_none(), "{account} {month} is not archived: {archived:?}");
            }
        }
    }
    let (totals, _) = ledger.ledger_snapshot(None, &[]).await.unwrap();
    for totals in totals {
        assert_eq!((totals.balance.nanos(), totals.rebuilt.nanos()), (model.balance(&totals.account_id), model.balance(&totals.account_id)), "reconciliation's totals");
    }
}

/// The request ids of a file's rows, by a CSV parser of the test's own.
fn file_requests(path: &Path) -> BTreeSet<String> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let column = ARCHIVE_COLUMNS.iter().position(|column| *column == "request_id").unwrap();
    reader.records().map(|record| record.unwrap()[column].to_string()).collect()
}

fn model_requests(model: &Model, month: usize) -> BTreeSet<String> {
    model.chains.values().flatten().filter(|entry| entry.month == Some(month)).filter_map(|entry| entry.request.clone()).collect()
}

async fn archive_against_the_model(ledger: Arc<dyn Ledger>, seed: u64) {
    let ledger = &*ledger;
    let mut model = Model::default();
    let mut random = Random(seed);
    for account in ACCOUNTS {
        funded_account(ledger, account, 10_000).await;
        model.push(account, 10_000, None, None, false);
    }
    random_history(ledger, &mut model, &mut random, 120, &[0, 1, 2], "first").await;
    let dir = out_dir();

    // Too recent: the months before December end inside the replay window of December 4th.
    let refused = archive_before(ledger, "2026-12", &dir, NOW_MS, WINDOW_MS * 5).await;
    assert!(matches!(refused, Err(StoreError::Invalid(_))), "seed {seed}: {refused:?}");

    let archived = archive_before(ledger, "2026-03", &dir, NOW_MS, WINDOW_MS).await.unwrap();
    assert_eq!(archived.iter().map(|month| month.month.as_str()).collect::<Vec<_>>(), ["2026-01", "2026-02"], "seed {seed}");
    for (index, month) in archived.iter().enumerate() {
        let (rows, cost) = ACCOUNTS.iter().fold((0, 0), |(rows, cost), account| {
            let (more_rows, more_cost) = model.usage_in(account, &[index]);
            (rows + more_rows, cost + more_cost)
        });
        assert_eq!((month.usage_rows, month.cost.nanos()), (rows, cost), "seed {seed}: {} as the model has it", month.month);
        let read = read_back(&month.file).unwrap();
        assert_eq!((read.rows, read.cost.nanos(), read.sha256.as_str()), (rows, cost, month.sha256.as_str()));
        assert_eq!(file_requests(&month.file), model_requests(&model, index), "seed {seed}: the file's rows");
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(format!("usage_log-{}.csv.manifest.json", month.month))).unwrap()).unwrap();
        assert_eq!((manifest["usage_rows"].as_u64(), manifest["cost_nanos"].as_i64(), manifest["sha256"].as_str()), (Some(rows), Some(cost), Some(month.sha256.as_str())));
    }
    model.archive(&[0, 1], 1);
    assert_matches_model(ledger, &model).await;

    // Archived ids stay charged: a retry is a duplicate, and there is no body left to replay.
    let archived_charge = model.chains["a"].iter().chain(model.chains["b"].iter()).find(|entry| entry.month == Some(0) && !entry.failed).unwrap();
    let request = archived_charge.request.clone().unwrap();
    let owner = ACCOUNTS.iter().find(|account| model.chains[**account].iter().any(|entry| entry.request.as_ref() == Some(&request))).unwrap();
    assert!(ledger.request_charged(owner, &request).await.unwrap(), "seed {seed}: {request} forgotten");
    assert!(ledger.charged_request(owner, &request).await.unwrap().is_none(), "seed {seed}: {request}'s row and body are in the file");
    assert!(ledger.upstream_attempts(owner, &request).await.unwrap().is_empty(), "seed {seed}: {request}'s upstream attempts went with its row");
    let live = model.chains[*owner].iter().find(|entry| entry.month == Some(2)).and_then(|entry| entry.request.clone());
    if let Some(live) = live {
        assert_eq!(ledger.upstream_attempts(owner, &live).await.unwrap().len(), 1, "seed {seed}: {live} is not archived");
    }
    let retry = dated_event(owner, &request, 5, false, month_bounds_ms("2026-03").unwrap().0, true);
    assert_eq!(ledger.record_usage_batch(&[retry]).await.unwrap(), vec![RecordOutcome::Duplicate], "seed {seed}: charged twice");
    let (_, in_ledger) = ledger.ledger_snapshot(Some(&[]), &[(owner.to_string(), request.clone())]).await.unwrap();
    assert!(in_ledger.contains(&(owner.to_string(), request.clone())), "seed {seed}: reconciliation would think {request} lost");

    // Life goes on: more rows, some dated in the archived January (written late); they are live
    // rows, and archiving again puts them in a second file.
    random_history(ledger, &mut model, &mut random, 40, &[0, 2], "later").await;
    assert_matches_model(ledger, &model).await;
    let again = archive_before(ledger, "2026-03", &dir, NOW_MS, WINDOW_MS).await.unwrap();
    let january_late = model_requests(&model, 0).into_iter().filter(|request| request.starts_with("later")).collect::<BTreeSet<_>>();
    if january_late.is_empty() {
        assert!(again.is_empty(), "seed {seed}: {again:?}");
    } else {
        assert_eq!(again.len(), 1, "seed {seed}: {again:?}");
        assert_eq!(again[0].file, dir.join("usage_log-2026-01-2.csv"));
        assert_eq!(file_requests(&again[0].file), january_late);
        let account_month = ledger.archived_account_months("a", Some("2026-01"), Some("2026-02")).await.unwrap();
        if let Some(month) = account_month.first() {
            assert_eq!(month.files, ["usage_log-2026-01.csv", "usage_log-2026-01-2.csv"]);
        }
    }
    model.archive(&[0, 1], 2);
    assert_matches_model(ledger, &model).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sqlite_archives_months_as_the_model_says() {
    for seed in 1..=4 {
        archive_against_the_model(sqlite().await, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_archives_months_as_the_model_says() {
    for seed in 11..=14 {
        archive_against_the_model(postgres().await, seed).await;
    }
}

/// The drop step checks the month against the export once more, inside its transaction: rows
/// written since (here: an archive whose counts are off by one row) leave everything in place.
async fn a_changed_month_is_not_dropped(ledger: Arc<dyn Ledger>) {
    funded_account(&*ledger, "a", 10_000).await;
    let (start_ms, end_ms) = month_bounds_ms("2026-01").unwrap();
    let batch = [dated_event("a", "r1", 100, false, start_ms + 5, true), dated_event("a", "r2", 200, false, start_ms + 9, false)];
    ledger.record_usage_batch(&batch).await.unwrap();
    let stale = MonthArchive {
        month: "2026-01".into(),
        start_ms,
        end_ms,
        usage_rows: 1,
        cost: Money::from_nanos(100),
        runs: Vec::new(),
        account_months: Vec::new(),
        row_ids: BTreeMap::new(),
        file: "usage_log-2026-01.csv".into(),
        sha256: String::new(),
        archived_at_ms: NOW_MS,
    };
    let refused = ledger.drop_archived_month(&stale).await;
    assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
    assert_eq!(ledger.month_totals(start_ms, end_ms).await.unwrap(), (2, Money::from_nanos(300)), "rows kept");
    assert!(ledger.charged_request("a", "r1").await.unwrap().unwrap().response.is_some(), "body kept");
    assert!(ledger.archive_records("2026-01").await.unwrap().is_empty());
    assert!(check_account(&*ledger, "a").await.unwrap().is_sound());
}

#[tokio::test]
async fn sqlite_does_not_drop_a_month_that_changed() {
    a_changed_month_is_not_dropped(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_does_not_drop_a_month_that_changed() {
    a_changed_month_is_not_dropped(postgres().await).await;
}

/// The reader that verifies a file is strict: the header, every record's numbers, the chain
/// inside each run.
#[test]
fn a_file_that_is_not_an_archive_is_refused() {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let header = ARCHIVE_COLUMNS.join(",");
    let row = |seq: &str, cost: &str, before: &str, after: &str| {
        ARCHIVE_COLUMNS
            .iter()
            .map(|column| match *column {
                "ledger_seq" => seq,
                "cost" => cost,
                "balance_before" => before,
                "balance_after" => after,
                _ => "1",
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let cases = [
        ("good", format!("{header}\n{}\n{}\n", row("1", "5", "100", "95"), row("2", "7", "95", "88")), Some((2, 12))),
        ("header", "id,cost\n1,5\n".to_string(), None),
        ("cost", format!("{header}\n{}\n", row("1", "5.5", "100", "94.5")), None),
        ("short", format!("{header}\n1,2,3\n"), None),
        ("chain", format!("{header}\n{}\n{}\n", row("1", "5", "100", "95"), row("2", "7", "96", "89")), None),
        ("repeated", format!("{header}\n{}\n{}\n", row("1", "5", "100", "95"), row("1", "5", "100", "95")), None),
    ];
    for (name, text, expected) in cases {
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let read = read_back(&path);
        match expected {
            Some((rows, cost)) => {
                let read = read.unwrap();
                assert_eq!((read.rows, read.cost.nanos()), (rows, cost), "{name}");
            }
            None => assert!(matches!(read, Err(StoreError::Archive(_) | StoreError::Corrupt(_))), "{name}: {read:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A statement read while an archive commits is one snapshot: every position once, live or in a
/// run, never both or neither (its three reads share a transaction). Meanwhile a writer charges
/// this month's requests: none fails (no deadlock with the drop's lock), none is lost.
async fn reads_and_writes_during_an_archive(ledger: Arc<dyn Ledger>) {
    let mut model = Model::default();
    let mut random = Random(99);
    for account in ACCOUNTS {
        funded_account(&*ledger, account, 10_000).await;
        model.push(account, 10_000, None, None, false);
    }
    random_history(&*ledger, &mut model, &mut random, 600, &[0, 1, 2], "busy").await;
    // The reader reads accounts b and c; the writer writes to a.
    let positions: BTreeMap<String, usize> = model.chains.iter().filter(|(account, _)| *account != "a").map(|(account, chain)| (account.clone(), chain.len())).collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // How far each has gone, so the archive starts only once both are under way (on a fast
    // archive a slow starter would otherwise overlap nothing).
    let (reads_so_far, written_so_far) = (Arc::new(std::sync::atomic::AtomicU64::new(0)), Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let writer = {
        let (ledger, done, written_so_far) = (Arc::clone(&ledger), Arc::clone(&done), Arc::clone(&written_so_far));
        tokio::spawn(async move {
            let (mut written, mut cost) = (0_u64, 0_i64);
            let march_ms = month_bounds_ms("2026-03").unwrap().0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let batch: Vec<UsageEvent> = (0..3).map(|index| dated_event("a", &format!("live-{written}-{index}"), 7, false, march_ms + 1_000, false)).collect();
                assert!(ledger.record_usage_batch(&batch).await.unwrap().iter().all(|outcome| *outcome == RecordOutcome::Inserted));
                written += 3;
                cost += 21;
                written_so_far.store(written, std::sync::atomic::Ordering::SeqCst);
            }
            (written, cost)
        })
    };
    let reader = {
        let (ledger, done, reads_so_far) = (Arc::clone(&ledger), Arc::clone(&done), Arc::clone(&reads_so_far));
        tokio::spawn(async move {
            let mut reads = 0_u64;
            let mut saw_runs = false;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || !saw_runs {
                for (account, length) in &positions {
                    let entries = ledger.statement(account, None, None).await.unwrap();
                    let covered: Vec<i64> = entries.iter().flat_map(|entry| entry.ledger_seq()..=entry.last_ledger_seq()).collect();
                    assert_eq!(covered, (1..=*length as i64).collect::<Vec<_>>(), "{account}: a torn statement after {reads} reads");
                    saw_runs |= entries.iter().any(|entry| matches!(entry, LedgerEntry::Archived(_)));
                    reads += 1;
                    reads_so_far.store(reads, std::sync::atomic::Ordering::SeqCst);
                }
            }
            reads
        })
    };
    while reads_so_far.load(std::sync::atomic::Ordering::SeqCst) < 2 || written_so_far.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let dir = out_dir();
    archive_before(&*ledger, "2026-03", &dir, NOW_MS, WINDOW_MS).await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.await.unwrap();
    let (written, cost) = writer.await.unwrap();
    assert!(reads > 3 && written > 0, "the reader read {reads} statements, the writer wrote {written} rows");
    for account in ACCOUNTS {
        let check = check_account(&*ledger, account).await.unwrap();
        assert!(check.is_sound(), "{check:?}");
        let expected = model.balance(account) - if account == "a" { cost } else { 0 };
        assert_eq!(check.rebuilt_balance.nanos(), expected, "{account}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reads_and_writes_during_an_archive() {
    reads_and_writes_during_an_archive(sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_and_writes_during_an_archive() {
    reads_and_writes_during_an_archive(postgres().await).await;
}

/// SQLite drops an archived month a few accounts per write transaction. One that fails midway
/// (here: a trigger refuses to delete account c's rows) leaves every account whole — a and b
/// archived, c live, `verify` sound — and the month's record incomplete; the next run finishes
/// it from the file, with no second file.
#[tokio::test]
async fn sqlite_finishes_an_archive_that_stopped_while_dropping() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tollgate-archive-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", path.display());
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::connect(&url, 4).await.unwrap().with_archive_chunk_rows(1));
    let mut model = Model::default();
    let mut random = Random(7);
    for account in ACCOUNTS {
        funded_account(&*ledger, account, 10_000).await;
        model.push(account, 10_000, None, None, false);
    }
    random_history(&*ledger, &mut model, &mut random, 150, &[0, 1, 2], "stop").await;
    let side = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("CREATE TRIGGER refuse_c BEFORE DELETE ON usage_log WHEN OLD.account_id = 'c' BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        .execute(&side)
        .await
        .unwrap();
    let dir = out_dir();
    let stopped = archive_before(&*ledger, "2026-03", &dir, NOW_MS, WINDOW_MS).await;
    assert!(stopped.is_err(), "{stopped:?}");
    let records = ledger.archive_records("2026-01").await.unwrap();
    assert_eq!(records.len(), 1);
    assert!(!records[0].complete, "{records:?}");
    for entry in model.chains.iter_mut().filter(|(account, _)| *account != "c").flat_map(|(_, chain)| chain.iter_mut()) {
        if entry.month == Some(0) {
            entry.archived = Some(1);
        }
    }
    assert_matches_model(&*ledger, &model).await;

    sqlx::query("DROP TRIGGER refuse_c").execute(&side).await.unwrap();
    let finished = archive_before(&*ledger, "2026-03", &dir, NOW_MS, WINDOW_MS).await.unwrap();
    assert_eq!(finished.iter().map(|month| (month.month.as_str(), month.file.file_name().unwrap().to_str().unwrap())).collect::<Vec<_>>(),
               [("2026-01", "usage_log-2026-01.csv"), ("2026-02", "usage_log-2026-02.csv")]);
    assert!(ledger.archive_records("2026-01").await.unwrap().iter().all(|record| record.complete));
    assert_eq!(file_requests(&dir.join("usage_log-2026-01.csv")), model_requests(&model, 0), "one file holds all of January");
    model.archive(&[0, 1], 1);
    assert_matches_model(&*ledger, &model).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
