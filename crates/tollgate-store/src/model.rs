//! Records of the billing domain as the stores keep them. Handlers map them to the wire format;
//! stores keep them as-is.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tollgate_core::{Money, Usage, UsageSource};

/// Who pays: a single user or a tenant (an organisation whose keys share one balance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    User,
    Tenant,
}

/// An account that is not active is refused before anything is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    Suspended,
}

/// A paying account. Its balance lives in `AccountBalance` (ledger) and the hot store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Account {
    pub id: String,
    pub kind: AccountKind,
    pub name: String,
    /// The pricing tier: price rows are looked up by (provider, model, customer_type).
    pub customer_type: String,
    pub status: AccountStatus,
    /// How far below zero `available` may go; zero for a strictly prepaid account.
    pub credit_limit: Money,
    pub daily_request_quota: Option<u64>,
    pub monthly_request_quota: Option<u64>,
    /// A balance falling below this sends one `balance.low` alert per crossing.
    pub low_balance_threshold: Option<Money>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// What an operator gives to open an account.
#[derive(Clone, Debug)]
pub struct NewAccount {
    pub id: String,
    pub kind: AccountKind,
    pub name: String,
    pub customer_type: String,
    pub credit_limit: Money,
    pub daily_request_quota: Option<u64>,
    pub monthly_request_quota: Option<u64>,
    pub low_balance_threshold: Option<Money>,
}

/// A partial update; `None` leaves a field as it is, `Some(None)` clears an optional limit.
#[derive(Clone, Debug, Default)]
pub struct AccountPatch {
    pub name: Option<String>,
    pub customer_type: Option<String>,
    pub status: Option<AccountStatus>,
    pub credit_limit: Option<Money>,
    pub daily_request_quota: Option<Option<u64>>,
    pub monthly_request_quota: Option<Option<u64>>,
    pub low_balance_threshold: Option<Option<Money>>,
}

/// A revoked key is refused at once; revocation is permanent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Revoked,
}

/// A virtual API key. Only its SHA-256 hash is stored; the key itself is shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The first characters of the key, so people can tell their keys apart.
    pub prefix: String,
    pub status: KeyStatus,
    pub budget_daily: Option<Money>,
    pub budget_monthly: Option<Money>,
    pub budget_total: Option<Money>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt estimate at authorize, real usage at settle).
    pub tpm: Option<u64>,
    /// `None`: every routed model.
    pub allowed_models: Option<Vec<String>>,
    /// The session lock of this key's requests, over the model's; `None`: the model's.
    pub session_lock: Option<SessionLockMode>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// What the gateway gives to store a new key (the hash, never the key).
#[derive(Clone, Debug)]
pub struct NewApiKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub key_hash: String,
    pub prefix: String,
    pub budget_daily: Option<Money>,
    pub budget_monthly: Option<Money>,
    pub budget_total: Option<Money>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub allowed_models: Option<Vec<String>>,
    pub session_lock: Option<SessionLockMode>,
    pub expires_at: Option<OffsetDateTime>,
}

/// One immutable row of price history. Its id is the price snapshot a usage row points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PriceRow {
    pub id: i64,
    pub provider: String,
    pub model: String,
    pub customer_type: String,
    #[serde(flatten)]
    pub price: tollgate_core::Price,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from: OffsetDateTime,
}

/// Which price rows to list from the history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriceHistoryQuery {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub customer_type: Option<String>,
    pub limit: u32,
}

/// A price to add to the history; it takes effect at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPrice {
    pub provider: String,
    pub model: String,
    pub customer_type: String,
    pub price: tollgate_core::Price,
}

/// Kinds of money movement that are not API usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FundKind {
    Deposit,
    Refund,
    Adjustment,
}

impl FundKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FundKind::Deposit => "deposit",
            FundKind::Refund => "refund",
            FundKind::Adjustment => "adjustment",
        }
    }

    pub fn parse(text: &str) -> Option<FundKind> {
        match text {
            "deposit" => Some(FundKind::Deposit),
            "refund" => Some(FundKind::Refund),
            "adjustment" => Some(FundKind::Adjustment),
            _ => None,
        }
    }
}

