"""flex_attention: torch's signature and checks in front of the custom op."""

import math

import torch

from .. import _library as L
from .._trace import follow, locate, trace_mod
from .._trace_cache import cached_trace
from . import _op, _views
from ._block_mask import BlockMask


@torch.compiler.assume_constant_result
def _translate_for_graph(score_mod):
    """Run by torch.compile while it traces, outside the graph: the spec and
    the paths to the captured tensors, constants of the compiled graph."""
    traced = trace_mod(score_mod, L.MOD_SCORE)
    return traced.spec, tuple(locate(score_mod, traced.tensors))


def _score_spec(score_mod):
    """(spec, captured tensors) of a score mod: None, mod text or a callable.
    Under torch.compile the callable is translated once, while the graph is
    traced, and its tensors are taken from its closure as graph inputs."""
    if score_mod is None:
        return "", []
    if isinstance(score_mod, str):
        return f"{L.MOD_SCORE}||{score_mod}", []
    if torch.compiler.is_compiling():
        spec, paths = _translate_for_graph(score_mod)
        return spec, [follow(score_mod, path) for path in paths]
    traced = cached_trace(score_mod, L.MOD_SCORE)
    return traced.spec, traced.tensors


def _check_inputs(query, key, value, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"NYI: {name} must be a 4D tensor (batch, heads, sequence, "
                             f"head_dim), but got {name}.dim()={t.dim()}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"Expected query, key, and value to have the same dtype, but got "
                         f"query.dtype: {query.dtype}, key.dtype: {key.dtype}, and value.dtype: "
                         f"{value.dtype} instead.")
    if query.dtype not in _views.ATTENTION_DTYPES:
        raise ValueError(f"flexattn supports float32, float16 and bfloat16 tensors, but got "
                         f"{query.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"Expected query, key, and value to have the same device type, but got "
                         f"query.device: {query.device}, key.device: {key.device}, and "
                         f"value.device: {value.device} instead.")
    if query.size(-1) != key.size(-1):
        raise ValueError(f"Expect query and key/value to have the same embedding dimension but "
                         f"got E={query.size(-1)} and E={key.size(-1)}.")
    if query.size(0) != key.size(0) or key.size(0) != value.size(0):
        raise ValueError(f"Expect query, key and value to have the same batch size, but got "
                         f"{query.size(0)}, {key.size(0)} and {value.size(0)}.")
    if key.size(1) != value.size(1) or key.size(2) != value.size(2):
        raise ValueError(f"Expect key and value to have the same number of heads and sequence "
                         f"length, but got key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)}.")
    Hq, Hkv = query.size(1), key.size(1)
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"Expect query and key/value to have the same number of heads but "
                             f"got Hq={Hq} and Hkv={Hkv}. Try setting enable_gqa=True for GQA.")
        if Hq % Hkv != 0:
            raise ValueError(f"Expect number of query heads to be a multiple of kv heads for "
                             f"GQA but got Hq={Hq} and Hkv={Hkv}.")


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False, kernel_options=None, *,
                   return_aux=None):
    """Attention with a score mod and a block mask; the arguments and results
    of torch.nn.attention.flex_attention.flex_attention.

    score_mod: None, a callable score_mod(score, b, h, q_idx, kv_idx) written
    for torch, or mod text. block_mask: a BlockMask from this module's
    create_block_mask / BlockMask.from_kv_blocks, or None (no mask).
    kernel_options: the library's hints "q_tile", "kv_tile", "kv_splits";
    torch's Triton options are accepted and ignored.
    Returns out (B, Hq, Lq, Dv), or (out, lse) with return_lse.
    """
    _check_inputs(query, key, value, enable_gqa)
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise TypeError("block_mask must be a flexattn.torch.BlockMask (torch's BlockMask "
                        "holds no mask mod the library can read); build it with "
                        "flexattn.torch.create_block_mask")
    B, Hq, Lq, D = query.shape
    Lkv = key.size(2)
    if block_mask is not None:
        mq, mkv = block_mask.seq_lengths
        if (mq, mkv) != (Lq, Lkv):
            raise ValueError(f"block_mask was created for block_mask.shape={block_mask.shape} "
                             f"but got q_len={Lq} and kv_len={Lkv}. Create a new block mask "
                             f"for these lengths.")
        mB, mH = block_mask.kv_num_blocks.shape[:2]
        if mB not in (1, B) or mH not in (1, Hq):
            raise ValueError(f"block_mask of shape {block_mask.shape} does not broadcast to "
                             f"batch {B} and {Hq} query heads")
    spec, buffers = _score_spec(score_mod)
    if block_mask is not None:
        mask_tensors, mask_buffers = block_mask._tensors(), block_mask._buffers
        mask_spec, mask_info = block_mask._spec, block_mask._info()
    else:
        mask_tensors, mask_buffers, mask_spec, mask_info = [], [], "", []
    kernel = []
    if kernel_options:
        kernel = [int(kernel_options.get(n, 0)) for n in ("q_tile", "kv_tile", "kv_splits")]
        if not any(kernel):
            kernel = []
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    out, lse = _op.attention(query, key, value, buffers, spec, mask_tensors, mask_buffers,
                             mask_spec, mask_info, scale, kernel)
    if return_lse:
        return out, lse
    return out


def synchronize(device=None):
    """Waits for the library's work on a CUDA device and raises the error a
    kernel flagged since the last call (a buffer read out of range: GPU
    kernels clamp the index and flag it instead of reading stray memory)."""
    device = torch.device(device if device is not None else "cuda")
    ctx = _views.device_context(device)
    with ctx.lock:
        ctx.check(L.lib.flex_synchronize(ctx.handle))
