"""The mods the parity tests run: every seed pattern (docs/seeds.md) and mods
from attention-gym and from PyTorch's own flex_attention tests, written as
their authors wrote them, for torch.

Each entry is a factory `make(B, H, Lq, Lkv, device)` that returns
(score_mod or None, mask_mod or None, learnable): the mods close over the
tensors they read, made for those sizes; `learnable` lists the captured
float tensors whose gradients the tests check.
"""

import math

import torch

MODS = {}


def mod(name):
    def register(make):
        MODS[name] = make
        return make
    return register


def _doc_ids(length, parts, device):
    """Document ids of `length` tokens cut into `parts` uneven documents."""
    cuts = sorted({int(length * (i / parts) ** 1.3) for i in range(1, parts)})
    ids = torch.zeros(length, dtype=torch.int32, device=device)
    for c in cuts:
        ids[c:] += 1
    return ids


# ---------------------------------------------------------------- seed patterns


@mod("noop")
def _noop(B, H, Lq, Lkv, device):
    def noop(score, b, h, q_idx, kv_idx):
        return score
    return noop, None, []


@mod("causal")
def _causal(B, H, Lq, Lkv, device):
    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return None, causal_mask, []


@mod("causal_score")
def _causal_score(B, H, Lq, Lkv, device):
    def causal_bias(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))
    return causal_bias, None, []


@mod("checkerboard")
def _checkerboard(B, H, Lq, Lkv, device):
    def checkerboard(score, batch, head, q_idx, kv_idx):
        score = torch.where(torch.abs(kv_idx - q_idx) % 1 == 0, score * 0.5, score)
        score = torch.where(torch.abs(kv_idx - q_idx) % 2 == 0, score * 2.0, score)
        return score
    return checkerboard, None, []