/// A committed fund transaction. The hot store applies fund transactions idempotently and in
/// order by their `ledger_seq`, which increases per account in commit order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FundTransaction {
    /// Global id of the transaction.
    pub seq: i64,
    pub account_id: String,
    pub kind: FundKind,
    /// Signed: deposits are positive, refunds negative, adjustments either.
    pub amount: Money,
    pub balance_before: Money,
    pub balance_after: Money,
    /// Position in the account's ledger (fund and usage rows share one sequence).
    pub ledger_seq: i64,
    pub reference_id: String,
    pub reason: Option<String>,
    pub operator_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A fund movement to record. `amount` is signed as it will be applied.
#[derive(Clone, Debug)]
pub struct NewFund {
    pub account_id: String,
    pub kind: FundKind,
    pub amount: Money,
    pub reference_id: String,
    pub reason: Option<String>,
    pub operator_id: Option<String>,
}

/// Whether `record_fund` applied the movement or found it already applied by its reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundOutcome {
    pub transaction: FundTransaction,
    pub newly_applied: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TopUpStatus {
    Pending,
    Confirmed,
}

impl TopUpStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TopUpStatus::Pending => "pending",
            TopUpStatus::Confirmed => "confirmed",
        }
    }
}

/// Which top-ups to list, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopUpQuery {
    pub account_id: Option<String>,
    pub status: Option<TopUpStatus>,
    pub limit: u32,
}

/// A top-up is created pending (payment not yet received) and credits money only when confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TopUp {
    pub id: String,
    pub account_id: String,
    pub amount: Money,
    pub reference_id: String,
    pub status: TopUpStatus,
    /// The deposit's fund transaction (its global `seq`), once confirmed.
    pub fund_seq: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
}

/// How a request ended, as the usage row records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// The response reached the client in full.
    Success,
    /// The client went away mid-stream; it pays for what was generated until then.
    ClientDisconnected,
    /// The upstream stream broke after billable output; that output is charged.
    UpstreamInterrupted,
    /// Nothing billable was produced; cost zero, the hold was voided.
    Failed,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Success => "success",
            RequestStatus::ClientDisconnected => "client_disconnected",
            RequestStatus::UpstreamInterrupted => "upstream_interrupted",
            RequestStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<RequestStatus> {
        match text {
            "success" => Some(RequestStatus::Success),
            "client_disconnected" => Some(RequestStatus::ClientDisconnected),
            "upstream_interrupted" => Some(RequestStatus::UpstreamInterrupted),
            "failed" => Some(RequestStatus::Failed),
            _ => None,
        }
    }
}

/// A response kept so a retry with the same request id is answered without a second charge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: String,
    #[serde(with = "body_as_text")]
    pub body: Vec<u8>,
}

/// A stored body travels in the usage event (through the Redis streams) as a JSON string when
/// it is UTF-8 — every JSON response is — instead of serde's array of numbers, which made the
/// event about four times the body and slow to parse. Either form is read.
mod body_as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(body) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => serializer.collect_seq(body),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Body {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Ok(match Body::deserialize(deserializer)? {
            Body::Text(text) => text.into_bytes(),
            Body::Bytes(bytes) => bytes,
        })
    }
}

/// What settle (or void) emits for the ledger: one usage row to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub request_id: String,
    pub account_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub customer_type: String,
    /// The price history row used: the price snapshot. `None` only for failed requests.
    pub price_id: Option<i64>,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Money,
    pub status: RequestStatus,
    pub latency_ms: u64,
    /// Unix milliseconds when the request was settled.
    pub created_at_ms: i64,
    /// The hot balance after this charge, as the client saw it (`X-Tollgate-Balance`).
    pub hot_balance_after: Money,
    /// For a non-streaming success: the response to replay to a retry.
    pub stored_response: Option<StoredResponse>,
    /// For a request id the client sent: the fingerprint of the request it names, so a retry
    /// with another body is told apart from a retry (see [`ChargedRequest`]). `None` for an id
    /// the gateway made, which no client can send again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_fingerprint: Option<String>,
    /// The upstream attempts the request made, in order: the last one served the client when
    /// the request was charged; the others failed before any byte reached the client and are
    /// the operator's cost (table `upstream_attempts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<UpstreamAttempt>,
    /// A success's routing pin, written by the hot store with the charge; not part of the
    /// event the ledger records.
    #[serde(skip)]
    pub pin: Option<crate::hot::SessionPin>,
}

/// An operator's word on a channel (`/internal/channels`), over its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelState {
    pub model: String,
    pub channel: String,
    pub enabled: bool,
    pub reason: Option<String>,
    pub updated_at_ms: i64,
}

