//! Fuzzes the subscription-snapshot decoder, pricing and amount limits
//! included: arbitrary bytes through `decode_snapshot`.
//!
//! What it asserts, from SPEC's "Subscription snapshot" and version 2's
//! "Limits as the seed's billing system has them" and "Limits and amounts":
//! - no panic, whatever the bytes; decoding is deterministic;
//! - an accepted snapshot obeys the rules, checked here on the values:
//!   an id of 1–50 characters, a version of 0 or more, a period that moves
//!   forward; quantity limits (and the trial limit) of 0 or more, at most 3
//!   places, below 10^12; amount limits of 0 or more, at most 6 places,
//!   below 10^15, and only beside a pricing; a pricing with a currency of
//!   three capital letters, prices of 0 or more, at most 6 places, below
//!   10^9, and brackets (at least one) whose ends rise from above 0, have
//!   at most 6 places, stay below 10^12, and stop only at the last;
//! - the pricing a period stores (`Pricing::to_json`) reads back as the same
//!   pricing, and so does the snapshot's `pricing` member alone;
//! - the pricing's arithmetic holds at quantities taken from the snapshot:
//!   no panic, nothing negative, 0 for nothing; the largest quantity an
//!   amount limit lets through is a multiple of 0.001, at most what was
//!   asked, fits, and one step more does not (for limits below 10^19,
//!   where amounts keep every decimal place).

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use usage_worker::domain::pricing::{Formula, Pricing, STEP};
use usage_worker::domain::subscription::{decode_pricing, decode_snapshot, Limit, SubscriptionSnapshot};

fuzz_target!(|data: &[u8]| {
    let decoded = decode_snapshot(data);
    assert_eq!(decoded, decode_snapshot(data), "decoding is deterministic");
    if let Ok(snapshot) = &decoded {
        check_snapshot(snapshot);
        if let Some(pricing) = &snapshot.pricing {
            check_pricing(pricing);
            check_member(data, pricing);
            check_arithmetic(snapshot, pricing);
        }
    }
});

fn below_power_of_ten(value: Decimal, digits: u32) -> bool {
    value < Decimal::from_i128_with_scale(10_i128.pow(digits), 0)
}

/// At least 0, at most `places` decimal places, below 10^`digits`.
fn in_range(value: Decimal, places: u32, digits: u32) -> bool {
    (!value.is_sign_negative() || value.is_zero())
        && value.normalize().scale() <= places
        && below_power_of_ten(value, digits)
}

fn check_snapshot(s: &SubscriptionSnapshot) {
    let chars = s.id.chars().count();
    assert!((1..=50).contains(&chars), "id of {chars} characters");
    assert!(!s.id.chars().any(|c| c.is_whitespace() || c.is_control()));
    assert!(!s.status.is_empty());
    assert!(s.version >= 0);
    if let Some(period) = &s.period {
        assert!(period.start < period.end, "the period moves forward");
    }
    for limit in [s.limits.hard, s.limits.soft].into_iter().flatten() {
        match limit {
            Limit::Quantity(q) => assert!(in_range(q, 3, 12), "quantity limit {q}"),
            Limit::Amount(a) => {
                assert!(in_range(a, 6, 15), "amount limit {a}");
                assert!(s.pricing.is_some(), "an amount limit needs pricing");
            }
        }
    }
    if let Some(trial) = s.limits.trial {
        assert!(in_range(trial, 3, 12), "trial limit {trial}");
    }
}

