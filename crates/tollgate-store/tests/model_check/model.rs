//! The reference model: accounts, keys, holds, budgets, the usage log and the ledger, in plain
//! data structures, written from DESIGN.md's rules ("The charge protocol", "Invariants", "Funds
//! out only from free funds", "Idempotency is bound to its request") and not from the stores'
//! code. Every method is one operation of the protocol and returns what a correct store answers.
//!
//! Periods do not change within a run (the driver keeps the clock inside one UTC day), so a
//! key's daily, monthly and total spend are one number here, and so are the account's daily and
//! monthly request counts.

use std::collections::{BTreeMap, BTreeSet};

/// A hold: funds reserved for one request in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub key: String,
    pub amount: i64,
    /// Authorized with a zero TTL: the next expiry sweep releases it.
    pub short_ttl: bool,
}

/// A key's hot counters: its open holds and what it spent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    pub held: i64,
    pub spent: i64,
}

/// A usage event on its way from settle (or void) to the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub request_id: String,
    pub key: String,
    pub cost: i64,
    /// A void's event: a failed request, cost zero, never a charge.
    pub failed: bool,
    /// The ledger refuses it for good (a price it does not know): it must be dead-lettered.
    pub poison: bool,
    /// Read by a worker that crashed before acknowledging it (`Some(true)`: after its commit).
    pub delivered: Option<bool>,
}

/// One ledger row as the model expects it, in ledger order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub ledger_seq: i64,
    /// `None` for a fund transaction.
    pub request_id: Option<String>,
    pub failed: bool,
    /// Signed: funds in positive, usage costs negative.
    pub amount: i64,
    pub balance_before: i64,
    pub balance_after: i64,
}

/// One account: its hot state (when loaded), its log entries and its ledger.
#[derive(Clone, Debug, Default)]
pub struct Account {
    pub loaded: bool,
    pub balance: i64,
    pub held: i64,
    pub fund_seq: i64,
    pub holds: BTreeMap<String, Hold>,
    /// Request ids the hot store must refuse as charged.
    pub charged: BTreeSet<String>,
    /// Requests counted against the quotas: open holds plus settled requests.
    pub requests: u64,
    pub keys: BTreeMap<String, KeyState>,
    /// Events in the usage log, oldest first.
    pub log: Vec<Event>,
    /// Charges the ledger refused, parked where an operator sees them.
    pub dead: Vec<Event>,
    pub rows: Vec<Row>,
    pub ledger_balance: i64,
    pub ledger_charged: BTreeSet<String>,
    pub ledger_key_spent: BTreeMap<String, i64>,
    pub ledger_requests: u64,
    pub last_fund_seq: i64,
    /// Σ of what settles charged above their hold: how far below zero `available` may go (I3).
    pub overrun_allowed: i64,
    /// Settles whose cost exceeded their hold (I7 is the gateway's to enforce; counted here).
    pub hold_exceeded: u64,
}

/// What `authorize` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    Held { available_after: i64 },
    NotLoaded,
    AlreadyCharged,
    InProgress,
    DailyQuota,
    MonthlyQuota,
    Budget(&'static str),
    Insufficient { available: i64, required: i64 },
}

/// What `settle` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleOutcome {
    NotLoaded,
    Settled { before: i64, after: i64 },
    Already { balance: i64 },
}

/// What a withdrawal (refund or negative adjustment) answers under the funds-out rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WithdrawOutcome {
    Refused { free: i64 },
    Recorded { ledger_seq: i64 },
}

/// The limits of one authorize, in the model's plain integers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelLimits {
    pub credit: i64,
    pub daily_quota: Option<u64>,
    pub monthly_quota: Option<u64>,
    pub budget_daily: Option<i64>,
    pub budget_monthly: Option<i64>,
    pub budget_total: Option<i64>,
}

/// The whole system as DESIGN.md says it behaves.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub accounts: BTreeMap<String, Account>,
    /// DESIGN: settle counts the request against the quotas, a late one (its hold expired, its
    /// slot given back) too. False models what the stores do today (they count a request only
    /// at authorize): see `ops::Families::late_settle_counts_request`.
    pub late_settle_counts_request: bool,
}

