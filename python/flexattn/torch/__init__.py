"""The PyTorch drop-in: `from flexattn.torch import flex_attention,
create_block_mask` in place of torch.nn.attention.flex_attention.

Mods are callables written for torch (translated once to mod text, see
flexattn._trace) or mod text. CPU tensors run on the library's CPU backend,
CUDA tensors on its CUDA backend, in place and on torch's current stream.
"""
from ._api import flex_attention, synchronize  # noqa: F401
from ._block_mask import (BlockMask, _DEFAULT_SPARSE_BLOCK_SIZE, and_masks,  # noqa: F401
                          create_block_mask, noop_mask, or_masks)

__all__ = ["flex_attention", "create_block_mask", "BlockMask", "and_masks", "or_masks",
           "noop_mask", "synchronize"]
