//! `HotStore` on Redis: each method is one call of `tollgate.lua`, with the same semantics as the
//! in-process store (`memory.rs`); the shared conformance tests hold both to it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use redis::streams::StreamRangeReply;
use redis::{Script, Value};
use tollgate_core::Money;

use super::{Connection, KeySpace, connect};
use crate::clock::Clock;
use crate::error::{StoreError, StoreResult};
use crate::hot::{
    AccountSnapshot, Authorization, AuthorizeRequest, BalanceView, BudgetPeriod, FundApplication, HotStore, Refusal,
    Settlement, WithdrawalHold,
};
use crate::model::{ChargedRequest, StoredResponse, UsageEvent};
use crate::operations::{HotAccountView, UnloggedCharge};

/// Holds released per shard per sweep call at most.
const EXPIRE_BATCH_MAX: u32 = 1_000;
/// Charged request ids per call when an account is loaded: a busy account's last hour can be
/// millions, and one script call blocks Redis for all of it (about 5 µs per id).
pub const LOAD_IDS_PER_CALL: usize = 1_000;
/// Accounts read per pipeline by `hot_views`.
const VIEW_PIPELINE_MAX: usize = 1_000;
/// Stream entries read per XRANGE by `unlogged_charges`.
const STREAM_PAGE_MAX: usize = 1_000;

/// The Redis hot store.
pub struct RedisHotStore {
    connection: Connection,
    keys: KeySpace,
    script: Script,
    /// A test's clock, sent with every call; `None` (production): the server's `TIME` decides,
    /// one clock for every gateway sharing the Redis.
    clock: Option<Clock>,
    /// How long after its settle a charged id is remembered ([`crate::hot::RECENT_CHARGE_MS`]).
    recent_charge_ms: i64,
}

impl RedisHotStore {
    /// # Errors
    /// A bad URL or prefix, or Redis unreachable.
    pub async fn connect(url: &str, prefix: &str, shards: u16) -> StoreResult<RedisHotStore> {
        let keys = KeySpace::new(prefix, shards)?;
        let connection = connect(url).await?;
        Ok(RedisHotStore { connection, keys, script: super::tollgate_script(), clock: None, recent_charge_ms: crate::hot::RECENT_CHARGE_MS })
    }

    /// The same store remembering charged ids `recent_charge_ms` after their settle
    /// (`limits.recent_charge_ms`; [`crate::hot::RECENT_CHARGE_MS`] says how long that must be).
    #[must_use]
    pub fn remembering_charges_for(mut self, recent_charge_ms: i64) -> RedisHotStore {
        self.recent_charge_ms = recent_charge_ms;
        self
    }

    /// The same store reading `clock` instead of the server's `TIME`: the moment each call is
    /// made at (its periods, its holds' expiry) goes with the call (`tollgate.lua`'s header), so
    /// a test puts requests on either side of a period's end as it does with the in-process
    /// store. Never set in production.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> RedisHotStore {
        self.clock = Some(clock);
        self
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }

    /// One script call, routed by `route_key`.
    async fn call(&self, route_key: &str, arguments: &[&str]) -> StoreResult<Value> {
        let mut invocation = self.script.key(route_key);
        let mut arguments = arguments.iter();
        if let Some(operation) = arguments.next() {
            match &self.clock {
                // "<operation>@<ms>": the script's time for this call.
                Some(clock) => invocation.arg(format!("{operation}@{}", clock())),
                None => invocation.arg(*operation),
            };
        }
        for argument in arguments {
            invocation.arg(*argument);
        }
        let mut connection = self.connection.clone();
        invocation.invoke_async(&mut connection).await.map_err(|error| {
            if error.to_string().contains("money_out_of_range") {
                StoreError::Overflow("hot store money range (±2^53 nano-units)")
            } else if error.to_string().contains("account_not_loaded") {
                StoreError::NotFound { entity: "hot account", id: String::new() }
            } else {
                StoreError::Unavailable(format!("redis: {error}"))
            }
        })
    }

    fn account_key(&self, base: &str, account_id: &str) -> String {
        format!("{base}:acct:{account_id}")
    }
}

