/*
 * flex_backward.cuh: the block-sparse attention backward (dQ, dK, dV and
 * the gradients of float buffers the score mod reads).
 *
 * The host prepends vendor.cuh, flex_gpu_params.h, a configuration block, the emitted mods
 * (flex_mask_mod, flex_score_mod), the emitted derivative of the score mod
 * with its glue (flex_score_bwd, flex_scatter_grads; cuda_compile.c),
 * flex_common.cuh and flex_mma_sm80.cuh. Configuration macros:
 *   FLEX_ELEM_BF16 / FLEX_ELEM_F16 / FLEX_ELEM_F32   input and output dtype
 *   FLEX_DQ, FLEX_DV        head dims padded to a multiple of 64
 *   FLEX_WARPS              warps per CTA of the main kernel
 *   FLEX_BWD_BLOCK_M        query rows per step (divides the mask's q block)
 *   FLEX_VEC                1: rows are 16-byte aligned, copy with cp.async
 *   FLEX_GRAD_SLOTS         entries of flex_bwd_params.grads (at least 1)
 *   FLEX_BWD_PIPE           1: the next step's rows are copied during this one
 *   FLEX_BWD_EXP2           1: P by exp2 with log2(e) folded in (f16/bf16)
 *   FLEX_BWD_DQ_RED         1: dQ by red.global.add.v4.f32 (sm_90; D % 4 == 0)
 *   FLEX_BWD_KV_FASTEST     1: grid x = kv tiles, y = (batch, kv head)
 *   FLEX_BWD_WGMMA          1: flex_backward_sm90.cuh follows and brings the
 *                           main kernel (wgmma, sm_90a); the one here is
 *                           left out
 *   FLEX_BWD_GRAD_SMEM      f16/bf16: floats of the shared gradient region
 *                           (every gradient tensor's elements; the glue's
 *                           offsets are then row-major indices into it);
 *                           0: buffer gradients by global atomics
 *   FLEX_BWD_BITS           f16/bf16 main kernel: partial blocks read their
 *                           keep bits from the bit masks of
 *                           flex_partial_bits.cuh (placed before this file)
 *                           instead of evaluating the mask mod
 *
 * Three kernels, launched in this order on the caller's stream:
 *   flex_bwd_preprocess  delta = rowsum(dO * O) per query row, and the dQ
 *                        accumulator rows set to 0 (no memset call);
 *   flex_bwd_kernel      one CTA per (batch, kv head, kv tile): K and V of
 *                        the tile stay in shared memory, the query heads of
 *                        the GQA group and their q blocks named by the block
 *                        mask's q-major (transposed) lists are walked (full
 *                        blocks without the mask mod, partial ones with
 *                        it), P is recomputed from the forward's LSE, dK and
 *                        dV accumulate in registers and are stored once, dQ
 *                        is added to an fp32 accumulator with atomics, and
 *                        buffer gradients are added with atomics (with
 *                        FLEX_BWD_GRAD_SMEM: summed per CTA in shared
 *                        memory, each element added once at its end);
 *   flex_bwd_dq_store    the dQ accumulator -> dq in its dtype and strides.
 *
 * f16/bf16: the products run on mma.sync m16n8k16 (sm_80 and later, also
 * on sm_90) with fp32 accumulators. Each warp owns 16 kv rows of the tile:
 * Sᵀ = K Qᵀ and dPᵀ = V dOᵀ come out in the m16n8 accumulator layout with
 * kv rows and query columns, so P and dS pack straight into the A
 * fragments of dV += Pᵀ dO and dK += dSᵀ Q (as P does for P V in the
 * forward). dQ = dS K needs dS by query row: it goes through shared
 * memory (kv-major, read back transposed by ldmatrix), and the warps share
 * out the step's dQ in items of 16 rows by a slice of the columns. Q, dO,
 * lse and delta of the next step are copied with cp.async into a second
 * stage while a step computes (FLEX_BWD_PIPE).
 *
 * f32: the exact path, plain FMA, one warp per kv row, lanes splitting the
 * head dims; same walk, same accumulators.
 */

/* The backward's parameters: the members of the head (struct
 * flex_gpu_bwd_head, flex_gpu_params.h), the gradient tensors'
 * descriptors, then the forward's whole block with the mods' buffers. */
struct flex_bwd_params {
    FLEX_GPU_BWD_HEAD_FIELDS            /* dout, dq, dk, dv, delta, dq_acc, q-major lists */
    flex_buffer grads[FLEX_GRAD_SLOTS]; /* gradient tensors: data, buffer sizes, strides */
    flex_fwd_params f;                  /* q, k, v, out, lse, mask, dims, scale, mods' buffers */
};
/* The host writes the parts at these offsets (flex_gpu_bwd_blob). */
static_assert(sizeof(flex_bwd_params) ==
                  FLEX_GPU_BWD_FWD_AT(FLEX_GRAD_SLOTS) + sizeof(flex_fwd_params),
              "struct flex_bwd_params: the gradients and the forward block follow unpadded");

/* The q-major walk of one (batch, head, kv block): full q blocks first. */
struct flex_q_walk {
    int n_full, n_part;
    int full0, part0; /* first entries in qfull_idx / qpart_idx; -1: dense */
};

static FLEX_DEVICE_INLINE flex_q_walk flex_q_walk_for(const flex_bwd_params &bp, int b, int h,
                                                      int kb) {
    const flex_fwd_params &p = bp.f;
    flex_q_walk w;
    if (p.dense) {
        w.n_full = p.mask_nq;
        w.n_part = 0;
        w.full0 = -1;
        w.part0 = 0;
        return w;
    }
    const int mb = p.mask_B > 1 ? b : 0, mh = p.mask_H > 1 ? h : 0;
    const long long col = ((long long)mb * p.mask_H + mh) * p.mask_nk + kb;
    w.full0 = bp.qfull_off[col];
    w.n_full = bp.qfull_off[col + 1] - w.full0;
    w.part0 = bp.qpart_off[col];
    w.n_part = bp.qpart_off[col + 1] - w.part0;
    return w;
}

static FLEX_DEVICE_INLINE int flex_q_walk_block(const flex_bwd_params &bp, const flex_q_walk &w,
                                                int i, bool &partial) {
    if (i < w.n_full) {
        partial = false;
        return w.full0 >= 0 ? bp.qfull_idx[w.full0 + i] : i;
    }
    partial = true;
    return bp.qpart_idx[w.part0 + i - w.n_full];
}

/* Element i of a tensor of the kernel's dtype, as float. */
static FLEX_DEVICE_INLINE float flex_ld(const void *base, long long i) {
#if defined(FLEX_ELEM_BF16)
    return __int_as_float((int)((unsigned)((const flex_u16 *)base)[i] << 16));
#elif defined(FLEX_ELEM_F16)
    return flex_half_bits_to_float(((const flex_u16 *)base)[i]);
#else
    return ((const float *)base)[i];
#endif
}

static FLEX_DEVICE_INLINE void flex_st(void *base, long long i, float x) {
#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
    ((flex_u16 *)base)[i] = flex_to_elem(x);
#else
    ((float *)base)[i] = x;
#endif
}

/* ds of one score from ds' = p (dp - delta), the gradient of the modified
 * score: ds' dscore, and 0 where ds' is exactly 0 even if the mod's
 * derivative is infinite or NaN there (docs/backward.md). Without a score
 * mod dscore is 1 and ds is ds' itself, but for the sign of a zero (-0
 * where the select gave +0), which no gradient shows: every sum it enters
 * starts from +0. */