impl Account {
    fn key(&mut self, key: &str) -> &mut KeyState {
        self.keys.entry(key.to_string()).or_default()
    }

    /// Charges not in the ledger yet: in the log or dead-lettered.
    pub fn unlogged(&self) -> impl Iterator<Item = &Event> {
        self.in_log().filter(|event| event.delivered != Some(true))
    }

    /// Charges the log (or its dead letters) still holds, committed or not: what a store's
    /// `unlogged_charges` reports ("may not be in the ledger yet").
    pub fn in_log(&self) -> impl Iterator<Item = &Event> {
        self.log.iter().chain(&self.dead).filter(|event| !event.failed && event.cost > 0)
    }

    /// Balance − held − charges not yet in the ledger: what a refund may take.
    pub fn free_funds(&self) -> i64 {
        if self.loaded {
            // The hot balance has every charge deducted already, logged or not.
            self.balance - self.held
        } else {
            self.ledger_balance - self.unlogged().map(|event| event.cost).sum::<i64>()
        }
    }

    /// Releases a hold's funds from the hold's own key; `slot` also gives back its request slot
    /// (void, expire: the request did not happen).
    fn release(&mut self, request_id: &str, slot: bool) -> Option<Hold> {
        let hold = self.holds.remove(request_id)?;
        self.held -= hold.amount;
        self.key(&hold.key).held -= hold.amount;
        if slot {
            self.requests -= 1;
        }
        Some(hold)
    }

    /// Writes one event into the ledger: a charge once per request id, a failure always.
    fn record(&mut self, event: &Event) -> bool {
        if !event.failed && !self.ledger_charged.insert(event.request_id.clone()) {
            return false;
        }
        let before = self.ledger_balance;
        self.ledger_balance -= event.cost;
        let ledger_seq = self.rows.len() as i64 + 1;
        self.rows.push(Row {
            ledger_seq,
            request_id: Some(event.request_id.clone()),
            failed: event.failed,
            amount: -event.cost,
            balance_before: before,
            balance_after: self.ledger_balance,
        });
        if !event.failed {
            *self.ledger_key_spent.entry(event.key.clone()).or_default() += event.cost;
            self.ledger_requests += 1;
        }
        true
    }

    fn record_fund(&mut self, amount: i64) -> i64 {
        let before = self.ledger_balance;
        self.ledger_balance += amount;
        let ledger_seq = self.rows.len() as i64 + 1;
        self.rows.push(Row { ledger_seq, request_id: None, failed: false, amount, balance_before: before, balance_after: self.ledger_balance });
        self.last_fund_seq = ledger_seq;
        ledger_seq
    }
}

impl Model {
    pub fn new(account_ids: &[String]) -> Model {
        Model { accounts: account_ids.iter().map(|id| (id.clone(), Account::default())).collect(), late_settle_counts_request: true }
    }

    pub fn account(&self, account_id: &str) -> &Account {
        &self.accounts[account_id]
    }

    fn account_mut(&mut self, account_id: &str) -> &mut Account {
        self.accounts.get_mut(account_id).expect("the model knows every account of the run")
    }

    /// DESIGN "Authorize": idempotency, quotas, key budgets (spent + the key's open holds), then
    /// `available = balance + credit_limit − holds ≥ hold`; nothing changes on refusal.
    pub fn authorize(&mut self, account_id: &str, key: &str, request_id: &str, hold: i64, limits: &ModelLimits, short_ttl: bool) -> AuthorizeOutcome {
        let account = self.account_mut(account_id);
        if !account.loaded {
            return AuthorizeOutcome::NotLoaded;
        }
        // A request id belongs to whoever used it first: another key gets a refusal too.
        if account.charged.contains(request_id) {
            return AuthorizeOutcome::AlreadyCharged;
        }
        if account.holds.contains_key(request_id) {
            return AuthorizeOutcome::InProgress;
        }
        if limits.daily_quota.is_some_and(|quota| account.requests >= quota) {
            return AuthorizeOutcome::DailyQuota;
        }
        if limits.monthly_quota.is_some_and(|quota| account.requests >= quota) {
            return AuthorizeOutcome::MonthlyQuota;
        }
        let state = account.keys.get(key).cloned().unwrap_or_default();
        for (period, budget) in [("daily", limits.budget_daily), ("monthly", limits.budget_monthly), ("total", limits.budget_total)] {
            if budget.is_some_and(|budget| state.spent + state.held + hold > budget) {
                return AuthorizeOutcome::Budget(period);
            }
        }
        let available = account.balance + limits.credit - account.held;
        if available < hold {
            return AuthorizeOutcome::Insufficient { available, required: hold };
        }
        account.held += hold;
        account.key(key).held += hold;
        account.requests += 1;
        account.holds.insert(request_id.to_string(), Hold { key: key.to_string(), amount: hold, short_ttl });
        AuthorizeOutcome::Held { available_after: available - hold }
    }

