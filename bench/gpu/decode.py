"""Decode beside torch, in one process: flexattn's decode path against torch's
compiled flex_attention and SDPA with the flash (FlashAttention-2) and cuDNN
backends (enable_gqa), on the same tensors.

bf16, D=128, GQA Hq=32 / Hkv=8 by default. The speed is the effective
bandwidth: the K and V bytes each batch attends (B * Hkv * keys * (D + Dv) *
2) over the call's time. Rounds are interleaved (flexattn, torch flex, flash,
cuDNN, then again), CUDA events around each call, medians.

Cases: one query row against a cache of 16K keys (B=8) and of 128K keys
(B=1); the same 16K cache as shuffled pages of 64 rows (flexattn reads the
page table; the others read the contiguous cache, the same bytes); four
query rows (speculative decoding); and a sliding window of 1024 keys at the
end of a 16K cache (flexattn: a mask mod at absolute positions through
q_offsets; torch flex: a block mask for its one query row at the same
position; SDPA has no window and is left out).

Check: every output is compared with a float32 reference on the same
inputs; flexattn's error must be at most 2 x the largest error of the torch
sides plus 2e-3 (relative to max |ref|). A failed check exits 1 and writes
nothing. Writes bench/results/decode-<gpu>.md (this run on top) and
decode-<gpu>.jsonl (one line per case, appended).
    PYTHONPATH=python FLEXATTN_LIBRARY=<build>/libflexattn.so \\
        python3 bench/gpu/decode.py [--rounds N] [--cases a,b]
"""
import argparse
import ctypes
import datetime
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

from flexattn import _library as L
from flexattn.torch import _views
from bench_results import commit_id, rel_err, time_once, write_results
from compiled_flex import compiled_flex_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases():
    """name: (B, L, Lq, page_size, window)."""
    return {
        "B8 L16K": (8, 16384, 1, 0, 0),
        "B1 L128K": (1, 131072, 1, 0, 0),
        "B8 L16K paged 64": (8, 16384, 1, 64, 0),
        "B8 L16K q4": (8, 16384, 4, 0, 0),
        "B8 L16K window 1024": (8, 16384, 1, 0, 1024),
    }


