//! Monthly statements: what moved an account's balance in one calendar month (UTC), as JSON or
//! CSV. Opening and closing balances are sums of rows, so one month's closing balance is the
//! next month's opening balance, and the current month's closing balance is the ledger's.

use axum::extract::{Path, Query, State};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tollgate_core::Money;
use tollgate_store::clock::ms_of;

use crate::error::ApiError;
use crate::routes::admin::{csv_field, parse_query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(monthly_statement))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StatementParams {
    format: Option<String>,
}

/// `YYYY-MM` → the month's first instant and the next month's, UTC (the archive's bounds).
fn month_bounds(month: &str) -> Result<(OffsetDateTime, OffsetDateTime), ApiError> {
    let (start_ms, end_ms) = tollgate_store::archive::month_bounds_ms(month)?;
    let instant = |ms: i64| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(|_| ApiError::InvalidRequest(format!("month {month:?} is out of range")));
    Ok((instant(start_ms)?, instant(end_ms)?))
}

use crate::routes::admin::rfc3339;

#[utoipa::path(
    get,
    path = "/accounts/{id}/statements/{month}",
    tag = "billing",
    params(("id" = String, Path, description = "The account id"), ("month" = String, Path, description = "YYYY-MM"), StatementParams),
    responses((status = 200, description = "The month's opening and closing balances, funds and usage by model; CSV with `format=csv`", body = serde_json::Value), (status = "default", description = "An error: OpenAI-shaped, with the contract's code", body = crate::openapi::ErrorBody)),
    security(("admin_token" = []))
)]
async fn monthly_statement(
    State(state): State<AppState>,
    Path((account_id, month)): Path<(String, String)>,
    params: Result<Query<StatementParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let params = parse_query(params)?;
    let format = params.format.unwrap_or_else(|| "json".into());
    if format != "json" && format != "csv" {
        return Err(ApiError::InvalidRequest(format!("format must be json or csv, not {format}")));
    }
    let (start, end) = month_bounds(&month)?;
    if state.ledger.account(&account_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("account {account_id} not found")));
    }
    // On the gateway's calendar, as the usage rows' times are.
    let as_of = state.now();
    let totals = state.ledger.period_totals(&account_id, ms_of(start), ms_of(end)).await?;
    let by_model = crate::routes::reports::totals_by_model(&state, &account_id, start, end).await?;
    // Rows of an archived month are in its file: their totals are kept (and in `totals.usage`).
    let archived = state.ledger.archived_account_months(&account_id, Some(&month), None).await?.into_iter().find(|archived| archived.month == month);
    if format == "csv" {
        let mut csv = String::from("line,model,count,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,amount\n");
        let mut line = |name: &str, count: Option<u64>, amount: Money| {
            csv.push_str(&format!("{name},,{},,,,,{amount}\n", count.map(|count| count.to_string()).unwrap_or_default()));
        };
        line("opening_balance", None, totals.opening_balance);
        line("deposits", Some(totals.deposits.count), totals.deposits.amount);
        line("refunds", Some(totals.refunds.count), totals.refunds.amount);
        line("adjustments", Some(totals.adjustments.count), totals.adjustments.amount);
        for row in &by_model {
            // Usage lowers the balance: negative, so the amount column adds up to the closing line.
            let amount = Money::ZERO.checked_sub(row.cost).ok_or_else(|| ApiError::Internal("usage cost out of range".into()))?;
            csv.push_str(&format!(
                "usage,{},{},{},{},{},{},{amount}\n",
                csv_field(&Value::String(row.group.clone())), row.requests, row.input_tokens, row.cached_input_tokens, row.cache_write_tokens, row.output_tokens
            ));
        }
        if let Some(archived) = &archived {
            let amount = Money::ZERO.checked_sub(archived.cost).ok_or_else(|| ApiError::Internal("usage cost out of range".into()))?;
            csv.push_str(&format!(
                "archived_usage,{},{},{},{},{},{},{amount}\n",
                csv_field(&Value::String(archived.files.join(" "))), archived.requests, archived.input_tokens, archived.cached_input_tokens, archived.cache_write_tokens, archived.output_tokens
            ));
        }
        csv.push_str(&format!("closing_balance,,,,,,,{}\n", totals.closing_balance));
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    Ok(Json(json!({
        "object": "statement",
        "account_id": account_id,
        "month": month,
        "period_start": rfc3339(start),
        "period_end": rfc3339(end),
        "as_of": rfc3339(as_of),
        "opening_balance": totals.opening_balance,
        "deposits": totals.deposits,
        "refunds": totals.refunds,
        "adjustments": totals.adjustments,
        "usage": {"count": totals.usage.count, "amount": totals.usage.amount, "by_model": by_model},
        // Present when the month's rows were archived (`tollgate archive`): `by_model` then
        // covers only rows written after, and these totals the rest.
        "archived": archived.map(|archived| json!({
            "usage_rows": archived.usage_rows,
            "requests": archived.requests,
            "input_tokens": archived.input_tokens,
            "cached_input_tokens": archived.cached_input_tokens,
            "cache_write_tokens": archived.cache_write_tokens,
            "output_tokens": archived.output_tokens,
            "amount": archived.cost,
            "files": archived.files,
        })),
        "closing_balance": totals.closing_balance,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]
    use super::month_bounds;

    #[test]
    fn months_are_calendar_months_in_utc() {
        let (start, end) = month_bounds("2026-12").unwrap_or_else(|error| panic!("{error}"));
        assert_eq!((start.year(), u8::from(start.month()), start.day()), (2026, 12, 1));
        assert_eq!((end.year(), u8::from(end.month()), end.day()), (2027, 1, 1));
        for bad in ["2026-13", "2026-00", "26-11", "2026-1", "2026/11", "", "2026-11-01"] {
            assert!(month_bounds(bad).is_err(), "{bad}");
        }
    }
}
