//! Exact quantities: usage quantities and snapshot limits, parsed from their
//! JSON text without ever passing through binary floating point.
//!
//! A quantity is checked on its digits and exponent before it becomes a
//! [`Decimal`], so range and precision rules are decided exactly even for
//! text (`1e999999999`, a 400-digit literal) that no `Decimal` can hold, and
//! the message names the rule that was broken rather than "does not fit".

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::subscription::Limit;

/// Most decimal places a quantity or limit may have (SPEC: the minimum
/// billable unit is 0.001).
pub const MAX_DECIMAL_PLACES: u32 = 3;

/// Quantities and limits must stay below 10^12 so that they survive a trip
/// through a double in any downstream consumer; this is that exponent.
const MAX_INTEGER_DIGITS: i128 = 12;

/// Exponents beyond this magnitude are clamped while parsing. Any number
/// this far out is rejected by every rule anyway (no text is long enough to
/// bring it back into range), and clamping keeps all arithmetic in `i128`
/// free of overflow.
const EXPONENT_CLAMP: i128 = 1_000_000_000_000_000_000;

/// A number written in the JSON grammar, reduced to its significant digits:
/// its value is `±digits × 10^exponent`, where `digits` is `integer`
/// followed by `fraction` (the two slices of the source text either side of
/// its decimal point, so nothing is copied), with no leading or trailing
/// zeros, and empty for zero.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExactNumber<'a> {
    negative: bool,
    integer: &'a str,
    fraction: &'a str,
    exponent: i128,
}

impl<'a> ExactNumber<'a> {
    /// Parses `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, the whole text.
    fn parse(text: &'a str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };

        let int_len = leading_digits(rest);
        let integer = &rest[..int_len];
        if integer.is_empty() || (integer.len() > 1 && integer.starts_with('0')) {
            return None;
        }
        let rest = &rest[int_len..];

        let (fraction, rest) = match rest.strip_prefix('.') {
            Some(after_point) => {
                let len = leading_digits(after_point);
                if len == 0 {
                    return None;
                }
                (&after_point[..len], &after_point[len..])
            }
            None => ("", rest),
        };

        let written_exponent = match rest.strip_prefix(['e', 'E']) {
            Some(exp) => {
                let (exp_negative, digits) = match exp.as_bytes().first() {
                    Some(b'-') => (true, &exp[1..]),
                    Some(b'+') => (false, &exp[1..]),
                    _ => (false, exp),
                };
                if digits.is_empty() || leading_digits(digits) != digits.len() {
                    return None;
                }
                let magnitude = digits
                    .bytes()
                    .fold(0i128, |acc, d| (acc * 10 + i128::from(d - b'0')).min(EXPONENT_CLAMP));
                if exp_negative {
                    -magnitude
                } else {
                    magnitude
                }
            }
            None if rest.is_empty() => 0,
            None => return None,
        };

        Some(Self::reduce(negative, integer, fraction, written_exponent))
    }

    /// Strips leading and trailing zeros, moving the exponent so the value is
    /// unchanged.
    fn reduce(negative: bool, integer: &'a str, fraction: &'a str, written_exponent: i128) -> Self {
        // Text lengths are bounded by memory, far below i128's range.
        let len = |s: &str| s.len() as i128;
        let mut exponent = written_exponent - len(fraction);

        let mut integer = integer.trim_start_matches('0');
        let mut fraction = fraction;
        if integer.is_empty() {
            fraction = fraction.trim_start_matches('0');
        }

        let trimmed = fraction.trim_end_matches('0');
        exponent += len(fraction) - len(trimmed);
        fraction = trimmed;
        if fraction.is_empty() {
            let trimmed = integer.trim_end_matches('0');
            exponent += len(integer) - len(trimmed);
            integer = trimmed;
        }

        if integer.is_empty() && fraction.is_empty() {
            // Zero: one canonical form, whatever sign or exponent was written.
            return Self {
                negative: false,
                integer: "",
                fraction: "",
                exponent: 0,
            };
        }
        Self {
            negative,
            integer,
            fraction,
            exponent,
        }
    }

    fn is_zero(&self) -> bool {
        self.digit_count() == 0
    }

    fn digit_count(&self) -> i128 {
        (self.integer.len() + self.fraction.len()) as i128
    }

