//! The hostile-input corpus: messages for `usage-events` that try to break
//! the decoder, each with the outcome SPEC ("Usage event (input)" and the
//! CloudEvents paragraph) gives it.
//!
//! Cases are built in Rust, in families where that reads better than a list,
//! but every case states its expected outcome explicitly: `Created` with the
//! quantity and `usageTime` the request must carry, or `Rejected` with the
//! reason code and the field. A case may also name a different end-to-end
//! outcome where the worker's later steps decide otherwise (an instant before
//! the open-ended service period, an unknown subscription).
//!
//! Valid cases use [`SUBSCRIPTION`] (an active subscription without limits or
//! periods, so it has one open-ended period) and ids that are unique in the
//! corpus, so that end to end each is `created`. Most payloads carry
//! [`MARKER`], which must never show up in the worker's logs.
#![allow(dead_code)]

use std::fmt;

/// The subscription every valid case counts against.
pub const SUBSCRIPTION: &str = "sub_hostile";
/// A string inside most payloads (and some ids and headers): payload content
/// must never reach a log line.
pub const MARKER: &str = "zq7-hostile-marker";
/// The time of the request: the Kafka message timestamp end to end.
pub const REQUEST_TIME: &str = "2026-11-27T10:00:00Z";
/// SPEC: 5 minutes (the default `max_future_usage_time_secs`).
pub const MAX_FUTURE_SECS: i64 = 300;
/// SPEC: 64 KiB (the default `max_payload_bytes`).
pub const MAX_PAYLOAD_BYTES: usize = 65_536;

const CE_CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    InvalidUtf8,
    NotJson,
    NotAnObject,
    DeepNesting,
    HugeAndTinyNumbers,
    Exponents,
    NanAndInfinity,
    NumbersAsStrings,
    WrongTypes,
    Oversized,
    IdCharacters,
    DuplicateKeys,
    TimeZonesAndLeapSeconds,
    Empty,
    Nulls,
    GarbageHeaders,
    CloudEvents,
}

impl Category {
    pub const ALL: [Category; 17] = [
        Category::InvalidUtf8,
        Category::NotJson,
        Category::NotAnObject,
        Category::DeepNesting,
        Category::HugeAndTinyNumbers,
        Category::Exponents,
        Category::NanAndInfinity,
        Category::NumbersAsStrings,
        Category::WrongTypes,
        Category::Oversized,
        Category::IdCharacters,
        Category::DuplicateKeys,
        Category::TimeZonesAndLeapSeconds,
        Category::Empty,
        Category::Nulls,
        Category::GarbageHeaders,
        Category::CloudEvents,
    ];
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Decoded into a request with this quantity (normalized, as
    /// `rust_decimal` prints it) and `usageTime` (the instant in UTC, RFC
    /// 3339; `None` when the request gave none, so the time of the request).
    Created {
        quantity: String,
        usage_time: Option<String>,
    },
    /// Rejected with this reason code, naming this field (`None` for the
    /// codes about the whole payload).
    Rejected {
        code: &'static str,
        field: Option<&'static str>,
    },
}

impl Expect {
    pub fn status(&self) -> &'static str {
        match self {
            Expect::Created { .. } => "created",
            Expect::Rejected { .. } => "rejected",
        }
    }
}

/// A Kafka header: key and value (`None`: a header without a value).
pub type Header = (String, Option<Vec<u8>>);

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub category: Category,
    pub headers: Vec<Header>,
    /// `None` is a message without a value (a tombstone).
    pub payload: Option<Vec<u8>>,
    /// What decoding the message gives (and what the worker decides, unless
    /// `end_to_end` says otherwise).
    pub expect: Expect,
    /// The worker's decision where later steps (subscription, period) decide
    /// otherwise than decoding alone.
    pub end_to_end: Option<Expect>,
}

impl Case {
    pub fn expected_end_to_end(&self) -> &Expect {
        self.end_to_end.as_ref().unwrap_or(&self.expect)
    }

    /// The body as the worker reads it: no value is an empty payload.
    pub fn body(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }

    /// The headers as the worker reads them: a header without a value has
    /// an empty one.
    pub fn header_slices(&self) -> usage_worker::domain::headers::Headers {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default()))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Building blocks.

/// A JSON string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A JSON object from raw members, in order (repeats allowed: the text is
/// written, not a map).
fn object(members: &[(String, String)]) -> String {
    let members: Vec<String> = members.iter().map(|(k, v)| format!("{}: {v}", js(k))).collect();
    format!("{{{}}}", members.join(", "))
}

/// A valid event (`subscriptionId`, `quantity` 1 and an ignored `note`
/// holding the marker) with members replaced (`Some(raw JSON)`), removed
/// (`None`) or appended when new.
fn event(overrides: &[(&str, Option<&str>)]) -> String {
    let mut members: Vec<(String, String)> = vec![
        ("subscriptionId".into(), js(SUBSCRIPTION)),
        ("quantity".into(), "1".into()),
        ("note".into(), js(MARKER)),
    ];
    for (name, value) in overrides {
        let at = members.iter().position(|(k, _)| k == name);
        match (at, value) {
            (Some(i), Some(v)) => members[i].1 = (*v).to_owned(),
            (Some(i), None) => {
                members.remove(i);
            }
            (None, Some(v)) => members.push(((*name).to_owned(), (*v).to_owned())),
            (None, None) => {}
        }
    }
    object(&members)
}

/// The event with one member set to raw JSON.
fn with(name: &str, raw: &str) -> String {
    event(&[(name, Some(raw))])
}

/// The event without a member.
fn without(name: &str) -> String {
    event(&[(name, None)])
}

/// The event padded (in its ignored `note`) to exactly `len` bytes.
fn event_of_len(len: usize) -> String {
    let bare = with("note", "\"\"");
    let pad = len.checked_sub(bare.len()).expect("room for the padding");
    let note = format!("{MARKER}{}", "x".repeat(pad - MARKER.len()));
    let json = with("note", &js(&note));
    assert_eq!(json.len(), len);
    json
}

