//! Convolution off the CPU (CUDA): Candle's forward (cuDNN), with a backward of our own.
//!
//! Candle's backward computes the input gradient with its own `conv_transpose2d` kernel and the
//! weight gradient as a convolution of the transposed input with the output gradient as the
//! kernel (65x65 at the released step's 512² crops). On an H200 at that step's shapes
//! (`examples/gpu_ops.rs`) these took 2.4–9.1 ms and 20.7–27.6 ms against forwards of 0.7–1.0 ms,
//! where PyTorch's three passes take 0.1–0.3 ms each (`scripts/gpu_ops.py`). Here the input
//! gradient is a forward convolution (of the output gradient, spread by the stride, with the
//! flipped kernel: cuDNN again) and the weight gradient one batched matrix product of the output
//! gradient with the patch matrix, gathered from k² shifted views of the input (cuBLAS). Both are
//! made of differentiable ops, so the WGAN-GP penalty's double backward runs through them.

use super::double_backward::operand;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// `conv2d(x, weight)` (square kernel, no bias, one group) on any device: Candle's forward, the
/// backward above.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    let op = Conv { stride, padding, dilation };
    if !(x.track_op() || weight.track_op()) {
        return op.forward(x, weight);
    }
    // The op wraps its inputs' buffers whole, so each must be contiguous from the buffer's start.
    let own = |t: &Tensor| {
        if t.is_contiguous() && t.layout().start_offset() == 0 { Ok(t.clone()) } else { t.force_contiguous() }
    };
    own(x)?.apply_op2(&own(weight)?, op)
}