/// A script reply as strings (bulk strings and integers both).
fn texts(value: Value) -> StoreResult<Vec<String>> {
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| StoreError::Corrupt("non-UTF-8 script reply".into())),
            Value::SimpleString(text) => Ok(text),
            Value::Int(number) => Ok(number.to_string()),
            other => Err(StoreError::Corrupt(format!("unexpected script reply {other:?}"))),
        })
        .collect()
}

fn number(texts: &[String], index: usize) -> StoreResult<i64> {
    texts
        .get(index)
        .and_then(|text| text.parse::<i64>().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("script reply {texts:?} lacks a number at {index}")))
}

fn money_at(texts: &[String], index: usize) -> StoreResult<Money> {
    number(texts, index).map(Money::from_nanos)
}

fn count_at(texts: &[String], index: usize) -> StoreResult<u64> {
    u64::try_from(number(texts, index)?).map_err(|_| StoreError::Corrupt("negative counter".into()))
}

fn optional(value: Option<impl ToString>) -> String {
    value.map(|value| value.to_string()).unwrap_or_default()
}

/// "R<status>\n<content type>\n<body>": binary-safe in a Redis string, no encoding overhead.
fn encode_stored(stored: &StoredResponse) -> Vec<u8> {
    let mut encoded = format!("R{}\n{}\n", stored.status, stored.content_type).into_bytes();
    encoded.extend_from_slice(&stored.body);
    encoded
}

/// The idempotency record a settle leaves while the ledger lacks the row: "C<charged at, unix
/// ms>\n<key id>\n<request fingerprint>\n" then the stored response, if any (a body that is not
/// UTF-8 is replayed from the ledger only). The worker's ack trims it to "1": the ledger then
/// answers.
fn encode_charged(event: &UsageEvent) -> String {
    let mut record = format!("C{}\n{}\n{}\n", event.created_at_ms, event.api_key_id, event.request_fingerprint.as_deref().unwrap_or_default());
    if let Some(stored) = event.stored_response.as_ref().and_then(|stored| String::from_utf8(encode_stored(stored)).ok()) {
        record.push_str(&stored);
    }
    record
}

/// A record [`encode_charged`] wrote; `None` for "1" and for the records of older versions
/// ("B…", without the charge's time, and bare responses), which send the caller to the ledger.
fn decode_charged(bytes: &[u8]) -> Option<ChargedRequest> {
    let rest = bytes.strip_prefix(b"C")?;
    let (charged_at, rest) = line(rest)?;
    let (api_key_id, rest) = line(rest)?;
    let (fingerprint, rest) = line(rest)?;
    Some(ChargedRequest {
        api_key_id: api_key_id.to_string(),
        charged_at_ms: charged_at.parse().ok()?,
        request_fingerprint: (!fingerprint.is_empty()).then(|| fingerprint.to_string()),
        response: if rest.is_empty() { None } else { Some(decode_stored(rest)?) },
    })
}

/// The text before the first newline, and what follows it.
fn line(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|byte| *byte == b'\n')?;
    Some((std::str::from_utf8(&bytes[..end]).ok()?, &bytes[end + 1..]))
}

fn decode_stored(bytes: &[u8]) -> Option<StoredResponse> {
    let rest = bytes.strip_prefix(b"R")?;
    let (status, rest) = line(rest)?;
    let (content_type, body) = line(rest)?;
    Some(StoredResponse { status: status.parse().ok()?, content_type: content_type.to_string(), body: body.to_vec() })
}

fn event_json(event: &UsageEvent) -> StoreResult<String> {
    serde_json::to_string(event).map_err(|error| StoreError::Invalid(format!("usage event: {error}")))
}