/// A channel an operator added to a model through `/internal/channels`, beside its configured
/// channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedChannel {
    pub model: String,
    pub channel: String,
    /// A configured provider of the model's protocol kind.
    pub provider: String,
    /// `None`: the model's own upstream name.
    pub upstream_model: Option<String>,
    pub priority: i32,
    pub weight: u32,
    pub concurrent_requests_max: Option<u32>,
    pub requests_per_minute_max: Option<u32>,
    pub tokens_per_minute_max: Option<u64>,
    pub created_at_ms: i64,
}

/// Whether two requests of one session may run at once: a model's setting, or a key's over it.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionLockMode {
    /// No lock.
    #[default]
    Off,
    /// A second request of a busy session is refused: 409 `session_busy`.
    Reject,
    /// A second request waits for the lock, at most `routing.session_lock_wait_ms`, then 409.
    Wait,
}

impl SessionLockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionLockMode::Off => "off",
            SessionLockMode::Reject => "reject",
            SessionLockMode::Wait => "wait",
        }
    }

    pub fn parse(text: &str) -> Option<SessionLockMode> {
        match text {
            "off" => Some(SessionLockMode::Off),
            "reject" => Some(SessionLockMode::Reject),
            "wait" => Some(SessionLockMode::Wait),
            _ => None,
        }
    }
}

/// An upstream attempt as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedAttempt {
    /// The id of the request's usage row.
    pub usage_id: i64,
    /// 1 for the first.
    pub attempt: u32,
    pub request_id: String,
    pub created_at_ms: i64,
    pub attempt_row: UpstreamAttempt,
}

/// Most attempts a usage event carries (the gateway makes at most `routing.attempts_max`).
pub const ATTEMPTS_PER_REQUEST_MAX: usize = 16;

/// One upstream attempt of a request: which channel, how it answered, how fast, and what the
/// upstream said it used — for an operator reconciling a provider's bill with the charges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamAttempt {
    pub channel: String,
    pub provider: String,
    pub upstream_model: String,
    /// The upstream's HTTP status; `None` when it never answered (connection, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Its answer was the client's (charged to the customer); else it failed before anything
    /// reached the client.
    pub served: bool,
    /// Why it failed, in a word (`connect`, `timeout`, `status`, `body`, `not_json`,
    /// `stream_ended`, `too_large`); `None` when it served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
    /// To the response head, and for a stream to its first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    /// What the upstream reported using, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_usage: Option<Usage>,
}

/// What a charged request id is bound to: the key that sent it and the request's fingerprint, so
/// that only the same request from the same key is answered as a retry; and the response kept
/// for replay, if one was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargedRequest {
    pub api_key_id: String,
    /// When the request was charged (its usage event's `created_at_ms`): a retry past the replay
    /// window is not answered with the body, even if pruning has not removed it yet.
    pub charged_at_ms: i64,
    /// `None` for an id the gateway made, and for rows written before fingerprints were kept.
    pub request_fingerprint: Option<String>,
    pub response: Option<StoredResponse>,
}

/// A persisted usage row, with its place in the account's ledger chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    pub id: i64,
    pub request_id: String,
    pub account_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub customer_type: String,
    pub price_id: Option<i64>,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost: Money,
    pub balance_before: Money,
    pub balance_after: Money,
    pub ledger_seq: i64,
    pub status: RequestStatus,
    pub latency_ms: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The ledger's balance for an account: the sum of every fund and usage row applied so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccountBalance {
    pub account_id: String,
    pub balance: Money,
    /// The `ledger_seq` of the last fund transaction included in `balance` (0 if none).
    pub last_fund_seq: i64,
    /// The last ledger position used by this account.
    pub ledger_seq: i64,
}

/// Consecutive chain positions of one account that were usage rows of an archived month
/// (`tollgate archive`): kept as one chain entry once the rows are gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArchivedRun {
    pub account_id: String,
    pub first_seq: i64,
    pub last_seq: i64,
    pub usage_rows: u64,
    /// Σ cost of the run's rows.
    pub cost: Money,
    pub balance_before: Money,
    pub balance_after: Money,
    /// `YYYY-MM`.
    pub month: String,
    /// The first and last rows' times.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_at: OffsetDateTime,
}

/// One row of a statement: fund and usage rows together in ledger order, archived runs in the
/// places of their rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerEntry {
    Fund(FundTransaction),
    Usage(UsageRow),
    Archived(ArchivedRun),
}

