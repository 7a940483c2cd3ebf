//! The `tollgate` binary: parses flags and configuration, then hands over to the crates.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::server::{Gateway, bind};

mod prices;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "LLM API gateway with real-time prepaid billing and quotas")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with the worker in-process).
    Serve {
        /// TOML configuration file; TOLLGATE_* variables override it.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Also run a mock upstream with a demo account, key and prices (works offline).
        #[arg(long)]
        demo: bool,
        /// Listen address (overrides TOLLGATE_LISTEN and the file).
        #[arg(long)]
        listen: Option<String>,
        /// Do not run the usage writer and periodic jobs here (`tollgate worker` processes do;
        /// services mode only).
        #[arg(long)]
        no_worker: bool,
    },
    /// Run only the worker (stream consumer and periodic jobs) — production backends only.
    Worker {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Apply the database migrations and exit.
    /// Prints the OpenAPI 3.1 description of the client and operator APIs (what
    /// `GET /openapi.json` serves; docs/openapi.json is this output).
    Openapi,
    Migrate {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Compare every account's ledger rows, account_balance and hot-store balance; report each
    /// drift (exit status 3 when one is left unrepaired).
    Reconcile {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Repair what drifted (account_balance from the ledger; the hot store when quiet), each
        /// repair recorded in the ledger.
        #[arg(long)]
        fix: bool,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prove, once the system is quiet, that nothing was lost or doubled and every balance
    /// agrees (I1–I4), reading the ledger and the hot store only; exit status 3 when not.
    Verify {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// A file of `ACCOUNT_ID REQUEST_ID [EXPECTED_COST]` lines: requests clients saw served,
        /// each of which must have its charge in the ledger (the `lost` count), at the cost
        /// given when there is one (the `wrong amount` count).
        #[arg(long)]
        charged: Option<std::path::PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move old months of usage rows out of the ledger: each month before `--before` goes to
    /// `OUT/usage_log-YYYY-MM.csv` (with a manifest), is read back and checked against the ledger
    /// (row count, Σ cost), then dropped; per-account runs keep every balance provable
    /// (docs/RETENTION.md).
    Archive {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// The first month kept (YYYY-MM): every month before it is archived. Each must have
        /// ended at least limits.replay_window_ms ago.
        #[arg(long)]
        before: String,
        /// The directory the files go to (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Print what was archived as JSON.
        #[arg(long)]
        json: bool,
        /// List the months that would be archived (rows, Σ cost) and stop: no file written,
        /// nothing dropped.
        #[arg(long)]
        dry_run: bool,
    },
    /// Price lists: import OpenRouter's or LiteLLM's; list routed models without a price.
    Prices {
        #[command(subcommand)]
        command: prices::PricesCommand,
    },
    /// Run the deterministic OpenAI- and Anthropic-compatible mock upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
        /// Delay before the first byte of every response.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Tokens generated per response unless the request caps it.
        #[arg(long, default_value_t = 16)]
        output_tokens: u64,
        /// Delay between streamed chunks.
        #[arg(long, default_value_t = 0)]
        chunk_interval_ms: u64,
    },
}

/// The configuration file, then `TOLLGATE_*` variables over it.
fn load_config(path: Option<&std::path::Path>) -> Result<GatewayConfig> {
    let mut config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => GatewayConfig::default(),
    };
    if let Ok(listen) = std::env::var("TOLLGATE_LISTEN") {
        config.listen = listen;
    }
    if let Ok(listen) = std::env::var("TOLLGATE_INTERNAL_LISTEN") {
        config.internal_listen = Some(listen).filter(|listen| !listen.is_empty());
    }
    if let Ok(token) = std::env::var("TOLLGATE_ADMIN_TOKEN") {
        config.admin_token = Some(token);
    }
    if let Ok(url) = std::env::var("TOLLGATE_DATABASE_URL") {
        config.database_url = url;
    }
    if let Ok(url) = std::env::var("TOLLGATE_REDIS_URL") {
        config.redis_url = Some(url).filter(|url| !url.is_empty());
    }
    if let Ok(prefix) = std::env::var("TOLLGATE_REDIS_PREFIX") {
        config.redis_prefix = prefix;
    }
    if let Ok(url) = std::env::var("TOLLGATE_ALERT_WEBHOOK_URL") {
        config.alerts.webhook_url = Some(url).filter(|url| !url.is_empty());
    }
    if let Ok(secret) = std::env::var("TOLLGATE_ALERT_WEBHOOK_SECRET") {
        config.alerts.webhook_secret = Some(secret).filter(|secret| !secret.is_empty());
    }
    if let Ok(name) = std::env::var("TOLLGATE_WORKER_NAME") {
        config.worker_name = name;
    }
    if let Ok(check) = std::env::var("TOLLGATE_PRICING_CHECK") {
        config.pricing_check = check.parse().map_err(|error: String| anyhow::anyhow!("TOLLGATE_PRICING_CHECK: {error}"))?;
    }
    Ok(config)
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
        tracing::info!("shutting down");
        trigger.cancel();
    });
    token
}

