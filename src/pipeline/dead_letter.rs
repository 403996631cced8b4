//! Dead-letter copies: an input message that cannot be decided or applied
//! goes, with its original key, bytes and headers, to the dead-letter topic,
//! sized to fit what the producer may send.

use crate::domain::headers::Headers;
use crate::kafka::record_size::{headers_size, outbox_record_size};
use crate::store::{OutboxRecord, SourcePosition};

/// The original bytes of a message that could not be decoded, for the DLQ.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Headers,
}

/// Names of the headers a dead letter carries besides the original ones.
pub mod dlq_headers {
    pub const REASON: &str = "dlq-reason";
    pub const SOURCE_TOPIC: &str = "dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "dlq-source-offset";
    /// Why a control message was refused (never its payload).
    pub const DETAIL: &str = "dlq-detail";
    /// Set when the payload was cut to fit the producer's message limit:
    /// the original length in bytes.
    pub const TRUNCATED_FROM: &str = "dlq-truncated-from";
    /// Set when the original headers were too large to keep: their size as
    /// librdkafka serialises them.
    pub const HEADERS_DROPPED: &str = "dlq-headers-dropped";
}

/// The dead-letter copy of an input message: original key, bytes and
/// headers, plus headers naming the reason and where it came from. The copy
/// must fit the producer's message limit as librdkafka counts it, or the
/// relay could never publish it (nor anything after it on its partition).
/// One that does not fit whole is a stub: original headers that alone take
/// more than half the room are dropped, a key over a quarter of it too, and
/// the payload is cut to what is left (or emptied), each with a header
/// saying so; the reason, the source coordinates and `detail` (why a
/// control message was refused; empty for none) always stay.
pub fn dead_letter_record(
    topic: &str,
    partition: i32,
    source: (&str, i32, i64),
    raw: &RawMessage,
    reason: &str,
    detail: &str,
    max_bytes: usize,
) -> OutboxRecord {
    let mut own: Headers = [
        (dlq_headers::REASON, reason.to_owned()),
        (dlq_headers::SOURCE_TOPIC, source.0.to_owned()),
        (dlq_headers::SOURCE_PARTITION, source.1.to_string()),
        (dlq_headers::SOURCE_OFFSET, source.2.to_string()),
    ]
    .into_iter()
    .collect();
    if !detail.is_empty() {
        own.push(dlq_headers::DETAIL, detail);
    }
    let record = |key: Option<Vec<u8>>, payload: Vec<u8>, headers: Headers| OutboxRecord {
        topic: topic.to_owned(),
        partition,
        key,
        payload,
        headers,
        source: Some(SourcePosition {
            topic: source.0.to_owned(),
            partition: source.1,
            offset: source.2,
        }),
    };
    let payload = raw.payload.clone().unwrap_or_default();
    let mut headers = raw.headers.clone();
    headers.extend(own.iter());
    if outbox_record_size(raw.key.as_deref(), &payload, &headers) <= max_bytes {
        return record(raw.key.clone(), payload, headers);
    }
    let original_headers = headers_size(&raw.headers);
    if original_headers > max_bytes / 2 {
        headers = own;
        headers.push(dlq_headers::HEADERS_DROPPED, original_headers.to_string());
    }
    let key = raw.key.clone().filter(|k| k.len() <= max_bytes / 4);
    let mut payload = payload;
    if outbox_record_size(key.as_deref(), &payload, &headers) > max_bytes {
        headers.push(dlq_headers::TRUNCATED_FROM, payload.len().to_string());
        let room = max_bytes.saturating_sub(outbox_record_size(key.as_deref(), &[], &headers));
        payload.truncate(room);
    }
    record(key, payload, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(payload: &[u8]) -> RawMessage {
        RawMessage {
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: [("trace", vec![0, 1])].into_iter().collect(),
        }
    }

    /// The copy of a malformed usage message read at `offset`.
    fn malformed_copy(message: &RawMessage, offset: i64, max_bytes: usize) -> OutboxRecord {
        dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, offset),
            message,
            "malformed_payload",
            "",
            max_bytes,
        )
    }

    #[test]
    fn a_dead_letter_keeps_key_bytes_and_headers_and_names_its_source() {
        let record = dead_letter_record(
            "dlq",
            2,
            ("usage-events", 2, 41),
            &raw(b"\xff"),
            "malformed_payload",
            "",
            4000,
        );
        assert_eq!(
            (record.key.as_deref(), record.payload.as_slice()),
            (Some(&b"k"[..]), &b"\xff"[..])
        );
        assert_eq!(record.headers.get("trace"), Some(&[0u8, 1][..]));
        assert_eq!(record.headers.get(dlq_headers::REASON), Some(&b"malformed_payload"[..]));
        assert_eq!(record.headers.get(dlq_headers::SOURCE_OFFSET), Some(&b"41"[..]));
        assert_eq!(record.headers.get(dlq_headers::TRUNCATED_FROM), None);
    }

    fn record_size(record: &OutboxRecord) -> usize {
        outbox_record_size(record.key.as_deref(), &record.payload, &record.headers)
    }

    #[test]
    fn a_dead_letter_over_the_producer_limit_is_truncated_and_says_so() {
        let record = dead_letter_record(
            "dlq",
            0,
            ("usage-events", 0, 1),
            &raw(&[b'x'; 5000]),
            "payload_too_large",
            "",
            2000,
        );
        assert!(record.payload.len() < 2000 && !record.payload.is_empty());
        assert!(record_size(&record) <= 2000);
        assert_eq!(record.headers.get(dlq_headers::TRUNCATED_FROM), Some(&b"5000"[..]));
    }

    #[test]
    fn huge_original_headers_are_dropped_so_the_copy_still_fits() {
        let mut message = raw(b"not json");
        message.headers.push("big", vec![b'h'; 10_000]);
        let record = malformed_copy(&message, 1, 4000);
        assert!(record_size(&record) <= 4000);
        assert_eq!(record.headers.get("big"), None);
        let dropped = headers_size(&message.headers).to_string();
        assert_eq!(
            record.headers.get(dlq_headers::HEADERS_DROPPED),
            Some(dropped.as_bytes())
        );
        assert_eq!(record.payload, b"not json");
    }

    #[test]
    fn tens_of_thousands_of_small_headers_are_counted_as_librdkafka_counts_them() {
        // Their names and values alone take 360,000 bytes, under half the
        // room; serialised with their length varints they take 480,000,
        // and beside the payload the copy would be over the producer's
        // limit, refused on every try.
        let mut message = raw(&[b'x'; 950_000]);
        message.headers = (0..60_000).map(|_| ("abc", "xyz")).collect();
        let limit = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
        let record = malformed_copy(&message, 7, limit);
        assert!(record_size(&record) <= limit, "{} > {limit}", record_size(&record));
        assert_eq!(record.headers.get(dlq_headers::TRUNCATED_FROM), Some(&b"950000"[..]));
        assert_eq!(record.headers.get(dlq_headers::SOURCE_OFFSET), Some(&b"7"[..]));
        assert_eq!(record.headers.get(dlq_headers::REASON), Some(&b"malformed_payload"[..]));
    }

    #[test]
    fn a_control_message_copy_with_its_detail_still_fits() {
        let detail = "d".repeat(500);
        let message = raw(&[b'{'; 999_990]);
        let limit = crate::kafka::record_size::PRODUCER_MAX_MESSAGE_BYTES;
        let record = dead_letter_record(
            "dlq",
            0,
            ("subscriptions", 0, 3),
            &message,
            "invalid_snapshot",
            &detail,
            limit,
        );
        assert!(record_size(&record) <= limit, "{} > {limit}", record_size(&record));
        assert_eq!(record.headers.get(dlq_headers::DETAIL), Some(detail.as_bytes()));
        assert_eq!(record.headers.get(dlq_headers::TRUNCATED_FROM), Some(&b"999990"[..]));
    }

    #[test]
    fn a_copy_that_fits_whole_is_kept_whole() {
        let message = raw(&[b'x'; 10_000]);
        let record = malformed_copy(&message, 1, 20_000);
        assert_eq!(record.payload.len(), 10_000);
        assert_eq!(record.headers.get(dlq_headers::TRUNCATED_FROM), None);
        assert_eq!(record.headers.get("trace"), Some(&[0u8, 1][..]));
    }
}
