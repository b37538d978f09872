"""Bad input: torch-style errors for wrong devices, dtypes and shapes; the
library's own text in the exception; a TypeError naming the construct and
the line for a mod that cannot be translated; an out-of-range buffer read
raises instead of reading stray memory."""

import pytest
import torch

import flexattn
import flexattn.numpy
import flexattn.torch as fa


def qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


def test_dtype_mismatch():
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="same dtype"):
        fa.flex_attention(q, k.half(), v)


def test_float64_refused():
    q, k, v = qkv(1, 2, 8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        fa.flex_attention(q, k, v)


def test_rank_and_head_dims():
    q, k, v = qkv(2, 8, 4)
    with pytest.raises(ValueError, match="4D"):
        fa.flex_attention(q, k, v)
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="embedding dimension"):
        fa.flex_attention(q, k[..., :3], v)


def test_gqa_needs_enable_gqa():
    q = torch.randn(1, 4, 8, 4)
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fa.flex_attention(q, k, v)
    assert fa.flex_attention(q, k, v, enable_gqa=True).shape == (1, 4, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        fa.flex_attention(torch.randn(1, 3, 8, 4), k, v, enable_gqa=True)


def test_block_mask_for_other_lengths():
    q, k, v = qkv(1, 2, 40, 8)
    bm = fa.create_block_mask(lambda b, h, q_, kv: q_ >= kv, 1, 1, 32, 32, device="cpu")
    with pytest.raises(ValueError, match="block_mask was created for"):
        fa.flex_attention(q, k, v, block_mask=bm)


def test_torch_block_mask_refused():
    from torch.nn.attention.flex_attention import create_block_mask
    q, k, v = qkv(1, 2, 32, 8)
    bm = create_block_mask(lambda b, h, q_, kv: q_ >= kv, 1, 1, 32, 32, device="cpu")
    with pytest.raises(TypeError, match="flexattn.torch.create_block_mask"):
        fa.flex_attention(q, k, v, block_mask=bm)


def test_library_message_reaches_python():
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(flexattn.FlexError) as e:
        fa.flex_attention(q, k, v, score_mod="score + kvv")
    assert "unknown name 'kvv'; did you mean 'kv'?" in str(e.value)
    assert e.value.status == "ERR_MOD_NAME"


def test_out_of_range_buffer_read_raises():
    q, k, v = qkv(1, 2, 16, 4)
    bias = torch.zeros(2, 10)

    def past_the_end(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx]          # q_idx reaches 15 > 9
    with pytest.raises(IndexError, match="out of range"):
        fa.flex_attention(q, k, v, score_mod=past_the_end)

    def negative(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx]  # negative indices do not wrap
    with pytest.raises(IndexError, match="out of range"):
        fa.flex_attention(q, k, v, score_mod=negative)


def test_untranslatable_mods_name_construct_and_line():
    q, k, v = qkv(1, 2, 8, 4)
    import math

    def if_on_traced(score, b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return score
        return score * 2
    with pytest.raises(TypeError, match=r"Python control flow.*test_errors.py:\d+ "
                                        r"\(in if_on_traced\): if q_idx > kv_idx:"):
        fa.flex_attention(q, k, v, score_mod=if_on_traced)

    def math_call(score, b, h, q_idx, kv_idx):
        return math.exp(score)
    with pytest.raises(TypeError, match=r"float\(\).*return math.exp\(score\)"):
        fa.flex_attention(q, k, v, score_mod=math_call)

    def unknown_torch_function(score, b, h, q_idx, kv_idx):
        return torch.erf(score)
    with pytest.raises(TypeError, match="torch function 'erf'.*torch.erf"):
        fa.flex_attention(q, k, v, score_mod=unknown_torch_function)

    table = torch.randn(8, 8)

    def slicing(score, b, h, q_idx, kv_idx):
        return score + table[q_idx, :].sum()
    with pytest.raises(TypeError, match="slice"):
        fa.flex_attention(q, k, v, score_mod=slicing)

    def int_mask(b, h, q_idx, kv_idx):
        return q_idx - kv_idx
    with pytest.raises(TypeError, match="returned an int"):
        fa.create_block_mask(int_mask, 1, 1, 8, 8, device="cpu")


def test_translation_text():
    """What a callable becomes: torch's true division on ints, captured
    tensors as buffers named after their variables, numbers as literals."""
    from flexattn._trace import trace_mod
    doc_ids = torch.zeros(8, dtype=torch.int32)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(doc_ids[q_idx] == doc_ids[kv_idx], score + q_idx / 3, -float("inf"))
    traced = trace_mod(mod, 1)
    assert traced.buffers == [("doc_ids", 3, 1)] and traced.tensors[0] is doc_ids
    assert "float(q) / 3" in traced.text and "(-inf)" in traced.text


def test_numpy_entry_point():
    import numpy as np
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 30, 8), dtype=np.float32)
    k = rng.standard_normal((1, 2, 30, 8), dtype=np.float32)
    v = rng.standard_normal((1, 2, 30, 8), dtype=np.float32)
    doc = np.repeat(np.arange(3), 10)
    out, lse = flexattn.numpy.attention(q, k, v, score_mod="C * tanh(score / C)",
                                        mask_mod="q >= kv && doc[q] == doc[kv]",
                                        params={"C": 5.0}, buffers={"doc": doc},
                                        return_lse=True)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
    s = 5.0 * np.tanh(s / 5.0)
    keep = (np.arange(30)[:, None] >= np.arange(30)[None, :]) & (doc[:, None] == doc[None, :])
    s = np.where(keep, s, -np.inf)
    ref_lse = np.log(np.exp(s).sum(-1))
    ref = np.exp(s - ref_lse[..., None]) @ v
    assert np.abs(out - ref).max() < 2e-5 and np.abs(lse - ref_lse).max() < 2e-5
    with pytest.raises(flexattn.FlexError, match="out of range"):
        flexattn.numpy.attention(q, k, v, mask_mod="doc[q + 1] == 0", buffers={"doc": doc})


def test_every_status_named_by_the_library():
    """The exception's status is the C library's own name for the code, so a
    code added in C (ERR_OVERFLOW, 17) is named without a Python table."""
    from flexattn import _library as L

    for code in range(1, 18):
        e = L.error(code)
        assert e.status == L.lib.flex_status_name(code).decode()
        assert e.status.startswith("ERR_") and e.status != "ERR_UNKNOWN_STATUS"
    assert isinstance(L.error(17), OverflowError)
    assert L.error(17).status == "ERR_OVERFLOW"
