//! Bytes the in-process hot store spends per remembered charged id (`scripts/bench`'s memory
//! part runs this): a million ids of the gateway's own shape (32 hex digits) go into one
//! account's `RecentCharges`, spread over a window of charges, and the growth of this
//! process's resident memory is divided by them (the ids' own strings are made before the
//! first reading; a hash table's storage past 128 KiB is its own mapping, so the tables a
//! growth left behind are given back, not counted).
//!
//!     cargo run --release -p tollgate-store --example recent_charges_memory [-- IDS]
//!
//! Prints one JSON line: ids, resident bytes added, bytes per id.

use tollgate_store::recent::RecentCharges;

/// This process's resident memory, bytes (`/proc/self/statm`, pages of 4 KiB).
fn resident_bytes() -> Result<i64, String> {
    let statm = std::fs::read_to_string("/proc/self/statm").map_err(|error| format!("/proc/self/statm (Linux only): {error}"))?;
    let pages: i64 = statm.split_whitespace().nth(1).and_then(|field| field.parse().ok()).ok_or("/proc/self/statm has no resident pages")?;
    Ok(pages * 4096)
}

fn main() -> Result<(), String> {
    let ids: i64 = std::env::args().nth(1).and_then(|text| text.parse().ok()).unwrap_or(1_000_000);
    let window_ms: i64 = 20 * 60 * 1000;
    // The ids arrive over one window at an even rate, as 1,000 req/s would bring them.
    let step_ms = (window_ms / ids).max(1);
    let names: Vec<String> = (0..ids).map(|index| format!("{:032x}", u128::from(index.unsigned_abs()).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))).collect();
    let before = resident_bytes()?;
    let mut recent = RecentCharges::default();
    for (index, name) in (0_i64..).zip(&names) {
        recent.insert(name, 1_000_000_000 + index * step_ms, window_ms);
    }
    let held = resident_bytes()? - before;
    if recent.len() != names.len() {
        return Err(format!("{} ids remembered of {}", recent.len(), names.len()));
    }
    let per_id = held as f64 / ids as f64;
    println!("{{\"ids\": {ids}, \"resident_bytes\": {held}, \"bytes_per_id\": {per_id:.1}}}");
    Ok(())
}
