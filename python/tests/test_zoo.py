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
