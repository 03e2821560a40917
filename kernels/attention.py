"""Fused flash attention in Triton (FlashAttention-2 algorithm), forward and backward, and a plain-PyTorch reference.

Layout is the DiT's: q [B, Sq, H, D], k/v [B, Sk, H, D], read in place through strides (no transposes, no copies).
Non-causal, bf16/fp16, D in {64, 128}, any Sq/Sk: tail blocks are masked, no input is padded or copied.

Forward returns the output and the log-sum-exp of each score row (fp32 [B, H, Sq], natural log). Backward needs only
q, k, v, out, lse, so a selective-checkpoint policy that keeps `out` and `lse` (the outputs of the custom op
`cosmos_kernels::flash_attn_fwd`) makes the backward skip re-running the forward.

Kernels:
  forward   one program per (query block, batch*head); K/V blocks streamed through TMA; softmax in base 2.
  dQ        one program per (query block, batch*head); also writes delta = rowsum(dO * O) - dlse for the dK/dV
            kernel.
  dK/dV     one program per (key block, batch*head, split); streams query blocks. When there are too few key blocks
            to fill the GPU (cross-attention onto 512 text tokens), the query range is split and fp32 partials summed.
These two backward kernels use no atomics (deterministic) but compute S and dP twice (7 matrix products where one
pass needs 5). On Hopper (sm_90), for long enough key sequences, kernels/attention_hopper.py's warp-specialised Gluon
kernels run instead (the backward only for D=128; its dQ is summed with fp32 atomic adds: not bit-for-bit repeatable).

Loads go through TMA descriptors that view a [B, S, H, D] tensor as the 2-D matrix [B*S, H*D]: the tile of batch b,
head h, rows s..s+BLOCK is at (b*S + s, h*D). A tile that runs past S reads rows of the next batch (or zeros past
the end); those rows are masked out of every softmax. Stores go through [B, S, H*D] descriptors, whose tiles are
clipped at their own batch's S (the Hopper backward's dQ reduce-adds are not: there, rows past S add exact zeros).
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import attention_hopper

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's CPU interpreter multiplies bf16 tiles as their raw 16-bit integers (seen with triton 3.9); under the
# interpreter every tl.dot gets fp32 operands instead. On the GPU this is a compile-time False.
_UPCAST_DOT = tl.constexpr(_INTERPRET)
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


@triton.jit
def _dot(a, b, acc):
    if _UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_step(acc, l_i, m_i, q, desc_k, desc_v, row, col, start_n, Sk, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    k = desc_k.load([row + start_n, col])  # [BLOCK_N, D]
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))  # raw scores q.k, unscaled
    if MASK:  # the last key block runs past Sk
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < Sk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # running row max, base-2 units
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    v = desc_v.load([row + start_n, col])
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["Sq", "Sk"])  # one compile serves every length
def _attn_fwd_kernel(desc_q, desc_k, desc_v, desc_out, LSE, qk_scale, Sq, Sk, H,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    col = h * HEAD_DIM
    q = desc_q.load([b * Sq + pid_m * BLOCK_M, col])  # [BLOCK_M, D], stays on chip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row_k = b * Sk
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, desc_k, desc_v, row_k, col, start_n, Sk, qk_scale,
                                  BLOCK_M, BLOCK_N, False)
    if n_full < Sk:
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, desc_k, desc_v, row_k, col, n_full, Sk, qk_scale,
                                  BLOCK_M, BLOCK_N, True)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(LSE + bh * Sq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < Sq)  # in ln
    out = (acc / l_i[:, None]).to(q.dtype)
    desc_out.store([b, pid_m * BLOCK_M, col], tl.reshape(out, [1, BLOCK_M, HEAD_DIM]))


# ----------------------------------------------------------------------------------------------------------------
# backward: dQ (and delta), then dK/dV


@triton.jit
def _dq_step(dq, q, do, lse2, delta, desc_k, desc_v, row, col, start_n, Sk, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    k = desc_k.load([row + start_n, col])
    v = desc_v.load([row + start_n, col])
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
    p = tl.math.exp2(s * qk_scale - lse2[:, None])  # softmax probabilities, recomputed from the saved lse
    if MASK:
        p = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < Sk, p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
    ds = p * (dp - delta[:, None])  # gradient w.r.t. the scaled scores
    return _dot(ds.to(k.dtype), k, dq)


@triton.jit(do_not_specialize=["Sq", "Sk"])  # one compile serves every length
def _attn_bwd_dq_kernel(desc_q, desc_k, desc_v, desc_do, desc_o, desc_dq, LSE, DLSE, DELTA, qk_scale, scale,
                        Sq, Sk, H,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    col = h * HEAD_DIM
    row_q = b * Sq + pid_m * BLOCK_M
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    q = desc_q.load([row_q, col])
    do = desc_do.load([row_q, col])
    o = desc_o.load([row_q, col])
    # delta = rowsum(dO * O) - dlse: the gradient reaching lse enters dS as p * dlse, so it folds into delta
    dlse = tl.load(DLSE + bh * Sq + offs_m, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + bh * Sq + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + bh * Sq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # to base 2
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row_k = b * Sk
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, desc_k, desc_v, row_k, col, start_n, Sk, qk_scale,
                      BLOCK_M, BLOCK_N, False)
    if n_full < Sk:
        dq = _dq_step(dq, q, do, lse2, delta, desc_k, desc_v, row_k, col, n_full, Sk, qk_scale,
                      BLOCK_M, BLOCK_N, True)
    desc_dq.store([b, pid_m * BLOCK_M, col], tl.reshape((dq * scale).to(q.dtype), [1, BLOCK_M, HEAD_DIM]))


@triton.jit
def _dkdv_step(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, row, col, lse_base, start_m, Sq, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    q = desc_q.load([row + start_m, col])  # [BLOCK_M, D]
    do = desc_do.load([row + start_m, col])
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASK:  # the last query block runs past Sq
        lse2 = tl.load(LSE + lse_base + offs_m, mask=offs_m < Sq, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + lse_base + offs_m, mask=offs_m < Sq, other=0.0)
    else:
        lse2 = tl.load(LSE + lse_base + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + lse_base + offs_m)
    # both products that need only loaded tiles go first: the exp2 below then overlaps the second on the tensor
    # cores, and the two accumulating products issue back to back (sm_90 SASS, triton 3.9)
    st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32))  # scores, transposed: [keys, queries]
    dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32))
    pt = tl.math.exp2(st * qk_scale - lse2[None, :])
    if MASK:
        pt = tl.where(offs_m[None, :] < Sq, pt, 0.0)
    dv = _dot(pt.to(do.dtype), do, dv)
    dst = pt * (dpt - delta[None, :])
    dk = _dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["Sq", "Sk"])  # one compile serves every length
def _attn_bwd_dkdv_kernel(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE, DELTA, qk_scale, scale, Sq, Sk,
                          H, B,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = bh // H
    h = bh % H
    col = h * HEAD_DIM
    k = desc_k.load([b * Sk + pid_n * BLOCK_N, col])  # [BLOCK_N, D], stays on chip
    v = desc_v.load([b * Sk + pid_n * BLOCK_N, col])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # this split's query range, in whole blocks; only the last split can end in a partial block
    blocks_per_split = tl.cdiv(tl.cdiv(Sq, BLOCK_M), n_splits)
    m_lo = split * blocks_per_split * BLOCK_M
    m_hi = tl.minimum(m_lo + blocks_per_split * BLOCK_M, Sq)
    m_full = m_lo + tl.maximum(m_hi - m_lo, 0) // BLOCK_M * BLOCK_M
    row_q = b * Sq
    for start_m in range(m_lo, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, row_q, col, bh * Sq, start_m, Sq, qk_scale,
                            BLOCK_M, BLOCK_N, False)
    if m_full < m_hi:
        dk, dv = _dkdv_step(dk, dv, k, v, desc_q, desc_do, LSE, DELTA, row_q, col, bh * Sq, m_full, Sq, qk_scale,
                            BLOCK_M, BLOCK_N, True)
    # outputs are [splits * B, Sk, H*D]: the split's partial sums, or dk/dv themselves when there is one split
    dtype = desc_dk.dtype
    desc_dk.store([split * B + b, pid_n * BLOCK_N, col], tl.reshape((dk * scale).to(dtype), [1, BLOCK_N, HEAD_DIM]))
    desc_dv.store([split * B + b, pid_n * BLOCK_N, col], tl.reshape(dv.to(dtype), [1, BLOCK_N, HEAD_DIM]))


# ----------------------------------------------------------------------------------------------------------------
# launch configurations. On the GPU each kernel is autotuned over the configs below (key: lengths and head dim);
# under the interpreter one small config runs.


def _cfgs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w, maxnreg=maxnreg,
                          pre_hook=_set_block_shapes) for bm, bn, s, w, maxnreg in tiles]


def _set_block_shapes(nargs):
    # Descriptors are built before the config is known; each config sets its own tile shapes.
    d, bm, bn = nargs["HEAD_DIM"], nargs["BLOCK_M"], nargs["BLOCK_N"]
    shapes = {"desc_q": [bm, d], "desc_do": [bm, d], "desc_o": [bm, d], "desc_k": [bn, d], "desc_v": [bn, d],
              "desc_out": [1, bm, d], "desc_dq": [1, bm, d], "desc_dk": [1, bn, d], "desc_dv": [1, bn, d]}
    for name, shape in shapes.items():
        if name in nargs:
            nargs[name].block_shape = shape


# (BLOCK_M, BLOCK_N, num_stages, num_warps, max registers a thread). dK/dV: BLOCK_N keys stay resident, BLOCK_M
# queries stream. The large tiles fill an SM with one program (two [128, 128] fp32 accumulators take 128 registers
# a thread); the small ones fit two programs an SM, whose softmax and matrix products then interleave. At D=128
# (sm_90, ptxas) only the dK/dV (64, 128) tiles spill, a few registers; autotuning keeps them where they still win.
_FWD_CONFIGS = _cfgs([(128, 128, 2, 8, None), (128, 128, 3, 8, None), (128, 64, 2, 8, 128), (128, 64, 2, 4, None),
                      (64, 64, 2, 4, None), (64, 64, 3, 4, None)])
_DQ_CONFIGS = _cfgs([(128, 64, 2, 8, None), (128, 64, 3, 8, None), (128, 128, 2, 8, None), (64, 64, 2, 4, None),
                     (128, 32, 2, 8, 128)])
_DKDV_CONFIGS = _cfgs([(64, 128, 3, 8, None), (32, 128, 2, 8, None), (32, 128, 3, 8, None), (64, 64, 2, 4, None),
                       (32, 64, 2, 4, None), (32, 64, 3, 4, None)])
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}

_attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["Sq", "Sk", "HEAD_DIM"])(_attn_fwd_kernel)
_attn_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["Sq", "Sk", "HEAD_DIM"])(_attn_bwd_dq_kernel)
_attn_bwd_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=["Sq", "Sk", "HEAD_DIM"])(_attn_bwd_dkdv_kernel)


def _launch(kernel, tuned, grid, args):
    """Run `kernel` on `args` (a dict): autotuned on CUDA, one small config under the interpreter."""
    if _INTERPRET:
        meta = dict(args, **_INTERPRET_META)
        _set_block_shapes(meta)
        kernel[grid(meta)](**meta)
    else:
        tuned[grid](**args)


def _desc(t):
    """TMA descriptor for loads: [B, S, H, D] seen as the matrix [B*S, H*D] (tile shape set per config)."""
    B, S, H, D = t.shape
    return TensorDescriptor(t, [B * S, H * D], [t.stride(1), 1], [16, D])


def _check_output_layout(t):
    if not _packed(t, batches=False):
        raise ValueError(f"output buffer must be [B, S, H, D] with heads packed and 16-byte rows, got strides "
                         f"{t.stride()}")


def _desc_store(t):
    """TMA descriptor for stores: [B, S, H, D] seen as [B, S, H*D], so a tile is clipped at its own batch's S."""
    _check_output_layout(t)
    B, S, H, D = t.shape
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], [1, 16, D])


