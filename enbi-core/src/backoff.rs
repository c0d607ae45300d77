//! Exponential backoff, the one rule behind every wait that grows: retried build attempts,
//! reloads of a node, failed reconciles.

use std::time::Duration;

/// `base` doubled `doublings` times, at most `cap`.
pub fn doubling(base: Duration, doublings: u32, cap: Duration) -> Duration {
    base.saturating_mul(2u32.saturating_pow(doublings)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_never_overflows() {
        let s = Duration::from_secs;
        let waits: Vec<u64> = (0..6).map(|n| doubling(s(1), n, s(20)).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 20]);
        assert_eq!(doubling(s(30), u32::MAX, s(600)), s(600));
    }
}
