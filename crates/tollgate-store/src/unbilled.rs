//! A hot store that bills nothing: every request is "held", every settle charges nothing and
//! records nothing. It exists for one purpose — `billing = "off"`, which the benchmark suite
//! runs to show what billing itself costs (the same gateway, minus holds, charges and ledger
//! writes). Never a deployment mode: the gateway logs a warning at every start with it.

use async_trait::async_trait;
use tollgate_core::Money;

use crate::error::StoreResult;
use crate::hot::{AccountSnapshot, Authorization, AuthorizeRequest, BalanceView, FundApplication, HotStore, Settlement, WithdrawalHold};
use crate::model::{ChargedRequest, UsageEvent};
use crate::operations::{HotAccountView, UnloggedCharge};

/// See the module doc.
pub struct UnbilledHotStore;

#[async_trait]
impl HotStore for UnbilledHotStore {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Nothing is charged, so nothing is remembered; a load reads the default window.
    fn recent_charge_ms(&self) -> i64 {
        crate::hot::RECENT_CHARGE_MS
    }

    async fn authorize(&self, _request: &AuthorizeRequest) -> StoreResult<Authorization> {
        Ok(Authorization::Held { available_after: Money::ZERO })
    }

    async fn settle(&self, _event: UsageEvent) -> StoreResult<Settlement> {
        Ok(Settlement { balance_before: Money::ZERO, balance_after: Money::ZERO, already_settled: false })
    }

    async fn void(&self, _event: UsageEvent) -> StoreResult<()> {
        Ok(())
    }

    async fn expire_holds(&self) -> StoreResult<u64> {
        Ok(0)
    }

    async fn load_account(&self, _snapshot: AccountSnapshot) -> StoreResult<bool> {
        Ok(false)
    }

    async fn apply_fund(&self, _account_id: &str, _fund_ledger_seq: i64, _amount: Money, _withdrawal_id: Option<&str>) -> StoreResult<FundApplication> {
        Ok(FundApplication::AlreadyApplied)
    }

    /// No hot balance to check: the ledger's own checks are all there is with billing off.
    async fn hold_withdrawal(&self, _account_id: &str, _withdrawal_id: &str, _amount: Money, _ttl_ms: u64) -> StoreResult<WithdrawalHold> {
        Ok(WithdrawalHold::Held)
    }

    async fn release_withdrawal(&self, _account_id: &str, _withdrawal_id: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn balance(&self, _account_id: &str, _api_key_id: &str) -> StoreResult<Option<BalanceView>> {
        Ok(None)
    }

    async fn charged_request(&self, _account_id: &str, _request_id: &str) -> StoreResult<Option<ChargedRequest>> {
        Ok(None)
    }

    async fn unload_account(&self, _account_id: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn hot_views(&self, account_ids: &[String]) -> StoreResult<Vec<Option<HotAccountView>>> {
        Ok(vec![None; account_ids.len()])
    }

    async fn unlogged_charges(&self) -> StoreResult<Vec<UnloggedCharge>> {
        Ok(Vec::new())
    }

    async fn unlogged_charges_of(&self, _account_id: &str) -> StoreResult<Vec<UnloggedCharge>> {
        Ok(Vec::new())
    }

    async fn repair_balance(&self, _seen: &HotAccountView, _balance: Money) -> StoreResult<bool> {
        Ok(false)
    }
}