static FLEX_DEVICE_INLINE float flex_ds_of(float dsp, float dscore) {
#if FLEX_HAS_SCORE_MOD
    return dsp == 0.0f ? 0.0f : dsp * dscore;
#else
    (void)dscore;
    return dsp;
#endif
}

/* The gradient terms of one attended score: returns ds (flex_ds_of, not
 * yet multiplied by the scale) and adds the buffer gradients. */
static FLEX_DEVICE_INLINE float flex_score_grads(const flex_bwd_params &bp, float p, float dp,
                                                 float delta, float dscore,
                                                 const flex_grad_terms &terms) {
    const float dsp = p * (dp - delta);
#if FLEX_NUM_GRAD_LOADS > 0
    if (dsp != 0.0f) flex_scatter_grads(bp.grads, terms, dsp);
#else
    (void)bp;
    (void)terms;
#endif
    return flex_ds_of(dsp, dscore);
}

/* flex_score_grads without the buffer gradients. */
static FLEX_DEVICE_INLINE float flex_score_grads_only(float p, float dp, float delta, float dscore) {
    return flex_ds_of(p * (dp - delta), dscore);
}

#ifndef FLEX_BWD_GRAD_SMEM
#define FLEX_BWD_GRAD_SMEM 0
#endif

#if FLEX_BWD_GRAD_SMEM
/* Buffer gradients summed per CTA in shared memory (docs/decisions.md,
 * "Buffer gradients into small tables"): a relative-position table takes
 * the same few thousand elements from every score, and one global atomic
 * per score is what bounds the kernel. The region holds every gradient
 * tensor's elements in row-major order, slot after slot
 * (FLEX_BWD_GRAD_SMEM floats; the host checked the sum), after the main
 * kernel's tiles (flex_bwd_grad_region, defined beside the kernel). The
 * kernel zeroes it before its first step, whose barrier B orders that
 * before the first addition; the scores add into it with shared atomics
 * (flex_bwd_grad_smem_add, called by the glue's flex_scatter_grads at the
 * row-major index the glue's flex_grad_offset gives); after its last step
 * and a barrier it adds each nonzero element to the tensor once, at the
 * element's strided offset (flex_bwd_grad_flush). */

#if defined(FLEX_HIP)
#error "the shared gradient region is CUDA's only (the HIP backend sets no FLEX_BWD_GRAD_SMEM)"
#endif

/* The dynamic shared memory (every extern __shared__ array starts at its
 * base, the kernels' own declarations too). */
extern __shared__ __align__(16) unsigned char flex_bwd_dyn_smem[];

/* The region's shared-space address, after the main kernel's tiles (a
 * 32-bit address: a generic pointer into shared memory costs sm_90 a read
 * of the CTA's cluster id at every addition, and registers). */
static FLEX_DEVICE_INLINE flex_u32 flex_bwd_grad_region();

/* Elements of gradient tensor g (its sizes past its dims are 1). */
static FLEX_DEVICE_INLINE int flex_bwd_grad_numel(const flex_buffer &g) {
    return g.sizes[0] * g.sizes[1] * g.sizes[2] * g.sizes[3];
}

/* Where slot's elements start in the region (slot is a constant at every
 * call, so the loop is a sum of parameters). */
static FLEX_DEVICE_INLINE int flex_bwd_grad_base(const flex_buffer *grads, int slot) {
    int base = 0;
#pragma unroll
    for (int g = 0; g < FLEX_GRAD_SLOTS; g++)
        if (g < slot) base += flex_bwd_grad_numel(grads[g]);
    return base;
}

/* An addition to element index of slot. fp32 shared atomics have no
 * instruction of their own up to sm_100: ptxas makes this a compare-and-
 * swap loop (ATOMS.CAST.SPIN), one trip unless lanes collide. */
static FLEX_DEVICE_INLINE void flex_bwd_grad_smem_add(const flex_buffer *grads, int slot,
                                                      int index, float x) {
    const flex_u32 addr =
        flex_bwd_grad_region() + 4u * (flex_u32)(flex_bwd_grad_base(grads, slot) + index);
    asm volatile("red.shared.add.f32 [%0], %1;\n" ::"r"(addr), "f"(x));
}

template <int THREADS>
static FLEX_DEVICE_INLINE void flex_bwd_grad_zero(float *region, int tid) {
    for (int i = tid; i < FLEX_BWD_GRAD_SMEM; i += THREADS)
        region[i] = 0.0f;
}

/* The strided offset of row-major element i of g. */
static FLEX_DEVICE_INLINE long long flex_bwd_grad_strided(const flex_buffer &g, int i) {
    long long off = 0;
#pragma unroll
    for (int d = 3; d >= 0; d--) {
        off += (long long)(i % g.sizes[d]) * g.strides[d];
        i /= g.sizes[d];
    }
    return off;
}

/* The region's nonzero elements added to the gradient tensors, one global
 * atomic each (an element no score of the CTA touched stays 0 and costs
 * nothing). After a barrier that follows the CTA's last addition. */
template <int THREADS>
static FLEX_DEVICE_INLINE void flex_bwd_grad_flush(const flex_buffer *grads, const float *region,
                                                   int tid) {
    int base = 0;
#pragma unroll
    for (int g = 0; g < FLEX_GRAD_SLOTS; g++) {
        const int n = flex_bwd_grad_numel(grads[g]);
        for (int i = tid; i < n; i += THREADS) {
            const float x = region[base + i];
            if (x != 0.0f) atomicAdd((float *)grads[g].data + flex_bwd_grad_strided(grads[g], i), x);
        }
        base += n;
    }
}
#endif

/* One warp per query row: delta = rowsum(dO * O) and the row of the dQ
 * accumulator cleared. Grid (B * Hq, ceil(Lq / 4)), 128 threads. */
extern "C" __global__ void __launch_bounds__(128) flex_bwd_preprocess(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
    const int q = blockIdx.y * 4 + warp;
    if (q >= p.Lq) return;
    const long long o_row = b * p.o_sb + h * p.o_sh + (long long)q * p.o_ss;
    const long long d_row = b * bp.do_sb + h * bp.do_sh + (long long)q * bp.do_ss;
    float sum = 0.0f;
    for (int d = lane; d < p.Dv; d += 32)
        sum = fmaf(flex_ld(bp.dout, d_row + d), flex_ld(p.out, o_row + d), sum);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        sum += FLEX_SHFL_XOR(sum, off);
    const long long row = (long long)bh * p.Lq + q;
    if (lane == 0) bp.delta[row] = sum;
    if (bp.dq_acc)
        for (int d = lane; d < p.D; d += 32)
            bp.dq_acc[row * p.D + d] = 0.0f;
}

/* One warp per query row: dq = the accumulator, in dq's dtype and strides. */
extern "C" __global__ void __launch_bounds__(128) flex_bwd_dq_store(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
    const int q = blockIdx.y * 4 + warp;
    if (q >= p.Lq) return;
    const long long row = (long long)bh * p.Lq + q;
    const long long dst = b * bp.dq_sb + h * bp.dq_sh + (long long)q * bp.dq_ss;
    for (int d = lane; d < p.D; d += 32)
        flex_st(bp.dq, dst + d, bp.dq_acc[row * p.D + d]);
}

/* P in log2 units (the forward's exp2 with log2(e) folded in) on the
 * tensor-core path; the f32 path stays exact (expf). */