/// A JSON `\u` escape for any character (a surrogate pair above the BMP).
fn escape(c: char) -> String {
    let mut units = [0u16; 2];
    c.encode_utf16(&mut units)
        .iter()
        .map(|u| format!("\\u{u:04x}"))
        .collect()
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn header(key: &str, value: &[u8]) -> Header {
    (key.to_owned(), Some(value.to_vec()))
}

fn structured() -> Vec<Header> {
    vec![header("content-type", CE_CONTENT_TYPE.as_bytes())]
}

/// A structured-mode CloudEvent with `data`, with attributes replaced,
/// removed or appended like [`event`].
fn envelope(id: &str, overrides: &[(&str, Option<&str>)], data: &str) -> String {
    let mut members: Vec<(String, String)> = vec![
        ("specversion".into(), js("1.0")),
        ("id".into(), js(id)),
        ("source".into(), js("/meters/hostile")),
        ("type".into(), js("com.example.usage")),
        ("data".into(), data.to_owned()),
    ];
    for (name, value) in overrides {
        let at = members.iter().position(|(k, _)| k == name);
        match (at, value) {
            (Some(i), Some(v)) => members[i].1 = (*v).to_owned(),
            (Some(i), None) => {
                members.remove(i);
            }
            (None, Some(v)) => members.push(((*name).to_owned(), (*v).to_owned())),
            (None, None) => {}
        }
    }
    object(&members)
}

/// Binary-mode `ce_*` headers with the given id.
fn binary(id: &[u8]) -> Vec<Header> {
    vec![
        header("ce_specversion", b"1.0"),
        header("ce_id", id),
        header("ce_source", b"/meters/hostile"),
        header("ce_type", b"com.example.usage"),
    ]
}

fn created(quantity: &str) -> Expect {
    Expect::Created {
        quantity: quantity.into(),
        usage_time: None,
    }
}

fn created_at(quantity: &str, usage_time: &str) -> Expect {
    Expect::Created {
        quantity: quantity.into(),
        usage_time: Some(usage_time.into()),
    }
}

fn rejected(code: &'static str, field: Option<&'static str>) -> Expect {
    Expect::Rejected { code, field }
}

fn malformed() -> Expect {
    rejected("malformed_payload", None)
}

fn too_large() -> Expect {
    rejected("payload_too_large", None)
}

fn invalid(field: &'static str) -> Expect {
    rejected("invalid_field", Some(field))
}

fn missing(field: &'static str) -> Expect {
    rejected("missing_field", Some(field))
}

fn in_future() -> Expect {
    rejected("usage_time_in_future", Some("usageTime"))
}

struct Corpus {
    cases: Vec<Case>,
    category: Category,
    next_id: usize,
}

impl Corpus {
    fn in_category(&mut self, category: Category) {
        self.category = category;
    }

    /// A plain message (no headers).
    fn add(&mut self, name: impl Into<String>, payload: impl Into<Vec<u8>>, expect: Expect) -> &mut Case {
        self.add_full(name, Vec::new(), Some(payload.into()), expect)
    }

    fn add_full(
        &mut self,
        name: impl Into<String>,
        headers: Vec<Header>,
        payload: Option<Vec<u8>>,
        expect: Expect,
    ) -> &mut Case {
        self.cases.push(Case {
            name: name.into(),
            category: self.category,
            headers,
            payload,
            expect,
            end_to_end: None,
        });
        self.cases.last_mut().expect("just pushed")
    }

    /// An id no other case uses, so that every valid case is `created`.
    fn uid(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
}

// ---------------------------------------------------------------------------
// The corpus.

/// Every case, in the order they are published end to end.
pub fn cases() -> Vec<Case> {
    let mut c = Corpus {
        cases: Vec::new(),
        category: Category::InvalidUtf8,
        next_id: 0,
    };
    invalid_utf8(&mut c);
    not_json(&mut c);
    not_an_object(&mut c);
    deep_nesting(&mut c);
    huge_and_tiny_numbers(&mut c);
    exponents(&mut c);
    nan_and_infinity(&mut c);
    numbers_as_strings(&mut c);
    wrong_types(&mut c);
    oversized(&mut c);
    id_characters(&mut c);
    duplicate_keys(&mut c);
    time_zones_and_leap_seconds(&mut c);
    empty(&mut c);
    nulls(&mut c);
    garbage_headers(&mut c);
    cloud_events(&mut c);
    c.cases
}

fn invalid_utf8(c: &mut Corpus) {
    c.in_category(Category::InvalidUtf8);
    let event = event(&[]);
    // Splices bytes into the text of a valid event, in place of `at`.
    let splice = |at: &str, bytes: &[u8]| -> Vec<u8> {
        let i = event.find(at).expect("anchor");
        let mut out = event.as_bytes()[..i].to_vec();
        out.extend_from_slice(bytes);
        out.extend_from_slice(&event.as_bytes()[i + at.len()..]);
        out
    };
    c.add("a lone 0xff byte", b"\xff".to_vec(), malformed());
    c.add("0xfe 0xff", b"\xfe\xff".to_vec(), malformed());
    c.add(
        "0xff 0xfe and text",
        [b"\xff\xfe not utf-8 ", MARKER.as_bytes()].concat(),
        malformed(),
    );
    c.add(
        "overlong NUL (C0 80) in the note",
        splice(MARKER, b"\xc0\x80zq7"),
        malformed(),
    );
    c.add(
        "overlong quote (C0 A2) in the note",
        splice(MARKER, b"zq7\xc0\xa2}"),
        malformed(),
    );
    c.add(
        "overlong slash (C0 AF) in a key",
        splice("\"note\"", b"\"no\xc0\xafte\""),
        malformed(),
    );
    c.add(
        "CESU-8 surrogate (ED A0 80) in the subscription id",
        splice("sub_hostile", b"sub_\xed\xa0\x80"),
        malformed(),
    );
    c.add(
        "truncated 3-byte sequence in the note",
        splice(MARKER, b"zq7\xe2\x82"),
        malformed(),
    );
    c.add(
        "code point above U+10FFFF (F4 90 80 80)",
        splice(MARKER, b"\xf4\x90\x80\x80"),
        malformed(),
    );
    c.add("F5 lead byte", splice(MARKER, b"\xf5\x80\x80\x80"), malformed());
    c.add(
        "Latin-1 e-acute in the subscription id",
        splice("sub_hostile", b"caf\xe9"),
        malformed(),
    );
    c.add(
        "lone continuation byte (0x80) in the note",
        splice(MARKER, b"\x80"),
        malformed(),
    );
    c.add(
        "invalid byte in a key",
        splice("\"quantity\"", b"\"quantity\xff\""),
        malformed(),
    );
    c.add("invalid byte as the quantity", splice(": 1,", b": \xff,"), malformed());
    let utf16le: Vec<u8> = std::iter::once(0xfeffu16)
        .chain(event.encode_utf16())
        .flat_map(u16::to_le_bytes)
        .collect();
    c.add("UTF-16LE with a BOM", utf16le, malformed());
    let utf16be: Vec<u8> = event.encode_utf16().flat_map(u16::to_be_bytes).collect();
    c.add("UTF-16BE without a BOM", utf16be, malformed());
    let utf32le: Vec<u8> = event.chars().flat_map(|ch| (ch as u32).to_le_bytes()).collect();
    c.add("UTF-32LE", utf32le, malformed());
    c.add(
        "valid event then 0xff",
        [event.as_bytes(), b"\xff"].concat(),
        malformed(),
    );
    c.add(
        "0xff then a valid event",
        [b"\xff", event.as_bytes()].concat(),
        malformed(),
    );
    c.add(
        "binary protobuf-like bytes",
        b"\x0a\x0bsub_hostile\x10\x96\x01".to_vec(),
        malformed(),
    );
    c.add_full(
        "structured CloudEvent with invalid UTF-8",
        structured(),
        Some(splice(MARKER, b"\xff\xff")),
        malformed(),
    );
    let id = c.uid("bin");
    c.add_full(
        "binary CloudEvent with an invalid UTF-8 body",
        binary(id.as_bytes()),
        Some(splice(MARKER, b"\xc3\x28")),
        malformed(),
    );
}

fn not_json(c: &mut Corpus) {
    c.in_category(Category::NotJson);
    let event = event(&[]);
    let sub = js(SUBSCRIPTION);
    for (name, text) in [
        ("plain text", format!("not json {MARKER}")),
        ("an open brace", "{".to_owned()),
        ("a close brace", "}".to_owned()),
        ("an extra close brace", format!("{event}}}")),
        (
            "unterminated object",
            format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"note\": \"{MARKER}\""),
        ),
        (
            "unterminated string",
            format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"note\": \"{MARKER}}}"),
        ),
        (
            "trailing comma",
            format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"note\": \"{MARKER}\",}}"),
        ),
        (
            "single quotes",
            format!("{{'subscriptionId': 'sub_hostile', 'quantity': 1, 'note': '{MARKER}'}}"),
        ),
        (
            "unquoted keys",
            format!("{{subscriptionId: {sub}, quantity: 1, note: \"{MARKER}\"}}"),
        ),
        (
            "a line comment",
            format!("{{\"subscriptionId\": {sub}, // {MARKER}\n\"quantity\": 1}}"),
        ),
        (
            "a block comment",
            format!("{{\"subscriptionId\": {sub}, /* {MARKER} */ \"quantity\": 1}}"),
        ),
        ("two objects", format!("{event} {event}")),
        ("two events, newline delimited", format!("{event}\n{event}\n")),
        ("trailing garbage", format!("{event}x")),
        (
            "a missing colon",
            format!("{{\"subscriptionId\" {sub}, \"quantity\": 1, \"note\": \"{MARKER}\"}}"),
        ),
        (
            "a missing value",
            format!("{{\"subscriptionId\": {sub}, \"quantity\":, \"note\": \"{MARKER}\"}}"),
        ),
        ("an empty key-value", "{:1}".to_owned()),
        ("a UTF-8 BOM before the object", format!("\u{feff}{event}")),
        ("a raw tab in a string", with("note", &format!("\"{MARKER}\tx\""))),
        ("a raw newline in the id", with("id", &format!("\"usg\n{MARKER}\""))),
        ("a raw NUL in the id", with("id", &format!("\"usg\u{0}{MARKER}\""))),
        (
            "a raw escape (0x1b) in the subscription id",
            with("subscriptionId", "\"sub\u{1b}[31m\""),
        ),
        ("an invalid escape", with("note", &format!("\"\\x41{MARKER}\""))),
        (
            "a truncated unicode escape",
            with("note", &format!("\"\\u12{MARKER}\"")),
        ),
        ("a capitalised boolean", with("acceptPartialQuantity", "True")),
        ("a leading zero", with("quantity", "01")),
        ("a plus sign", with("quantity", "+1")),
        ("a bare fraction", with("quantity", ".5")),
        ("a trailing point", with("quantity", "1.")),
        ("an exponent without digits", with("quantity", "1e")),
        ("a double minus", with("quantity", "--1")),
        ("a hex number", with("quantity", "0x10")),
        ("digit separators", with("quantity", "1_000")),
        ("undefined", with("quantity", "undefined")),
        (
            "XML",
            format!("<usage><subscriptionId>sub_hostile</subscriptionId><note>{MARKER}</note></usage>"),
        ),
        (
            "form encoding",
            format!("subscriptionId=sub_hostile&quantity=1&note={MARKER}"),
        ),
        (
            "YAML",
            format!("subscriptionId: sub_hostile\nquantity: 1\nnote: {MARKER}\n"),
        ),
        ("a NUL byte", "\u{0}".to_owned()),
        ("a NUL byte after the event", format!("{event}\u{0}")),
    ] {
        c.add(name, text, malformed());
    }
    // JSON allows whitespace around the value.
    c.add(
        "whitespace around the object",
        format!(" \r\n\t{event} \n"),
        created("1"),
    );
}

