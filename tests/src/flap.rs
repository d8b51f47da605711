//! The seeded schedule of the flapping-network scenarios.

/// A small deterministic generator (xorshift64*), so a flap schedule that
/// fails can be replayed with its seed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; zero is made odd).
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The default seed of the flap schedule (`ROLLOUT_FLAP_SEED` replaces it).
pub const DEFAULT_SEED: u64 = 0x5eed_f1a9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_values_stay_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 10));
        assert!(xs.iter().collect::<std::collections::BTreeSet<_>>().len() > 5);
        let mut c = Rng::new(8);
        let zs: Vec<u64> = (0..100).map(|_| c.below(10)).collect();
        assert_ne!(xs, zs);
    }
}
