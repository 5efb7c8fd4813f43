//! Samplers, following the diffusers schedulers of the same names step for
//! step: DDIM, Euler, Euler ancestral, DPM-Solver++ 2M with Karras sigmas and
//! UniPC (B(h)=e^h−1, order 2, x0-prediction). Their training schedule and
//! timestep spacing come from the model's `scheduler/scheduler_config.json`.

use std::str::FromStr;

use candle_core::Tensor;
use serde::Deserialize;

use crate::DiffusionError;

/// A sampler, selected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    UniPc,
}

impl SchedulerKind {
    /// Every sampler's name (the list jobs are checked against).
    pub const NAMES: &'static [&'static str] = hallmark_proto::SCHEDULERS;

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
            Self::UniPc => "unipc",
        }
    }

    /// Whether the sampler draws fresh noise at every step.
    pub fn is_ancestral(self) -> bool {
        self == Self::EulerAncestral
    }
}

impl FromStr for SchedulerKind {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s
            .trim()
            .to_ascii_lowercase()
            .replace("++", "pp")
            .replace(['-', ' '], "_");
        Ok(match norm.as_str() {
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler_a" | "euler_ancestral" => Self::EulerAncestral,
            "dpmpp_2m" => Self::DpmPp2m,
            "dpmpp_2m_karras" => Self::DpmPp2mKarras,
            "unipc" | "uni_pc" => Self::UniPc,
            _ => return Err(DiffusionError::UnknownScheduler(s.to_string())),
        })
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// The training noise schedule of a model (`scheduler_config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "d_prediction")]
    pub prediction_type: Prediction,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub trained_betas: Option<serde_json::Value>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn d_train_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_beta_schedule() -> String {
    "linear".into()
}
fn d_prediction() -> Prediction {
    Prediction::Epsilon
}
fn d_true() -> bool {
    true
}
fn d_spacing() -> String {
    "leading".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl SchedulerConfig {
    /// Cumulative alpha products of the training schedule, computed in f32
    /// as diffusers does.
    fn alphas_cumprod(&self) -> Result<Vec<f64>, DiffusionError> {
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(DiffusionError::BadModel(
                "scheduler configs with trained_betas are not supported".into(),
            ));
        }
        if self.rescale_betas_zero_snr {
            return Err(DiffusionError::BadModel(
                "scheduler configs with rescale_betas_zero_snr are not supported".into(),
            ));
        }
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(DiffusionError::BadModel(format!(
                "num_train_timesteps {n} is too small"
            )));
        }
        let lin = |a: f64, b: f64| -> Vec<f32> {
            (0..n)
                .map(|i| (a + (b - a) * i as f64 / (n - 1) as f64) as f32)
                .collect()
        };
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "linear" => lin(self.beta_start, self.beta_end),
            "scaled_linear" => lin(self.beta_start.sqrt(), self.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            other => {
                return Err(DiffusionError::BadModel(format!(
                    "beta_schedule {other:?} is not supported (linear, scaled_linear)"
                )));
            }
        };
        let mut acc = 1.0f32;
        Ok(betas
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect())
    }

    fn spacing(&self) -> Result<Spacing, DiffusionError> {
        match self.timestep_spacing.as_str() {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(DiffusionError::BadModel(format!(
                "timestep_spacing {other:?} is not supported (leading, trailing, linspace)"
            ))),
        }
    }
}

/// Linear interpolation of `ys` (given at 0, 1, 2, …) at `x`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    let x = x.clamp(0.0, (ys.len() - 1) as f64);
    let lo = x.floor() as usize;
    let hi = (lo + 1).min(ys.len() - 1);
    let w = x - lo as f64;
    ys[lo] * (1.0 - w) + ys[hi] * w
}

