//! Payload (un)masking (RFC 6455 section 5.3).

/// XORs `buf` in place with `mask`, starting at position `offset` within
/// the 4-byte mask cycle; returns the offset for the byte after `buf`.
///
/// The offset is what lets a frame's payload be unmasked chunk by chunk as
/// it arrives from the socket. Works 32 bytes at a time as byte arrays,
/// which the compiler turns into 16-byte vector XORs without any `unsafe`
/// (pairs of `u128`s became 8-byte scalar XORs: 1.6x slower on 64 KiB; wider
/// chunks or AVX2 gain nothing more, the cache is the limit).
pub(crate) fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) -> usize {
    let rot: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let pattern: [u8; CHUNK] = std::array::from_fn(|i| rot[i % 4]);
    let next = (offset + buf.len()) % 4;
    let (chunks, tail) = buf.as_chunks_mut::<CHUNK>();
    for chunk in chunks {
        for (byte, m) in chunk.iter_mut().zip(pattern) {
            *byte ^= m;
        }
    }
    // CHUNK is a multiple of 4, so the tail starts at rot[0] again.
    for (byte, m) in tail.iter_mut().zip(rot.iter().cycle()) {
        *byte ^= m;
    }
    next
}

/// Writes `src` XORed with `mask` (from the start of its cycle) into
/// `dst`, which must be as long: a copy and an unmasking in one pass, for a
/// payload whose unmasking was deferred to where it is copied to (its
/// first pass over a 64 KiB payload, in cache, costs what the copy does).
///
/// # Panics
/// If the lengths differ.
pub(crate) fn unmask_into(dst: &mut [u8], src: &[u8], mask: [u8; 4]) {
    assert_eq!(dst.len(), src.len(), "unmask_into: lengths differ");
    let pattern: [u8; CHUNK] = std::array::from_fn(|i| mask[i % 4]);
    let (dst_chunks, dst_tail) = dst.as_chunks_mut::<CHUNK>();
    let (src_chunks, src_tail) = src.as_chunks::<CHUNK>();
    for (d, s) in dst_chunks.iter_mut().zip(src_chunks) {
        *d = std::array::from_fn(|i| s[i] ^ pattern[i]);
    }
    for ((d, s), m) in dst_tail.iter_mut().zip(src_tail).zip(mask.iter().cycle()) {
        *d = s ^ m;
    }
}

/// Bytes unmasked per step.
const CHUNK: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn matches_naive_for_all_offsets_and_lengths() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for offset in 0..4 {
            for len in 0..100 {
                let orig: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
                let mut a = orig.clone();
                let mut b = orig.clone();
                let next = apply_mask(&mut a, mask, offset);
                naive(&mut b, mask, offset);
                assert_eq!(a, b);
                assert_eq!(next, (offset + len) % 4);
            }
        }
    }

    #[test]
    fn unmask_into_matches_unmasking_in_place() {
        let mask = [0x9a, 0x01, 0xff, 0x42];
        for len in 0..200 {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut in_place = src.clone();
            apply_mask(&mut in_place, mask, 0);
            let mut copied = vec![0; len];
            unmask_into(&mut copied, &src, mask);
            assert_eq!(copied, in_place);
        }
    }

    #[test]
    fn chunked_equals_whole() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let orig: Vec<u8> = (0..100u8).collect();
        let mut whole = orig.clone();
        apply_mask(&mut whole, mask, 0);
        for split in 0..orig.len() {
            let mut parts = orig.clone();
            let (a, b) = parts.split_at_mut(split);
            let off = apply_mask(a, mask, 0);
            apply_mask(b, mask, off);
            assert_eq!(parts, whole);
        }
    }
}