fn not_an_object(c: &mut Corpus) {
    c.in_category(Category::NotAnObject);
    let event = event(&[]);
    for (name, text) in [
        ("true", "true".to_owned()),
        ("false", "false".to_owned()),
        ("zero", "0".to_owned()),
        ("a negative number", "-1".to_owned()),
        ("a number out of f64 range", "1e400".to_owned()),
        ("a number with whitespace", "  42  ".to_owned()),
        ("a string", js(MARKER)),
        ("an empty string", "\"\"".to_owned()),
        ("the event encoded as a JSON string", js(&event)),
        ("an empty array", "[]".to_owned()),
        ("an array of an empty object", "[{}]".to_owned()),
        ("an array holding the event", format!("[{event}]")),
        ("an array of two events", format!("[{event}, {event}]")),
        (
            "a CloudEvents batch",
            format!("[{}]", envelope("ce-batch", &[], &event)),
        ),
    ] {
        c.add(name, text, malformed());
    }
}

fn deep_nesting(c: &mut Corpus) {
    c.in_category(Category::DeepNesting);
    // The event object is level 1; 128 levels are accepted.
    c.add(
        "127 arrays in an ignored field (128 levels)",
        with("x", &nested_arrays(127)),
        created("1"),
    );
    c.add(
        "128 arrays in an ignored field (129 levels)",
        with("x", &nested_arrays(128)),
        malformed(),
    );
    let objects = |depth: usize| format!("{}1{}", "{\"a\": ".repeat(depth), "}".repeat(depth));
    c.add(
        "127 objects in an ignored field (128 levels)",
        with("x", &objects(127)),
        created("1"),
    );
    c.add(
        "128 objects in an ignored field (129 levels)",
        with("x", &objects(128)),
        malformed(),
    );
    let mixed: String = (0..200)
        .map(|i| if i % 2 == 0 { "[" } else { "{\"k\": " })
        .collect::<String>();
    let closing: String = (0..200).rev().map(|i| if i % 2 == 0 { "]" } else { "}" }).collect();
    c.add(
        "200 mixed arrays and objects",
        with("x", &format!("{mixed}1{closing}")),
        malformed(),
    );
    c.add(
        "10000 arrays in an ignored field",
        with("x", &nested_arrays(10_000)),
        malformed(),
    );
    c.add(
        "9000 objects in an ignored field",
        with("x", &objects(9_000)),
        malformed(),
    );
    c.add("30000 arrays as the whole payload", nested_arrays(30_000), malformed());
    c.add("60000 unclosed arrays", "[".repeat(60_000), malformed());
    c.add("60000 unclosed objects", "{\"a\":".repeat(12_000), malformed());
    c.add(
        "the quantity nested in arrays",
        with("quantity", "[[[[1]]]]"),
        invalid("quantity"),
    );
    c.add("the id nested 200 deep", with("id", &objects(200)), malformed());
    c.add(
        "the quantity nested 200 deep",
        with("quantity", &nested_arrays(200)),
        malformed(),
    );
    let brackets = js(&format!("{MARKER}{}", "[{".repeat(5_000)));
    c.add(
        "brackets inside a string do not nest",
        with("note", &brackets),
        created("1"),
    );
    c.add(
        "escaped quotes before brackets inside a string",
        with("note", &format!("\"\\\"{}\\\\\"", "[".repeat(500))),
        created("1"),
    );
    let data = with("x", &nested_arrays(300));
    let id = c.uid("ce-deep");
    c.add_full(
        "a CloudEvent data nested 300 deep",
        structured(),
        Some(envelope(&id, &[], &data).into_bytes()),
        malformed(),
    );
    // The envelope is level 1 and data level 2: 126 more arrays reach 128.
    let id = c.uid("ce-deep");
    let data = with("x", &nested_arrays(126));
    c.add_full(
        "a CloudEvent data at 128 levels",
        structured(),
        Some(envelope(&id, &[], &data).into_bytes()),
        created("1"),
    );
    let id = c.uid("ce-deep");
    let data = with("x", &nested_arrays(127));
    c.add_full(
        "a CloudEvent data at 129 levels",
        structured(),
        Some(envelope(&id, &[], &data).into_bytes()),
        malformed(),
    );
}

fn huge_and_tiny_numbers(c: &mut Corpus) {
    c.in_category(Category::HugeAndTinyNumbers);
    let big_digits = format!("1{}", "0".repeat(400));
    let tiny = format!("0.{}1", "0".repeat(400));
    let long_fraction = format!("1.{}", "0".repeat(400));
    let long_valid = format!("7.5{}", "0".repeat(60));
    let mut cases: Vec<(&str, String, Expect)> = vec![
        ("just below 10^12", "999999999999".into(), created("999999999999")),
        (
            "the largest valid quantity",
            "999999999999.999".into(),
            created("999999999999.999"),
        ),
        ("10^12", "1000000000000".into(), invalid("quantity")),
        ("10^12 with a fraction", "1000000000000.001".into(), invalid("quantity")),
        ("2^53 + 1", "9007199254740993".into(), invalid("quantity")),
        ("2^64", "18446744073709551616".into(), invalid("quantity")),
        (
            "beyond Decimal's mantissa",
            "79228162514264337593543950336".into(),
            invalid("quantity"),
        ),
        ("a 401-digit integer", big_digits, invalid("quantity")),
        ("a 400-place fraction that is 1", long_fraction, created("1")),
        ("trailing zeros beyond Decimal's scale", long_valid, created("7.5")),
        ("trailing zeros", "123.4560".into(), created("123.456")),
        ("the smallest valid quantity", "0.001".into(), created("0.001")),
        ("just below the minimum", "0.0009".into(), invalid("quantity")),
        ("a ten-thousandth", "0.0001".into(), invalid("quantity")),
        ("1 at the 401st place", tiny, invalid("quantity")),
        ("four decimal places", "1.0001".into(), invalid("quantity")),
        (
            "a binary-float artefact",
            "0.30000000000000004".into(),
            invalid("quantity"),
        ),
        (
            "three places below 10^12 with a fourth",
            "999999999999.9995".into(),
            invalid("quantity"),
        ),
        ("zero", "0".into(), invalid("quantity")),
        ("negative zero", "-0".into(), invalid("quantity")),
        ("zero with a fraction", "0.000".into(), invalid("quantity")),
        ("zero with an exponent", "0e10".into(), invalid("quantity")),
        ("minus one", "-1".into(), invalid("quantity")),
        ("minus the minimum", "-0.001".into(), invalid("quantity")),
        ("a huge negative number", "-1e400".into(), invalid("quantity")),
    ];
    for (name, raw, expect) in cases.drain(..) {
        c.add(format!("quantity: {name}"), with("quantity", &raw), expect);
    }
}

fn exponents(c: &mut Corpus) {
    c.in_category(Category::Exponents);
    for (raw, expect) in [
        ("1e2", created("100")),
        ("1E2", created("100")),
        ("1e+2", created("100")),
        ("1E+2", created("100")),
        ("1.5E+2", created("150")),
        ("1e00002", created("100")),
        ("1e0", created("1")),
        ("1e-0", created("1")),
        ("1e-3", created("0.001")),
        ("5e-3", created("0.005")),
        ("12345e-3", created("12.345")),
        ("100e-2", created("1")),
        ("1000e-3", created("1")),
        ("10e-1", created("1")),
        ("0.1e1", created("1")),
        ("0.000001e6", created("1")),
        ("1e11", created("100000000000")),
        ("9.99999999999999e11", created("999999999999.999")),
        ("1e-4", invalid("quantity")),
        ("123456e-6", invalid("quantity")),
        ("1e12", invalid("quantity")),
        ("1e400", invalid("quantity")),
        ("1e1000000000000000000000", invalid("quantity")),
        ("1e-1000000000000000000000", invalid("quantity")),
        ("-1e2", invalid("quantity")),
    ] {
        c.add(format!("quantity {raw}"), with("quantity", raw), expect);
    }
    // SPEC: a "decimal string"; the decoder reads a string with the JSON
    // number grammar, exponents included.
    c.add(
        "quantity \"1e2\" as a string",
        with("quantity", "\"1e2\""),
        created("100"),
    );
    c.add(
        "quantity \"2.5E-1\" as a string",
        with("quantity", "\"2.5E-1\""),
        created("0.25"),
    );
    c.add(
        "quantity \"1e12\" as a string",
        with("quantity", "\"1e12\""),
        invalid("quantity"),
    );
}

