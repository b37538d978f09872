/*
 * flex_backward.cuh: the block-sparse attention backward (dQ, dK, dV and
 * the gradients of float buffers the score mod reads).
 *
 * The host prepends vendor.cuh, a configuration block, the emitted mods
 * (flex_mask_mod, flex_score_mod), the emitted derivative of the score mod
 * with its glue (flex_score_bwd, flex_scatter_grads; cuda_compile.c),
 * flex_common.cuh and flex_mma_sm80.cuh. Configuration macros:
 *   FLEX_ELEM_BF16 / FLEX_ELEM_F16 / FLEX_ELEM_F32   input and output dtype
 *   FLEX_DQ, FLEX_DV        head dims padded to a multiple of 64
 *   FLEX_WARPS              warps per CTA of the main kernel
 *   FLEX_BWD_BLOCK_M        query rows per step (divides the mask's q block)
 *   FLEX_VEC                1: rows are 16-byte aligned, copy with cp.async
 *   FLEX_GRAD_SLOTS         entries of flex_bwd_params.grads (at least 1)
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
 *                        buffer gradients are added with atomics;
 *   flex_bwd_dq_store    the dQ accumulator -> dq in its dtype and strides.
 *
 * f16/bf16: the products run on mma.sync m16n8k16 (sm_80 and later, also
 * on sm_90) with fp32 accumulators. Each warp owns 16 kv rows of the tile:
 * Sᵀ = K Qᵀ and dPᵀ = V dOᵀ come out in the m16n8 accumulator layout with
 * kv rows and query columns, so P and dS pack straight into the A
 * fragments of dV += Pᵀ dO and dK += dSᵀ Q (as P does for P V in the
 * forward). dQ = dS K needs the tile's dS by query row: it goes through
 * shared memory, and the warps split the query rows.
 *
 * f32: the exact path, plain FMA, one warp per kv row, lanes splitting the
 * head dims; same walk, same accumulators.
 */

/* The backward's parameters (cuda_backend.c mirrors the part before the
 * forward's block, which follows whole, then the mods' buffers). */
struct flex_bwd_params {
    const void *dout;
    void *dq, *dk, *dv; /* NULL: not wanted */
    float *delta;       /* (B, Hq, Lq) */
    float *dq_acc;      /* (B, Hq, Lq, D) fp32 */
    const int *qfull_off, *qfull_idx, *qpart_off, *qpart_idx; /* q-major lists */
    long long do_sb, do_sh, do_ss;
    long long dq_sb, dq_sh, dq_ss;
    long long dk_sb, dk_sh, dk_ss;
    long long dv_sb, dv_sh, dv_ss;
    flex_buffer grads[FLEX_GRAD_SLOTS]; /* gradient tensors: data, buffer sizes, strides */
    flex_fwd_params f;                  /* q, k, v, out, lse, mask, dims, scale, mods' buffers */
};

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

/* The gradient terms of one attended score. ds' = p (dp - delta) is the
 * gradient of the modified score; where it is exactly 0 the raw score and
 * the buffers get 0 even if the mod's derivative is infinite or NaN there
 * (docs/backward.md). Returns ds (not yet multiplied by the scale) and adds
 * the buffer gradients. */
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
    return dsp == 0.0f ? 0.0f : dsp * dscore;
}

/* flex_score_grads without the buffer gradients. */
static FLEX_DEVICE_INLINE float flex_score_grads_only(float p, float dp, float delta, float dscore) {
    const float dsp = p * (dp - delta);
    return dsp == 0.0f ? 0.0f : dsp * dscore;
}

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

/* The mods at one score of the walk, at indices clamped into the sequences
 * (a score outside them is discarded, and its mods' bounds bits too):
 * whether it is kept, its probability from the forward's LSE, and the
 * score mod's derivative terms. */