async fn serve(config_path: Option<&std::path::Path>, demo: bool, listen: Option<String>, no_worker: bool) -> Result<()> {
    let mut config = load_config(config_path)?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if no_worker {
        if config.redis_url.is_none() {
            bail!("--no-worker needs TOLLGATE_REDIS_URL: in embedded mode the worker is this process");
        }
        config.run_worker = false;
    }
    let shutdown = shutdown_on_signal();
    if demo {
        let mock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the demo mock upstream")?;
        let mock_address = mock_listener.local_addr()?;
        let mock_shutdown = shutdown.clone();
        tokio::spawn(tollgate_mock::serve(mock_listener, tollgate_mock::MockConfig::default(), async move {
            mock_shutdown.cancelled().await;
        }));
        tollgate_gateway::demo::configure(&mut config, &format!("http://{mock_address}/v1"));
        if config.admin_token.is_none() {
            config.admin_token = Some(format!("tgadmin_{}", uuid::Uuid::new_v4().simple()));
        }
    }
    if !demo && config.internal_listen.is_none() {
        tracing::warn!(listen = %config.listen, "the operator API (/internal) and /metrics share the public listener: set internal_listen (TOLLGATE_INTERNAL_LISTEN) to an address only operators reach (README \"Security\")");
    }
    let listener = bind(&config.listen).await?;
    let address = listener.local_addr()?;
    let internal_listener = match &config.internal_listen {
        Some(internal) => Some(bind(internal).await?),
        None => None,
    };
    let internal_address = internal_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let admin_token = config.admin_token.clone();
    let gateway = Gateway::start(config).await?;
    let demo_key = if demo {
        let fixed_key = std::env::var("TOLLGATE_DEMO_KEY").ok().filter(|key| !key.is_empty());
        Some(tollgate_gateway::demo::seed(&gateway.state, fixed_key).await.map_err(|error| anyhow::anyhow!("{error}"))?)
    } else {
        None
    };
    // After the demo seeded its prices, before the first request (`pricing_check`).
    if let Err(error) = gateway.check_prices().await {
        gateway.shutdown().await;
        return Err(error.into());
    }
    match demo_key {
        Some(key) => {
            println!("Tollgate demo is running on http://{address}");
            println!("demo key:    {key}");
            if let Some(token) = admin_token {
                println!("admin token: {token}");
            }
            println!("try:\n  curl -s http://{address}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"model\":\"demo-gpt\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'");
            println!("  curl -s http://{address}/v1/balance -H 'Authorization: Bearer {key}'");
        }
        None => println!("Tollgate listening on http://{address}"),
    }
    match internal_address {
        // The operator area needs /internal on the same origin as the page.
        Some(internal) => {
            println!("operator API (/internal, /metrics) on http://{internal}");
            println!("console: http://{address}/console/ (customer area), http://{internal}/console/ (operator area)");
        }
        None => println!("console:     http://{address}/console/ (log in with the admin token or a client key)"),
    }
    gateway.serve_split(listener, internal_listener, shutdown).await?;
    Ok(())
}