fn nan_and_infinity(c: &mut Corpus) {
    c.in_category(Category::NanAndInfinity);
    for raw in ["NaN", "-NaN", "nan", "Infinity", "-Infinity", "+Infinity", "inf", "Inf"] {
        c.add(format!("literal {raw}"), with("quantity", raw), malformed());
    }
    c.add("literal NaN in an ignored field", with("x", "NaN"), malformed());
    for raw in [
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "+Inf",
        "\u{221e}",
        "1e2NaN",
        "NaN1",
    ] {
        c.add(
            format!("quantity string {raw:?}"),
            with("quantity", &js(raw)),
            invalid("quantity"),
        );
    }
    c.add(
        "usageTime \"Infinity\"",
        with("usageTime", "\"Infinity\""),
        invalid("usageTime"),
    );
    c.add("usageTime \"NaN\"", with("usageTime", "\"NaN\""), invalid("usageTime"));
    c.add("usageTime literal NaN", with("usageTime", "NaN"), malformed());
}

fn numbers_as_strings(c: &mut Corpus) {
    c.in_category(Category::NumbersAsStrings);
    for (text, expect) in [
        ("12.5", created("12.5")),
        ("1.2300", created("1.23")),
        ("0.5", created("0.5")),
        ("999999999999.999", created("999999999999.999")),
        (" 12", invalid("quantity")),
        ("12 ", invalid("quantity")),
        ("1 2", invalid("quantity")),
        ("  ", invalid("quantity")),
        ("\t12", invalid("quantity")),
        ("12\n", invalid("quantity")),
        ("\u{a0}12", invalid("quantity")),
        ("12\u{200b}", invalid("quantity")),
        ("\u{feff}12", invalid("quantity")),
        ("+12", invalid("quantity")),
        ("12.", invalid("quantity")),
        (".5", invalid("quantity")),
        ("00.5", invalid("quantity")),
        ("0x10", invalid("quantity")),
        ("1,5", invalid("quantity")),
        ("1,000", invalid("quantity")),
        ("1_000", invalid("quantity")),
        ("12abc", invalid("quantity")),
        ("\u{661}\u{662}", invalid("quantity")),
        ("\u{ff11}\u{ff12}", invalid("quantity")),
        ("12\u{0}", invalid("quantity")),
        ("\"12\"", invalid("quantity")),
        ("-5", invalid("quantity")),
        ("0", invalid("quantity")),
        ("0.0005", invalid("quantity")),
        ("1000000000000", invalid("quantity")),
        ("", invalid("quantity")),
    ] {
        c.add(format!("quantity string {text:?}"), with("quantity", &js(text)), expect);
    }
}

fn wrong_types(c: &mut Corpus) {
    c.in_category(Category::WrongTypes);
    for raw in ["1", "1.5", "true", "{}", "[]", "[\"usg_1\"]"] {
        c.add(format!("id {raw}"), with("id", raw), invalid("id"));
    }
    for raw in ["42", "true", "{}", "[\"sub_hostile\"]", "{\"id\": \"sub_hostile\"}"] {
        c.add(
            format!("subscriptionId {raw}"),
            with("subscriptionId", raw),
            invalid("subscriptionId"),
        );
    }
    for raw in ["true", "false", "[1]", "{\"value\": 1}", "{\"quantity\": 1}"] {
        c.add(format!("quantity {raw}"), with("quantity", raw), invalid("quantity"));
    }
    for raw in [
        "1764237600",
        "1764237600000",
        "true",
        "{}",
        "[\"2026-11-27T10:00:00Z\"]",
    ] {
        c.add(format!("usageTime {raw}"), with("usageTime", raw), invalid("usageTime"));
    }
    for raw in ["\"true\"", "\"false\"", "1", "0", "\"yes\"", "[]", "{}", "\"\""] {
        c.add(
            format!("acceptPartialQuantity {raw}"),
            with("acceptPartialQuantity", raw),
            invalid("acceptPartialQuantity"),
        );
    }
    c.add(
        "every field wrong",
        event(&[
            ("id", Some("1")),
            ("subscriptionId", Some("2")),
            ("quantity", Some("\"x\"")),
            ("usageTime", Some("3")),
            ("acceptPartialQuantity", Some("4")),
        ]),
        invalid("id"),
    );
    c.add(
        "missing subscriptionId first, then a wrong quantity",
        event(&[("subscriptionId", None), ("quantity", Some("true"))]),
        missing("subscriptionId"),
    );
    c.add(
        "a wrong quantity before a future usageTime",
        event(&[
            ("quantity", Some("-1")),
            ("usageTime", Some("\"2030-01-01T00:00:00Z\"")),
        ]),
        invalid("quantity"),
    );
    c.add(
        "a future usageTime before a wrong acceptPartialQuantity",
        event(&[
            ("usageTime", Some("\"2030-01-01T00:00:00Z\"")),
            ("acceptPartialQuantity", Some("1")),
        ]),
        in_future(),
    );
    c.add("an empty object", "{}", missing("subscriptionId"));
    c.add(
        "only an id",
        format!("{{\"id\": \"usg-{MARKER}\"}}"),
        missing("subscriptionId"),
    );
    c.add("no quantity", without("quantity"), missing("quantity"));
    c.add(
        "an empty subscriptionId",
        with("subscriptionId", "\"\""),
        invalid("subscriptionId"),
    );
    c.add("an empty id", with("id", "\"\""), invalid("id"));
    c.add(
        "key names in another case are other fields",
        format!("{{\"SubscriptionId\": {}, \"Quantity\": 1}}", js(SUBSCRIPTION)),
        missing("subscriptionId"),
    );
    // Read-only and unknown fields are ignored, whatever they hold.
    let id = c.uid("ro");
    c.add(
        "read-only fields of the wrong type are ignored",
        event(&[
            ("id", Some(&js(&id))),
            ("invoiceId", Some("5")),
            ("invoiceItemId", Some("[]")),
            ("createdTime", Some("\"yesterday\"")),
            ("updatedTime", Some("{}")),
            ("_links", Some("\"none\"")),
        ]),
        created("1"),
    );
    c.add(
        "unknown fields of every type are ignored",
        event(&[
            ("a", Some("1e400")),
            ("b", Some("-0")),
            ("c", Some("[null, {}, []]")),
            ("d", Some("\"\\u0000\"")),
            ("e", Some("true")),
        ]),
        created("1"),
    );
}

fn oversized(c: &mut Corpus) {
    c.in_category(Category::Oversized);
    c.add("exactly 64 KiB", event_of_len(MAX_PAYLOAD_BYTES), created("1"));
    c.add("64 KiB + 1", event_of_len(MAX_PAYLOAD_BYTES + 1), too_large());
    c.add("70000 open braces", vec![b'{'; 70_000], too_large());
    c.add("100 KB of 0xff", vec![0xff; 100_000], too_large());
    c.add("300 KB of spaces", vec![b' '; 300_000], too_large());
    c.add("a 200 KB valid event", event_of_len(200_000), too_large());
    c.add(
        "a 65537-byte nested payload",
        format!("{}{}", "[".repeat(32_768), "]".repeat(32_769)),
        too_large(),
    );
    let id = c.uid("ce-big");
    let data = event_of_len(MAX_PAYLOAD_BYTES);
    c.add_full(
        "an oversized structured CloudEvent",
        structured(),
        Some(envelope(&id, &[], &data).into_bytes()),
        too_large(),
    );
    let id = c.uid("bin-big");
    c.add_full(
        "an oversized binary CloudEvent",
        binary(id.as_bytes()),
        Some(event_of_len(MAX_PAYLOAD_BYTES + 1).into_bytes()),
        too_large(),
    );
    // Large but within the limit: decided on their fields.
    c.add(
        "a 60000-digit quantity",
        with("quantity", &format!("1{}", "0".repeat(60_000))),
        invalid("quantity"),
    );
    c.add(
        "a 60000-place quantity",
        with("quantity", &format!("0.{}1", "0".repeat(60_000))),
        invalid("quantity"),
    );
    c.add(
        "a 60000-character id",
        with("id", &js(&format!("{MARKER}{}", "i".repeat(60_000)))),
        invalid("id"),
    );
    c.add(
        "a 10000-character subscriptionId",
        with("subscriptionId", &js(&"s".repeat(10_000))),
        invalid("subscriptionId"),
    );
    let many: Vec<(String, String)> = (0..4000).map(|i| (format!("k{i}"), "0".to_owned())).collect();
    let mut members = vec![
        ("subscriptionId".to_owned(), js(SUBSCRIPTION)),
        ("quantity".to_owned(), "2".to_owned()),
    ];
    members.extend(many.iter().cloned());
    c.add("4000 ignored keys", object(&members), created("2"));
    members.push(("k0".into(), "1".into()));
    c.add("4000 keys, the last repeating the first", object(&members), malformed());
}