static FLEX_DEVICE_INLINE float flex_bwd_prob(const flex_bwd_params &bp, float raw, int b, int h,
                                              int q, int kv, bool partial, float lse, float &dscore,
                                              flex_grad_terms &terms, unsigned &oob) {
    const flex_fwd_params &p = bp.f;
    const bool inside = q < p.Lq && kv < p.Lkv;
    const int qi = min(q, p.Lq - 1), ki = min(kv, p.Lkv - 1);
    bool keep = inside;
    if (partial) {
        unsigned mask_oob = 0;
        keep = keep && flex_mask_mod(b, h, qi, ki, p.bufs, mask_oob);
        oob |= inside ? mask_oob : 0u;
    }
    unsigned score_oob = 0;
    const float value =
        flex_score_bwd(__fmul_rn(raw, p.scale), b, h, qi, ki, p.bufs, score_oob, dscore, terms,
                       bp.grads);
    oob |= keep ? score_oob : 0u;
    return keep && value != FLEX_NEG_INF && lse != FLEX_NEG_INF ? expf(value - lse) : 0.0f;
}

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
/* ===================== tensor-core path (f16 / bf16) ===================== */

#define FLEX_BWD_BLOCK_N (FLEX_WARPS * 16) /* kv rows per CTA (divides the mask's kv block) */
#define FLEX_BWD_MT      (FLEX_BWD_BLOCK_M / 16)
#define FLEX_DS_PAD      64 /* columns of the dS tile in shared memory (one 128-byte row) */
static_assert(FLEX_BWD_BLOCK_N <= FLEX_DS_PAD, "a dS row holds the tile's kv rows");

