//! `GET /usages`: the query parameters and the pagination headers.
//!
//! Parameters: `subscriptionId`, `usageTimeFrom` (inclusive) and
//! `usageTimeTo` (exclusive), RFC 3339 with an offset like `usageTime`;
//! `status` (`active`, the default: usages that count; `voided`; `all`);
//! `limit` (0..=1000, default 100); `offset` (0..=10,000, default 0) or
//! `cursor` (from a `next` link), not both. Unknown parameters are
//! ignored, like unknown body fields. Pages are in `usageTime` order, then
//! id.
//!
//! Headers: `Pagination-Total` (counted up to [`TOTAL_CAP`]),
//! `Pagination-Limit`, `Pagination-Offset`, and a `Link` (RFC 8288) to the
//! `next` page (always by cursor) and, when paging by offset, the `prev`
//! page, where they exist.
//!
//! Every page has a bounded cost: a cursor seeks the list's index, the
//! offset is capped, and so is the count.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

use super::problem::FieldProblem;
use crate::domain::event::parse_timestamp;
use crate::domain::ids::check_id;
use crate::store::{PageStart, StatusFilter, UsageFilter};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;
/// The largest `offset`: PostgreSQL reads every row an offset skips, so
/// deeper pages are reached by cursor.
pub const MAX_OFFSET: i64 = 10_000;
/// `Pagination-Total` counts matching usages up to this; this value itself
/// means "this many or more".
pub const TOTAL_CAP: i64 = 10_001;

pub mod params {
    pub const SUBSCRIPTION_ID: &str = "subscriptionId";
    pub const USAGE_TIME_FROM: &str = "usageTimeFrom";
    pub const USAGE_TIME_TO: &str = "usageTimeTo";
    pub const LIMIT: &str = "limit";
    pub const OFFSET: &str = "offset";
    pub const CURSOR: &str = "cursor";
    pub const STATUS: &str = "status";
}

/// Where the next page starts: the last usage of this one. Opaque to
/// clients (base64url of a versioned text); not secret, since it names
/// only a usage the caller has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub usage_time: DateTime<Utc>,
    pub id: String,
}

impl Cursor {
    const VERSION: &'static str = "v1";

    pub fn encode(&self) -> String {
        let text = format!("{}:{}:{}", Self::VERSION, self.usage_time.timestamp_micros(), self.id);
        URL_SAFE_NO_PAD.encode(text)
    }

    /// A cursor this API made, or `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (version, rest) = text.split_once(':')?;
        let (micros, id) = rest.split_once(':')?;
        if version != Self::VERSION || check_id(id).is_err() {
            return None;
        }
        Some(Self {
            usage_time: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.to_owned(),
        })
    }
}

/// A listing request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: UsageFilter,
    pub limit: i64,
    pub offset: i64,
    pub cursor: Option<Cursor>,
    /// The parameters as given, to build the links to other pages from.
    pairs: Vec<(String, String)>,
}