def _packed(t, batches=True):
    """Whether TMA can read `t` [B, S, H, D] as the matrix [B*S, H*D] (heads packed, 16-byte rows), or with
    batches=False as the batches [S, H*D] (the batches need not follow each other)."""
    B, S, H, D = t.shape
    return (t.stride(3) == 1 and t.stride(2) == D and (B == 1 or not batches or t.stride(0) == S * t.stride(1))
            and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def _check_inputs(q, k, v):
    if not (q.is_cuda or _INTERPRET):
        raise ValueError(f"flash_attention runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got "
                         f"device {q.device}; use attention_reference elsewhere")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B, Sq, H, D], k/v [B, Sk, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, D):
        raise ValueError(f"k and v must be [B={B}, Sk, H={H}, D={D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D not in (64, 128):
        raise ValueError(f"head dim must be 64 or 128, got {D}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bf16 or all fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _packed(t):
            raise ValueError(f"{name}: TMA reads [B, S, H, D] as the matrix [B*S, H*D], which needs strides "
                             f"(S*s, s, D, 1) with 16-byte aligned rows; got strides {t.stride()}")


def _launch_fwd(q, k, v, scale, out, lse, hopper=None):
    """Forward into preallocated out [B, Sq, H, D] (heads packed) and lse fp32 [B, H, Sq] (contiguous): the Gluon
    kernel of kernels/attention_hopper.py where it serves (hopper=None), else the `tl` kernel above (hopper=False:
    benchmarks compare the two on Hopper)."""
    if hopper is None:
        hopper = not _INTERPRET and attention_hopper.serves(q, k)
    if hopper:
        _check_output_layout(out)
        return attention_hopper.launch_fwd(q, k, v, scale, out, lse)
    B, Sq, H, D = q.shape
    args = dict(desc_q=_desc(q), desc_k=_desc(k), desc_v=_desc(v), desc_out=_desc_store(out), LSE=lse,
                qk_scale=scale * _LOG2E, Sq=Sq, Sk=k.shape[1], H=H, HEAD_DIM=D)
    _launch(_attn_fwd_kernel, _attn_fwd_tuned, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args)


@functools.cache
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dkdv_splits(Sq, Sk, B, H, device):
    """How many query ranges the dK/dV kernel splits into, so that there are >= 2 programs per SM."""
    if _INTERPRET:  # small enough that the tiny test shapes exercise the split path
        target, block = 8, _INTERPRET_META["BLOCK_M"]
    else:
        target, block = 2 * _num_sms(device), 128
    programs = triton.cdiv(Sk, block) * B * H
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(Sq, block)))