/// numpy's round-half-to-even.
fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The inference timesteps of `steps`; `plus_one` is the `n + 1` spacing
/// of the multistep solvers.
fn spaced_timesteps(
    spacing: Spacing,
    train: usize,
    steps: usize,
    offset: usize,
    plus_one: bool,
) -> Vec<f64> {
    let n = if plus_one { steps + 1 } else { steps };
    let mut ts: Vec<f64> = match spacing {
        Spacing::Leading => {
            let ratio = (train / n) as f64;
            (0..n)
                .rev()
                .map(|i| round_even(i as f64 * ratio) + offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (0..)
                .map(|k| train as f64 - k as f64 * ratio)
                .take_while(|&t| t > 0.0)
                .map(|t| round_even(t) - 1.0)
                .collect()
        }
        Spacing::Linspace => (0..n)
            .rev()
            .map(|i| (train - 1) as f64 * i as f64 / (n - 1).max(1) as f64)
            .collect(),
    };
    if plus_one && spacing != Spacing::Trailing {
        ts.pop();
    }
    ts
}

fn vp(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = vp(sigma);
    a.ln() - s.ln()
}

/// The state of one sampling run.
#[derive(Debug)]
pub struct Sampler {
    kind: SchedulerKind,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Per timestep plus a final 0 (sigma-parameterized samplers).
    sigmas: Vec<f64>,
    ddim_stride: usize,
    final_alpha_cumprod: f64,
    init_noise_sigma: f64,
    /// Converted model outputs of the last steps, newest last.
    outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    last_order: usize,
    steps_done: usize,
}

impl Sampler {
    pub fn new(
        kind: SchedulerKind,
        cfg: &SchedulerConfig,
        steps: usize,
    ) -> Result<Self, DiffusionError> {
        let train = cfg.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(DiffusionError::BadRequest(format!(
                "steps must be between 1 and {train}, got {steps}"
            )));
        }
        let ac = cfg.alphas_cumprod()?;
        let spacing = cfg.spacing()?;
        let train_sigmas: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let (timesteps, sigmas) = match kind {
            SchedulerKind::Ddim => (
                spaced_timesteps(spacing, train, steps, cfg.steps_offset, false)
                    .into_iter()
                    .map(round_even)
                    .collect(),
                Vec::new(),
            ),
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let ts = spaced_timesteps(spacing, train, steps, cfg.steps_offset, false);
                let mut s: Vec<f64> = ts.iter().map(|&t| interp(t, &train_sigmas)).collect();
                s.push(0.0);
                (ts, s)
            }
            SchedulerKind::UniPc | SchedulerKind::DpmPp2m => {
                let ts: Vec<f64> = spaced_timesteps(spacing, train, steps, cfg.steps_offset, true)
                    .into_iter()
                    .map(round_even)
                    .collect();
                let mut s: Vec<f64> = ts.iter().map(|&t| interp(t, &train_sigmas)).collect();
                s.push(0.0);
                (ts, s)
            }
            SchedulerKind::DpmPp2mKarras => {
                let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
                let (smin, smax) = (train_sigmas[0], train_sigmas[train - 1]);
                let rho = 7.0;
                let (lo, hi) = (smin.powf(1.0 / rho), smax.powf(1.0 / rho));
                let mut s: Vec<f64> = (0..steps)
                    .map(|i| {
                        let ramp = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        (hi + ramp * (lo - hi)).powf(rho)
                    })
                    .collect();
                let ts = s
                    .iter()
                    .map(|&x| round_even(sigma_to_t(x, &log_sigmas)))
                    .collect();
                s.push(0.0);
                (ts, s)
            }
        };
        let init_noise_sigma = match kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                if spacing == Spacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
            _ => 1.0,
        };
        Ok(Self {
            kind,
            prediction: cfg.prediction_type,
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            timesteps,
            sigmas,
            ddim_stride: train / steps,
            init_noise_sigma,
            outputs: Vec::new(),
            last_sample: None,
            last_order: 0,
            steps_done: 0,
        })
    }

    /// The UNet timestep of each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The scale of the initial noise.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The first step of an img2img run with `strength` (0 < s ≤ 1).
    pub fn start_index(&self, strength: f64) -> usize {
        let n = self.timesteps.len();
        n - hallmark_proto::img2img_steps(n, strength)
    }

    /// Scale the latents before the UNet sees them.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let s = self.sigmas[i];
                x / (s * s + 1.0).sqrt()
            }
            _ => Ok(x.clone()),
        }
    }

    /// Noise clean latents to the level of step `i` (img2img).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        match self.kind {
            SchedulerKind::Ddim => {
                let a = self.alphas_cumprod[self.timesteps[i] as usize];
                (x0 * a.sqrt())? + (noise * (1.0 - a).sqrt())?
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => x0 + (noise * self.sigmas[i])?,
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::UniPc => {
                let (a, s) = vp(self.sigmas[i]);
                (x0 * a)? + (noise * s)?
            }
        }
    }

    /// The clean-sample prediction (and, for DDIM, the noise) from a model
    /// output at step `i`.
    fn predict_x0(&self, out: &Tensor, x: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        use Prediction::*;
        match self.kind {
            SchedulerKind::Ddim => {
                let a = self.alphas_cumprod[self.timesteps[i] as usize];
                match self.prediction {
                    Epsilon => (x - (out * (1.0 - a).sqrt())?)? / a.sqrt(),
                    VPrediction => (x * a.sqrt())? - (out * (1.0 - a).sqrt())?,
                    Sample => Ok(out.clone()),
                }
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                let s = self.sigmas[i];
                match self.prediction {
                    Epsilon => x - (out * s)?,
                    VPrediction => (out * (-s / (s * s + 1.0).sqrt()))? + (x / (s * s + 1.0))?,
                    Sample => Ok(out.clone()),
                }
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras | SchedulerKind::UniPc => {
                let (a, s) = vp(self.sigmas[i]);
                match self.prediction {
                    Epsilon => (x - (out * s)?)? / a,
                    VPrediction => (x * a)? - (out * s)?,
                    Sample => Ok(out.clone()),
                }
            }
        }
    }

    /// One denoising step from step `i` to the next; `noise` supplies fresh
    /// standard normal noise shaped like `x` (ancestral samplers).
    pub fn step(
        &mut self,
        out: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn FnMut() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let x0 = self.predict_x0(out, x, i)?;
        let next = match self.kind {
            SchedulerKind::Ddim => {
                let a = self.alphas_cumprod[self.timesteps[i] as usize];
                let eps = match self.prediction {
                    Prediction::Epsilon => out.clone(),
                    Prediction::VPrediction => ((out * a.sqrt())? + (x * (1.0 - a).sqrt())?)?,
                    Prediction::Sample => ((x - (&x0 * a.sqrt())?)? / (1.0 - a).sqrt())?,
                };
                let prev_t = self.timesteps[i] as i64 - self.ddim_stride as i64;
                let a_prev = if prev_t >= 0 {
                    self.alphas_cumprod[prev_t as usize]
                } else {
                    self.final_alpha_cumprod
                };
                ((&x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?
            }
            SchedulerKind::Euler => {
                let (s, sn) = (self.sigmas[i], self.sigmas[i + 1]);
                let d = ((x - &x0)? / s)?;
                (x + (d * (sn - s))?)?
            }
            SchedulerKind::EulerAncestral => {
                let (s, sn) = (self.sigmas[i], self.sigmas[i + 1]);
                let up = (sn * sn * (s * s - sn * sn) / (s * s)).sqrt();
                let down = (sn * sn - up * up).sqrt();
                let d = ((x - &x0)? / s)?;
                let prev = (x + (d * (down - s))?)?;
                if up > 0.0 {
                    (prev + (noise()? * up)?)?
                } else {
                    prev
                }
            }
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mKarras => self.dpm_step(x0, i, x)?,
            SchedulerKind::UniPc => self.unipc_step(x0, i, x)?,
        };
        self.steps_done += 1;
        Ok(next)
    }

    fn remember(&mut self, x0: Tensor) {
        self.outputs.push(x0);
        if self.outputs.len() > 2 {
            self.outputs.remove(0);
        }
    }

    fn dpm_step(&mut self, x0: Tensor, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        self.remember(x0);
        let m0 = self.outputs.last().expect("just pushed").clone();
        let sn = self.sigmas[i + 1];
        if sn == 0.0 {
            return Ok(m0);
        }
        let (a_t, s_t) = vp(sn);
        let (_, s_s0) = vp(self.sigmas[i]);
        let h = lambda(sn) - lambda(self.sigmas[i]);
        let first_order =
            self.steps_done == 0 || i + 1 == self.timesteps.len() || self.outputs.len() < 2;
        let base = ((x * (s_t / s_s0))? - (&m0 * (a_t * ((-h).exp() - 1.0)))?)?;
        if first_order {
            return Ok(base);
        }
        let m1 = &self.outputs[0];
        let h0 = lambda(self.sigmas[i]) - lambda(self.sigmas[i - 1]);
        let r0 = h0 / h;
        let d1 = ((&m0 - m1)? * (1.0 / r0))?;
        base - (d1 * (0.5 * a_t * ((-h).exp() - 1.0)))?
    }

    fn unipc_step(&mut self, m: Tensor, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut sample = x.clone();
        if self.steps_done > 0
            && let Some(last) = &self.last_sample
        {
            sample = self.unipc_correct(&m, last, x, i)?;
        }
        self.remember(m);
        let n = self.timesteps.len();
        let order = 2.min(n - i).min(self.steps_done + 1);
        self.last_order = order;
        self.last_sample = Some(sample.clone());
        let m0 = self.outputs.last().expect("just pushed");
        let sn = self.sigmas[i + 1];
        if sn == 0.0 {
            return Ok(m0.clone());
        }
        let (a_t, s_t) = vp(sn);
        let (_, s_s0) = vp(self.sigmas[i]);
        let h = lambda(sn) - lambda(self.sigmas[i]);
        let hh = -h;
        let phi1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let base = ((&sample * (s_t / s_s0))? - (m0 * (a_t * phi1))?)?;
        if order == 1 || self.outputs.len() < 2 {
            return Ok(base);
        }
        let rk = (lambda(self.sigmas[i - 1]) - lambda(self.sigmas[i])) / h;
        let d1 = ((&self.outputs[0] - m0)? / rk)?;
        base - (d1 * (a_t * b_h * 0.5))?
    }

    /// UniC: correct the sample reached at step `i` with the new model output.
    fn unipc_correct(
        &self,
        m_t: &Tensor,
        last: &Tensor,
        x_t: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        let _ = x_t;
        let m0 = self.outputs.last().expect("a previous output exists");
        let (a_t, s_t) = vp(self.sigmas[i]);
        let (_, s_s0) = vp(self.sigmas[i - 1]);
        let h = lambda(self.sigmas[i]) - lambda(self.sigmas[i - 1]);
        let hh = -h;
        let phi1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let base = ((last * (s_t / s_s0))? - (m0 * (a_t * phi1))?)?;
        let d1_t = (m_t - m0)?;
        if self.last_order == 1 || self.outputs.len() < 2 {
            return base - (d1_t * (a_t * b_h * 0.5))?;
        }
        let rk = (lambda(self.sigmas[i - 2]) - lambda(self.sigmas[i - 1])) / h;
        let d1 = ((&self.outputs[0] - m0)? / rk)?;
        let phik = phi1 / hh - 1.0;
        let b1 = phik / b_h;
        let b2 = (phik / hh - 0.5) * 2.0 / b_h;
        let rho0 = (b1 - b2) / (1.0 - rk);
        let rho1 = b1 - rho0;
        base - (((d1 * rho0)? + (d1_t * rho1)?)? * (a_t * b_h))?
    }
}

/// The (fractional) training timestep whose sigma is `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas
        .iter()
        .filter(|&&l| ls - l >= 0.0)
        .count()
        .saturating_sub(1)
        .min(n - 2);
    let (l, h) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((l - ls) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_config(spacing: &str) -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false,
            "timestep_spacing": spacing
        }))
        .unwrap()
    }

    #[test]
    fn leading_spacing_matches_diffusers_timesteps() {
        let s = Sampler::new(SchedulerKind::Ddim, &sd_config("leading"), 10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[
                901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0
            ]
        );
        let s = Sampler::new(SchedulerKind::UniPc, &sd_config("leading"), 4).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        let s = Sampler::new(SchedulerKind::Euler, &sd_config("trailing"), 4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    }

    #[test]
    fn img2img_runs_floor_of_steps_times_strength() {
        let s = Sampler::new(SchedulerKind::Ddim, &sd_config("leading"), 10).unwrap();
        assert_eq!(s.start_index(0.5), 5);
        assert_eq!(s.start_index(1.0), 0);
        assert_eq!(s.start_index(0.05), 10);
        // 0.7 as an f32 is 0.69999999: still 7 steps, as in diffusers.
        assert_eq!(s.start_index(f64::from(0.7f32)), 3);
        assert_eq!(s.start_index(f64::from(0.3f32)), 7);
    }

    #[test]
    fn names_parse_and_unknown_names_are_refused() {
        for n in SchedulerKind::NAMES {
            assert_eq!(n.parse::<SchedulerKind>().unwrap().name(), *n);
        }
        assert_eq!(
            "DPM++ 2M Karras".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPp2mKarras
        );
        let err = "pndm".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("unknown scheduler \"pndm\""), "{err}");
    }

    #[test]
    fn karras_sigmas_run_from_max_to_min_then_zero() {
        let s = Sampler::new(SchedulerKind::DpmPp2mKarras, &sd_config("leading"), 20).unwrap();
        assert_eq!(s.sigmas.len(), 21);
        assert!((s.sigmas[0] - 14.6146).abs() < 1e-3, "{}", s.sigmas[0]);
        assert!((s.sigmas[19] - 0.0292).abs() < 1e-3, "{}", s.sigmas[19]);
        assert_eq!(s.sigmas[20], 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(s.timesteps()[0], 999.0);
    }
}