/// Characters SPEC forbids in ids: whitespace, control and zero-width.
const FORBIDDEN_ID_CHARS: [(char, &str); 39] = [
    ('\u{0}', "NUL"),
    ('\u{1}', "SOH"),
    ('\u{8}', "backspace"),
    ('\u{9}', "tab"),
    ('\u{a}', "line feed"),
    ('\u{b}', "vertical tab"),
    ('\u{c}', "form feed"),
    ('\u{d}', "carriage return"),
    ('\u{1b}', "escape"),
    ('\u{1f}', "unit separator"),
    (' ', "space"),
    ('\u{7f}', "DEL"),
    ('\u{80}', "C1 PAD"),
    ('\u{85}', "next line"),
    ('\u{9f}', "C1 APC"),
    ('\u{a0}', "no-break space"),
    ('\u{ad}', "soft hyphen"),
    ('\u{1680}', "ogham space"),
    ('\u{180e}', "Mongolian vowel separator"),
    ('\u{2000}', "en quad"),
    ('\u{2007}', "figure space"),
    ('\u{200a}', "hair space"),
    ('\u{200b}', "zero-width space"),
    ('\u{200c}', "zero-width non-joiner"),
    ('\u{200d}', "zero-width joiner"),
    ('\u{200e}', "left-to-right mark"),
    ('\u{200f}', "right-to-left mark"),
    ('\u{2028}', "line separator"),
    ('\u{2029}', "paragraph separator"),
    ('\u{202f}', "narrow no-break space"),
    ('\u{205f}', "medium mathematical space"),
    ('\u{2060}', "word joiner"),
    ('\u{2061}', "function application"),
    ('\u{2062}', "invisible times"),
    ('\u{2063}', "invisible separator"),
    ('\u{2064}', "invisible plus"),
    ('\u{3000}', "ideographic space"),
    ('\u{feff}', "zero-width no-break space (BOM)"),
    ('\u{2009}', "thin space"),
];

fn id_characters(c: &mut Corpus) {
    c.in_category(Category::IdCharacters);
    for (ch, label) in FORBIDDEN_ID_CHARS {
        let id = format!("\"usg{}{MARKER}\"", escape(ch));
        c.add(
            format!("id with an escaped {label} (U+{:04X})", ch as u32),
            with("id", &id),
            invalid("id"),
        );
    }
    // Unescaped, where JSON allows it (not below U+0020).
    for ch in [
        '\u{7f}', '\u{85}', '\u{a0}', '\u{200b}', '\u{2028}', '\u{feff}', '\u{3000}',
    ] {
        let id = js(&format!("usg{ch}{MARKER}"));
        c.add(
            format!("id with a raw U+{:04X}", ch as u32),
            with("id", &id),
            invalid("id"),
        );
    }
    for (ch, where_) in [
        ('\u{200b}', "leading"),
        ('\u{feff}', "trailing"),
        (' ', "trailing"),
        ('\u{9}', "leading"),
    ] {
        let id = if where_ == "leading" {
            format!("\"{}usg_1\"", escape(ch))
        } else {
            format!("\"usg_1{}\"", escape(ch))
        };
        c.add(
            format!("id with a {where_} U+{:04X}", ch as u32),
            with("id", &id),
            invalid("id"),
        );
    }
    for ch in [
        '\u{0}', '\u{9}', ' ', '\u{7f}', '\u{a0}', '\u{200b}', '\u{2028}', '\u{feff}',
    ] {
        let sub = format!("\"sub_hostile{}\"", escape(ch));
        c.add(
            format!("subscriptionId with U+{:04X}", ch as u32),
            with("subscriptionId", &sub),
            invalid("subscriptionId"),
        );
    }
    c.add(
        "id with the derived prefix",
        with("id", &js(&format!("msg_{MARKER}"))),
        invalid("id"),
    );
    c.add(
        "id that is only the derived prefix",
        with("id", "\"msg_\""),
        invalid("id"),
    );
    c.add(
        "id with the derived prefix escaped",
        with("id", "\"\\u006dsg_1\""),
        invalid("id"),
    );
    c.add("id of 51 characters", with("id", &js(&"a".repeat(51))), invalid("id"));
    c.add(
        "id of 51 two-byte characters",
        with("id", &js(&"\u{e9}".repeat(51))),
        invalid("id"),
    );
    c.add(
        "id with an unpaired high surrogate",
        with("id", "\"usg_\\ud800\""),
        invalid("id"),
    );
    c.add(
        "id with an unpaired low surrogate",
        with("id", "\"usg_\\udfff\""),
        invalid("id"),
    );
    c.add(
        "id with a reversed surrogate pair",
        with("id", "\"usg_\\ude00\\ud83d\""),
        invalid("id"),
    );
    c.add(
        "subscriptionId with an unpaired surrogate",
        with("subscriptionId", "\"sub_\\udbff\""),
        invalid("subscriptionId"),
    );
    // Unusual but valid ids: each is a new usage.
    let valid_ids: [(&str, String); 12] = [
        ("an id of 50 characters", "b".repeat(50)),
        ("an id of 50 two-byte characters", "\u{e9}".repeat(50)),
        ("an id of 50 emoji", "\u{1f600}".repeat(50)),
        ("an id with combining marks", "usg_e\u{301}\u{301}".into()),
        ("an id in Hebrew", "\u{5e9}\u{5dc}\u{5d5}\u{5dd}_1".into()),
        ("an id with the prefix in capitals", "MSG_upper".into()),
        ("an id with quotes and backslashes", "usg\"'\\`_1".into()),
        ("an id that looks like SQL", "';DROP_TABLE_usages;--".into()),
        ("an id that looks like a path", "../../etc/passwd".into()),
        ("an id that looks like markup", "<script>alert(1)</script>".into()),
        ("an id with percent escapes", "%00%0a%ff".into()),
        ("an id with a noncharacter", "usg_\u{fffe}\u{ffff}".into()),
    ];
    for (name, id) in valid_ids {
        c.add(name, with("id", &js(&id)), created("1"));
    }
    c.add(
        "an id written with escapes",
        with("id", "\"\\u0075sg_esc\\u0061ped\""),
        created("1"),
    );
    c.add(
        "an emoji id written as a surrogate pair",
        with("id", "\"usg_\\ud83d\\ude00\""),
        created("1"),
    );
}