def _launch_bwd(do, q, k, v, out, lse, dlse, scale, dq, dk, dv, hopper=None):
    """Backward into preallocated dq, dk, dv (shapes of q, k, v; heads packed); lse and dlse contiguous fp32
    [B, H, Sq]: the Gluon kernel of kernels/attention_hopper.py where it serves (hopper=None), else the two `tl`
    kernels above (hopper=False: benchmarks compare them on Hopper)."""
    if hopper is None:
        hopper = not _INTERPRET and attention_hopper.serves_bwd(q, k)
    if hopper:
        for t in (dq, dk, dv):
            _check_output_layout(t)
        return attention_hopper.launch_bwd(do, q, k, v, out, lse, dlse, scale, dq, dk, dv)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    delta = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    desc_q, desc_k, desc_v, desc_do = _desc(q), _desc(k), _desc(v), _desc(do)
    args = dict(desc_q=desc_q, desc_k=desc_k, desc_v=desc_v, desc_do=desc_do, desc_o=_desc(out),
                desc_dq=_desc_store(dq), LSE=lse, DLSE=dlse, DELTA=delta, qk_scale=scale * _LOG2E, scale=scale,
                Sq=Sq, Sk=Sk, H=H, HEAD_DIM=D)
    _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args)

    splits = _dkdv_splits(Sq, Sk, B, H, q.device)
    if splits == 1:
        dk_buf, dv_buf = dk, dv
    else:  # fp32 partial sums, one per query range, stacked along the batch dim
        dk_buf = torch.empty((splits * B, Sk, H, D), device=q.device, dtype=torch.float32)
        dv_buf = torch.empty_like(dk_buf)
    args = dict(desc_q=desc_q, desc_k=desc_k, desc_v=desc_v, desc_do=desc_do, desc_dk=_desc_store(dk_buf),
                desc_dv=_desc_store(dv_buf), LSE=lse, DELTA=delta, qk_scale=scale * _LOG2E, scale=scale, Sq=Sq,
                Sk=Sk, H=H, B=B, HEAD_DIM=D)
    _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned,
            lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * H, splits), args)
    if splits > 1:
        dk.copy_(dk_buf.view(splits, B, Sk, H, D).sum(0))
        dv.copy_(dv_buf.view(splits, B, Sk, H, D).sum(0))


