//! The noise generator: a seed gives the same noise on every device and in
//! every implementation that follows this recipe (the reference script in
//! `tests/reference/` has a Python twin of it).
//!
//! SplitMix64 yields 64-bit words; two words make a pair of uniforms in
//! (0, 1) from their top 53 bits, and Box–Muller turns the pair into two
//! standard normals (cosine first, then sine), computed in f64 and rounded to
//! f32. Noise is always drawn on the CPU and then moved to the device.

/// A seeded stream of standard normal samples.
#[derive(Debug, Clone)]
pub struct NoiseGenerator {
    state: u64,
    spare: Option<f64>,
}

impl NoiseGenerator {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform sample in the open interval (0, 1).
    fn next_open_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A uniform sample in [lo, hi).
    pub fn next_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_open_unit()
    }

    pub fn next_normal(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = self.next_open_unit();
        let u2 = self.next_open_unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `n` standard normal samples as f32.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_normal() as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let a = NoiseGenerator::new(7).normals(64);
        assert_eq!(a, NoiseGenerator::new(7).normals(64));
        assert_ne!(a, NoiseGenerator::new(8).normals(64));
    }

    #[test]
    fn samples_are_standard_normal() {
        let x = NoiseGenerator::new(42).normals(200_000);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        let tail = x.iter().filter(|v| v.abs() > 3.0).count() as f64 / x.len() as f64;
        assert!((tail - 0.0027).abs() < 0.0006, "P(|x|>3) = {tail}");
    }
}
