"""Prototype (2026-12-02, session 5): the D = 256 forward with the state transposed and split by key columns.

    python3 benchmarks/proto_transposed_state.py     # CUDA: B8 N8K H16 D256 bf16; CPU: a small fp32 check

One program per (128 value columns, batch*head) keeps the state as S^T, four [128, 64] float32
tiles (one per 64 key columns), so each warp group of the eight warps owns 64 value rows of it:
the state's share ``S^T q^T`` takes the state as the register operand of the tensor-core product
(no shared-memory round trip of the state), the update ``S^T += (w v)^T k`` reads k as loaded, and
q and k are read once per 128 value columns instead of once per 64. Outputs come out transposed
([Dv, rows]) and are stored through their strides. Only what the benchmark shape needs: one
segment, zero initial state, decay, contiguous [B, H, N, 256] inputs. It prints the relative
difference of output and final state against the op, then the times (benchmarks/RESULTS.md,
session 5). The library's version of this kernel is the next step (benchmarks/NOTES.md).
"""

import torch
import triton
import triton.language as tl

import lightning_op
from lightning_op.kernels.chunked import _block_and_head, _dot, _dot_acc, _load_rows

@triton.jit(do_not_specialize=["N"])
def _t4_kernel(
    Q, K, V, O, DECAY, SEG_STATES, FINAL,
    stride_qn, stride_kn, stride_vn, stride_on,
    stride_qh, stride_oh,
    N, H, DK, DV, segment_len, num_segments, num_slots, split, out_scale, value_scale,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, ACC_OUT: tl.constexpr, DOT: tl.constexpr,
):
    pid_v, bh = _block_and_head(DV, BLOCK_V)
    seg = tl.program_id(1)
    h = bh % H
    q_ptr = Q + bh * stride_qh
    k_ptr = K + bh * stride_qh
    v_ptr = V + bh * stride_qh
    o_ptr = O + bh * stride_oh
    ck = tl.arange(0, 64)
    cols_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    valid_v = cols_v < DV
    tk = ck < 64
    idx = tl.arange(0, CHUNK)
    causal_t = idx[:, None] <= idx[None, :]
    log2_lam = -tl.load(DECAY + h).to(tl.float32) * 1.4426950408889634
    distance = tl.maximum(idx[None, :] - idx[:, None], 0).to(tl.float32)
    mask_t = tl.where(causal_t, tl.exp2(log2_lam * distance), 0.0) * (value_scale * out_scale)
    s0 = tl.zeros([BLOCK_V, 64], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_V, 64], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_V, 64], dtype=tl.float32)
    s3 = tl.zeros([BLOCK_V, 64], dtype=tl.float32)
    seg_begin = seg * segment_len
    seg_end = tl.minimum(seg_begin + segment_len, N)
    for start in range(seg_begin, seg_end, CHUNK):
        rows = start + idx
        rv = rows < seg_end
        length = tl.minimum(seg_end - start, CHUNK)
        q0 = _load_rows(q_ptr, stride_qn, 1, rows, rv, ck, tk, N, False)
        q1 = _load_rows(q_ptr + 64, stride_qn, 1, rows, rv, ck, tk, N, False)
        q2 = _load_rows(q_ptr + 128, stride_qn, 1, rows, rv, ck, tk, N, False)
        q3 = _load_rows(q_ptr + 192, stride_qn, 1, rows, rv, ck, tk, N, False)
        k0 = _load_rows(k_ptr, stride_kn, 1, rows, rv, ck, tk, N, False)
        k1 = _load_rows(k_ptr + 64, stride_kn, 1, rows, rv, ck, tk, N, False)
        k2 = _load_rows(k_ptr + 128, stride_kn, 1, rows, rv, ck, tk, N, False)
        k3 = _load_rows(k_ptr + 192, stride_kn, 1, rows, rv, ck, tk, N, False)
        v = _load_rows(v_ptr, stride_vn, 1, rows, rv, cols_v, valid_v, N, False)
        sc = _dot(k0, tl.trans(q0), DOT, "ieee")
        sc = _dot_acc(sc, k1, tl.trans(q1), DOT, "ieee")
        sc = _dot_acc(sc, k2, tl.trans(q2), DOT, "ieee")
        sc = _dot_acc(sc, k3, tl.trans(q3), DOT, "ieee")
        sc = sc * mask_t
        row_weight = tl.exp2(log2_lam * (idx + 1).to(tl.float32)) * out_scale
        inter = _dot(s0, tl.trans(q0), DOT, "ieee")
        inter = _dot_acc(inter, s1, tl.trans(q1), DOT, "ieee")
        inter = _dot_acc(inter, s2, tl.trans(q2), DOT, "ieee")
        inter = _dot_acc(inter, s3, tl.trans(q3), DOT, "ieee")
        if ACC_OUT:
            out_t = _dot_acc(inter * row_weight[None, :], tl.trans(v), sc, DOT, "ieee")
        else:
            intra = _dot(tl.trans(v), sc, DOT, "ieee")
            out_t = tl.fma(inter, row_weight[None, :], intra)
        o_offsets = rows.to(tl.int64)[None, :] * stride_on + cols_v[:, None]
        tl.store(o_ptr + o_offsets, out_t.to(O.dtype.element_ty), mask=rv[None, :] & valid_v[:, None])
        weight = tl.exp2(log2_lam * tl.maximum(length - 1 - idx, 0).to(tl.float32)) * value_scale
        dec = tl.exp2(log2_lam * length.to(tl.float32))
        vw = tl.trans(v * weight[:, None])
        s0 = _dot_acc(s0 * dec, vw, k0, DOT, "ieee")
        s1 = _dot_acc(s1 * dec, vw, k1, DOT, "ieee")
        s2 = _dot_acc(s2 * dec, vw, k2, DOT, "ieee")
        s3 = _dot_acc(s3 * dec, vw, k3, DOT, "ieee")
    fp = FINAL + bh * DK * DV + cols_v[:, None]
    tl.store(fp + ck[None, :] * DV, s0)
    tl.store(fp + (ck[None, :] + 64) * DV, s1)
    tl.store(fp + (ck[None, :] + 128) * DV, s2)
    tl.store(fp + (ck[None, :] + 192) * DV, s3)