extern "C" __global__ void __launch_bounds__(FLEX_THREADS) flex_bwd_kernel(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M, BN = FLEX_BWD_BLOCK_N, NT = BM / 8;
    extern __shared__ __align__(128) unsigned char flex_smem[];
    /* K, V of the tile; Q, dO, dS of the step; then the step's lse and delta. */
    const flex_u32 sK = flex_smem_addr(flex_smem);
    const flex_u32 sV = sK + BN * FLEX_DQ * 2;
    const flex_u32 sQ = sV + BN * FLEX_DV * 2;
    const flex_u32 sdO = sQ + BM * FLEX_DQ * 2;
    const flex_u32 sdS = sdO + BM * FLEX_DV * 2;
    float *s_lse =
        (float *)(flex_smem + 2 * (BN * (FLEX_DQ + FLEX_DV) + BM * (FLEX_DQ + FLEX_DV + FLEX_DS_PAD)));
    float *s_delta = s_lse + BM;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv;
    const int kv0 = blockIdx.y * BN;
    if (kv0 >= p.Lkv) return;
    const int kb = kv0 / p.mask_kvblock;
    const int group = p.Hq / p.Hkv;
    const flex_elem *gk = (const flex_elem *)p.k + b * p.k_sb + hk * p.k_sh;
    const flex_elem *gv = (const flex_elem *)p.v + b * p.v_sb + hk * p.v_sh;
    flex_load_tile<BN, FLEX_DQ>(sK, gk, p.k_ss, kv0, p.Lkv, p.D, tid);
    flex_load_tile<BN, FLEX_DV>(sV, gv, p.v_ss, kv0, p.Lkv, p.Dv, tid);
    flex_cp_async_commit();

    /* Per-lane fragment bases (flex_frag_base): A operands by row (K, V,
     * dS), B operands read as K is in the forward's S = Q Kᵀ (Q, dO) and
     * transposed as V is in its P V (dO, Q, K). */
    const flex_u32 a_k = flex_frag_base(sK, warp * 16 + (lane & 15), lane >> 4, FLEX_DQ);
    const flex_u32 a_v = flex_frag_base(sV, warp * 16 + (lane & 15), lane >> 4, FLEX_DV);
    const flex_u32 a_ds = flex_frag_base(sdS, lane & 15, lane >> 4, FLEX_DS_PAD);
    const int nrow = ((lane >> 4) << 3) + (lane & 7), nc0 = (lane >> 3) & 1;
    const flex_u32 b_q = flex_frag_base(sQ, nrow, nc0, FLEX_DQ);
    const flex_u32 b_do = flex_frag_base(sdO, nrow, nc0, FLEX_DV);
    const int trow = (((lane >> 3) & 1) << 3) + (lane & 7), tc0 = lane >> 4;
    const flex_u32 t_do = flex_frag_base(sdO, trow, tc0, FLEX_DV);
    const flex_u32 t_q = flex_frag_base(sQ, trow, tc0, FLEX_DQ);
    const flex_u32 t_k = flex_frag_base(sK, trow, tc0, FLEX_DQ);

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
    const int steps_per_block = p.mask_qblock / BM;

    for (int g = 0; g < group; g++) {
        const int h = hk * group + g;
        const flex_q_walk walk = flex_q_walk_for(bp, b, h, kb);
        const int nsteps = (walk.n_full + walk.n_part) * steps_per_block;
        const flex_elem *gq = (const flex_elem *)p.q + b * p.q_sb + h * p.q_sh;
        const flex_elem *gdo = (const flex_elem *)bp.dout + b * bp.do_sb + h * bp.do_sh;
        const float *glse = p.lse + b * p.l_sb + h * p.l_sh;
        const float *gdelta = bp.delta + ((long long)b * p.Hq + h) * p.Lq;
        float *gdq = bp.dq_acc ? bp.dq_acc + ((long long)b * p.Hq + h) * p.Lq * p.D : nullptr;
        for (int step = 0; step < nsteps; step++) {
            bool partial;
            const int blk = step / steps_per_block;
            const int q0 = flex_q_walk_block(bp, walk, blk, partial) * p.mask_qblock +
                           (step - blk * steps_per_block) * BM;
            if (q0 >= p.Lq) continue; /* a step past the end of a clipped last block */
            __syncthreads(); /* the previous step is done with Q, dO, dS, lse, delta */
            flex_load_tile<BM, FLEX_DQ>(sQ, gq, p.q_ss, q0, p.Lq, p.D, tid);
            flex_load_tile<BM, FLEX_DV>(sdO, gdo, bp.do_ss, q0, p.Lq, p.Dv, tid);
            flex_cp_async_commit();
            for (int i = tid; i < BM; i += FLEX_THREADS) {
                const int q = q0 + i;
                s_lse[i] = q < p.Lq ? glse[(long long)q * p.l_ss] : FLEX_NEG_INF;
                s_delta[i] = q < p.Lq ? gdelta[q] : 0.0f;
            }
            flex_cp_async_wait<0>();
            __syncthreads();

            /* Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's 16 kv rows. */
            float s[NT][4], dp[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++)
                    s[nt][r] = dp[nt][r] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
                flex_u32 a[4];
                flex_ldmatrix_x4(a, flex_frag_at(a_k, kk));
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    flex_u32 bf[4];
                    flex_ldmatrix_x4(bf, flex_frag_at(b_q, kk) + np * 16 * FLEX_DQ * 2);
                    flex_mma_pair(s[2 * np], s[2 * np + 1], a, bf);
                }
            }
#pragma unroll
            for (int kk = 0; kk < FLEX_DV / 16; kk++) {
                flex_u32 a[4];
                flex_ldmatrix_x4(a, flex_frag_at(a_v, kk));
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    flex_u32 bf[4];
                    flex_ldmatrix_x4(bf, flex_frag_at(b_do, kk) + np * 16 * FLEX_DV * 2);
                    flex_mma_pair(dp[2 * np], dp[2 * np + 1], a, bf);
                }
            }

            /* P and scale * dS in place of S and dP; dS to shared memory by
             * query row for dQ. */
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int kr = warp * 16 + (lane >> 2) + ((r & 2) ? 8 : 0);
                    const int qc = nt * 8 + (lane & 3) * 2 + (r & 1);
                    float dscore;
                    flex_grad_terms terms;
                    const float pr = flex_bwd_prob(bp, s[nt][r], b, h, q0 + qc, kv0 + kr, partial,
                                                   s_lse[qc], dscore, terms, oob);
                    const float ds =
                        flex_score_grads(bp, pr, dp[nt][r], s_delta[qc], dscore, terms) * p.scale;
                    s[nt][r] = pr;
                    dp[nt][r] = ds;
                    flex_st_shared_u16(sdS + 2 * flex_swz(qc, kr >> 3, FLEX_DS_PAD) + 2 * (kr & 7),
                                       flex_to_elem(ds));
                }
            }

            /* dV += Pᵀ dO, dK += dSᵀ Q (A fragments from the accumulators). */
            flex_u32 pa[NT / 2][4], da[NT / 2][4];
