//! Which database failures are about the data and which are about the
//! moment: the first rejects a message, the second is retried.

/// How a failed batch is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The database or network is unwell (connection lost, time-out, shut
    /// down, serialization failure, deadlock, a concurrent insert of the
    /// same id): roll back and retry the same batch, never reject.
    Transient,
    /// The database refused the data of a message (SQLSTATE class 22, data
    /// exception, such as a NUL character, or a program limit): find the
    /// message and reject it alone.
    Permanent,
}

/// Classifies an error from the store by its SQLSTATE. Anything that is not
/// plainly about the data is treated as transient: retrying a permanent
/// fault only delays, while rejecting a transient one would lose billing data.
pub fn classify(error: &anyhow::Error) -> FailureKind {
    for cause in error.chain() {
        if let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() {
            let code = db.code().unwrap_or_default();
            return classify_sqlstate(&code);
        }
    }
    FailureKind::Transient
}

pub fn classify_sqlstate(code: &str) -> FailureKind {
    match code.get(..2) {
        // data exception (22), program limit exceeded (54)
        Some("22") | Some("54") => FailureKind::Permanent,
        _ => FailureKind::Transient,
    }
}

/// The database cannot be reached or is not taking work right now: a lost
/// or refused connection, an exhausted pool, a server shutting down or
/// starting up, a cancelled statement. Start-up waits these out.
pub fn is_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => true,
        Some(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref().and_then(|c| c.get(..2)), Some("08" | "57" | "53"))
        }
        _ => false,
    })
}

/// Runs `op` until it succeeds or fails for another reason than the
/// database being unavailable, waiting with capped exponential backoff in
/// between: an outage delays a step that cannot go on without the database
/// instead of stopping the process.
pub async fn until_available<T, Fut>(
    what: &str,
    max_backoff: std::time::Duration,
    mut op: impl FnMut() -> Fut,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = crate::retry::Backoff::new(std::time::Duration::from_millis(100).min(max_backoff), max_backoff);
    loop {
        match op().await {
            Err(e) if is_unavailable(&e) => {
                let failure = format!("{what}: the database is unavailable");
                backoff.wait_after(&failure, &e).await;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_permanent() {
        assert_eq!(classify_sqlstate("22021"), FailureKind::Permanent); // invalid byte sequence (NUL)
        assert_eq!(classify_sqlstate("22003"), FailureKind::Permanent); // numeric out of range
        assert_eq!(classify_sqlstate("54000"), FailureKind::Permanent);
    }

    #[test]
    fn outages_and_races_are_transient() {
        for code in ["08006", "57P01", "57014", "40001", "40P01", "23505", "53300"] {
            assert_eq!(classify_sqlstate(code), FailureKind::Transient, "{code}");
        }
        assert_eq!(classify(&anyhow::anyhow!("io error")), FailureKind::Transient);
    }

    #[test]
    fn lost_connections_and_cancelled_statements_mean_unavailable() {
        let io = anyhow::Error::from(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(is_unavailable(&io.context("initialising consumer offsets")));
        assert!(is_unavailable(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        assert!(!is_unavailable(&anyhow::Error::from(sqlx::Error::RowNotFound)));
        assert!(!is_unavailable(&anyhow::anyhow!(
            "migration 3 was changed after it was applied"
        )));
    }

    #[tokio::test]
    async fn waits_out_an_outage_but_not_other_failures() {
        let mut attempts = 0;
        let value = until_available("test", std::time::Duration::from_millis(1), || {
            attempts += 1;
            let fail = attempts < 3;
            async move {
                if fail {
                    Err(anyhow::Error::from(sqlx::Error::PoolTimedOut))
                } else {
                    Ok(7)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((value, attempts), (7, 3));

        let mut attempts = 0;
        let failed = until_available("test", std::time::Duration::from_millis(1), || {
            attempts += 1;
            async { Err::<(), _>(anyhow::anyhow!("not an outage")) }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(attempts, 1);
    }
}
