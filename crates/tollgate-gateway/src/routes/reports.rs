//! What the operator API and a key holder read about an account: its live balance, its
//! statement, and its usage totalled by day, model or key. Written once; the operator's routes
//! name the account, the client's are the caller's own.

use axum::Json;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tollgate_core::Money;
use tollgate_store::hot::BalanceView;
use tollgate_store::model::{Account, LedgerEntry, SummaryGroup, SummaryQuery};

use crate::charge;
use crate::error::ApiError;
use crate::openapi::{AccountView, SummaryPage};
use crate::routes::admin::{csv_field, rfc3339};
use crate::routes::time_param;
use crate::state::AppState;

/// The currency every amount is in (the ledger keeps one).
pub const CURRENCY: &str = "USD";

/// The account's balance, holds and counters as the hot store has them (the account loaded
/// into it first when it is not there), with the key's spend when `key_id` is not empty.
///
/// # Errors
/// The hot store or the ledger cannot be read.
pub async fn live_balance(state: &AppState, account_id: &str, key_id: &str) -> Result<BalanceView, ApiError> {
    if let Some(view) = state.hot.balance(account_id, key_id).await? {
        return Ok(view);
    }
    charge::load_account(state, account_id).await?;
    state.hot.balance(account_id, key_id).await?.ok_or_else(|| ApiError::BillingUnavailable(format!("account {account_id} could not be loaded into the hot store")))
}

/// What the account may still spend: balance + credit − held.
///
/// # Errors
/// `Internal` when the sum does not fit (the ledger's bounds keep it from happening).
pub fn available(view: &BalanceView, account: &Account) -> Result<Money, ApiError> {
    view.balance
        .checked_add(account.credit_limit)
        .and_then(|total| total.checked_sub(view.held))
        .ok_or_else(|| ApiError::Internal("available balance overflow".into()))
}

/// An account as the operator API shows it: its fields, its live balance, held and available,
/// the ledger's balance and the request counters.
///
/// # Errors
/// As [`live_balance`].
pub async fn account_view(state: &AppState, account: &Account) -> Result<AccountView, ApiError> {
    let live = live_balance(state, &account.id, "").await?;
    let ledger = state.ledger.account_balance(&account.id).await?.ok_or_else(|| ApiError::Internal(format!("account {} has no balance row", account.id)))?;
    Ok(AccountView {
        account: account.clone(),
        balance: live.balance,
        held: live.held,
        available: available(&live, account)?,
        ledger_balance: ledger.balance,
        currency: CURRENCY.into(),
        daily_requests_used: live.daily_requests_used,
        monthly_requests_used: live.monthly_requests_used,
    })
}

/// RFC 3339 text of `days` days before the gateway's clock.
pub fn days_before(state: &AppState, days: i64) -> String {
    rfc3339(state.now() - time::Duration::days(days))
}

/// The query of a statement.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementParams {
    pub start: Option<String>,
    pub end: Option<String>,
    pub format: Option<String>,
}

/// Fund and usage rows of the account in ledger order, within `[start, end)`, as JSON or CSV.
///
/// # Errors
/// Bad times or format; the ledger cannot be read.
pub async fn statement(state: &AppState, account_id: &str, params: StatementParams) -> Result<Response, ApiError> {
    let start = time_param("start", params.start.as_deref())?;
    let end = time_param("end", params.end.as_deref())?;
    let format = params.format.unwrap_or_else(|| "json".into());
    if format != "json" && format != "csv" {
        return Err(ApiError::InvalidRequest(format!("format must be json or csv, not {format}")));
    }
    let entries = state.ledger.statement(account_id, start, end).await?;
    let opening = entries.first().map_or(Money::ZERO, LedgerEntry::balance_before);
    let closing = entries.last().map_or(opening, LedgerEntry::balance_after);
    let rows: Vec<Value> = entries.iter().map(statement_row).collect();
    if format == "json" {
        return Ok(Json(json!({"account_id": account_id, "opening_balance": opening, "closing_balance": closing, "rows": rows})).into_response());
    }
    let mut csv = CSV_COLUMNS.join(",");
    csv.push('\n');
    for row in &rows {
        let reference = if row["kind"] == "usage" { &row["request_id"] } else { &row["reference_id"] };
        let fields: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|column| if *column == "reference" { csv_field(reference) } else { csv_field(&row[*column]) })
            .collect();
        csv.push_str(&fields.join(","));
        csv.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response())
}

/// Groups per summary page by default and at most.
const SUMMARY_GROUPS_DEFAULT: u32 = 1_000;
pub const SUMMARY_GROUPS_MAX: u32 = 10_000;

/// The query of a usage summary.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SummaryParams {
    pub account_id: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    /// One to three distinct dimensions joined by commas: `day`, `model`, `key`.
    pub group_by: Option<String>,
    pub limit: Option<u32>,
    /// Groups to skip: the previous page's `next_cursor`.
    pub cursor: Option<u64>,
}

