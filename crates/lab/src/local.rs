//! The lab's own connections to a database on this host.

/// `url` without TLS, unless it asks for a mode itself: the database is on
/// this host, and the lab measures the pipeline, not TLS.
pub fn without_tls(url: &str) -> anyhow::Result<url::Url> {
    let mut url = url::Url::parse(url)?;
    if !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "disable");
    }
    Ok(url)
}
