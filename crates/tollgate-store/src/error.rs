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
    /// An archive file could not be written, read back, or did not match the ledger: nothing was
    /// dropped.
    #[error("archive: {0}")]
    Archive(String),
}

/// What a caller is told of a unique or foreign-key violation (the database's message is logged).
const UNIQUE_VIOLATION: &str = "the write conflicts with an existing record (an id or reference that must be unique is taken); read the current state and retry";
const FOREIGN_KEY_VIOLATION: &str = "the write refers to a record that does not exist (or no longer does)";

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => StoreError::NotFound { entity: "row", id: String::new() },
            // A unique constraint caught a race the checks before it could not see (two
            // writers with the same id or reference): a conflict, not an outage. The database's
            // own words name tables, constraints and key values, and reach operator answers:
            // they go to the log, the caller gets ours.
            sqlx::Error::Database(database) if database.is_unique_violation() => {
                tracing::info!(constraint = database.constraint(), detail = database.message(), "a unique constraint refused a write");
                StoreError::Conflict(UNIQUE_VIOLATION.into())
            }
            sqlx::Error::Database(database) if database.is_foreign_key_violation() => {
                tracing::info!(constraint = database.constraint(), detail = database.message(), "a foreign key refused a write");
                StoreError::Invalid(FOREIGN_KEY_VIOLATION.into())
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21 item 4: a constraint's name, its table and the key values stay out of the
    /// error a caller (an operator answer) gets.
    #[tokio::test]
    async fn constraint_violations_are_told_in_our_words() -> Result<(), sqlx::Error> {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
        sqlx::query("PRAGMA foreign_keys = ON").execute(&pool).await?;
        sqlx::query("CREATE TABLE secret_accounts (id TEXT PRIMARY KEY)").execute(&pool).await?;
        sqlx::query("CREATE TABLE secret_keys (id TEXT PRIMARY KEY, account_id TEXT NOT NULL REFERENCES secret_accounts (id))").execute(&pool).await?;
        sqlx::query("INSERT INTO secret_accounts VALUES ('acct_1')").execute(&pool).await?;
        let duplicate = sqlx::query("INSERT INTO secret_accounts VALUES ('acct_1')").execute(&pool).await.map(|_| ());
        let dangling = sqlx::query("INSERT INTO secret_keys VALUES ('key_1', 'acct_missing')").execute(&pool).await.map(|_| ());
        let duplicate = duplicate.map_err(StoreError::from);
        let dangling = dangling.map_err(StoreError::from);
        assert!(matches!(&duplicate, Err(StoreError::Conflict(message)) if message == UNIQUE_VIOLATION), "{duplicate:?}");
        assert!(matches!(&dangling, Err(StoreError::Invalid(message)) if message == FOREIGN_KEY_VIOLATION), "{dangling:?}");
        Ok(())
    }
}
