"""Flash attention for Hopper (sm_90) in Gluon, Triton's lower-level dialect: warp specialisation and explicitly
pipelined tensor-core products (FlashAttention-3's schedules), which Triton's `tl` compiler does not produce.

Same contract as kernels/attention.py (which runs these on sm_90 and its own `tl` kernels elsewhere): q [B, Sq, H, D],
k/v [B, Sk, H, D] read in place as the matrices [B*S, H*D], bf16/fp16; the forward writes out [B, Sq, H, D] and the
natural-log log-sum-exp lse fp32 [B, H, Sq], the backward dq, dk, dv. The reference is
kernels.attention.attention_reference.

Forward (D in {64, 128}, Sk >= MIN_KEYS): one program per 128 query rows of one (batch, head), in three partitions:
  loader     1 warp: TMA loads of the two Q tiles, then K and V blocks into a ring of STAGES buffers. K and V each
             have a "ready" and an "empty" mbarrier a buffer: a K buffer is refilled once both consumers have
             finished S_j with it, a V buffer once both have finished P_j V_j, so K_{j+2} can load during P_j V_j.
  consumers  2 warpgroups, 64 query rows each, sharing the K/V ring. For key block j a consumer issues S_j = Q K_j^T,
             rescales O, issues O += P_{j-1} V_{j-1}, waits for S_j only, and computes the softmax of S_j while the
             P V product runs on the tensor cores. With two consumers, one's softmax also overlaps the other's products.
Rows past Sq and keys past Sk (read from the next batch, or zero-filled past the tensor's end) are masked: keys out of
every softmax, rows out of the stores.

Backward (D = 128, Sk >= BWD_MIN_KEYS): one program per 128 keys of one (batch, head), streaming 64-query blocks:
  loader     1 warp: K and V once, then Q, dO and the rows' lse (base 2) and delta into a ring of BWD_STAGES
             buffers.
  consumers  2 warpgroups, 64 keys each, dK and dV in registers. For query block i: S^T = K Q^T and dP^T = V dO^T
             issued together, P^T from the saved lse, dV += P^T dO issued, dS^T = P^T (dP^T - delta), dK += dS^T Q
             issued. dQ = dS K needs all 128 keys: both consumers write their dS^T half to shared memory, meet at an
             mbarrier, and each computes 64 of dQ's 128 columns, which a TMA reduce-add sums into an fp32 buffer
             shared by all programs. 5 matrix products a block (the `tl` backward does 7); dQ's sums are atomic, so
             their order, and dQ's last bits, vary from run to run.
"""

import torch
import triton
import triton.language as tl
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed after triton 3.6
_thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # likewise


