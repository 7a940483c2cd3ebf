//! Redis killed under load, in the default mode: every request is refused 503
//! `billing_unavailable`, nothing reaches the upstream unbilled, nothing is charged; once Redis
//! is back (AOF on) the gateway serves again and the books agree to the unit (I2).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

/// A Redis of the test's own (AOF on, as in production), so it can be killed and restarted.
struct OwnRedis {
    port: u16,
    dir: TempDir,
    child: tokio::process::Child,
}

impl OwnRedis {
    async fn start(port: u16, dir: TempDir) -> OwnRedis {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(["--maxmemory-policy", "noeviction", "--dir", dir.0.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let redis = OwnRedis { port, dir, child };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then a restart on the same port and directory (it reloads its AOF).
    async fn kill(mut self) -> (u16, TempDir) {
        self.child.kill().await.unwrap();
        (self.port, self.dir)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_refuses_with_503_and_charges_nothing_then_recovers_exactly() {
    let redis = OwnRedis::start(free_port(), TempDir::new()).await;
    let database_url = fresh_postgres_database().await;
    let redis_url = redis.url();
    let gateway = TestGateway::start_on(TempDir::new(), database_url, |config| {
        config.redis_url = Some(redis_url.clone());
        config.redis_prefix = unique_name("t");
    })
    .await;
    let account = gateway.account("1", json!({})).await;
    let key = gateway.key(&account, json!({})).await;
    let mut charged = Money::ZERO;
    for _ in 0..5 {
        let response = gateway.chat(&key, chat_body("before the fault"), None).await;
        assert_eq!(response.status(), 200);
        charged = charged.checked_add(header_money(&response, "x-tollgate-cost")).unwrap();
    }
    gateway.assert_ledger_sound(&account).await;
    let forwarded_before = gateway.upstream_requests().await;

    let (port, dir) = redis.kill().await;
    for index in 0..10 {
        let mut body = chat_body("during the fault");
        body["stream"] = json!(index % 2 == 1);
        let response = gateway.chat(&key, body, None).await;
        assert_eq!(response.status(), 503, "Redis down: refused, never served unbilled");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "billing_unavailable");
    }
    assert_eq!(gateway.upstream_requests().await, forwarded_before, "nothing reached the upstream without a hold");

    let redis = OwnRedis::start(port, dir).await;
    // The connection comes back on its own; the first requests may still find it reconnecting.
    let mut served = None;
    for _ in 0..100 {
        let response = gateway.chat(&key, chat_body("after the fault"), None).await;
        if response.status() == 200 {
            served = Some(response);
            break;
        }
        assert_eq!(response.status(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = served.expect("the gateway serves again within 10 s of Redis returning");
    charged = charged.checked_add(header_money(&served, "x-tollgate-cost")).unwrap();

    // The books: exactly the six served requests, nothing for the refused ones (I2 exact).
    let statement = gateway.assert_ledger_sound(&account).await;
    let usage: Vec<&Value> = statement["rows"].as_array().unwrap().iter().filter(|row| row["kind"] == "usage" && row["status"] != "failed").collect();
    assert_eq!(usage.len(), 6, "{statement}");
    assert_eq!(gateway.balance_of(&key).await, Money::from_nanos(1_000_000_000).checked_sub(charged).unwrap());
    gateway.stop().await;
    drop(redis);
}
