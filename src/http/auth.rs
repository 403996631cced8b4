//! Optional bearer-token authentication of `/usages` (RFC 6750). Off unless
//! `http.bearer_token` is set; the probes and `/metrics` stay open so that
//! orchestrators and scrapers need no credentials.
//!
//! Every request let through carries its [`Caller`] as an extension.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::problem::Problem;
use super::Api;
use crate::config::Secret;

const CHALLENGE: &str = r#"Bearer realm="usage-worker""#;
const CHALLENGE_INVALID: &str = r#"Bearer realm="usage-worker", error="invalid_token""#;

/// The name of whoever presents `http.bearer_token`. There is one token, so
/// one name; it scopes what callers name themselves, such as their
/// idempotency keys.
pub const BEARER_TOKEN_CALLER: &str = "bearer_token";

/// Who sent a request, as far as authentication tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: callers cannot be told apart.
    Anonymous,
    /// A caller that presented a configured token, under the token's name.
    Named(String),
}

impl Caller {
    /// The name recorded on what the caller changes (voids, amendments).
    pub fn name(&self) -> &str {
        match self {
            Self::Anonymous => "anonymous",
            Self::Named(name) => name,
        }
    }
}

/// Lets the request through when authentication is off or the token
/// matches, with its [`Caller`]; answers 401 otherwise.
pub async fn require_bearer(State(api): State<Arc<Api>>, mut request: Request, next: Next) -> Response {
    let Some(expected) = &api.config.bearer_token else {
        request.extensions_mut().insert(Caller::Anonymous);
        return next.run(request).await;
    };
    match bearer_token(request.headers()) {
        None => Problem::unauthorized("send Authorization: Bearer <token>", CHALLENGE).into_response(),
        Some(given) if token_matches(given, expected) => {
            request
                .extensions_mut()
                .insert(Caller::Named(BEARER_TOKEN_CALLER.to_owned()));
            next.run(request).await
        }
        Some(_) => Problem::unauthorized("the bearer token is not valid", CHALLENGE_INVALID).into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares digests in constant time, so that neither the position of the
/// first wrong byte nor the token's length shows in the response time.
fn token_matches(given: &str, expected: &Secret) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.expose().as_bytes());
    given.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn reads_the_bearer_token_whatever_the_scheme_case() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_the_exact_token_matches() {
        let secret = Secret::new("s3cret");
        assert!(token_matches("s3cret", &secret));
        assert!(!token_matches("s3cre", &secret));
        assert!(!token_matches("s3cret ", &secret));
        assert!(!token_matches("", &secret));
    }
}