# ----------------------------------------------------------------------------------------------------------------
# autograd: custom ops, so that selective-checkpoint policies see (and can keep) the forward's outputs


@torch.library.custom_op("cosmos_kernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    B, Sq, H, D = q.shape
    out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    _launch_fwd(q, k, v, scale, out, lse)
    return out, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, scale):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("cosmos_kernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dlse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _launch_bwd(do, q, k, v, out, lse, dlse, scale, dq, dk, dv)
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if not _packed(dout):  # autograd may hand over an expanded or transposed gradient
        dout = dout.contiguous()
    # the kernels index dlse as a contiguous [B, H, Sq]; after lse.sum() it comes expanded (stride 0), after
    # lse.transpose(1, 2) transposed
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, dlse.contiguous(), ctx.scale)
    return dq, dk, dv, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_with_lse(q, k, v, scale=None):
    """Attention softmax(q k^T * scale) v. q [B, Sq, H, D], k/v [B, Sk, H, D] -> (out [B, Sq, H, D],
    lse fp32 [B, H, Sq]); both differentiable."""
    _check_inputs(q, k, v)
    return _flash_attn_fwd(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))


def flash_attention(q, k, v, scale=None):
    """Attention softmax(q k^T * scale) v. q [B, Sq, H, D], k/v [B, Sk, H, D] -> out [B, Sq, H, D]."""
    return flash_attention_with_lse(q, k, v, scale)[0]


def attention_reference(q, k, v, scale=None):
    """Plain-PyTorch attention in fp32 on the same layout: -> (out [B, Sq, H, D] in q's dtype, lse fp32 [B, H, Sq])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_B_H_Sq_D, k_B_H_Sk_D, v_B_H_Sk_D = (t.float().transpose(1, 2) for t in (q, k, v))
    s_B_H_Sq_Sk = q_B_H_Sq_D @ k_B_H_Sk_D.transpose(-1, -2) * scale
    lse_B_H_Sq = torch.logsumexp(s_B_H_Sq_Sk, dim=-1)
    p_B_H_Sq_Sk = torch.exp(s_B_H_Sq_Sk - lse_B_H_Sq[..., None])
    out_B_Sq_H_D = (p_B_H_Sq_Sk @ v_B_H_Sk_D).transpose(1, 2).to(q.dtype)
    return out_B_Sq_H_D, lse_B_H_Sq
