//! Where Kafka's producers put a keyed record: which output partition an
//! HTTP create or delete is published to, and where the lab's load
//! generator sends its events.
//!
//! A Kafka message's outcome goes to the partition number it was read from.
//! An HTTP request has none, so its outcome goes where the producers of
//! `usage-events` put a record keyed by the subscription id: when they key
//! their events that way, as SPEC recommends, a subscription's outcomes from
//! either path share one partition of `usage-results`, in order. The worker
//! that owns that partition publishes them. Which hash that is depends on
//! the producers' client (`kafka.partitioner`): murmur2 for Kafka's Java
//! client (and librdkafka's `murmur2_random`), CRC-32 for librdkafka's own
//! default (`consistent_random`, and `consistent`).

use crate::config::Partitioner;

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

/// CRC-32 as zlib computes it (IEEE 802.3: polynomial 0x04C11DB7
/// reflected, initial value and final XOR 0xFFFFFFFF), which librdkafka's
/// `rd_crc32` is.
fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, byte| {
        CRC32_TABLE[((crc ^ u32::from(*byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// The CRC of each byte value, for [`crc32`].
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            bit += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// The partition, out of `partitions`, that `partitioner` picks for records
/// keyed by `key` (a non-empty key: librdkafka's `*_random` partitioners
/// pick a random partition for an empty one).
pub fn output_partition(key: &str, partitions: i32, partitioner: Partitioner) -> i32 {
    assert!(partitions > 0, "a topic has at least one partition");
    match partitioner {
        // Kafka's `Utils.toPositive(murmur2(key)) % partitions`.
        Partitioner::Murmur2 => (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions,
        // librdkafka: `rd_crc32(key, keylen) % partition_cnt`, unsigned.
        Partitioner::Crc32 => (crc32(key.as_bytes()) % partitions as u32) as i32,
    }
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
    fn matches_zlibs_crc32() {
        // The CRC-32 check value, and zlib's crc32() of a few more inputs.
        for (input, expected) in [
            (&b"123456789"[..], 0xcbf4_3926),
            (b"", 0),
            (b"a", 0xe8b7_be43),
            (b"abc", 0x3524_41c2),
            (b"The quick brown fox jumps over the lazy dog", 0x414f_a339),
        ] {
            assert_eq!(crc32(input), expected, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn each_partitioner_takes_its_hash_modulo_the_partition_count() {
        // crc32("123456789") = 3421780262 = 7 * 488825751 + 5: unsigned,
        // neither masked to 31 bits (3) nor read as signed (-6).
        assert_eq!(output_partition("123456789", 7, Partitioner::Crc32), 5);
        // murmur2("foobar") = -790332482; & 0x7fffffff = 1357151166 = 7 * 193878738.
        assert_eq!(output_partition("foobar", 7, Partitioner::Murmur2), 0);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        for partitioner in [Partitioner::Murmur2, Partitioner::Crc32] {
            for key in ["sub_1", "sub_2", "", "ü"] {
                let p = output_partition(key, 4, partitioner);
                assert!((0..4).contains(&p));
                assert_eq!(p, output_partition(key, 4, partitioner));
            }
            assert_eq!(output_partition("foobar", 1, partitioner), 0);
        }
    }
}
