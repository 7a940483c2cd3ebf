//! `tollgate archive` end to end (issue 22 items 3 and 4), on every ledger and hot store the
//! suite runs with: charges dated in January 2026 on the gateway's clock, the binary archives
//! January while the gateway runs, and then over HTTP the balance, the statement chain, the
//! monthly statement and a retry of an archived request all say what they said before — the
//! retry refused, never charged again. The store's own tests (crates/tollgate-store/tests/
//! archive.rs) check the archive against a model under random histories.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_month_keeps_balances_statements_and_charges() {
    let clock = ManualClock::at_time(time::macros::datetime!(2026-01-20 12:00:00 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |_| {}).await;
    let ledger = std::sync::Arc::clone(&gateway.state.ledger);
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut january_cost = Money::ZERO;
    for request in ["jan-1", "jan-2", "jan-3"] {
        let response = gateway.chat(&key, chat_body(&format!("a question of {request}")), Some(request)).await;
        assert_eq!(response.status(), 200);
        january_cost = january_cost.checked_add(header_money(&response, "x-tollgate-cost")).unwrap();
    }
    clock.set_time(time::macros::datetime!(2026-02-10 08:00:00 UTC));
    let february = gateway.chat(&key, chat_body("one in February"), Some("feb-1")).await;
    assert_eq!(february.status(), 200);
    wait_until("every charge in the ledger", || async { ledger.request_charged(&account, "feb-1").await.unwrap() && ledger.request_charged(&account, "jan-3").await.unwrap() }).await;
    let before = gateway.assert_ledger_sound(&account).await;
    let balance_before = gateway.balance_of(&key).await;
    let path = format!("/internal/accounts/{account}/statements/2026-01");
    let january_before = gateway.admin_ok(reqwest::Method::GET, &path, None).await;
    assert_eq!(january_before["archived"], serde_json::Value::Null);

    let dir = TempDir::new();
    let out = dir.0.join("archive");
    let env = [("TOLLGATE_DATABASE_URL", gateway.database_url.as_str())];
    // Months that ended inside the replay window are refused, whole.
    let (status, _, stderr) = tollgate(&["archive", "--before", "2099-01", "--out", out.to_str().unwrap()], &env).await;
    assert_ne!(status, 0, "{stderr}");
    assert!(stderr.contains("replay window"), "{stderr}");
    // A dry run lists January, writes and drops nothing.
    let (status, stdout, stderr) = tollgate(&["archive", "--before", "2026-02", "--out", out.to_str().unwrap(), "--dry-run", "--json"], &env).await;
    assert_eq!(status, 0, "{stdout}{stderr}");
    let planned: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((planned[0]["month"].as_str(), planned[0]["usage_rows"].as_u64(), planned.as_array().map(Vec::len)), (Some("2026-01"), Some(3), Some(1)), "{planned}");
    assert_eq!(money(&planned[0]["cost"]), january_cost);
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    let (start_ms, end_ms) = tollgate_store::archive::month_bounds_ms("2026-01").unwrap();
    assert_eq!(ledger.month_totals(start_ms, end_ms).await.unwrap(), (3, january_cost), "a dry run dropped rows");
    let (status, stdout, stderr) = tollgate(&["archive", "--before", "2026-02", "--out", out.to_str().unwrap()], &env).await;
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2026-01") && stdout.contains("usage_log-2026-01.csv"), "{stdout}");
    let file = std::fs::read_to_string(out.join("usage_log-2026-01.csv")).unwrap();
    assert_eq!(file.lines().count(), 4, "a header and January's three rows:\n{file}");
    assert!(["jan-1", "jan-2", "jan-3"].iter().all(|request| file.contains(request)) && !file.contains("feb-1"), "{file}");

    // The balance and the chain are those of before; the three rows are one archived entry.
    assert_eq!(gateway.balance_of(&key).await, balance_before);
    let after = gateway.assert_ledger_sound(&account).await;
    let kinds: Vec<&str> = after["rows"].as_array().unwrap().iter().map(|row| row["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["deposit", "archived", "usage"], "{after}");
    assert_eq!(after["closing_balance"], before["closing_balance"]);
    let run = &after["rows"][1];
    assert_eq!((run["ledger_seq"].as_i64(), run["last_ledger_seq"].as_i64(), run["usage_rows"].as_u64()), (Some(2), Some(4), Some(3)), "{run}");
    assert_eq!(money(&run["amount"]), Money::ZERO.checked_sub(january_cost).unwrap());

    // January's statement: the same totals, and where its rows went.
    let january = gateway.admin_ok(reqwest::Method::GET, &path, None).await;
    for field in ["opening_balance", "closing_balance", "usage"] {
        if field == "usage" {
            assert_eq!((&january["usage"]["count"], &january["usage"]["amount"]), (&january_before["usage"]["count"], &january_before["usage"]["amount"]));
        } else {
            assert_eq!(january[field], january_before[field], "{field}");
        }
    }
    assert_eq!(january["archived"]["requests"], 3, "{january}");
    assert_eq!(money(&january["archived"]["amount"]), january_cost);
    assert_eq!(january["archived"]["files"], json!(["usage_log-2026-01.csv"]));
    let (_, csv) = gateway.admin(reqwest::Method::GET, &format!("{path}?format=csv"), None).await;
    let csv = csv.as_str().unwrap_or_default().to_string();
    assert!(csv.lines().any(|line| line.starts_with("archived_usage,usage_log-2026-01.csv,3,")), "{csv}");

    // A retry of an archived charge: refused, never charged twice, nothing upstream.
    let upstream = gateway.upstream_requests().await;
    let retry = gateway.chat(&key, chat_body("a question of jan-1"), Some("jan-1")).await;
    assert_eq!(retry.status(), 409);
    let error: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(error["error"]["code"], "duplicate_request", "{error}");
    assert_eq!(gateway.upstream_requests().await, upstream);
    assert_eq!(gateway.balance_of(&key).await, balance_before);

    // `tollgate verify` over the same ledger (embedded: the ledger alone) finds it sound.
    if gateway.database_url.starts_with("sqlite") {
        let (status, stdout, stderr) = tollgate(&["verify"], &env).await;
        assert_eq!(status, 0, "{stdout}{stderr}");
    }
    gateway.stop().await;
}
