/*
 * flex_common.cuh: what every attention kernel of this backend shares,
 * forward and backward alike: the parameter block of the forward (the host
 * mirrors its layout in cuda_backend.c; the backward embeds it whole) and
 * the walk over the block mask's kv-major lists of one query row of blocks.
 * Included after vendor.cuh, the configuration block and the emitted mods.
 */


/* ---- parameters (the host mirrors this layout in cuda_backend.c) ---- */
struct flex_fwd_params {
    const void *q, *k, *v;
    void *out;
    float *lse;
    const int *full_off, *full_idx, *part_off, *part_idx;
    const int *row_order; /* mask q-block rows, heaviest first; NULL: natural order */
    /* Partial blocks as bit masks (flex_partial_bits.cuh; NULL without):
     * per (plane, partial list entry) the word offset of its bit block in
     * bits, and the mask mod's bounds bits of the kernel that made them. */
    const int *bit_words;
    const unsigned *bits, *bits_oob;
    long long q_sb, q_sh, q_ss;
    long long k_sb, k_sh, k_ss;
    long long v_sb, v_sh, v_ss;
    long long o_sb, o_sh, o_ss;
    long long l_sb, l_sh, l_ss;
    int B, Hq, Hkv, Lq, Lkv, D, Dv;
    int mask_B, mask_H, mask_nq, mask_nk, mask_qblock, mask_kvblock;
    int dense;         /* 1: no block mask, every kv block of mask_kvblock is full */
    int tiles_per_row; /* kernel q-tiles per mask q-block */
    int head_group;    /* tile order (flex_tile_of); 0: (batch, head) fastest */
    /* bit planes over b and h (B or 1, Hq or 1), partial list entries per
     * plane, words per row of a bit block */
    int bit_planes_b, bit_planes_h, bit_entries, bit_row_words;
    float scale, scale_log2;
    flex_buffers bufs;
};

#define FLEX_LOG2E 1.4426950408889634f
#define FLEX_LN2   0.6931471805599453f

/* Locates the kv-block lists of one query tile: offsets into the mask's
 * index arrays rather than pointers (fewer registers live across the walk). */
struct flex_kv_walk {
    int n_full, n_part;
    int full0, part0; /* first entries in full_idx / part_idx; -1: dense */
};

static FLEX_DEVICE_INLINE flex_kv_walk flex_walk_for(const flex_fwd_params &p, int b, int h,
                                                     int mrow) {
    flex_kv_walk w;
    if (p.dense) {
        w.n_full = p.mask_nk;
        w.n_part = 0;
        w.full0 = -1;
        w.part0 = 0;
        return w;
    }
    const int mb = p.mask_B > 1 ? b : 0, mh = p.mask_H > 1 ? h : 0;
    const long long row = ((long long)mb * p.mask_H + mh) * p.mask_nq + mrow;
    const int f0 = p.full_off[row], f1 = p.full_off[row + 1];
    const int p0 = p.part_off[row], p1 = p.part_off[row + 1];
    w.n_full = f1 - f0;
    w.n_part = p1 - p0;
    w.full0 = f0;
    w.part0 = p0;
    return w;
}

/* kv block index of the i-th block of the walk (full ones first). */
static FLEX_DEVICE_INLINE int flex_walk_block(const flex_fwd_params &p, const flex_kv_walk &w,
                                              int i, bool &partial) {
    if (i < w.n_full) {
        partial = false;
        return w.full0 >= 0 ? p.full_idx[w.full0 + i] : i;
    }
    partial = true;
    return p.part_idx[w.part0 + i - w.n_full];
}