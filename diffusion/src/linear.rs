//! Linear layers whose bias add, and the residual connection that follows
//! many of them, are one pass over the output (`fused::add_bias` on CUDA;
//! candle's broadcast add elsewhere, as `candle_nn::Linear`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

/// `x Wᵀ + b`, with `W` `(out, in)`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `weight` and `bias` from `vb`.
    pub(crate) fn load(inputs: usize, outputs: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let l = candle_nn::linear(inputs, outputs, vb)?;
        Ok(Self::new(l.weight().clone(), l.bias().cloned()))
    }

    /// `weight` alone from `vb`.
    pub(crate) fn load_no_bias(
        inputs: usize,
        outputs: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let l = candle_nn::linear_no_bias(inputs, outputs, vb)?;
        Ok(Self::new(l.weight().clone(), None))
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x Wᵀ` without the bias. A contiguous `(…, in)` input is one matmul
    /// of all its rows (a broadcast batched matmul is slower on every
    /// backend); any other layout is a batched matmul with the weight
    /// broadcast.
    pub(crate) fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let Some((&inputs, batch)) = dims.split_last() else {
            candle_core::bail!("a linear layer takes (…, inputs), not a scalar");
        };
        let w = self.weight.t()?;
        if batch.len() <= 1 {
            return x.matmul(&w);
        }
        if x.is_contiguous() {
            let rows: usize = batch.iter().product();
            let mut out = batch.to_vec();
            out.push(self.weight.dim(0)?);
            return x.reshape((rows, inputs))?.matmul(&w)?.reshape(out);
        }
        x.matmul(&w.broadcast_left(&batch[..batch.len() - 1])?)
    }

    /// `x Wᵀ + b + residual` (the residual of the output's shape), the bias
    /// and the residual added in one pass where the fused kernel runs.
    pub(crate) fn forward_add(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let y = self.matmul(x)?;
        match (&self.bias, residual) {
            (Some(b), r) => crate::fused::add_bias(&y, b, r),
            (None, Some(r)) => y + r,
            (None, None) => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_add(x, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_candle_nn_for_every_input_layout_with_and_without_a_residual() {
        let dev = Device::Cpu;
        let w = crate::test_util::randn(&[6, 4]);
        let b = crate::test_util::randn(&[6]);
        let ours = Linear::new(w.clone(), Some(b.clone()));
        let theirs = candle_nn::Linear::new(w, Some(b));
        let x3 = crate::test_util::randn(&[2, 5, 4]);
        let inputs = [
            crate::test_util::randn(&[5, 4]),
            x3.clone(),
            // Not contiguous: the batched matmul path.
            crate::test_util::randn(&[2, 4, 5]).transpose(1, 2).unwrap(),
            crate::test_util::randn(&[3, 2, 5, 4]),
        ];
        for x in &inputs {
            let want = theirs.forward(x).unwrap();
            let got = ours.forward(x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = crate::test_util::max_diff(&got, &want);
            assert!(diff < 1e-5, "{:?}: {diff}", x.dims());
            let residual = crate::test_util::randn(want.dims());
            let got = ours.forward_add(x, Some(&residual)).unwrap();
            let diff = crate::test_util::max_diff(&got, &(&want + &residual).unwrap());
            assert!(diff < 1e-5, "{:?} with a residual: {diff}", x.dims());
        }
        // Without a bias: the matmul, plus the residual.
        let plain = Linear::new(ours.weight().clone(), None);
        let residual = Tensor::ones((2, 5, 6), DType::F32, &dev).unwrap();
        let got = plain.forward_add(&x3, Some(&residual)).unwrap();
        let want = (plain.matmul(&x3).unwrap() + 1.0).unwrap();
        assert!(crate::test_util::max_diff(&got, &want) < 1e-6);
        assert!(plain.bias().is_none());
    }
}
