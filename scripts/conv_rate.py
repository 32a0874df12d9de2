"""PyTorch's CPU convolution on the shapes of 128² training (batch 2), forward and backward
(input and weight gradients), best of 7: the twin of `cargo run --release --example conv_rate`.
Needs `pip install torch`; run both in the same minutes (this machine's speed drifts)."""
import time

import torch

torch.set_num_threads(2)
# (batch, c_in, c_out, h, w, kernel, stride, padding, dilation), as examples/conv_rate.rs
SHAPES = [(2, 512, 512, 17, 17, 3, 1, 4, 4), (2, 1024, 128, 17, 17, 3, 1, 1, 1),
          (2, 256, 256, 17, 17, 3, 1, 2, 2), (2, 128, 128, 17, 17, 3, 1, 1, 1),
          (2, 64, 64, 33, 33, 3, 1, 1, 1), (2, 64, 64, 64, 64, 3, 1, 1, 1)]
for (b, c, co, h, w, k, s, p, d) in SHAPES:
    x = torch.randn(b, c, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(c, co, k, s, p, d, bias=False)
    fwd = bwd = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        y = conv(x)
        fwd = min(fwd, time.perf_counter() - t)
        loss = y.sum()
        t = time.perf_counter()
        loss.backward()
        bwd = min(bwd, time.perf_counter() - t)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    flops = 2 * b * co * oh * oh * c * k * k
    print(f"{b}x{c}->{co} {h}x{w} k{k} d{d}: fwd {fwd * 1e3:.1f} ms ({flops / fwd / 1e9:.0f} GF/s), "
          f"bwd {bwd * 1e3:.1f} ms ({2 * flops / bwd / 1e9:.0f} GF/s)")