#if (defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)) && FLEX_BWD_EXP2
#define FLEX_BWD_USE_EXP2 1
#else
#define FLEX_BWD_USE_EXP2 0
#endif

/* The mods at one score of the walk, at indices clamped into the sequences
 * (a score outside them is discarded, and its mods' bounds bits too):
 * whether it is kept, its probability from the forward's LSE, and the
 * score mod's derivative terms. CHECKED false: the score is inside both
 * sequences and its block is full (no mask mod), so neither is looked at.
 * keep_bit: in a partial block, the score's bit from the block's bit mask
 * (0 past the sequences), or -1 to evaluate the mask mod. */
template <bool CHECKED = true>
static FLEX_DEVICE_INLINE float flex_bwd_prob(const flex_bwd_params &bp, float raw, int b, int h,
                                              int q, int kv, bool partial, int keep_bit, float lse,
                                              float &dscore, flex_grad_terms &terms,
                                              unsigned &oob) {
    const flex_fwd_params &p = bp.f;
    const bool inside = !CHECKED || (q < p.Lq && kv < p.Lkv);
    const int qi = CHECKED ? min(q, p.Lq - 1) : q, ki = CHECKED ? min(kv, p.Lkv - 1) : kv;
    bool keep = inside;
    if (CHECKED && partial) {
        if (keep_bit >= 0) {
            keep = keep && keep_bit != 0;
        } else {
            unsigned mask_oob = 0;
            keep = keep && flex_mask_mod(b, h, qi, ki, p.bufs, mask_oob);
            oob |= inside ? mask_oob : 0u;
        }
    }
    unsigned score_oob = 0;
    const float value =
        flex_score_bwd(__fmul_rn(raw, p.scale), b, h, qi, ki, p.bufs, score_oob, dscore, terms,
                       bp.grads);
    oob |= keep ? score_oob : 0u;
#if FLEX_BWD_USE_EXP2
    /* 2^(value log2(e) - lse log2(e)). The mod's value is in natural units
     * (as FlexAttention's); without a mod the scale and log2(e) meet in one
     * FMA, as in the forward. A row the forward saw no score of (lse -inf)
     * subtracts +inf, so that a -inf score (masked by the mod) and such a
     * row both give 2^-inf = 0 with no test per score (for finite raw
     * scores: the test is per column, where the compiler shares it). */
    const float nlse2 = lse == FLEX_NEG_INF ? FLEX_NEG_INF : -(lse * FLEX_LOG2E);
#if FLEX_HAS_SCORE_MOD
    const float e = fmaf(value, FLEX_LOG2E, nlse2);
#else
    const float e = fmaf(raw, p.scale_log2, nlse2);
    (void)value;
#endif
    return keep ? flex_exp2(e) : 0.0f;
#else
    return keep && value != FLEX_NEG_INF && lse != FLEX_NEG_INF ? expf(value - lse) : 0.0f;
#endif
}

#ifndef FLEX_BWD_WGMMA
#define FLEX_BWD_WGMMA 0
#endif
#ifndef FLEX_BWD_TMA
#define FLEX_BWD_TMA 0 /* the sm_90a kernel's TMA stages (flex_backward_sm90.cuh) */
#endif
#ifndef FLEX_BWD_BITS
#define FLEX_BWD_BITS 0
#endif

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
/* ===================== tensor-core path (f16 / bf16) ===================== */

#define FLEX_BWD_BLOCK_N (FLEX_WARPS * 16) /* kv rows per CTA (divides the mask's kv block) */
#define FLEX_BWD_MT      (FLEX_BWD_BLOCK_M / 16)
/* Q/dO/lse/delta stages */
#define FLEX_BWD_STAGES (FLEX_BWD_WGMMA && FLEX_BWD_TMA ? FLEX_BWD_TMA : FLEX_BWD_PIPE ? 2 : 1)
/* Columns of the dS tile (kv rows x query columns): at least one 128-byte
 * row, which flex_frag_base's swizzle needs. */
#define FLEX_DS_COLS (FLEX_BWD_BLOCK_M > 64 ? FLEX_BWD_BLOCK_M : 64)
static_assert(FLEX_DS_COLS % 64 == 0, "dS rows are whole 128-byte rows");

/* Shared memory (byte offsets; gpu_host.c's flex_gpu_bwd_smem is the same
 * sum): K and V of the tile, the Q and dO stages, dS, lse and delta, and
 * the gradient region (FLEX_BWD_GRAD_SMEM floats). */
#define FLEX_BWD_SK     0
#define FLEX_BWD_SV     (FLEX_BWD_SK + FLEX_BWD_BLOCK_N * FLEX_DQ * 2)
#define FLEX_BWD_SQ     (FLEX_BWD_SV + FLEX_BWD_BLOCK_N * FLEX_DV * 2)
#define FLEX_BWD_SDO    (FLEX_BWD_SQ + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * FLEX_DQ * 2)
#define FLEX_BWD_SDS    (FLEX_BWD_SDO + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * FLEX_DV * 2)
#define FLEX_BWD_SLSE   (FLEX_BWD_SDS + FLEX_BWD_BLOCK_N * FLEX_DS_COLS * 2)
#define FLEX_BWD_SDELTA (FLEX_BWD_SLSE + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * 4)
#define FLEX_BWD_SGRAD  (FLEX_BWD_SDELTA + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * 4)

/* dQ = dS K is shared out in items of 16 query rows x 16 * FLEX_BWD_DQ_C16
 * columns: per m-tile, the largest number of column groups that divides
 * the head dim's 16-column blocks and gives no warp more than one item
 * where the warps suffice (every warp works, none re-reads dS for a second
 * item it need not take). */
static constexpr __device__ int flex_bwd_dq_groups() {
    int g = FLEX_WARPS / FLEX_BWD_MT;
    if (g < 1) g = 1;
    while ((FLEX_DQ / 16) % g != 0)
        g--;
    return g;
}
#define FLEX_BWD_DQ_GROUPS flex_bwd_dq_groups()
#define FLEX_BWD_DQ_C16    (FLEX_DQ / 16 / FLEX_BWD_DQ_GROUPS)

/* One step of the walk: FLEX_BWD_BLOCK_M query rows of head h from q0;
 * partial: the mask mod decides their scores, through the bit block at
 * word bits_at of f.bits with FLEX_BWD_BITS. */
/* This CTA's kv tile and (batch, kv head) pair. With the kv tiles fastest
 * in the grid and p.head_group > 1, the pairs go in groups of that many,
 * one group after the other, and within a group tile by tile with the
 * pairs alternating: under a causal mask a pair's first kv tiles are its
 * heaviest, and taking each pair's tiles together would start the last
 * pairs' heaviest tiles at the end of the grid. The tiles in flight then
 * share the Q and dO rows of head_group pairs in L2 rather than of one or
 * two. */
static FLEX_DEVICE_INLINE void flex_bwd_tile_of(const flex_fwd_params &p, int &tile, int &bhk) {
#if FLEX_BWD_KV_FASTEST
    const int g = p.head_group;
    if (g > 1) {
        const long long t = (long long)blockIdx.y * gridDim.x + blockIdx.x;
        const long long span = (long long)gridDim.x * g;
        const int group = (int)(t / span), within = (int)(t - group * span);
        const int bh0 = group * g, n = (int)gridDim.y - bh0 < g ? (int)gridDim.y - bh0 : g;
        tile = within / n;
        bhk = bh0 + within % n;
        return;
    }
    tile = blockIdx.x;
    bhk = blockIdx.y;
#else
    tile = blockIdx.y;
    bhk = blockIdx.x;
#endif
}

