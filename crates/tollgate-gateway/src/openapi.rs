//! The OpenAPI 3.1 description of the client and operator APIs, served at `/openapi.json` and
//! committed as docs/openapi.json. Paths, methods, parameters and request bodies come from the
//! handlers themselves: each route is registered with its `#[utoipa::path]` through
//! `utoipa_axum::routes!`, so a route cannot be served without being described. The models the
//! ledger returns (accounts, keys, prices, usage rows, totals, funds, runs) are described from
//! their own types. The envelopes below are written for the description; a test compares them
//! with live answers.

use serde::Serialize;
use tollgate_core::Money;
use tollgate_store::model::{Account, ApiKey, PriceRow, SummaryRow, TopUp, UsageRow};
use tollgate_store::operations::{DeliveryAttempt, JobRun, OutboxEvent, ReconciliationRun};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate",
        description = "An LLM API gateway with prepaid billing. The client API (`/v1`) takes a key Tollgate issued; the operator API (`/internal`) the admin token. Money is an exact decimal string; times are RFC 3339 UTC.",
        license(name = "Proprietary")
    ),
    modifiers(&Credentials),
    tags(
        (name = "client", description = "LLM calls and what a key holder reads about its own account"),
        (name = "accounts", description = "Accounts, keys and funds"),
        (name = "prices", description = "Prices per tier, with their history"),
        (name = "billing", description = "Usage rows, totals, statements and quotes"),
        (name = "operations", description = "Reconciliation, jobs, alerts"),
        (name = "routing", description = "Channels, affinity pins and session locks"),
        (name = "health", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// The two bearer credentials: a client key and the admin token.
struct Credentials;

impl Modify for Credentials {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("client_key", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("admin_token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The whole description, as served and committed.
pub fn description() -> utoipa::openapi::OpenApi {
    crate::app::documented_routes().into_openapi()
}

/// The description as pretty JSON with a final newline (the committed file's form).
pub fn description_json() -> String {
    let mut text = description().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// Every error: OpenAI-shaped (`/v1/messages` answers Anthropic-shaped errors).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The contract's code: `invalid_request`, `insufficient_balance`, `not_found`, ...
    pub code: String,
    pub param: Option<String>,
}

/// An account with its live balance (`GET /internal/accounts/{id}` and the list).
#[derive(Serialize, ToSchema)]
pub struct AccountView {
    #[serde(flatten)]
    pub account: Account,
    /// The hot store's balance (charges applied at once).
    pub balance: Money,
    /// Reserved by requests in flight.
    pub held: Money,
    /// balance + credit_limit − held.
    pub available: Money,
    /// The ledger's balance (the worker's rows; equal to `balance` once it caught up).
    pub ledger_balance: Money,
    pub currency: String,
    pub daily_requests_used: u64,
    pub monthly_requests_used: u64,
}

#[derive(Serialize, ToSchema)]
pub struct AccountPage {
    pub object: String,
    pub data: Vec<AccountView>,
    /// The last id of this page, when it is full: pass it as `cursor`.
    pub next_cursor: Option<String>,
}

/// A key as created: its record and, this once, its secret.
#[derive(Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub record: ApiKey,
    /// The key itself, shown once; only its hash is stored.
    pub key: String,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub object: Option<String>,
    pub data: Vec<ApiKey>,
}

#[derive(Serialize, ToSchema)]
pub struct PriceList {
    pub object: Option<String>,
    pub data: Vec<PriceRow>,
}

#[derive(Serialize, ToSchema)]
pub struct UsagePage {
    pub object: String,
    pub data: Vec<UsageRow>,
    pub next_cursor: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct SummaryPage {
    pub object: String,
    /// The dimensions, joined by commas, e.g. `day,model`.
    pub group_by: String,
    pub data: Vec<SummaryRow>,
    /// Groups to skip for the next page, when this one is full.
    pub next_cursor: Option<u64>,
}

/// Fund and usage rows in ledger order.
#[derive(Serialize, ToSchema)]
pub struct Statement {
    pub account_id: String,
    pub opening_balance: Money,
    pub closing_balance: Money,
    /// `kind`: deposit, refund, adjustment, usage or archived; `amount` signed; each row's
    /// `balance_before` is the previous row's `balance_after`.
    pub rows: Vec<serde_json::Value>,
}

/// `GET /v1/balance`.
#[derive(Serialize, ToSchema)]
pub struct Balance {
    pub account_id: String,
    pub balance: Money,
    pub held: Money,
    pub available: Money,
    pub credit_limit: Money,
    pub currency: String,
    pub daily_requests_used: u64,
    pub monthly_requests_used: u64,
    pub daily_request_quota: Option<u64>,
    pub monthly_request_quota: Option<u64>,
    pub key: KeyBalance,
}

/// What the calling key may still spend (null: no limit).
#[derive(Serialize, ToSchema)]
pub struct KeyBalance {
    pub id: String,
    pub budget_daily_remaining: Option<Money>,
    pub budget_monthly_remaining: Option<Money>,
    pub budget_total_remaining: Option<Money>,
}

#[derive(Serialize, ToSchema)]
pub struct TopUpList {
    pub object: String,
    pub data: Vec<TopUp>,
}

#[derive(Serialize, ToSchema)]
pub struct ReconciliationList {
    pub object: String,
    pub data: Vec<ReconciliationRun>,
}

#[derive(Serialize, ToSchema)]
pub struct JobRunList {
    pub object: String,
    pub data: Vec<JobRun>,
}

#[derive(Serialize, ToSchema)]
pub struct AlertList {
    pub object: String,
    pub data: Vec<OutboxEvent>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub object: String,
    pub data: Vec<DeliveryAttempt>,
}