    fn digits(&self) -> impl Iterator<Item = u8> + '_ {
        self.integer.bytes().chain(self.fraction.bytes()).map(|d| d - b'0')
    }

    /// Decimal places once trailing zeros are removed.
    fn decimal_places(&self) -> i128 {
        (-self.exponent).max(0)
    }

    /// The power of ten just above the magnitude: the value lies in
    /// `[10^(m-1), 10^m)` for non-zero values, where `m` is this.
    fn magnitude(&self) -> i128 {
        self.digit_count() + self.exponent
    }

    /// The exact `Decimal`, or `None` when it cannot hold this value.
    fn to_decimal(&self) -> Option<Decimal> {
        if self.is_zero() {
            return Some(Decimal::ZERO);
        }
        // Decimal holds a 96-bit mantissa (at most 29 digits) and scale ≤ 28.
        const MAX_DIGITS: i128 = 29;
        let scale = u32::try_from(self.decimal_places()).ok()?;
        let shift = self.exponent.max(0);
        if self.digit_count() + shift > MAX_DIGITS {
            return None;
        }
        let mut mantissa = self.digits().fold(0i128, |acc, d| acc * 10 + i128::from(d));
        for _ in 0..shift {
            mantissa *= 10;
        }
        if self.negative {
            mantissa = -mantissa;
        }
        Decimal::try_from_i128_with_scale(mantissa, scale)
            .ok()
            .map(|d| d.normalize())
    }
}

fn leading_digits(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_digit).count()
}

/// Parses the JSON number grammar exactly, never through `f64`.
///
/// Returns `None` when the text is not a JSON number (no surrounding
/// whitespace, no `+`, no `NaN`) or when `Decimal` cannot hold the value
/// exactly: more than 28 decimal places or more than its 96-bit mantissa.
/// The result is normalized (no trailing zeros), and `-0` is `0`.
pub fn parse_decimal_text(text: &str) -> Option<Decimal> {
    ExactNumber::parse(text)?.to_decimal()
}

/// The range rules shared by quantities and limits.
struct Bounds {
    /// Zero is a valid limit (nothing may be used) but not a valid quantity.
    allow_zero: bool,
    /// Most decimal places once trailing zeros are removed.
    places: u32,
    /// Most digits before the point: the value is below 10^this.
    integer_digits: i128,
}

/// Quantities and quantity limits: 3 places, below 10^12.
const QUANTITY: Bounds = Bounds {
    allow_zero: false,
    places: MAX_DECIMAL_PLACES,
    integer_digits: MAX_INTEGER_DIGITS,
};

/// Amounts in a currency (amount limits): 6 places, below 10^15.
const AMOUNT: Bounds = Bounds {
    allow_zero: true,
    places: 6,
    integer_digits: 15,
};

/// Prices: 6 places, below 10^9 (SPEC version 2).
const PRICE: Bounds = Bounds {
    allow_zero: true,
    places: 6,
    integer_digits: 9,
};

const NOT_A_NUMBER: &str = "must be a number or a decimal string";
const NOT_A_DECIMAL_STRING: &str = "must be a decimal string such as \"12.5\" (no spaces, '+', NaN or Infinity)";

/// How a raw JSON value is named in messages ("got a boolean").
pub(crate) fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        _ => "a number",
    }
}

/// The number in a raw JSON value: a JSON number, or a string holding the
/// same grammar.
fn number_text(raw: &RawValue) -> Result<NumberText<'_>, String> {
    let text = raw.get().trim_matches([' ', '\t', '\n', '\r']);
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => Ok(NumberText::Literal(text)),
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(NumberText::Quoted)
            .map_err(|_| NOT_A_NUMBER.to_owned()),
        _ => Err(format!("{NOT_A_NUMBER}, got {}", json_kind(raw))),
    }
}

enum NumberText<'a> {
    Literal(&'a str),
    Quoted(String),
}

fn parse_bounded(raw: &RawValue, bounds: Bounds) -> Result<Decimal, String> {
    let text = number_text(raw)?;
    let number = match &text {
        NumberText::Literal(t) => ExactNumber::parse(t).ok_or_else(|| NOT_A_NUMBER.to_owned())?,
        NumberText::Quoted(s) if s.is_empty() => return Err(format!("{NOT_A_NUMBER}, got an empty string")),
        NumberText::Quoted(s) => ExactNumber::parse(s).ok_or_else(|| NOT_A_DECIMAL_STRING.to_owned())?,
    };
    check_bounds(&number, &bounds)?;
    // In range means at most 21 digits, which any `Decimal` holds; the
    // fallback only keeps this total without a panic.
    number.to_decimal().ok_or_else(|| NOT_A_NUMBER.to_owned())
}