    /// DESIGN "Settle": release the hold (from the key that holds it), deduct the real cost (it
    /// may exceed the hold), count the request and the key's spend, append the event — once per
    /// request id, an expired hold notwithstanding.
    pub fn settle(&mut self, account_id: &str, key: &str, request_id: &str, cost: i64, poison: bool) -> SettleOutcome {
        let late_settle_counts_request = self.late_settle_counts_request;
        let account = self.account_mut(account_id);
        if !account.loaded {
            return SettleOutcome::NotLoaded;
        }
        if account.charged.contains(request_id) {
            return SettleOutcome::Already { balance: account.balance };
        }
        let before = account.balance;
        let hold = account.release(request_id, false);
        let held_amount = hold.as_ref().map_or(0, |hold| hold.amount);
        if hold.is_none() && late_settle_counts_request {
            // Its hold expired (or was lost): the request still happened and counts.
            account.requests += 1;
        }
        if cost > held_amount {
            account.hold_exceeded += 1;
            account.overrun_allowed += cost - held_amount;
        }
        account.balance -= cost;
        account.key(key).spent += cost;
        account.charged.insert(request_id.to_string());
        account.log.push(Event { request_id: request_id.to_string(), key: key.to_string(), cost, failed: false, poison, delivered: None });
        SettleOutcome::Settled { before, after: account.balance }
    }

    /// DESIGN "Void": release the hold and its request slot, record the failure (cost 0).
    pub fn void(&mut self, account_id: &str, key: &str, request_id: &str) {
        let account = self.account_mut(account_id);
        if !account.loaded || account.release(request_id, true).is_none() {
            return;
        }
        account.log.push(Event { request_id: request_id.to_string(), key: key.to_string(), cost: 0, failed: true, poison: false, delivered: None });
    }

    /// DESIGN "Expire": every hold past its expiry is released; returns how many.
    pub fn expire(&mut self) -> u64 {
        let mut released = 0;
        for account in self.accounts.values_mut().filter(|account| account.loaded) {
            let due: Vec<String> = account.holds.iter().filter(|(_, hold)| hold.short_ttl).map(|(id, _)| id.clone()).collect();
            for request_id in due {
                account.release(&request_id, true);
                released += 1;
            }
        }
        released
    }

    /// A deposit (or positive adjustment) commits in the ledger, then applies to the hot store
    /// by its ledger position. Returns that position.
    pub fn deposit(&mut self, account_id: &str, amount: i64) -> i64 {
        let account = self.account_mut(account_id);
        let ledger_seq = account.record_fund(amount);
        if account.loaded {
            account.balance += amount;
            account.fund_seq = ledger_seq;
        }
        ledger_seq
    }

    /// DESIGN "Funds out only from free funds": a refund or negative adjustment beyond
    /// balance − held − unlogged charges is refused and changes nothing.
    pub fn withdraw(&mut self, account_id: &str, amount: i64) -> WithdrawOutcome {
        let free = self.account(account_id).free_funds();
        if amount > free {
            return WithdrawOutcome::Refused { free };
        }
        WithdrawOutcome::Recorded { ledger_seq: self.deposit(account_id, -amount) }
    }

