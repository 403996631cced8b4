//! A plan's metered price, as the seed's billing system defines it (SPEC
//! version 2, "Limits as the seed's billing system has them"): what a
//! period's total quantity costs, and the largest quantity an amount limit
//! still lets through. Exact decimals throughout, nothing rounded.
//!
//! Bracket *i* covers the quantities above the previous bracket's
//! `maxQuantity` up to and including its own (`None`: no end). The amount of
//! a total quantity *q*:
//! - flat-rate: `q × price`;
//! - tiered: each bracket's units times its price, summed;
//! - volume: `q ×` the price of the bracket holding *q* (the total can fall
//!   when *q* reaches a cheaper bracket);
//! - stairstep: the price of the bracket holding *q*, a total (0 for *q* = 0).
//!
//! Exact while an amount has at most the 28 significant digits a `Decimal`
//! holds (any amount below 10^19 with its 9 decimal places); past that,
//! `rust_decimal` rounds the last places. Inside a bracket the amount is
//! measured from the bracket's start, so no intermediate term is larger than
//! the amounts themselves.

use rust_decimal::Decimal;

/// The smallest billable unit: quantities are multiples of it.
pub const STEP: Decimal = Decimal::from_parts(1, 0, 0, false, 3);

/// Most decimal places of a price.
const PRICE_SCALE: u32 = 6;

/// One bracket: up to and including `max_quantity` (`None`: no end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bracket {
    pub max_quantity: Option<Decimal>,
    pub price: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formula {
    FlatRate { price: Decimal },
    Tiered(Vec<Bracket>),
    Volume(Vec<Bracket>),
    Stairstep(Vec<Bracket>),
}

/// A valid pricing: prices at least 0, below 10^9, with at most 6 decimal
/// places; brackets with rising ends, the last without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    currency: String,
    formula: Formula,
}

/// Why a pricing is invalid, naming the field (relative to `pricing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricingError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for PricingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pricing.{}: {}", self.field, self.message)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> PricingError {
    PricingError {
        field: field.into(),
        message: message.into(),
    }
}

/// Where the amount is `at_start + per_unit × (q − above)`: the quantities
/// above `above` up to and including `up_to`. Measured from the segment's
/// start, the terms stay as small as the amounts themselves (a form like
/// `fixed + per_unit × q` cancels large products and loses digits).
#[derive(Debug, Clone, Copy)]
struct Segment {
    above: Decimal,
    up_to: Option<Decimal>,
    at_start: Decimal,
    per_unit: Decimal,
}

impl Segment {
    fn amount(&self, quantity: Decimal) -> Decimal {
        self.at_start + self.per_unit * (quantity - self.above)
    }
}

impl Pricing {
    pub fn new(currency: &str, formula: Formula) -> Result<Self, PricingError> {
        let is_code = currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase());
        if !is_code {
            return Err(invalid("currency", "must be an ISO 4217 code of three capital letters"));
        }
        match &formula {
            Formula::FlatRate { price } => check_price("price", *price)?,
            Formula::Tiered(brackets) | Formula::Volume(brackets) | Formula::Stairstep(brackets) => {
                check_brackets(brackets)?;
            }
        }
        Ok(Self {
            currency: currency.to_owned(),
            formula,
        })
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn formula(&self) -> &Formula {
        &self.formula
    }