/// Checks the SPEC rules on the exact digits. The minimum comes first: for
/// `0.0005` "at least 0.001" says what is wrong better than "too precise".
fn check_bounds(number: &ExactNumber<'_>, bounds: &Bounds) -> Result<(), String> {
    let max_places = i128::from(bounds.places);
    if bounds.allow_zero {
        if number.negative {
            return Err("must not be negative".into());
        }
    } else if number.negative || number.is_zero() || number.magnitude() <= -max_places {
        // A positive value below 10^-3 has magnitude ≤ -3; one at or above
        // 0.001 has magnitude ≥ -2.
        return Err("must be at least 0.001".into());
    }
    if number.decimal_places() > max_places {
        return Err(format!("must have at most {} decimal places", bounds.places));
    }
    if !number.is_zero() && number.magnitude() > bounds.integer_digits {
        return Err(format!("must be below 1{}", "0".repeat(bounds.integer_digits as usize)));
    }
    Ok(())
}

/// Parses a usage `quantity`: a JSON number (exponents allowed) or a string
/// holding one, at least 0.001, at most 3 decimal places once trailing zeros
/// are removed, and below 10^12. The error is the outcome's message.
///
/// `null` is an error here; callers treat it as a missing field first.
pub fn parse_quantity(raw: &RawValue) -> Result<Decimal, String> {
    parse_bounded(raw, QUANTITY)
}

/// The object form of a snapshot limit: exactly one of `quantity` and
/// `amount`. serde's derive rejects a repeated key, and a null one is an
/// error rather than "no cap": an invalid snapshot changes nothing, while a
/// silently dropped cap would let unlimited usage through.
#[derive(Deserialize)]
struct LimitObject<'a> {
    #[serde(borrow, default)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
}

/// Parses a snapshot's `softLimit` or `hardLimit`: a number or a decimal
/// string (a quantity, as in version 1), `{"quantity": n}` (zero or more, at
/// most 3 decimal places, below 10^12) or `{"amount": n}` (in the plan's
/// currency: zero or more, at most 6 decimal places, below 10^15).
///
/// `null` is an error here; callers treat it as an absent limit first.
pub fn parse_limit(raw: &RawValue) -> Result<Limit, String> {
    if !raw.get().trim_start().starts_with('{') {
        return parse_quantity_limit(raw).map(Limit::Quantity);
    }
    let object = serde_json::from_str::<LimitObject<'_>>(raw.get())
        .map_err(|e| format!("must be a number, {{\"quantity\": n}} or {{\"amount\": n}}: {e}"))?;
    match (object.quantity, object.amount) {
        (Some(quantity), None) => parse_quantity_limit(quantity).map(Limit::Quantity),
        (None, Some(amount)) => parse_bounded(amount, AMOUNT)
            .map(Limit::Amount)
            .map_err(|e| format!("amount {e}")),
        (Some(_), Some(_)) => Err("must have a quantity or an amount, not both".to_owned()),
        (None, None) => Err("must have a quantity or an amount".to_owned()),
    }
}

/// Parses a quantity limit (`trialLimit`, or the number in a limit): a
/// number or a decimal string, zero or more, at most 3 decimal places,
/// below 10^12.
pub fn parse_quantity_limit(raw: &RawValue) -> Result<Decimal, String> {
    if raw.get().trim_start().starts_with('{') {
        return match parse_limit(raw)? {
            Limit::Quantity(quantity) => Ok(quantity),
            Limit::Amount(_) => Err("must be a quantity: this limit cannot be an amount".to_owned()),
        };
    }
    parse_bounded(
        raw,
        Bounds {
            allow_zero: true,
            ..QUANTITY
        },
    )
}

/// Parses a bracket's `maxQuantity`: zero or more (the pricing checks that
/// ends rise), at most 6 decimal places (an end may fall between two
/// billable steps), below 10^12.
pub fn parse_bracket_end(raw: &RawValue) -> Result<Decimal, String> {
    parse_bounded(
        raw,
        Bounds {
            allow_zero: true,
            places: 6,
            ..QUANTITY
        },
    )
}

