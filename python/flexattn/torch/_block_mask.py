"""BlockMask, create_block_mask and the mask combinators, as in
torch.nn.attention.flex_attention.

A BlockMask holds torch's kv-block tensors (kv_num_blocks, kv_indices,
full_kv_num_blocks, full_kv_indices) and its mask mod, translated once to mod
text with its captured tensors. The library's block mask behind it lives in
the op's cache (see _op.c_block_mask): create_block_mask puts the one it
built there, and a mask made any other way is rebuilt from the kv-block
lists on first use on a device.
"""

import torch

from .. import _library as L
from .. import _runtime
from .._trace import trace_mod
from . import _op, _views

_DEFAULT_SPARSE_BLOCK_SIZE = 128


def noop_mask(b, h, q_idx, kv_idx):
    """Attends everywhere (torch's noop_mask)."""
    return b.new_ones(size=(), dtype=torch.bool, device=b.device)


def and_masks(*mask_mods):
    """A mask mod true where every one of mask_mods is."""
    if not all(callable(m) for m in mask_mods):
        raise RuntimeError(f"All inputs should be callable mask_mods: {mask_mods}")

    def and_mask(b, h, q_idx, kv_idx):
        result = b.new_ones(size=(), dtype=torch.bool, device=b.device)
        for mod in mask_mods:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    return and_mask


def or_masks(*mask_mods):
    """A mask mod true where any one of mask_mods is."""
    if not all(callable(m) for m in mask_mods):
        raise RuntimeError(f"All inputs should be callable mask_mods: {mask_mods}")

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros(size=(), dtype=torch.bool, device=b.device)
        for mod in mask_mods:
            result = result | mod(b, h, q_idx, kv_idx)
        return result

    return or_mask


def _translate_mask(mask_mod):
    """(spec, captured tensors) of a mask mod: a callable or mod text."""
    if mask_mod is None:
        mask_mod = noop_mask
    if isinstance(mask_mod, str):
        return f"{L.MOD_MASK}||{mask_mod}", []
    traced = trace_mod(mask_mod, L.MOD_MASK)
    return traced.spec, traced.tensors


def _block_sizes(BLOCK_SIZE):
    if isinstance(BLOCK_SIZE, int):
        return BLOCK_SIZE, BLOCK_SIZE
    q_block, kv_block = BLOCK_SIZE
    return int(q_block), int(kv_block)


