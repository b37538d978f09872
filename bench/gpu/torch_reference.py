"""PyTorch reference timings beside flexattn's CUDA forward.

Same shapes and patterns as bench/gpu/bench_cuda.c (bf16, B=4, H=16,
S=8192, D=128 by default): torch.compile(flex_attention) for every pattern,
and SDPA with the FLASH_ATTENTION and CUDNN_ATTENTION backends where a
pattern is expressible there (noop and causal). FLOPs are counted like
FlexAttention's own benchmark: 4*B*H*S*S*D times the block mask's density.
Timing: CUDA events, median of --iters runs after warm-up.

Usage: python3 torch_reference.py [--len S] [--iters N] [--json FILE]
"""
import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

from compiled_flex import compiled_flex_attention


def doc_ids(S, device):
    lens = [512, 1024, 1536, 2048, 768, 2304]
    ids, d = [], 0
    while len(ids) < S:
        ids += [d] * lens[d % 6]
        d += 1
    return torch.tensor(ids[:S], dtype=torch.int32, device=device)


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-H", type=int, default=16)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    B, H, S, D = args.B, args.H, args.len, args.D
    dev = "cuda"
    torch.manual_seed(0)
    q, k, v = (torch.rand(B, H, S, D, device=dev, dtype=torch.bfloat16) * 2 - 1 for _ in range(3))
    doc = doc_ids(S, dev)
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H)

    def causal(b, h, qi, ki):
        return qi >= ki

    def sliding(b, h, qi, ki):
        return (qi >= ki) & (qi - ki <= 1024)

    def doc_causal(b, h, qi, ki):
        return (qi >= ki) & (doc[qi] == doc[ki])

    def alibi(score, b, h, qi, ki):
        return score + slopes[h] * (ki - qi)

    def softcap(score, b, h, qi, ki):
        return 30.0 * torch.tanh(score / 30.0)

    patterns = [
        ("noop", None, None),
        ("causal", causal, None),
        ("sliding_window", sliding, None),
        ("document_causal", doc_causal, None),
        ("alibi_causal", causal, alibi),
        ("softcap_causal", causal, softcap),
    ]
    flex = compiled_flex_attention()
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'pattern':24s} {'impl':16s} {'median_ms':>10s} {'TFLOP/s':>10s} {'density':>8s}")
    for name, mask_fn, score_fn in patterns:
        bm = create_block_mask(mask_fn, None, None, S, S, device=dev) if mask_fn else None
        density = 1.0 if bm is None else 1.0 - bm.sparsity() / 100.0
        flops = 4.0 * B * H * S * S * D * density
        impls = [("torch_flex", lambda: flex(q, k, v, score_mod=score_fn, block_mask=bm))]
        if name in ("noop", "causal"):
            is_causal = name == "causal"
            for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                   ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def run(backend=backend, is_causal=is_causal):
                    with sdpa_kernel([backend]):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=is_causal)
                impls.append((label, run))
        for label, fn in impls:
            try:
                ms = time_ms(fn, args.iters)
            except Exception as e:  # a backend missing on this build is reported, not fatal
                print(f"{name:24s} {label:16s} unavailable: {type(e).__name__}: {str(e)[:120]}")
                continue
            tf = flops / (ms * 1e-3) / 1e12
            print(f"{name:24s} {label:16s} {ms:10.3f} {tf:10.1f} {density:8.4f}", flush=True)
            rows.append({"impl": label, "pattern": name, "B": B, "H": H, "S": S, "D": D,
                         "dtype": "bf16", "median_ms": ms, "tflops": tf, "density": density,
                         "device": torch.cuda.get_device_name()})
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