#[async_trait]
impl HotStore for RedisHotStore {
    fn recent_charge_ms(&self) -> i64 {
        self.recent_charge_ms
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await.map_err(|error| StoreError::Unavailable(format!("redis: {error}")))?;
        Ok(())
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> StoreResult<Authorization> {
        Ok(self.authorize_pinned(request, None).await?.0)
    }

    async fn lock_session(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<Option<u64>> {
        let base = self.keys.account_base(account_id);
        let ttl = ttl_ms.max(1).to_string();
        let reply = self.call(&self.account_key(&base, account_id), &["lock_session", &base, account_id, session, token, &ttl]).await?;
        let fence: u64 = redis::from_redis_value(reply).map_err(|error| StoreError::Corrupt(format!("lock_session answered {error}")))?;
        Ok((fence > 0).then_some(fence))
    }

    async fn renew_session_lock(&self, account_id: &str, session: &str, token: &str, ttl_ms: u64) -> StoreResult<bool> {
        let base = self.keys.account_base(account_id);
        let ttl = ttl_ms.max(1).to_string();
        let reply = self.call(&self.account_key(&base, account_id), &["renew_session_lock", &base, account_id, session, token, &ttl]).await?;
        Ok(redis::from_redis_value::<i64>(reply).map_err(|error| StoreError::Corrupt(format!("renew_session_lock answered {error}")))? == 1)
    }

    async fn unlock_session(&self, account_id: &str, session: &str, token: Option<&str>) -> StoreResult<bool> {
        let base = self.keys.account_base(account_id);
        let reply = self.call(&self.account_key(&base, account_id), &["unlock_session", &base, account_id, session, token.unwrap_or_default()]).await?;
        Ok(redis::from_redis_value::<i64>(reply).map_err(|error| StoreError::Corrupt(format!("unlock_session answered {error}")))? == 1)
    }

    async fn clear_pins(&self, account_id: &str) -> StoreResult<()> {
        let base = self.keys.account_base(account_id);
        self.call(&self.account_key(&base, account_id), &["clear_pins", &base, account_id]).await?;
        Ok(())
    }

    async fn authorize_pinned(&self, request: &AuthorizeRequest, session: Option<&str>) -> StoreResult<(Authorization, Option<String>)> {
        debug_assert!(!request.hold.is_negative(), "a hold is never negative");
        let base = self.keys.account_base(&request.account_id);
        let limits = &request.limits;
        let arguments = [
            "authorize".to_string(),
            base.clone(),
            request.account_id.clone(),
            request.api_key_id.clone(),
            request.request_id.clone(),
            request.hold.nanos().to_string(),
            request.hold_tokens.to_string(),
            request.hold_ttl_ms.to_string(),
            limits.credit_limit.nanos().to_string(),
            optional(limits.daily_request_quota),
            optional(limits.monthly_request_quota),
            optional(limits.key_budget_daily.map(Money::nanos)),
            optional(limits.key_budget_monthly.map(Money::nanos)),
            optional(limits.key_budget_total.map(Money::nanos)),
            optional(limits.key_requests_per_minute),
            optional(limits.key_tokens_per_minute),
            self.recent_charge_ms.to_string(),
            session.unwrap_or_default().to_string(),
        ];
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let reply = texts(self.call(&self.account_key(&base, &request.account_id), &arguments).await?)?;
        let refusal = match (reply.first().map(String::as_str), reply.get(1).map(String::as_str)) {
            (Some("held"), _) => {
                let pinned = reply.get(2).filter(|channel| !channel.is_empty()).cloned();
                return Ok((Authorization::Held { available_after: money_at(&reply, 1)? }, pinned));
            }
            (Some("refused"), Some("not_loaded")) => Refusal::AccountNotLoaded,
            (Some("refused"), Some("already_charged")) => Refusal::AlreadyCharged,
            (Some("refused"), Some("in_progress")) => Refusal::InProgress,
            (Some("refused"), Some("rate")) => Refusal::RateLimited { retry_after_secs: count_at(&reply, 2)? },
            (Some("refused"), Some("daily")) => Refusal::DailyQuotaExceeded { retry_after_secs: count_at(&reply, 2)? },
            (Some("refused"), Some("monthly")) => Refusal::MonthlyQuotaExceeded { retry_after_secs: count_at(&reply, 2)? },
            (Some("refused"), Some("budget")) => {
                let period = match reply.get(2).map(String::as_str) {
                    Some("daily") => BudgetPeriod::Daily,
                    Some("monthly") => BudgetPeriod::Monthly,
                    _ => BudgetPeriod::Total,
                };
                let retry_after_secs = u64::try_from(number(&reply, 3)?).ok();
                Refusal::KeyBudgetExceeded { period, retry_after_secs }
            }
            (Some("refused"), Some("insufficient")) => {
                Refusal::InsufficientBalance { available: money_at(&reply, 2)?, required: money_at(&reply, 3)? }
            }
            _ => return Err(StoreError::Corrupt(format!("unexpected authorize reply {reply:?}"))),
        };
        Ok((Authorization::Refused(refusal), None))
    }

    async fn settle(&self, event: UsageEvent) -> StoreResult<Settlement> {
        if event.cost.is_negative() {
            return Err(StoreError::Invalid(format!("negative cost for request {}", event.request_id)));
        }
        let base = self.keys.account_base(&event.account_id);
        // The binding and the response, for retries before the ledger has the row.
        let stored = encode_charged(&event);
        let json = event_json(&event)?;
        let cost = event.cost.nanos().to_string();
        let window = self.recent_charge_ms.to_string();
        let (session, channel, pin_ttl) = match &event.pin {
            Some(pin) => (pin.session.as_str(), pin.channel.as_str(), pin.ttl_ms.max(1).to_string()),
            None => ("", "", String::new()),
        };
        let arguments = ["settle", &base, &event.account_id, &event.api_key_id, &event.request_id, &cost, &json, &stored, &window, session, channel, &pin_ttl];
        let reply = texts(self.call(&self.account_key(&base, &event.account_id), &arguments).await?)?;
        match reply.first().map(String::as_str) {
            Some("settled") => Ok(Settlement { balance_before: money_at(&reply, 1)?, balance_after: money_at(&reply, 2)?, already_settled: false }),
            Some("already") => {
                let balance = money_at(&reply, 1)?;
                Ok(Settlement { balance_before: balance, balance_after: balance, already_settled: true })
            }
            _ => Err(StoreError::Corrupt(format!("unexpected settle reply {reply:?}"))),
        }
    }

    async fn void(&self, event: UsageEvent) -> StoreResult<()> {
        let base = self.keys.account_base(&event.account_id);
        let json = event_json(&event)?;
        let arguments = ["void", &base, &event.account_id, &event.request_id, &json];
        self.call(&self.account_key(&base, &event.account_id), &arguments).await?;
        Ok(())
    }

    async fn expire_holds(&self) -> StoreResult<u64> {
        let mut released = 0;
        let limit = EXPIRE_BATCH_MAX.to_string();
        for shard in 0..self.keys.shards() {
            let base = self.keys.base(shard);
            let reply = texts(self.call(&format!("{base}:hold_expiry"), &["expire", &base, &limit]).await?)?;
            released += count_at(&reply, 0)?;
        }
        Ok(released)
    }

    async fn load_account(&self, snapshot: AccountSnapshot) -> StoreResult<bool> {
        let base = self.keys.account_base(&snapshot.account_id);
        let balance = snapshot.balance.nanos().to_string();
        let fund_seq = snapshot.last_fund_seq.to_string();
        let seed = &snapshot.counters;
        let mut numbers = vec![
            seed.day.to_string(),
            seed.month.to_string(),
            seed.requests_today.to_string(),
            seed.requests_this_month.to_string(),
            seed.keys.len().to_string(),
        ];
        for key in &seed.keys {
            numbers.extend([key.spent_today, key.spent_this_month, key.spent_total].map(|spent| spent.nanos().to_string()));
        }
        let mut arguments = vec!["load", base.as_str(), snapshot.account_id.as_str(), balance.as_str(), fund_seq.as_str()];
        arguments.extend(numbers[..5].iter().map(String::as_str));
        for (key, spent) in seed.keys.iter().zip(numbers[5..].chunks(3)) {
            arguments.push(&key.api_key_id);
            arguments.extend(spent.iter().map(String::as_str));
        }
        let account_key = self.account_key(&base, &snapshot.account_id);
        // The charged ids go in before the account does: a call failing half-way leaves the
        // account unloaded, and the next load sends them all again.
        let window = self.recent_charge_ms.to_string();
        for chunk in snapshot.charged_request_ids.chunks(LOAD_IDS_PER_CALL) {
            let mut arguments = vec!["remember", base.as_str(), snapshot.account_id.as_str(), window.as_str()];
            arguments.extend(chunk.iter().map(String::as_str));
            self.call(&account_key, &arguments).await?;
        }
        let reply = texts(self.call(&account_key, &arguments).await?)?;
        Ok(number(&reply, 0)? == 1)
    }

    async fn apply_fund(&self, account_id: &str, fund_ledger_seq: i64, amount: Money, withdrawal_id: Option<&str>) -> StoreResult<FundApplication> {
        let base = self.keys.account_base(account_id);
        let (seq, amount) = (fund_ledger_seq.to_string(), amount.nanos().to_string());
        let arguments = ["apply_fund", &base, account_id, &seq, &amount, withdrawal_id.unwrap_or("")];
        let reply = texts(self.call(&self.account_key(&base, account_id), &arguments).await?)?;
        match reply.first().map(String::as_str) {
            Some("applied") => Ok(FundApplication::Applied { balance_after: money_at(&reply, 1)? }),
            Some("already") => Ok(FundApplication::AlreadyApplied),
            Some("not_loaded") => Ok(FundApplication::AccountNotLoaded),
            _ => Err(StoreError::Corrupt(format!("unexpected apply_fund reply {reply:?}"))),
        }
    }

    async fn hold_withdrawal(&self, account_id: &str, withdrawal_id: &str, amount: Money, ttl_ms: u64) -> StoreResult<WithdrawalHold> {
        debug_assert!(amount.is_positive(), "a withdrawal reserves a positive amount");
        let base = self.keys.account_base(account_id);
        let (amount, ttl_ms) = (amount.nanos().to_string(), ttl_ms.to_string());
        let arguments = ["hold_withdrawal", &base, account_id, withdrawal_id, &amount, &ttl_ms];
        let reply = texts(self.call(&self.account_key(&base, account_id), &arguments).await?)?;
        match reply.first().map(String::as_str) {
            Some("held") => Ok(WithdrawalHold::Held),
            Some("insufficient") => Ok(WithdrawalHold::Insufficient { free: money_at(&reply, 1)? }),
            Some("in_progress") => Ok(WithdrawalHold::InProgress),
            Some("not_loaded") => Ok(WithdrawalHold::AccountNotLoaded),
            _ => Err(StoreError::Corrupt(format!("unexpected hold_withdrawal reply {reply:?}"))),
        }
    }

    async fn release_withdrawal(&self, account_id: &str, withdrawal_id: &str) -> StoreResult<()> {
        let base = self.keys.account_base(account_id);
        self.call(&self.account_key(&base, account_id), &["release_withdrawal", &base, account_id, withdrawal_id]).await?;
        Ok(())
    }

    async fn balance(&self, account_id: &str, api_key_id: &str) -> StoreResult<Option<BalanceView>> {
        let base = self.keys.account_base(account_id);
        let reply = texts(self.call(&self.account_key(&base, account_id), &["balance", &base, account_id, api_key_id]).await?)?;
        if reply.is_empty() {
            return Ok(None);
        }
        Ok(Some(BalanceView {
            balance: money_at(&reply, 0)?,
            held: money_at(&reply, 1)?,
            last_fund_seq: number(&reply, 2)?,
            daily_requests_used: count_at(&reply, 3)?,
            monthly_requests_used: count_at(&reply, 4)?,
            key_spent_daily: money_at(&reply, 5)?,
            key_spent_monthly: money_at(&reply, 6)?,
            key_spent_total: money_at(&reply, 7)?,
        }))
    }

    async fn charged_request(&self, account_id: &str, request_id: &str) -> StoreResult<Option<ChargedRequest>> {
        let base = self.keys.account_base(account_id);
        let reply = self.call(&self.account_key(&base, account_id), &["stored", &base, account_id, request_id]).await?;
        match reply {
            Value::BulkString(bytes) => Ok(decode_charged(&bytes)),
            _ => Ok(None),
        }
    }

    async fn unload_account(&self, account_id: &str) -> StoreResult<()> {
        let base = self.keys.account_base(account_id);
        self.call(&self.account_key(&base, account_id), &["unload", &base, account_id]).await?;
        Ok(())
    }

    async fn hot_views(&self, account_ids: &[String]) -> StoreResult<Vec<Option<HotAccountView>>> {
        // One pipeline per shard and chunk: every key of a shard is in one cluster slot.
        let mut by_shard: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (index, account_id) in account_ids.iter().enumerate() {
            by_shard.entry(self.keys.shard_of(account_id)).or_default().push(index);
        }
        let mut views = vec![None; account_ids.len()];
        let mut connection = self.connection.clone();
        for (shard, indexes) in by_shard {
            let base = self.keys.base(shard);
            for chunk in indexes.chunks(VIEW_PIPELINE_MAX) {
                let mut pipeline = redis::pipe();
                for &index in chunk {
                    pipeline.cmd("HMGET").arg(self.account_key(&base, &account_ids[index])).arg("balance").arg("held").arg("fund_seq");
                }
                let replies: Vec<(Option<i64>, Option<i64>, Option<i64>)> =
                    pipeline.query_async(&mut connection).await.map_err(|error| StoreError::Unavailable(format!("redis: {error}")))?;
                for (&index, reply) in chunk.iter().zip(replies) {
                    if let (Some(balance), held, fund_seq) = reply {
                        views[index] = Some(HotAccountView {
                            account_id: account_ids[index].clone(),
                            balance: Money::from_nanos(balance),
                            held: Money::from_nanos(held.unwrap_or(0)),
                            last_fund_seq: fund_seq.unwrap_or(0),
                        });
                    }
                }
            }
        }
        Ok(views)
    }

    async fn unlogged_charges_of(&self, account_id: &str) -> StoreResult<Vec<UnloggedCharge>> {
        let base = self.keys.account_base(account_id);
        let reply = texts(self.call(&self.account_key(&base, account_id), &["unlogged", &base, account_id]).await?)?;
        reply
            .chunks(2)
            .map(|pair| match pair {
                [request_id, cost] => Ok(UnloggedCharge {
                    account_id: account_id.to_string(),
                    request_id: request_id.clone(),
                    cost: Money::from_nanos(cost.parse().map_err(|_| StoreError::Corrupt(format!("unlogged cost {cost:?}")))?),
                }),
                _ => Err(StoreError::Corrupt("unlogged index reply of odd length".into())),
            })
            .collect()
    }

    async fn unlogged_charges(&self) -> StoreResult<Vec<UnloggedCharge>> {
        /// What an event charged: all this reads of it, so that an event this build cannot
        /// read whole (a field or variant of a newer gateway) still counts.
        #[derive(serde::Deserialize)]
        struct Charged {
            account_id: String,
            request_id: String,
            cost: Money,
        }
        let mut charges = Vec::new();
        // A charge is owed once, whether in the usage stream or the dead letters: one an older
        // worker parked without deleting it from the stream is in both.
        let mut counted = std::collections::HashSet::new();
        // Reported, not fatal: one bad entry must not stop reconciliation, verify and the stale
        // release for every account.
        let mut unreadable = 0u64;
        let mut connection = self.connection.clone();
        for shard in 0..self.keys.shards() {
            for stream in [self.keys.stream(shard), self.keys.dead_letters(shard)] {
                let mut start = "-".to_string();
                loop {
                    let page: StreamRangeReply = redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(STREAM_PAGE_MAX)
                        .query_async(&mut connection)
                        .await
                        .map_err(|error| StoreError::Unavailable(format!("redis: {error}")))?;
                    for entry in &page.ids {
                        let charged = entry.get::<Vec<u8>>("event").and_then(|json| serde_json::from_slice::<Charged>(&json).ok());
                        let Some(charged) = charged else {
                            unreadable += 1;
                            tracing::error!(stream, entry_id = entry.id, "unreadable usage entry: a charge it may hold is not counted as unlogged");
                            continue;
                        };
                        if charged.cost.is_positive() && counted.insert((charged.account_id.clone(), charged.request_id.clone())) {
                            charges.push(UnloggedCharge { account_id: charged.account_id, request_id: charged.request_id, cost: charged.cost });
                        }
                    }
                    match page.ids.last() {
                        Some(last) if page.ids.len() == STREAM_PAGE_MAX => start = format!("({}", last.id),
                        _ => break,
                    }
                }
            }
        }
        metrics::gauge!("tollgate_usage_unreadable_entries").set(unreadable as f64);
        Ok(charges)
    }

    async fn repair_balance(&self, seen: &HotAccountView, balance: Money) -> StoreResult<bool> {
        let base = self.keys.account_base(&seen.account_id);
        let (seen_balance, seen_fund_seq, new_balance) = (seen.balance.nanos().to_string(), seen.last_fund_seq.to_string(), balance.nanos().to_string());
        let arguments = ["repair", &base, &seen.account_id, &seen_balance, &seen_fund_seq, &new_balance];
        let reply = texts(self.call(&self.account_key(&base, &seen.account_id), &arguments).await?)?;
        Ok(number(&reply, 0)? == 1)
    }
}
