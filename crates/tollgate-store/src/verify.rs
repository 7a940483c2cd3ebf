//! Checks invariants I2 (conservation) and I4 (audit chain) for an account from the ledger
//! alone, through the `Ledger` trait, so it works on every backend.

use std::collections::HashMap;

use tollgate_core::Money;

use crate::error::{StoreError, StoreResult};
use crate::ledger::Ledger;
use crate::model::{LedgerEntry, RequestStatus};

/// What the ledger says about one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountCheck {
    pub account_id: String,
    /// account_balance.balance.
    pub ledger_balance: Money,
    /// Σ fund amounts − Σ usage costs, from the rows.
    pub rebuilt_balance: Money,
    /// The balance_after of the last row of the chain.
    pub chain_balance: Money,
    /// ledger_seq of rows whose balance_before is not the previous balance_after, or that skip
    /// or repeat a position.
    pub chain_breaks: Vec<i64>,
    /// Request ids with more than one charged row.
    pub duplicate_request_ids: Vec<String>,
    /// The cost of every charged (not failed) request id of the account, as its row says (the
    /// first row, for a doubled id); archived rows are no longer here.
    pub charged: HashMap<String, Money>,
    /// Usage rows of the account, failed ones included, archived ones too.
    pub usage_rows: u64,
}

impl AccountCheck {
    /// I2 and I4 hold, and no request is charged twice.
    pub fn is_sound(&self) -> bool {
        self.ledger_balance == self.rebuilt_balance
            && self.chain_balance == self.ledger_balance
            && self.chain_breaks.is_empty()
            && self.duplicate_request_ids.is_empty()
    }
}

/// # Errors
/// The ledger cannot be read, or the account does not exist.
pub async fn check_account(ledger: &dyn Ledger, account_id: &str) -> StoreResult<AccountCheck> {
    let balance = ledger
        .account_balance(account_id)
        .await?
        .ok_or_else(|| StoreError::NotFound { entity: "account", id: account_id.to_string() })?;
    let rebuilt_balance = ledger.rebuilt_balance(account_id).await?;
    let entries = ledger.statement(account_id, None, None).await?;
    let mut previous_after = Money::ZERO;
    let mut previous_seq = 0;
    let mut chain_breaks = Vec::new();
    let mut charged = HashMap::new();
    let mut duplicate_request_ids = Vec::new();
    let mut usage_rows = 0;
    for entry in &entries {
        if entry.balance_before() != previous_after || entry.ledger_seq() != previous_seq + 1 {
            chain_breaks.push(entry.ledger_seq());
        }
        match entry {
            LedgerEntry::Usage(_) => usage_rows += 1,
            // Its rows were archived (`tollgate archive`): checked while exporting, one entry here.
            LedgerEntry::Archived(run) => usage_rows += run.usage_rows,
            LedgerEntry::Fund(_) => {}
        }
        if let LedgerEntry::Usage(row) = entry
            && row.status != RequestStatus::Failed
        {
            if charged.contains_key(&row.request_id) {
                duplicate_request_ids.push(row.request_id.clone());
            } else {
                charged.insert(row.request_id.clone(), row.cost);
            }
        }
        previous_after = entry.balance_after();
        previous_seq = entry.last_ledger_seq();
    }
    Ok(AccountCheck {
        account_id: account_id.to_string(),
        ledger_balance: balance.balance,
        rebuilt_balance,
        chain_balance: previous_after,
        chain_breaks,
        duplicate_request_ids,
        charged,
        usage_rows,
    })
}
