//! How large librdkafka counts a record when it decides whether the producer
//! may send it (`rd_kafka_msg_new0`): the most a v2 record's framing can
//! take, plus key, value and the serialised headers, each header with the
//! varint lengths of its name and value. A record over the producer's
//! `message.max.bytes` by this count is refused before it is queued, and
//! would be refused on every retry: what the outbox stores must fit by it.

use crate::domain::headers::Headers;

/// The producer's `message.max.bytes` (librdkafka's default, which the
/// worker does not change).
pub const PRODUCER_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// The largest framing of one v2 record: length, offset delta, key length,
/// value length and header count as 5-byte varints, the timestamp delta as
/// a 10-byte one, and the attributes byte.
const RECORD_MAX_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

/// The header every published outbox record gets beside its own ones.
pub const OUTBOX_SEQ_HEADER: &str = "outbox-seq";

/// Bytes of the zig-zag varint librdkafka writes for a length.
fn varint_len(length: usize) -> usize {
    let mut zigzag = (length as u64) << 1;
    let mut bytes = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        bytes += 1;
    }
    bytes
}

/// One header as librdkafka serialises it.
pub fn header_size(name: &str, value: &[u8]) -> usize {
    name.len() + value.len() + varint_len(name.len()) + varint_len(value.len())
}

/// Headers as librdkafka serialises them.
pub fn headers_size(headers: &Headers) -> usize {
    headers.iter().map(|(name, value)| header_size(name, value)).sum()
}

/// The size librdkafka compares with `message.max.bytes`, for a record the
/// relay publishes (its own headers plus `outbox-seq`).
pub fn outbox_record_size(key: Option<&[u8]>, payload: &[u8], headers: &Headers) -> usize {
    RECORD_MAX_OVERHEAD
        + key.map_or(0, <[u8]>::len)
        + payload.len()
        + headers_size(headers)
        // The largest sequence number has 19 digits.
        + header_size(OUTBOX_SEQ_HEADER, &[b'9'; 19])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_grow_every_seven_bits_of_the_zigzag_value() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2, "zig-zag doubles: 128 needs two bytes");
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }

    #[test]
    fn each_header_costs_its_two_length_varints_beside_its_bytes() {
        assert_eq!(header_size("a", b""), 3);
        assert_eq!(header_size("trace", &[0; 100]), 5 + 100 + 1 + 2);
        let many: Headers = (0..60_000).map(|_| ("abc", "xyz")).collect();
        assert_eq!(headers_size(&many), 60_000 * 8);
    }
}
