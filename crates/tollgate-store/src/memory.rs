//! The in-process hot store for embedded mode. One mutex over all accounts makes every step of
//! the charge protocol atomic, as one Lua script does in Redis. The lock is never held across an
//! await: a settle updates the state under the lock, then waits for the ledger commit outside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tollgate_core::Money;

use crate::clock::{Clock, Periods};
use crate::error::{StoreError, StoreResult};
use crate::hot::{
    AccountSnapshot, Authorization, CounterSeed, AuthorizeRequest, BalanceView, Commitments, FundApplication,
    HotStore, RECENT_CHARGE_MS, Refusal, Settlement, WithdrawalHold, available, commitment_refusal,
};
use crate::model::UsageEvent;
use crate::operations::{HotAccountView, UnloggedCharge};
use crate::queue::ChannelLogSender;
use crate::recent::RecentCharges;
use tokio::sync::oneshot;

/// A counter that belongs to one period (minute, day or month) and resets when it changes.
#[derive(Clone, Copy, Debug, Default)]
struct PeriodCount<T> {
    period: i64,
    value: T,
}

impl<T: Copy + Default> PeriodCount<T> {
    fn current(&self, period: i64) -> T {
        if self.period == period { self.value } else { T::default() }
    }

    fn set(&mut self, period: i64, value: T) {
        self.period = period;
        self.value = value;
    }
}

/// A reservation of funds for one in-flight request.
#[derive(Clone, Debug)]
struct Hold {
    api_key_id: String,
    amount: Money,
    day: i64,
    month: i64,
    expires_at_ms: i64,
}

/// Funds reserved for a refund or negative adjustment being written to the ledger.
#[derive(Clone, Copy, Debug)]
struct Withdrawal {
    amount: Money,
    expires_at_ms: i64,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Sum of this key's open holds: counted against every budget period.
    held: Money,
    spent_daily: PeriodCount<Money>,
    spent_monthly: PeriodCount<Money>,
    spent_total: Money,
    requests_this_minute: PeriodCount<u64>,
    tokens_this_minute: PeriodCount<u64>,
}

#[derive(Debug, Default)]
struct AccountState {
    balance: Money,
    /// Sum of `holds` and `withdrawals`; kept beside them so `available` costs nothing to compute.
    held: Money,
    last_fund_seq: i64,
    holds: HashMap<String, Hold>,
    /// Withdrawal id → funds reserved for a fund transaction not applied yet.
    withdrawals: HashMap<String, Withdrawal>,
    /// Request ids charged within the store's `recent_charge_ms` of their settle. The ledger
    /// has them by then (a settle waits for the commit; one that could not is still in
    /// `unlogged`, which counts as charged too).
    charged: RecentCharges,
    requests_today: PeriodCount<u64>,
    requests_this_month: PeriodCount<u64>,
    keys: HashMap<String, KeyState>,
    /// Settled request id → its charge, until the ledger has committed it.
    unlogged: HashMap<String, Unlogged>,
}

/// A charge the ledger has not committed yet, with what a reload needs to count it again.
#[derive(Clone, Debug)]
struct Unlogged {
    cost: Money,
    api_key_id: String,
    day: i64,
    month: i64,
}

/// Every account's state, behind the one mutex.
#[derive(Debug, Default)]
struct Accounts {
    loaded: HashMap<String, AccountState>,
    /// The unlogged charges of accounts unloaded before the ledger had them (a parked charge
    /// may wait for good): still owed, so a reload counts them again (see
    /// `operations::load_snapshot`), and a commit takes them out as it does from a loaded one.
    unloaded_unlogged: HashMap<String, HashMap<String, Unlogged>>,
    /// Account → session → (channel, expiry ms): routing pins ([`crate::hot::SessionPin`]),
    /// kept apart from the balances so an unload does not lose them.
    pins: HashMap<String, HashMap<String, (String, i64)>>,
    /// (account, session) → (holder's token, expiry ms): session locks.
    session_locks: HashMap<(String, String), (String, i64)>,
    /// The last fencing number handed out.
    session_lock_fence: u64,
}

impl std::ops::Deref for Accounts {
    type Target = HashMap<String, AccountState>;

    fn deref(&self) -> &Self::Target {
        &self.loaded
    }
}

impl std::ops::DerefMut for Accounts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.loaded
    }
}

impl AccountState {
    fn already_charged(&self, request_id: &str) -> bool {
        self.unlogged.contains_key(request_id) || self.charged.contains(request_id)
    }

    fn release_withdrawal(&mut self, withdrawal_id: &str) -> StoreResult<()> {
        if let Some(withdrawal) = self.withdrawals.remove(withdrawal_id) {
            self.held = sub(self.held, withdrawal.amount, "held")?;
        }
        debug_assert!(!self.held.is_negative(), "held never goes below zero");
        Ok(())
    }
}

