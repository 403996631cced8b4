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
}