    /// Forgets the account's hot state; its open holds go with it (their keys hold nothing more).
    pub fn unload(&mut self, account_id: &str) {
        let account = self.account_mut(account_id);
        account.loaded = false;
        account.holds.clear();
        account.held = 0;
        account.charged.clear();
        for key in account.keys.values_mut() {
            key.held = 0;
        }
    }

    /// A load from the ledger: its balance less the charges it does not have yet, its charged
    /// ids and those still on their way, its counters.
    pub fn load(&mut self, account_id: &str) {
        let account = self.account_mut(account_id);
        debug_assert!(!account.loaded && account.holds.is_empty());
        let unlogged: i64 = account.unlogged().map(|event| event.cost).sum();
        account.loaded = true;
        account.balance = account.ledger_balance - unlogged;
        account.held = 0;
        account.fund_seq = account.last_fund_seq;
        account.charged = account.ledger_charged.clone();
        account.charged.extend(account.log.iter().chain(&account.dead).filter(|event| !event.failed).map(|event| event.request_id.clone()));
        let mut spent = account.ledger_key_spent.clone();
        let mut requests = account.ledger_requests;
        // Every charge the ledger does not have yet counts as a request, a free one too.
        let owed = account.log.iter().chain(&account.dead).filter(|event| !event.failed && event.delivered != Some(true));
        for event in owed {
            *spent.entry(event.key.clone()).or_default() += event.cost;
            requests += 1;
        }
        account.requests = requests;
        for (key, state) in &mut account.keys {
            state.spent = spent.get(key).copied().unwrap_or(0);
            state.held = 0;
        }
    }

    /// The worker writes every event in the log: charges once, refused ones dead-lettered, and
    /// what a crashed worker had committed is skipped (a failure's row is written again: only
    /// charges are deduplicated). Returns the events written, for re-delivery later.
    pub fn drain(&mut self) -> Vec<(String, Event)> {
        let mut written = Vec::new();
        for (account_id, account) in &mut self.accounts {
            for event in std::mem::take(&mut account.log) {
                if event.poison {
                    account.dead.push(Event { delivered: None, ..event });
                    continue;
                }
                if event.delivered != Some(true) || event.failed {
                    account.record(&event);
                }
                written.push((account_id.clone(), Event { delivered: None, ..event }));
            }
        }
        written
    }

    /// A worker read the whole log and crashed before acknowledging; `committed`: after its
    /// ledger commit (a refused event is neither committed nor parked then).
    pub fn crash(&mut self, committed: bool) {
        for account in self.accounts.values_mut() {
            let mut log = std::mem::take(&mut account.log);
            for event in &mut log {
                if event.delivered == Some(true) {
                    // Committed already: a charge is skipped, a failure written again.
                    if committed && event.failed {
                        account.record(event);
                    }
                    continue;
                }
                if committed && !event.poison {
                    account.record(event);
                    event.delivered = Some(true);
                } else {
                    event.delivered = Some(false);
                }
            }
            account.log = log;
        }
    }

    /// A sweeper parks every entry delivered to a crashed worker (committed or not) in the dead
    /// letters; what had been committed is in the ledger too.
    pub fn park_delivered(&mut self) {
        for account in self.accounts.values_mut() {
            let (parked, kept): (Vec<Event>, Vec<Event>) = std::mem::take(&mut account.log).into_iter().partition(|event| event.delivered.is_some());
            account.log = kept;
            account.dead.extend(parked.into_iter().filter(|event| !event.failed));
        }
    }

    /// A usage event delivered to the ledger again: a charge is a duplicate, a failure a new row.
    pub fn redeliver(&mut self, account_id: &str, event: &Event) -> bool {
        self.account_mut(account_id).record(event)
    }

    /// I3: `available = balance + credit − held` never goes below zero by more than the
    /// settles' overruns (`credit_max`: the largest credit limit the run authorized with).
    pub fn check_no_overspend(&self, credit_max: i64) -> Result<(), String> {
        for (id, account) in self.accounts.iter().filter(|(_, account)| account.loaded) {
            let available = account.balance + credit_max - account.held;
            if available < -account.overrun_allowed {
                return Err(format!("I3: {id} available {available} is below minus the overruns {}", account.overrun_allowed));
            }
        }
        Ok(())
    }
}