#[derive(Debug, Clone, Copy)]
struct Conv {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        x.conv2d(weight, self.padding, self.stride, self.dilation, 1)
    }

    /// The forward on the op's storage: each input copied into a graph-less tensor (Candle's
    /// convolution is reached only through tensors; a device copy costs microseconds against the
    /// milliseconds of the backward it replaces), the output copied back.
    fn on_storage<S: BackendStorage>(
        &self,
        (s1, l1): (&S, &Layout),
        (s2, l2): (&S, &Layout),
        wrap: fn(S) -> Storage,
        unwrap: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let tensor = |s: &S, l: &Layout| -> Result<Tensor> {
            // `try_clone` copies the whole buffer, which a tensor reads from its start.
            if !(l.is_contiguous() && l.start_offset() == 0) {
                candle_core::bail!("conv2d: expects contiguous inputs at offset 0, got {l:?}")
            }
            Ok(Tensor::from_storage(wrap(s.try_clone(l)?), l.shape().clone(), BackpropOp::none(), false))
        };
        let y = self.forward(&tensor(s1, l1)?, &tensor(s2, l2)?)?;
        let (storage, layout) = y.storage_and_layout();
        let y = unwrap(&storage).ok_or_else(|| candle_core::Error::Msg("conv2d: output on another device".into()))?;
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    /// `∂x` for output gradient `g`: the stride's zeros put back between the rows and columns
    /// of `g`, zeros padded around (and at the end, for input rows no window reached), then a
    /// stride-1 convolution with the kernel flipped and its channel axes swapped.
    fn input_grad(&self, (h, w): (usize, usize), weight: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (s, p, d) = (self.stride, self.padding, self.dilation);
        let k = weight.dim(2)?;
        let Some(pad) = (d * (k - 1)).checked_sub(p) else {
            candle_core::bail!("conv2d backward: padding {p} beyond the kernel's reach {}", d * (k - 1))
        };
        let mut g = g.clone();
        for (axis, n) in [(2, h), (3, w)] {
            let out = g.dim(axis)?;
            if s > 1 {
                // [.., out, ..] -> [.., out, s, ..] (zeros after each row) -> [.., out·s, ..], less the last zeros.
                let mut dims = g.dims().to_vec();
                dims[axis] = out * s;
                let spread = g.unsqueeze(axis + 1)?.pad_with_zeros(axis + 1, 0, s - 1)?.reshape(dims.as_slice())?;
                g = spread.narrow(axis, 0, (out - 1) * s + 1)?;
            }
            let tail = n + 2 * p - ((out - 1) * s + 1 + d * (k - 1));
            g = g.pad_with_zeros(axis, pad, pad + tail)?;
        }
        let flipped = if k == 1 {
            weight.clone()
        } else {
            let rev = Tensor::new((0..k as u32).rev().collect::<Vec<_>>(), weight.device())?;
            weight.index_select(&rev, 2)?.index_select(&rev, 3)?
        };
        conv2d(&g, &flipped.transpose(0, 1)?, 1, 0, d)
    }
    /// `∂W = Σ_b g_b · patches_bᵀ`: the patch matrix `[B, C·k·k, Ho·Wo]` from k² shifted (and
    /// strided) views of the padded input, one batched product, summed over the batch.
    fn weight_grad(&self, x: &Tensor, weight_dims: &[usize], g: &Tensor) -> Result<Tensor> {
        let (s, p, d) = (self.stride, self.padding, self.dilation);
        let (b, c, _, _) = x.dims4()?;
        let (c_out, k) = (weight_dims[0], weight_dims[2]);
        let (_, _, oh, ow) = g.dims4()?;
        let patches = if k == 1 && s == 1 && p == 0 {
            x.reshape((b, c, oh * ow))?
        } else {
            // Rows ky·d + s·oy (oy < Ho) of the padded input, for every ky; then the same for columns.
            let taps = |t: &Tensor, axis: usize, out: usize| -> Result<Vec<Tensor>> {
                let n = t.dim(axis)?;
                let t = t.pad_with_zeros(axis, p, (d * (k - 1) + s * out).saturating_sub(n + p))?;
                (0..k)
                    .map(|i| {
                        let view = t.narrow(axis, i * d, s * out)?;
                        if s == 1 {
                            return Ok(view);
                        }
                        let mut dims = view.dims().to_vec();
                        dims[axis] = out;
                        dims.insert(axis + 1, s);
                        view.reshape(dims.as_slice())?.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)
                    })
                    .collect()
            };
            let mut views = Vec::with_capacity(k * k);
            for rows in taps(x, 2, oh)? {
                views.extend(taps(&rows, 3, ow)?);
            }
            Tensor::stack(&views, 2)?.reshape((b, c * k * k, oh * ow))?
        };
        let g = g.reshape((b, c_out, oh * ow))?;
        g.matmul(&patches.transpose(1, 2)?)?.sum(0)?.reshape(weight_dims)
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-device"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn unwrap(s: &Storage) -> Option<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Some(s),
                _ => None,
            }
        }
        self.on_storage((s1, l1), (s2, l2), Storage::Cpu, unwrap)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        fn unwrap(s: &Storage) -> Option<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(s) => Some(s),
                _ => None,
            }
        }
        self.on_storage((s1, l1), (s2, l2), Storage::Cuda, unwrap)
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x_in, weight_in, g) = (operand(x), operand(weight), operand(g));
        let grad_x = x.track_op().then(|| self.input_grad((x.dim(2)?, x.dim(3)?), &weight_in, &g)).transpose()?;
        let grad_w = weight.track_op().then(|| self.weight_grad(&x_in, weight.dims(), &g)).transpose()?;
        Ok((grad_x, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn close(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        let scale = b.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?.max(1.0);
        let err = (a - b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        assert!(err <= 1e-4 * scale, "{what}: max error {err} (scale {scale})");
        Ok(())
    }

    /// The forward and both gradients equal the CPU path's (`im2col`, itself checked against
    /// Candle and finite differences) on the geometries the networks use: 3x3 with stride 1 and
    /// 2 (sides of both parities), dilated, 1x1 with stride 1 and 2, the critic's 4x4 stride 2 and
    /// the 7x7 stem; and so do the second derivatives the gradient penalty takes.
    #[test]
    fn matches_the_cpu_path_to_second_order() -> Result<()> {
        let dev = Device::Cpu;
        // (c_in, c_out, h, w, kernel, stride, padding, dilation)
        let cases = [
            (3, 4, 8, 9, 3, 1, 1, 1),
            (3, 4, 8, 9, 3, 2, 1, 1),
            (3, 4, 9, 9, 3, 2, 1, 1),
            (2, 3, 11, 10, 3, 1, 2, 2),
            (4, 2, 6, 7, 1, 1, 0, 1),
            (4, 2, 7, 6, 1, 2, 0, 1),
            (3, 2, 10, 12, 4, 2, 1, 1),
            (2, 3, 13, 12, 7, 2, 3, 1),
        ];
        for (i, &(c, co, h, w, k, s, p, d)) in cases.iter().enumerate() {
            let what = format!("case {i} ({c}->{co}, {h}x{w}, k{k} s{s} p{p} d{d})");
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, c, k, k), &dev)?)?;
            // The second image alone: a view that starts inside its buffer.
            let second = conv2d(&x.narrow(0, 1, 1)?, &wt, s, p, d)?;
            close(&second, &super::super::im2col::conv2d(&x.narrow(0, 1, 1)?, &wt, s, p, d)?, &what)?;
            let y = conv2d(&x, &wt, s, p, d)?;
            let y_ref = super::super::im2col::conv2d(&x, &wt, s, p, d)?;
            close(&y, &y_ref, &format!("{what} forward"))?;
            let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let (grads, grads_ref) = ((&y * &r)?.sum_all()?.backward()?, (&y_ref * &r)?.sum_all()?.backward()?);
            for (var, name) in [(&x, "input"), (&wt, "weight")] {
                let got = grads.get(var).expect("gradient");
                close(got, grads_ref.get(var).expect("gradient"), &format!("{what} {name} gradient"))?;
            }
            // As the penalty: ‖∂(r·y)/∂x‖², differentiated again for the weight.
            let penalty = |y: &Tensor| -> Result<Tensor> {
                let gx = (y * &r)?.sum_all()?.backward()?.get(&x).expect("gradient").clone();
                gx.sqr()?.sum_all()
            };
            let (pen, pen_ref) = (penalty(&y)?, penalty(&y_ref)?);
            close(&pen, &pen_ref, &format!("{what} penalty"))?;
            let (gw, gw_ref) = (pen.backward()?, pen_ref.backward()?);
            close(gw.get(&wt).expect("gradient"), gw_ref.get(&wt).expect("gradient"), &format!("{what} second order"))?;
        }
        Ok(())
    }
}
