//! The store's one error type.

/// What can go wrong in a hot store or ledger operation. Expected business outcomes (a refused
/// authorization, a duplicate reference) are values, not errors; these are operating failures and
/// caller mistakes the store detected.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record the operation names does not exist.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    /// The operation conflicts with existing data (an id taken, a reference reused differently).
    #[error("{0}")]
    Conflict(String),
    /// The caller passed something the store refuses (a negative amount, a bad state change).
    #[error("{0}")]
    Invalid(String),
    /// The backend could not be reached or failed; the operation did not happen (or, for a write,
    /// its outcome is unknown and it is safe to retry because every write is idempotent).
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
    /// Arithmetic on money left the representable range.
    #[error("money overflow in {0}")]
    Overflow(&'static str),
    /// Stored data broke an invariant the store relies on (a programmer or operator error).
    #[error("ledger corruption: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => StoreError::NotFound { entity: "row", id: String::new() },
            // A unique constraint caught a race the checks before it could not see (two
            // writers with the same id or reference): a conflict, not an outage.
            sqlx::Error::Database(database) if database.is_unique_violation() => StoreError::Conflict(database.message().to_string()),
            sqlx::Error::Database(database) if database.is_foreign_key_violation() => StoreError::Invalid(database.message().to_string()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Unavailable(format!("migration failed: {error}"))
    }
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;
