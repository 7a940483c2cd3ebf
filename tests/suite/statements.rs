//! Monthly statements over HTTP: this month's closing balance is the ledger's, next month opens
//! with it, the CSV's amounts add up to its closing line, and the usage by model matches.

use serde_json::json;

use crate::common::*;

fn month_after(month: &str) -> String {
    let (year, number) = month.split_once('-').unwrap();
    let (year, number): (i32, u32) = (year.parse().unwrap(), number.parse().unwrap());
    if number == 12 { format!("{}-01", year + 1) } else { format!("{year}-{:02}", number + 1) }
}

fn current_month() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}", now.year(), u8::from(now.month()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_statement_closes_at_the_ledger_balance_and_opens_the_next_month() {
    let gateway = TestGateway::start().await;
    // Read before anything is written: every row lands in this month or, if the run crosses
    // its end, in the next (read after the writes, a crossing run looked one month too late).
    let month = current_month();
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    for content in ["one", "two", "three"] {
        assert_eq!(gateway.chat(&key, chat_body(content), None).await.status(), 200);
    }
    gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/refunds"), Some(json!({"amount": "1.25", "reason": "goodwill back", "reference_id": format!("r-{account}")}))).await;
    gateway.admin_ok(reqwest::Method::POST, &format!("/internal/accounts/{account}/adjustments"), Some(json!({"amount": "0.5", "reason": "credit", "operator_id": "ops", "reference_id": format!("a-{account}")}))).await;
    gateway.assert_ledger_sound(&account).await;
    let ledger_balance = money(&gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}"), None).await["ledger_balance"]);

    let one_month = current_month() == month;
    let statement = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statements/{month}"), None).await;
    let next = gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}/statements/{}", month_after(&month)), None).await;
    assert_eq!(money(&statement["opening_balance"]), Money::ZERO);
    assert_eq!(money(&next["opening_balance"]), money(&statement["closing_balance"]), "closing = next opening");
    assert_eq!(money(&next["closing_balance"]), ledger_balance, "the last closing balance is the ledger's");
    // The month's contents, when the run stayed in it (a_statement_across_a_month_end crosses
    // one on purpose).
    if one_month {
        assert_eq!(next["usage"]["count"], 0);
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

/// Issue 20 item 12: charges on either side of a month's end, on purpose — at 2099-12-31
/// 23:59:59.999 and 2100-01-01 00:00:00.000 on the gateway's clock (the deposit, dated by the
/// ledger's own clock, comes before both): each month's statement has its own charge, and
/// December's closing balance is January's opening one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_across_a_month_end() {
    let clock = ManualClock::at_time(time::macros::datetime!(2099-12-31 23:59:59.999 UTC));
    let gateway = TestGateway::start_with_clock(&clock, |_| {}).await;
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let december = gateway.chat(&key, chat_body("the last of the year"), None).await;
    assert_eq!(december.status(), 200);
    let december_cost = header_money(&december, "x-tollgate-cost");
    clock.advance_ms(1);
    let january = gateway.chat(&key, chat_body("the first of the next one, longer"), None).await;
    assert_eq!(january.status(), 200);
    let january_cost = header_money(&january, "x-tollgate-cost");
    assert_ne!(december_cost, january_cost, "two costs a statement cannot mix up");
    gateway.assert_ledger_sound(&account).await;
    let ledger_balance = money(&gateway.admin_ok(reqwest::Method::GET, &format!("/internal/accounts/{account}"), None).await["ledger_balance"]);
    let statement = |month: &'static str| {
        let path = format!("/internal/accounts/{account}/statements/{month}");
        let gateway = &gateway;
        async move { gateway.admin_ok(reqwest::Method::GET, &path, None).await }
    };
    let (december, january) = (statement("2099-12").await, statement("2100-01").await);

    let ten = Money::from_nanos(10 * Money::NANOS_PER_UNIT);
    assert_eq!(money(&december["opening_balance"]), ten, "{december}");
    assert_eq!(december["usage"]["count"], 1, "{december}");
    assert_eq!(money(&december["usage"]["amount"]), december_cost);
    assert_eq!(money(&december["closing_balance"]), ten.checked_sub(december_cost).unwrap());
    assert_eq!(january["opening_balance"], december["closing_balance"], "closing = next opening");
    assert_eq!(january["usage"]["count"], 1, "{january}");
    assert_eq!(money(&january["usage"]["amount"]), january_cost);
    assert_eq!(money(&january["closing_balance"]), ledger_balance);
    assert_eq!(january["deposits"]["count"], 0);
    assert_eq!(january["as_of"], "2100-01-01T00:00:00Z", "as of the gateway's now");
    gateway.stop().await;
}
