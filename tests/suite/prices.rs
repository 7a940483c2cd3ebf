//! `tollgate prices import` and `tollgate prices check`, run as the binary against a fresh ledger
//! (SQLite, or PostgreSQL under `TOLLGATE_TEST_LEDGER=postgres`): both published formats
//! imported exactly, by route, per tier; the gaps named exactly; `pricing_check = "refuse"`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tollgate_core::{Money, Price};
use tollgate_store::Ledger;
use tollgate_store::model::{AccountKind, NewAccount};

use crate::common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prices").join(name)
}

const PROVIDERS: &str = r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"

[[providers]]
name = "openrouter"
kind = "openai"
base_url = "https://openrouter.ai/api/v1"
"#;

/// (client-facing model, provider, upstream model).
const ROUTES: [(&str, &str, &str); 8] = [
    ("gpt-4o", "openai", "gpt-4o"),
    ("embed-small", "openai", "text-embedding-3-small"),
    ("unlisted", "openai", "o9-preview"),
    ("claude-sonnet", "anthropic", "claude-sonnet-4-20250514"),
    ("router-4o", "openrouter", "openai/gpt-4o"),
    ("router-sonnet", "openrouter", "anthropic/claude-sonnet-4"),
    ("router-sonar", "openrouter", "perplexity/sonar"),
    ("router-embed", "openrouter", "openai/text-embedding-3-small"),
];