    /// The JSON a snapshot gives it in (`pricing`), with exact digits: what
    /// a period stores, read back by `subscription::decode_pricing`.
    pub fn to_json(&self) -> String {
        let currency = &self.currency;
        let (name, brackets) = match &self.formula {
            Formula::FlatRate { price } => {
                return format!(r#"{{"currency":"{currency}","formula":"flat-rate","price":{price}}}"#);
            }
            Formula::Tiered(brackets) => ("tiered", brackets),
            Formula::Volume(brackets) => ("volume", brackets),
            Formula::Stairstep(brackets) => ("stairstep", brackets),
        };
        let brackets: Vec<String> = brackets
            .iter()
            .map(|b| {
                let end = b.max_quantity.map_or_else(|| "null".to_owned(), |end| end.to_string());
                format!(r#"{{"maxQuantity":{end},"price":{}}}"#, b.price)
            })
            .collect();
        format!(
            r#"{{"currency":"{currency}","formula":"{name}","brackets":[{}]}}"#,
            brackets.join(",")
        )
    }

    /// What a period's total `quantity` (at least 0) costs.
    pub fn amount(&self, quantity: Decimal) -> Decimal {
        if quantity <= Decimal::ZERO {
            return Decimal::ZERO;
        }
        self.segments()
            .into_iter()
            .find(|s| s.up_to.is_none_or(|end| quantity <= end))
            .map_or(Decimal::ZERO, |s| s.amount(quantity))
    }

    /// The largest multiple of [`STEP`], at most `most`, that a usage can add
    /// to `used` (a multiple of [`STEP`]) with the amount staying at or
    /// below `limit`; 0 when not even one step fits. Solved per bracket:
    /// the amount is linear inside each, so the answer is the highest
    /// bracket's highest quantity that fits.
    pub fn largest_fitting(&self, used: Decimal, most: Decimal, limit: Decimal) -> Decimal {
        let top = used + floor_to_step(most);
        for segment in self.segments().iter().rev() {
            // Quantities on the grid of `used`, above both `used` and the
            // segment's start, at most `top` and the segment's end.
            let low = segment.above.max(used);
            let cap = segment.up_to.map_or(top, |end| end.min(top));
            if cap <= low {
                continue;
            }
            let estimate = if segment.per_unit.is_zero() {
                if segment.at_start > limit {
                    continue;
                }
                cap
            } else {
                (limit - segment.at_start)
                    .checked_div(segment.per_unit)
                    .and_then(|units| segment.above.checked_add(units))
                    .map_or(cap, |at_limit| at_limit.min(cap))
            };
            // Inside the segment, so that what follows works on quantities
            // of the segment's own size.
            let estimate = estimate.max(low);
            if let Some(quantity) = highest_fitting_in(segment, used, (low, cap), estimate, limit) {
                return quantity - used;
            }
        }
        Decimal::ZERO
    }

    fn segments(&self) -> Vec<Segment> {
        let per_bracket = |brackets: &[Bracket], shape: &dyn Fn(Decimal, Decimal, &Bracket) -> Segment| {
            let mut above = Decimal::ZERO;
            let mut before = Decimal::ZERO;
            brackets
                .iter()
                .map(|bracket| {
                    let segment = shape(above, before, bracket);
                    if let Some(end) = bracket.max_quantity {
                        before = segment.amount(end);
                        above = end;
                    }
                    segment
                })
                .collect()
        };
        match &self.formula {
            Formula::FlatRate { price } => vec![Segment {
                above: Decimal::ZERO,
                up_to: None,
                at_start: Decimal::ZERO,
                per_unit: *price,
            }],
            // The amount at the bracket's start, then its price per unit.
            Formula::Tiered(brackets) => per_bracket(brackets, &|above, before, b| Segment {
                above,
                up_to: b.max_quantity,
                at_start: before,
                per_unit: b.price,
            }),
            // Every unit at the bracket's price: `price × q`, from its start.
            Formula::Volume(brackets) => per_bracket(brackets, &|above, _, b| Segment {
                above,
                up_to: b.max_quantity,
                at_start: b.price * above,
                per_unit: b.price,
            }),
            Formula::Stairstep(brackets) => per_bracket(brackets, &|above, _, b| Segment {
                above,
                up_to: b.max_quantity,
                at_start: b.price,
                per_unit: Decimal::ZERO,
            }),
        }
    }
}

/// The highest quantity on the grid of `used`, in `(low, cap]`, whose amount
/// is within `limit`, starting from `estimate` (where the amount reaches the
/// limit, by a division that may be inexact): the result is checked exactly,
/// and moved a step where the division was off.
fn highest_fitting_in(
    segment: &Segment,
    used: Decimal,
    (low, cap): (Decimal, Decimal),
    estimate: Decimal,
    limit: Decimal,
) -> Option<Decimal> {
    let mut quantity = used + floor_to_step(estimate - used);
    let next = quantity + STEP;
    if next <= cap && segment.amount(next) <= limit {
        quantity = next;
    }
    while quantity > low && segment.amount(quantity) > limit {
        quantity -= STEP;
    }
    (quantity > low).then_some(quantity)
}

/// The largest multiple of [`STEP`] at most `value`.
fn floor_to_step(value: Decimal) -> Decimal {
    (value / STEP).floor() * STEP
}

fn check_price(field: &str, price: Decimal) -> Result<(), PricingError> {
    if price.is_sign_negative() && !price.is_zero() {
        return Err(invalid(field, "must be at least 0"));
    }
    if price >= Decimal::from(1_000_000_000) {
        return Err(invalid(field, "must be below 1000000000"));
    }
    if price.normalize().scale() > PRICE_SCALE {
        return Err(invalid(field, "must have at most 6 decimal places"));
    }
    Ok(())
}

fn check_brackets(brackets: &[Bracket]) -> Result<(), PricingError> {
    if brackets.is_empty() {
        return Err(invalid("brackets", "must hold at least one bracket"));
    }
    let mut previous = Decimal::ZERO;
    let last = brackets.len() - 1;
    for (i, bracket) in brackets.iter().enumerate() {
        check_price(&format!("brackets[{i}].price"), bracket.price)?;
        let field = format!("brackets[{i}].maxQuantity");
        match bracket.max_quantity {
            None if i < last => return Err(invalid(field, "only the last bracket may have no end")),
            None => {}
            Some(_) if i == last => return Err(invalid(field, "must be null: the last bracket has no end")),
            Some(end) if end <= previous => {
                return Err(invalid(
                    field,
                    format!("must be above {previous}, where the bracket before ends"),
                ));
            }
            Some(end) => previous = end,
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::str::FromStr;

    use proptest::prelude::*;

    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn brackets(spec: &[(Option<&str>, &str)]) -> Vec<Bracket> {
        spec.iter()
            .map(|(end, price)| Bracket {
                max_quantity: end.map(dec),
                price: dec(price),
            })
            .collect()
    }

    /// The SPEC's example brackets: 0.5 up to 100, then 0.4, in USD; for
    /// the decision's and the status's tests too.
    pub(crate) fn example(kind: fn(Vec<Bracket>) -> Formula) -> Pricing {
        Pricing::new("USD", kind(brackets(&[(Some("100"), "0.5"), (None, "0.4")]))).unwrap()
    }

    #[test]
    fn amounts_follow_each_formula_s_definition() {
        let flat = Pricing::new("USD", Formula::FlatRate { price: dec("0.25") }).unwrap();
        assert_eq!(flat.amount(dec("10.001")), dec("2.50025"));
        let tiered = example(Formula::Tiered);
        assert_eq!(tiered.amount(dec("100")), dec("50"));
        assert_eq!(tiered.amount(dec("150")), dec("70"));
        assert_eq!(tiered.amount(dec("100.001")), dec("50.0004"));
        let volume = example(Formula::Volume);
        assert_eq!(volume.amount(dec("100")), dec("50"));
        assert_eq!(
            volume.amount(dec("100.001")),
            dec("40.0004"),
            "a larger total can cost less"
        );
        let stairstep = example(Formula::Stairstep);
        assert_eq!(stairstep.amount(Decimal::ZERO), Decimal::ZERO);
        assert_eq!(stairstep.amount(dec("0.001")), dec("0.5"));
        assert_eq!(stairstep.amount(dec("100")), dec("0.5"));
        assert_eq!(stairstep.amount(dec("100.001")), dec("0.4"));
    }

    #[test]
    fn a_bracket_end_with_a_fraction_belongs_to_its_own_bracket() {
        let volume = Pricing::new("EUR", Formula::Volume(brackets(&[(Some("2.0005"), "3"), (None, "1")]))).unwrap();
        assert_eq!(volume.amount(dec("2.0005")), dec("6.0015"));
        assert_eq!(volume.amount(dec("2.001")), dec("2.001"));
        // With 1.9 used and a limit of 5, the cheap bracket lets the total
        // reach 5: 3.1 more.
        assert_eq!(volume.largest_fitting(dec("1.9"), dec("10"), dec("5")), dec("3.1"));
    }

    #[test]
    fn a_bracket_s_end_is_priced_by_that_bracket_not_the_next() {
        // 10 at 0.6 would cost 6, but 10 is in the first bracket (10 × 1):
        // only 6 fits.
        let volume = Pricing::new("USD", Formula::Volume(brackets(&[(Some("10"), "1"), (None, "0.6")]))).unwrap();
        assert_eq!(volume.largest_fitting(Decimal::ZERO, dec("20"), dec("6")), dec("6"));
        assert_eq!(
            volume.largest_fitting(Decimal::ZERO, dec("20"), dec("6.0006")),
            dec("10.001")
        );
    }

    #[test]
    fn the_largest_fitting_quantity_is_solved_per_bracket() {
        let tiered = example(Formula::Tiered);
        // 50 for the first 100; 10 more buys 25 units at 0.4.
        assert_eq!(
            tiered.largest_fitting(Decimal::ZERO, dec("1000"), dec("60")),
            dec("125")
        );
        assert_eq!(tiered.largest_fitting(dec("90"), dec("1000"), dec("60")), dec("35"));
        assert_eq!(tiered.largest_fitting(dec("90"), dec("7.5"), dec("60")), dec("7.5"));
        let flat = Pricing::new("USD", Formula::FlatRate { price: dec("3") }).unwrap();
        // 10 / 3 = 3.333…: 3.333 fits, 3.334 does not.
        assert_eq!(flat.largest_fitting(Decimal::ZERO, dec("100"), dec("10")), dec("3.333"));
        assert_eq!(flat.largest_fitting(dec("3.333"), dec("100"), dec("10")), Decimal::ZERO);
        let free = Pricing::new("USD", Formula::FlatRate { price: Decimal::ZERO }).unwrap();
        assert_eq!(
            free.largest_fitting(Decimal::ZERO, dec("12.3456"), Decimal::ZERO),
            dec("12.345")
        );
        let stairstep = example(Formula::Stairstep);
        assert_eq!(
            stairstep.largest_fitting(Decimal::ZERO, dec("500"), dec("0.45")),
            dec("500")
        );
        assert_eq!(
            stairstep.largest_fitting(Decimal::ZERO, dec("50"), dec("0.45")),
            Decimal::ZERO
        );
    }

    #[test]
    fn a_cheap_bracket_after_a_dear_one_is_solved_without_overflow() {
        // Found by fuzzing: the cheap bracket meets the limit near −10^26
        // units when measured from zero, past what a step count can hold.
        let tiered = Pricing::new(
            "USD",
            Formula::Tiered(brackets(&[(Some("100000000000"), "999999999"), (None, "0.000001")])),
        )
        .unwrap();
        assert_eq!(
            tiered.largest_fitting(Decimal::ZERO, dec("5"), dec("60")),
            Decimal::ZERO
        );
        assert_eq!(
            tiered.largest_fitting(Decimal::ZERO, dec("5"), dec("2999999997")),
            dec("3")
        );
        // Past the dear bracket, where the totals still have at most the
        // 28 digits a decimal holds.
        let tiered = Pricing::new(
            "USD",
            Formula::Tiered(brackets(&[(Some("100000000000"), "99999"), (None, "0.000001")])),
        )
        .unwrap();
        let used = dec("100000000000");
        assert_eq!(tiered.amount(used), dec("9999900000000000"));
        assert_eq!(
            tiered.largest_fitting(used, dec("10"), dec("9999900000000000.000005")),
            dec("5")
        );
    }

    #[test]
    fn tiered_amounts_keep_every_digit_past_large_bracket_starts() {
        // Found by fuzzing: measured from zero, `price × start` had more
        // digits than a decimal holds and the rounding survived.
        let tiered = Pricing::new(
            "USD",
            Formula::Tiered(brackets(&[
                (Some("412750543133.524417"), "0"),
                (Some("412750543133.525417"), "141.35"),
                (Some("412750543547.660417"), "203969541.024683"),
                (None, "0"),
            ])),
        )
        .unwrap();
        // 0.001 units at 141.35, then 14.000583 units at 203969541.024683.
        let q = dec("412750543147.526");
        let exact = dec("0.14135") + dec("14.000583") * dec("203969541.024683");
        assert_eq!(tiered.amount(q), exact);
    }

    #[test]
    fn under_volume_pricing_usage_can_fit_although_the_bill_is_over_the_limit() {
        let volume = example(Formula::Volume);
        // 90 costs 45, over a limit of 42; reaching the 0.4 bracket (105
        // costs 42) brings it back under.
        assert_eq!(volume.amount(dec("90")), dec("45"));
        assert_eq!(volume.largest_fitting(dec("90"), dec("100"), dec("42")), dec("15"));
        assert_eq!(volume.largest_fitting(dec("90"), dec("10"), dec("42")), Decimal::ZERO);
    }

    #[test]
    fn invalid_pricings_name_their_field() {
        let error = |currency: &str, formula| Pricing::new(currency, formula).unwrap_err().to_string();
        let flat = |price: &str| Formula::FlatRate { price: dec(price) };
        assert_eq!(
            error("usd", flat("1")),
            "pricing.currency: must be an ISO 4217 code of three capital letters"
        );
        assert_eq!(error("USD", flat("-0.1")), "pricing.price: must be at least 0");
        assert_eq!(
            error("USD", flat("1000000000")),
            "pricing.price: must be below 1000000000"
        );
        assert_eq!(
            error("USD", flat("0.0000001")),
            "pricing.price: must have at most 6 decimal places"
        );
        assert_eq!(
            error("USD", Formula::Tiered(Vec::new())),
            "pricing.brackets: must hold at least one bracket"
        );
        assert_eq!(
            error(
                "USD",
                Formula::Volume(brackets(&[(Some("10"), "1"), (Some("10"), "1"), (None, "1")]))
            ),
            "pricing.brackets[1].maxQuantity: must be above 10, where the bracket before ends"
        );
        assert_eq!(
            error("USD", Formula::Stairstep(brackets(&[(None, "1"), (None, "1")]))),
            "pricing.brackets[0].maxQuantity: only the last bracket may have no end"
        );
        assert_eq!(
            error("USD", Formula::Tiered(brackets(&[(Some("10"), "1")]))),
            "pricing.brackets[0].maxQuantity: must be null: the last bracket has no end"
        );
        assert_eq!(
            error(
                "USD",
                Formula::Tiered(brackets(&[(Some("10"), "1.1234567"), (None, "1")]))
            ),
            "pricing.brackets[0].price: must have at most 6 decimal places"
        );
        assert!(Pricing::new("USD", flat("0.000001")).is_ok());
    }

    // ---- Against a brute-force reference ------------------------------------

    /// The bracket holding a total of `q`.
    fn holding(brackets: &[Bracket], q: Decimal) -> &Bracket {
        brackets
            .iter()
            .find(|b| b.max_quantity.is_none_or(|end| q <= end))
            .unwrap()
    }

    /// What tiered pricing charges for the units in `(from, to]`, walked
    /// bracket by bracket from the definition.
    fn tiered_units(brackets: &[Bracket], from: Decimal, to: Decimal) -> Decimal {
        let mut total = Decimal::ZERO;
        let mut at = from;
        while at < to {
            // The bracket of the units just above `at`.
            let bracket = brackets
                .iter()
                .find(|b| b.max_quantity.is_none_or(|end| end > at))
                .unwrap();
            let end = bracket.max_quantity.map_or(to, |e| e.min(to));
            total += (end - at) * bracket.price;
            at = end;
        }
        total
    }

    /// The amount at `used`, `used + 0.001`, … `used + steps × 0.001`
    /// (`used` a multiple of 0.001), walking every 0.001 from zero: for
    /// tiered pricing each 0.001's units are added at their bracket's price,
    /// for the others the formula's words are applied at each point.
    fn reference_amounts(formula: &Formula, used: Decimal, steps: u64) -> Vec<Decimal> {
        use rust_decimal::prelude::ToPrimitive;
        let start = (used / STEP).to_u64().unwrap();
        let mut amounts = Vec::with_capacity(steps as usize + 1);
        let mut tiered_total = Decimal::ZERO;
        for k in 0..=start + steps {
            let q = Decimal::from(k) * STEP;
            let amount = match formula {
                _ if q.is_zero() => Decimal::ZERO,
                Formula::FlatRate { price } => q * price,
                Formula::Volume(brackets) => q * holding(brackets, q).price,
                Formula::Stairstep(brackets) => holding(brackets, q).price,
                Formula::Tiered(brackets) => {
                    tiered_total += tiered_units(brackets, q - STEP, q);
                    tiered_total
                }
            };
            if k >= start {
                amounts.push(amount);
            }
        }
        amounts
    }

    /// The largest fitting quantity by trying every step.
    fn reference_fitting(pricing: &Pricing, used: Decimal, most: Decimal, limit: Decimal) -> Decimal {
        use rust_decimal::prelude::ToPrimitive;
        let steps = (floor_to_step(most) / STEP).to_u64().unwrap();
        let amounts = reference_amounts(&pricing.formula, used, steps);
        (1..=steps)
            .rev()
            .find(|k| amounts[*k as usize] <= limit)
            .map_or(Decimal::ZERO, |k| Decimal::from(k) * STEP)
    }

    fn thousandths(max: i64) -> impl Strategy<Value = Decimal> {
        (0..=max).prop_map(|n| Decimal::new(n, 3))
    }

    /// Brackets over small quantities, some ends with a fourth decimal.
    fn arbitrary_pricing() -> impl Strategy<Value = Pricing> {
        let price = (0i64..=3_000_000).prop_map(|n| Decimal::new(n, 6));
        let ends = proptest::collection::vec((1i64..=8_000, any::<bool>()), 0..4);
        (0u8..4, price.clone(), proptest::collection::vec(price, 4), ends).prop_map(|(kind, flat, prices, ends)| {
            let mut at = Decimal::ZERO;
            let mut brackets: Vec<Bracket> = ends
                .iter()
                .enumerate()
                .map(|(i, (width, fine))| {
                    at += Decimal::new(*width, 3) + if *fine { Decimal::new(5, 4) } else { Decimal::ZERO };
                    Bracket {
                        max_quantity: Some(at),
                        price: prices[i],
                    }
                })
                .collect();
            brackets.push(Bracket {
                max_quantity: None,
                price: prices[3],
            });
            let formula = match kind {
                0 => Formula::FlatRate { price: flat },
                1 => Formula::Tiered(brackets),
                2 => Formula::Volume(brackets),
                _ => Formula::Stairstep(brackets),
            };
            Pricing::new("USD", formula).unwrap()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn amounts_match_the_reference(pricing in arbitrary_pricing(), quantity in thousandths(30_000)) {
            prop_assert_eq!(pricing.amount(quantity), reference_amounts(&pricing.formula, quantity, 0)[0]);
        }

        #[test]
        fn the_largest_fitting_quantity_matches_trying_every_step(
            pricing in arbitrary_pricing(),
            used in thousandths(20_000),
            most in thousandths(3_000),
            limit_thousandths in 0i64..40_000,
        ) {
            let limit = Decimal::new(limit_thousandths, 3);
            prop_assert_eq!(
                pricing.largest_fitting(used, most, limit),
                reference_fitting(&pricing, used, most, limit)
            );
        }
    }
}
