//! The OpenAPI description (issue 24): the served one is the committed docs/openapi.json, and
//! each path and method it names is served (answers something other than "no such endpoint"),
//! and live answers of the operator and client reads carry the fields their schemas require.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

fn committed() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap()
}

/// The schema a `$ref` names, or the schema itself.
fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &spec["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks that `value` has every property its schema requires and no property the schema does
/// not name (through `allOf`, arrays and nested references); returns the problems found.
fn check(spec: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(parts) = schema["allOf"].as_array() {
        // A flattened struct: the union of the parts' properties.
        let mut merged = json!({"type": "object", "properties": {}, "required": []});
        for part in parts {
            let part = resolve(spec, part);
            for (name, property) in part["properties"].as_object().into_iter().flatten() {
                merged["properties"][name] = property.clone();
            }
            for required in part["required"].as_array().into_iter().flatten() {
                merged["required"].as_array_mut().unwrap().push(required.clone());
            }
        }
        return check(spec, &merged, value, at, problems);
    }
    if let (Some(properties), Some(object)) = (schema["properties"].as_object(), value.as_object()) {
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                problems.push(format!("{at}: missing {required}"));
            }
        }
        for (name, field) in object {
            match properties.get(name) {
                Some(property) => check(spec, property, field, &format!("{at}.{name}"), problems),
                None => problems.push(format!("{at}: {name} is not in the schema")),
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            check(spec, items, item, &format!("{at}[{index}]"), problems);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_description_is_the_committed_one_and_names_only_served_routes() {
    let gateway = TestGateway::start_with(|config| config.limits.auth_failures_per_address_per_minute = 10_000).await;
    let served = gateway.http.get(format!("{}/openapi.json", gateway.url)).send().await.unwrap().text().await.unwrap();
    assert!(served == committed(), "docs/openapi.json is not what the gateway serves: run `tollgate openapi > docs/openapi.json`");
    let spec: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let mut operations = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{model_method}", "demo-gpt:generateContent").replace('{', "x").replace('}', "");
            let response = gateway.http.request(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(), format!("{}{concrete}", gateway.url)).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(status != 405 && !body.contains("no such endpoint"), "{method} {path} is described but not served: {status} {body}");
            operations += 1;
        }
    }
    assert!(operations >= 45, "{operations}");

    // Live answers against their schemas.
    let account = gateway.account("10", json!({})).await;
    let key = gateway.key(&account, json!({"budget_daily": "2"})).await;
    assert_eq!(gateway.chat(&key, chat_body("one"), Some("openapi-1")).await.status(), 200);
    gateway.assert_ledger_sound(&account).await;
    let attempts_query = format!("?account_id={account}&request_id=openapi-1");
    let listed = gateway.admin_ok(Method::GET, &format!("/internal/billing/attempts{attempts_query}"), None).await;
    assert_eq!(listed["attempts"].as_array().map(Vec::len), Some(1), "the checked list is not empty: {listed}");
    let schema_of = |path: &str| {
        let schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"].clone();
        assert!(schema["$ref"].is_string(), "{path} describes its answer by a named schema: {schema}");
        schema
    };
    // The check itself finds a field too many and one missing.
    let mut problems = Vec::new();
    let mut balance: Value = gateway.http.get(format!("{}/v1/balance", gateway.url)).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    balance["key"]["surprise"] = json!(1);
    balance.as_object_mut().unwrap().remove("held");
    check(&spec, &schema_of("/v1/balance"), &balance, "balance", &mut problems);
    assert_eq!(problems, ["balance: missing \"held\"", "balance.key: surprise is not in the schema"]);
    let mut problems = Vec::new();
    for (path, query) in [
        ("/internal/accounts", "?limit=5".to_string()),
        ("/internal/accounts/{id}", String::new()),
        ("/internal/accounts/{id}/keys", String::new()),
        ("/internal/accounts/{id}/statement", String::new()),
        ("/internal/prices", String::new()),
        ("/internal/prices/history", String::new()),
        ("/internal/billing/transactions", format!("?account_id={account}")),
        ("/internal/billing/summary", "?group_by=day,model,key".to_string()),
        ("/internal/reconciliations", String::new()),
        ("/internal/jobs", String::new()),
        ("/internal/alerts", String::new()),
        ("/internal/topups", format!("?account_id={account}")),
        ("/internal/channels", String::new()),
        ("/internal/billing/attempts", attempts_query.clone()),
    ] {
        let concrete = path.replace("{id}", &account);
        let answer = gateway.admin_ok(Method::GET, &format!("{concrete}{query}"), None).await;
        check(&spec, &schema_of(path), &answer, path, &mut problems);
    }
    for path in ["/v1/balance", "/v1/usage", "/v1/usage/summary", "/v1/statement", "/v1/keys"] {
        let answer: Value = gateway.http.get(format!("{}{path}", gateway.url)).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
        check(&spec, &schema_of(path), &answer, path, &mut problems);
    }
    let (_, error) = gateway.admin(Method::GET, "/internal/accounts/nobody", None).await;
    check(&spec, &json!({"$ref": "#/components/schemas/ErrorBody"}), &error, "error", &mut problems);
    assert!(problems.is_empty(), "answers that differ from the description:\n{}", problems.join("\n"));
    gateway.stop().await;
}
