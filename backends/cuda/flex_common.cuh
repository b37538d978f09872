/*
 * flex_common.cuh: what every attention kernel of this backend shares,
 * forward and backward alike: the parameter block of the forward (its
 * head, struct flex_gpu_fwd_params, is defined once for the host and the
 * kernels in flex_gpu_params.h; the backward and the decode embed the
 * block whole) and the walk over the block mask's kv-major lists of one
 * query row of blocks. Included after vendor.cuh, flex_gpu_params.h, the
 * configuration block and the emitted mods.
 */


/* ---- parameters: the head's members, then the mods' buffers ---- */
struct flex_fwd_params {
    FLEX_GPU_FWD_FIELDS /* struct flex_gpu_fwd_params: q, k, v, out, lse, mask, dims, scale */
    flex_buffers bufs;
};
/* The host writes the buffers right after the head (gpu_host.c). */
static_assert(sizeof(flex_fwd_params) ==
                  sizeof(flex_gpu_fwd_params) + FLEX_GPU_BUFFERS_BYTES(FLEX_NUM_BUFFERS),
              "struct flex_fwd_params: the mods' buffers follow the head unpadded");

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