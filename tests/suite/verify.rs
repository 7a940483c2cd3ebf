//! `tollgate verify`: after traffic, the read-only proof passes (nothing lost, doubled or
//! drifted); a served request with no charge, and a balance edited by hand, are each caught.

use serde_json::json;

use crate::common::*;

/// A configuration file naming the test gateway's ledger and hot store.
fn verify_config(gateway: &TestGateway) -> std::path::PathBuf {
    let path = gateway.dir.0.join("verify.toml");
    let mut text = format!("database_url = \"{}\"\n", gateway.database_url);
    if let Some(url) = &gateway.config.redis_url {
        text.push_str(&format!("redis_url = \"{url}\"\nredis_prefix = \"{}\"\n", gateway.config.redis_prefix));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn line(stdout: &str, name: &str) -> String {
    let found = stdout.lines().find(|line| line.starts_with(name)).unwrap_or_else(|| panic!("no {name:?} in:\n{stdout}"));
    found[name.len()..].trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_a_sound_ledger_and_catches_loss_and_drift() {
    let gateway = TestGateway::start().await;
    let mut served = Vec::new();
    for index in 0..3 {
        let account = gateway.account("1", json!({})).await;
        let key = gateway.key(&account, json!({})).await;
        for request in 0..4 {
            let request_id = format!("verify-{index}-{request}");
            let mut body = chat_body("verify me");
            body["stream"] = json!(request % 2 == 1);
            let response = gateway.chat(&key, body.clone(), Some(&request_id)).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            served.push((account.clone(), request_id.clone()));
            // A non-streaming retry is replayed, never charged again.
            if request == 0 {
                assert_eq!(gateway.chat(&key, body, Some(&request_id)).await.headers()["idempotent-replayed"], "true");
            }
        }
        gateway.assert_ledger_sound(&account).await;
    }
    let config = verify_config(&gateway);
    let config = config.to_str().unwrap();
    let charged = gateway.dir.0.join("charged.txt");
    let list: String = served.iter().map(|(account, request)| format!("{account} {request}\n")).collect();
    std::fs::write(&charged, &list).unwrap();

    let (status, stdout, stderr) = tollgate(&["verify", "--config", config, "--charged", charged.to_str().unwrap()], &[]).await;
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_eq!(line(&stdout, "usage rows"), "12");
    assert_eq!(line(&stdout, "charged per the client"), "12");
    assert_eq!(line(&stdout, "lost (I1)"), "0");
    assert_eq!(line(&stdout, "doubled (I1)"), "0");
    assert_eq!(line(&stdout, "max drift (I2)"), "0");
    assert_eq!(line(&stdout, "verdict"), "sound");

    // A request a client saw served but the ledger never charged.
    let (victim, _) = served[0].clone();
    std::fs::write(&charged, format!("{list}{victim} never-charged\n")).unwrap();
    let (status, stdout, _) = tollgate(&["verify", "--config", config, "--charged", charged.to_str().unwrap()], &[]).await;
    assert_eq!(status, 3, "{stdout}");
    assert_eq!(line(&stdout, "lost (I1)"), "1");
    assert!(stdout.contains(&format!("lost: {victim} never-charged")), "{stdout}");

    // account_balance edited by hand: the drift is found, to the unit.
    edit_ledger(&gateway, "UPDATE account_balance SET balance = balance + 1234567 WHERE account_id = ?", &victim).await;
    let (status, stdout, _) = tollgate(&["verify", "--config", config, "--json"], &[]).await;
    assert_eq!(status, 3, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["drifted_accounts"], 1);
    assert_eq!(report["max_drift"], "0.001234567");
    assert_eq!(report["lost"], 0);
    gateway.stop().await;
}

/// The report's examples of one kind, from verify's table.
fn examples<'s>(stdout: &'s str, kind: &str) -> Vec<&'s str> {
    stdout.lines().filter_map(|line| line.trim().strip_prefix(kind)).map(str::trim).collect()
}

/// Issue 20 item 5: lost charges, wrong amounts and chain breaks found in a real ledger, edited
/// as a slip or an attack would: a usage row deleted, a charge's amount changed, a row's
/// balances moved so the chain no longer links. Each edit is named by verify, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_rows_removed_amounts_changed_and_chains_edited_in_a_real_ledger() {
    let gateway = TestGateway::start().await;
    let run = unique_name("edit");
    let mut accounts = Vec::new();
    let mut list = String::new();
    for index in 0..3 {
        let account = gateway.account("1", json!({})).await;
        let key = gateway.key(&account, json!({})).await;
        for request in 0..3 {
            let request_id = format!("{run}-{index}-{request}");
            let response = gateway.chat(&key, chat_body("verify me"), Some(&request_id)).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
            // What OpenAI's tokenizer counts and the prices say, independently of the gateway.
            let cost = expected_cost(tiktoken_prompt_tokens(&chat_body("verify me")["messages"]), 16);
            list.push_str(&format!("{account} {request_id} {cost}\n"));
        }
        gateway.assert_ledger_sound(&account).await;
        accounts.push(account);
    }
    let config = verify_config(&gateway);
    let config = config.to_str().unwrap();
    let charged = gateway.dir.0.join("charged.txt");
    std::fs::write(&charged, &list).unwrap();
    let verify = || async { tollgate(&["verify", "--config", config, "--charged", charged.to_str().unwrap()], &[]).await };
    let (status, stdout, stderr) = verify().await;
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_eq!(line(&stdout, "charged per the client"), "9");
    assert_eq!(line(&stdout, "charged a wrong amount"), "0");

    // The middle charge of account 0 deleted: lost, and the chain skips a position there.
    let removed = format!("{run}-0-1");
    edit_ledger(&gateway, "DELETE FROM usage_log WHERE request_id = ?", &removed).await;
    // Account 1's middle charge made one unit cheaper, its balance_after kept consistent with
    // it: a wrong amount, and the next row no longer starts where this one ends.
    let cheapened = format!("{run}-1-1");
    edit_ledger(&gateway, "UPDATE usage_log SET cost = cost - 1, balance_after = balance_after + 1 WHERE request_id = ?", &cheapened).await;
    // Account 2's middle row moved as a whole: the sums still agree (no drift from it), only the
    // chain shows it, at this row and the next.
    let moved = format!("{run}-2-1");
    edit_ledger(&gateway, "UPDATE usage_log SET balance_before = balance_before + 5, balance_after = balance_after + 5 WHERE request_id = ?", &moved).await;

    let (status, stdout, _) = verify().await;
    assert_eq!(status, 3, "{stdout}");
    assert_eq!(line(&stdout, "lost (I1)"), "1", "{stdout}");
    assert_eq!(examples(&stdout, "lost:"), vec![format!("{} {removed}", accounts[0])]);
    assert_eq!(line(&stdout, "charged a wrong amount"), "1", "{stdout}");
    let expected = expected_cost(tiktoken_prompt_tokens(&chat_body("verify me")["messages"]), 16);
    let cheaper = expected.checked_sub(Money::from_nanos(1)).unwrap();
    assert_eq!(examples(&stdout, "wrong amount:"), vec![format!("{} {cheapened} charged {cheaper}, expected {expected}", accounts[1])]);
    // Positions: 1 is the opening deposit, 2–4 the charges.
    assert_eq!(line(&stdout, "chain breaks (I4)"), "4", "{stdout}");
    let breaks = examples(&stdout, "chain break:");
    let expected_breaks = [format!("{} at ledger_seq 4", accounts[0]), format!("{} at ledger_seq 4", accounts[1]), format!("{} at ledger_seq 3", accounts[2]), format!("{} at ledger_seq 4", accounts[2])];
    for expected in &expected_breaks {
        assert!(breaks.contains(&expected.as_str()), "{expected} in {breaks:?}");
    }
    assert_eq!(line(&stdout, "doubled (I1)"), "0");
    gateway.stop().await;
}