fn print_reconciliation(run: &tollgate_store::operations::ReconciliationRun) {
    println!(
        "reconciliation run {}: hot store {}, {} accounts checked, {} busy, {} drifts (total {}), {} accounts repaired",
        run.id, run.report["hot_store"].as_str().unwrap_or("?"), run.accounts_checked, run.accounts_busy, run.drifts_found, run.total_drift, run.accounts_repaired
    );
    for drift in run.report["drifts"].as_array().into_iter().flatten() {
        let status = if drift["repaired"] == true { "repaired".to_string() } else { drift["unrepaired_because"].as_str().unwrap_or("not repaired").to_string() };
        println!(
            "  {:<40} {:<15} found {:>20} expected {:>20} drift {:>20}  {status}",
            drift["account_id"].as_str().unwrap_or(""), drift["kind"].as_str().unwrap_or(""),
            drift["found"].as_str().unwrap_or(""), drift["expected"].as_str().unwrap_or(""), drift["amount"].as_str().unwrap_or("")
        );
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `{:#}`: the error and its causes on one line, never a backtrace (which `Result` from
    // `main` prints whenever RUST_BACKTRACE is set, burying the message).
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, demo, listen, no_worker } => serve(config.as_deref(), demo, listen, no_worker).await,
        Command::Worker { config } => {
            let config = load_config(config.as_deref())?;
            tollgate_gateway::server::run_worker(config, shutdown_on_signal()).await?;
            Ok(())
        }
        Command::Openapi => {
            print!("{}", tollgate_gateway::openapi::description_json());
            Ok(())
        }
        Command::Migrate { config } => {
            let config = load_config(config.as_deref())?;
            tollgate_gateway::server::migrate(&config.database_url).await?;
            println!("migrations applied to {}", tollgate_gateway::config::redact_url_password(&config.database_url));
            Ok(())
        }
        Command::Reconcile { config, fix, json } => {
            let config = load_config(config.as_deref())?;
            let run = tollgate_gateway::server::reconcile(&config, fix).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print_reconciliation(&run);
            }
            let unrepaired = run.report["drifts"].as_array().is_some_and(|drifts| drifts.iter().any(|drift| drift["repaired"] != true));
            if unrepaired || run.drifts_found > run.report["drifts"].as_array().map_or(0, |drifts| drifts.len() as u64) {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Verify { config, charged, json } => {
            let config = load_config(config.as_deref())?;
            let charged = match charged {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    Some(tollgate_worker::verify::parse_charged_list(&text).map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?)
                }
                None => None,
            };
            let report = tollgate_gateway::server::verify(&config, charged.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            if !report.is_sound() {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Archive { config, before, out, json, dry_run } => {
            let config_given = config.is_some();
            let config = load_config(config.as_deref())?;
            // The window is the gateway's: give its configuration, or months it still replays
            // from may go.
            eprintln!(
                "archiving the months before {before} that ended at least limits.replay_window_ms = {} ms ago{}",
                config.limits.replay_window_ms,
                if config_given { "" } else { " (the default: no --config given)" }
            );
            if dry_run {
                let planned = tollgate_gateway::server::archive_plan(&config, &before).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&planned)?);
                } else {
                    println!("{:<8} {:>12} {:>24}  (dry run: nothing written, nothing dropped; files would go to {})", "month", "rows", "cost", out.display());
                    for month in &planned {
                        println!("{:<8} {:>12} {:>24}", month.month, month.usage_rows, month.cost.to_string());
                    }
                }
                return Ok(());
            }
            let archived = tollgate_gateway::server::archive(&config, &before, &out).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&archived)?);
            } else if archived.is_empty() {
                println!("no usage rows before {before}: nothing archived");
            } else {
                println!("{:<8} {:>12} {:>24} {:>9} {:>9}  file", "month", "rows", "cost", "accounts", "runs");
                for month in &archived {
                    println!("{:<8} {:>12} {:>24} {:>9} {:>9}  {}", month.month, month.usage_rows, month.cost.to_string(), month.accounts, month.runs, month.file.display());
                }
            }
            Ok(())
        }
        Command::Prices { command } => prices::run(command).await,
        Command::MockUpstream { listen, latency_ms, output_tokens, chunk_interval_ms } => {
            let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
            println!("mock upstream listening on http://{}", listener.local_addr()?);
            let shutdown = shutdown_on_signal();
            let config = tollgate_mock::MockConfig { latency_ms, output_tokens, chunk_interval_ms, ..tollgate_mock::MockConfig::default() };
            tollgate_mock::serve(listener, config, async move { shutdown.cancelled().await }).await?;
            Ok(())
        }
    }
}
