//! The digest of a closed period (SPEC version 2, "Closed periods, for
//! invoicing"): invoicing recomputes it from the usages it was sent to
//! check that it counts exactly what the worker counted.
//!
//! SHA-256 over the lines `<id>:<quantity>\n` of the period's usages that
//! count (not voided), sorted by id in byte order, each quantity in plain
//! decimal without trailing zeros; written `sha256:<64 lowercase hex>`.

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

/// The digest of these usages, given in any order as `(id, quantity)`.
pub fn period_digest<'a>(usages: impl IntoIterator<Item = (&'a str, Decimal)>) -> String {
    let mut lines: Vec<(&str, Decimal)> = usages.into_iter().collect();
    // Byte order: `str`'s `Ord` compares the UTF-8 bytes.
    lines.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut hash = Sha256::new();
    for (id, quantity) in lines {
        hash.update(id.as_bytes());
        hash.update(b":");
        hash.update(quantity.normalize().to_string().as_bytes());
        hash.update(b"\n");
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// Computed apart from this code, with Python's hashlib over
    /// "usg_B:10\nusg_a:0.001\nusg_b:2.5\nusg_é:1000\n".
    const EXAMPLE: &str = "sha256:417c8a99c52523887064c6144ff39ab6bbc9e395dc2ed0e4d3ca508df8377fd4";

    #[test]
    fn hashes_the_sorted_lines_with_plain_quantities() {
        let usages = [
            ("usg_b", d("2.500")),
            ("usg_é", d("1E+3")),
            ("usg_a", d("0.001")),
            ("usg_B", d("10.0")),
        ];
        assert_eq!(period_digest(usages), EXAMPLE);
    }

    #[test]
    fn the_order_given_does_not_matter() {
        let usages = [
            ("usg_a", d("0.001")),
            ("usg_B", d("10")),
            ("usg_é", d("1000")),
            ("usg_b", d("2.5")),
        ];
        assert_eq!(period_digest(usages), EXAMPLE);
    }

    #[test]
    fn a_period_without_usage_has_the_digest_of_nothing() {
        assert_eq!(
            period_digest([]),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
