//! The ledger: the system of record. Accounts, keys, prices with history, fund transactions,
//! usage rows and account balances. Every balance can be rebuilt from it:
//! `balance = Σ fund_transactions.amount − Σ usage_log.cost` (invariant I2).
//!
//! The ledger is its own sequencer for the audit chain (I4): each account's rows, fund and usage
//! together, take consecutive `ledger_seq` positions under the account_balance row, and each
//! row's `balance_before` is the previous row's `balance_after`.

use async_trait::async_trait;
use time::OffsetDateTime;
use tollgate_core::Money;

use crate::error::StoreResult;
use crate::model::{
    Account, AccountBalance, AccountPatch, AccountQuery, PriceHistoryQuery, ApiKey, FundKind, FundOutcome, FundTransaction, LedgerEntry,
    ChargedRequest, NewAccount, NewApiKey, NewFund, NewPrice, PriceRow, RecordOutcome,
    SummaryQuery, SummaryRow, TopUp, TopUpQuery, UsageEvent, UsageQuery, UsageRow,
};

/// The system of record. Implementations: SQLite (embedded), PostgreSQL (production).
///
/// Every write is one database transaction and idempotent where the contract says so
/// (top-up confirmation, fund references, usage rows by (account, request id)).
#[async_trait]
pub trait Ledger: crate::operations::Operations + crate::retention::Retention + crate::archive::Archive + Send + Sync + 'static {
    /// Succeeds when the database answers a trivial query.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates the account and its zero balance. `Conflict` when the id is taken.
    async fn create_account(&self, account: NewAccount) -> StoreResult<Account>;
    async fn account(&self, account_id: &str) -> StoreResult<Option<Account>>;
    /// `NotFound` when the account does not exist.
    async fn update_account(&self, account_id: &str, patch: AccountPatch) -> StoreResult<Account>;
    async fn account_balance(&self, account_id: &str) -> StoreResult<Option<AccountBalance>>;
    /// Every account id, for verification and reconciliation.
    async fn account_ids(&self) -> StoreResult<Vec<String>>;
    /// A page of accounts by id, optionally only those whose id or name contains a text.
    async fn accounts_page(&self, query: AccountQuery) -> StoreResult<Vec<Account>>;
    /// The distinct customer types (pricing tiers) accounts have, sorted: the tiers every routed
    /// model needs a price for (`tollgate prices check`).
    async fn customer_types(&self) -> StoreResult<Vec<String>>;

    /// Stores a key by its hash. `NotFound` when the account does not exist.
    async fn create_key(&self, key: NewApiKey) -> StoreResult<ApiKey>;
    async fn keys_for_account(&self, account_id: &str) -> StoreResult<Vec<ApiKey>>;
    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ApiKey>>;
    /// Revokes a key (idempotent). `NotFound` when the key does not exist.
    async fn revoke_key(&self, key_id: &str) -> StoreResult<ApiKey>;

    /// Appends the prices to the history in one transaction; each takes effect at once.
    async fn put_prices(&self, prices: Vec<NewPrice>) -> StoreResult<Vec<PriceRow>>;
    /// The newest row of every (provider, model, customer_type).
    async fn current_prices(&self) -> StoreResult<Vec<PriceRow>>;
    /// Price rows newest first, superseded ones included, narrowed to what is given.
    async fn price_history(&self, query: PriceHistoryQuery) -> StoreResult<Vec<PriceRow>>;

    /// Creates a pending top-up. Reusing a reference id with the same account and amount returns
    /// the existing top-up; with different ones it is a `Conflict`.
    async fn create_topup(&self, account_id: &str, amount: Money, reference_id: &str)
    -> StoreResult<TopUp>;
    /// Confirms a top-up and records its deposit in one transaction. Confirming again returns
    /// the same top-up and deposit and adds nothing.
    /// Top-ups newest first, narrowed to an account and a status when given.
    async fn topups(&self, query: TopUpQuery) -> StoreResult<Vec<TopUp>>;
    async fn confirm_topup(&self, topup_id: &str) -> StoreResult<(TopUp, FundTransaction)>;
    /// Records a refund or adjustment. A reference id already used for the same kind returns the
    /// original transaction with `newly_applied: false` (or `Conflict` if it differs).
    async fn record_fund(&self, fund: NewFund) -> StoreResult<FundOutcome>;

    /// The fund transaction of this kind recorded under `reference_id`, if any (a reference is
    /// applied at most once per kind).
    async fn fund_by_reference(&self, kind: FundKind, reference_id: &str) -> StoreResult<Option<FundTransaction>>;
    /// Every channel state an operator set, by (model, channel).
    async fn channel_states(&self) -> StoreResult<Vec<crate::model::ChannelState>>;
    /// Records an operator's word on a channel (the last one counts) and, in PostgreSQL, tells
    /// every gateway (the config notification, kind `channel`).
    async fn set_channel_state(&self, state: crate::model::ChannelState) -> StoreResult<()>;
    /// Every channel operators added, by (model, channel).
    async fn added_channels(&self) -> StoreResult<Vec<crate::model::AddedChannel>>;
    /// Adds a channel to a model for every gateway (in PostgreSQL, with the config
    /// notification, kind `channel`). `Conflict` if the model has an added channel of that name.
    async fn add_channel(&self, channel: crate::model::AddedChannel) -> StoreResult<()>;
    /// Removes an added channel, and what operators set on it; whether there was one.
    async fn remove_channel(&self, model: &str, channel: &str) -> StoreResult<bool>;
    /// The upstream attempts recorded for a request id of an account (see
    /// [`crate::model::UpstreamAttempt`]): the newest usage row's first, each row's in attempt
    /// order; at most 1,000.
    async fn upstream_attempts(&self, account_id: &str, request_id: &str) -> StoreResult<Vec<crate::model::RecordedAttempt>>;
    /// Fund transactions of an account with `ledger_seq > after_ledger_seq`, oldest first: a hot
    /// store that missed notifications catches up from them.
    async fn fund_transactions_after(
        &self,
        account_id: &str,
        after_ledger_seq: i64,
    ) -> StoreResult<Vec<FundTransaction>>;

    /// Writes a batch of usage events in one transaction: each charged event becomes a usage row
    /// (skipped as `Duplicate` if its (account, request id) already has one) and the per-account
    /// sums are applied to account_balance.
    async fn record_usage_batch(&self, events: &[UsageEvent]) -> StoreResult<Vec<RecordOutcome>>;
    /// A charged request id: the key and request it is bound to, and the response stored with
    /// it (a non-streaming success), for idempotent replay.
    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<ChargedRequest>>;
    /// Whether a request id has a charged (not failed) usage row for the account: the ledger
    /// remembers every charge, the hot store only a window of them.
    async fn request_charged(&self, account_id: &str, request_id: &str) -> StoreResult<bool>;
    /// Request ids charged for an account since a time: a hot store loading the account cold
    /// must not charge them again.
    async fn charged_request_ids_since(
        &self,
        account_id: &str,
        since: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;
    /// The account's quota and budget counters (and its keys') for the day and month of `at_ms`.
    async fn counter_seed(&self, account_id: &str, at_ms: i64) -> StoreResult<crate::hot::CounterSeed>;

    /// A page of usage rows, newest first.
    async fn usage_rows(&self, query: UsageQuery) -> StoreResult<Vec<UsageRow>>;
    /// Fund and usage rows of an account in ledger order, within `[start, end)`.
    async fn statement(
        &self,
        account_id: &str,
        start: Option<OffsetDateTime>,
        end: Option<OffsetDateTime>,
    ) -> StoreResult<Vec<LedgerEntry>>;
    /// Usage totals of charged rows grouped by one or more of model, UTC day and key, within
    /// `[start, end)`: one page of groups, in the order of the grouping.
    async fn summary(&self, query: SummaryQuery) -> StoreResult<Vec<SummaryRow>>;
    /// Σ fund amounts − Σ usage costs for an account, computed from the rows (not account_balance).
    async fn rebuilt_balance(&self, account_id: &str) -> StoreResult<Money>;
}
