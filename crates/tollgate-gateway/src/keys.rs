//! Virtual API keys: high-entropy, with a recognisable prefix, stored only as SHA-256.

use sha2::{Digest, Sha256};

/// Every key starts with this, so leaked keys are easy to recognise and scan for.
pub const KEY_PREFIX: &str = "tg_";
/// Random bytes per key: 192 bits.
const KEY_RANDOM_BYTES: usize = 24;
/// Characters of the key kept in clear (prefix included) so people can tell keys apart.
pub const KEY_DISPLAY_CHARS: usize = 11;

/// A freshly generated key: `secret` is shown once, `hash` is stored.
pub struct GeneratedKey {
    pub secret: String,
    pub hash: String,
    pub display_prefix: String,
}

pub fn generate_key() -> GeneratedKey {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    rand::fill(&mut random);
    key_from_secret(format!("{KEY_PREFIX}{}", hex::encode(random)))
}

/// Builds the stored parts of a given secret (the demo uses a fixed one).
pub fn key_from_secret(secret: String) -> GeneratedKey {
    let hash = hash_key(&secret);
    let display_prefix = secret.chars().take(KEY_DISPLAY_CHARS).collect();
    GeneratedKey { secret, hash, display_prefix }
}

/// The stored form of a key.
pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_hashed() {
        let first = generate_key();
        let second = generate_key();
        assert_ne!(first.secret, second.secret);
        assert!(first.secret.starts_with(KEY_PREFIX));
        assert_eq!(first.secret.len(), KEY_PREFIX.len() + 2 * KEY_RANDOM_BYTES);
        assert_eq!(first.hash, hash_key(&first.secret));
        assert_eq!(first.hash.len(), 64);
        assert!(!first.hash.contains(&first.secret[KEY_PREFIX.len()..]));
        assert_eq!(first.display_prefix.len(), KEY_DISPLAY_CHARS);
    }
}
