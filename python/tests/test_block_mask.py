"""BlockMask matches torch's: the kv-block tensors, to_dense, sparsity and
the picture; from_kv_blocks takes torch's lists and gives the same results."""

import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn.torch as fa
from mods import MODS


def _both(name, B=2, H=3, Lq=150, Lkv=128, block=32):
    mask_mod = MODS[name](B, H, Lq, Lkv, "cpu")[1]
    ours = fa.create_block_mask(mask_mod, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=block)
    theirs = torch_flex.create_block_mask(mask_mod, B, H, Lq, Lkv, device="cpu",
                                          BLOCK_SIZE=block)
    return mask_mod, ours, theirs


def test_same_blocks_as_torch():
    for name in ["causal", "document_causal", "sliding_window", "per_head_mask", "flamingo",
                 "gym_prefix_lm_per_batch"]:
        _, ours, theirs = _both(name)
        assert ours.shape == theirs.shape, name
        assert torch.equal(ours.to_dense(), theirs.to_dense().to(torch.int32)), name
        # torch's sparsity(): the share of blocks not computed (torch 2.11
        # weighed blocks by area instead; the count does not depend on it)
        total_blocks = theirs.kv_num_blocks.numel() * theirs.kv_indices.shape[-1]
        computed = (theirs.kv_num_blocks.sum() + theirs.full_kv_num_blocks.sum()).item()
        assert abs(ours.sparsity() - 100 * (1 - computed / total_blocks)) < 1e-9, name
        total = ours.kv_num_blocks + ours.full_kv_num_blocks
        assert torch.equal(total, (theirs.kv_num_blocks + theirs.full_kv_num_blocks)
                           .to(torch.int32)), name
        # torch calls a block cut by the end of the sequence partial; the
        # library judges it on its valid part, so it may call it full
        assert torch.all(ours.full_kv_num_blocks >= theirs.full_kv_num_blocks), name
        Lq, Lkv = ours.seq_lengths
        inner = Lq // 32  # q-block rows that the end of the sequence does not cut
        if Lkv % 32 == 0:
            assert torch.equal(ours.kv_num_blocks[..., :inner],
                               theirs.kv_num_blocks[..., :inner].to(torch.int32)), name
        # the listed blocks, in ascending order, first
        for n, a, f, g in zip(ours.kv_num_blocks.flatten(), ours.kv_indices.flatten(0, 2),
                              ours.full_kv_num_blocks.flatten(),
                              ours.full_kv_indices.flatten(0, 2)):
            listed = torch.cat([a[:n], g[:f]])
            assert len(set(listed.tolist())) == len(listed), name
            assert torch.all(a[:n][1:] > a[:n][:-1]) and torch.all(g[:f][1:] > g[:f][:-1])


def test_picture():
    _, ours, _ = _both("causal", B=1, H=1, Lq=64, Lkv=64, block=16)
    text = str(ours)
    assert text.startswith("BlockMask(shape=(1, 1, 64, 64), sparsity=37.50%")
    assert "░░\n██░░\n████░░\n██████░░" in text


def test_from_kv_blocks_matches_create_block_mask():
    mask_mod, ours, theirs = _both("document_causal", B=1, H=1, Lq=96, Lkv=96, block=16)
    rebuilt = fa.BlockMask.from_kv_blocks(theirs.kv_num_blocks, theirs.kv_indices,
                                          theirs.full_kv_num_blocks, theirs.full_kv_indices,
                                          BLOCK_SIZE=16, mask_mod=mask_mod,
                                          seq_lengths=(96, 96))
    assert torch.equal(rebuilt.to_dense(), ours.to_dense())
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    a = fa.flex_attention(q, k, v, block_mask=ours)
    b = fa.flex_attention(q, k, v, block_mask=rebuilt)
    assert torch.allclose(a, b, atol=1e-6)
    # without the partial blocks' mask mod, partial blocks attend everywhere
    no_mod = fa.BlockMask.from_kv_blocks(theirs.kv_num_blocks, theirs.kv_indices,
                                         theirs.full_kv_num_blocks, theirs.full_kv_indices,
                                         BLOCK_SIZE=16, seq_lengths=(96, 96))
    assert not torch.allclose(fa.flex_attention(q, k, v, block_mask=no_mod), a, atol=1e-3)


def test_mask_buffers_changed_in_place_are_seen():
    """The C mask is cached by the tensors' versions: an in-place change of a
    mask mod's captured tensor is not served a stale mask."""
    doc = torch.zeros(64, dtype=torch.int32)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]
    bm = fa.BlockMask.from_kv_blocks(torch.ones(1, 1, 4, dtype=torch.int32),
                                     torch.arange(4, dtype=torch.int32).expand(1, 1, 4, 4)
                                     .contiguous(), BLOCK_SIZE=16, mask_mod=same_doc,
                                     seq_lengths=(64, 64))
    q, k, v = (torch.randn(1, 1, 64, 8) for _ in range(3))
    before = fa.flex_attention(q, k, v, block_mask=bm)
    doc[32:] = 1
    after = fa.flex_attention(q, k, v, block_mask=bm)
    assert not torch.allclose(before, after, atol=1e-3)
