"""The decay gradient's error per head against float64, by length: the moment form on bf16 inputs.

On a GPU: the op's backward (``backends.backward(backends.triton(), ...)``, the moment pass) on
bf16 inputs, each head against ``reference.decay_gradient_chunked`` in float64 on the same values;
also its time against the backward without the decay's gradient (CUDA events, median).

On CPU (no GPU): an emulation of the moment kernel's bf16 arithmetic (:func:`emulated_bf16`), with
the weighted operands split in two bf16 terms (the kernel's default) and as one.

  python3 benchmarks/decay_grad_accuracy.py                     # GPU: D 64 and 128, N 2K..64K, + times
  python benchmarks/decay_grad_accuracy.py --lengths 2048,16384  # CPU emulation
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_op import backends, reference  # noqa: E402

#: the per-head decays of the measurement in RESULTS.md (2026-12-07), weak to strong
DECAYS = [0.001, 0.01, 0.05, 0.2, 0.5, 2.0]


def emulated_bf16(q, k, v, do, decay, scale, split=True, chunk=64):
    """The moment kernel's arithmetic on one sequence (``decay_grad.py``) with bfloat16 products:
    every product's operands as the kernel gives them to ``tl.dot`` (q, k, v, do as they are; rows
    of do and v times weights rounded to bfloat16, as ``hi + lo`` with ``split``), everything else
    float32. Returns ``[H]`` float32."""

    def weighted_product(x, y, weight):  # x^T (y * weight), as decay_grad._weighted_product
        weighted = y * weight
        hi = weighted.to(torch.bfloat16).float()
        out = x.transpose(-1, -2) @ hi
        if split:
            out = out + x.transpose(-1, -2) @ (weighted - hi).to(torch.bfloat16).float()
        return out

    b, h, n, dk = q.shape
    dv = v.shape[-1]
    q, k, v, do = (x.float() for x in (q, k, v, do))
    state = torch.zeros(b, h, dk, dv)
    moment = torch.zeros(b, h, dk, dv)
    rows_sum = torch.zeros(b, h, chunk)
    cols_sum = torch.zeros(b, h, dv)
    log_lam = -decay.float().reshape(h, 1)
    idx = torch.arange(chunk, dtype=torch.float32)
    distance = idx[:, None] - idx[None, :]
    steps = distance.clamp(min=0)
    pair_weight = torch.where(distance > 0, steps * torch.exp(log_lam[..., None] * steps), 0.0)  # [H, C, C]
    row_weight = torch.exp(log_lam * (idx + 1))[..., None]  # [H, C, 1]
    state_weight = row_weight * (idx + 1)[:, None]
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        rows = slice(start, start + length)
        q_c, k_c, v_c, do_c = (x[:, :, rows] for x in (q, k, v, do))
        scores = (q_c @ k_c.transpose(-1, -2)) * pair_weight[:, :length, :length] * (do_c @ v_c.transpose(-1, -2))
        rows_sum[..., :length] += scores.sum(-1)
        carried = (state * weighted_product(q_c, do_c, state_weight[:, :length])
                   + moment * weighted_product(q_c, do_c, row_weight[:, :length]))
        cols_sum += carried.sum(-2)
        chunk_decay = torch.exp(log_lam * length)[..., None]  # [H, 1, 1]
        key_steps = (length - 1 - idx[:length])[:, None]
        key_weight = torch.exp(log_lam[..., None] * key_steps)  # [H, C, 1]
        moment = (moment * chunk_decay + state * (length * chunk_decay)
                  + weighted_product(k_c, v_c, key_steps * key_weight))
        state = state * chunk_decay + weighted_product(k_c, v_c, key_weight)
    return -(scale * (rows_sum.sum(-1) + cols_sum.sum(-1))).sum(0)


def per_head_error(got, want):
    return ((got.double().cpu() - want.double().cpu()).abs() / want.double().cpu().abs()).max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,16384,65536")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    decay = torch.tensor(DECAYS, device=device)
    print(f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU emulation'}, torch {torch.__version__}, "
          f"bf16 inputs [1, {len(DECAYS)}, N, D], decays {DECAYS}; largest relative error of a head's gradient")
    for d in (int(x) for x in args.head_dims.split(",")):
        for n in (int(x) for x in args.lengths.split(",")):
            gen = torch.Generator().manual_seed(n + d)
            q, k, v, do = (torch.randn(1, len(DECAYS), n, d, generator=gen).to(device, torch.bfloat16)
                           for _ in range(4))
            scale = d ** -0.5
            want = reference.decay_gradient_chunked(*(x.double() for x in (q, k, v, do)), decay.double(),
                                                    scale=scale)
            if cuda:
                from lightning_op.kernels import decay_gradient

                got = backends.backward(backends.triton(), do, None, q, k, v, decay, scale, None, decay_grad=True)[4]
                one_term = decay_gradient(q, k, v, do, decay, scale, split=False)
            else:
                got = emulated_bf16(q, k, v, do, decay, scale)
                one_term = emulated_bf16(q, k, v, do, decay, scale, split=False)
            print(f"D {d:4d} N {n:6d}: {per_head_error(got, want):.2e}"
                  + f" (weighted operands as one bf16 term: {per_head_error(one_term, want):.2e})")
    if cuda:
        time_backward(args.repeats)


def median_ms(call, repeats: int) -> float:
    """Median time of ``call()`` in ms (CUDA events), after three warm-up calls."""
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


def time_backward(repeats: int) -> None:
    """Backward with the decay's gradient / without, H16 bf16, decays linspace(0.005, 0.7, 16);
    and the moment pass alone, its weighted operands as two bf16 terms (the default) or one."""
    from lightning_op.kernels import decay_gradient

    decay = torch.linspace(0.005, 0.7, 16, device="cuda")
    for b, n, d in ((1, 65536, 128), (1, 65536, 64), (8, 8192, 128), (8, 8192, 64)):
        q, k, v, do = (torch.randn(b, 16, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = d ** -0.5
        plain, with_grad = (median_ms(lambda: backends.backward(backends.triton(), do, None, q, k, v, decay, scale,
                                                                None, decay_grad=decay_grad), repeats)
                            for decay_grad in (False, True))
        split, one_term = (median_ms(lambda: decay_gradient(q, k, v, do, decay, scale, split=s), repeats)
                           for s in (True, False))
        print(f"B{b} N{n} D{d}: backward {plain:.3f} ms, with the decay's gradient {with_grad:.3f} ms "
              f"({with_grad / plain:.2f}x); moment pass alone {split:.3f} ms (one-term operands {one_term:.3f} ms)")


if __name__ == "__main__":
    main()
