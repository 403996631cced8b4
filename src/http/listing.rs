//! `GET /usages`: the query parameters and the pagination headers.
//!
//! Parameters: `subscriptionId`, `usageTimeFrom` (inclusive) and
//! `usageTimeTo` (exclusive), RFC 3339 with an offset like `usageTime`;
//! `status` (`active`, the default: usages that count; `voided`; `all`);
//! `limit` (0..=1000, default 100) and `offset` (default 0). Unknown
//! parameters are ignored, like unknown body fields. Pages are in
//! `usageTime` order, then id.
//!
//! Headers: `Pagination-Total`, `Pagination-Limit`, `Pagination-Offset`,
//! and a `Link` (RFC 8288) to the `next` and `prev` pages where they exist.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::problem::FieldProblem;
use crate::domain::event::parse_timestamp;
use crate::domain::ids::check_id;
use crate::store::{StatusFilter, UsageFilter};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

pub mod params {
    pub const SUBSCRIPTION_ID: &str = "subscriptionId";
    pub const USAGE_TIME_FROM: &str = "usageTimeFrom";
    pub const USAGE_TIME_TO: &str = "usageTimeTo";
    pub const LIMIT: &str = "limit";
    pub const OFFSET: &str = "offset";
    pub const STATUS: &str = "status";
}

/// A listing request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: UsageFilter,
    pub limit: i64,
    pub offset: i64,
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
        let offset = number(params::OFFSET, offset, 0, i64::MAX, &mut problems);
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
            pairs,
        })
    }

    /// The pagination headers of a page of this query out of `total`.
    pub fn headers(&self, total: i64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("pagination-total", total),
            ("pagination-limit", self.limit),
            ("pagination-offset", self.offset),
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
        }
        let mut links = Vec::new();
        if self.limit > 0 && self.offset.saturating_add(self.limit) < total {
            links.push(format!("<{}>; rel=\"next\"", self.link(self.offset + self.limit)));
        }
        if self.offset > 0 {
            links.push(format!(
                "<{}>; rel=\"prev\"",
                self.link((self.offset - self.limit).max(0))
            ));
        }
        if !links.is_empty() {
            let value = HeaderValue::from_str(&links.join(", ")).expect("links are URL-encoded ASCII");
            headers.insert(axum::http::header::LINK, value);
        }
        headers
    }

    /// `/usages?...` with the same parameters and another offset.
    fn link(&self, offset: i64) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in self.pairs.iter().filter(|(k, _)| k != params::OFFSET) {
            query.append_pair(name, value);
        }
        query.append_pair(params::OFFSET, &offset.to_string());
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
        _ if max == i64::MAX => {
            problems.push(invalid(name, "must be a whole number, at least 0"));
            default
        }
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
    fn links_keep_the_filters_and_move_the_offset() {
        let q = ListQuery::parse(Some("subscriptionId=sub_1&limit=2&offset=2")).unwrap();
        let headers = q.headers(5);
        assert_eq!(headers["pagination-total"], "5");
        assert_eq!(
            headers["link"],
            "</usages?subscriptionId=sub_1&limit=2&offset=4>; rel=\"next\", </usages?subscriptionId=sub_1&limit=2&offset=0>; rel=\"prev\""
        );
        let last = ListQuery::parse(Some("limit=2&offset=4")).unwrap().headers(5);
        assert_eq!(last["link"], "</usages?limit=2&offset=2>; rel=\"prev\"");
        assert!(ListQuery::parse(None).unwrap().headers(5).get("link").is_none());
    }
}
