//! The in-process hot store's memory of recently charged request ids (see
//! [`crate::hot::RECENT_CHARGE_MS`] for why it exists and how long it must hold them).
//!
//! Ids are grouped in buckets by when they were charged, so forgetting is dropping whole
//! buckets, never a scan of every id under the store's lock (at 1,000 charges a second a
//! 20-minute window holds 1.2 million ids). Each id is kept as the first 128 bits of its
//! SHA-256: 16 bytes in place of a heap string, and two ids of one account share a hash with
//! odds of about n² / 2¹²⁹ — for a million ids, one in 10²⁶. A collision could only refuse that
//! account's own request as already charged; it can never charge anything twice.

use std::collections::{HashSet, VecDeque};

use sha2::{Digest, Sha256};

/// Buckets per window: an id is kept between the window and a ninth more.
const BUCKETS_PER_WINDOW: i64 = 8;

/// One account's recently charged ids.
#[derive(Debug, Default)]
pub struct RecentCharges {
    /// (bucket number, the ids charged in it), oldest first.
    buckets: VecDeque<(i64, HashSet<u128>)>,
}

impl RecentCharges {
    /// Remembers `request_id` as charged at `now_ms`.
    pub fn insert(&mut self, request_id: &str, now_ms: i64, window_ms: i64) {
        let bucket = now_ms.div_euclid(bucket_ms(window_ms));
        let id = id_hash(request_id);
        match self.buckets.back_mut() {
            // A clock that stepped back files into the newest bucket: kept longer, never less.
            Some((newest, ids)) if *newest >= bucket => {
                ids.insert(id);
            }
            _ => self.buckets.push_back((bucket, HashSet::from([id]))),
        }
    }

    /// Whether `request_id` was charged within the window (or a little before: see
    /// [`RecentCharges::forget`]).
    pub fn contains(&self, request_id: &str) -> bool {
        let id = id_hash(request_id);
        self.buckets.iter().any(|(_, ids)| ids.contains(&id))
    }

    /// Drops the buckets whose every id was charged at least `window_ms` before `now_ms`.
    pub fn forget(&mut self, now_ms: i64, window_ms: i64) {
        let width = bucket_ms(window_ms);
        while let Some((bucket, _)) = self.buckets.front() {
            let bucket_end = bucket.saturating_add(1).saturating_mul(width);
            if bucket_end.saturating_add(window_ms) > now_ms {
                break;
            }
            self.buckets.pop_front();
        }
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|(_, ids)| ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|(_, ids)| ids.is_empty())
    }
}

fn bucket_ms(window_ms: i64) -> i64 {
    (window_ms / BUCKETS_PER_WINDOW).max(1)
}

fn id_hash(request_id: &str) -> u128 {
    let digest = Sha256::digest(request_id.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: i64 = 800;

    #[test]
    fn an_id_is_kept_at_least_the_window_and_at_most_a_bucket_more() {
        let mut recent = RecentCharges::default();
        // Charged at 1,050: bucket [1,000, 1,100) with buckets of 100.
        recent.insert("r", 1_050, WINDOW);
        recent.insert("s", 1_099, WINDOW);
        for now in [1_050, 1_050 + WINDOW - 1, 1_099 + WINDOW - 1] {
            recent.forget(now, WINDOW);
            assert!(recent.contains("r") && recent.contains("s"), "kept at {now}");
        }
        recent.forget(1_100 + WINDOW, WINDOW);
        assert!(!recent.contains("r") && !recent.contains("s") && recent.is_empty(), "dropped once the whole bucket is past");
        assert!(!recent.contains("never"));
    }

    #[test]
    fn forgetting_drops_old_buckets_only() {
        let mut recent = RecentCharges::default();
        for (index, now) in (0..50).map(|index| (index, index * 37)).collect::<Vec<_>>() {
            recent.insert(&format!("id-{index}"), now, WINDOW);
        }
        let now = 49 * 37;
        recent.forget(now, WINDOW);
        for index in 0..50 {
            let charged_at = index * 37;
            let kept = recent.contains(&format!("id-{index}"));
            assert!(kept || now - charged_at >= WINDOW, "id-{index} charged {} ms ago was forgotten", now - charged_at);
            assert!(!kept || now - charged_at < WINDOW + WINDOW / BUCKETS_PER_WINDOW, "id-{index} kept too long");
        }
        assert!(recent.len() < 50, "some were forgotten");
    }

    #[test]
    fn a_clock_that_steps_back_keeps_ids_longer() {
        let mut recent = RecentCharges::default();
        recent.insert("later", 5_000, WINDOW);
        recent.insert("earlier", 4_000, WINDOW);
        recent.forget(4_000 + WINDOW, WINDOW);
        assert!(recent.contains("earlier") && recent.contains("later"));
    }
}