class BlockMask:
    """The block-sparse structure of a mask for (B, H, Q_LEN, KV_LEN), in the
    layout of torch's BlockMask. Build it with create_block_mask or
    BlockMask.from_kv_blocks."""

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 BLOCK_SIZE, mask_mod, seq_lengths, spec, buffers):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.BLOCK_SIZE = BLOCK_SIZE
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        self.seq_lengths = seq_lengths
        self._spec = spec
        self._buffers = buffers

    # --- what the op takes
    def _tensors(self):
        if self.full_kv_num_blocks is None:
            return [self.kv_num_blocks, self.kv_indices]
        return [self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices]

    def _info(self):
        B, H = self.kv_num_blocks.shape[:2]
        return [int(B), int(H), int(self.seq_lengths[0]), int(self.seq_lengths[1]),
                int(self.BLOCK_SIZE[0]), int(self.BLOCK_SIZE[1])]

    def _cmask(self):
        ctx = _views.device_context(self.kv_num_blocks.device)
        return _op.c_block_mask(ctx, self._tensors(), self._buffers, self._spec, self._info())

    # --- torch's BlockMask interface
    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None,
                       full_kv_indices=None, BLOCK_SIZE=_DEFAULT_SPARSE_BLOCK_SIZE, mask_mod=None,
                       seq_lengths=None, **_ignored):
        """A BlockMask from kv-block lists in torch's layout: per (b, h, q
        block) row, kv_num_blocks partial blocks listed first in kv_indices
        (and the full ones in the full_ pair)."""
        if kv_indices.dim() < 2 or kv_num_blocks.dim() != kv_indices.dim() - 1:
            raise RuntimeError("BlockMask must have kv_indices of rank one more than "
                               "kv_num_blocks")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise RuntimeError("full_kv_num_blocks and full_kv_indices must be both provided "
                               "or omitted")
        q_block, kv_block = _block_sizes(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * q_block, kv_indices.shape[-1] * kv_block)
        spec, buffers = _translate_mask(mask_mod)
        return cls(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                   (q_block, kv_block), mask_mod, tuple(seq_lengths), spec, buffers)

    @property
    def shape(self):
        B, H = self.kv_num_blocks.shape[:2]
        return (int(B), int(H), *self.seq_lengths)

    def sparsity(self):
        """Percentage of blocks that are empty (torch's BlockMask.sparsity)."""
        return float(self._cmask().sparsity())

    def to_dense(self):
        """(B, H, num_q_blocks, num_kv_blocks) int32: 1 where a block is
        partial or full, as torch's to_dense."""
        return (self._classes() != L.BLOCK_EMPTY).to(torch.int32)

    def _classes(self):
        s = self._cmask().shape()
        classes = torch.empty((s.B, s.H, s.num_q_blocks, s.num_kv_blocks), dtype=torch.uint8)
        self._cmask().to_dense(classes.data_ptr())
        return classes

    def to_string(self, grid_size=(20, 20), limit=4):
        B, H = self.kv_num_blocks.shape[:2]
        cmask = self._cmask()
        size = max(grid_size) if isinstance(grid_size, tuple) else int(grid_size)
        lines = []
        count = 0
        for b in range(int(B)):
            for h in range(int(H)):
                if count >= limit:
                    lines.append("...")
                    return "\n".join(lines)
                lines.append(f"({b}, {h})")
                picture = cmask.format(b, h, size).rstrip("\n").split("\n")
                # the library's header lines carry what __str__ prints itself
                lines.extend(p for p in picture if not p.startswith(("BlockMask(", "(b=")))
                count += 1
        return "\n".join(lines)

    def __str__(self):
        return (f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n"
                f"{self.to_string()}\n)")

    __repr__ = __str__

    def to(self, device):
        moved = [t.to(device) if t is not None else None for t in
                 (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                  self.full_kv_indices)]
        return BlockMask(*moved, self.BLOCK_SIZE, self.mask_mod, self.seq_lengths, self._spec,
                         [t.to(device) for t in self._buffers])

    def as_tuple(self):
        return (*self.seq_lengths, self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                self.full_kv_indices, *self.BLOCK_SIZE, self.mask_mod)


def _lists_from_classes(classes, wanted):
    """Torch's (num_blocks, indices) for the blocks of class `wanted`: the
    listed blocks first in ascending order, then the others."""
    hit = (classes == wanted)
    num = hit.sum(-1, dtype=torch.int32)
    order = torch.argsort(hit.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, order.to(torch.int32)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda",
                      BLOCK_SIZE=_DEFAULT_SPARSE_BLOCK_SIZE, _compile=False):
    """The BlockMask of mask_mod (a callable written for torch, or mod text)
    for (B, H, Q_LEN, KV_LEN); B or H of None or 1 broadcast."""
    device = torch.device(device)
    q_block, kv_block = _block_sizes(BLOCK_SIZE)
    spec, buffers = _translate_mask(mask_mod)
    kind, text, decls = _op.parse_spec(spec)
    ctx = _views.device_context(device)
    mod = _runtime.compiled_mod(kind, text, decls, ctx, shared=False)
    views, read = _views.buffer_views(buffers)
    with ctx.lock:
        mod.bind(ctx, views)
    Bm, Hm = (B or 1), (H or 1)
    cmask = _runtime.CBlockMask.create(ctx, mod, Bm, Hm, Q_LEN, KV_LEN, q_block, kv_block,
                                       keep_alive=read)
    s = cmask.shape()
    classes = torch.empty((s.B, s.H, s.num_q_blocks, s.num_kv_blocks), dtype=torch.uint8)
    cmask.to_dense(classes.data_ptr())
    if (s.B, s.H) != (Bm, Hm):
        classes = classes.expand(Bm, Hm, -1, -1).contiguous()
        cmask = None  # broadcast by the library; torch's tensors are per (b, h)
    kv_num, kv_idx = _lists_from_classes(classes, L.BLOCK_PARTIAL)
    full_num, full_idx = _lists_from_classes(classes, L.BLOCK_FULL)
    tensors = [t.to(device) for t in (kv_num, kv_idx, full_num, full_idx)]
    mask = BlockMask(*tensors, (q_block, kv_block), mask_mod, (Q_LEN, KV_LEN), spec, buffers)
    if cmask is not None:
        _op.register_mask(ctx, mask._tensors(), buffers, spec, mask._info(), cmask)
    return mask
