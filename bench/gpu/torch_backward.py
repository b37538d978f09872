"""PyTorch's flex_attention backward timed beside flexattn's CUDA backward.

bf16, B=4, H=16, S=8192, D=128 by default; noop, causal, and ALiBi with a
causal mask (the score mod's derivative). torch.compile(flex_attention)
forward once, then the backward of out.backward(dO) timed alone: CUDA events
around torch.autograd.grad of the saved graph, median of --iters runs after
warm-up. Backward FLOPs are 2.5 times the forward's (4*B*H*S*S*D times the
block mask's density), as flexattn's `run --backward` counts them.

Usage: python3 torch_backward.py [--len S] [--iters N] [--patterns a,b]
"""
import argparse
import statistics

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-H", type=int, default=16)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--patterns", default="noop,causal,alibi_causal")
    args = ap.parse_args()
    B, H, S, D = args.B, args.H, args.len, args.D
    dev = "cuda"
    torch.manual_seed(0)
    q, k, v = (
        (torch.rand(B, H, S, D, device=dev, dtype=torch.bfloat16) * 2 - 1).requires_grad_()
        for _ in range(3))
    dout = torch.rand(B, H, S, D, device=dev, dtype=torch.bfloat16) * 2 - 1
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H)

    def causal(b, h, qi, ki):
        return qi >= ki

    def alibi(score, b, h, qi, ki):
        return score + slopes[h] * (ki - qi)

    patterns = {"noop": (None, None), "causal": (causal, None), "alibi_causal": (causal, alibi)}
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'pattern':16s} {'bw_ms':>10s} {'bw TFLOP/s':>11s} {'density':>8s}")
    for name in args.patterns.split(","):
        mask_fn, score_fn = patterns[name]
        bm = create_block_mask(mask_fn, None, None, S, S, device=dev) if mask_fn else None
        density = 1.0 if bm is None else 1.0 - bm.sparsity() / 100.0
        out = flex(q, k, v, score_mod=score_fn, block_mask=bm)

        def bw():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        for _ in range(3):
            bw()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            bw()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        ms = statistics.median(times)
        tf = 2.5 * 4.0 * B * H * S * S * D * density / (ms * 1e-3) / 1e12
        print(f"{name:16s} {ms:10.3f} {tf:11.1f} {density:8.4f}", flush=True)


if __name__ == "__main__":
    main()