struct flex_bwd_step {
    int h, q0;
    bool partial;
    int bits_at;
};

/* Where the walk over the GQA group's heads and their q blocks stands. */
struct flex_bwd_cursor {
    int g;      /* head of the group (-1: before the first) */
    int blk;    /* next q block of its walk */
    int sub;    /* next step inside the current q block (0: take the next block) */
    int q_base; /* first query row of the current q block */
    bool partial;
    int bits_at; /* FLEX_BWD_BITS: the current partial block's bit block */
    flex_q_walk walk;
};

static FLEX_DEVICE_INLINE void flex_bwd_cursor_init(flex_bwd_cursor &c) {
    c.g = -1;
    c.blk = c.sub = c.q_base = c.bits_at = 0;
    c.partial = false;
    c.walk.n_full = c.walk.n_part = 0;
    c.walk.full0 = c.walk.part0 = 0;
}

#if FLEX_BWD_BITS
/* The bit block of q block i of a walk (a partial one): its word offset in
 * f.bits, from the host's table of one entry per (plane, q-major partial
 * entry); planes as the forward's (flex_step_bits_at). */
static FLEX_DEVICE_INLINE int flex_bwd_bits_at(const flex_bwd_params &bp, const flex_q_walk &w,
                                               int i, int b, int h) {
    const flex_fwd_params &p = bp.f;
    const int plane =
        (p.bit_planes_b > 1 ? b * p.bit_planes_h : 0) + (p.bit_planes_h > 1 ? h : 0);
    return bp.qbit_words[(long long)plane * p.bit_entries + w.part0 + i - w.n_full];
}
#endif

/* Moves the cursor to the next step whose rows start inside the sequence
 * (a clipped last q block has steps past it, and the rest of such a block
 * is skipped); false once the walk is over. A q block's index is read once,
 * at its first step, and no step divides. */
static FLEX_DEVICE_INLINE bool flex_bwd_next(const flex_bwd_params &bp, int b, int hk, int kb,
                                             flex_bwd_cursor &c, flex_bwd_step &s) {
    const flex_fwd_params &p = bp.f;
    const int group = p.Hq / p.Hkv, steps_per_block = p.mask_qblock / FLEX_BWD_BLOCK_M;
    for (;;) {
        if (c.sub == 0) {
            if (c.blk >= c.walk.n_full + c.walk.n_part) {
                if (++c.g >= group) return false;
                c.walk = flex_q_walk_for(bp, b, hk * group + c.g, kb);
                c.blk = 0;
                continue;
            }
            c.q_base = flex_q_walk_block(bp, c.walk, c.blk, c.partial) * p.mask_qblock;
#if FLEX_BWD_BITS
            if (c.partial) c.bits_at = flex_bwd_bits_at(bp, c.walk, c.blk, b, hk * group + c.g);
#endif
            c.blk++;
        }
        const int q0 = c.q_base + c.sub * FLEX_BWD_BLOCK_M;
        c.sub = c.sub + 1 == steps_per_block ? 0 : c.sub + 1;
        if (q0 < p.Lq) {
            s.h = hk * group + c.g;
            s.q0 = q0;
            s.partial = c.partial;
            s.bits_at = c.bits_at;
            return true;
        }
        c.sub = 0; /* the block's later steps start past the end too */
    }
}

/* Issues the copies of step s's lse and delta rows to lse_dst and
 * delta_dst (shared addresses of one stage; not committed). Rows past the
 * end read as zero: their scores are outside the sequence, so P and dS are
 * 0 whatever lse and delta say. */
static FLEX_DEVICE_INLINE void flex_bwd_load_lse_delta(const flex_bwd_params &bp, int b,
                                                       const flex_bwd_step &s, flex_u32 lse_dst,
                                                       flex_u32 delta_dst, int tid) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M;
    const float *glse = p.lse + b * p.l_sb + s.h * p.l_sh;
    const float *gdelta = bp.delta + ((long long)b * p.Hq + s.h) * p.Lq;
    /* a fixed trip count (one copy a thread where 2 BM <= FLEX_THREADS) */
#pragma unroll
    for (int j = 0; j < (2 * BM + FLEX_THREADS - 1) / FLEX_THREADS; j++) {
        const int i = tid + j * FLEX_THREADS;
        if (2 * BM % FLEX_THREADS != 0 && i >= 2 * BM) break;
        const int r = i < BM ? i : i - BM, q = s.q0 + r;
        const bool valid = q < p.Lq;
        if (i < BM)
            flex_cp_async4(lse_dst + r * 4, valid ? glse + (long long)q * p.l_ss : glse, valid);
        else
            flex_cp_async4(delta_dst + r * 4, valid ? gdelta + q : gdelta, valid);
    }
}

/* Issues the copies of step s's Q and dO rows, lse and delta into stage
 * `stage` (not committed); rows past the end read as zero. */
static FLEX_DEVICE_INLINE void flex_bwd_load_step(const flex_bwd_params &bp, int b,
                                                  const flex_bwd_step &s, flex_u32 smem, int stage,
                                                  int tid) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M;
    const flex_elem *gq = (const flex_elem *)p.q + b * p.q_sb + s.h * p.q_sh;
    const flex_elem *gdo = (const flex_elem *)bp.dout + b * bp.do_sb + s.h * bp.do_sh;
    flex_load_tile<BM, FLEX_DQ>(smem + FLEX_BWD_SQ + stage * BM * FLEX_DQ * 2, gq, p.q_ss, s.q0,
                                p.Lq, p.D, tid);
    flex_load_tile<BM, FLEX_DV>(smem + FLEX_BWD_SDO + stage * BM * FLEX_DV * 2, gdo, bp.do_ss, s.q0,
                                p.Lq, p.Dv, tid);
    flex_bwd_load_lse_delta(bp, b, s, smem + FLEX_BWD_SLSE + stage * BM * 4,
                            smem + FLEX_BWD_SDELTA + stage * BM * 4, tid);
}

/* Per-lane ldmatrix bases (flex_frag_base) of the stage-0 tiles: A
 * operands by row (K, V), B operands read as K is in the forward's
 * S = Q Kᵀ (Q, dO) and transposed as V is in its P V (dO, Q, K; and dS,
 * stored kv-major, as dQ's A operand). */
struct flex_bwd_frags {
    flex_u32 a_k, a_v, b_q, b_do, t_do, t_q, t_k, a_ds;
};

static FLEX_DEVICE_INLINE flex_bwd_frags flex_bwd_frags_for(flex_u32 smem, int warp, int lane) {
    const int nrow = ((lane >> 4) << 3) + (lane & 7), nc0 = (lane >> 3) & 1;
    const int trow = (((lane >> 3) & 1) << 3) + (lane & 7), tc0 = lane >> 4;
    flex_bwd_frags f;
    f.a_k = flex_frag_base(smem + FLEX_BWD_SK, warp * 16 + (lane & 15), lane >> 4, FLEX_DQ);
    f.a_v = flex_frag_base(smem + FLEX_BWD_SV, warp * 16 + (lane & 15), lane >> 4, FLEX_DV);
    f.b_q = flex_frag_base(smem + FLEX_BWD_SQ, nrow, nc0, FLEX_DQ);
    f.b_do = flex_frag_base(smem + FLEX_BWD_SDO, nrow, nc0, FLEX_DV);
    f.t_do = flex_frag_base(smem + FLEX_BWD_SDO, trow, tc0, FLEX_DV);
    f.t_q = flex_frag_base(smem + FLEX_BWD_SQ, trow, tc0, FLEX_DQ);
    f.t_k = flex_frag_base(smem + FLEX_BWD_SK, trow, tc0, FLEX_DQ);
    f.a_ds = flex_frag_base(smem + FLEX_BWD_SDS, nrow, nc0, FLEX_DS_COLS);
    return f;
}

/* Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 kv rows (q, d_o: the
 * stage's B bases). */
template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_sdp(float (&s)[NT][4], float (&dp)[NT][4],
                                            const flex_bwd_frags &f, flex_u32 q, flex_u32 d_o) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            s[nt][r] = dp[nt][r] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
        flex_u32 a[4];
        flex_ldmatrix_x4(a, flex_frag_at(f.a_k, kk));
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            flex_u32 bf[4];
            flex_ldmatrix_x4(bf, flex_frag_at(q, kk) + np * 16 * FLEX_DQ * 2);
            flex_mma_pair(s[2 * np], s[2 * np + 1], a, bf);
        }
    }
#pragma unroll
    for (int kk = 0; kk < FLEX_DV / 16; kk++) {
        flex_u32 a[4];
        flex_ldmatrix_x4(a, flex_frag_at(f.a_v, kk));
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            flex_u32 bf[4];
            flex_ldmatrix_x4(bf, flex_frag_at(d_o, kk) + np * 16 * FLEX_DV * 2);
            flex_mma_pair(dp[2 * np], dp[2 * np + 1], a, bf);
        }
    }
}

/* The scores of a warp's m16n8 accumulators: element (nt, r) is kv row
 * warp * 16 + lane / 4 (+ 8 for r >= 2) of the tile and query column
 * nt * 8 + 2 (lane % 4) (+ 1 for odd r) of the step. flex_bwd_prob_at
 * gives its P (lse: the stage's rows; keep: flex_bwd_keep_of's bits of a
 * partial step with FLEX_BWD_BITS), flex_bwd_ds_at its scale * dS (delta:
 * the stage's rows); the loops below only order them. */
template <bool CHECKED>
static FLEX_DEVICE_INLINE float flex_bwd_prob_at(const flex_bwd_params &bp, float raw, int b,
                                                 const flex_bwd_step &st, int kv0,
                                                 const float *lse, unsigned keep, int nt, int r,
                                                 int warp, int lane, float &dscore,
                                                 flex_grad_terms &terms, unsigned &oob) {
    const int kr = warp * 16 + (lane >> 2) + ((r & 2) ? 8 : 0);
    const int qc = nt * 8 + (lane & 3) * 2 + (r & 1);
    const int keep_bit = FLEX_BWD_BITS ? (int)((keep >> (4 * nt + r)) & 1u) : -1;
    return flex_bwd_prob<CHECKED>(bp, raw, b, st.h, st.q0 + qc, kv0 + kr, st.partial, keep_bit,
                                  lse[qc], dscore, terms, oob);
}

/* The keep bits of this lane's scores in a partial step, element (nt, r)
 * at bit 4 nt + r, from the step's bit block (FLEX_BWD_BITS; 0 without).
 * A warp's 16 kv rows lie in one 32-bit word of each query row's bits (the
 * tile and the step lie inside one mask block, aligned to its power-of-two
 * sizes, and a word holds 32 keys), so a lane reads the word of each of
 * its 2 NT query rows and takes its two kv rows' bits out of it; the
 * lanes of a quad read the same words. */
template <int NT>
static FLEX_DEVICE_INLINE unsigned flex_bwd_keep_of(const flex_bwd_params &bp,
                                                    const flex_bwd_step &st, int kv0, int warp,
                                                    int lane) {
    static_assert(NT <= 8, "32 keep bits a lane");
    unsigned keep = 0u;
#if FLEX_BWD_BITS
    const flex_fwd_params &p = bp.f;
    const int kin = (kv0 + warp * 16) & (p.mask_kvblock - 1);
    const unsigned *bits = p.bits + st.bits_at + (kin >> 5);
    const int shift = (kin & 31) + (lane >> 2);
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int q = st.q0 + nt * 8 + (lane & 3) * 2 + c;
            const unsigned w =
                __ldg(bits + (q & (p.mask_qblock - 1)) * p.bit_row_words) >> shift;
            keep |= ((w & 1u) << (4 * nt + c)) | (((w >> 8) & 1u) << (4 * nt + 2 + c));
        }
#else
    (void)bp;
    (void)st;
    (void)kv0;
    (void)warp;
    (void)lane;
#endif
    return keep;
}

static FLEX_DEVICE_INLINE float flex_bwd_ds_at(const flex_bwd_params &bp, float pr, float dp,
                                               const float *delta, int nt, int r, int lane,
                                               float dscore, const flex_grad_terms &terms) {
    const int qc = nt * 8 + (lane & 3) * 2 + (r & 1);
    return flex_score_grads(bp, pr, dp, delta[qc], dscore, terms) * bp.f.scale;
}

/* Whether a step's scores need the mask mod or the sequence bounds: a
 * partial block, or rows or columns past the end. The other steps take
 * flex_bwd_prob<false>, with neither, where there is no score mod; with
 * one, whose code would be there twice, every step is checked (the second
 * copy cost registers and spills at 255 a thread, and the mod's work
 * outweighs the checks). */
static FLEX_DEVICE_INLINE bool flex_bwd_checked(const flex_bwd_params &bp,
                                                const flex_bwd_step &st, int kv0) {
#if FLEX_HAS_SCORE_MOD
    (void)bp;
    (void)st;
    (void)kv0;
    return true;
#else
    return st.partial || st.q0 + FLEX_BWD_BLOCK_M > bp.f.Lq ||
           kv0 + FLEX_BWD_BLOCK_N > bp.f.Lkv;
#endif
}

template <bool CHECKED, int NT>
static FLEX_DEVICE_INLINE void flex_bwd_scores_as(const flex_bwd_params &bp, float (&s)[NT][4],
                                                  float (&dp)[NT][4], int b,
                                                  const flex_bwd_step &st, int kv0,
                                                  const float *lse, const float *delta,
                                                  unsigned keep, int warp, int lane,
                                                  unsigned &oob) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            float dscore;
            flex_grad_terms terms;
            const float pr = flex_bwd_prob_at<CHECKED>(bp, s[nt][r], b, st, kv0, lse, keep, nt,
                                                       r, warp, lane, dscore, terms, oob);
            dp[nt][r] = flex_bwd_ds_at(bp, pr, dp[nt][r], delta, nt, r, lane, dscore, terms);
            s[nt][r] = pr;
        }
}

/* P and scale * dS in place of Sᵀ and dPᵀ, score by score (keep:
 * flex_bwd_keep_of's bits of the step). */
template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_scores(const flex_bwd_params &bp, float (&s)[NT][4],
                                               float (&dp)[NT][4], int b, const flex_bwd_step &st,
                                               int kv0, const float *lse, const float *delta,
                                               unsigned keep, int warp, int lane, unsigned &oob) {
    if (flex_bwd_checked(bp, st, kv0))
        flex_bwd_scores_as<true, NT>(bp, s, dp, b, st, kv0, lse, delta, keep, warp, lane, oob);
    else
        flex_bwd_scores_as<false, NT>(bp, s, dp, b, st, kv0, lse, delta, keep, warp, lane, oob);
}

