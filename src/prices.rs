//! `tollgate prices import` and `tollgate prices check`: flags, the file, the output. The
//! reading of price lists is `tollgate_core::price_import`; which rows they give the routes and
//! which routes lack a price is `tollgate_gateway::pricing`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use tollgate_core::price_import::{EntryOutcome, PRICE_LIST_BYTES_MAX, PriceList, PriceListFormat};
use tollgate_gateway::pricing::{DEFAULT_TIER, ImportOptions, ImportPlan, PlannedPrice, missing_prices, plan_import, tiers_in_use};
use tollgate_gateway::server::open_ledger;

/// Exit status of `prices check` when a routed model lacks a price (as `reconcile` with drift).
const EXIT_MISSING_PRICES: i32 = 3;

#[derive(Subcommand)]
pub enum PricesCommand {
    /// Import prices from OpenRouter's model list or LiteLLM's model price map. Per-token prices
    /// become per-million-token prices exactly; by default only the models the configuration
    /// routes are imported, under their client-facing names.
    Import {
        /// OpenRouter's `GET /api/v1/models` JSON, or LiteLLM's
        /// `model_prices_and_context_window.json`.
        file: PathBuf,
        /// The list's format; detected from the file when absent.
        #[arg(long, value_enum)]
        format: Option<FormatArgument>,
        /// Only the routes of this provider; with --all, the provider every entry is stored under.
        #[arg(long)]
        provider: Option<String>,
        /// The customer type (pricing tier) the prices are for.
        #[arg(long, default_value = DEFAULT_TIER)]
        customer_type: String,
        /// Import every priced entry of the list (each under its id), not only routed models.
        #[arg(long)]
        all: bool,
        /// Print what would be stored; write nothing (the ledger is not opened).
        #[arg(long)]
        dry_run: bool,
        /// TOML configuration file (routes, providers, database); TOLLGATE_* variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List every routed model without a price for a customer type in use (the accounts' types
    /// and "standard"); exit status 3 when one is missing.
    Check {
        /// TOML configuration file (routes, providers, database); TOLLGATE_* variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArgument {
    Openrouter,
    Litellm,
}

impl From<FormatArgument> for PriceListFormat {
    fn from(format: FormatArgument) -> PriceListFormat {
        match format {
            FormatArgument::Openrouter => PriceListFormat::OpenRouter,
            FormatArgument::Litellm => PriceListFormat::LiteLlm,
        }
    }
}

pub async fn run(command: PricesCommand) -> Result<()> {
    match command {
        PricesCommand::Import { file, format, provider, customer_type, all, dry_run, config } => {
            let options = ImportOptions { customer_type: &customer_type, provider: provider.as_deref(), all };
            import(&file, format.map(PriceListFormat::from), &options, dry_run, config.as_deref()).await
        }
        PricesCommand::Check { config } => {
            if !check(config.as_deref()).await? {
                std::process::exit(EXIT_MISSING_PRICES);
            }
            Ok(())
        }
    }
}

async fn import(file: &Path, format: Option<PriceListFormat>, options: &ImportOptions<'_>, dry_run: bool, config_path: Option<&Path>) -> Result<()> {
    let config = crate::load_config(config_path)?;
    config.validate().map_err(|error| anyhow::anyhow!("configuration: {error}"))?;
    let size = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
    if size > PRICE_LIST_BYTES_MAX as u64 {
        bail!("{} is {size} bytes, more than the {PRICE_LIST_BYTES_MAX} a price list may have", file.display());
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let format = format.unwrap_or_else(|| PriceListFormat::detect(&text));
    let list = PriceList::parse(&text, format).with_context(|| format!("reading {} as {format}", file.display()))?;
    print_list_summary(file, &list);
    let mut plan = plan_import(&config, &list, options)?;
    if !dry_run {
        let (ledger, _) = open_ledger(&config.database_url).await?;
        plan.set_aside_unchanged(&ledger.current_prices().await?);
        print_plan(&plan);
        if !plan.rows.is_empty() {
            let new_rows = plan.rows.iter().map(|planned| planned.row.clone()).collect();
            let stored = ledger.put_prices(new_rows).await?;
            debug_assert_eq!(stored.len(), plan.rows.len(), "every planned row is stored");
        }
        println!("stored {} price(s) for customer type {} ({} unchanged)", plan.rows.len(), options.customer_type, plan.unchanged.len());
        if config.database_url.starts_with("sqlite:") && !plan.rows.is_empty() {
            println!("a gateway already running on this SQLite ledger reads them at its next start (PostgreSQL gateways are notified at once)");
        }
    } else {
        print_plan(&plan);
        println!("dry run: {} price(s) would be stored for customer type {}; nothing was written", plan.rows.len(), options.customer_type);
    }
    Ok(())
}

fn print_list_summary(file: &Path, list: &PriceList) {
    let count = |wanted: fn(&EntryOutcome) -> bool| list.entries.iter().filter(|entry| wanted(&entry.outcome)).count();
    println!(
        "{}: {} list, {} entries ({} priced, {} skipped, {} with an invalid price)",
        file.display(),
        list.format,
        list.entries.len(),
        count(|outcome| matches!(outcome, EntryOutcome::Priced(_))),
        count(|outcome| matches!(outcome, EntryOutcome::Skipped(_))),
        count(|outcome| matches!(outcome, EntryOutcome::Rejected(_))),
    );
}

fn print_plan(plan: &ImportPlan) {
    if !plan.rows.is_empty() {
        print_price_table(&plan.rows);
    }
    if !plan.unchanged.is_empty() {
        let models: Vec<&str> = plan.unchanged.iter().map(|planned| planned.row.model.as_str()).collect();
        println!("unchanged (already the current price): {}", models.join(", "));
    }
    if !plan.unpriced_routes.is_empty() {
        println!("routed models the list does not price:");
        for route in &plan.unpriced_routes {
            println!("  {} (provider {}, looked up as {}): {}", route.model, route.provider, route.upstream_model, route.reason);
        }
    }
    if !plan.skipped_entries.is_empty() {
        println!("entries not imported:");
        for (id, reason) in &plan.skipped_entries {
            println!("  {id}: {reason}");
        }
    }
}

/// The rows as a table, prices per million tokens; "-" where a cache price is unset (charged
/// at the input price).
fn print_price_table(rows: &[PlannedPrice]) {
    let header = ["MODEL", "PROVIDER", "CUSTOMER_TYPE", "INPUT/MTOK", "OUTPUT/MTOK", "CACHED/MTOK", "CACHE_WRITE/MTOK", "PER_REQUEST", "FROM"];
    let optional = |money: Option<tollgate_core::Money>| money.map_or_else(|| "-".to_string(), |money| money.to_string());
    let lines: Vec<[String; 9]> = rows
        .iter()
        .map(|planned| {
            let row = &planned.row;
            [
                row.model.clone(),
                row.provider.clone(),
                row.customer_type.clone(),
                row.price.input_per_mtok.to_string(),
                row.price.output_per_mtok.to_string(),
                optional(row.price.cached_input_per_mtok),
                optional(row.price.cache_write_per_mtok),
                row.price.per_request.to_string(),
                planned.source_id.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let print_line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    print_line(header.to_vec());
    for line in &lines {
        print_line(line.iter().map(String::as_str).collect());
    }
}

/// Prints every missing (model, customer type); false when there is one.
async fn check(config_path: Option<&Path>) -> Result<bool> {
    let config = crate::load_config(config_path)?;
    config.validate().map_err(|error| anyhow::anyhow!("configuration: {error}"))?;
    let (ledger, _) = open_ledger(&config.database_url).await?;
    let tiers = tiers_in_use(&*ledger).await?;
    let missing = missing_prices(&config.models, &ledger.current_prices().await?, &tiers);
    let tier_names: Vec<&str> = tiers.iter().map(String::as_str).collect();
    println!("{} routed model(s), customer types in use: {}", config.models.len(), tier_names.join(", "));
    if missing.is_empty() {
        println!("every routed model has a price for every customer type in use");
        return Ok(true);
    }
    let model_width = missing.iter().map(|gap| gap.model.chars().count()).max().unwrap_or(0).max("MODEL".len());
    let provider_width = missing.iter().map(|gap| gap.provider.chars().count()).max().unwrap_or(0).max("PROVIDER".len());
    println!("{:<model_width$}  {:<provider_width$}  CUSTOMER_TYPE", "MODEL", "PROVIDER");
    for gap in &missing {
        println!("{:<model_width$}  {:<provider_width$}  {}", gap.model, gap.provider, gap.customer_type);
    }
    println!("{} price(s) missing: requests for these are refused with price_not_configured", missing.len());
    Ok(false)
}
