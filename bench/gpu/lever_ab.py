"""One lever of a CUDA kernel, on and off, flexattn alone: for A/B-ing
FLEXATTN_DEBUG settings quickly, not for comparing with a peer (that is
backward.py's and zoo.py's job, beside torch).

The settings are read when a process makes its context, so each setting
runs in its own child process; the children alternate (A B A B ...) for
--rounds rounds, each timing --iters calls with CUDA events after a warm-up (the backward
alone: torch.autograd.grad of one saved forward, as backward.py times it),
and the median of the per-round medians is printed per setting and case.
Every child checks its dq, dk, dv (or output) against the first setting's,
within bf16 rounding (a lever that changes results fails the run).

    PYTHONPATH=python FLEXATTN_LIBRARY=<build>/libflexattn.so \\
        python3 bench/gpu/lever_ab.py [--cases noop:128,causal:128] [--forward] \\
        [--rounds 3] [--len S] "" "cuda_bwd_split_wait=0" ...
A setting "KEYS@LIBRARY" runs with another build of the library (e.g.
"@/tmp/base-build/libflexattn.so": the base commit's, its default keys).
Cases: PATTERN:D with PATTERN one of noop, causal, window (causal within 1024 keys,
backward.py's sliding_window), document, softcap, alibi,
relbias (causal plus a learnable (H, 513) relative-position bias table whose
gradient is timed and checked too), or zoo/NAME for a mod of bench/gpu/zoo.py (e.g. zoo/dilated_window:128).
"""
import argparse
import json
import os
import statistics
import subprocess
import time
import sys

B, H = 4, 16


def child(case, forward, iters, ref_path, S, dev):
    import torch
    import flexattn.torch as fa
    name, D = case.split(":")
    D = int(D)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)
    doc = (torch.arange(S, device=dev) * 7 // S).to(torch.int32)
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev, dtype=torch.float32) / H)
    rel = (torch.randn(H, 2 * 256 + 1, device=dev) * 0.1).requires_grad_()
    learned = {"relbias": [rel]}
    masks = {"noop": None, "causal": lambda b, h, qi, kv: qi >= kv,
             "relbias": lambda b, h, qi, kv: qi >= kv,
             "window": lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 1024),
             "document": lambda b, h, qi, kv: (doc[qi] == doc[kv]) & (qi >= kv),
             "softcap": lambda b, h, qi, kv: qi >= kv, "alibi": lambda b, h, qi, kv: qi >= kv}
    scores = {"softcap": lambda s, b, h, qi, kv: 30.0 * torch.tanh(s / 30.0),
              "alibi": lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi),
              "relbias": lambda s, b, h, qi, kv: s + rel[h, torch.clamp(kv - qi, -256, 256) + 256]}
    if name.startswith("zoo/"):  # a mod of bench/gpu/zoo.py, flexattn's side of it
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from zoo import ZOO
        score, mask, fa_score = ZOO[name[4:]]["make"](B, H, S, S, dev)
        masks[name], scores[name] = mask, fa_score if fa_score is not None else score
    bm = fa.create_block_mask(masks[name], None, None, S, S, device=dev) if masks[name] else None
    sm = scores.get(name)

    saved = None if forward else fa.flex_attention(q, k, v, score_mod=sm, block_mask=bm)

    def run():
        if forward:
            return (fa.flex_attention(q, k, v, score_mod=sm, block_mask=bm),)
        return torch.autograd.grad(saved, (q, k, v, *learned.get(name, [])), dout,
                                   retain_graph=True)

    res = run()
    if ref_path and os.path.exists(ref_path):
        ref = torch.load(ref_path)
        for g, r in zip(res, ref):
            err = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
            if err > 1e-2:
                print(json.dumps({"error": f"{case}: differs from the first setting by {err:.2e}"}))
                sys.exit(1)
    elif ref_path:
        torch.save([g.detach() for g in res], ref_path)
    for _ in range(3):
        run()
    if dev == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if dev == "cuda":
            a, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b_.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b_))
        else:  # a dry run of the script itself
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    density = 1.0 if bm is None else 1.0 - bm.sparsity() / 100.0
    flops = (1.0 if forward else 2.5) * 4.0 * B * H * S * S * D * density
    print(json.dumps({"ms": statistics.median(times), "flops": flops}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="noop:128,causal:128")
    ap.add_argument("--forward", action="store_true", help="time the forward instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    ap.add_argument("--child", default=None)
    ap.add_argument("--ref", default=None)
    ap.add_argument("settings", nargs="*", default=[""])
    a = ap.parse_args()
    if a.child:
        child(a.child, a.forward, a.iters, a.ref, a.len, a.device)
        return
    cases = a.cases.split(",")
    results = {(c, s): [] for c in cases for s in a.settings}
    fwd_ms = {}
    tmp = os.environ.get("TMPDIR", "/tmp")
    failed = False
    for r in range(a.rounds):
        for c in cases:
            for s in a.settings:
                debug, _, lib = s.partition("@")
                env = dict(os.environ, FLEXATTN_DEBUG=debug)
                if lib:
                    env["FLEXATTN_LIBRARY"] = lib
                stem = c.replace(":", "_").replace("/", "_")
                ref = os.path.join(tmp, f"lever_ab_ref_{stem}_{int(a.forward)}.pt")
                if r == 0 and s == a.settings[0] and os.path.exists(ref):
                    os.remove(ref)
                cmd = [sys.executable, __file__, "--child", c, "--iters", str(a.iters), "--ref", ref,
                       "--len", str(a.len), "--device", a.device]
                if a.forward:
                    cmd.append("--forward")
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                line = [l for l in p.stdout.splitlines() if l.startswith("{")]
                rec = json.loads(line[-1]) if line else {"error": p.stderr[-2000:]}
                if p.returncode != 0 or "error" in rec:
                    print(f"FAILED {c} [{s}]: {rec.get('error')}", flush=True)
                    failed = True
                    continue
                results[(c, s)].append(rec)
                print(f"round {r} {c} [{s or 'default'}]: {rec['ms']:.3f} ms "
                      f"{rec['flops'] / rec['ms'] / 1e9:.1f} TFLOP/s", flush=True)
    print("median over rounds (" + ("forward" if a.forward else "backward alone") + "):")
    for c in cases:
        for s in a.settings:
            recs = results[(c, s)]
            if recs:
                ms = statistics.median(x["ms"] for x in recs)
                tf = recs[0]["flops"] / ms / 1e9
                print(f"  {c:14s} {s or 'default':40s} {ms:8.3f} ms {tf:7.1f} TFLOP/s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
