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