fn duplicate_keys(c: &mut Corpus) {
    c.in_category(Category::DuplicateKeys);
    let sub = js(SUBSCRIPTION);
    let m = MARKER;
    for (name, text) in [
        ("subscriptionId twice, two values", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"subscriptionId\": \"sub_other\", \"note\": \"{m}\"}}")),
        ("quantity twice, the same value", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"quantity\": 1, \"note\": \"{m}\"}}")),
        ("id twice", format!("{{\"id\": \"usg_a\", \"subscriptionId\": {sub}, \"quantity\": 1, \"id\": \"usg_b\", \"note\": \"{m}\"}}")),
        ("usageTime twice", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"usageTime\": \"2026-11-27T09:00:00Z\", \"usageTime\": \"2026-11-27T09:00:00Z\"}}")),
        ("acceptPartialQuantity twice", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"acceptPartialQuantity\": true, \"acceptPartialQuantity\": false}}")),
        ("a key three times", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"quantity\": 2, \"quantity\": 3}}")),
        ("an ignored key twice", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"note\": \"{m}\", \"note\": \"{m}\"}}")),
        ("a repeat spelled with an escape", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"quantit\\u0079\": 2, \"note\": \"{m}\"}}")),
        ("a repeat fully escaped", format!("{{\"subscriptionId\": {sub}, \"\\u0071\\u0075\\u0061\\u006e\\u0074\\u0069\\u0074\\u0079\": 2, \"quantity\": 1}}")),
        ("a repeat spelled with an escaped slash", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"a/b\": 1, \"a\\/b\": 2, \"note\": \"{m}\"}}")),
        ("the empty key twice", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"\": 1, \"\": 2, \"note\": \"{m}\"}}")),
        ("an escaped NUL key twice", format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"\\u0000\": 1, \"\\u0000\": 2, \"note\": \"{m}\"}}")),
        ("a repeat in a nested object", with("note", &format!("{{\"a\": \"{m}\", \"b\": {{\"c\": 1, \"c\": 2}}}}"))),
        ("a repeat in _links", with("_links", "[{\"href\": \"/usages/x\", \"rel\": \"self\", \"href\": \"/usages/y\"}]")),
        ("a repeat 100 levels deep", with("x", &format!("{}{{\"k\": 1, \"k\": 2}}{}", "[".repeat(100), "]".repeat(100)))),
        ("a repeat after a string holding quotes", format!("{{\"subscriptionId\": {sub}, \"note\": \"x\\\"}}, \\\"quantity\\\": \\\\\", \"quantity\": 1, \"quantity\": 2}}")),
    ] {
        c.add(name, text, malformed());
    }
    // Not repeats.
    c.add(
        "keys differing only in case",
        format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"Quantity\": 2, \"QUANTITY\": 3}}"),
        created("1"),
    );
    c.add(
        "keys differing only in Unicode normalization",
        format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"caf\u{e9}\": 1, \"cafe\u{301}\": 2}}"),
        created("1"),
    );
    c.add(
        "the same key in sibling and nested objects",
        with(
            "x",
            "{\"quantity\": 1, \"y\": {\"quantity\": 2}, \"z\": [{\"quantity\": 3}, {\"quantity\": 4}]}",
        ),
        created("1"),
    );
    c.add(
        "a key name inside a string value",
        with("note", "\"\\\"quantity\\\": 2, \\\"quantity\\\": 3\""),
        created("1"),
    );
    let id = c.uid("ce-dup");
    let data = event(&[]);
    let text = envelope(&id, &[], &data).replacen("{", "{\"specversion\": \"1.0\", ", 1);
    c.add_full(
        "specversion twice in a CloudEvent",
        structured(),
        Some(text.into_bytes()),
        malformed(),
    );
    let id = c.uid("ce-dup");
    let data = format!("{{\"subscriptionId\": {sub}, \"quantity\": 1, \"quantity\": 5}}");
    c.add_full(
        "quantity twice in a CloudEvent's data",
        structured(),
        Some(envelope(&id, &[], &data).into_bytes()),
        malformed(),
    );
}

fn time_zones_and_leap_seconds(c: &mut Corpus) {
    c.in_category(Category::TimeZonesAndLeapSeconds);
    let at = |text: &str| with("usageTime", &js(text));
    // Valid: the instant in UTC that each one is.
    for (text, utc) in [
        ("2026-11-27T09:00:00Z", "2026-11-27T09:00:00Z"),
        ("2026-11-27t09:00:00z", "2026-11-27T09:00:00Z"),
        ("2026-11-27T09:00:00+00:00", "2026-11-27T09:00:00Z"),
        ("2026-11-27T09:00:00-00:00", "2026-11-27T09:00:00Z"),
        ("2026-11-27T14:30:00+05:30", "2026-11-27T09:00:00Z"),
        ("2026-11-27T14:45:00+05:45", "2026-11-27T09:00:00Z"),
        ("2026-11-27T05:30:00-03:30", "2026-11-27T09:00:00Z"),
        ("2026-11-27T23:00:00+14:00", "2026-11-27T09:00:00Z"),
        ("2026-11-26T21:00:00-12:00", "2026-11-27T09:00:00Z"),
        ("2026-11-28T08:59:00+23:59", "2026-11-27T09:00:00Z"),
        ("2026-11-26T09:01:00-23:59", "2026-11-27T09:00:00Z"),
        ("2026-11-27T09:00:00.123456789Z", "2026-11-27T09:00:00.123456Z"), // kept to microseconds
        ("2026-11-27T10:05:00.000000001Z", "2026-11-27T10:05:00Z"),
        ("2026-11-27T09:00:00.1Z", "2026-11-27T09:00:00.1Z"),
        ("2024-02-29T12:00:00Z", "2024-02-29T12:00:00Z"),
        ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00Z"), // as PostgreSQL stores it
        ("2016-12-31T23:59:60.5Z", "2017-01-01T00:00:00.5Z"),
        ("2017-01-01T05:29:60+05:30", "2017-01-01T00:00:00Z"),
        ("2015-06-30T18:59:60-05:00", "2015-07-01T00:00:00Z"),
        ("2026-11-27T10:05:00Z", "2026-11-27T10:05:00Z"),
        ("2026-11-28T00:05:00+14:00", "2026-11-27T10:05:00Z"),
        ("2026-11-27T15:35:00+05:30", "2026-11-27T10:05:00Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00-00:01", "0001-01-01T00:01:00Z"),
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),
    ] {
        c.add(format!("usageTime {text}"), at(text), created_at("1", utc));
    }
    // Valid RFC 3339, but before the open-ended period that starts at
    // 0001-01-01T00:00:00Z.
    for (text, utc) in [
        ("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00+00:01", "0000-12-31T23:59:00Z"),
    ] {
        c.add(format!("usageTime {text}"), at(text), created_at("1", utc))
            .end_to_end = Some(rejected("no_service_period", Some("usageTime")));
    }
    // After the time of the request plus 5 minutes.
    for text in [
        "2026-11-27T10:05:01Z",
        "2026-11-28T00:05:01+14:00",
        "2026-11-27T09:00:00-12:00",
        "2026-11-27T10:05:00-00:01",
        "9999-12-31T23:59:59Z",
    ] {
        c.add(format!("usageTime {text}"), at(text), in_future());
    }
    // Valid RFC 3339, but in a year RFC 3339 cannot write once converted to
    // UTC (every time the worker writes is in UTC): years 0000 to 9999 only.
    for text in [
        "0000-01-01T00:00:00+01:00",
        "9999-12-31T23:59:60Z",
        "9999-12-31T23:00:00-05:00",
    ] {
        c.add(format!("usageTime {text}"), at(text), invalid("usageTime"));
    }
    // Not an RFC 3339 date-time with an offset.
    for text in [
        "2026-11-27T10:00:00",
        "2026-11-27T10:00:00.5",
        "2026-11-27 09:00:00Z",
        "2026-11-27",
        "09:00:00Z",
        "20261127T090000Z",
        "2026-11-27T09:00Z",
        "2026-11-27T09:00:00+0530",
        "2026-11-27T09:00:00+05",
        "2026-11-27T09:00:00+5:30",
        "2026-11-27T09:00:00+05:30:00",
        "2026-11-27T09:00:00+24:00",
        "2026-11-27T09:00:00+05:60",
        "2026-11-27T09:00:00 UTC",
        "2026-11-27T09:00:00UTC",
        "2026-11-27T09:00:00GMT",
        "2026-11-27T09:00:00EST",
        "2026-11-27T09:00:00Z[UTC]",
        "2026-11-27T10:00:00+01:00[Europe/Paris]",
        "2026-11-27T09:00:00\u{2212}05:00",
        "2026-11-27T09:00:00Z+05:00",
        "2016-12-31T23:59:61Z",
        "2026-11-27T24:00:00Z",
        "2026-11-27T09:60:00Z",
        "2026-02-29T10:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "+002026-11-27T09:00:00Z",
        "-0001-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "2026-11-27T09:00:00,5Z",
        "2026-11-27T09:00:00.Z",
        " 2026-11-27T09:00:00Z",
        "2026-11-27T09:00:00Z ",
        "2026-W48-5T09:00:00Z",
        "2026-331T09:00:00Z",
        "1764237600",
        "yesterday",
        "now",
        "2026-11-27T09:00:00Z\u{0}",
        "\u{ff12}\u{ff10}\u{ff12}\u{ff16}-11-27T09:00:00Z",
        "2026-11-27T09:00:00\u{ff3a}",
        " ",
    ] {
        c.add(format!("usageTime {text:?}"), at(text), invalid("usageTime"));
    }
}

fn empty(c: &mut Corpus) {
    c.in_category(Category::Empty);
    c.add("an empty payload", Vec::new(), malformed());
    c.add_full("no payload at all (a tombstone)", Vec::new(), None, malformed());
    c.add("a space", " ", malformed());
    c.add("only whitespace", " \r\n\t ", malformed());
    c.add("an empty object with a space", "{ }", missing("subscriptionId"));
    c.add_full(
        "an empty structured CloudEvent",
        structured(),
        Some(Vec::new()),
        malformed(),
    );
    let id = c.uid("bin-empty");
    c.add_full(
        "a binary CloudEvent without a body",
        binary(id.as_bytes()),
        None,
        malformed(),
    );
    c.add_full(
        "an empty payload with headers",
        vec![header("x-trace", MARKER.as_bytes())],
        Some(Vec::new()),
        malformed(),
    );
    let id = c.uid("ce-empty");
    c.add_full(
        "a structured CloudEvent with empty data",
        structured(),
        Some(envelope(&id, &[], "{}").into_bytes()),
        missing("subscriptionId"),
    );
}