/// Parses a price of a plan's pricing: a number or a decimal string, zero or
/// more, at most 6 decimal places, below 10^9.
pub fn parse_price(raw: &RawValue) -> Result<Decimal, String> {
    parse_bounded(raw, PRICE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn quantity(json: &str) -> Result<Decimal, String> {
        parse_quantity(&raw(json))
    }

    fn limit(json: &str) -> Result<Decimal, String> {
        match parse_limit(&raw(json))? {
            Limit::Quantity(quantity) => Ok(quantity),
            Limit::Amount(amount) => Err(format!("an amount: {amount}")),
        }
    }

    // --- parse_decimal_text ---

    #[test]
    fn parses_the_json_number_grammar_exactly() {
        for (text, want) in [
            ("0", "0"),
            ("-0", "0"),
            ("12", "12"),
            ("-12.50", "-12.5"),
            ("0.001", "0.001"),
            ("1e3", "1000"),
            ("1E+3", "1000"),
            ("1.5e-2", "0.015"),
            ("0e999999999999", "0"),
            ("123.456e1", "1234.56"),
            ("79228162514264337593543950335", "79228162514264337593543950335"),
            ("0.0000000000000000000000000001", "0.0000000000000000000000000001"),
        ] {
            assert_eq!(parse_decimal_text(text), Some(dec(want)), "{text}");
        }
    }

    #[test]
    fn normalizes_trailing_zeros() {
        let parsed = parse_decimal_text("1.2300").unwrap();
        assert_eq!(parsed.scale(), 2);
        assert_eq!(parsed.to_string(), "1.23");
        assert_eq!(parse_decimal_text("1e2").unwrap().to_string(), "100");
    }

    #[test]
    fn rejects_text_outside_the_json_number_grammar() {
        for text in [
            "", " 1", "1 ", "+1", "0x10", "1.", ".5", "01", "-01", "NaN", "Infinity", "-", "1e", "1e+", "1.e3", "--1",
            "1_000", "١", "1,5",
        ] {
            assert_eq!(parse_decimal_text(text), None, "{text:?}");
        }
    }

    #[test]
    fn returns_none_for_huge_exponents_without_panicking() {
        assert_eq!(parse_decimal_text("1e999999999999"), None);
        assert_eq!(parse_decimal_text("1e-999999999999"), None);
        let huge = format!("1e{}", "9".repeat(400));
        assert_eq!(parse_decimal_text(&huge), None);
        assert_eq!(parse_decimal_text(&format!("1e-{}", "9".repeat(400))), None);
    }

    #[test]
    fn returns_none_beyond_decimal_capacity() {
        assert_eq!(parse_decimal_text("79228162514264337593543950336"), None);
        assert_eq!(parse_decimal_text("1e29"), None);
        assert_eq!(parse_decimal_text("0.00000000000000000000000000001"), None);
        assert_eq!(parse_decimal_text(&"7".repeat(400)), None);
    }

    #[test]
    fn reduces_long_digit_strings_that_are_exact() {
        let text = format!("1{}e-398", "0".repeat(399));
        assert_eq!(parse_decimal_text(&text), Some(dec("10")));
        let text = format!("0.{}1e400", "0".repeat(398));
        assert_eq!(parse_decimal_text(&text), Some(dec("10")));
    }

    #[test]
    fn adds_parsed_decimals_without_binary_rounding() {
        let sum = parse_decimal_text("0.1").unwrap() + parse_decimal_text("0.2").unwrap();
        assert_eq!(sum, parse_decimal_text("0.3").unwrap());
    }

    // --- parse_quantity ---

    #[test]
    fn accepts_the_minimum_billable_unit() {
        assert_eq!(quantity("0.001"), Ok(dec("0.001")));
    }

    #[test]
    fn rejects_below_the_minimum_billable_unit() {
        assert_eq!(quantity("0.0005"), Err("must be at least 0.001".into()));
        assert_eq!(quantity("1e-4"), Err("must be at least 0.001".into()));
        assert_eq!(quantity("1e-999999999"), Err("must be at least 0.001".into()));
    }

    #[test]
    fn rejects_zero_and_negative_quantities() {
        for json in ["0", "0.000", "-0", "-1", "\"-5\"", "-0.001"] {
            assert_eq!(quantity(json), Err("must be at least 0.001".into()), "{json}");
        }
    }

    #[test]
    fn rejects_four_decimal_places() {
        assert_eq!(quantity("1.2345"), Err("must have at most 3 decimal places".into()));
        assert!(quantity("\"1.0001\"").is_err());
    }

    #[test]
    fn counts_decimal_places_after_removing_trailing_zeros() {
        assert_eq!(quantity("\"1.2300\""), Ok(dec("1.23")));
        assert_eq!(quantity("1.2300"), Ok(dec("1.23")));
        assert_eq!(quantity("1.500000000000000000000000000000000"), Ok(dec("1.5")));
    }

    #[test]
    fn accepts_exponents() {
        assert_eq!(quantity("1e3"), Ok(dec("1000")));
        assert_eq!(quantity("1E+3"), Ok(dec("1000")));
        assert_eq!(quantity("1.5e-2"), Ok(dec("0.015")));
        assert_eq!(quantity("\"2.5E2\""), Ok(dec("250")));
    }

    #[test]
    fn accepts_just_below_ten_to_the_twelfth() {
        assert_eq!(quantity("999999999999.999"), Ok(dec("999999999999.999")));
    }

    #[test]
    fn rejects_ten_to_the_twelfth_and_above() {
        for json in ["1000000000000", "1e12", "1e15", "1000000000000000", "1e999999999"] {
            assert_eq!(quantity(json), Err("must be below 1000000000000".into()), "{json}");
        }
    }

    #[test]
    fn rejects_a_400_digit_number() {
        assert_eq!(quantity(&"9".repeat(400)), Err("must be below 1000000000000".into()));
        let tiny = format!("0.{}1", "0".repeat(399));
        assert_eq!(quantity(&tiny), Err("must be at least 0.001".into()));
    }

    #[test]
    fn accepts_a_decimal_string() {
        assert_eq!(quantity("\"12.5\""), Ok(dec("12.5")));
    }

    #[test]
    fn rejects_strings_outside_the_number_grammar() {
        for json in [
            "\"abc\"",
            "\" 1\"",
            "\"1 \"",
            "\"+1\"",
            "\"0x10\"",
            "\"1.\"",
            "\".5\"",
            "\"01\"",
            "\"NaN\"",
            "\"Infinity\"",
            "\"-Infinity\"",
        ] {
            let err = quantity(json).unwrap_err();
            assert!(err.starts_with("must be a decimal string"), "{json}: {err}");
        }
    }

    #[test]
    fn rejects_an_empty_string() {
        assert_eq!(
            quantity("\"\""),
            Err("must be a number or a decimal string, got an empty string".into())
        );
    }

    #[test]
    fn rejects_non_numeric_json_types() {
        for (json, kind) in [
            ("true", "a boolean"),
            ("false", "a boolean"),
            ("null", "null"),
            ("{\"quantity\": 1}", "an object"),
            ("[1]", "an array"),
        ] {
            assert_eq!(
                quantity(json),
                Err(format!("must be a number or a decimal string, got {kind}")),
                "{json}"
            );
        }
    }

    #[test]
    fn decodes_escapes_in_quantity_strings() {
        assert_eq!(quantity(r#""\u0031\u0032""#), Ok(dec("12")));
    }

    // --- parse_limit ---

    #[test]
    fn accepts_a_limit_as_number_string_or_object() {
        assert_eq!(limit("1000"), Ok(dec("1000")));
        assert_eq!(limit("\"750.5\""), Ok(dec("750.5")));
        assert_eq!(limit("{\"quantity\": 100}"), Ok(dec("100")));
        assert_eq!(limit("{\"quantity\": \"0.25\"}"), Ok(dec("0.25")));
        assert_eq!(limit("{\"quantity\": 5, \"unit\": \"GB\"}"), Ok(dec("5")));
    }

    #[test]
    fn accepts_a_zero_limit() {
        assert_eq!(limit("0"), Ok(Decimal::ZERO));
        assert_eq!(limit("{\"quantity\": 0.000}"), Ok(Decimal::ZERO));
    }

    #[test]
    fn rejects_a_negative_limit() {
        assert_eq!(limit("-1"), Err("must not be negative".into()));
        assert_eq!(limit("{\"quantity\": -0.5}"), Err("must not be negative".into()));
    }

    #[test]
    fn rejects_a_limit_with_four_decimal_places() {
        assert_eq!(limit("0.0005"), Err("must have at most 3 decimal places".into()));
    }

    #[test]
    fn rejects_a_limit_of_ten_to_the_twelfth() {
        assert_eq!(limit("1e12"), Err("must be below 1000000000000".into()));
        assert_eq!(limit("999999999999.999"), Ok(dec("999999999999.999")));
    }

    #[test]
    fn rejects_a_limit_object_without_a_usable_quantity() {
        for json in [
            "{}",
            "{\"quantity\": null}",
            "{\"quantity\": 1, \"quantity\": 2}",
            "{\"max\": 1}",
        ] {
            assert!(limit(json).is_err(), "{json}");
        }
        assert!(limit("{\"quantity\": true}").is_err());
    }

    #[test]
    fn rejects_a_limit_object_with_both_a_quantity_and_an_amount() {
        // A limit is one or the other: either cap would otherwise be dropped.
        let error = limit("{\"quantity\": 100, \"amount\": 5}").unwrap_err();
        assert_eq!(error, "must have a quantity or an amount, not both");
        assert_eq!(limit("{\"quantity\": 100}").unwrap(), Decimal::from(100));
    }

    #[test]
    fn reads_an_amount_limit_with_up_to_six_places() {
        let amount = |json: &str| parse_limit(&raw(json));
        assert_eq!(amount("{\"amount\": 250.5}"), Ok(Limit::Amount(dec("250.5"))));
        assert_eq!(amount("{\"amount\": \"0.000001\"}"), Ok(Limit::Amount(dec("0.000001"))));
        assert_eq!(amount("{\"amount\": 0}"), Ok(Limit::Amount(Decimal::ZERO)));
        assert_eq!(
            amount("{\"amount\": 0.0000001}"),
            Err("amount must have at most 6 decimal places".into())
        );
        assert_eq!(amount("{\"amount\": -1}"), Err("amount must not be negative".into()));
        assert_eq!(
            amount("{\"amount\": 1e15}"),
            Err("amount must be below 1000000000000000".into())
        );
        assert!(amount("{\"amount\": null}").is_err());
        assert_eq!(amount("{}"), Err("must have a quantity or an amount".into()));
    }

    #[test]
    fn a_quantity_limit_refuses_an_amount() {
        let error = parse_quantity_limit(&raw("{\"amount\": 5}")).unwrap_err();
        assert_eq!(error, "must be a quantity: this limit cannot be an amount");
        assert_eq!(parse_quantity_limit(&raw("{\"quantity\": 5}")), Ok(dec("5")));
        assert_eq!(parse_quantity_limit(&raw("7")), Ok(dec("7")));
    }

    #[test]
    fn reads_prices_with_up_to_six_places_below_a_billion() {
        assert_eq!(parse_price(&raw("0.000001")), Ok(dec("0.000001")));
        assert_eq!(parse_price(&raw("\"0.25\"")), Ok(dec("0.25")));
        assert_eq!(parse_price(&raw("1e9")), Err("must be below 1000000000".into()));
        assert_eq!(parse_price(&raw("-0.5")), Err("must not be negative".into()));
    }

    #[test]
    fn rejects_non_numeric_limits() {
        for json in ["true", "[1]", "\"abc\"", "\"\"", "null"] {
            assert!(limit(json).is_err(), "{json}");
        }
    }

    proptest! {
        #[test]
        fn round_trips_any_decimal_text(mantissa in any::<i64>(), scale in 0u32..=28) {
            let d = Decimal::new(mantissa, scale);
            prop_assert_eq!(parse_decimal_text(&d.to_string()), Some(d.normalize()));
        }

        #[test]
        fn agrees_with_shifting_the_point(mantissa in 0u64..1_000_000_000, exp in -12i32..=12) {
            let text = format!("{mantissa}e{exp}");
            let expected = if exp >= 0 {
                Decimal::from(mantissa) * Decimal::from(10u64.pow(exp.unsigned_abs()))
            } else {
                Decimal::new(mantissa as i64, exp.unsigned_abs())
            };
            prop_assert_eq!(parse_decimal_text(&text), Some(expected.normalize()));
        }

        #[test]
        fn never_panics_on_arbitrary_text(text in "[-+0-9eE.a-z ]{0,40}") {
            let _ = parse_decimal_text(&text);
        }

        #[test]
        fn accepted_quantities_obey_every_rule(text in "-?[0-9]{1,16}(\\.[0-9]{1,6})?([eE][-+]?[0-9]{1,2})?") {
            let Ok(raw) = RawValue::from_string(text) else { return Ok(()) };
            if let Ok(q) = parse_quantity(&raw) {
                prop_assert!(q >= dec("0.001"));
                prop_assert!(q < dec("1000000000000"));
                prop_assert!(q.normalize().scale() <= MAX_DECIMAL_PLACES);
            }
        }
    }
}
