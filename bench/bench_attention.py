"""Attention speed on the GPU: our flash attention (kernels/: on Hopper the Gluon kernels, for the backward at 1024 keys
or more; the `tl` kernels timed beside them) vs SDPA's cuDNN, flash and efficient backends.

B=1, H=16, D=128, bf16, the DiT's [B, S, H, D] layout (SDPA gets the [B, H, S, D] views of the same tensors).
TFLOP/s use the FlashAttention convention: forward 4*Sq*Sk*D*H, backward 2.5x forward. CUDA events, warm-up,
median. Run from the repo root: python bench/bench_attention.py
"""

import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.attention as attention  # noqa: E402
from kernels.attention import flash_attention  # noqa: E402

SHAPES = [(84480, 84480), (31104, 31104), (21120, 21120), (84480, 512)]  # (Sq, Sk): self-attention, cross
H, D = 16, 128


def time_ms(fn, budget_ms=1500):
    """Median of CUDA-event timings after two warm-up calls; as many repeats as fit the budget (3 to 30)."""
    fn(), fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < 3 or (sum(times) < budget_ms and len(times) < 30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa(backend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
    return attend


def tl_kernels(q, k, v, do=None):
    """Our `tl` kernels, which on Hopper the Gluon kernels replace, launched directly: the forward, and with `do` the
    backward after it."""
    B, Sq, H, D = q.shape
    out, lse = torch.empty_like(q), torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    attention._launch_fwd(q, k, v, D ** -0.5, out, lse, hopper=False)
    if do is not None:
        grads = [torch.empty_like(t) for t in (q, k, v)]
        attention._launch_bwd(do, q, k, v, out, lse, torch.zeros_like(lse), D ** -0.5, *grads, hopper=False)
    return out


METHODS = {"ours": flash_attention, "ours, tl kernels": tl_kernels, "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
           "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}


def profile_ours(Sq, Sk):
    """Per-kernel times of one forward + backward of ours (which kernel to tune next)."""
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for S in (Sq, Sk, Sk))
    do = torch.randn_like(q)
    step = lambda: torch.autograd.grad(flash_attention(q, k, v), (q, k, v), do)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"\nper-kernel, one fwd+bwd of ours at {Sq}x{Sk}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def main():
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for Sq, Sk in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for S in (Sq, Sk, Sk))
        do = torch.randn_like(q)
        flops = 4 * Sq * Sk * D * H
        for method, attend in METHODS.items():
            try:
                with torch.no_grad():
                    fwd = time_ms(lambda: attend(q, k, v))
                if attend is tl_kernels:
                    both = time_ms(lambda: tl_kernels(q, k, v, do))
                else:
                    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                    both = time_ms(lambda: torch.autograd.grad(attend(qg, kg, vg), (qg, kg, vg), do))
            except Exception as e:  # a backend that does not take this shape
                print(f"{method} at {Sq}x{Sk}: {str(e).splitlines()[0][:120]}")
                fwd = both = float("nan")
            results.append((f"{Sq}x{Sk}", method, fwd, flops / fwd / 1e9, both, 3.5 * flops / both / 1e9))
            print(results[-1], flush=True)
    profile_ours(84480, 84480)
    print(f"\nattention, B1 H{H} D{D} bf16, {name}")
    print(f"{'Sq x Sk':<14} {'method':<18} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} {'f+b TF/s':>9}")
    for shape, method, fwd, fwd_tf, both, both_tf in results:
        print(f"{shape:<14} {method:<18} {fwd:>9.2f} {fwd_tf:>9.0f} {both:>9.2f} {both_tf:>9.0f}")


if __name__ == "__main__":
    main()
