//! What the console reads (issue 24): the account list and search, usage totals by day, model
//! and key for the operator and for a key holder, a key holder's statement and keys, the price
//! history, and the console's own files. Totals are checked against the usage rows the same
//! API lists, summed here.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

/// GET with a client key; (status, JSON or text).
async fn client_get(gateway: &TestGateway, key: &str, path: &str) -> (u16, Value) {
    let response = gateway.http.get(format!("{}{path}", gateway.url)).bearer_auth(key).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Every usage row of an account, through the paged listing.
async fn usage_rows(gateway: &TestGateway, account: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = gateway.admin_ok(Method::GET, &format!("/internal/billing/transactions?account_id={account}&limit=2{cursor}"), None).await;
        rows.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return rows,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_by_day_model_and_key_add_up_to_the_rows_for_operator_and_key_holder() {
    let gateway = TestGateway::start().await;
    let account = gateway.account("10", json!({})).await;
    let first = gateway.key(&account, json!({"name": "first"})).await;
    let second = gateway.key(&account, json!({"name": "second", "budget_daily": "5"})).await;
    // Another account's usage must appear in neither the key holder's totals nor this account's.
    let stranger = gateway.account("10", json!({})).await;
    let stranger_key = gateway.key(&stranger, json!({})).await;
    assert_eq!(gateway.chat(&stranger_key, chat_body("elsewhere"), None).await.status(), 200);
    for (key, model, content) in [(&first, "demo-gpt", "one"), (&first, "demo-claude", "two"), (&second, "demo-gpt", "three four five"), (&second, "demo-gpt", "six")] {
        let mut body = chat_body(content);
        body["model"] = json!(model);
        assert_eq!(gateway.chat(key, body, None).await.status(), 200);
    }
    gateway.assert_ledger_sound(&account).await;

    // The expected totals, from the rows themselves: (model, key) -> (requests, output tokens, cost).
    let rows = usage_rows(&gateway, &account).await;
    assert_eq!(rows.len(), 4);
    let mut expected: BTreeMap<(String, String), (u64, u64, Money)> = BTreeMap::new();
    for row in &rows {
        let total = expected.entry((row["model"].as_str().unwrap().into(), row["api_key_id"].as_str().unwrap().into())).or_insert((0, 0, Money::ZERO));
        total.0 += 1;
        total.1 += row["usage"]["output_tokens"].as_u64().unwrap();
        total.2 = total.2.checked_add(money(&row["cost"])).unwrap();
    }
    let fold = |by: &dyn Fn(&(String, String)) -> String| {
        let mut folded: BTreeMap<String, (u64, u64, Money)> = BTreeMap::new();
        for (group, (requests, output, cost)) in &expected {
            let total = folded.entry(by(group)).or_insert((0, 0, Money::ZERO));
            total.0 += requests;
            total.1 += output;
            total.2 = total.2.checked_add(*cost).unwrap();
        }
        folded
    };
    let got = |summary: &Value, field: &str| -> BTreeMap<String, (u64, u64, Money)> {
        summary["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| (row[field].as_str().unwrap().to_string(), (row["requests"].as_u64().unwrap(), row["output_tokens"].as_u64().unwrap(), money(&row["cost"]))))
            .collect()
    };
    let first_key_id = rows.iter().find(|row| row["model"] == "demo-claude").unwrap()["api_key_id"].as_str().unwrap().to_string();

    let by_model = gateway.admin_ok(Method::GET, &format!("/internal/billing/summary?account_id={account}&group_by=model"), None).await;
    assert_eq!(by_model["group_by"], "model");
    assert_eq!(got(&by_model, "model"), fold(&|(model, _)| model.clone()));
    let by_key = gateway.admin_ok(Method::GET, &format!("/internal/billing/summary?account_id={account}&group_by=key"), None).await;
    assert_eq!(got(&by_key, "api_key_id"), fold(&|(_, key)| key.clone()));

    // Two dimensions, read one group per page: the pages together are the totals, in order.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = gateway.admin_ok(Method::GET, &format!("/internal/billing/summary?account_id={account}&group_by=model,key&limit=1{cursor}"), None).await;
        paged.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_u64() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let pairs: Vec<(String, String)> = paged.iter().map(|row| (row["model"].as_str().unwrap().into(), row["api_key_id"].as_str().unwrap().into())).collect();
    assert_eq!(pairs, expected.keys().cloned().collect::<Vec<_>>(), "each (model, key) once, in order");
    for row in &paged {
        assert_eq!(row["group"], format!("{}, {}", row["model"].as_str().unwrap(), row["api_key_id"].as_str().unwrap()));
    }

    // The key holder: its own account only, whichever account_id it names.
    let (status, own) = client_get(&gateway, &first, &format!("/v1/usage/summary?group_by=day,model&account_id={stranger}")).await;
    assert_eq!(status, 200, "{own}");
    // By (UTC day, model), folded from the rows' own times: a run across midnight has two
    // days, both right.
    let mut by_day_model: BTreeMap<(String, String), Money> = BTreeMap::new();
    for row in &rows {
        let day = row["created_at"].as_str().unwrap()[..10].to_string();
        let total = by_day_model.entry((day, row["model"].as_str().unwrap().to_string())).or_insert(Money::ZERO);
        *total = total.checked_add(money(&row["cost"])).unwrap();
    }
    let shown: BTreeMap<(String, String), Money> = own["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| ((row["day"].as_str().unwrap().to_string(), row["model"].as_str().unwrap().to_string()), money(&row["cost"])))
        .collect();
    assert_eq!(shown, by_day_model);
    // A range that ends before today holds nothing.
    let (_, before) = client_get(&gateway, &first, "/v1/usage/summary?group_by=day&start=2020-01-01T00:00:00Z&end=2020-02-01T00:00:00Z").await;
    assert_eq!(before["data"], json!([]));

    // Its keys: names and budgets, never a secret or a hash.
    let (status, keys) = client_get(&gateway, &second, "/v1/keys").await;
    assert_eq!(status, 200, "{keys}");
    let keys = keys["data"].as_array().unwrap();
    let names: Vec<&str> = keys.iter().map(|key| key["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"first") && names.contains(&"second"), "{names:?}");
    assert_eq!(keys.iter().find(|key| key["name"] == "second").unwrap()["budget_daily"], "5");
    assert!(keys.iter().any(|key| key["id"] == first_key_id.as_str()));
    let text = serde_json::to_string(keys).unwrap();
    assert!(!text.contains(&first) && !text.contains(&second) && !text.contains("hash"), "{text}");

    // Its statement: the same rows as the operator's, as JSON and as CSV.
    let operator_statement = gateway.admin_ok(Method::GET, &format!("/internal/accounts/{account}/statement"), None).await;
    let (status, statement) = client_get(&gateway, &first, "/v1/statement").await;
    assert_eq!(status, 200, "{statement}");
    assert_eq!(statement["rows"], operator_statement["rows"]);
    assert_eq!(statement["closing_balance"], operator_statement["closing_balance"]);
    assert_chain(&statement);
    let response = gateway.http.get(format!("{}/v1/statement?format=csv", gateway.url)).bearer_auth(&first).send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = response.text().await.unwrap();
    assert_eq!(csv.lines().count(), 1 + operator_statement["rows"].as_array().unwrap().len(), "{csv}");
    assert!(csv.lines().skip(1).all(|line| !line.contains(&stranger)), "{csv}");

    // Bad parameters are refused with the contract's error, for both.
    for bad in ["group_by=week", "group_by=day,day", "group_by=", "start=yesterday", "limit=x"] {
        let (status, body) = gateway.admin(Method::GET, &format!("/internal/billing/summary?{bad}"), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}: {body}");
        let (status, body) = client_get(&gateway, &first, &format!("/v1/usage/summary?{bad}")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{bad}: {body}");
    }
    let (status, body) = gateway.admin(Method::GET, "/internal/billing/summary?account_id=nobody", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    // Without a key, nothing.
    for path in ["/v1/usage/summary", "/v1/statement", "/v1/keys"] {
        let response = gateway.http.get(format!("{}{path}", gateway.url)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
    }
    // A revoked key reads nothing more.
    let first_id = keys.iter().find(|key| key["name"] == "first").unwrap()["id"].as_str().unwrap().to_string();
    gateway.admin_ok(Method::DELETE, &format!("/internal/keys/{first_id}"), None).await;
    assert_eq!(client_get(&gateway, &first, "/v1/keys").await.0, 401);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_list_pages_and_searches_with_live_balances() {
    let gateway = TestGateway::start().await;
    let tag = unique_name("list");
    let mut ids = Vec::new();
    for index in 0..5 {
        let id = format!("{tag}-{index}");
        gateway.admin_ok(Method::POST, "/internal/accounts", Some(json!({"id": id, "kind": "user", "name": format!("Customer {index}"), "customer_type": TIER}))).await;
        ids.push(id);
    }
    gateway.top_up(&ids[1], "3.5", &format!("{tag}-topup")).await;
    let key = gateway.key(&ids[1], json!({})).await;
    assert_eq!(gateway.chat(&key, chat_body("still there?"), None).await.status(), 200);
    // In services mode the worker writes the ledger after the answer: compare once it has.
    gateway.assert_ledger_sound(&ids[1]).await;

    // Pages of two over the search, in id order, each account once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = gateway.admin_ok(Method::GET, &format!("/internal/accounts?q={}&limit=2{cursor}", tag.to_uppercase()), None).await;
        seen.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen.iter().map(|account| account["id"].as_str().unwrap().to_string()).collect::<Vec<_>>(), ids);
    // Each as GET /internal/accounts/{id} shows it: the live balance, held and available.
    for listed in &seen {
        let single = gateway.admin_ok(Method::GET, &format!("/internal/accounts/{}", listed["id"].as_str().unwrap()), None).await;
        for field in ["balance", "held", "available", "ledger_balance", "customer_type", "status"] {
            assert_eq!(listed[field], single[field], "{field}");
        }
    }
    let charged = &seen[1];
    assert_eq!(money(&charged["balance"]), "3.5".parse::<Money>().unwrap().checked_sub(expected_cost_of_hello()).unwrap());
    // By name, case-insensitive; a wildcard is a character.
    let by_name = gateway.admin_ok(Method::GET, "/internal/accounts?q=customer%203&limit=100", None).await;
    assert!(by_name["data"].as_array().unwrap().iter().any(|account| account["id"] == ids[3].as_str()));
    let wildcard = gateway.admin_ok(Method::GET, "/internal/accounts?q=%25&limit=100", None).await;
    assert!(wildcard["data"].as_array().unwrap().iter().all(|account| account["name"].as_str().unwrap().contains('%') || account["id"].as_str().unwrap().contains('%')));
    // Bounded: a limit over the maximum gives the maximum's page, not an error and not more.
    let (status, body) = gateway.admin(Method::GET, "/internal/accounts?limit=100000", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["data"].as_array().unwrap().len() <= 100);
    // A top-up left pending is found by status; the confirmed one is not among them.
    let pending = gateway.admin_ok(Method::POST, "/internal/topups", Some(json!({"account_id": ids[1], "amount": "1", "reference_id": format!("{tag}-left")}))).await;
    let listed = gateway.admin_ok(Method::GET, &format!("/internal/topups?account_id={}&status=pending", ids[1]), None).await;
    assert_eq!(listed["data"].as_array().unwrap().iter().map(|topup| topup["id"].clone()).collect::<Vec<_>>(), [pending["id"].clone()]);
    let every = gateway.admin_ok(Method::GET, &format!("/internal/topups?account_id={}", ids[1]), None).await;
    assert_eq!(every["data"].as_array().unwrap().len(), 2, "{every}");
    assert_eq!(every["data"][0]["id"], pending["id"], "newest first: {every}");
    let (status, body) = gateway.admin(Method::GET, "/internal/topups?status=paid", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let (status, body) = gateway.admin(Method::GET, "/internal/accounts?colour=red", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
    gateway.stop().await;
}

/// The cost of one `chat_body("still there?")` on the demo prices, from the mock's token counts.
fn expected_cost_of_hello() -> Money {
    expected_cost(tiktoken_prompt_tokens(&chat_body("still there?")["messages"]), 16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_price_history_keeps_every_price_newest_first() {
    let gateway = TestGateway::start().await;
    let model = unique_name("history-model");
    for input in ["1", "2", "3"] {
        gateway
            .admin_ok(Method::PUT, "/internal/prices", Some(json!([{"provider": "mock", "model": model, "customer_type": TIER, "input_per_mtok": input, "output_per_mtok": "1"}])))
            .await;
    }
    let history = gateway.admin_ok(Method::GET, &format!("/internal/prices/history?model={model}"), None).await;
    let inputs: Vec<&str> = history["data"].as_array().unwrap().iter().map(|row| row["input_per_mtok"].as_str().unwrap()).collect();
    assert_eq!(inputs, ["3", "2", "1"]);
    let current = gateway.admin_ok(Method::GET, "/internal/prices", None).await;
    let now: Vec<&Value> = current["data"].as_array().unwrap().iter().filter(|row| row["model"] == model.as_str()).collect();
    assert_eq!((now.len(), now[0]["id"].clone()), (1, history["data"][0]["id"].clone()), "the newest row is the current price");
    let one = gateway.admin_ok(Method::GET, &format!("/internal/prices/history?model={model}&limit=1"), None).await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let gateway = TestGateway::start().await;
    let root = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = root.get(format!("{}/", gateway.url)).send().await.unwrap();
    assert_eq!((response.status().as_u16(), response.headers()["location"].to_str().unwrap()), (303, "/console/"));
    let page = gateway.http.get(format!("{}/console/", gateway.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    let html = page.text().await.unwrap();
    // Every script and stylesheet the page names is served, with its type; no inline script.
    for file in ["console.js", "console.css"] {
        assert!(html.contains(file), "the page loads {file}");
    }
    assert!(!html.contains("<script>") && !html.contains("onclick="), "no inline script");
    for (file, media) in [("console.js", "text/javascript"), ("api.js", "text/javascript"), ("charts.js", "text/javascript"), ("console.css", "text/css")] {
        let response = gateway.http.get(format!("{}/console/{file}", gateway.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{file}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with(media), "{file}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert!(response.text().await.unwrap().len() > 200, "{file} is the console's, not a placeholder");
    }
    for missing in ["/console/secrets.txt", "/console/..%2Fconfig.toml", "/console/index.htm"] {
        assert_eq!(gateway.http.get(format!("{}{missing}", gateway.url)).send().await.unwrap().status(), 404, "{missing}");
    }
    gateway.stop().await;
}
