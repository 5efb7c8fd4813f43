//! Error correction for the watermark payload: a keyed CRC-24 to tell a real
//! mark from noise, and a rate-1/2, constraint-length-7 convolutional code
//! (generators 171/133 octal) decoded with a soft-decision Viterbi decoder.

/// Data bits carried.
pub const PAYLOAD_BITS: usize = 64;
/// Check bits: an unmarked image passes with probability 2⁻²⁴ ≈ 6·10⁻⁸.
pub const CRC_BITS: usize = 24;
const K: usize = 7;
const TAIL: usize = K - 1;
/// Bits into the encoder: payload, CRC, zero tail.
pub const MESSAGE_BITS: usize = PAYLOAD_BITS + CRC_BITS + TAIL;
/// Coded bits out of the encoder.
pub const CODED_BITS: usize = 2 * MESSAGE_BITS;
const G1: u32 = 0o171;
const G2: u32 = 0o133;

/// CRC-24 (OpenPGP polynomial) over the payload bits, its register seeded
/// from the key so a mark made under another key does not check.
pub fn crc24(payload: u64, seed: u32) -> u32 {
    let mut crc = 0xB704CE ^ (seed & 0xFF_FFFF);
    for byte in payload.to_be_bytes() {
        crc ^= u32::from(byte) << 16;
        for _ in 0..8 {
            crc <<= 1;
            if crc & 0x100_0000 != 0 {
                crc ^= 0x864CFB;
            }
        }
    }
    crc & 0xFF_FFFF
}

/// Payload + CRC + tail as bits, most significant first.
fn message(payload: u64, seed: u32) -> Vec<u8> {
    let crc = crc24(payload, seed);
    let mut bits = Vec::with_capacity(MESSAGE_BITS);
    bits.extend((0..PAYLOAD_BITS).rev().map(|i| ((payload >> i) & 1) as u8));
    bits.extend((0..CRC_BITS).rev().map(|i| ((crc >> i) & 1) as u8));
    bits.extend(std::iter::repeat_n(0, TAIL));
    bits
}

fn parity(x: u32) -> u8 {
    (x.count_ones() & 1) as u8
}

/// Encodes payload + CRC into [`CODED_BITS`] bits (0/1).
pub fn encode(payload: u64, seed: u32) -> Vec<u8> {
    let mut state = 0u32;
    let mut out = Vec::with_capacity(CODED_BITS);
    for bit in message(payload, seed) {
        state = ((state << 1) | u32::from(bit)) & 0x7F;
        out.push(parity(state & G1));
        out.push(parity(state & G2));
    }
    out
}

/// Soft-decision Viterbi decoding: `soft[i] > 0` means coded bit i is likely
/// 1, with confidence growing with the magnitude. Returns the payload when
/// its CRC checks.
pub fn decode(soft: &[f32], seed: u32) -> Option<u64> {
    let (payload, ok) = decode_best(soft, seed)?;
    ok.then_some(payload)
}

/// The most likely payload, and whether its CRC checks.
pub fn decode_best(soft: &[f32], seed: u32) -> Option<(u64, bool)> {
    if soft.len() != CODED_BITS {
        return None;
    }
    const STATES: usize = 1 << (K - 1);
    let mut metric = [f32::NEG_INFINITY; STATES];
    metric[0] = 0.0;
    let mut history: Vec<[u8; STATES]> = Vec::with_capacity(MESSAGE_BITS);
    for step in 0..MESSAGE_BITS {
        let (s1, s2) = (soft[2 * step], soft[2 * step + 1]);
        let mut next = [f32::NEG_INFINITY; STATES];
        let mut from = [0u8; STATES];
        for (prev, &m) in metric.iter().enumerate() {
            if m == f32::NEG_INFINITY {
                continue;
            }
            for bit in 0..2u32 {
                let reg = ((prev as u32) << 1 | bit) & 0x7F;
                let o1 = if parity(reg & G1) == 1 { s1 } else { -s1 };
                let o2 = if parity(reg & G2) == 1 { s2 } else { -s2 };
                let ns = (reg & 0x3F) as usize;
                let cand = m + o1 + o2;
                if cand > next[ns] {
                    next[ns] = cand;
                    from[ns] = prev as u8;
                }
            }
        }
        metric = next;
        history.push(from);
    }
    // The tail drives the encoder back to state 0.
    let mut state = 0usize;
    let mut bits = [0u8; MESSAGE_BITS];
    for step in (0..MESSAGE_BITS).rev() {
        bits[step] = (state & 1) as u8;
        state = history[step][state] as usize;
    }
    let payload = bits[..PAYLOAD_BITS]
        .iter()
        .fold(0u64, |acc, &b| acc << 1 | u64::from(b));
    let crc = bits[PAYLOAD_BITS..PAYLOAD_BITS + CRC_BITS]
        .iter()
        .fold(0u32, |acc, &b| acc << 1 | u32::from(b));
    Some((payload, crc == crc24(payload, seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soft(bits: &[u8]) -> Vec<f32> {
        bits.iter()
            .map(|&b| if b == 1 { 1.0 } else { -1.0 })
            .collect()
    }

    #[test]
    fn round_trip_and_corrects_scattered_errors() {
        let payload = 0xDEAD_BEEF_0123_4567;
        let coded = encode(payload, 42);
        assert_eq!(coded.len(), CODED_BITS);
        assert_eq!(decode(&soft(&coded), 42), Some(payload));
        let mut noisy = soft(&coded);
        for i in (0..CODED_BITS).step_by(17) {
            noisy[i] = -noisy[i];
        }
        assert_eq!(
            decode(&noisy, 42),
            Some(payload),
            "11 flipped bits are corrected"
        );
    }

    #[test]
    fn another_key_or_noise_does_not_check() {
        let coded = encode(7, 1);
        assert_eq!(decode(&soft(&coded), 2), None);
        let mut x = 0x9E37_79B9u32;
        let noise: Vec<f32> = (0..CODED_BITS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        assert_eq!(decode(&noise, 1), None);
    }
}