import torch
import triton
import triton.language as tl
import lightning_op


def run_t4(q, k, v, decay, bv, acc, warps=8, stages=2):
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    final = torch.empty(b, h, d, d, dtype=torch.float32, device=q.device)
    dot = tl.float32 if q.dtype == torch.float32 else tl.bfloat16
    _t4_kernel[(b * h * (d // bv), 1)](
        q, k, v, out, decay, final, final, q.stride(2), k.stride(2), v.stride(2), out.stride(2), q.stride(1), out.stride(1),
        n, h, d, d, n, 1, 0, 1, 1.0, 1.0, CHUNK=64, BLOCK_K=256, BLOCK_V=bv, ACC_OUT=acc, DOT=dot,
        num_warps=warps, num_stages=stages)
    return out, final


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    shape = (8, 16, 8192, 256) if cuda else (1, 2, 200, 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, device=dev, dtype=dtype) * 0.3 for _ in range(3))
    decay = lightning_op.slopes(shape[1]).to(dev) if cuda else torch.tensor([0.05, 2.0])
    with torch.no_grad():
        ref, ref_final = lightning_op.lightning_attn(q, k, v, decay, output_final_state=True)
    variants = [(128, False), (128, True), (64, False)] if cuda else [(128, False), (64, True)]
    for bv, acc in variants:
        out, final = run_t4(q, k, v, decay, bv, acc)
        print(f"t4 bv={bv} acc_out={int(acc)}: out rel {rel(out, ref):.1e}, final rel {rel(final, ref_final):.1e}", flush=True)
    if cuda:
        from triton.testing import do_bench
        with torch.no_grad():
            base = do_bench(lambda: lightning_op.lightning_attn(q, k, v, decay), return_mode="median")
        print(f"op default forward: {base:.3f} ms", flush=True)
        for bv, acc in variants:
            t = do_bench(lambda: run_t4(q, k, v, decay, bv, acc), return_mode="median")
            print(f"t4 bv={bv} acc_out={int(acc)}: {t:.3f} ms ({base / t:.2f}x the op)", flush=True)


if __name__ == "__main__":
    main()