#pragma unroll
            for (int kk = 0; kk < NT / 2; kk++) {
                pa[kk][0] = flex_pack2(s[2 * kk][0], s[2 * kk][1]);
                pa[kk][1] = flex_pack2(s[2 * kk][2], s[2 * kk][3]);
                pa[kk][2] = flex_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[kk][3] = flex_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
                da[kk][0] = flex_pack2(dp[2 * kk][0], dp[2 * kk][1]);
                da[kk][1] = flex_pack2(dp[2 * kk][2], dp[2 * kk][3]);
                da[kk][2] = flex_pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
                da[kk][3] = flex_pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
            }
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

            /* dQ rows of this step += dS K, the warps splitting the rows. */
            if (gdq) {
                __syncthreads(); /* dS is complete */
                for (int mt = warp; mt < FLEX_BWD_MT; mt += FLEX_WARPS) {
                    float acc[FLEX_DQ / 8][4];
#pragma unroll
                    for (int i = 0; i < FLEX_DQ / 8; i++)
#pragma unroll
                        for (int r = 0; r < 4; r++)
                            acc[i][r] = 0.0f;
#pragma unroll
                    for (int kk = 0; kk < BN / 16; kk++) {
                        flex_u32 a[4];
                        flex_ldmatrix_x4(a, flex_frag_at(a_ds, kk) + mt * 16 * FLEX_DS_PAD * 2);
#pragma unroll
                        for (int d2 = 0; d2 < FLEX_DQ / 16; d2++) {
                            flex_u32 bf[4];
                            flex_ldmatrix_x4_trans(bf,
                                                   flex_frag_at(t_k, d2) + kk * 16 * FLEX_DQ * 2);
                            flex_mma_pair(acc[2 * d2], acc[2 * d2 + 1], a, bf);
                        }
                    }
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        const int q = q0 + mt * 16 + (lane >> 2) + hf * 8;
                        if (q >= p.Lq) continue;
                        float *row = gdq + (long long)q * p.D;
#pragma unroll
                        for (int dt = 0; dt < FLEX_DQ / 8; dt++) {
                            const int col = dt * 8 + (lane & 3) * 2;
                            if (col < p.D) atomicAdd(row + col, acc[dt][2 * hf]);
                            if (col + 1 < p.D) atomicAdd(row + col + 1, acc[dt][2 * hf + 1]);
                        }
                    }
                }
            }
        }
    }
    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends (a tile without steps) */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);

    /* dK, dV of this warp's kv rows, once. */
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

#else
/* ============================ f32 exact path ============================ */

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
                float dot = 0.0f, dpv = 0.0f;
#pragma unroll
                for (int j = 0; j < FLEX_PER_LANE_Q; j++) {
                    const int d = lane + 32 * j;
                    if (d < p.D) dot = fmaf(qrow[d], kr[j], dot);
                }
#pragma unroll
                for (int j = 0; j < FLEX_PER_LANE_V; j++) {
                    const int d = lane + 32 * j;
                    if (d < p.Dv) dpv = fmaf(dorow[d], vr[j], dpv);
                }
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) {
                    dot += FLEX_SHFL_XOR(dot, off);
                    dpv += FLEX_SHFL_XOR(dpv, off);
                }
                /* Lane 0's sums for every lane (the butterfly may round
                 * differently per lane), so the whole warp takes one path. */
                dot = FLEX_SHFL(dot, 0);
                dpv = FLEX_SHFL(dpv, 0);
                float dscore;
                flex_grad_terms terms;
                const float pr = flex_bwd_prob(bp, dot, b, h, q, kv, partial,
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
