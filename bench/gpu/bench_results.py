"""What the GPU benchmarks beside torch share (backward.py, decode.py): one
call timed with CUDA events, the relative error against a reference, the
commit being measured, and the result files (a table on top of the GPU's
Markdown file, one JSON line per row appended)."""
import json
import os
import subprocess

import torch


def time_once(fn, times):
    """Appends fn's GPU time in ms, CUDA events around the call."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    times.append(a.elapsed_time(b))


def rel_err(x, ref):
    """max |x - ref| / max |ref| (ref in float32)."""
    return ((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def commit_id(root):
    """FLEXATTN_COMMIT when set (a copied tree's git may be stale), else the
    checkout's short HEAD, else "unknown"."""
    return os.environ.get("FLEXATTN_COMMIT") or subprocess.run(
        ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip() or "unknown"


def write_results(stem, lines, rows):
    """stem.md: lines (starting with a "# " title) on top, the file's earlier
    content below under "## Earlier run"; stem.jsonl: rows appended. The
    folder is made when missing."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    old = open(stem + ".md").read() if os.path.exists(stem + ".md") else ""
    text = "\n".join(lines) + "\n"
    if old.startswith("# "):
        text += "\n## Earlier run\n" + old.split("\n", 1)[1]
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    with open(stem + ".jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print(f"results: {stem}.md, {stem}.jsonl")
