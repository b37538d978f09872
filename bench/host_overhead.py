#!/usr/bin/env python3
"""Host time of one eager flexattn.torch.flex_attention call, with the mod
translation cache (flexattn/_trace_cache.py) and with a translation on every
call, interleaved (A B A B), medians of rounds.

    PYTHONPATH=python FLEXATTN_LIBRARY=build/libflexattn.so \\
        python3 bench/host_overhead.py [--rounds 15] [--calls 400]

The tensors are tiny CPU tensors (B1 H2 L16 D16), so the kernel's share is a
few microseconds and both columns are mostly host work: the difference is
what a short GPU kernel's caller saves on each call."""

import argparse
import statistics
import time

import torch

import flexattn.torch as fa
from flexattn import _trace
from flexattn.torch import _api

H = 2
slopes = torch.tensor([0.5, -0.25])
bucket_bias = torch.randn(H, 32)


def alibi(score, b, h, q_idx, kv_idx):
    return score + slopes[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def t5_bias(score, b, h, q_idx, kv_idx):
    rel = kv_idx - q_idx
    exact = rel.abs() < 8
    far = (8 + (torch.log(rel.abs().float() / 8) / 2.77 * 8).int()).clamp(max=15)
    bucket = torch.where(exact, rel.abs(), far) + torch.where(rel > 0, 16, 0)
    return score + bucket_bias[h, bucket]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, H, 16, 16) for _ in range(3))
    mask = fa.create_block_mask(causal, 1, H, 16, 16, device="cpu")
    cached = _api.cached_trace
    modes = {"cache": cached, "every call": lambda fn, kind: _trace.trace_mod(fn, kind)}
    print(f"torch {torch.__version__}; microseconds per call, median of {args.rounds} rounds "
          f"of {args.calls} calls")
    print(f"{'score mod':10s} {'cache':>8s} {'every call':>11s}")
    for name, mod in (("alibi", alibi), ("softcap", softcap), ("t5_bias", t5_bias)):
        times = {m: [] for m in modes}
        for _ in range(args.rounds):
            for label, translate in modes.items():
                _api.cached_trace = translate
                fa.flex_attention(q, k, v, score_mod=mod, block_mask=mask)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fa.flex_attention(q, k, v, score_mod=mod, block_mask=mask)
                times[label].append((time.perf_counter() - t0) / args.calls * 1e6)
        _api.cached_trace = cached
        print(f"{name:10s} {statistics.median(times['cache']):8.1f} "
              f"{statistics.median(times['every call']):11.1f}")


if __name__ == "__main__":
    main()