impl LedgerEntry {
    /// The entry's (first) position.
    pub fn ledger_seq(&self) -> i64 {
        match self {
            LedgerEntry::Fund(fund) => fund.ledger_seq,
            LedgerEntry::Usage(usage) => usage.ledger_seq,
            LedgerEntry::Archived(run) => run.first_seq,
        }
    }

    /// The entry's last position: its only one but for an archived run.
    pub fn last_ledger_seq(&self) -> i64 {
        match self {
            LedgerEntry::Archived(run) => run.last_seq,
            other => other.ledger_seq(),
        }
    }

    pub fn balance_before(&self) -> Money {
        match self {
            LedgerEntry::Fund(fund) => fund.balance_before,
            LedgerEntry::Usage(usage) => usage.balance_before,
            LedgerEntry::Archived(run) => run.balance_before,
        }
    }

    pub fn balance_after(&self) -> Money {
        match self {
            LedgerEntry::Fund(fund) => fund.balance_after,
            LedgerEntry::Usage(usage) => usage.balance_after,
            LedgerEntry::Archived(run) => run.balance_after,
        }
    }
}

/// An account's totals for an archived month: what its statement still shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ArchivedAccountMonth {
    pub account_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// Usage rows, failed attempts included.
    pub usage_rows: u64,
    /// Charged (not failed) requests.
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub cost: Money,
    /// The archive files the month's rows went to (a month archived again has several).
    pub files: Vec<String>,
}

/// A page of usage rows: newest first, `id < cursor`.
#[derive(Clone, Debug, Default)]
pub struct UsageQuery {
    pub account_id: Option<String>,
    pub api_key_id: Option<String>,
    pub start: Option<OffsetDateTime>,
    pub end: Option<OffsetDateTime>,
    pub limit: u32,
    pub cursor: Option<i64>,
}

/// A dimension usage totals are grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryGroup {
    Model,
    /// The UTC day.
    Day,
    Key,
}

impl SummaryGroup {
    pub const ALL: [SummaryGroup; 3] = [SummaryGroup::Model, SummaryGroup::Day, SummaryGroup::Key];

    pub fn as_str(self) -> &'static str {
        match self {
            SummaryGroup::Model => "model",
            SummaryGroup::Day => "day",
            SummaryGroup::Key => "key",
        }
    }
}

/// Which usage to total, how to group it, and which page of groups to return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummaryQuery {
    pub account_id: Option<String>,
    pub start: Option<OffsetDateTime>,
    pub end: Option<OffsetDateTime>,
    /// One or more distinct dimensions; rows are ordered by them, in this order.
    pub group_by: Vec<SummaryGroup>,
    pub limit: u32,
    /// Groups to skip (the page's position; groups are totalled afresh for each page).
    pub offset: u64,
}

/// Usage totals for one group: a value of each dimension asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SummaryRow {
    /// The group's values in `group_by` order, joined by ", ".
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub cost: Money,
}

/// A page of accounts, ordered by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountQuery {
    /// A case-insensitive part of the id or the name.
    pub search: Option<String>,
    /// Accounts whose id sorts after this one (the previous page's last).
    pub after: Option<String>,
    pub limit: u32,
}

/// What a batch write did with each event, in input order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOutcome {
    Inserted,
    /// A charged row for this (account, request id) already exists; nothing was applied.
    Duplicate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_body_travels_as_text_when_it_can_and_either_form_is_read() {
        let text = StoredResponse { status: 200, content_type: "application/json".into(), body: br#"{"a":"\u00e9 \" x"}"#.to_vec() };
        let json = serde_json::to_string(&text).unwrap_or_default();
        assert_eq!(json, r#"{"status":200,"content_type":"application/json","body":"{\"a\":\"\\u00e9 \\\" x\"}"}"#);
        assert_eq!(serde_json::from_str::<StoredResponse>(&json).ok(), Some(text));
        let binary = StoredResponse { status: 200, content_type: "application/octet-stream".into(), body: vec![0xff, 0, 7] };
        let json = serde_json::to_string(&binary).unwrap_or_default();
        assert!(json.contains(r#""body":[255,0,7]"#), "{json}");
        assert_eq!(serde_json::from_str::<StoredResponse>(&json).ok(), Some(binary));
        // Events written before, with the body as an array of numbers, still read.
        let old = r#"{"status":200,"content_type":"application/json","body":[123,125]}"#;
        assert_eq!(serde_json::from_str::<StoredResponse>(old).map(|stored| stored.body).ok(), Some(b"{}".to_vec()));
    }
}