/* The same in two passes, for a kernel that has Sᵀ before dPᵀ: P in place
 * of Sᵀ, keeping each score's derivative terms (flex_bwd_probs), then
 * scale * dS in place of dPᵀ (flex_bwd_dscores). */
template <bool CHECKED, int NT>
static FLEX_DEVICE_INLINE void flex_bwd_probs_as(const flex_bwd_params &bp, float (&s)[NT][4],
                                                 float (&dsc)[NT][4],
                                                 flex_grad_terms (&terms)[NT][4], int b,
                                                 const flex_bwd_step &st, int kv0,
                                                 const float *lse, unsigned keep, int warp,
                                                 int lane, unsigned &oob) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            s[nt][r] = flex_bwd_prob_at<CHECKED>(bp, s[nt][r], b, st, kv0, lse, keep, nt, r, warp,
                                                 lane, dsc[nt][r], terms[nt][r], oob);
}

template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_probs(const flex_bwd_params &bp, float (&s)[NT][4],
                                              float (&dsc)[NT][4], flex_grad_terms (&terms)[NT][4],
                                              int b, const flex_bwd_step &st, int kv0,
                                              const float *lse, unsigned keep, int warp, int lane,
                                              unsigned &oob) {
    if (flex_bwd_checked(bp, st, kv0))
        flex_bwd_probs_as<true, NT>(bp, s, dsc, terms, b, st, kv0, lse, keep, warp, lane, oob);
    else
        flex_bwd_probs_as<false, NT>(bp, s, dsc, terms, b, st, kv0, lse, keep, warp, lane, oob);
}

template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_dscores(const flex_bwd_params &bp, const float (&s)[NT][4],
                                                float (&dp)[NT][4], const float (&dsc)[NT][4],
                                                const flex_grad_terms (&terms)[NT][4],
                                                const float *delta, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            dp[nt][r] =
                flex_bwd_ds_at(bp, s[nt][r], dp[nt][r], delta, nt, r, lane, dsc[nt][r], terms[nt][r]);
}

/* Accumulator scores (m16n8 layout) -> 16-bit A fragments (m16n8k16). */
template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_pack(const float (&s)[NT][4], flex_u32 (&a)[NT / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
        a[kk][0] = flex_pack2(s[2 * kk][0], s[2 * kk][1]);
        a[kk][1] = flex_pack2(s[2 * kk][2], s[2 * kk][3]);
        a[kk][2] = flex_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[kk][3] = flex_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

/* This warp's dS rows into the kv-major dS tile: fragment register j of
 * da[kk] holds kv row (lane / 4) + 8 (j & 1) and query columns
 * 8 (2 kk + j / 2) + 2 (lane % 4), + 1 (one 32-bit store; the swizzle puts
 * the eight rows of a store in eight different bank groups). */
template <int NT>
static FLEX_DEVICE_INLINE void flex_bwd_store_ds(flex_u32 sds, const flex_u32 (&da)[NT / 2][4],
                                                 int warp, int lane) {
    const int kr = warp * 16 + (lane >> 2);
    const flex_u32 row = flex_frag_base(sds, kr, 0, FLEX_DS_COLS) + (flex_u32)((lane & 3) << 2);
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int chunk = 2 * kk + (j >> 1);
            const flex_u32 at =
                ((row ^ (flex_u32)((chunk & 7) << 4)) + (flex_u32)((chunk >> 3) << 7)) +
                (flex_u32)((j & 1) * 8 * FLEX_DS_COLS * 2);
            flex_st_shared_u32(at, da[kk][j]);
        }
}

/* dV += Pᵀ dO, dK += dSᵀ Q (A fragments from the accumulators; t_do, t_q:
 * the stage's transposed bases). */
template <int NT>
static FLEX_DEVICE_INLINE void
flex_bwd_dkdv(float (&dk)[FLEX_DQ / 8][4], float (&dv)[FLEX_DV / 8][4],
              const flex_u32 (&pa)[NT / 2][4], const flex_u32 (&da)[NT / 2][4], flex_u32 t_do,
              flex_u32 t_q) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
#pragma unroll
        for (int d2 = 0; d2 < FLEX_DV / 16; d2++) {
            flex_u32 bf[4];
            flex_ldmatrix_x4_trans(bf, flex_frag_at(t_do, d2) + kk * 16 * FLEX_DV * 2);
            flex_mma_pair(dv[2 * d2], dv[2 * d2 + 1], pa[kk], bf);
        }
#pragma unroll
        for (int d2 = 0; d2 < FLEX_DQ / 16; d2++) {
            flex_u32 bf[4];
            flex_ldmatrix_x4_trans(bf, flex_frag_at(t_q, d2) + kk * 16 * FLEX_DQ * 2);
            flex_mma_pair(dk[2 * d2], dk[2 * d2 + 1], da[kk], bf);
        }
    }
}

#if FLEX_BWD_DQ_RED && !defined(FLEX_HIP) /* AMD: flex_mma_hip.cuh */
/* One 16-byte reduction (sm_90; PTX ISA 8.1): addr 16-byte aligned. */
static FLEX_DEVICE_INLINE void flex_red_add_v4(float *addr, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "f"(a), "f"(b),
                 "f"(c), "f"(d)
                 : "memory");
}
#endif

/* A 16-row dQ item (m16n8 accumulators, columns col0..) added to the fp32
 * accumulator rows from qrow0 (row stride D). */
template <int NC>
static FLEX_DEVICE_INLINE void flex_bwd_dq_add(float *gdq, int D, int Lq, int qrow0, int col0,
                                               const float (&acc)[NC][4], int lane) {
#if FLEX_BWD_DQ_RED
    /* Lanes 2i and 2i + 1 swap halves, so that each holds four consecutive
     * columns of one row (the even lane row lane / 4, the odd one 8 rows
     * further): one vector reduction where there were four atomics. The
     * host asks for it only where D % 4 == 0 and the accumulator is 16-byte
     * aligned, so the columns of a vector are all inside or all outside. */
    const bool odd = lane & 1;
    const int q = qrow0 + (lane >> 2) + (odd ? 8 : 0);
#pragma unroll
    for (int dt = 0; dt < NC; dt++) {
        const float x0 = FLEX_SHFL_XOR(odd ? acc[dt][0] : acc[dt][2], 1);
        const float x1 = FLEX_SHFL_XOR(odd ? acc[dt][1] : acc[dt][3], 1);
        const int col = col0 + dt * 8 + (lane & 2) * 2;
        if (q < Lq && col < D)
            flex_red_add_v4(gdq + (long long)q * D + col, odd ? x0 : acc[dt][0],
                            odd ? x1 : acc[dt][1], odd ? acc[dt][2] : x0, odd ? acc[dt][3] : x1);
    }
#else
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = qrow0 + (lane >> 2) + hf * 8;
        if (q >= Lq) continue;
        float *row = gdq + (long long)q * D;
#pragma unroll
        for (int dt = 0; dt < NC; dt++) {
            const int col = col0 + dt * 8 + (lane & 3) * 2;
            if (col < D) atomicAdd(row + col, acc[dt][2 * hf]);
            if (col + 1 < D) atomicAdd(row + col + 1, acc[dt][2 * hf + 1]);
        }
    }
#endif
}

/* The step's dQ rows += dS K (dS complete in shared memory), in the items
 * of flex_bwd_dq_groups shared out over the warps. */
