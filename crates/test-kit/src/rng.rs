//! Seeded numbers that replay a run.

use std::time::Duration;

/// splitmix64: small, deterministic, good enough to pick numbers from a
/// seed that replays a run.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// In [low, high].
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// In [low, high).
    pub fn fraction(&mut self, low: f64, high: f64) -> f64 {
        low + (self.next() >> 11) as f64 / (1u64 << 53) as f64 * (high - low)
    }

    /// Between `low` and `high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.range(low, high))
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn a_seed_replays_its_numbers_within_bounds() {
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..1000)
                .map(|_| (rng.range(3, 7), rng.fraction(0.2, 0.4)))
                .collect::<Vec<_>>()
        };
        let numbers = draw(42);
        assert_eq!(numbers, draw(42));
        assert_ne!(numbers, draw(43));
        assert!(numbers
            .iter()
            .all(|(r, f)| (3..=7).contains(r) && (0.2..0.4).contains(f)));
        assert!(
            (3..=7).all(|n| numbers.iter().any(|(r, _)| *r == n)),
            "every value comes up"
        );
    }
}
