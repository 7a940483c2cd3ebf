//! Monthly statements over HTTP: this month's closing balance is the ledger's, next month opens
//! with it, the CSV's amounts add up to its closing line, and the usage by model matches.

use serde_json::json;

use crate::common::*;

fn month_after(month: &str) -> String {
    let (year, number) = month.split_once('-').unwrap();
    let (year, number): (i32, u32) = (year.parse().unwrap(), number.parse().unwrap());
    if number == 12 { format!("{}-01", year + 1) } else { format!("{year}-{:02}", number + 1) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_statement_closes_at_the_ledger_balance_and_opens_the_next_month() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    for content in ["one", "two", "three"] {
        assert_eq!(gateway.chat(&key, chat_body(content), None).await.status(), 200);
    }
    gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/refunds"), Some(json!({"amount": "1.25", "reason": "goodwill back", "reference_id": format!("r-{account}")}))).await;
    gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/adjustments"), Some(json!({"amount": "0.5", "reason": "credit", "operator_id": "ops", "reference_id": format!("a-{account}")}))).await;
    gateway.assert_ledger_sound(&account).await;
    let ledger_balance = money(&gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}"), None).await["ledger_balance"]);

    let now = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", now.year(), u8::from(now.month()));
    let statement = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statements/{month}"), None).await;
    // (A run at the very end of a month may see its rows fall in the next one: read both.)
    let next = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statements/{}", month_after(&month)), None).await;
    assert_eq!(money(&statement["opening_balance"]), Money::ZERO);
    assert_eq!(money(&next["opening_balance"]), money(&statement["closing_balance"]), "closing = next opening");
    assert_eq!(money(&next["closing_balance"]), ledger_balance, "the last closing balance is the ledger's");
    if next["usage"]["count"] == 0 {
        assert_eq!(money(&statement["closing_balance"]), ledger_balance);
        assert_eq!(statement["deposits"], json!({"count": 1, "amount": "10"}));
        assert_eq!(statement["refunds"], json!({"count": 1, "amount": "-1.25"}));
        assert_eq!(statement["adjustments"], json!({"count": 1, "amount": "0.5"}));
        assert_eq!(statement["usage"]["count"], 3);
        let by_model = statement["usage"]["by_model"].as_array().unwrap();
        let mut cost = Money::ZERO;
        for row in by_model {
            cost = cost.checked_add(money(&row["cost"])).unwrap();
        }
        assert_eq!(cost, money(&statement["usage"]["amount"]), "usage by model adds up to the usage total");
    }

    let response = gateway.http.get(format!("{}/internal/accounts/{account}/statements/{month}?format=csv", gateway.url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = response.text().await.unwrap();
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.remove(0), "line,model,count,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,amount");
    let closing = lines.pop().unwrap();
    assert!(closing.starts_with("closing_balance,"), "{csv}");
    let mut sum = Money::ZERO;
    for line in &lines {
        sum = sum.checked_add(line.rsplit(',').next().unwrap().parse::<Money>().unwrap()).unwrap();
    }
    assert_eq!(sum, closing.rsplit(',').next().unwrap().parse::<Money>().unwrap(), "the amounts add up: {csv}");
    assert_eq!(sum, money(&statement["closing_balance"]));

    for bad in ["2026-13", "11-2026", "latest"] {
        let (status, body) = gateway.admin(reqwest::Method::GET, &format!("/internal/accounts/{account}/statements/{bad}"), None).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    let (status, _) = gateway.admin(reqwest::Method::GET, &format!("/internal/accounts/nobody/statements/{month}"), None).await;
    assert_eq!(status, 404);
    gateway.stop().await;
}