@mod("sliding_window")
def _sliding_window(B, H, Lq, Lkv, device):
    SLIDING_WINDOW = 24

    def sliding_window_causal_mask(b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        windowed_mask = q_idx - kv_idx <= SLIDING_WINDOW
        return causal_mask & windowed_mask
    return None, sliding_window_causal_mask, []


@mod("prefix_lm")
def _prefix_lm(B, H, Lq, Lkv, device):
    PREFIX_LENGTH = 20

    def prefix_lm_causal_mask(b, h, q_idx, kv_idx):
        prefix_mask = kv_idx <= PREFIX_LENGTH
        causal_mask = q_idx >= kv_idx
        return prefix_mask | causal_mask
    return None, prefix_lm_causal_mask, []


@mod("document_causal")
def _document_causal(B, H, Lq, Lkv, device):
    document_id = _doc_ids(max(Lq, Lkv), 4, device)

    def document_causal_mask(b, h, q_idx, kv_idx):
        causal_mask = q_idx >= kv_idx
        document_mask = document_id[q_idx] == document_id[kv_idx]
        return causal_mask & document_mask
    return None, document_causal_mask, []


@mod("document_masking")
def _document(B, H, Lq, Lkv, device):
    document_id = _doc_ids(max(Lq, Lkv), 3, device).long()

    def document_masking(score, b, h, q_idx, kv_idx):
        return torch.where(document_id[q_idx] == document_id[kv_idx], score, -float("inf"))
    return document_masking, None, []


@mod("sasa")
def _sasa(B, H, Lq, Lkv, device):
    W, WINDOW = 8, 2

    def sasa_mask(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // W, q_idx % W
        kv_x, kv_y = kv_idx // W, kv_idx % W
        horizontal_mask = (q_x - kv_x).abs() <= WINDOW
        vertical_mask = (q_y - kv_y).abs() <= WINDOW
        return horizontal_mask & vertical_mask
    return None, sasa_mask, []


@mod("natten")
def _natten(B, H, Lq, Lkv, device):
    H_, W_, K_H, K_W = 12, 12, 5, 3

    def get_x_y(idx):
        return idx // W_, idx % W_

    def natten_mask(b, h, q_idx, kv_idx):
        q_x, q_y = get_x_y(q_idx)
        kv_x, kv_y = get_x_y(kv_idx)
        kernel_x = q_x.clamp(K_W // 2, (W_ - 1) - K_W // 2)
        kernel_y = q_y.clamp(K_H // 2, (H_ - 1) - K_H // 2)
        hori_mask = (kernel_x - kv_x).abs() <= K_W // 2
        vert_mask = (kernel_y - kv_y).abs() <= K_H // 2
        return hori_mask & vert_mask
    return None, natten_mask, []


@mod("alibi_closure")
def _alibi_closure(B, H, Lq, Lkv, device):
    alibi_bias = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=device)

    def alibi_and_causal_closure(score, b, h, q_idx, kv_idx):
        bias = alibi_bias[h] * (q_idx - kv_idx)
        return score + bias
    return alibi_and_causal_closure, None, []


@mod("alibi_functional")
def _alibi_functional(B, H, Lq, Lkv, device):
    def alibi_and_causal_functional(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / H))
        bias = (q_idx - kv_idx) * scale
        return score + bias

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return alibi_and_causal_functional, causal_mask, []


@mod("softcap")
def _softcap(B, H, Lq, Lkv, device):
    softcap = 2.5

    def soft_cap(score, b, h, q_idx, kv_idx):
        score = score / softcap
        score = torch.tanh(score)
        score = score * softcap
        return score
    return soft_cap, None, []


@mod("jagged_causal")
def _jagged(B, H, Lq, Lkv, device):
    lengths = [5, 17, 9, 30, 11]
    total = max(Lq, Lkv)
    lengths.append(max(1, total - sum(lengths)))
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64,
                           device=device)
    seq_idx = torch.zeros(int(offsets[-1]), dtype=torch.int64, device=device)
    seq_idx[offsets[1:-1]] = 1
    seq_idx = seq_idx.cumsum(0)

    def njt_causal_mask(b, h, q_idx, kv_idx):
        q_nested = q_idx - offsets[seq_idx[q_idx]]
        kv_nested = kv_idx - offsets[seq_idx[kv_idx]]
        is_same_sequence = seq_idx[q_idx] == seq_idx[kv_idx]
        return (q_nested >= kv_nested) & is_same_sequence
    return None, njt_causal_mask, []


@mod("flamingo")
def _flamingo(B, H, Lq, Lkv, device):
    n_img = 3
    per = max(1, Lkv // n_img)
    image_boundaries = torch.clamp(torch.arange(Lkv, device=device) // per, max=n_img - 1)
    step = max(1, Lq // 4)
    intervals = torch.tensor([[0, 2 * step], [step, 3 * step], [2 * step, Lq]],
                             dtype=torch.int64, device=device)

    def vision_x_attention_mask(b, h, q_idx, kv_idx):
        image_idx = image_boundaries[kv_idx]
        interval = intervals[image_idx]
        return (q_idx >= interval[0]) & (q_idx < interval[1])
    return None, vision_x_attention_mask, []


@mod("logit_clip")
def _logit_clip(B, H, Lq, Lkv, device):
    clip = torch.linspace(0.5, 2.0, H, device=device)

    def per_head_clip(score, b, h, q_idx, kv_idx):
        return torch.clamp(score, -clip[h], clip[h])
    return per_head_clip, None, []


# ---------------------------------------------------------------- PyTorch's flex tests


@mod("times_two")
def _times_two(B, H, Lq, Lkv, device):
    def _times_two(score, b, h, m, n):
        return score * 2
    return _times_two, None, []


@mod("squared")
def _squared(B, H, Lq, Lkv, device):
    def _squared(score, b, h, m, n):
        return score * score
    return _squared, None, []


@mod("head_offset")
def _head_offset(B, H, Lq, Lkv, device):
    head_offset = torch.rand(H, device=device)

    def score_mod(score, b, h, m, n):
        return score * head_offset[h]
    return score_mod, None, []


@mod("trig")
def _trig(B, H, Lq, Lkv, device):
    def _trig(score, b, h, m, n):
        return torch.sin(torch.cos(score)) + torch.tan(b)
    return _trig, None, []


@mod("trig2")
def _trig2(B, H, Lq, Lkv, device):
    def _trig2(score, b, h, m, n):
        cos_score = torch.cos(score)
        sin_score = torch.sin(score)
        z = cos_score * sin_score * torch.tan(b)
        return z
    return _trig2, None, []


@mod("rel_bias")
def _rel_bias(B, H, Lq, Lkv, device):
    def _rel_bias(score, b, h, m, n):
        return score + (m - n)
    return _rel_bias, None, []


@mod("rel_causal")
def _rel_causal(B, H, Lq, Lkv, device):
    def _rel_causal(score, b, h, m, n):
        return torch.where(m <= n, score + (m - n), float("-inf"))
    return _rel_causal, None, []


@mod("inverse_causal")
def _inverse_causal(B, H, Lq, Lkv, device):
    def _inverse_causal(score, b, h, m, n):
        return torch.where(m <= n, score, float("-inf"))
    return _inverse_causal, None, []


@mod("windowed")
def _windowed(B, H, Lq, Lkv, device):
    offset = 7

    def score_mod(score, b, h, q, kv):
        return torch.where(q + offset >= kv, score, float("-inf"))
    return score_mod, None, []


@mod("generate_alibi_bias")
def _gen_alibi(B, H, Lq, Lkv, device):
    num_heads = H

    def score_mod(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / num_heads))
        return score + (kv_idx - q_idx) * scale
    return score_mod, None, []


@mod("learnable_rel_bias")
def _learnable_rel_bias(B, H, Lq, Lkv, device):
    bias = (torch.randn(H, Lq + Lkv, device=device) * 0.5).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + Lkv]
    return score_mod, None, [bias]


@mod("learnable_head_scale")
def _learnable_head_scale(B, H, Lq, Lkv, device):
    head_scale = (torch.rand(H, device=device) + 0.5).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * head_scale[h]
    return score_mod, None, [head_scale]


@mod("learnable_bias_3d")
def _learnable_bias_3d(B, H, Lq, Lkv, device):
    bias = (torch.randn(B, H, Lkv, device=device) * 0.3).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]
    return score_mod, None, [bias]


# ---------------------------------------------------------------- attention-gym


@mod("gym_tanh_softcap_causal")
def _gym_softcap(B, H, Lq, Lkv, device):
    soft_cap = 3.0

    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * torch.tanh(score / soft_cap)

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return tanh_softcap, causal_mask, []


@mod("gym_dilated_sliding_window")
def _gym_dilated(B, H, Lq, Lkv, device):
    window_size, dilation = 20, 3

    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        in_window = (diff >= 0) & (diff < window_size)
        is_dilated = (diff % dilation) == 0
        return in_window & is_dilated
    return None, dilated_sliding_window, []


@mod("gym_prefix_lm_per_batch")
def _gym_prefix_per_batch(B, H, Lq, Lkv, device):
    prefix_lengths = torch.tensor([3 + 11 * i for i in range(B)], device=device)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix_lengths[b]) | (q_idx >= kv_idx)
    return None, prefix_lm, []