fn nulls(c: &mut Corpus) {
    c.in_category(Category::Nulls);
    c.add("null", "null", malformed());
    c.add("null id", with("id", "null"), created("1"));
    c.add(
        "null subscriptionId",
        with("subscriptionId", "null"),
        missing("subscriptionId"),
    );
    c.add("null quantity", with("quantity", "null"), missing("quantity"));
    c.add("null usageTime", with("usageTime", "null"), created("1"));
    c.add("empty usageTime", with("usageTime", "\"\""), created("1"));
    c.add(
        "null acceptPartialQuantity",
        with("acceptPartialQuantity", "null"),
        created("1"),
    );
    c.add(
        "null ignored fields",
        event(&[
            ("invoiceId", Some("null")),
            ("_links", Some("null")),
            ("note", Some("null")),
        ]),
        created("1"),
    );
    c.add("every field null", "{\"id\": null, \"subscriptionId\": null, \"quantity\": null, \"usageTime\": null, \"acceptPartialQuantity\": null}", missing("subscriptionId"));
    c.add("quantity \"null\"", with("quantity", "\"null\""), invalid("quantity"));
    c.add(
        "usageTime \"null\"",
        with("usageTime", "\"null\""),
        invalid("usageTime"),
    );
    c.add(
        "acceptPartialQuantity \"null\"",
        with("acceptPartialQuantity", "\"null\""),
        invalid("acceptPartialQuantity"),
    );
    c.add("id \"null\"", with("id", "\"null\""), created("1"));
    c.add(
        "subscriptionId \"null\" is a (valid, unknown) id",
        with("subscriptionId", "\"null\""),
        created("1"),
    )
    .end_to_end = Some(rejected("subscription_not_found", Some("subscriptionId")));
    c.add(
        "null in a nested ignored array",
        with("x", "[null, [null], {\"a\": null}]"),
        created("1"),
    );
    let id = c.uid("ce-null");
    c.add_full(
        "a structured CloudEvent with null data",
        structured(),
        Some(envelope(&id, &[], "null").into_bytes()),
        malformed(),
    );
    c.add_full(
        "a structured CloudEvent with a null id",
        structured(),
        Some(envelope("x", &[("id", Some("null"))], &event(&[])).into_bytes()),
        malformed(),
    );
    let id = c.uid("ce-null");
    c.add_full(
        "a structured CloudEvent with a null time",
        structured(),
        Some(envelope(&id, &[("time", Some("null"))], &event(&[])).into_bytes()),
        created("1"),
    );
    let id = c.uid("ce-null");
    c.add_full(
        "a CloudEvent with null data.id takes the CloudEvent id",
        structured(),
        Some(envelope(&id, &[], &with("id", "null")).into_bytes()),
        created("1"),
    );
}

fn garbage_headers(c: &mut Corpus) {
    c.in_category(Category::GarbageHeaders);
    let body = || event(&[]).into_bytes();
    // Plain events stay plain whatever other headers say.
    let plain: Vec<(&str, Vec<Header>)> = vec![
        ("an empty header key", vec![header("", b"\xff\x00garbage")]),
        ("a non-UTF-8 header value", vec![header("trace", b"\xff\xfe\x00\x01")]),
        ("a header without a value", vec![("x-null".into(), None)]),
        ("a header with the marker", vec![header("x-note", MARKER.as_bytes())]),
        (
            "100 headers",
            (0..100).map(|i| header(&format!("h{i}"), b"v")).collect(),
        ),
        ("a 10 KB header value", vec![header("x-big", &[b'v'; 10_000])]),
        ("a 10 KB header key", vec![header(&"k".repeat(10_000), b"v")]),
        (
            "a header key with control characters",
            vec![header("x-\u{1b}[31mred\u{7f}", b"v")],
        ),
        (
            "content-type application/json",
            vec![header("content-type", b"application/json")],
        ),
        ("content-type text/plain", vec![header("content-type", b"text/plain")]),
        (
            "a non-UTF-8 content-type",
            vec![header("content-type", b"\xffapplication/cloudevents+json")],
        ),
        ("a content-type without a value", vec![("content-type".into(), None)]),
        (
            "the CloudEvents batch content-type",
            vec![header("content-type", b"application/cloudevents-batch+json")],
        ),
        (
            "the first of two content-types wins",
            vec![
                header("content-type", b"application/json"),
                header("content-type", CE_CONTENT_TYPE.as_bytes()),
            ],
        ),
        (
            "ce_ headers without ce_specversion",
            vec![header("ce_id", b"ce-ignored"), header("ce_type", b"t")],
        ),
        (
            "a CRLF in a header value",
            vec![header("x-forwarded", b"a\r\nce_specversion: 1.0\r\n")],
        ),
    ];
    for (name, headers) in plain {
        c.add_full(format!("plain event with {name}"), headers, Some(body()), created("1"));
    }
    c.add_full(
        "a CloudEvents content-type on a plain event",
        structured(),
        Some(body()),
        malformed(),
    );
    c.add_full(
        "a stray ce_specversion on a plain event",
        vec![header("ce_specversion", b"1.0")],
        Some(body()),
        malformed(),
    );
    // Binary mode with bad attributes.
    let bad_binary = |c: &mut Corpus, name: &str, change: &dyn Fn(&mut Vec<Header>), expect: Expect| {
        let id = c.uid("bin");
        let mut headers = binary(id.as_bytes());
        change(&mut headers);
        c.add_full(name, headers, Some(body()), expect);
    };
    let set = |key: &'static str, value: Option<&'static [u8]>| {
        move |h: &mut Vec<Header>| {
            h.retain(|(k, _)| k != key);
            h.push((key.to_owned(), value.map(<[u8]>::to_vec)));
        }
    };
    bad_binary(
        c,
        "ce_specversion without a value",
        &set("ce_specversion", None),
        malformed(),
    );
    bad_binary(
        c,
        "ce_specversion 0.3",
        &set("ce_specversion", Some(b"0.3")),
        malformed(),
    );
    bad_binary(
        c,
        "ce_specversion \"1.0 \"",
        &set("ce_specversion", Some(b"1.0 ")),
        malformed(),
    );
    bad_binary(
        c,
        "ce_specversion with a CRLF",
        &set("ce_specversion", Some(b"1.0\r\nx: y")),
        malformed(),
    );
    bad_binary(c, "a non-UTF-8 ce_id", &set("ce_id", Some(b"ce-\xff\xfe")), malformed());
    bad_binary(c, "an empty ce_id", &set("ce_id", Some(b"")), malformed());
    bad_binary(c, "ce_id without a value", &set("ce_id", None), malformed());
    bad_binary(
        c,
        "no ce_source",
        &|h: &mut Vec<Header>| h.retain(|(k, _)| k != "ce_source"),
        malformed(),
    );
    bad_binary(
        c,
        "a ce_id with NUL",
        &set("ce_id", Some(b"ce\x00zq7-hostile-marker")),
        invalid("id"),
    );
    bad_binary(
        c,
        "a ce_id with a zero-width space",
        &set("ce_id", Some("ce\u{200b}x".as_bytes())),
        invalid("id"),
    );
    bad_binary(
        c,
        "a ce_id with the derived prefix",
        &set("ce_id", Some(b"msg_1")),
        invalid("id"),
    );
    bad_binary(
        c,
        "a 51-character ce_id",
        &set("ce_id", Some(&[b'c'; 51])),
        invalid("id"),
    );
    bad_binary(
        c,
        "a 100 KB ce_id",
        &set("ce_id", Some(&[b'c'; 100_000])),
        invalid("id"),
    );
    bad_binary(
        c,
        "a ce_time that is not a time",
        &set("ce_time", Some(b"zq7-hostile-marker")),
        invalid("usageTime"),
    );
    bad_binary(
        c,
        "a non-UTF-8 ce_time",
        &set("ce_time", Some(b"2026-11-27T09:00:00\xffZ")),
        malformed(),
    );
    bad_binary(
        c,
        "a ce_time without an offset",
        &set("ce_time", Some(b"2026-11-27T09:00:00")),
        invalid("usageTime"),
    );
    bad_binary(
        c,
        "a ce_time in the future",
        &set("ce_time", Some(b"2026-11-27T10:05:01Z")),
        in_future(),
    );
    // Binary mode that is valid, however odd.
    bad_binary(
        c,
        "an empty ce_time means no time",
        &set("ce_time", Some(b"")),
        created("1"),
    );
    bad_binary(
        c,
        "a ce_time at +05:30",
        &set("ce_time", Some(b"2026-11-27T14:30:00+05:30")),
        created_at("1", "2026-11-27T09:00:00Z"),
    );
    bad_binary(
        c,
        "a leap-second ce_time",
        &set("ce_time", Some(b"2016-12-31T23:59:60Z")),
        created_at("1", "2017-01-01T00:00:00Z"),
    );
    let id = c.uid("bin-upper");
    let upper: Vec<Header> = binary(id.as_bytes())
        .into_iter()
        .map(|(k, v)| (k.to_ascii_uppercase(), v))
        .collect();
    c.add_full(
        "binary CloudEvent with upper-case header names",
        upper,
        Some(body()),
        created("1"),
    );
    let first = c.uid("bin-first");
    let mut twice = binary(first.as_bytes());
    twice.push(header("ce_id", b"msg_second"));
    c.add_full("the first of two ce_id headers wins", twice, Some(body()), created("1"));
    let data_id = c.uid("data-id");
    c.add_full(
        "data.id wins over ce_id (even a bad one)",
        binary(b"msg_bad"),
        Some(with("id", &js(&data_id)).into_bytes()),
        created("1"),
    );
}

