//! Security, seen from outside the process: the operator API on its own listener, no secret or
//! prompt in the logs even at debug level, oversized headers refused, SIGTERM exits cleanly.

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_the_operator_api_has_its_own_listener_and_sigterm_exits_0() {
    let dir = TempDir::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mock_url = start_mock(tollgate_mock::MockConfig::default(), shutdown.clone()).await;
    let upstream_secret = format!("sk-upstream-{}", uuid::Uuid::new_v4().simple());
    let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let config_path = dir.0.join("tollgate.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"listen = "127.0.0.1:0"
internal_listen = "127.0.0.1:0"
admin_token = "{admin_token}"
database_url = "sqlite://{}/ledger.db"

[limits]
header_bytes_max = 4096

[[providers]]
name = "upstream"
kind = "openai"
base_url = "{mock_url}"
api_key_env = "TOLLGATE_TEST_UPSTREAM_SECRET"

[[models]]
model = "gpt"
provider = "upstream"
"#,
            dir.0.display()
        ),
    )
    .unwrap();
    let mut process = start_binary(&config_path, &[("TOLLGATE_TEST_UPSTREAM_SECRET", &upstream_secret)]).await;
    let http = reqwest::Client::new();

    // The operator API answers on its own listener only; the client API only on the public one.
    let key = binary_customer(&http, &process.internal, &admin_token, "gpt", "acct_security").await;
    let on_public = http.get(format!("{}/internal/accounts/acct_security", process.public)).bearer_auth(&admin_token).send().await.unwrap();
    assert_eq!(on_public.status(), 404, "no operator API on the public listener");
    assert_eq!(http.get(format!("{}/metrics", process.public)).send().await.unwrap().status(), 404);
    assert_eq!(http.get(format!("{}/metrics", process.internal)).send().await.unwrap().status(), 200);
    let on_internal = http.post(format!("{}/v1/chat/completions", process.internal)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(on_internal.status(), 404, "no client API on the operator listener");

    // Traffic whose secrets must not reach the log: served, streamed, refused, failed upstream.
    let prompt = format!("my very private prompt {}", uuid::Uuid::new_v4().simple());
    let chat = |key: String, body: Value| http.post(format!("{}/v1/chat/completions", process.public)).bearer_auth(key).json(&body).send();
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": prompt}]});
    let served = chat(key.clone(), body.clone()).await.unwrap();
    assert_eq!(served.status(), 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    assert_eq!(chat(key.clone(), streamed).await.unwrap().status(), 200);
    let near_miss = format!("{}x", &key[..key.len() - 1]);
    assert_eq!(chat(near_miss.clone(), body.clone()).await.unwrap().status(), 401);
    let mut failing = body.clone();
    failing["mock"] = json!({"fail_status": 500});
    assert_eq!(chat(key.clone(), failing).await.unwrap().status(), 502);
    let wrong_admin = http.get(format!("{}/internal/prices", process.internal)).bearer_auth(format!("{admin_token}x")).send().await.unwrap();
    assert_eq!(wrong_admin.status(), 401);

    // Headers beyond header_bytes_max: 431, in the contract's shape.
    let huge = http.post(format!("{}/v1/chat/completions", process.public)).bearer_auth(&key).header("x-padding", "p".repeat(5000)).json(&body).send().await.unwrap();
    assert_eq!(huge.status(), 431);
    let error: Value = huge.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");

    // SIGTERM: the process drains and exits 0.
    assert_eq!(terminate(&mut process.child).await, Some(0));

    let mut log = process.printed.clone();
    process.stdout.read_to_string(&mut log).await.unwrap();
    log.push_str(&process.finished_log().await);
    assert!(log.lines().count() > 10, "the debug log has content to scan:\n{log}");
    assert!(log.contains(served.headers()["x-request-id"].to_str().unwrap()), "requests are logged (by id)");
    // The key refused with 401 is as secret as a valid one: it is most often a real key with a
    // typo, or a key of another deployment, and the classic leak is logging it as "unknown key".
    for (what, secret) in [("client key", key.as_str()), ("key refused with 401", &near_miss), ("upstream key", &upstream_secret), ("admin token", &admin_token), ("prompt", &prompt)] {
        assert!(!log.contains(secret), "the log contains the {what}");
    }
    // Nor a recognisable piece of either key beyond its public prefix.
    assert!(!log.contains(&key[key.len() - 16..]), "the log contains the end of the client key");
    assert!(!log.contains(&near_miss[near_miss.len() - 16..]), "the log contains the end of the key refused with 401");
    shutdown.cancel();
}
