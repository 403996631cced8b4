//! The `Idempotency-Key` request header of `POST /usages`.
//!
//! A create without `id` gets a random id, so a client that lost the answer
//! (a 503, a dropped connection) cannot tell a retry from a new usage. With
//! the header, the id is derived from the key instead: the retry lands on
//! the same id and is answered 200 with the stored usage, or 409
//! `idempotency_conflict` when its body differs. The key is scoped to the
//! caller, so two callers cannot claim each other's usages by choosing the
//! same key. A body with an `id` needs no key: the header is then ignored.
//!
//! `POST /usage-batches` takes one key for all its bodies: the body at
//! index *i* without an `id` gets the id derived from `<key>:<i>`
//! ([`IdempotencyKey::for_index`]), so a retried batch lands on the same ids.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::auth::Caller;
use crate::domain::{ReasonCode, Rejection};

/// The header's name, as problems name it.
pub const HEADER: &str = "Idempotency-Key";

/// Longest key, in characters.
const MAX_CHARS: usize = 255;

/// Hex digits of the SHA-256 digest kept in the id: 96 bits, so that two
/// different keys meet on one id with a chance of about 2^-48 after 2^24
/// keys.
const DIGEST_HEX_DIGITS: usize = 24;

/// A valid key: 1 to 255 printable ASCII characters (space included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The request's key, if it sent one. Several headers, or a value that
    /// is not 1 to 255 printable ASCII characters, are a 422 on the header.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, Rejection> {
        let mut values = headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let more = values.count();
        if more > 0 {
            return Err(invalid(format!("send one {HEADER} header, not {}", more + 1)));
        }
        Self::parse(value.as_bytes()).map(Some)
    }

    /// The only constructor: checks the length and the characters.
    pub fn parse(bytes: &[u8]) -> Result<Self, Rejection> {
        if bytes.is_empty() || bytes.len() > MAX_CHARS {
            return Err(invalid(format!(
                "must be 1 to {MAX_CHARS} printable ASCII characters, got {}",
                bytes.len()
            )));
        }
        if let Some(byte) = bytes.iter().find(|b| !(b' '..=b'~').contains(*b)) {
            return Err(invalid(format!(
                "must be printable ASCII characters only (found byte 0x{byte:02X})"
            )));
        }
        let text = std::str::from_utf8(bytes).expect("printable ASCII is UTF-8");
        Ok(Self(text.to_owned()))
    }

    /// The key of the body at `index` of a batch sent with this key:
    /// `<key>:<index>`. Only hashed, so it may be longer than a key sent.
    pub fn for_index(&self, index: usize) -> Self {
        Self(format!("{}:{index}", self.0))
    }

    /// The usage id for this key sent by `caller`: `usg_` + the first 24
    /// lowercase hex digits of SHA-256 of the key, or of `<name>:<key>` for
    /// a named caller.
    pub fn usage_id(&self, caller: &Caller) -> String {
        let mut hasher = Sha256::new();
        if let Caller::Named(name) = caller {
            hasher.update(name.as_bytes());
            hasher.update(b":");
        }
        hasher.update(self.0.as_bytes());
        let hex: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        format!("usg_{}", &hex[..DIGEST_HEX_DIGITS])
    }
}

fn invalid(message: String) -> Rejection {
    Rejection::on_field(ReasonCode::InvalidField, HEADER, format!("{HEADER} {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_id_is_the_sha256_prefix_of_the_key_or_of_the_callers_name_and_key() {
        let key = IdempotencyKey::parse(b"abc").unwrap();
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(key.usage_id(&Caller::Anonymous), "usg_ba7816bf8f01cfea414140de");
        // SHA-256("billing:abc")
        let named = key.usage_id(&Caller::Named("billing".into()));
        let expected = Sha256::digest(b"billing:abc");
        let expected: String = expected.iter().take(12).map(|b| format!("{b:02x}")).collect();
        assert_eq!(named, format!("usg_{expected}"));
        assert_ne!(named, key.usage_id(&Caller::Anonymous));
        assert_eq!(named.len(), 28);
    }

    #[test]
    fn a_batch_body_gets_the_id_of_key_colon_index() {
        let key = IdempotencyKey::parse(b"batch-7").unwrap();
        let anonymous = key.for_index(3).usage_id(&Caller::Anonymous);
        let expected: String = Sha256::digest(b"batch-7:3")
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(anonymous, format!("usg_{expected}"));
        let named = key.for_index(3).usage_id(&Caller::Named("billing".into()));
        let expected: String = Sha256::digest(b"billing:batch-7:3")
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(named, format!("usg_{expected}"));
        assert_ne!(anonymous, key.for_index(4).usage_id(&Caller::Anonymous));
        // The longest key still derives an id.
        let longest = IdempotencyKey::parse("k".repeat(255).as_bytes()).unwrap();
        assert_eq!(longest.for_index(999).usage_id(&Caller::Anonymous).len(), 28);
    }

    #[test]
    fn keys_are_1_to_255_printable_ascii_characters() {
        assert!(IdempotencyKey::parse(b"x").is_ok());
        assert!(IdempotencyKey::parse(" !~".as_bytes()).is_ok());
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_ok());
        for bad in [
            &b""[..],
            "k".repeat(256).as_bytes(),
            b"a\tb",
            b"\x7f",
            "caf\u{e9}".as_bytes(),
        ] {
            let rejection = IdempotencyKey::parse(bad).unwrap_err();
            assert_eq!(rejection.code, ReasonCode::InvalidField);
            assert_eq!(rejection.field, Some("Idempotency-Key"));
        }
    }

    #[test]
    fn one_header_at_most() {
        let mut headers = HeaderMap::new();
        assert_eq!(IdempotencyKey::from_headers(&headers).unwrap(), None);
        headers.append(HEADER, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers).unwrap(),
            Some(IdempotencyKey("a".into()))
        );
        headers.append(HEADER, HeaderValue::from_static("a"));
        let rejection = IdempotencyKey::from_headers(&headers).unwrap_err();
        assert!(rejection.message.contains("not 2"), "{}", rejection.message);
    }
}
