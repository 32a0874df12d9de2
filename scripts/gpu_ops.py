"""PyTorch's convolution and BatchNorm on the shapes of examples/gpu_ops.rs (the released step:
512², batch 8), per pass, median of 5 after 2 warm-ups, device synchronised; cudnn.benchmark as
torch_bench.py. `python3 scripts/gpu_ops.py [cuda|cpu] [BATCH]`."""
import statistics
import sys
import time

import torch

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
torch.backends.cudnn.benchmark = True
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def median_ms(f):
    times = []
    for i in range(7):
        sync()
        t = time.perf_counter()
        f()
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# (batch, c_in, c_out, h, w, kernel, stride, padding, dilation), as examples/gpu_ops.rs
SHAPES = [(batch, 64, 64, 128, 128, 3, 1, 1, 1), (batch, 256, 256, 65, 65, 3, 1, 2, 2),
          (batch, 1024, 256, 65, 65, 1, 1, 0, 1), (batch, 64, 128, 256, 256, 3, 2, 1, 1)]
for (b, c, co, h, w, k, s, p, d) in SHAPES:
    x = torch.randn(b, c, h, w, device=dev, requires_grad=True)
    wt = (torch.randn(co, c, k, k, device=dev) * 0.05).requires_grad_()
    conv = lambda: torch.nn.functional.conv2d(x, wt, None, s, p, d)
    g = torch.ones_like(conv())
    fwd = median_ms(lambda: conv())
    gi = median_ms(lambda: torch.nn.grad.conv2d_input(x.shape, wt, g, s, p, d))
    gw = median_ms(lambda: torch.nn.grad.conv2d_weight(x, wt.shape, g, s, p, d))
    bwd = median_ms(lambda: conv().backward(g))
    print(f"{b}x{c}->{co} {h}x{w} k{k} s{s} d{d}: fwd {fwd:.1f} ms, grad input {gi:.1f}, grad weight {gw:.1f}, "
          f"fwd+backward {bwd:.1f}")
bn = torch.nn.BatchNorm2d(256).to(dev).train()
x = torch.randn(batch, 256, 65, 65, device=dev, requires_grad=True)
bn_fwd = median_ms(lambda: bn(x))
bn_both = median_ms(lambda: bn(x).backward(torch.ones_like(x)))
relu = median_ms(lambda: torch.relu(x).backward(torch.ones_like(x)))
print(f"{batch}x256x65x65: batch-norm (train) fwd {bn_fwd:.1f} ms, fwd+bwd {bn_both:.1f}; relu fwd+bwd {relu:.1f}")