@mod("gym_padding_mask")
def _gym_padding(B, H, Lq, Lkv, device):
    lengths = torch.tensor([Lkv - 7 * i - 1 for i in range(B)], device=device)

    def padding_mask(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]
    return None, padding_mask, []


@mod("gym_and_masks_doc_sliding")
def _gym_and(B, H, Lq, Lkv, device):
    from flexattn.torch import and_masks
    document_id = _doc_ids(max(Lq, Lkv), 3, device)

    def doc_mask(b, h, q_idx, kv_idx):
        return document_id[q_idx] == document_id[kv_idx]

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= 16) & (q_idx >= kv_idx)
    return None, and_masks(doc_mask, sliding), []


@mod("gym_or_masks_prefix_causal")
def _gym_or(B, H, Lq, Lkv, device):
    from flexattn.torch import or_masks

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < 10

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return None, or_masks(prefix, causal), []


@mod("gym_doc_mask_mod_offsets")
def _gym_doc_offsets(B, H, Lq, Lkv, device):
    # attention-gym's generate_doc_mask_mod: an inner mask in each document's
    # own coordinates.
    total = max(Lq, Lkv)
    lengths = [total // 3, total // 4, total - total // 3 - total // 4]
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32,
                           device=device)
    counts = torch.tensor(lengths, device=device)
    document_id = torch.repeat_interleave(torch.arange(3, device=device), counts)

    def inner(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 12)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        q_logical = q_idx - offsets[document_id[q_idx]]
        kv_logical = kv_idx - offsets[document_id[kv_idx]]
        inner_mask = inner(b, h, q_logical, kv_logical)
        return same_doc & inner_mask
    return None, doc_mask_mod, []


