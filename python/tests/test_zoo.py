"""Every mod of the mod-zoo benchmark (bench/gpu/zoo.py) as a parity test:
at tiny shapes, flexattn's CPU backend against torch's eager CPU
flex_attention and an fp64 dense reference, forward and backward, through
the benchmark's own --cpu-dry-run path (the same mods, the same check)."""

import importlib.util
import os

import pytest

_ZOO_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu", "zoo.py")
_spec = importlib.util.spec_from_file_location("zoo", _ZOO_PATH)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def test_zoo_has_at_least_24_mods():
    assert len(zoo.ZOO) >= 24


@pytest.mark.parametrize("shape", sorted(zoo.DRY_SHAPES))
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_mod(name, shape):
    zoo.dry_check(name, zoo.DRY_SHAPES[shape])


def test_approx_tanh_op_traces_to_tanh_approx():
    """attention-gym's approx::tanh op (packet, overload, or the custom op
    object) becomes the language's tanh_approx, never a silent exact tanh;
    torch.tanh stays tanh."""
    import torch

    from flexattn import _library as L
    from flexattn._trace import trace_mod
    _, _, fa_score = zoo.build("softcap_tanh_approx", zoo.DRY_SHAPES["tiny"], "cpu")
    assert "tanh_approx(" in trace_mod(fa_score, L.MOD_SCORE).spec
    for op in (torch.ops.approx.tanh, torch.ops.approx.tanh.default):
        spec = trace_mod(lambda s, b, h, q, kv, op=op: op(s), L.MOD_SCORE).spec
        assert "tanh_approx(score)" in spec
    assert "tanh_approx" not in trace_mod(lambda s, b, h, q, kv: torch.tanh(s), L.MOD_SCORE).spec


def _row(shape, mod, flexattn_ms, torch_ms, commit="abc1234", rounds=3, options=None):
    return {"shape": shape, "mod": mod, "commit": commit, "device": "GPU X",
            "flexattn_ms": flexattn_ms, "torch_ms": torch_ms, "speedup": torch_ms / flexattn_ms,
            "flexattn_tflops": 100.0, "rounds": rounds, "torch_kernel_options": options,
            "torch_compile": {"fn": "torch.compile(flex_attention, dynamic=False)",
                              "mode": "default", "torch": "t", "triton": "tr"}}


def _write_rows(path, rows):
    import json
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_combine_runs(tmp_path):
    """Per-shape runs (a finished one and a stopped one's partial rows)
    become one result: every row once, a later file's row replacing an
    earlier one, shapes in the zoo's order, the median over all of them."""
    import json
    a, b = tmp_path / "a.jsonl", tmp_path / "b.partial.jsonl"
    _write_rows(a, [_row("d64", "noop", 1.0, 2.0), _row("d64", "causal", 1.0, 0.5)])
    _write_rows(b, [_row("main", "noop", 1.0, 1.0, rounds=5),
                    _row("d64", "causal", 1.0, 1.5, options={"BLOCK_M": 64})])
    prefix = str(tmp_path / "zoo")
    assert zoo.combine([str(a), str(b)], prefix) == 0
    rows = [json.loads(line) for line in open(prefix + ".jsonl")]
    assert [(r["shape"], r["mod"]) for r in rows] == [("main", "noop"), ("d64", "noop"),
                                                     ("d64", "causal")]
    assert rows[2]["torch_ms"] == 1.5
    md = open(prefix + ".md").read()
    assert "Median speedup 1.50x, minimum 1.00x over 3 configurations" in md
    assert "rounds (3/5)" in md
    assert "| d64 | causal* |" in md and "kernel_options={'BLOCK_M': 64}" in md


def test_combine_refuses_mixed_commits(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_rows(a, [_row("main", "noop", 1.0, 2.0)])
    _write_rows(b, [_row("d64", "noop", 1.0, 2.0, commit="def5678")])
    prefix = str(tmp_path / "zoo")
    assert zoo.combine([str(a), str(b)], prefix) == 1
    assert not os.path.exists(prefix + ".md") and not os.path.exists(prefix + ".jsonl")
