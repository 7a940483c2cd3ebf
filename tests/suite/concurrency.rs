//! I3: a balance that covers K holds lets at most K requests through, whatever the concurrency.

use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_against_twenty_holds() {
    let gateway = TestGateway::start().await;
    // Find one request's exact cost: with max_tokens equal to the output length, the hold
    // (counted prompt + max output) equals the real cost.
    let probe_account = gateway.account("1", json!({})).await;
    let probe_key = gateway.key(&probe_account, json!({})).await;
    let mut body = chat_body("concurrent");
    body["max_tokens"] = json!(16);
    let probe = gateway.chat(&probe_key, body.clone(), None).await;
    let cost = header_money(&probe, "x-tollgate-cost");

    let starting = Money::from_nanos(cost.nanos() * 20);
    let account = gateway.account(&starting.to_string(), json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let forwarded_before = gateway.upstream_requests().await;
    let mut requests = Vec::new();
    for _ in 0..200 {
        let http = gateway.http.clone();
        let url = format!("{}/v1/chat/completions", gateway.url);
        let key = key.clone();
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            let response = http.post(url).bearer_auth(key).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let value: Value = response.json().await.unwrap();
            (status, value)
        }));
    }
    let mut succeeded = 0;
    let mut refused = 0;
    for request in requests {
        match request.await.unwrap() {
            (200, _) => succeeded += 1,
            (402, value) => {
                assert_eq!(value["error"]["code"], "insufficient_balance");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(succeeded + refused, 200);
    assert_eq!(succeeded, 20, "exactly the requests the balance covers got through");
    assert_eq!(gateway.upstream_requests().await - forwarded_before, 20, "no request reached the upstream without a hold");
    let final_balance = gateway.balance_of(&key).await;
    assert!(!final_balance.is_negative());
    assert_eq!(final_balance, starting.checked_sub(Money::from_nanos(cost.nanos() * 20)).unwrap());
    let statement = gateway.assert_ledger_sound(&account).await;
    let charged = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage" && row["status"] == "success").count();
    assert_eq!(charged, 20, "one usage row per request that got through");
    gateway.stop().await;
}
