//! Callers (RFC 6750 bearer tokens): each guarded route needs a scope, and
//! each configured token is a named caller with scopes (`http.tokens`, and
//! version 1's `http.bearer_token` as `bearer_token` with every scope).
//! With no token configured, anyone may call, as `anonymous`. The probes
//! stay open, and `/metrics` unless `http.metrics_requires_token`.
//!
//! Every request let through carries its [`Caller`] as an extension.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use crate::config::{sha256, HttpSettings, NamedToken, Scope};

const CHALLENGE: &str = r#"Bearer realm="usage-worker""#;
const CHALLENGE_INVALID: &str = r#"Bearer realm="usage-worker", error="invalid_token""#;

/// Who sent a request, as far as authentication tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No token is configured: callers cannot be told apart.
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

/// The configured tokens, by digest.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    tokens: Vec<NamedToken>,
}

impl Callers {
    pub fn new(tokens: Vec<NamedToken>) -> Self {
        Self { tokens }
    }

    /// The tokens of validated settings.
    pub fn from_settings(http: &HttpSettings) -> anyhow::Result<Self> {
        http.callers().map(Self::new)
    }

    /// No token is configured: everyone is [`Caller::Anonymous`].
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens are configured.
    pub fn count(&self) -> usize {
        self.tokens.len()
    }

    /// The caller a request's headers name, if it may do what `scope`
    /// allows; the problem to answer otherwise (401 without a valid token,
    /// 403 with a valid one that lacks the scope).
    pub fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<Caller, Problem> {
        if self.is_open() {
            return Ok(Caller::Anonymous);
        }
        let Some(given) = bearer_token(headers) else {
            return Err(Problem::unauthorized("send Authorization: Bearer <token>", CHALLENGE));
        };
        let Some(token) = self.identify(given) else {
            return Err(Problem::unauthorized(
                "the bearer token is not valid",
                CHALLENGE_INVALID,
            ));
        };
        if !token.allows(scope) {
            return Err(Problem::insufficient_scope(&token.name, scope.as_str()));
        }
        Ok(Caller::Named(token.name.clone()))
    }

    /// The token whose digest is the given token's. The presented token is
    /// hashed once and compared with every digest in constant time, without
    /// stopping at a match, so that the response time tells neither which
    /// byte differs nor which entry matched.
    fn identify(&self, given: &str) -> Option<&NamedToken> {
        let digest = sha256(given);
        let mut found = None;
        for token in &self.tokens {
            let same = digest
                .iter()
                .zip(token.digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            found = if same { Some(token) } else { found };
        }
        found
    }
}

/// What a guarded route's middleware needs: the tokens, and the route's scope.
#[derive(Clone)]
pub struct Guard {
    pub callers: Arc<Callers>,
    pub scope: Scope,
}

/// Lets the request through with its [`Caller`] when it may use the
/// route's scope; answers 401 or 403 otherwise.
pub async fn require_scope(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    match guard.callers.authorize(request.headers(), guard.scope) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(problem) => problem.into_response(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn token(name: &str, secret: &str, scopes: &[Scope]) -> NamedToken {
        NamedToken {
            name: name.into(),
            digest: sha256(secret),
            scopes: scopes.to_vec(),
        }
    }

    fn callers() -> Callers {
        Callers::new(vec![
            token("reader", "r-secret", &[Scope::UsagesRead]),
            token("invoicing", "i-secret", &[Scope::UsagesRead, Scope::UsagesWrite]),
            token("auditor", "a-secret", &[Scope::UsagesVoid, Scope::MetricsRead]),
        ])
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
        let callers = callers();
        assert_eq!(callers.identify("i-secret").unwrap().name, "invoicing");
        assert_eq!(callers.identify("a-secret").unwrap().name, "auditor");
        for wrong in ["i-secre", "i-secret ", "", "I-SECRET"] {
            assert!(callers.identify(wrong).is_none(), "{wrong:?}");
        }
    }

    #[test]
    fn with_no_token_configured_everyone_is_anonymous() {
        let open = Callers::default();
        for scope in Scope::ALL {
            assert_eq!(open.authorize(&HeaderMap::new(), scope).unwrap(), Caller::Anonymous);
            assert_eq!(
                open.authorize(&headers("Bearer anything"), scope).unwrap(),
                Caller::Anonymous
            );
        }
    }

    #[test]
    fn a_missing_or_unknown_token_is_401_and_a_missing_scope_403() {
        let callers = callers();
        let missing = callers.authorize(&HeaderMap::new(), Scope::UsagesRead).unwrap_err();
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        let unknown = callers
            .authorize(&headers("Bearer guess"), Scope::UsagesRead)
            .unwrap_err();
        assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
        let lacking = callers
            .authorize(&headers("Bearer r-secret"), Scope::UsagesWrite)
            .unwrap_err();
        assert_eq!(lacking.status(), StatusCode::FORBIDDEN);
        assert_eq!(lacking.code(), "insufficient_scope");
        let lacking = callers
            .authorize(&headers("Bearer i-secret"), Scope::UsagesVoid)
            .unwrap_err();
        assert_eq!(lacking.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_token_with_the_scope_names_its_caller() {
        let callers = callers();
        let named = |secret: &str, scope| callers.authorize(&headers(&format!("Bearer {secret}")), scope).unwrap();
        assert_eq!(named("r-secret", Scope::UsagesRead), Caller::Named("reader".into()));
        assert_eq!(named("i-secret", Scope::UsagesWrite), Caller::Named("invoicing".into()));
        assert_eq!(named("a-secret", Scope::UsagesVoid), Caller::Named("auditor".into()));
        assert_eq!(named("a-secret", Scope::MetricsRead).name(), "auditor");
    }
}