static FLEX_DEVICE_INLINE void flex_bwd_dq(float *gdq, int D, int Lq, int q0,
                                           const flex_bwd_frags &f, int warp, int lane) {
    constexpr int MT = FLEX_BWD_MT, CG = FLEX_BWD_DQ_GROUPS, C16 = FLEX_BWD_DQ_C16;
    for (int item = warp; item < MT * CG; item += FLEX_WARPS) {
        const int mt = item % MT, cg = CG == 1 ? 0 : item / MT;
        const flex_u32 a_ds = flex_frag_at(f.a_ds, mt);
        flex_u32 t_k[C16];
#pragma unroll
        for (int j = 0; j < C16; j++)
            t_k[j] = flex_frag_at(f.t_k, cg * C16 + j);
        float acc[2 * C16][4];
#pragma unroll
        for (int i = 0; i < 2 * C16; i++)
#pragma unroll
            for (int r = 0; r < 4; r++)
                acc[i][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FLEX_BWD_BLOCK_N / 16; kk++) {
            flex_u32 a[4];
            flex_ldmatrix_x4_trans(a, a_ds + kk * 16 * FLEX_DS_COLS * 2);
#pragma unroll
            for (int j = 0; j < C16; j++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4_trans(bf, t_k[j] + kk * 16 * FLEX_DQ * 2);
                flex_mma_pair(acc[2 * j], acc[2 * j + 1], a, bf);
            }
        }
        flex_bwd_dq_add<2 * C16>(gdq, D, Lq, q0 + mt * 16, cg * C16 * 16, acc, lane);
    }
}

/* dK and dV of this warp's 16 kv rows of the tile at kv0 (m16n8
 * accumulators), stored once. */
static FLEX_DEVICE_INLINE void flex_bwd_store_dkdv(const flex_bwd_params &bp,
                                                   const float (&dk)[FLEX_DQ / 8][4],
                                                   const float (&dv)[FLEX_DV / 8][4], int b, int hk,
                                                   int kv0, int warp, int lane) {
    const flex_fwd_params &p = bp.f;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int kv = kv0 + warp * 16 + (lane >> 2) + hf * 8;
        if (kv >= p.Lkv) continue;
        const long long k_row = b * bp.dk_sb + hk * bp.dk_sh + (long long)kv * bp.dk_ss;
        const long long v_row = b * bp.dv_sb + hk * bp.dv_sh + (long long)kv * bp.dv_ss;
#pragma unroll
        for (int dt = 0; dt < FLEX_DQ / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            if (bp.dk && col < p.D) flex_st(bp.dk, k_row + col, dk[dt][2 * hf]);
            if (bp.dk && col + 1 < p.D) flex_st(bp.dk, k_row + col + 1, dk[dt][2 * hf + 1]);
        }
#pragma unroll
        for (int dt = 0; dt < FLEX_DV / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            if (bp.dv && col < p.Dv) flex_st(bp.dv, v_row + col, dv[dt][2 * hf]);
            if (bp.dv && col + 1 < p.Dv) flex_st(bp.dv, v_row + col + 1, dv[dt][2 * hf + 1]);
        }
    }
}

#if !FLEX_BWD_WGMMA /* else flex_backward_sm90.cuh's */
#if FLEX_BWD_GRAD_SMEM
static FLEX_DEVICE_INLINE flex_u32 flex_bwd_grad_region() {
    return flex_smem_addr(flex_bwd_dyn_smem) + FLEX_BWD_SGRAD;
}
#endif