/// Starts a freshly loaded account's counters from the ledger's, for the periods still current.
fn seed_counters(account: &mut AccountState, seed: &CounterSeed, periods: &Periods) {
    let (today, this_month) = (seed.day == periods.day, seed.month == periods.month);
    if today {
        account.requests_today.set(periods.day, seed.requests_today);
    }
    if this_month {
        account.requests_this_month.set(periods.month, seed.requests_this_month);
    }
    for spend in &seed.keys {
        let key = account.keys.entry(spend.api_key_id.clone()).or_default();
        key.spent_total = spend.spent_total;
        if today {
            key.spent_daily.set(periods.day, spend.spent_today);
        }
        if this_month {
            key.spent_monthly.set(periods.month, spend.spent_this_month);
        }
    }
}

/// The embedded hot store. Settled events go to the embedded usage log.
pub struct MemoryHotStore {
    accounts: Arc<Mutex<Accounts>>,
    log: ChannelLogSender,
    clock: Clock,
    recent_charge_ms: i64,
}

impl MemoryHotStore {
    pub fn new(log: ChannelLogSender, clock: Clock) -> MemoryHotStore {
        MemoryHotStore { accounts: Arc::new(Mutex::new(Accounts::default())), log, clock, recent_charge_ms: RECENT_CHARGE_MS }
    }

    /// The same store remembering charged ids `recent_charge_ms` after their settle
    /// (`limits.recent_charge_ms`; [`RECENT_CHARGE_MS`] says how long that must be).
    #[must_use]
    pub fn remembering_charges_for(mut self, recent_charge_ms: i64) -> MemoryHotStore {
        self.recent_charge_ms = recent_charge_ms;
        self
    }

    fn lock(&self) -> StoreResult<std::sync::MutexGuard<'_, Accounts>> {
        // A poisoned lock means a panic mid-update: the state may be half-changed, so refuse to
        // charge from it rather than guess.
        self.accounts
            .lock()
            .map_err(|_| StoreError::Corrupt("hot store lock poisoned".into()))
    }
}

/// A settled charge waiting for its ledger commit, after which it leaves `unlogged`. If the
/// settle is cancelled first (the gateway's settle timeout), the wait goes on in a task of its
/// own: the charge stays unlogged until it is committed, and no longer (an entry left behind
/// would keep its id charged and block the account's balance repairs for good).
struct PendingCommit {
    accounts: Arc<Mutex<Accounts>>,
    account_id: String,
    request_id: String,
    committed: Option<oneshot::Receiver<()>>,
}

impl PendingCommit {
    async fn wait(mut self) -> StoreResult<()> {
        let Some(committed) = self.committed.as_mut() else { return Ok(()) };
        let result = committed.await;
        self.committed = None;
        // No commit: the worker stopped, or the ledger refused the usage row and it was parked.
        // The charge stays in `unlogged`, where reconciliation sees it as owed.
        result.map_err(|_| StoreError::Unavailable("the charge was not committed to the ledger (worker stopped, or the usage row was refused and parked)".into()))?;
        forget_unlogged(&self.accounts, &self.account_id, &self.request_id);
        Ok(())
    }
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        let Some(committed) = self.committed.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let accounts = Arc::clone(&self.accounts);
        let (account_id, request_id) = (std::mem::take(&mut self.account_id), std::mem::take(&mut self.request_id));
        runtime.spawn(async move {
            // An error means the worker stopped first: not committed, so it stays unlogged.
            if committed.await.is_ok() {
                forget_unlogged(&accounts, &account_id, &request_id);
            }
        });
    }
}

fn forget_unlogged(accounts: &Mutex<Accounts>, account_id: &str, request_id: &str) {
    let Ok(mut accounts) = accounts.lock() else { return };
    if let Some(account) = accounts.get_mut(account_id) {
        account.unlogged.remove(request_id);
    } else if let Some(unlogged) = accounts.unloaded_unlogged.get_mut(account_id) {
        unlogged.remove(request_id);
        if unlogged.is_empty() {
            accounts.unloaded_unlogged.remove(account_id);
        }
    }
}

fn add(left: Money, right: Money, what: &'static str) -> StoreResult<Money> {
    left.checked_add(right).ok_or(StoreError::Overflow(what))
}

fn sub(left: Money, right: Money, what: &'static str) -> StoreResult<Money> {
    left.checked_sub(right).ok_or(StoreError::Overflow(what))
}

/// The first limit the request would break, if any. Read-only: nothing changes on refusal.
fn refusal(
    account: &AccountState,
    request: &AuthorizeRequest,
    periods: &Periods,
) -> StoreResult<Option<Refusal>> {
    if account.already_charged(&request.request_id) {
        return Ok(Some(Refusal::AlreadyCharged));
    }
    if account.holds.contains_key(&request.request_id) {
        return Ok(Some(Refusal::InProgress));
    }
    let limits = &request.limits;
    let key = account.keys.get(&request.api_key_id);
    let requests_this_minute = key.map_or(0, |key| key.requests_this_minute.current(periods.minute));
    let tokens_this_minute = key.map_or(0, |key| key.tokens_this_minute.current(periods.minute));
    let retry_after_secs = periods.seconds_to_next_minute;
    if limits.key_requests_per_minute.is_some_and(|limit| requests_this_minute >= limit) {
        return Ok(Some(Refusal::RateLimited { retry_after_secs }));
    }
    if limits.key_tokens_per_minute.is_some_and(|limit| tokens_this_minute >= limit) {
        return Ok(Some(Refusal::RateLimited { retry_after_secs }));
    }
    let committed = Commitments {
        requests_today: account.requests_today.current(periods.day),
        requests_this_month: account.requests_this_month.current(periods.month),
        key_spent_today: key.map_or(Money::ZERO, |key| key.spent_daily.current(periods.day)),
        key_spent_this_month: key.map_or(Money::ZERO, |key| key.spent_monthly.current(periods.month)),
        key_spent_total: key.map_or(Money::ZERO, |key| key.spent_total),
        key_held: key.map_or(Money::ZERO, |key| key.held),
        balance: account.balance,
        held: account.held,
    };
    commitment_refusal(request, &committed, periods)
}