class FlexattnDecode:
    """One flexattn decode call on fixed tensors, through the C API (the
    torch front end has no decode arguments): q_offsets, a page table and a
    mask mod at absolute positions as the case asks."""

    def __init__(self, q, k, v, offsets, table, window):
        self.ctx = _views.device_context(q.device)
        B, Hq, Lq, _ = q.shape
        self.out = torch.empty((B, Hq, Lq, v.shape[-1]), dtype=q.dtype, device=q.device)
        self.lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
        self.keep = [q, k, v, offsets, table]
        self.tq, self.tk, self.tv, self.to = (_views.view(t) for t in (q, k, v, self.out))
        self.tl = _views.lse_view(self.lse)
        self.t_off = _views.view(offsets)
        self.t_tab = _views.view(table) if table is not None else None
        self.opts = L.AttentionOptions()
        self.opts.stream = torch.cuda.current_stream(q.device).cuda_stream
        self.opts.q_offsets = ctypes.cast(ctypes.pointer(self.t_off), ctypes.c_void_p)
        if table is not None:
            self.opts.page_table = ctypes.cast(ctypes.pointer(self.t_tab), ctypes.c_void_p)
        self.mask = None
        if window:
            desc = L.ModDesc(L.MOD_MASK, f"q >= kv && q - kv < {window}".encode(), None, 0, None,
                             0)
            handle = ctypes.c_void_p()
            self.ctx.check(L.lib.flex_mod_compile(self.ctx.handle, ctypes.byref(desc),
                                                  ctypes.byref(handle)))
            self.mask = handle
            self.opts.mask_mod = handle

    def __call__(self):
        self.ctx.check(L.lib.flex_attention(self.ctx.handle, ctypes.byref(self.tq),
                                            ctypes.byref(self.tk), ctypes.byref(self.tv), None,
                                            None, ctypes.byref(self.opts), ctypes.byref(self.to),
                                            ctypes.byref(self.tl)))
        return self.out

    def close(self):
        if self.mask is not None:
            L.lib.flex_mod_destroy(self.mask)
            self.mask = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("-D", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cases", default=None)
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    device_name = torch.cuda.get_device_name(dev)
    commit = commit_id(ROOT)
    flex = compiled_flex_attention()
    Hq, Hkv, D = args.Hq, args.Hkv, args.D
    chosen = cases()
    if args.cases:
        chosen = {n: chosen[n] for n in args.cases.split(",")}
    print(f"{device_name}; commit {commit}; torch {torch.__version__}; bf16 Hq {Hq} Hkv {Hkv} "
          f"D {D}; effective K+V TB/s", flush=True)
    print(f"{'case':22s} {'flexattn':>9s} {'torch flex':>10s} {'flash':>7s} {'cuDNN':>7s}  errors "
          "(flexattn / torch flex / flash / cuDNN)")
    rows, failed = [], []
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (B, Lkv, Lq, page, window) in chosen.items():
        q = torch.randn(B, Hq, Lq, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(B, Hkv, Lkv, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, Hkv, Lkv, D, device=dev, dtype=torch.bfloat16, generator=gen)
        offsets = torch.full((B,), Lkv - Lq, dtype=torch.int32, device=dev)
        table = None
        fk, fv = k, v
        if page:
            # pools (pages, page, Hkv, D) in a shuffled order
            n = B * Lkv // page
            perm = torch.randperm(n, device=dev, generator=gen)
            table = perm.view(B, Lkv // page).to(torch.int32)
            pool_k = torch.empty(n, page, Hkv, D, device=dev, dtype=k.dtype)
            pool_v = torch.empty_like(pool_k)
            pool_k[perm.long()] = k.transpose(1, 2).reshape(n, page, Hkv, D)
            pool_v[perm.long()] = v.transpose(1, 2).reshape(n, page, Hkv, D)
            fk, fv = pool_k.permute(0, 2, 1, 3), pool_v.permute(0, 2, 1, 3)
        ours = FlexattnDecode(q, fk, fv, offsets, table, window)

        # The float32 reference, and the torch sides.
        keys = window if window else Lkv
        kr = k[:, :, Lkv - keys:].float().repeat_interleave(Hq // Hkv, 1)
        vr = v[:, :, Lkv - keys:].float().repeat_interleave(Hq // Hkv, 1)
        ref = torch.softmax(q.float() @ kr.transpose(-1, -2) / D ** 0.5, -1) @ vr
        del kr, vr
        sides = {"flexattn": ours}
        if window:
            start = Lkv - Lq

            def win(b, h, qi, kv):
                return (qi + start >= kv) & (qi + start - kv < window)

            bm = create_block_mask(win, None, None, Lq, Lkv, device=dev)
            sides["torch flex"] = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)
        else:
            sides["torch flex"] = lambda: flex(q, k, v, enable_gqa=True)

            def sdpa(backend):
                def run():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                return run
            sides["flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
            sides["cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        errs, notes = {}, {}
        for s, fn in list(sides.items()):
            try:
                errs[s] = rel_err(fn(), ref)
            except Exception as e:  # a backend that cannot run this case
                if s == "flexattn":
                    raise
                notes[s] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                del sides[s]
        torch.cuda.synchronize()
        peers = [e for s, e in errs.items() if s != "flexattn"]
        bound = 2.0 * max(peers) + 2e-3 if peers else 2e-2
        ok = errs["flexattn"] <= bound
        if not ok:
            failed.append(name)
        for _ in range(3):
            for fn in sides.values():
                fn()
        torch.cuda.synchronize()
        times = {s: [] for s in sides}
        for _ in range(args.rounds):  # A B C D A B C D
            for s, fn in sides.items():
                time_once(fn, times[s])
        ms = {s: statistics.median(t) for s, t in times.items()}
        nbytes = B * Hkv * keys * 2 * D * 2
        tbps = {s: nbytes / (m * 1e-3) / 1e12 for s, m in ms.items()}
        row = dict(case=name, commit=commit, device=device_name, B=B, Hq=Hq, Hkv=Hkv, kv_len=Lkv,
                   q_len=Lq, page_size=page, window=window, D=D, dtype="bf16",
                   flexattn_ms=ms["flexattn"], flexattn_tbps=tbps["flexattn"],
                   torch_flex_ms=ms.get("torch flex"), torch_flex_tbps=tbps.get("torch flex"),
                   fa2_ms=ms.get("flash"), fa2_tbps=tbps.get("flash"),
                   cudnn_ms=ms.get("cuDNN"), cudnn_tbps=tbps.get("cuDNN"),
                   errors=errs, notes=notes, check="pass" if ok else "FAIL")
        rows.append(row)

        def f(x):
            return f"{x:.2f}" if x is not None else "-"
        print(f"{name:22s} {f(tbps['flexattn']):>9s} {f(tbps.get('torch flex')):>10s} "
              f"{f(tbps.get('flash')):>7s} {f(tbps.get('cuDNN')):>7s}  "
              + " / ".join(f"{errs[s]:.1e}" if s in errs else "-"
                           for s in ("flexattn", "torch flex", "flash", "cuDNN"))
              + ("" if ok else "  FAIL") + ("  " + "; ".join(f"{k}: {v}" for k, v in notes.items())
                                            if notes else ""), flush=True)
        ours.close()
        del q, k, v, fk, fv, ref, ours, sides
        torch.cuda.empty_cache()
    if failed:
        print(f"FAILED: outputs out of tolerance for {', '.join(failed)}; nothing written")
        sys.exit(1)
    model = re.search(r"H\d+", device_name)
    if not args.results or not model:
        return
    stem = os.path.join(args.results, "decode-" + model.group(0).lower())
    lines = [f"# Decode, bf16, Hq={Hq} Hkv={Hkv} D={D}: effective K+V bandwidth (TB/s)", "",
             f"device: {device_name}; commit {commit}; torch {torch.__version__}; "
             f"{datetime.date.today()}; command: bench/gpu/decode.py", "",
             "| case | flexattn | torch flex | FlashAttention-2 (SDPA) | cuDNN (SDPA) | flexattn ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def cell(x):
        return f"{x:.2f}" if x is not None else "-"
    for r in rows:
        lines.append(f"| {r['case']} | {cell(r['flexattn_tbps'])} | {cell(r['torch_flex_tbps'])} | "
                     f"{cell(r['fa2_tbps'])} | {cell(r['cudnn_tbps'])} | {r['flexattn_ms']:.4f} |")
    lines += ["", f"Medians of {args.rounds} interleaved rounds, CUDA events on every side. "
              "Bytes: the K and V rows each batch attends, once. torch: "
              "torch.compile(flex_attention, dynamic=False), default mode, enable_gqa; SDPA "
              "with enable_gqa under sdpa_kernel(FLASH_ATTENTION) and (CUDNN_ATTENTION). The "
              "paged case: flexattn reads shuffled pages of 64 rows through its page table, the "
              "others the contiguous cache. The window case: SDPA has no window. Outputs "
              "checked against a float32 reference (flexattn's error at most 2x the torch "
              "sides' largest + 2e-3)."]
    notes = sorted({f"{r['case']}: {k}: {v}" for r in rows for k, v in r["notes"].items()})
    if notes:
        lines += ["", "Not run: " + "; ".join(notes)]
    write_results(stem, lines, rows)


if __name__ == "__main__":
    main()