impl ListQuery {
    /// Reads the raw query string; every unusable parameter is reported.
    pub fn parse(raw: Option<&str>) -> Result<Self, Vec<FieldProblem>> {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
        let mut problems = Vec::new();
        let mut take = |name: &'static str| -> Option<String> {
            let mut given = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone());
            let first = given.next();
            if given.next().is_some() {
                problems.push(invalid(name, "must be given at most once"));
                return None;
            }
            first
        };
        let subscription_id = take(params::SUBSCRIPTION_ID);
        let from = take(params::USAGE_TIME_FROM);
        let to = take(params::USAGE_TIME_TO);
        let limit = take(params::LIMIT);
        let offset = take(params::OFFSET);
        let cursor = take(params::CURSOR);
        let status = take(params::STATUS);

        let subscription_id = subscription_id.and_then(|id| match check_id(&id) {
            Ok(()) => Some(id),
            Err(message) => {
                problems.push(invalid(params::SUBSCRIPTION_ID, &message));
                None
            }
        });
        let mut time = |name: &'static str, value: Option<String>| {
            value.and_then(|text| match parse_timestamp(&text) {
                Ok(time) => Some(time),
                Err(message) => {
                    problems.push(invalid(name, &message));
                    None
                }
            })
        };
        let usage_time_from = time(params::USAGE_TIME_FROM, from);
        let usage_time_to = time(params::USAGE_TIME_TO, to);
        if let (Some(from), Some(to)) = (usage_time_from, usage_time_to) {
            if to <= from {
                problems.push(invalid(params::USAGE_TIME_TO, "must be after usageTimeFrom"));
            }
        }
        let status = match status.as_deref().map(StatusFilter::parse) {
            None => StatusFilter::default(),
            Some(Some(status)) => status,
            Some(None) => {
                problems.push(invalid(params::STATUS, "must be active, voided or all"));
                StatusFilter::default()
            }
        };
        let limit = number(params::LIMIT, limit, DEFAULT_LIMIT, MAX_LIMIT, &mut problems);
        let offset_given = offset.is_some();
        let offset = number(params::OFFSET, offset, 0, MAX_OFFSET, &mut problems);
        if let Some(problem) = problems.iter_mut().find(|p| p.field == params::OFFSET) {
            problem
                .message
                .push_str("; page further with the cursor of the Link rel=\"next\"");
        }
        let cursor = cursor.and_then(|text| match Cursor::decode(&text) {
            Some(_) if offset_given => {
                problems.push(invalid(params::CURSOR, "cannot be combined with offset"));
                None
            }
            Some(cursor) => Some(cursor),
            None => {
                problems.push(invalid(params::CURSOR, "is not a cursor from a Link of this API"));
                None
            }
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            filter: UsageFilter {
                subscription_id,
                usage_time_from,
                usage_time_to,
                status,
            },
            limit,
            offset,
            cursor,
            pairs,
        })
    }

    /// Where the page starts in the store's terms.
    pub fn start(&self) -> PageStart {
        match &self.cursor {
            Some(cursor) => PageStart::After {
                usage_time: cursor.usage_time,
                id: cursor.id.clone(),
            },
            None => PageStart::Offset(self.offset),
        }
    }

    /// The pagination headers of a page of this query out of `total`;
    /// `next` is where the next page starts, when there is one.
    pub fn headers(&self, total: i64, next: Option<&Cursor>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("pagination-total", total),
            ("pagination-limit", self.limit),
            ("pagination-offset", self.offset),
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
        }
        let mut links = Vec::new();
        if let Some(next) = next {
            links.push(format!("<{}>; rel=\"next\"", self.link(params::CURSOR, &next.encode())));
        }
        if self.cursor.is_none() && self.offset > 0 {
            let prev = (self.offset - self.limit).max(0);
            links.push(format!(
                "<{}>; rel=\"prev\"",
                self.link(params::OFFSET, &prev.to_string())
            ));
        }
        if !links.is_empty() {
            let value = HeaderValue::from_str(&links.join(", ")).expect("links are URL-encoded ASCII");
            headers.insert(axum::http::header::LINK, value);
        }
        headers
    }

    /// `/usages?...` with the same parameters and another offset or cursor.
    fn link(&self, name: &str, value: &str) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (given, given_value) in self
            .pairs
            .iter()
            .filter(|(k, _)| k != params::OFFSET && k != params::CURSOR)
        {
            query.append_pair(given, given_value);
        }
        query.append_pair(name, value);
        format!("/usages?{}", query.finish())
    }
}

pub(super) fn invalid(name: &str, message: &str) -> FieldProblem {
    FieldProblem {
        field: name.to_owned(),
        code: crate::domain::ReasonCode::InvalidField.as_str(),
        message: format!("{name} {message}"),
    }
}