@builtin
def _tma_reduce_add_36(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of a shared-memory tile into global memory: the instruction behind tma.async_atomic_add, which
    Gluon names only after triton 3.6."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


_tma_reduce_add = getattr(tma, "async_atomic_add", None) or _tma_reduce_add_36


BLOCK_M = 64  # query rows a consumer warpgroup (the wgmma M is 64 per warpgroup)
BLOCK_N = 128  # keys a block
STAGES = 2  # K/V ring depth (3 measured no faster)
CONSUMER_REGS, LOADER_REGS = 232, 40  # registers a thread for the worker partitions (setmaxnreg)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
            row_q, row_k, col, n_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for c in gl.static_range(2):
        mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
        _tma_load(q_desc, [row_q + c * BLOCK_M, col], q_bar.index(c), q_smem.index(c))
    for j in range(n_blocks):
        stage = j % STAGES
        if j >= STAGES:  # both consumers are done with the block this buffer held last
            mbarrier.wait(k_empty.index(stage), ((j // STAGES) - 1) & 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [row_k + j * BLOCK_N, col], k_ready.index(stage), k_smem.index(stage))
        if j >= STAGES:
            mbarrier.wait(v_empty.index(stage), ((j // STAGES) - 1) & 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [row_k + j * BLOCK_N, col], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _consumer(c: gl.constexpr, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, out_ptr, lse_ptr,
              out_stride_b, out_stride_s, qk_scale, Sq, Sk, H, bh, first_row, n_blocks, HEAD_DIM: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, dtype: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # S, P: [BLOCK_M, BLOCK_N]
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # O: [BLOCK_M, HEAD_DIM]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P from registers
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q = q_smem.index(c)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    # key block 0: S_0 and its softmax
    mbarrier.wait(q_bar.index(c), 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False)
    mbarrier.arrive(k_empty.index(0))
    if BLOCK_N > Sk:
        s = gl.where(cols[None, :] < Sk, s, float("-inf"))
    m_i = gl.max(s, 1) * qk_scale  # running row max of the scores, base-2 units
    s = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(s, 1)
    alpha = gl.full([BLOCK_M], 1.0, gl.float32, row_s)  # how much O shrinks before the next P V is added
    p = gl.convert_layout(s.to(dtype), p_layout)

    for j in range(1, n_blocks):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        # S's registers are dead (P holds block j-1): the new product writes into them, no accumulator to zero
        s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s, use_acc=False, is_async=True)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j done; P_{j-1} V_{j-1} may still run
        mbarrier.arrive(k_empty.index(stage))
        if (j + 1) * BLOCK_N > Sk:  # the last block runs past Sk
            s = gl.where((j * BLOCK_N + cols)[None, :] < Sk, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        s = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(s, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=[acc_tok])  # P's registers and V_{j-1}'s buffer are free again
        mbarrier.arrive(v_empty.index(prev))
        p = gl.convert_layout(s.to(dtype), p_layout)
    last = (n_blocks - 1) % STAGES
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc)
    mbarrier.arrive(v_empty.index(last))

    b = bh // H
    rows = first_row + gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(lse_ptr + bh * Sq + rows, (m_i + gl.log2(l_i)) * 0.6931471805599453, mask=rows < Sq)  # in ln
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    rows_o = first_row + gl.arange(0, BLOCK_M, layout=row_o)
    cols_o = (bh % H) * HEAD_DIM + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    # 64-bit offsets: an output of over 2^31 elements (a batch of long 14B sequences) wraps 32-bit ones
    offs = b.to(gl.int64) * out_stride_b + rows_o.to(gl.int64)[:, None] * out_stride_s + cols_o[None, :]
    gl.store(out_ptr + offs, out.to(dtype), mask=(rows_o < Sq)[:, None])


@gluon.jit(do_not_specialize=["Sq", "Sk"])  # one compile serves every length
def _attn_fwd_kernel(q_desc, k_desc, v_desc, out_ptr, lse_ptr, out_stride_b, out_stride_s, qk_scale, Sq, Sk, H,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    col = (bh % H) * HEAD_DIM
    n_blocks = gl.cdiv(Sk, BLOCK_N)
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_bar.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival from each consumer
        mbarrier.init(v_empty.index(i), count=2)
    first = pid_m * 2 * BLOCK_M
    gl.warp_specialize([
        (_consumer, (0, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, out_ptr, lse_ptr,
                     out_stride_b, out_stride_s, qk_scale, Sq, Sk, H, bh, first, n_blocks,
                     HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, dtype)),
        (_consumer, (1, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, out_ptr, lse_ptr,
                     out_stride_b, out_stride_s, qk_scale, Sq, Sk, H, bh, first + BLOCK_M, n_blocks,
                     HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, dtype)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                   b * Sq + first, b * Sk, col, n_blocks, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# Below this many keys the `tl` kernel is faster (BENCHMARKS.md): each program's fixed costs (partitions, barriers,
# Q load, masked stores) are spread over too few key blocks.
MIN_KEYS = 1024


def serves(q, k):
    """Whether this kernel runs the forward of q, k: on Hopper (sm_90: it is built on wgmma), for >= MIN_KEYS keys."""
    return (q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) == (9, 0)
            and k.shape[1] >= MIN_KEYS)


def _desc(t, block_rows):
    """TMA descriptor of [B, S, H, D] seen as the matrix [B*S, H*D], tiles [block_rows, D]."""
    B, S, H, D = t.shape
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], dtype)
    return TensorDescriptor(t, [B * S, H * D], [t.stride(1), 1], [block_rows, D], layout)


def launch_args(q, k, v, scale, out, lse):
    """(grid, positional arguments, keyword arguments) of _attn_fwd_kernel for these tensors."""
    B, Sq, H, D = q.shape
    grid = (triton.cdiv(Sq, 2 * BLOCK_M), B * H)
    args = (_desc(q, BLOCK_M), _desc(k, BLOCK_N), _desc(v, BLOCK_N), out, lse, out.stride(0), out.stride(1),
            scale * 1.4426950408889634, Sq, k.shape[1], H)
    meta = dict(HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
                LOADER_REGS=LOADER_REGS, num_warps=4)
    return grid, args, meta


def launch_fwd(q, k, v, scale, out, lse):
    """Forward into out [B, Sq, H, D] (heads packed) and lse fp32 [B, H, Sq]; inputs checked by the caller."""
    grid, args, meta = launch_args(q, k, v, scale, out, lse)
    _attn_fwd_kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------------------------
# backward

BWD_BLOCK_M = 64  # queries a block (the wgmma M of the dQ product)
BWD_BLOCK_N = 128  # keys a program, 64 a consumer warpgroup
BWD_STAGES = 2  # Q/dO ring depth
BWD_CONSUMER_REGS, BWD_LOADER_REGS = 240, 40


@triton.jit
def _bwd_rows_kernel(o_ptr, do_ptr, lse_ptr, dlse_ptr, lse2_ptr, delta_ptr, o_stride_b, o_stride_s, do_stride_b,
                     do_stride_s, Sq, Sq_pad, H, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Per query row, into [B*H, Sq_pad] buffers the backward's loader reads by TMA: lse2 = lse in base 2 and
    delta = rowsum(dO * O) - dlse (the gradient reaching lse enters dS as P * dlse, so it folds in). Padding rows get
    lse2 = inf and delta = 0, so their P, and everything they add, is 0."""
    bh = tl.program_id(1)
    b = bh // H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < Sq
    cols = (bh % H) * HEAD_DIM + tl.arange(0, HEAD_DIM)
    o = tl.load(o_ptr + b.to(tl.int64) * o_stride_b + rows.to(tl.int64)[:, None] * o_stride_s + cols[None, :],
                mask=ok[:, None], other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * do_stride_b + rows.to(tl.int64)[:, None] * do_stride_s + cols[None, :],
                 mask=ok[:, None], other=0.0)
    dlse = tl.load(dlse_ptr + bh * Sq + rows, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + bh * Sq + rows, mask=ok, other=float("inf"))
    tl.store(lse2_ptr + bh * Sq_pad + rows, lse * 1.4426950408889634)
    tl.store(delta_ptr + bh * Sq_pad + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse)


@gluon.jit
def _bwd_loader(k_desc, v_desc, q_desc, do_desc, lse2_desc, delta_desc, k_smem, v_smem, kv_bar, q_smem, do_smem,
                lse2_smem, delta_smem, q_ready, q_empty, row_k, row_q, row_lse, col, n_blocks, BLOCK_M: gl.constexpr,
                STAGES: gl.constexpr):
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    _tma_load(k_desc, [row_k, col], kv_bar, k_smem)
    _tma_load(v_desc, [row_k, col], kv_bar, v_smem)
    for i in range(n_blocks):
        stage = i % STAGES
        if i >= STAGES:  # both consumers are done with the block this buffer held last
            mbarrier.wait(q_empty.index(stage), ((i // STAGES) - 1) & 1)
        mbarrier.expect(q_ready.index(stage), 2 * q_desc.block_type.nbytes + 2 * lse2_desc.block_type.nbytes)
        _tma_load(q_desc, [row_q + i * BLOCK_M, col], q_ready.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [row_q + i * BLOCK_M, col], q_ready.index(stage), do_smem.index(stage))
        _tma_load(lse2_desc, [row_lse + i * BLOCK_M], q_ready.index(stage), lse2_smem.index(stage))
        _tma_load(delta_desc, [row_lse + i * BLOCK_M], q_ready.index(stage), delta_smem.index(stage))


@gluon.jit
def _bwd_consumer(c: gl.constexpr, k_smem, v_smem, kv_bar, q_smem, do_smem, lse2_smem, delta_smem, q_ready, q_empty,
                  ds_smem, ds_ready, ds_free, dq_smem, dq_desc, dk_ptr, dv_ptr, dkv_stride_b, dkv_stride_s,
                  qk_scale, scale, Sq, Sk, H, bh, first_key, n_blocks, HEAD_DIM: gl.constexpr,
                  BLOCK_M: gl.constexpr, STAGES: gl.constexpr, dtype: gl.constexpr):
    KEYS: gl.constexpr = 64  # this consumer's keys: rows c*64.. of the program's K/V block
    HALF: gl.constexpr = HEAD_DIM // 2  # this consumer's columns of dQ
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])  # S^T, dP^T: [KEYS, BLOCK_M]
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])  # dK, dV: [KEYS, HEAD_DIM]
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF, 16])  # dQ: [BLOCK_M, HALF]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)  # P^T, dS^T
    col_s: gl.constexpr = gl.SliceLayout(0, st_layout)
    k_c = k_smem.slice(c * KEYS, KEYS, dim=0)
    v_c = v_smem.slice(c * KEYS, KEYS, dim=0)
    keys = first_key + c * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(1, st_layout))
    key_tail = first_key + 2 * KEYS > Sk
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    b = bh // H
    col = (bh % H) * HEAD_DIM
    mbarrier.wait(kv_bar, 0)
    for i in range(n_blocks):
        stage = i % STAGES
        mbarrier.wait(q_ready.index(stage), (i // STAGES) & 1)
        q = q_smem.index(stage)
        do = do_smem.index(stage)
        st_tok = warpgroup_mma(k_c, q.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, st_layout),
                               use_acc=False, is_async=True)  # S^T = K Q^T
        dpt_tok = warpgroup_mma(v_c, do.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, st_layout),
                                use_acc=False, is_async=True)  # dP^T = V dO^T
        st = warpgroup_mma_wait(1, deps=[st_tok])
        lse2 = lse2_smem.index(stage).load(col_s)  # inf past Sq: P = 0 there, so those rows add nothing
        pt = gl.exp2(st * qk_scale - lse2[None, :])
        if key_tail:  # keys past Sk (the next batch's, or zeros) are out of every softmax
            pt = gl.where((keys < Sk)[:, None], pt, 0.0)
        dv_tok = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=[dpt_tok])
        delta = delta_smem.index(stage).load(col_s)
        dst = (pt * (dpt - delta[None, :])).to(dtype)  # dS^T, gradient of the scaled scores
        dk_tok = warpgroup_mma(gl.convert_layout(dst, a_layout), q, dk, is_async=True)
        # dQ = dS K needs all 128 keys: both consumers put their half of dS^T in shared memory
        buf = i % 2
        if i >= 2:
            mbarrier.wait(ds_free.index(buf), ((i // 2) - 1) & 1)
        ds_smem.index(buf).slice(c * KEYS, KEYS, dim=0).store(dst)
        fence_async_shared()
        _thread_barrier()
        mbarrier.arrive(ds_ready.index(buf))
        mbarrier.wait(ds_ready.index(buf), (i // 2) & 1)
        dq_tok = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_smem.slice(c * HALF, HALF, dim=1),
                               gl.zeros([BLOCK_M, HALF], gl.float32, dq_layout),
                               use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok])
        mbarrier.arrive(q_empty.index(stage))
        mbarrier.arrive(ds_free.index(buf))
        tma.store_wait(0)  # the previous block's reduce-add has read dq_smem
        _thread_barrier()
        dq_smem.store(dq)
        fence_async_shared()
        _thread_barrier()
        # rows past Sq add exact zeros (their dS is 0) to the next batch's rows, or are clipped past the end
        _tma_reduce_add(dq_desc, [b * Sq + i * BLOCK_M, col + c * HALF], dq_smem)
    tma.store_wait(0)

    rows = first_key + c * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(1, kv_layout))
    cols = col + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    offs = b.to(gl.int64) * dkv_stride_b + rows.to(gl.int64)[:, None] * dkv_stride_s + cols[None, :]
    ok = (rows < Sk)[:, None]
    gl.store(dk_ptr + offs, (dk * scale).to(dtype), mask=ok)
    gl.store(dv_ptr + offs, dv.to(dtype), mask=ok)


@gluon.jit(do_not_specialize=["Sq", "Sq_pad", "Sk"])  # one compile serves every length
def _attn_bwd_kernel(q_desc, k_desc, v_desc, do_desc, lse2_desc, delta_desc, dq_desc, dk_ptr, dv_ptr, dkv_stride_b,
                     dkv_stride_s, qk_scale, scale, Sq, Sq_pad, Sk, H, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     LOADER_REGS: gl.constexpr):
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    col = (bh % H) * HEAD_DIM
    n_blocks = gl.cdiv(Sq, BLOCK_M)
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse2_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)  # dS^T, both consumers' halves
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2], dq_desc.layout)  # a consumer each
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # one arrival from each consumer
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)
        mbarrier.init(ds_free.index(i), count=2)
    first_key = pid_n * BLOCK_N
    gl.warp_specialize([
        (_bwd_consumer, (0, k_smem, v_smem, kv_bar, q_smem, do_smem, lse2_smem, delta_smem, q_ready, q_empty,
                         ds_smem, ds_ready, ds_free, dq_smem.index(0), dq_desc, dk_ptr, dv_ptr, dkv_stride_b,
                         dkv_stride_s, qk_scale, scale, Sq, Sk, H, bh, first_key, n_blocks, HEAD_DIM, BLOCK_M, STAGES,
                         dtype)),
        (_bwd_consumer, (1, k_smem, v_smem, kv_bar, q_smem, do_smem, lse2_smem, delta_smem, q_ready, q_empty,
                         ds_smem, ds_ready, ds_free, dq_smem.index(1), dq_desc, dk_ptr, dv_ptr, dkv_stride_b,
                         dkv_stride_s, qk_scale, scale, Sq, Sk, H, bh, first_key, n_blocks, HEAD_DIM, BLOCK_M, STAGES,
                         dtype)),
        (_bwd_loader, (k_desc, v_desc, q_desc, do_desc, lse2_desc, delta_desc, k_smem, v_smem, kv_bar, q_smem,
                       do_smem, lse2_smem, delta_smem, q_ready, q_empty, b * Sk + first_key, b * Sq, bh * Sq_pad, col,
                       n_blocks, BLOCK_M, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


# Below this many keys the `tl` backward, which also splits the queries, fills the GPU better (BENCHMARKS.md), e.g.
# in cross-attention onto 512 text tokens.
BWD_MIN_KEYS = 1024


def serves_bwd(q, k):
    """Whether launch_bwd runs the backward of q, k: on Hopper, head dim 128 (a consumer's half of dQ is 64 columns,
    one 128-byte swizzle row of K), and >= BWD_MIN_KEYS keys."""
    return (q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.shape[-1] == 128 and k.shape[1] >= BWD_MIN_KEYS)


def bwd_launch_args(do, q, k, v, lse2, delta, scale, dq_acc, dk, dv):
    """(grid, positional arguments, keyword arguments) of _attn_bwd_kernel for these tensors."""
    B, Sq, H, D = q.shape
    if dk.stride() != dv.stride():
        raise ValueError(f"dk and dv must share strides, got {dk.stride()} and {dv.stride()}")
    dq_layout = gl.NVMMASharedLayout.get_default_for([BWD_BLOCK_M, D // 2], gl.float32)
    dq_desc = TensorDescriptor(dq_acc, [B * Sq, H * D], [H * D, 1], [BWD_BLOCK_M, D // 2], dq_layout)
    row_layout = gl.NVMMASharedLayout.get_default_for([BWD_BLOCK_M], gl.float32)
    lse2_desc, delta_desc = (TensorDescriptor(t, [t.numel()], [1], [BWD_BLOCK_M], row_layout) for t in (lse2, delta))
    grid = (triton.cdiv(k.shape[1], BWD_BLOCK_N), B * H)
    args = (_desc(q, BWD_BLOCK_M), _desc(k, BWD_BLOCK_N), _desc(v, BWD_BLOCK_N), _desc(do, BWD_BLOCK_M), lse2_desc,
            delta_desc, dq_desc, dk, dv, dk.stride(0), dk.stride(1), scale * 1.4426950408889634, scale, Sq,
            lse2.shape[-1], k.shape[1], H)
    meta = dict(HEAD_DIM=D, BLOCK_M=BWD_BLOCK_M, BLOCK_N=BWD_BLOCK_N, STAGES=BWD_STAGES,
                CONSUMER_REGS=BWD_CONSUMER_REGS, LOADER_REGS=BWD_LOADER_REGS, num_warps=4)
    return grid, args, meta


def launch_bwd(do, q, k, v, out, lse, dlse, scale, dq, dk, dv):
    """Backward into dq, dk, dv (shapes of q, k, v; heads packed); lse and dlse contiguous fp32 [B, H, Sq]; inputs
    checked by the caller."""
    B, Sq, H, D = q.shape
    Sq_pad = triton.cdiv(Sq, BWD_BLOCK_M) * BWD_BLOCK_M
    lse2 = torch.empty((B * H, Sq_pad), device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse2)
    _bwd_rows_kernel[(Sq_pad // BWD_BLOCK_M, B * H)](out, do, lse, dlse, lse2, delta, out.stride(0), out.stride(1),
                                                     do.stride(0), do.stride(1), Sq, Sq_pad, H, HEAD_DIM=D,
                                                     BLOCK=BWD_BLOCK_M)
    dq_acc = torch.zeros((B, Sq, H, D), device=q.device, dtype=torch.float32)  # the reduce-adds' target
    grid, args, meta = bwd_launch_args(do, q, k, v, lse2, delta, scale, dq_acc, dk, dv)
    _attn_bwd_kernel[grid](*args, **meta)
    torch.mul(dq_acc, scale, out=dq)  # one pass: scaled and cast to dq's dtype
