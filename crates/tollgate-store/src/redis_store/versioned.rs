//! Small shared values with a version, for state several gateways keep together in services
//! mode (a channel's circuit breaker): each process decides a change with its own logic from
//! the value it last read, and the change lands only if nobody changed the value since —
//! compare-and-set on the version. So the state machine is written once, in Rust, and Redis
//! only orders the changes.

use super::{Connection, unavailable};
use crate::error::{StoreError, StoreResult};

/// Writes `ARGV[2]` if the version is still `ARGV[1]` (0: never written); answers
/// `{applied (0|1), version, value}` as they are after the call.
const COMPARE_AND_SET: &str = r"
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if version ~= tonumber(ARGV[1]) then
    return {0, version, redis.call('HGET', KEYS[1], 's') or ''}
end
redis.call('HSET', KEYS[1], 'v', version + 1, 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, version + 1, ARGV[2]}
";

/// A versioned value as read: (version, value); version 0 and an empty value when never written.
pub type Versioned = (u64, String);

#[derive(Clone)]
pub struct VersionedValues {
    connection: Connection,
    prefix: String,
    script: redis::Script,
}

impl VersionedValues {
    pub fn new(connection: Connection, prefix: &str) -> VersionedValues {
        VersionedValues { connection, prefix: prefix.to_string(), script: redis::Script::new(COMPARE_AND_SET) }
    }

    /// The key of a value: its own hash tag (an FNV-1a of the name), the name after it for
    /// people reading the keyspace.
    pub fn key(&self, scope: &str, name: &str) -> String {
        tagged_key(&self.prefix, scope, name)
    }

    /// Sets `value` if the version is still `version`; the value kept `ttl_ms` after its last
    /// change. Returns whether it was set, and the version and value now.
    ///
    /// # Errors
    /// `Unavailable` when Redis does not answer.
    pub async fn compare_and_set(&self, key: &str, version: u64, value: &str, ttl_ms: u64) -> StoreResult<(bool, Versioned)> {
        let mut connection = self.connection.clone();
        let (applied, version, value): (i64, u64, String) =
            self.script.key(key).arg(version).arg(value).arg(ttl_ms.max(1)).invoke_async(&mut connection).await.map_err(unavailable)?;
        Ok((applied == 1, (version, value)))
    }

    /// The values of `keys`, in order.
    ///
    /// # Errors
    /// `Unavailable` when Redis does not answer.
    pub async fn read(&self, keys: &[String]) -> StoreResult<Vec<Versioned>> {
        let reads = keys.iter().map(|key| {
            let mut connection = self.connection.clone();
            async move {
                let (version, value): (Option<u64>, Option<String>) =
                    redis::cmd("HMGET").arg(key).arg("v").arg("s").query_async(&mut connection).await.map_err(unavailable)?;
                Ok::<Versioned, StoreError>((version.unwrap_or(0), value.unwrap_or_default()))
            }
        });
        futures_util::future::try_join_all(reads).await
    }
}

/// `prefix:scope:{tag}:name`, the tag an FNV-1a of scope and name: each named thing in a slot of
/// its own, and anything keyed after it (`…:name:more`) in the same slot.
pub(crate) fn tagged_key(prefix: &str, scope: &str, name: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in scope.bytes().chain([0]).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}:{scope}:{{{hash:016x}}}:{name}")
}