/// A whole number in `0..=max`, or `default` when absent.
fn number(name: &'static str, value: Option<String>, default: i64, max: i64, problems: &mut Vec<FieldProblem>) -> i64 {
    let Some(text) = value else { return default };
    match text.parse::<i64>() {
        Ok(n) if (0..=max).contains(&n) => n,
        _ => {
            problems.push(invalid(name, &format!("must be a whole number from 0 to {max}")));
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(problems: &[FieldProblem]) -> Vec<&str> {
        problems.iter().map(|p| p.field.as_str()).collect()
    }

    #[test]
    fn defaults_without_parameters() {
        let q = ListQuery::parse(None).unwrap();
        assert_eq!((q.limit, q.offset), (DEFAULT_LIMIT, 0));
        assert_eq!(q.filter, UsageFilter::default());
    }

    #[test]
    fn reads_filters_and_pages() {
        let q = ListQuery::parse(Some(
            "subscriptionId=sub_1&usageTimeFrom=2026-11-01T00:00:00Z&usageTimeTo=2026-12-01T00:00:00%2B01:00&limit=5&offset=10&x=y",
        ))
        .unwrap();
        assert_eq!(q.filter.subscription_id.as_deref(), Some("sub_1"));
        assert_eq!(
            q.filter.usage_time_to.unwrap().to_rfc3339(),
            "2026-11-30T23:00:00+00:00"
        );
        assert_eq!((q.limit, q.offset), (5, 10));
        assert_eq!(q.filter.status, StatusFilter::Active);
    }

    #[test]
    fn status_chooses_what_voids_hide() {
        for (given, status) in [
            ("status=active", StatusFilter::Active),
            ("status=voided", StatusFilter::Voided),
            ("status=all", StatusFilter::All),
        ] {
            assert_eq!(ListQuery::parse(Some(given)).unwrap().filter.status, status);
        }
        for wrong in ["status=deleted", "status=", "status=all&status=all"] {
            assert_eq!(
                fields(&ListQuery::parse(Some(wrong)).unwrap_err()),
                ["status"],
                "{wrong}"
            );
        }
    }

    #[test]
    fn reports_every_bad_parameter() {
        let problems = ListQuery::parse(Some(
            "subscriptionId=a%20b&usageTimeFrom=yesterday&usageTimeTo=2026-11-01T00:00:00&limit=1001&offset=-1",
        ))
        .unwrap_err();
        assert_eq!(
            fields(&problems),
            ["subscriptionId", "usageTimeFrom", "usageTimeTo", "limit", "offset"]
        );
        let problems = ListQuery::parse(Some("limit=1&limit=2")).unwrap_err();
        assert_eq!(fields(&problems), ["limit"]);
        let problems = ListQuery::parse(Some(
            "usageTimeFrom=2026-11-02T00:00:00Z&usageTimeTo=2026-11-01T00:00:00Z",
        ))
        .unwrap_err();
        assert_eq!(fields(&problems), ["usageTimeTo"]);
    }

    #[test]
    fn the_next_link_is_a_cursor_and_prev_moves_the_offset() {
        let next = Cursor {
            usage_time: "2026-11-01T00:00:00.000123Z".parse().unwrap(),
            id: "u:4".to_owned(),
        };
        let q = ListQuery::parse(Some("subscriptionId=sub_1&limit=2&offset=2")).unwrap();
        let headers = q.headers(5, Some(&next));
        assert_eq!(headers["pagination-total"], "5");
        assert_eq!(
            headers["link"],
            format!(
                "</usages?subscriptionId=sub_1&limit=2&cursor={}>; rel=\"next\", </usages?subscriptionId=sub_1&limit=2&offset=0>; rel=\"prev\"",
                next.encode()
            )
        );
        let last = ListQuery::parse(Some("limit=2&offset=4")).unwrap().headers(5, None);
        assert_eq!(last["link"], "</usages?limit=2&offset=2>; rel=\"prev\"");
        assert!(ListQuery::parse(None).unwrap().headers(5, None).get("link").is_none());
        // A page read by cursor links to the next one only.
        let q = ListQuery::parse(Some(&format!("limit=2&cursor={}", next.encode()))).unwrap();
        assert_eq!(q.cursor.as_ref(), Some(&next));
        assert_eq!(
            q.start(),
            PageStart::After {
                usage_time: next.usage_time,
                id: next.id.clone()
            }
        );
        assert!(q.headers(5, None).get("link").is_none());
    }

    #[test]
    fn a_cursor_survives_its_round_trip_and_nothing_else_is_one() {
        let cursor = Cursor {
            usage_time: "1999-12-31T23:59:59.999999Z".parse().unwrap(),
            id: "usg_ü:1".to_owned(),
        };
        let text = cursor.encode();
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{text}"
        );
        assert_eq!(Cursor::decode(&text), Some(cursor));
        let forged = |text: &str| URL_SAFE_NO_PAD.encode(text);
        for wrong in [
            "".to_owned(),
            "not base64!".to_owned(),
            forged("v2:0:u1"),
            forged("v1:soon:u1"),
            forged("v1:0"),
            forged("v1:0:"),
            forged("v1:0:a b"),
            forged(&format!("v1:{}:u1", i64::MAX)),
        ] {
            assert_eq!(Cursor::decode(&wrong), None, "{wrong}");
            let problems = ListQuery::parse(Some(&format!("cursor={wrong}"))).unwrap_err();
            assert_eq!(fields(&problems), ["cursor"], "{wrong}");
        }
    }

    #[test]
    fn the_offset_is_capped_and_excludes_the_cursor() {
        let q = ListQuery::parse(Some(&format!("offset={MAX_OFFSET}"))).unwrap();
        assert_eq!(q.start(), PageStart::Offset(MAX_OFFSET));
        let problems = ListQuery::parse(Some(&format!("offset={}", MAX_OFFSET + 1))).unwrap_err();
        assert_eq!(fields(&problems), ["offset"]);
        assert!(problems[0].message.contains("cursor"), "{}", problems[0].message);
        let cursor = Cursor {
            usage_time: Utc::now(),
            id: "u1".to_owned(),
        };
        let problems = ListQuery::parse(Some(&format!("offset=0&cursor={}", cursor.encode()))).unwrap_err();
        assert_eq!(fields(&problems), ["cursor"]);
    }
}