fn write_config(path: &Path, database_url: &str, routes: &[(&str, &str, &str)]) {
    let mut text = format!("{}database_url = \"{database_url}\"\n{PROVIDERS}", backend_toml());
    for (model, provider, upstream_model) in routes {
        text.push_str(&format!("\n[[models]]\nmodel = \"{model}\"\nprovider = \"{provider}\"\nupstream_model = \"{upstream_model}\"\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn price(input: &str, output: &str, cached: Option<&str>, cache_write: Option<&str>, per_request: &str) -> Price {
    let money = |text: &str| Money::parse_non_negative(text).unwrap();
    Price { input_per_mtok: money(input), output_per_mtok: money(output), cached_input_per_mtok: cached.map(money), cache_write_per_mtok: cache_write.map(money), per_request: money(per_request) }
}

/// (model, provider, customer type) of each line of `prices check`'s table.
fn missing_pairs(stdout: &str) -> BTreeSet<(String, String, String)> {
    stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.len() == 3 && cells[0] != "MODEL")
        .map(|cells| (cells[0].to_string(), cells[1].to_string(), cells[2].to_string()))
        .collect()
}

fn pairs(expected: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    expected.iter().map(|(model, provider, tier)| (model.to_string(), provider.to_string(), tier.to_string())).collect()
}

async fn create_account(ledger: &dyn Ledger, id: &str, customer_type: &str) {
    let account = NewAccount { id: id.into(), kind: AccountKind::User, name: id.into(), customer_type: customer_type.into(), credit_limit: Money::ZERO, daily_request_quota: None, monthly_request_quota: None, low_balance_threshold: None };
    ledger.create_account(account).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_lists_are_imported_exactly_and_gaps_are_named() {
    let dir = TempDir::new();
    let database_url = test_database_url(&dir).await;
    let config_path = dir.0.join("tollgate.toml");
    write_config(&config_path, &database_url, &ROUTES);
    let config = config_path.to_str().unwrap();
    let litellm = fixture("litellm_prices.json");
    let litellm = litellm.to_str().unwrap();
    let openrouter = fixture("openrouter_models.json");
    let openrouter = openrouter.to_str().unwrap();

    // A fresh ledger: no account, so only the default tier, and every route is missing.
    let (status, stdout, _) = tollgate(&["prices", "check", "--config", config], &[]).await;
    assert_eq!(status, 3, "{stdout}");
    assert_eq!(missing_pairs(&stdout), ROUTES.iter().map(|(model, provider, _)| (model.to_string(), provider.to_string(), "standard".to_string())).collect());

    // A dry run prints the table (LiteLLM's gpt-4o also prices the OpenRouter route to
    // openai/gpt-4o, its vendor prefix dropped) and writes nothing.
    let (status, stdout, stderr) = tollgate(&["prices", "import", litellm, "--config", config, "--dry-run"], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("litellm list, 6 entries (4 priced, 2 skipped, 0 with an invalid price)"), "{stdout}");
    assert!(stdout.contains("dry run: 5 price(s) would be stored for customer type standard; nothing was written"), "{stdout}");
    let table_line = stdout.lines().find(|line| line.starts_with("claude-sonnet ")).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(table_line.split_whitespace().collect::<Vec<_>>(), ["claude-sonnet", "anthropic", "standard", "3", "15", "0.3", "3.75", "0", "claude-sonnet-4-20250514"]);
    assert!(stdout.contains("router-4o "), "{stdout}");
    assert!(stdout.contains("  unlisted (provider openai, looked up as o9-preview): not in the list"), "{stdout}");
    assert!(stdout.contains("  router-sonnet (provider openrouter, looked up as anthropic/claude-sonnet-4): not in the list"), "{stdout}");
    let (ledger, _) = tollgate_gateway::server::open_ledger(&database_url).await.unwrap();
    assert!(ledger.current_prices().await.unwrap().is_empty(), "a dry run stores nothing");

    // LiteLLM for the openai routes (standard) and the anthropic route (premium); OpenRouter,
    // its format detected, for the openrouter routes.
    let (status, stdout, stderr) = tollgate(&["prices", "import", litellm, "--config", config, "--provider", "openai"], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("stored 2 price(s) for customer type standard (0 unchanged)"), "{stdout}");
    let (status, stdout, stderr) = tollgate(&["prices", "import", litellm, "--config", config, "--provider", "anthropic", "--customer-type", "premium", "--format", "litellm"], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("stored 1 price(s) for customer type premium (0 unchanged)"), "{stdout}");
    let (status, stdout, stderr) = tollgate(&["prices", "import", openrouter, "--config", config, "--provider", "openrouter"], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("openrouter list, 6 entries (4 priced, 1 skipped, 1 with an invalid price)"), "{stdout}");
    assert!(stdout.contains("stored 4 price(s) for customer type standard (0 unchanged)"), "{stdout}");

    let mut stored: Vec<(String, String, String, Price)> = ledger.current_prices().await.unwrap().into_iter().map(|row| (row.provider, row.model, row.customer_type, row.price)).collect();
    stored.sort_by(|left, right| (&left.0, &left.1, &left.2).cmp(&(&right.0, &right.1, &right.2)));
    let expected = [
        ("anthropic", "claude-sonnet", "premium", price("3", "15", Some("0.3"), Some("3.75"), "0")),
        ("openai", "embed-small", "standard", price("0.02", "0", None, None, "0")),
        ("openai", "gpt-4o", "standard", price("2.5", "10", Some("1.25"), None, "0")),
        ("openrouter", "router-4o", "standard", price("2.5", "10", Some("1.25"), None, "0")),
        ("openrouter", "router-embed", "standard", price("0.02", "0", None, None, "0")),
        ("openrouter", "router-sonar", "standard", price("1", "1", None, None, "0.005")),
        ("openrouter", "router-sonnet", "standard", price("3", "15", Some("0.3"), Some("3.75"), "0")),
    ]
    .map(|(provider, model, tier, price)| (provider.to_string(), model.to_string(), tier.to_string(), price));
    assert_eq!(stored, expected);

    // The same list again changes nothing and adds no history.
    let (status, stdout, _) = tollgate(&["prices", "import", litellm, "--config", config, "--provider", "openai"], &[]).await;
    assert_eq!(status, 0);
    assert!(stdout.contains("stored 0 price(s) for customer type standard (2 unchanged)"), "{stdout}");
    assert_eq!(ledger.current_prices().await.unwrap().len(), 7);

    // Tiers in use: the accounts' (premium, standard). Exactly the unpriced pairs, status 3.
    create_account(&*ledger, "acme", "premium").await;
    create_account(&*ledger, "bob", "standard").await;
    let (status, stdout, _) = tollgate(&["prices", "check", "--config", config], &[]).await;
    assert_eq!(status, 3, "{stdout}");
    assert!(stdout.contains("8 routed model(s), customer types in use: premium, standard"), "{stdout}");
    let expected_missing = pairs(&[
        ("gpt-4o", "openai", "premium"),
        ("embed-small", "openai", "premium"),
        ("unlisted", "openai", "premium"),
        ("unlisted", "openai", "standard"),
        ("claude-sonnet", "anthropic", "standard"),
        ("router-4o", "openrouter", "premium"),
        ("router-sonnet", "openrouter", "premium"),
        ("router-sonar", "openrouter", "premium"),
        ("router-embed", "openrouter", "premium"),
    ]);
    assert_eq!(missing_pairs(&stdout), expected_missing, "{stdout}");
    assert!(stdout.contains("9 price(s) missing"), "{stdout}");

    // pricing_check = "refuse" (here through its variable): serve names the gaps and exits.
    let (status, stdout, stderr) = tollgate(&["serve", "--config", config, "--listen", "127.0.0.1:0"], &[("TOLLGATE_PRICING_CHECK", "refuse")]).await;
    assert_ne!(status, 0, "{stdout}\n{stderr}");
    assert!(stderr.contains("pricing_check = \"refuse\": 9 routed model price(s) missing"), "{stderr}");
    assert!(stderr.contains("openai:unlisted for customer type standard"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");

    // With every gap priced, the check passes.
    let complete_routes: Vec<(&str, &str, &str)> = ROUTES.iter().copied().filter(|(model, ..)| ["gpt-4o", "router-sonar"].contains(model)).collect();
    let complete_path = dir.0.join("complete.toml");
    write_config(&complete_path, &database_url, &complete_routes);
    let complete = complete_path.to_str().unwrap();
    for provider in ["openai", "openrouter"] {
        let list = if provider == "openai" { litellm } else { openrouter };
        let (status, stdout, stderr) = tollgate(&["prices", "import", list, "--config", complete, "--provider", provider, "--customer-type", "premium"], &[]).await;
        assert_eq!(status, 0, "{stdout}\n{stderr}");
    }
    let (status, stdout, _) = tollgate(&["prices", "check", "--config", complete], &[]).await;
    assert_eq!(status, 0, "{stdout}");
    assert!(stdout.contains("every routed model has a price for every customer type in use"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_price_of_a_routed_model_stores_nothing() {
    let dir = TempDir::new();
    let database_url = test_database_url(&dir).await;
    let config_path = dir.0.join("tollgate.toml");
    write_config(&config_path, &database_url, &[("router-4o", "openrouter", "openai/gpt-4o"), ("auto", "openrouter", "openrouter/auto")]);
    let config = config_path.to_str().unwrap();
    let openrouter = fixture("openrouter_models.json");
    let openrouter = openrouter.to_str().unwrap();

    let (status, stdout, stderr) = tollgate(&["prices", "import", openrouter, "--config", config], &[]).await;
    assert_eq!(status, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("openrouter/auto: prompt = -1 is negative"), "{stderr}");
    assert!(stderr.contains("nothing was stored"), "{stderr}");
    let (ledger, _) = tollgate_gateway::server::open_ledger(&database_url).await.unwrap();
    assert!(ledger.current_prices().await.unwrap().is_empty());

    // --all lists what it leaves out and why; a dry run writes nothing.
    let (status, stdout, stderr) = tollgate(&["prices", "import", openrouter, "--config", config, "--all", "--dry-run"], &[]).await;
    assert_eq!(status, 1, "--all without --provider: {stdout}\n{stderr}");
    assert!(stderr.contains("--all needs --provider"), "{stderr}");
    let mut only_priced = config_path.clone();
    only_priced.set_file_name("only-priced.toml");
    write_config(&only_priced, &database_url, &[("router-4o", "openrouter", "openai/gpt-4o")]);
    let (status, stdout, stderr) = tollgate(&["prices", "import", openrouter, "--config", only_priced.to_str().unwrap(), "--all", "--provider", "openrouter", "--dry-run"], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("  openrouter/auto: prompt = -1 is negative"), "{stdout}");
    assert!(stdout.contains("  example/image-only: no prompt price"), "{stdout}");
    assert!(stdout.contains("dry run: 5 price(s) would be stored"), "router-4o and the four priced entries by id: {stdout}");
    assert!(ledger.current_prices().await.unwrap().is_empty());
}