@mod("gym_tiled_natten")
def _gym_tiled_natten(B, H, Lq, Lkv, device):
    W, H_, K_W, K_H, T_W, T_H = 8, 8, 3, 3, 4, 4

    def get_x_y_tiled(idx):
        t_id = idx // (T_W * T_H)
        t_x, t_y = t_id // (W // T_W), t_id % (W // T_W)
        t_offset = idx % (T_W * T_H)
        i_x, i_y = t_offset // T_H, t_offset % T_H
        return t_x * T_W + i_x, t_y * T_H + i_y

    def natten_mask_tiled(b, h, q, kv):
        q_x, q_y = get_x_y_tiled(q)
        kv_x, kv_y = get_x_y_tiled(kv)
        kernel_x = q_x.clamp(K_W // 2, (W - 1) - K_W // 2)
        kernel_y = q_y.clamp(K_H // 2, (H_ - 1) - K_H // 2)
        hori_mask = (kernel_x - kv_x).abs() <= K_W // 2
        vert_mask = (kernel_y - kv_y).abs() <= K_H // 2
        return hori_mask & vert_mask
    return None, natten_mask_tiled, []


@mod("gym_morton_bits")
def _gym_morton(B, H, Lq, Lkv, device):
    # attention-gym's Morton-order NATTEN decodes a position's bits
    def morton_decode(v):
        v = v & 0x55555555
        v = (v | (v >> 1)) & 0x33333333
        v = (v | (v >> 2)) & 0x0F0F0F0F
        v = (v | (v >> 4)) & 0x00FF00FF
        return v

    def morton_mask(b, h, q_idx, kv_idx):
        qx, kx = morton_decode(q_idx), morton_decode(kv_idx)
        qy, ky = morton_decode(q_idx >> 1), morton_decode(kv_idx >> 1)
        return ((qx - kx).abs() <= 2) & ((qy - ky).abs() <= 2)
    return None, morton_mask, []


@mod("gym_t5_bucketed_bias")
def _gym_t5(B, H, Lq, Lkv, device):
    num_buckets, max_distance = 8, 32
    table = (torch.randn(num_buckets, H, device=device) * 0.5).requires_grad_()

    def bucket(relative_position):
        n = -relative_position
        n = torch.clamp(n, min=0)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        val_if_large = max_exact + (
            torch.log(n.float() / max_exact + 1e-6) / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)).long()
        val_if_large = torch.clamp(val_if_large, max=num_buckets - 1)
        return torch.where(is_small, n, val_if_large)

    def t5_bias(score, b, h, q_idx, kv_idx):
        return score + table[bucket(kv_idx - q_idx), h]
    return t5_bias, None, [table]


@mod("gym_exp_decay")
def _gym_decay(B, H, Lq, Lkv, device):
    gamma = 0.07

    def decay(score, b, h, q_idx, kv_idx):
        return score - gamma * (q_idx - kv_idx).abs().float()
    return decay, None, []


@mod("gym_sigmoid_gate")
def _gym_sigmoid(B, H, Lq, Lkv, device):
    gate = torch.randn(H, device=device).requires_grad_()

    def gated(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(gate[h]) + (1 - torch.sigmoid(gate[h])) * 0.5
    return gated, None, [gate]


@mod("gym_bool_mask_buffer")
def _gym_bool_buffer(B, H, Lq, Lkv, device):
    g = torch.Generator().manual_seed(5)
    allowed = (torch.rand(Lq, Lkv, generator=g) < 0.6).to(device)

    def from_dense(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]
    return None, from_dense, []


@mod("gym_softcap_plus_alibi_causal")
def _gym_combo(B, H, Lq, Lkv, device):
    slopes = torch.tensor([1 / 2 ** (i + 1) for i in range(H)], device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        s = 4.0 * torch.tanh(score / 4.0)
        return s + slopes[h] * (kv_idx - q_idx)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 40)
    return score_mod, mask_mod, []


@mod("per_head_mask")
def _per_head_mask(B, H, Lq, Lkv, device):
    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= 8 * (h + 1) + 4 * b)
    return None, per_head, []


@mod("clamp_and_minimum")
def _clamp_min(B, H, Lq, Lkv, device):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.maximum(score.clamp(-1.5, 1.5), torch.minimum(score, (q_idx % 3).float()))
    return score_mod, None, []


@mod("fmin_fmax_nan")
def _fmin_fmax(B, H, Lq, Lkv, device):
    # torch.fmin / fmax take the other operand where one is NaN
    def score_mod(score, b, h, q_idx, kv_idx):
        hole = torch.where((q_idx + kv_idx) % 7 == 0, float("nan"), 0.25 * score)
        return torch.fmax(score, hole) - torch.fmin(hole, 0.5 * score)
    return score_mod, None, []


@mod("rel_bias_true_division")
def _rel_div(B, H, Lq, Lkv, device):
    # torch's / on int index tensors is true division
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) / 16
    return score_mod, None, []
