//! Which output partition an HTTP create or delete is published to.
//!
//! A Kafka message's outcome goes to the partition number it was read from.
//! An HTTP request has none, so its outcome goes where Kafka's Java client
//! (and librdkafka's `murmur2_random` partitioner) would put a record keyed
//! by the subscription id: when upstream producers key `usage-events` that
//! way, as SPEC recommends, a subscription's outcomes from either path share
//! one partition of `usage-results`, in order. The worker that owns that
//! partition publishes them.

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`).
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, byte) in rest.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition, out of `partitions`, for records keyed by `key`.
pub fn output_partition(key: &str, partitions: i32) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafkas_murmur2() {
        // Kafka's own test vectors (UtilsTest.testMurmur2).
        for (input, expected) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for key in ["sub_1", "sub_2", "", "ü"] {
            let p = output_partition(key, 4);
            assert!((0..4).contains(&p));
            assert_eq!(p, output_partition(key, 4));
        }
        assert_eq!(output_partition("foobar", 1), 0);
    }
}