/// `day,model` as the dimensions it names, each once; `model` when absent.
///
/// # Errors
/// `InvalidRequest` naming what is accepted.
pub fn group_by_param(text: Option<&str>) -> Result<Vec<SummaryGroup>, ApiError> {
    let Some(text) = text else { return Ok(vec![SummaryGroup::Model]) };
    let accepted = || SummaryGroup::ALL.map(SummaryGroup::as_str).join(", ");
    let mut groups = Vec::new();
    for name in text.split(',').map(str::trim) {
        let group = SummaryGroup::ALL
            .into_iter()
            .find(|group| group.as_str() == name)
            .ok_or_else(|| ApiError::InvalidRequest(format!("group_by takes one or more of {} joined by commas, not {name:?}", accepted())))?;
        if groups.contains(&group) {
            return Err(ApiError::InvalidRequest(format!("group_by names {name} twice")));
        }
        groups.push(group);
    }
    Ok(groups)
}

/// One page of usage totals, in the grouping's order, with the cursor of the next page when
/// this one is full. `account_id` overrides the parameter's (a key holder's own account).
///
/// # Errors
/// Bad parameters; the ledger cannot be read.
pub async fn summary_page(state: &AppState, params: SummaryParams, account_id: Option<String>) -> Result<SummaryPage, ApiError> {
    let group_by = group_by_param(params.group_by.as_deref())?;
    let limit = params.limit.unwrap_or(SUMMARY_GROUPS_DEFAULT).clamp(1, SUMMARY_GROUPS_MAX);
    let offset = params.cursor.unwrap_or(0);
    let query = SummaryQuery {
        account_id: account_id.or(params.account_id),
        start: time_param("start", params.start.as_deref())?,
        end: time_param("end", params.end.as_deref())?,
        group_by: group_by.clone(),
        limit,
        offset,
    };
    let rows = state.ledger.summary(query).await?;
    let next_cursor = (rows.len() == limit as usize).then(|| offset + u64::from(limit));
    let group_by: Vec<&str> = group_by.iter().map(|group| group.as_str()).collect();
    Ok(SummaryPage { object: "list".into(), group_by: group_by.join(","), data: rows, next_cursor })
}

/// Every model's totals within `[start, end)`, however many pages they take.
///
/// # Errors
/// The ledger cannot be read.
pub async fn totals_by_model(state: &AppState, account_id: &str, start: OffsetDateTime, end: OffsetDateTime) -> Result<Vec<tollgate_store::model::SummaryRow>, ApiError> {
    let mut rows = Vec::new();
    loop {
        let query = SummaryQuery {
            account_id: Some(account_id.to_string()),
            start: Some(start),
            end: Some(end),
            group_by: vec![SummaryGroup::Model],
            limit: SUMMARY_GROUPS_MAX,
            offset: rows.len() as u64,
        };
        let page = state.ledger.summary(query).await?;
        let full = page.len() == SUMMARY_GROUPS_MAX as usize;
        rows.extend(page);
        if !full {
            return Ok(rows);
        }
    }
}

const CSV_COLUMNS: [&str; 13] = [
    "ledger_seq", "kind", "amount", "balance_before", "balance_after", "reference", "created_at", "model",
    "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "usage_source",
];

fn statement_row(entry: &LedgerEntry) -> Value {
    match entry {
        LedgerEntry::Fund(fund) => json!({
            "kind": fund.kind.as_str(),
            "ledger_seq": fund.ledger_seq,
            "amount": fund.amount,
            "balance_before": fund.balance_before,
            "balance_after": fund.balance_after,
            "reference_id": fund.reference_id,
            "reason": fund.reason,
            "operator_id": fund.operator_id,
            "created_at": rfc3339(fund.created_at),
        }),
        LedgerEntry::Usage(usage) => json!({
            "kind": "usage",
            "ledger_seq": usage.ledger_seq,
            "amount": Money::ZERO.checked_sub(usage.cost),
            "balance_before": usage.balance_before,
            "balance_after": usage.balance_after,
            "request_id": usage.request_id,
            "api_key_id": usage.api_key_id,
            "provider": usage.provider,
            "model": usage.model,
            "input_tokens": usage.usage.input_tokens,
            "cached_input_tokens": usage.usage.cached_input_tokens,
            "cache_write_tokens": usage.usage.cache_write_tokens,
            "output_tokens": usage.usage.output_tokens,
            "reasoning_tokens": usage.usage.reasoning_tokens,
            "usage_source": usage.usage_source.as_str(),
            "status": usage.status.as_str(),
            "price_id": usage.price_id,
            "created_at": rfc3339(usage.created_at),
        }),
        // Usage rows of an archived month (`tollgate archive`): one row for the run of positions
        // `ledger_seq..=last_ledger_seq` they held; the rows themselves are in the month's file.
        LedgerEntry::Archived(run) => json!({
            "kind": "archived",
            "ledger_seq": run.first_seq,
            "last_ledger_seq": run.last_seq,
            "amount": Money::ZERO.checked_sub(run.cost),
            "balance_before": run.balance_before,
            "balance_after": run.balance_after,
            "usage_rows": run.usage_rows,
            "month": run.month,
            "reference_id": format!("archived {}", run.month),
            "created_at": rfc3339(run.created_at),
            "last_at": rfc3339(run.last_at),
        }),
    }
}

