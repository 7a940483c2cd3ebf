//! Periodic jobs under a lease: with several instances each period of a job runs exactly once,
//! never two at a time, and a leader killed mid-run is replaced by the next period.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_store::Ledger;
use tollgate_store::operations::JobRun;
use tollgate_worker::jobs::{JobWork, LeasedJob, run_leased};

use crate::common::*;

const PERIOD_MS: i64 = 400;

/// A job that notes who ran it and checks that no two runs overlap.
struct Probe {
    running: AtomicI64,
    overlaps: AtomicI64,
    runs: Mutex<Vec<String>>,
    /// Set by the test: the next run to start hangs (until its instance is killed) and names its
    /// holder here, so the kill surely lands mid-run.
    hang_next: AtomicBool,
    hung: Mutex<Option<String>>,
}

fn probe_job(probe: &Arc<Probe>, holder: &str) -> LeasedJob {
    let (probe, holder) = (Arc::clone(probe), holder.to_string());
    let work: JobWork = Arc::new(move || {
        let (probe, holder) = (Arc::clone(&probe), holder.clone());
        Box::pin(async move {
            if probe.running.fetch_add(1, Ordering::SeqCst) > 0 {
                probe.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            probe.runs.lock().unwrap().push(holder.clone());
            if probe.hang_next.swap(false, Ordering::SeqCst) {
                *probe.hung.lock().unwrap() = Some(holder.clone());
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            probe.running.fetch_sub(1, Ordering::SeqCst);
            Ok(format!("ran by {holder}"))
        })
    });
    LeasedJob { name: "probe", period: Duration::from_millis(PERIOD_MS as u64), work }
}

async fn runs(ledger: &dyn Ledger, job: &str) -> Vec<JobRun> {
    let mut runs = ledger.job_runs(Some(job), 1_000).await.unwrap();
    runs.sort_by_key(|run| run.period_start);
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_period_runs_once_across_instances_and_a_killed_leader_is_replaced() {
    let dir = TempDir::new();
    let url = test_database_url(&dir).await;
    // Two instances, each with its own connections to the one ledger.
    let (first, _) = tollgate_gateway::server::open_ledger(&url).await.unwrap();
    let (second, _) = tollgate_gateway::server::open_ledger(&url).await.unwrap();
    let probe = Arc::new(Probe { running: AtomicI64::new(0), overlaps: AtomicI64::new(0), runs: Mutex::new(Vec::new()), hang_next: AtomicBool::new(false), hung: Mutex::new(None) });
    let shutdown = CancellationToken::new();
    let mut instances = std::collections::HashMap::new();
    for (holder, ledger) in [("instance-a", &first), ("instance-b", &second)] {
        let task = tokio::spawn(run_leased(Arc::clone(ledger), holder.to_string(), probe_job(&probe, holder), shutdown.clone()));
        instances.insert(holder, task);
    }
    // Eight periods (3.2 s) of runs: waited for, not slept for, so a starved machine is slower,
    // not failing.
    wait_until("eight runs of the probe job", || async { runs(&*first, "probe").await.len() >= 8 }).await;

    // Every period from the first to the last ran once, by one instance.
    let before_kill = runs(&*first, "probe").await;
    assert!(before_kill.len() >= 8, "{before_kill:?}");
    // A period may pass unclaimed only if both instances were starved of CPU past its end.
    for pair in before_kill.windows(2) {
        let gap = pair[1].period_start - pair[0].period_start;
        assert!(gap > 0 && gap % PERIOD_MS == 0, "periods are whole and distinct: {before_kill:?}");
        assert!(pair[1].fence > pair[0].fence, "fencing tokens grow: {before_kill:?}");
    }
    // The snapshot may catch the last period claimed but its work not yet started: only that one
    // may be missing from the probe, and only while unfinished.
    let ran: Vec<String> = probe.runs.lock().unwrap().clone();
    let claimed: Vec<&str> = before_kill.iter().map(|run| run.holder.as_str()).collect();
    let just_claimed = before_kill.last().is_some_and(|run| run.finished_at.is_none()) && ran.len() + 1 == claimed.len();
    assert!(ran.len() == claimed.len() || just_claimed, "each claimed period ran exactly once: ran {ran:?}, claimed {before_kill:?}");
    assert_eq!(ran[..], claimed[..ran.len()], "each period ran by the instance that claimed it");
    assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0, "two instances ran the job at once");

    // Kill the instance that runs the job right now, in the middle of its work.
    probe.hang_next.store(true, Ordering::SeqCst);
    let hung_holder = loop {
        if let Some(holder) = probe.hung.lock().unwrap().clone() {
            break holder;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let leader = runs(&*first, "probe").await.pop().unwrap();
    assert_eq!((leader.holder.as_str(), leader.finished_at), (hung_holder.as_str(), None), "the hanging run is the last one claimed");
    instances.remove(leader.holder.as_str()).unwrap().abort();
    probe.running.store(0, Ordering::SeqCst);
    let survivor = if leader.holder == "instance-a" { "instance-b" } else { "instance-a" };
    // The killed run's lease runs out (one period), then the survivor runs the next periods.
    let after = |runs: Vec<JobRun>| runs.into_iter().filter(|run| run.period_start > leader.period_start).collect::<Vec<JobRun>>();
    wait_until("two runs after the kill", || async { after(runs(&*first, "probe").await).iter().filter(|run| run.finished_at.is_some()).count() >= 2 }).await;

    let after_kill = after(runs(&*first, "probe").await);
    assert!(!after_kill.is_empty(), "nobody took the job over");
    assert!(after_kill.iter().all(|run| run.holder == survivor), "{after_kill:?}");
    let killed_run = runs(&*first, "probe").await.into_iter().find(|run| run.period_start == leader.period_start).unwrap();
    assert!(killed_run.finished_at.is_none(), "the killed run stays recorded as unfinished: {killed_run:?}");
    assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0);

    shutdown.cancel();
    for (_, task) in instances {
        task.await.unwrap();
    }
}

/// The same with real processes: two `tollgate worker`s share Redis and PostgreSQL; the one that
/// runs the stream-lag job is SIGKILLed and the other carries on with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_worker_that_leads_hands_its_jobs_over() {
    let database_url = fresh_postgres_database().await;
    let redis_url = std::env::var("TOLLGATE_TEST_REDIS_URL").expect("TOLLGATE_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let prefix = unique_name("t");
    let dir = TempDir::new();
    let mut workers = std::collections::HashMap::new();
    for name in ["worker-a", "worker-b"] {
        let config_path = dir.0.join(format!("{name}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "database_url = \"{database_url}\"\nredis_url = \"{redis_url}\"\nredis_prefix = \"{prefix}\"\nworker_name = \"{name}\"\n\
                 [limits]\nhold_sweep_interval_ms = 300\n[jobs]\nstream_lag_interval_ms = 300\nreconcile_interval_ms = 900\n"
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["worker", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        workers.insert(name, child);
    }
    let (ledger, _) = tollgate_gateway::server::open_ledger(&database_url).await.unwrap();
    const JOBS: [&str; 3] = ["stream_lag", "hold_sweep", "reconcile"];
    for job in JOBS {
        wait_until(&format!("two {job} runs"), || async { runs(&*ledger, job).await.len() >= 2 }).await;
    }

    for job in JOBS {
        let ran = runs(&*ledger, job).await;
        for run in &ran[..ran.len() - 1] {
            assert!(run.outcome.as_deref().is_some_and(|outcome| !outcome.starts_with("error")), "{job}: {run:?}");
        }
    }
    // One reconciliation per claimed period (the newest may be between its two records). The
    // jobs go on meanwhile: a run that finishes between two reads is finished in the later one,
    // so the finished runs are read before the reconciliations, the claimed ones after.
    let finished = runs(&*ledger, "reconcile").await.iter().filter(|run| run.finished_at.is_some()).count();
    let reconciliations = ledger.reconciliations(100).await.unwrap().len();
    let claimed = runs(&*ledger, "reconcile").await;
    assert!(finished <= reconciliations && reconciliations <= claimed.len(), "{finished} finished, {reconciliations} reconciliations, for {claimed:?}");

    let leader = runs(&*ledger, "stream_lag").await.pop().unwrap().holder;
    let mut killed = workers.remove(leader.as_str()).unwrap();
    killed.start_kill().unwrap();
    let killed_at = now_ms();
    killed.wait().await.unwrap();
    let after_kill = |job: &'static str| {
        let ledger = &ledger;
        async move { runs(&**ledger, job).await.into_iter().filter(|run| run.started_at > killed_at).collect::<Vec<JobRun>>() }
    };
    for job in JOBS {
        wait_until(&format!("{job} taken over"), || async { !after_kill(job).await.is_empty() }).await;
        let after = after_kill(job).await;
        assert!(after.iter().all(|run| run.holder != leader), "{job}: {after:?}");
    }
    for (_, mut worker) in workers {
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
}

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// The `partitions` job (issue 22 item 3) makes the usage log's partitions of this month and the
/// ones ahead by the clock charges are dated by, so a charge of that month lands in its own
/// partition; on SQLite it says the log is not partitioned. Its outcome is read from the ledger's
/// job runs (metrics are one registry for every gateway of the test process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_job_makes_this_month_and_the_next_ones_by_the_gateway_clock() {
    let clock = ManualClock::at_time(time::macros::datetime!(2099-06-15 12:00:00 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |config| config.jobs.partitions_ahead_months = 2).await;
    let ledger = std::sync::Arc::clone(&gateway.state.ledger);
    wait_until("a finished partitions run", || async { runs(&*ledger, "partitions").await.iter().any(|run| run.finished_at.is_some()) }).await;
    let outcome = runs(&*ledger, "partitions").await.into_iter().find_map(|run| run.outcome).unwrap();
    if !gateway.database_url.starts_with("postgres") {
        assert_eq!(outcome, "the usage log is not partitioned on this ledger");
        return;
    }
    assert!(outcome.starts_with("made 2099-06, 2099-07, 2099-08; "), "{outcome}");
    assert!(outcome.contains(", 2 ahead of this one; 0 rows in the default partition"), "{outcome}");

    let account = gateway.account("1", serde_json::json!({})).await;
    let key = gateway.key(&account, serde_json::json!({})).await;
    let response = gateway.chat(&key, serde_json::json!({"model": "demo-gpt", "messages": [{"role": "user", "content": "hi"}]}), Some("june")).await;
    assert_eq!(response.status(), 200);
    let pool = sqlx::PgPool::connect(&gateway.database_url).await.unwrap();
    wait_until("the charge in the ledger", || async { ledger.request_charged(&account, "june").await.unwrap() }).await;
    let table: String = sqlx::query_scalar("SELECT tableoid::regclass::TEXT FROM usage_log WHERE request_id = 'june'").fetch_one(&pool).await.unwrap();
    assert_eq!(table, "usage_log_2099_06");
    gateway.assert_ledger_sound(&account).await;
}