/* One CTA per (batch, kv head, tile of FLEX_BWD_BLOCK_N kv rows). */
extern "C" __global__ void __launch_bounds__(FLEX_THREADS)
    flex_bwd_kernel(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M, BN = FLEX_BWD_BLOCK_N, NT = BM / 8;
    extern __shared__ __align__(128) unsigned char flex_smem[];
    const flex_u32 smem = flex_smem_addr(flex_smem);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int tile, bhk;
    flex_bwd_tile_of(p, tile, bhk);
    const int b = bhk / p.Hkv, hk = bhk % p.Hkv;
    const int kv0 = tile * BN;
#if FLEX_BWD_BITS
    flex_raise_bits_oob(p); /* the mask mod's bounds bits, from the bit kernel */
#endif
    if (kv0 >= p.Lkv) return;
    const int kb = kv0 / p.mask_kvblock;
    const flex_elem *gk = (const flex_elem *)p.k + b * p.k_sb + hk * p.k_sh;
    const flex_elem *gv = (const flex_elem *)p.v + b * p.v_sb + hk * p.v_sh;
    flex_load_tile<BN, FLEX_DQ>(smem + FLEX_BWD_SK, gk, p.k_ss, kv0, p.Lkv, p.D, tid);
    flex_load_tile<BN, FLEX_DV>(smem + FLEX_BWD_SV, gv, p.v_ss, kv0, p.Lkv, p.Dv, tid);

#if FLEX_BWD_GRAD_SMEM
    flex_bwd_grad_zero<FLEX_THREADS>((float *)(flex_smem + FLEX_BWD_SGRAD), tid); /* before B */
#endif

    flex_bwd_cursor cur;
    flex_bwd_cursor_init(cur);
    flex_bwd_step st;
    bool have = flex_bwd_next(bp, b, hk, kb, cur, st);
#if FLEX_BWD_PIPE
    if (have) flex_bwd_load_step(bp, b, st, smem, 0, tid);
#endif
    flex_cp_async_commit();

    const flex_bwd_frags f = flex_bwd_frags_for(smem, warp, lane);
    float dk[FLEX_DQ / 8][4], dv[FLEX_DV / 8][4];
#pragma unroll
    for (int i = 0; i < FLEX_DQ / 8; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            dk[i][r] = 0.0f;
#pragma unroll
    for (int i = 0; i < FLEX_DV / 8; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            dv[i][r] = 0.0f;
    unsigned oob = 0;
    int stage = 0;

    /* Barriers per step: B after the copies (publishes them; every warp is
     * past the previous step's dQ, so dS may be rewritten) and C after dS
     * (dS complete for dQ; every read of the step's Q, dO, lse and delta is
     * done, so the next copies into its stage need no barrier of their
     * own). Pipelined, step s + 1 is copied into the other stage at the top
     * of step s and waited for at the top of step s + 1. */
    while (have) {
        flex_bwd_step next;
#if FLEX_BWD_PIPE
        const bool have_next = flex_bwd_next(bp, b, hk, kb, cur, next);
        if (have_next) flex_bwd_load_step(bp, b, next, smem, stage ^ 1, tid);
        flex_cp_async_commit();
        flex_cp_async_wait<1>();
#else
        flex_bwd_load_step(bp, b, st, smem, 0, tid);
        flex_cp_async_commit();
        flex_cp_async_wait<0>();
        const bool have_next = flex_bwd_next(bp, b, hk, kb, cur, next);
#endif
        __syncthreads(); /* B */
        const flex_u32 q_off = stage * BM * FLEX_DQ * 2, do_off = stage * BM * FLEX_DV * 2;
        const float *lse = (const float *)(flex_smem + FLEX_BWD_SLSE) + stage * BM;
        const float *delta = (const float *)(flex_smem + FLEX_BWD_SDELTA) + stage * BM;

        float s[NT][4], dp[NT][4];
        /* the keep bits' loads in flight during the products */
        const unsigned keep =
            FLEX_BWD_BITS && st.partial ? flex_bwd_keep_of<NT>(bp, st, kv0, warp, lane) : 0u;
        flex_bwd_sdp<NT>(s, dp, f, f.b_q + q_off, f.b_do + do_off);
        flex_bwd_scores<NT>(bp, s, dp, b, st, kv0, lse, delta, keep, warp, lane, oob);
        flex_u32 pa[NT / 2][4], da[NT / 2][4];
        flex_bwd_pack<NT>(s, pa);
        flex_bwd_pack<NT>(dp, da);
        if (bp.dq_acc) flex_bwd_store_ds<NT>(smem + FLEX_BWD_SDS, da, warp, lane);
        flex_bwd_dkdv<NT>(dk, dv, pa, da, f.t_do + do_off, f.t_q + q_off);
        __syncthreads(); /* C */
        if (bp.dq_acc)
            flex_bwd_dq(bp.dq_acc + ((long long)b * p.Hq + st.h) * p.Lq * p.D, p.D, p.Lq, st.q0, f,
                        warp, lane);

        st = next;
        have = have_next;
        stage ^= FLEX_BWD_STAGES - 1;
    }
    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends (a tile without steps) */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    flex_bwd_store_dkdv(bp, dk, dv, b, hk, kv0, warp, lane);
#if FLEX_BWD_GRAD_SMEM
    __syncthreads(); /* every warp's additions (and the zeroing, where no step ran) are done */
    flex_bwd_grad_flush<FLEX_THREADS>(bp.grads, (const float *)(flex_smem + FLEX_BWD_SGRAD), tid);
#endif
}
#endif /* !FLEX_BWD_WGMMA */

#else
/* ============================ f32 exact path ============================ */

/* A score's two dot products on the f32 path: a · b over the head dims
 * and c · d over Dv (a, c in registers, element lane + 32 j; b, d rows in
 * global memory), summed across the warp. Lane 0's sums go to every lane
 * (the butterfly may round differently per lane), so the whole warp takes
 * one path. Shared by the main kernel and the deterministic dQ kernel. */
template <int NQ, int NV>
static FLEX_DEVICE_INLINE void flex_warp_dots(const float (&a)[NQ], const float *b,
                                              const float (&c)[NV], const float *d, int D, int Dv,
                                              int lane, float &dot, float &dpv) {
    dot = 0.0f;
    dpv = 0.0f;
#pragma unroll
    for (int j = 0; j < NQ; j++) {
        const int e = lane + 32 * j;
        if (e < D) dot = fmaf(a[j], b[e], dot);
    }
#pragma unroll
    for (int j = 0; j < NV; j++) {
        const int e = lane + 32 * j;
        if (e < Dv) dpv = fmaf(c[j], d[e], dpv);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        dot += FLEX_SHFL_XOR(dot, off);
        dpv += FLEX_SHFL_XOR(dpv, off);
    }
    dot = FLEX_SHFL(dot, 0);
    dpv = FLEX_SHFL(dpv, 0);
}

#define FLEX_PER_LANE_Q (FLEX_DQ / 32)
#define FLEX_PER_LANE_V (FLEX_DV / 32)

/* One warp per kv row (4 a CTA); grid (B * Hkv, ceil(Lkv / 4)). */
extern "C" __global__ void __launch_bounds__(128) flex_bwd_kernel(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv;
    const int kv = blockIdx.y * 4 + warp;
    if (kv >= p.Lkv) return;
    const int group = p.Hq / p.Hkv;
    const float *krow = (const float *)p.k + b * p.k_sb + hk * p.k_sh + (long long)kv * p.k_ss;
    const float *vrow = (const float *)p.v + b * p.v_sb + hk * p.v_sh + (long long)kv * p.v_ss;
    float kr[FLEX_PER_LANE_Q], vr[FLEX_PER_LANE_V], dk[FLEX_PER_LANE_Q], dv[FLEX_PER_LANE_V];
#pragma unroll
    for (int i = 0; i < FLEX_PER_LANE_Q; i++) {
        const int d = lane + 32 * i;
        kr[i] = d < p.D ? krow[d] : 0.0f;
        dk[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < FLEX_PER_LANE_V; i++) {
        const int d = lane + 32 * i;
        vr[i] = d < p.Dv ? vrow[d] : 0.0f;
        dv[i] = 0.0f;
    }
    unsigned oob = 0;
    const int kb = kv / p.mask_kvblock;
    for (int g = 0; g < group; g++) {
        const int h = hk * group + g;
        const flex_q_walk walk = flex_q_walk_for(bp, b, h, kb);
        const float *gq = (const float *)p.q + b * p.q_sb + h * p.q_sh;
        const float *gdo = (const float *)bp.dout + b * bp.do_sb + h * bp.do_sh;
        const float *glse = p.lse + b * p.l_sb + h * p.l_sh;
        const float *gdelta = bp.delta + ((long long)b * p.Hq + h) * p.Lq;
        float *gdq = bp.dq_acc ? bp.dq_acc + ((long long)b * p.Hq + h) * p.Lq * p.D : nullptr;
        for (int i = 0; i < walk.n_full + walk.n_part; i++) {
            bool partial;
            const int qb = flex_q_walk_block(bp, walk, i, partial);
            const int q_end = min(p.Lq, (qb + 1) * p.mask_qblock);
            for (int q = qb * p.mask_qblock; q < q_end; q++) {
                const float *qrow = gq + (long long)q * p.q_ss;
                const float *dorow = gdo + (long long)q * bp.do_ss;
                float dot, dpv;
                flex_warp_dots(kr, qrow, vr, dorow, p.D, p.Dv, lane, dot, dpv);
                float dscore;
                flex_grad_terms terms;
                const float pr = flex_bwd_prob(bp, dot, b, h, q, kv, partial, -1,
                                               glse[(long long)q * p.l_ss], dscore, terms, oob);
                if (pr == 0.0f) continue; /* the same for the whole warp */
                /* Every lane holds the same terms; one adds the buffer
                 * gradients. */
                const float delta = gdelta[q];
                const float ds =
                    (lane == 0 ? flex_score_grads(bp, pr, dpv, delta, dscore, terms)
                               : flex_score_grads_only(pr, dpv, delta, dscore)) *
                    p.scale;
#pragma unroll
                for (int j = 0; j < FLEX_PER_LANE_V; j++) {
                    const int d = lane + 32 * j;
                    if (d < p.Dv) dv[j] = fmaf(pr, dorow[d], dv[j]);
                }
#pragma unroll
                for (int j = 0; j < FLEX_PER_LANE_Q; j++) {
                    const int d = lane + 32 * j;
                    if (d < p.D) {
                        dk[j] = fmaf(ds, qrow[d], dk[j]);
                        if (gdq) atomicAdd(gdq + (long long)q * p.D + d, ds * kr[j]);
                    }
                }
            }
        }
    }
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    const long long k_row = b * bp.dk_sb + hk * bp.dk_sh + (long long)kv * bp.dk_ss;
    const long long v_row = b * bp.dv_sb + hk * bp.dv_sh + (long long)kv * bp.dv_ss;
#pragma unroll
    for (int j = 0; j < FLEX_PER_LANE_Q; j++) {
        const int d = lane + 32 * j;
        if (bp.dk && d < p.D) ((float *)bp.dk)[k_row + d] = dk[j];
    }
#pragma unroll
    for (int j = 0; j < FLEX_PER_LANE_V; j++) {
        const int d = lane + 32 * j;
        if (bp.dv && d < p.Dv) ((float *)bp.dv)[v_row + d] = dv[j];
    }
}
#endif