#[async_trait]
impl HotStore for MemoryHotStore {
    fn recent_charge_ms(&self) -> i64 {
        self.recent_charge_ms
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> StoreResult<Authorization> {
        debug_assert!(!request.hold.is_negative(), "a hold is never negative");
        let now_ms = (self.clock)();
        let periods = Periods::at(now_ms);
        let mut accounts = self.lock()?;
        let Some(account) = accounts.get_mut(&request.account_id) else {
            return Ok(Authorization::Refused(Refusal::AccountNotLoaded));
        };
        if let Some(refusal) = refusal(account, request, &periods)? {
            return Ok(Authorization::Refused(refusal));
        }
        // Compute every new value before writing any, so an overflow changes nothing.
        let held = add(account.held, request.hold, "held")?;
        let key = account.keys.entry(request.api_key_id.clone()).or_default();
        let key_held = add(key.held, request.hold, "key held")?;
        key.held = key_held;
        let minute_requests = key.requests_this_minute.current(periods.minute).saturating_add(1);
        key.requests_this_minute.set(periods.minute, minute_requests);
        let minute_tokens = key.tokens_this_minute.current(periods.minute).saturating_add(request.hold_tokens);
        key.tokens_this_minute.set(periods.minute, minute_tokens);
        account.held = held;
        let today = account.requests_today.current(periods.day).saturating_add(1);
        account.requests_today.set(periods.day, today);
        let this_month = account.requests_this_month.current(periods.month).saturating_add(1);
        account.requests_this_month.set(periods.month, this_month);
        let ttl_ms = i64::try_from(request.hold_ttl_ms).unwrap_or(i64::MAX);
        account.holds.insert(
            request.request_id.clone(),
            Hold {
                api_key_id: request.api_key_id.clone(),
                amount: request.hold,
                day: periods.day,
                month: periods.month,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
            },
        );
        let available_after = available(account.balance, request.limits.credit_limit, account.held)?;
        Ok(Authorization::Held { available_after })
    }

    async fn authorize_pinned(&self, request: &AuthorizeRequest, session: Option<&str>) -> StoreResult<(Authorization, Option<String>)> {
        let authorization = self.authorize(request).await?;
        let pinned = match (&authorization, session) {
            (Authorization::Held { .. }, Some(session)) => {
                let now_ms = (self.clock)();
                let accounts = self.lock()?;
                accounts
                    .pins
                    .get(&request.account_id)
                    .and_then(|pins| pins.get(session))
                    .filter(|(_, expires_ms)| *expires_ms > now_ms)
                    .map(|(channel, _)| channel.clone())
            }
            _ => None,
        };
        Ok((authorization, pinned))
    }

    async fn clear_pins(&self, account_id: &str) -> StoreResult<()> {
        self.lock()?.pins.remove(account_id);
        Ok(())
    }

    async fn lock_session(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<Option<u64>> {
        let now_ms = (self.clock)();
        let mut accounts = self.lock()?;
        let key = (account_id.to_string(), session.to_string());
        if accounts.session_locks.get(&key).is_some_and(|(_, expires_ms)| *expires_ms > now_ms) {
            return Ok(None);
        }
        // Expired locks go when another is taken, so the map holds the live ones and a few.
        accounts.session_locks.retain(|_, (_, expires_ms)| *expires_ms > now_ms);
        accounts.session_lock_fence = accounts.session_lock_fence.saturating_add(1);
        let expires_ms = now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        accounts.session_locks.insert(key, (token.to_string(), expires_ms));
        Ok(Some(accounts.session_lock_fence))
    }

    async fn renew_session_lock(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<bool> {
        let now_ms = (self.clock)();
        let mut accounts = self.lock()?;
        match accounts.session_locks.get_mut(&(account_id.to_string(), session.to_string())) {
            Some((holder, expires_ms)) if holder == token && *expires_ms > now_ms => {
                *expires_ms = now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn unlock_session(&self, account_id: &str, session: &str, token: Option<&str>) -> StoreResult<bool> {
        let now_ms = (self.clock)();
        let mut accounts = self.lock()?;
        let key = (account_id.to_string(), session.to_string());
        let held = accounts.session_locks.get(&key).is_some_and(|(holder, expires_ms)| *expires_ms > now_ms && token.is_none_or(|token| token == holder));
        if held {
            accounts.session_locks.remove(&key);
        }
        Ok(held)
    }

    async fn settle(&self, mut event: UsageEvent) -> StoreResult<Settlement> {
        if event.cost.is_negative() {
            return Err(StoreError::Invalid(format!("negative cost for request {}", event.request_id)));
        }
        // The event's place in the log first: a settle cancelled while the log is full has
        // changed nothing, and one past this point cannot lose its event.
        let slot = self.log.reserve().await?;
        let now_ms = (self.clock)();
        let periods = Periods::at(now_ms);
        let settlement = {
            let mut accounts = self.lock()?;
            let account = accounts.get_mut(&event.account_id).ok_or_else(|| StoreError::NotFound {
                entity: "hot account",
                id: event.account_id.clone(),
            })?;
            if account.already_charged(&event.request_id) {
                let balance = account.balance;
                return Ok(Settlement { balance_before: balance, balance_after: balance, already_settled: true });
            }
            let balance_before = account.balance;
            let balance_after = sub(balance_before, event.cost, "balance")?;
            let hold = account.holds.get(&event.request_id).cloned();
            let held_after = match &hold {
                Some(hold) => sub(account.held, hold.amount, "held")?,
                None => account.held,
            };
            // The key the hold was placed for gets its funds back (as void and expire release
            // from it); the spend is the event's key's, as its usage row says, so a reload from
            // the ledger's counters finds it where this left it.
            let hold_key_held_after = match &hold {
                Some(hold) => Some(sub(account.keys.get(&hold.api_key_id).map_or(Money::ZERO, |key| key.held), hold.amount, "key held")?),
                None => None,
            };
            let key = account.keys.entry(event.api_key_id.clone()).or_default();
            let spent_daily = add(key.spent_daily.current(periods.day), event.cost, "key spend")?;
            let spent_monthly = add(key.spent_monthly.current(periods.month), event.cost, "key spend")?;
            let spent_total = add(key.spent_total, event.cost, "key spend")?;
            // All checked; now write.
            key.spent_daily.set(periods.day, spent_daily);
            key.spent_monthly.set(periods.month, spent_monthly);
            key.spent_total = spent_total;
            if let (Some(hold), Some(held)) = (&hold, hold_key_held_after) {
                account.keys.entry(hold.api_key_id.clone()).or_default().held = held;
            }
            if hold.is_none() {
                // Its hold expired and gave its request slot back: the request happened all
                // the same, and counts, as the ledger's counters count it.
                let today = account.requests_today.current(periods.day).saturating_add(1);
                account.requests_today.set(periods.day, today);
                let this_month = account.requests_this_month.current(periods.month).saturating_add(1);
                account.requests_this_month.set(periods.month, this_month);
            }
            account.holds.remove(&event.request_id);
            account.held = held_after;
            account.balance = balance_after;
            account.charged.insert(&event.request_id, now_ms, self.recent_charge_ms);
            // A free charge too: a reload must still count its request and know its id.
            let unlogged = Unlogged { cost: event.cost, api_key_id: event.api_key_id.clone(), day: periods.day, month: periods.month };
            account.unlogged.insert(event.request_id.clone(), unlogged);
            debug_assert!(!account.held.is_negative(), "held never goes below zero");
            let settlement = Settlement { balance_before, balance_after, already_settled: false };
            if let Some(pin) = event.pin.take() {
                remember_pin(&mut accounts, &event.account_id, pin, now_ms);
            }
            settlement
        };
        event.hot_balance_after = settlement.balance_after;
        let (account_id, request_id) = (event.account_id.clone(), event.request_id.clone());
        if let Some(committed) = slot.append(event, true) {
            PendingCommit { accounts: Arc::clone(&self.accounts), account_id, request_id, committed: Some(committed) }.wait().await?;
        }
        Ok(settlement)
    }

    async fn void(&self, event: UsageEvent) -> StoreResult<()> {
        let slot = self.log.reserve().await?;
        let periods = Periods::at((self.clock)());
        {
            let mut accounts = self.lock()?;
            let Some(account) = accounts.get_mut(&event.account_id) else { return Ok(()) };
            let Some(hold) = account.holds.remove(&event.request_id) else { return Ok(()) };
            release(account, &hold, &periods)?;
        }
        let _ = slot.append(event, false);
        Ok(())
    }

    async fn expire_holds(&self) -> StoreResult<u64> {
        let now_ms = (self.clock)();
        let periods = Periods::at(now_ms);
        let mut expired = 0u64;
        let mut accounts = self.lock()?;
        for account in accounts.values_mut() {
            let due: Vec<String> = account
                .holds
                .iter()
                .filter(|(_, hold)| hold.expires_at_ms <= now_ms)
                .map(|(request_id, _)| request_id.clone())
                .collect();
            for request_id in due {
                if let Some(hold) = account.holds.remove(&request_id) {
                    release(account, &hold, &periods)?;
                    expired += 1;
                }
            }
            let due: Vec<String> = account
                .withdrawals
                .iter()
                .filter(|(_, withdrawal)| withdrawal.expires_at_ms <= now_ms)
                .map(|(withdrawal_id, _)| withdrawal_id.clone())
                .collect();
            for withdrawal_id in due {
                account.release_withdrawal(&withdrawal_id)?;
                expired += 1;
            }
            account.charged.forget(now_ms, self.recent_charge_ms);
        }
        Ok(expired)
    }

    async fn load_account(&self, snapshot: AccountSnapshot) -> StoreResult<bool> {
        let now_ms = (self.clock)();
        let mut accounts = self.lock()?;
        if accounts.contains_key(&snapshot.account_id) {
            return Ok(false);
        }
        let mut account = AccountState { balance: snapshot.balance, last_fund_seq: snapshot.last_fund_seq, ..AccountState::default() };
        // Remembered from the load on: at least as long as from their settle.
        for request_id in &snapshot.charged_request_ids {
            account.charged.insert(request_id, now_ms, self.recent_charge_ms);
        }
        let periods = Periods::at(now_ms);
        seed_counters(&mut account, &snapshot.counters, &periods);
        // Charges still owed from before an unload: unlogged again, counted as the ledger's
        // counters will count them (the snapshot's balance already lacks them).
        let retained = accounts.unloaded_unlogged.remove(&snapshot.account_id).unwrap_or_default();
        for (request_id, charge) in retained {
            if !snapshot.unlogged.iter().any(|owed| owed.request_id == request_id) {
                continue; // the ledger has it: its commit only has to take it out
            }
            if charge.day == periods.day {
                account.requests_today.set(periods.day, account.requests_today.current(periods.day).saturating_add(1));
            }
            if charge.month == periods.month {
                account.requests_this_month.set(periods.month, account.requests_this_month.current(periods.month).saturating_add(1));
            }
            let key = account.keys.entry(charge.api_key_id.clone()).or_default();
            key.spent_total = add(key.spent_total, charge.cost, "key spend")?;
            if charge.day == periods.day {
                key.spent_daily.set(periods.day, add(key.spent_daily.current(periods.day), charge.cost, "key spend")?);
            }
            if charge.month == periods.month {
                key.spent_monthly.set(periods.month, add(key.spent_monthly.current(periods.month), charge.cost, "key spend")?);
            }
            account.unlogged.insert(request_id, charge);
        }
        accounts.insert(snapshot.account_id, account);
        Ok(true)
    }

    async fn apply_fund(&self, account_id: &str, fund_ledger_seq: i64, amount: Money, withdrawal_id: Option<&str>) -> StoreResult<FundApplication> {
        let mut accounts = self.lock()?;
        let Some(account) = accounts.get_mut(account_id) else {
            return Ok(FundApplication::AccountNotLoaded);
        };
        if fund_ledger_seq <= account.last_fund_seq {
            if let Some(withdrawal_id) = withdrawal_id {
                account.release_withdrawal(withdrawal_id)?;
            }
            return Ok(FundApplication::AlreadyApplied);
        }
        let balance = add(account.balance, amount, "balance")?;
        if let Some(withdrawal_id) = withdrawal_id {
            account.release_withdrawal(withdrawal_id)?;
        }
        account.balance = balance;
        account.last_fund_seq = fund_ledger_seq;
        Ok(FundApplication::Applied { balance_after: account.balance })
    }

    async fn hold_withdrawal(&self, account_id: &str, withdrawal_id: &str, amount: Money, ttl_ms: u64) -> StoreResult<WithdrawalHold> {
        debug_assert!(amount.is_positive(), "a withdrawal reserves a positive amount");
        let now_ms = (self.clock)();
        let mut accounts = self.lock()?;
        let Some(account) = accounts.get_mut(account_id) else {
            return Ok(WithdrawalHold::AccountNotLoaded);
        };
        if account.withdrawals.contains_key(withdrawal_id) {
            return Ok(WithdrawalHold::InProgress);
        }
        let free = sub(account.balance, account.held, "free funds")?;
        if free < amount {
            return Ok(WithdrawalHold::Insufficient { free });
        }
        account.held = add(account.held, amount, "held")?;
        let expires_at_ms = now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        account.withdrawals.insert(withdrawal_id.to_string(), Withdrawal { amount, expires_at_ms });
        Ok(WithdrawalHold::Held)
    }

    async fn release_withdrawal(&self, account_id: &str, withdrawal_id: &str) -> StoreResult<()> {
        let mut accounts = self.lock()?;
        if let Some(account) = accounts.get_mut(account_id) {
            account.release_withdrawal(withdrawal_id)?;
        }
        Ok(())
    }

    async fn balance(&self, account_id: &str, api_key_id: &str) -> StoreResult<Option<BalanceView>> {
        let periods = Periods::at((self.clock)());
        let accounts = self.lock()?;
        let Some(account) = accounts.get(account_id) else { return Ok(None) };
        let key = account.keys.get(api_key_id);
        Ok(Some(BalanceView {
            balance: account.balance,
            held: account.held,
            last_fund_seq: account.last_fund_seq,
            daily_requests_used: account.requests_today.current(periods.day),
            monthly_requests_used: account.requests_this_month.current(periods.month),
            key_spent_daily: key.map_or(Money::ZERO, |key| key.spent_daily.current(periods.day)),
            key_spent_monthly: key.map_or(Money::ZERO, |key| key.spent_monthly.current(periods.month)),
            key_spent_total: key.map_or(Money::ZERO, |key| key.spent_total),
        }))
    }

    async fn charged_request(&self, _account_id: &str, _request_id: &str) -> StoreResult<Option<crate::model::ChargedRequest>> {
        Ok(None)
    }

    async fn unload_account(&self, account_id: &str) -> StoreResult<()> {
        let mut accounts = self.lock()?;
        if let Some(account) = accounts.remove(account_id)
            && !account.unlogged.is_empty()
        {
            accounts.unloaded_unlogged.insert(account_id.to_string(), account.unlogged);
        }
        Ok(())
    }

    async fn hot_views(&self, account_ids: &[String]) -> StoreResult<Vec<Option<HotAccountView>>> {
        let accounts = self.lock()?;
        Ok(account_ids
            .iter()
            .map(|account_id| {
                accounts.get(account_id).map(|account| HotAccountView {
                    account_id: account_id.clone(),
                    balance: account.balance,
                    held: account.held,
                    last_fund_seq: account.last_fund_seq,
                })
            })
            .collect())
    }

    async fn unlogged_charges(&self) -> StoreResult<Vec<UnloggedCharge>> {
        let accounts = self.lock()?;
        let loaded = accounts.iter().map(|(account_id, account)| (account_id, &account.unlogged));
        Ok(loaded
            .chain(&accounts.unloaded_unlogged)
            .flat_map(|(account_id, unlogged)| {
                unlogged.iter().filter(|(_, charge)| charge.cost.is_positive()).map(|(request_id, charge)| UnloggedCharge {
                    account_id: account_id.clone(),
                    request_id: request_id.clone(),
                    cost: charge.cost,
                })
            })
            .collect())
    }

    async fn unlogged_charges_of(&self, account_id: &str) -> StoreResult<Vec<UnloggedCharge>> {
        let accounts = self.lock()?;
        let unlogged = match accounts.get(account_id) {
            Some(account) => Some(&account.unlogged),
            None => accounts.unloaded_unlogged.get(account_id),
        };
        Ok(unlogged
            .into_iter()
            .flatten()
            .map(|(request_id, charge)| UnloggedCharge { account_id: account_id.to_string(), request_id: request_id.clone(), cost: charge.cost })
            .collect())
    }

    async fn repair_balance(&self, seen: &HotAccountView, balance: Money) -> StoreResult<bool> {
        let mut accounts = self.lock()?;
        let Some(account) = accounts.get_mut(&seen.account_id) else { return Ok(false) };
        let unchanged = account.balance == seen.balance && account.last_fund_seq == seen.last_fund_seq;
        if !unchanged || !account.held.is_zero() || !account.unlogged.is_empty() {
            return Ok(false);
        }
        account.balance = balance;
        Ok(true)
    }
}

/// Returns a hold's funds and its request-count slot (the request did not happen, as far as
/// quotas are concerned).
fn release(account: &mut AccountState, hold: &Hold, periods: &Periods) -> StoreResult<()> {
    account.held = sub(account.held, hold.amount, "held")?;
    if let Some(key) = account.keys.get_mut(&hold.api_key_id) {
        key.held = sub(key.held, hold.amount, "key held")?;
    }
    if hold.day == periods.day {
        let today = account.requests_today.current(periods.day).saturating_sub(1);
        account.requests_today.set(periods.day, today);
    }
    if hold.month == periods.month {
        let this_month = account.requests_this_month.current(periods.month).saturating_sub(1);
        account.requests_this_month.set(periods.month, this_month);
    }
    debug_assert!(!account.held.is_negative(), "held never goes below zero");
    Ok(())
}

/// Writes a routing pin, within [`crate::hot::PINS_PER_ACCOUNT_MAX`] per account (expired
/// pins go first; a full account's new sessions go unpinned).
fn remember_pin(accounts: &mut Accounts, account_id: &str, pin: crate::hot::SessionPin, now_ms: i64) {
    let pins = accounts.pins.entry(account_id.to_string()).or_default();
    if pins.len() >= crate::hot::PINS_PER_ACCOUNT_MAX && !pins.contains_key(&pin.session) {
        pins.retain(|_, (_, expires_ms)| *expires_ms > now_ms);
        if pins.len() >= crate::hot::PINS_PER_ACCOUNT_MAX {
            return;
        }
    }
    let expires_ms = now_ms.saturating_add(i64::try_from(pin.ttl_ms).unwrap_or(i64::MAX));
    pins.insert(pin.session, (pin.channel, expires_ms));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use proptest::prelude::*;
    use tollgate_core::{Usage, UsageSource};

    use super::*;
    use crate::hot::Limits;
    use crate::model::RequestStatus;
    use crate::queue::{EventLog, channel_log};

    // The behaviour every hot store shares is checked by tests/hot_store.rs on this store, Redis
    // and Redis Cluster; these tests use what only the in-process store allows: moving its clock.

    /// A hot store whose clock the test moves, and a task acknowledging every logged event.
    fn store() -> (MemoryHotStore, Arc<AtomicI64>, tokio::task::JoinHandle<Vec<UsageEvent>>) {
        let now = Arc::new(AtomicI64::new(1_769_903_970_000));
        let clock_now = Arc::clone(&now);
        let (sender, log) = channel_log(1024);
        let acknowledger = tokio::spawn(async move {
            let mut events = Vec::new();
            loop {
                let batch = log.read_batch(64).await.unwrap();
                if batch.is_empty() {
                    return events;
                }
                events.extend(batch.iter().map(|delivery| delivery.event.clone()));
                log.ack(batch).await.unwrap();
            }
        });
        (MemoryHotStore::new(sender, Arc::new(move || clock_now.load(Ordering::SeqCst))), now, acknowledger)
    }

    async fn loaded(store: &MemoryHotStore, balance: i64) {
        let snapshot = AccountSnapshot { unlogged: Vec::new(), account_id: "a".into(), balance: Money::from_nanos(balance), last_fund_seq: 0, charged_request_ids: vec!["old".into()], counters: CounterSeed::default() };
        assert!(store.load_account(snapshot.clone()).await.unwrap());
        assert!(!store.load_account(snapshot).await.unwrap(), "a second load changes nothing");
    }

    fn request(id: &str, hold: i64) -> AuthorizeRequest {
        AuthorizeRequest {
            account_id: "a".into(),
            api_key_id: "k".into(),
            request_id: id.into(),
            hold: Money::from_nanos(hold),
            hold_tokens: 10,
            limits: Limits::default(),
            hold_ttl_ms: 1_000,
        }
    }

    fn event(id: &str, cost: i64, status: RequestStatus) -> UsageEvent {
        UsageEvent {
            request_id: id.into(),
            account_id: "a".into(),
            api_key_id: "k".into(),
            provider: "p".into(),
            model: "m".into(),
            customer_type: "t".into(),
            price_id: Some(1),
            usage: Usage::default(),
            usage_source: UsageSource::Upstream,
            cost: Money::from_nanos(cost),
            status,
            latency_ms: 1,
            created_at_ms: 0,
            hot_balance_after: Money::ZERO,
            stored_response: None,
            request_fingerprint: None,
            attempts: Vec::new(),
            pin: None,
        }
    }

    async fn view(store: &MemoryHotStore) -> BalanceView {
        store.balance("a", "k").await.unwrap().unwrap()
    }

    /// Charged ids are kept at least RECENT_CHARGE_MS after their settle (the ledger answers for older
    /// ones, asked by the gateway); a charge the ledger has not committed is kept however long.
    #[tokio::test]
    async fn charged_ids_are_kept_for_the_recent_window_and_until_committed() {
        let (store, now, _) = store();
        loaded(&store, 100).await;
        assert!(matches!(store.authorize(&request("r", 10)).await.unwrap(), Authorization::Held { .. }));
        store.settle(event("r", 10, RequestStatus::Success)).await.unwrap();
        now.fetch_add(RECENT_CHARGE_MS - 1, Ordering::SeqCst);
        store.expire_holds().await.unwrap();
        assert_eq!(store.authorize(&request("r", 10)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged));
        // Forgotten with its bucket: within an eighth of the window more.
        now.fetch_add(RECENT_CHARGE_MS / 8 + 1, Ordering::SeqCst);
        store.expire_holds().await.unwrap();
        for id in ["r", "old"] {
            assert!(matches!(store.authorize(&request(id, 10)).await.unwrap(), Authorization::Held { .. }), "{id} is the ledger's to answer now");
        }

        // A log nobody commits: the settle gives up waiting (as the gateway's timeout does), the
        // charge stays unlogged, and its id stays charged past the window.
        let now = Arc::new(AtomicI64::new(1_769_903_970_000));
        let clock_now = Arc::clone(&now);
        let (sender, _uncommitted) = channel_log(16);
        let store = MemoryHotStore::new(sender, Arc::new(move || clock_now.load(Ordering::SeqCst)));
        loaded(&store, 100).await;
        assert!(matches!(store.authorize(&request("stuck", 10)).await.unwrap(), Authorization::Held { .. }));
        let settle = tokio::time::timeout(std::time::Duration::from_millis(50), store.settle(event("stuck", 10, RequestStatus::Success)));
        assert!(settle.await.is_err(), "no commit comes");
        now.fetch_add(RECENT_CHARGE_MS + 1, Ordering::SeqCst);
        store.expire_holds().await.unwrap();
        assert_eq!(store.authorize(&request("stuck", 10)).await.unwrap(), Authorization::Refused(Refusal::AlreadyCharged));
        assert_eq!(view(&store).await.balance, Money::from_nanos(90), "charged once");
    }

    /// The gateway gives up on a settle after `settle_timeout_ms`. Cancelled while the log is
    /// full, a settle has changed nothing (its event cannot be lost after a charge); cancelled
    /// while it waits for the commit, its charge still leaves `unlogged` once committed.
    #[tokio::test]
    async fn a_cancelled_settle_loses_no_event_and_leaves_nothing_unlogged() {
        let now = Arc::new(AtomicI64::new(1_769_903_970_000));
        let clock_now = Arc::clone(&now);
        let (sender, log) = channel_log(1);
        let store = Arc::new(MemoryHotStore::new(sender, Arc::new(move || clock_now.load(Ordering::SeqCst))));
        loaded(&store, 100).await;
        for id in ["a", "b"] {
            assert!(matches!(store.authorize(&request(id, 10)).await.unwrap(), Authorization::Held { .. }));
        }
        let short = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(short, store.settle(event("a", 10, RequestStatus::Success))).await.is_err(), "a waits for its commit");
        assert!(tokio::time::timeout(short, store.settle(event("b", 20, RequestStatus::Success))).await.is_err(), "b waits for a place");
        let seen = view(&store).await;
        assert_eq!((seen.balance, seen.held), (Money::from_nanos(90), Money::from_nanos(10)), "only a is charged; b still holds");

        let batch = log.read_batch(10).await.unwrap();
        assert_eq!(batch.iter().map(|delivery| delivery.event.request_id.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(store.unlogged_charges().await.unwrap().len(), 1);
        log.ack(batch).await.unwrap();
        let started = std::time::Instant::now();
        while !store.unlogged_charges().await.unwrap().is_empty() {
            assert!(started.elapsed() < std::time::Duration::from_secs(1), "a's commit took it out of unlogged");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        let settling = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.settle(event("b", 20, RequestStatus::Success)).await.unwrap() }
        });
        let batch = log.read_batch(10).await.unwrap();
        assert_eq!(batch.len(), 1);
        log.ack(batch).await.unwrap();
        assert!(!settling.await.unwrap().already_settled);
        let seen = view(&store).await;
        assert_eq!((seen.balance, seen.held), (Money::from_nanos(70), Money::ZERO), "b charged once, when it settled again");
        assert!(store.unlogged_charges().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn expired_holds_are_released_and_a_late_settle_still_charges_once() {
        let (store, now, _) = store();
        loaded(&store, 100).await;
        assert!(matches!(store.authorize(&request("slow", 80)).await.unwrap(), Authorization::Held { .. }));
        assert_eq!(store.expire_holds().await.unwrap(), 0, "not yet due");
        now.fetch_add(1_000, Ordering::SeqCst);
        assert_eq!(store.expire_holds().await.unwrap(), 1);
        assert_eq!(view(&store).await.held, Money::ZERO);
        let settlement = store.settle(event("slow", 30, RequestStatus::Success)).await.unwrap();
        assert!(!settlement.already_settled);
        assert_eq!(view(&store).await.balance, Money::from_nanos(70));
        assert_eq!(view(&store).await.held, Money::ZERO);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Authorize { id: u8, hold: i64 },
        Settle { id: u8, cost: i64 },
        Void { id: u8 },
        Expire,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..8, 0i64..50).prop_map(|(id, hold)| Step::Authorize { id, hold }),
            (0u8..8, 0i64..60).prop_map(|(id, cost)| Step::Settle { id, cost }),
            (0u8..8).prop_map(|id| Step::Void { id }),
            Just(Step::Expire),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the order of steps: the balance moves only by settled costs, each id is
        /// charged at most once, held equals the sum of open holds, and `available` goes below
        /// zero only by a settle's overrun of its own hold.
        #[test]
        fn hold_and_settle_arithmetic(steps in proptest::collection::vec(step(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let (store, now, _) = store();
                loaded(&store, 200).await;
                let mut open: HashMap<u8, i64> = HashMap::new();
                let mut charged: HashMap<u8, i64> = HashMap::new();
                let mut overrun = 0i64;
                for step in steps {
                    match step {
                        Step::Authorize { id, hold } => {
                            let before = view(&store).await;
                            let outcome = store.authorize(&request(&format!("r{id}"), hold)).await.unwrap();
                            if let Authorization::Held { available_after } = outcome {
                                prop_assert!(!open.contains_key(&id) && !charged.contains_key(&id));
                                prop_assert!(available_after.nanos() >= -overrun);
                                prop_assert!(before.balance.nanos() - before.held.nanos() >= hold);
                                open.insert(id, hold);
                            }
                        }
                        Step::Settle { id, cost } => {
                            if !open.contains_key(&id) && !charged.contains_key(&id) { continue; }
                            let settlement = store.settle(event(&format!("r{id}"), cost, RequestStatus::Success)).await.unwrap();
                            if let std::collections::hash_map::Entry::Vacant(e) = charged.entry(id) {
                                prop_assert_eq!(settlement.balance_before.nanos() - settlement.balance_after.nanos(), cost);
                                overrun += (cost - open.remove(&id).unwrap_or(0)).max(0);
                                e.insert(cost);
                            } else {
                                prop_assert!(settlement.already_settled);
                            }
                        }
                        Step::Void { id } => {
                            store.void(event(&format!("r{id}"), 0, RequestStatus::Failed)).await.unwrap();
                            open.remove(&id);
                        }
                        Step::Expire => {
                            now.fetch_add(1_000, Ordering::SeqCst);
                            store.expire_holds().await.unwrap();
                            open.clear();
                        }
                    }
                    let state = view(&store).await;
                    prop_assert_eq!(state.held.nanos(), open.values().sum::<i64>());
                    prop_assert_eq!(state.balance.nanos(), 200 - charged.values().sum::<i64>());
                }
                Ok(())
            })?;
        }
    }
}