fn check_pricing(pricing: &Pricing) {
    let currency = pricing.currency();
    assert!(
        currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()),
        "currency {currency:?}"
    );
    let price_ok = |p: Decimal| in_range(p, 6, 9);
    match pricing.formula() {
        Formula::FlatRate { price } => assert!(price_ok(*price), "price {price}"),
        Formula::Tiered(brackets) | Formula::Volume(brackets) | Formula::Stairstep(brackets) => {
            assert!(!brackets.is_empty());
            let mut previous = Decimal::ZERO;
            for (i, bracket) in brackets.iter().enumerate() {
                assert!(price_ok(bracket.price), "price {}", bracket.price);
                let last = i == brackets.len() - 1;
                match bracket.max_quantity {
                    None => assert!(last, "only the last bracket has no end"),
                    Some(end) => {
                        assert!(!last, "the last bracket has no end");
                        assert!(end > previous, "ends rise: {end} after {previous}");
                        assert!(in_range(end, 6, 12), "bracket end {end}");
                        previous = end;
                    }
                }
            }
        }
    }
    let stored = RawValue::from_string(pricing.to_json()).expect("to_json writes JSON");
    assert_eq!(
        decode_pricing(&stored).as_ref(),
        Ok(pricing),
        "the stored pricing reads back"
    );
}

/// The snapshot's `pricing` member, decoded alone, is the same pricing.
fn check_member(data: &[u8], pricing: &Pricing) {
    let members: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(data).expect("an accepted snapshot is a JSON object");
    let member = members.get("pricing").expect("a pricing came from the member");
    assert_eq!(decode_pricing(member).as_ref(), Ok(pricing));
}

/// Quantities on the 0.001 grid, from the snapshot: its limits, the
/// bracket ends (rounded down) and the steps either side, the largest.
fn sample_quantities(snapshot: &SubscriptionSnapshot, pricing: &Pricing) -> Vec<Decimal> {
    let floor = |q: Decimal| (q / STEP).floor() * STEP;
    let mut points = vec![Decimal::ZERO, STEP, Decimal::new(999_999_999_999_999, 3)];
    let limits = [snapshot.limits.hard, snapshot.limits.soft];
    points.extend(limits.into_iter().flatten().filter_map(Limit::quantity));
    points.extend(snapshot.limits.trial);
    if let Formula::Tiered(b) | Formula::Volume(b) | Formula::Stairstep(b) = pricing.formula() {
        for end in b.iter().take(8).filter_map(|b| b.max_quantity) {
            let on_grid = floor(end);
            points.extend([on_grid, on_grid + STEP, (on_grid - STEP).max(Decimal::ZERO)]);
        }
    }
    points.retain(|q| below_power_of_ten(*q, 12));
    points.sort();
    points.dedup();
    points
}

fn check_arithmetic(snapshot: &SubscriptionSnapshot, pricing: &Pricing) {
    assert_eq!(pricing.amount(Decimal::ZERO), Decimal::ZERO, "nothing costs nothing");
    let points = sample_quantities(snapshot, pricing);
    let mut limits: Vec<Decimal> = [snapshot.limits.hard, snapshot.limits.soft]
        .into_iter()
        .flatten()
        .filter_map(Limit::amount)
        .collect();
    for &q in &points {
        let amount = pricing.amount(q);
        assert!(!amount.is_sign_negative() || amount.is_zero(), "amount({q}) = {amount}");
        limits.push(amount);
    }
    let mosts = [
        STEP,
        Decimal::ONE,
        Decimal::new(1_000_000, 0),
        Decimal::new(999_999_999_999_999, 3),
    ];
    for &used in points.iter().take(6) {
        for &limit in limits.iter().take(6) {
            for most in mosts {
                let fitting = pricing.largest_fitting(used, most, limit);
                assert!(
                    fitting >= Decimal::ZERO && fitting <= most,
                    "largest_fitting({used}, {most}, {limit}) = {fitting}"
                );
                assert!((fitting / STEP).fract().is_zero(), "a multiple of 0.001: {fitting}");
                if fitting > Decimal::ZERO {
                    assert!(pricing.amount(used + fitting) <= limit, "{fitting} fits under {limit}");
                }
                // Below 10^19 an amount keeps all its 9 decimal places in
                // a decimal's 28 digits; above, one step more may round to
                // the limit (the precision `pricing.rs` documents).
                if fitting + STEP <= most && below_power_of_ten(limit, 19) {
                    assert!(
                        pricing.amount(used + fitting + STEP) > limit,
                        "{fitting} is the largest under {limit} from {used} (at most {most})"
                    );
                }
            }
        }
    }
}