fn cloud_events(c: &mut Corpus) {
    c.in_category(Category::CloudEvents);
    let data = event(&[]);
    let add = |c: &mut Corpus,
               name: &str,
               headers: Vec<Header>,
               overrides: &[(&str, Option<&str>)],
               data: &str,
               expect: Expect| {
        let id = c.uid("ce");
        let text = envelope(&id, overrides, data);
        c.add_full(name, headers, Some(text.into_bytes()), expect);
    };
    add(
        c,
        "a valid structured CloudEvent",
        structured(),
        &[("time", Some("\"2026-11-27T14:30:00+05:30\""))],
        &data,
        created_at("1", "2026-11-27T09:00:00Z"),
    );
    add(
        c,
        "an upper-case content-type with parameters",
        vec![header("Content-Type", b"APPLICATION/CLOUDEVENTS+JSON; charset=utf-8")],
        &[],
        &data,
        created("1"),
    );
    add(
        c,
        "a content-type with surrounding spaces",
        vec![header("content-type", b"  application/cloudevents+json  ")],
        &[],
        &data,
        created("1"),
    );
    add(
        c,
        "specversion as a number",
        structured(),
        &[("specversion", Some("1.0"))],
        &data,
        malformed(),
    );
    add(
        c,
        "specversion \"1\"",
        structured(),
        &[("specversion", Some("\"1\""))],
        &data,
        malformed(),
    );
    add(
        c,
        "no specversion",
        structured(),
        &[("specversion", None)],
        &data,
        malformed(),
    );
    add(c, "no source", structured(), &[("source", None)], &data, malformed());
    add(
        c,
        "an empty source",
        structured(),
        &[("source", Some("\"\""))],
        &data,
        malformed(),
    );
    add(
        c,
        "type as an array",
        structured(),
        &[("type", Some("[\"usage\"]"))],
        &data,
        malformed(),
    );
    add(
        c,
        "an id with an unpaired surrogate",
        structured(),
        &[("id", Some("\"ce\\ud800\""))],
        &data,
        malformed(),
    );
    add(c, "data as a JSON string", structured(), &[], &js(&data), malformed());
    add(
        c,
        "data as an array",
        structured(),
        &[],
        &format!("[{data}]"),
        malformed(),
    );
    add(
        c,
        "data_base64 instead of data",
        structured(),
        &[("data", None), ("data_base64", Some("\"eyJxdWFudGl0eSI6MX0=\""))],
        &data,
        malformed(),
    );
    add(
        c,
        "a CloudEvent id with a space",
        structured(),
        &[("id", Some(&js(&format!("ce {MARKER}"))))],
        &data,
        invalid("id"),
    );
    add(
        c,
        "a CloudEvent id with the derived prefix",
        structured(),
        &[("id", Some("\"msg_ce\""))],
        &data,
        invalid("id"),
    );
    add(
        c,
        "a time that is not a time",
        structured(),
        &[("time", Some(&js(MARKER)))],
        &data,
        invalid("usageTime"),
    );
    add(
        c,
        "a time as a number",
        structured(),
        &[("time", Some("1764237600"))],
        &data,
        invalid("usageTime"),
    );
    add(
        c,
        "a time in the future",
        structured(),
        &[("time", Some("\"2030-01-01T00:00:00Z\""))],
        &data,
        in_future(),
    );
    add(
        c,
        "data.usageTime wins over a bad time",
        structured(),
        &[("time", Some("\"garbage\""))],
        &with("usageTime", "\"2026-11-27T09:00:00Z\""),
        created_at("1", "2026-11-27T09:00:00Z"),
    );
    let data_id = c.uid("ce-data");
    add(
        c,
        "data.id wins over a bad CloudEvent id",
        structured(),
        &[("id", Some("\"msg_bad\""))],
        &with("id", &js(&data_id)),
        created("1"),
    );
    add(
        c,
        "unknown attributes and extensions",
        structured(),
        &[
            ("datacontenttype", Some("\"application/xml\"")),
            ("dataschema", Some("1")),
            ("x", Some("{\"y\": [1e400]}")),
        ],
        &data,
        created("1"),
    );
    add(
        c,
        "the data is validated like a plain event",
        structured(),
        &[],
        &with("quantity", "\"1 000\""),
        invalid("quantity"),
    );
    add(
        c,
        "a CloudEvent without its content-type is a plain event",
        Vec::new(),
        &[],
        &data,
        missing("subscriptionId"),
    );
}

/// Cases where the decoder, as it stands, disagrees with SPEC. Their
/// expectations are SPEC's, so they fail; they are kept out of the main
/// corpus and run by an ignored test.
///
/// - SPEC: ids have "no whitespace, control or zero-width characters". These
///   render as nothing (zero width): bidirectional embeddings, overrides and
///   isolates and other format characters (general category Cf), a
///   variation selector, tag characters. The decoder's zero-width list does
///   not have them, so ids that look alike, or whose text is shown
///   reordered, are accepted.
/// - SPEC: `usageTime` is an RFC 3339 date-time, and RFC 3339 (5.7) allows
///   second 60 only for a leap second, at 23:59:60 UTC at the end of a month;
///   chrono reads ":60" at any minute and the decoder accepts it.
pub fn disputed_cases() -> Vec<Case> {
    let mut c = Corpus {
        cases: Vec::new(),
        category: Category::IdCharacters,
        next_id: 0,
    };
    for (ch, label) in [
        ('\u{202a}', "left-to-right embedding"),
        ('\u{202b}', "right-to-left embedding"),
        ('\u{202c}', "pop directional formatting"),
        ('\u{202d}', "left-to-right override"),
        ('\u{202e}', "right-to-left override"),
        ('\u{2066}', "left-to-right isolate"),
        ('\u{2067}', "right-to-left isolate"),
        ('\u{2068}', "first strong isolate"),
        ('\u{2069}', "pop directional isolate"),
        ('\u{61c}', "Arabic letter mark"),
        ('\u{34f}', "combining grapheme joiner"),
        ('\u{fe0f}', "variation selector-16"),
        ('\u{e0001}', "language tag"),
        ('\u{e0041}', "tag Latin capital A"),
    ] {
        let id = format!("\"usg{}{MARKER}\"", escape(ch));
        c.add(
            format!("id with {label} (U+{:04X})", ch as u32),
            with("id", &id),
            invalid("id"),
        );
        let sub = format!("\"sub_hostile{}\"", escape(ch));
        c.add(
            format!("subscriptionId with {label} (U+{:04X})", ch as u32),
            with("subscriptionId", &sub),
            invalid("subscriptionId"),
        );
    }
    // RFC 3339 (5.7) allows second 60 only at the end of a month with a leap
    // second, i.e. at 23:59:60 UTC; chrono reads ":60" at any minute.
    c.in_category(Category::TimeZonesAndLeapSeconds);
    for text in [
        "2026-11-27T09:59:60Z",
        "2016-12-31T23:59:60+01:00",
        "2026-11-27T09:00:60.5Z",
    ] {
        c.add(
            format!("usageTime {text}, a second 60 that is no leap second"),
            with("usageTime", &js(text)),
            invalid("usageTime"),
        );
    }
    c.cases
}
