"""The cache of mod translations (flexattn/_trace_cache.py): a mod is
translated again exactly when something it reads has changed, and every
call's output follows the values the mod reads at that call."""

import gc
import os
import weakref

import pytest
import torch

import flexattn.torch as fa
from flexattn import _library as L
from flexattn import _trace_cache
from reference import dense_attention, max_error

DEVICE = os.environ.get("FLEXATTN_TEST_DEVICE", "cpu")


@pytest.fixture
def translations(monkeypatch):
    """A list that grows by one at every translation the cache makes."""
    made = []
    real = _trace_cache.trace_mod

    def counting(fn, kind):
        made.append(fn)
        return real(fn, kind)
    monkeypatch.setattr(_trace_cache, "trace_mod", counting)
    _trace_cache.clear()
    yield made
    _trace_cache.clear()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) for _ in range(3)]


def _check(q, k, v, score_mod):
    """flexattn's output against the float64 reference of the same mod."""
    out = fa.flex_attention(q, k, v, score_mod=score_mod)
    want, _ = dense_attention(q, k, v, score_mod=score_mod)
    err = max_error(out, want)
    assert err < 1e-5, err


def test_same_function_translated_once(translations):
    q, k, v = _inputs()
    slopes = torch.tensor([0.5, -0.25], device=DEVICE)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    for _ in range(3):
        _check(q, k, v, alibi)
    assert len(translations) == 1


def test_new_closure_with_same_values_is_found(translations):
    q, k, v = _inputs()

    def make(width):
        def mod(score, b, h, q_idx, kv_idx):
            return torch.where((q_idx - kv_idx).abs() <= width, score, score - 1.0)
        return mod
    for _ in range(3):
        _check(q, k, v, make(5))
    assert len(translations) == 1
    _check(q, k, v, make(9))  # a captured number changed: its own translation
    assert len(translations) == 2


SCALE = 0.5


def _global_scaled(score, b, h, q_idx, kv_idx):
    return score * SCALE


def test_global_number_change_translates_again(translations):
    global SCALE
    q, k, v = _inputs()
    _check(q, k, v, _global_scaled)
    SCALE = 2.0
    try:
        _check(q, k, v, _global_scaled)
    finally:
        SCALE = 0.5
    assert len(translations) == 2


def test_default_argument_is_part_of_the_key(translations):
    q, k, v = _inputs()
    mods = [lambda s, b, h, qi, kvi, c=c: s + c * (qi % 3) for c in (0.5, 1.5)]
    for mod in mods + mods:
        _check(q, k, v, mod)
    assert len(translations) == 2


def test_value_read_by_item_follows_in_place_change(translations):
    q, k, v = _inputs()
    temperature = torch.tensor(2.0)

    def cooled(score, b, h, q_idx, kv_idx):
        return score / temperature.item()  # a literal in the translation
    _check(q, k, v, cooled)
    temperature.fill_(4.0)  # bumps the version counter
    _check(q, k, v, cooled)
    assert len(translations) == 2


def test_buffer_replaced_by_another_tensor(translations):
    q, k, v = _inputs()
    bias = torch.tensor([1.0, -1.0], device=DEVICE)

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (q_idx % 5)
    _check(q, k, v, biased)
    bias = torch.tensor([-3.0, 2.0], device=DEVICE)  # the closure cell now holds another
    _check(q, k, v, biased)
    assert len(translations) == 2


def test_buffer_changed_in_place_is_read_without_translating(translations):
    """A buffer's values are read by the kernel at each call, so an in-place
    change needs no new translation of the text, only a new key (the
    version counter is in it) whose translation is the same text."""
    q, k, v = _inputs()
    bias = torch.tensor([1.0, -1.0], device=DEVICE)

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h]
    _check(q, k, v, biased)
    with torch.no_grad():
        bias.mul_(-2.0)
    _check(q, k, v, biased)


def test_reads_the_key_cannot_describe_translate_every_call(translations):
    q, k, v = _inputs()
    settings = {"shift": 0.25}
    windows = [3]

    def from_dict(score, b, h, q_idx, kv_idx):
        return score + settings["shift"] * (q_idx - kv_idx).abs().float()

    def from_list(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx - kv_idx).abs() <= windows[0], score, score - 2.0)
    for mod in (from_dict, from_list):
        _check(q, k, v, mod)
    settings["shift"] = -0.5
    windows[0] = 11
    for mod in (from_dict, from_list):
        _check(q, k, v, mod)
    assert len(translations) == 4


def test_cache_does_not_keep_captured_tensors_alive(translations):
    q, k, v = _inputs()
    table = torch.randn(40, device=DEVICE)

    def mod(score, b, h, q_idx, kv_idx):
        return score + table[q_idx]
    _check(q, k, v, mod)
    gone = weakref.ref(table)
    del mod, table
    gc.collect()
    assert gone() is None


def test_translation_from_cache_is_the_same_text(translations):
    slopes = torch.tensor([0.5, -0.25])

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    first = _trace_cache.cached_trace(alibi, L.MOD_SCORE)
    again = _trace_cache.cached_trace(alibi, L.MOD_SCORE)
    assert len(translations) == 1
    assert again.spec == first.spec and again.tensors[0] is slopes
