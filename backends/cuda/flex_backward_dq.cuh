/*
 * flex_backward_dq.cuh: dQ of the deterministic backward
 * (opts->deterministic), appended after flex_backward.cuh when the host
 * launches it, with its configuration just before it:
 *   FLEX_BWD_DQ_WARPS     warps of the kernel (f16/bf16: 16 query rows
 *                         each, a tile no taller than the mask's q block;
 *                         f32: one query row each)
 *   FLEX_BWD_DQ_BLOCK_N   f16/bf16: kv rows per step (divides the mask's
 *                         kv block)
 *
 * The main kernel then gets no dQ accumulator and leaves dQ alone; here
 * every dQ row has one owner. One CTA per (batch, head, tile of query
 * rows) walks the tile's kv blocks through the mask's kv-major lists (the
 * forward's walk, flex_walk_for: full blocks without the mask mod, partial
 * ones with it), recomputes S = Q Kᵀ and P from the forward's LSE, dP =
 * dO Vᵀ and dS = P (dP - delta) with the score mod's derivative, and
 * accumulates dQ = scale dS K in registers, in the order of the lists, and
 * stores it once. No atomics and no order that depends on the scheduling:
 * the same bits every run. Two of the main kernel's products (S, dP) are
 * computed a second time for it (docs/decisions.md, "CUDA backward").
 *
 * Buffer gradients are not computed here; the host refuses them in this
 * mode (their atomics are in the main kernel).
 */

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
/* ===================== tensor-core path (f16 / bf16) ===================== */

#define FLEX_DQP_THREADS (FLEX_BWD_DQ_WARPS * 32)
#define FLEX_DQP_BM      (FLEX_BWD_DQ_WARPS * 16)
static_assert(FLEX_BWD_DQ_BLOCK_N % 16 == 0, "kv steps are whole k-steps of m16n8k16");

/* Grid (B * Hq, ceil(Lq / FLEX_DQP_BM)). Each warp owns 16 query rows, and
 * the products have the forward's shapes: S = Q Kᵀ and dP = dO Vᵀ as its
 * S (V read as K is), dQ += dS K as its O += P V (K read as V is), so dS
 * packs from the accumulators straight into A fragments. */
extern "C" __global__ void __launch_bounds__(FLEX_DQP_THREADS)
    flex_bwd_dq_kernel(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_DQP_BM, BN = FLEX_BWD_DQ_BLOCK_N, NT = BN / 8;
    constexpr int T = FLEX_DQP_THREADS;
    extern __shared__ __align__(128) unsigned char flex_smem[];
    /* Q and dO of the tile, then two stages of K and two of V. */
    const flex_u32 sQ = flex_smem_addr(flex_smem);
    const flex_u32 sdO = sQ + BM * FLEX_DQ * 2;
    const flex_u32 sK = sdO + BM * FLEX_DV * 2;
    const flex_u32 sV = sK + 2 * BN * FLEX_DQ * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq;
    const int hk = h / (p.Hq / p.Hkv);
    const int q0 = blockIdx.y * BM;
    if (q0 >= p.Lq) return;
    const flex_kv_walk walk = flex_walk_for(p, b, h, q0 / p.mask_qblock);
    const int steps_per_block = p.mask_kvblock / BN;
    const int nsteps = (walk.n_full + walk.n_part) * steps_per_block;
    const flex_elem *gq = (const flex_elem *)p.q + b * p.q_sb + h * p.q_sh;
    const flex_elem *gdo = (const flex_elem *)bp.dout + b * bp.do_sb + h * bp.do_sh;
    const flex_elem *gk = (const flex_elem *)p.k + b * p.k_sb + hk * p.k_sh;
    const flex_elem *gv = (const flex_elem *)p.v + b * p.v_sb + hk * p.v_sh;

    /* Double buffering as in the forward: step s + 1's K and V are copied
     * during step s into the stage step s - 1 used. */
    flex_load_tile<BM, FLEX_DQ, false, T>(sQ, gq, p.q_ss, q0, p.Lq, p.D, tid);
    flex_load_tile<BM, FLEX_DV, false, T>(sdO, gdo, bp.do_ss, q0, p.Lq, p.Dv, tid);
    int next_kv0 = 0;
    bool next_partial = false;
    if (nsteps > 0) {
        next_kv0 = flex_walk_block(p, walk, 0, next_partial) * p.mask_kvblock;
        flex_load_tile<BN, FLEX_DQ, false, T>(sK, gk, p.k_ss, next_kv0, p.Lkv, p.D, tid);
        flex_load_tile<BN, FLEX_DV, false, T>(sV, gv, p.v_ss, next_kv0, p.Lkv, p.Dv, tid);
    }
    flex_cp_async_commit();

    /* This lane's two rows (the m16n8 accumulator layout) and their lse
     * and delta; rows past the end get lse -inf, so P = 0 there. */
    const int row0 = q0 + warp * 16 + (lane >> 2);
    const float *glse = p.lse + b * p.l_sb + h * p.l_sh;
    const float *gdelta = bp.delta + ((long long)b * p.Hq + h) * p.Lq;
    float lse[2], delta[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = row0 + 8 * hf;
        lse[hf] = q < p.Lq ? glse[(long long)q * p.l_ss] : FLEX_NEG_INF;
        delta[hf] = q < p.Lq ? gdelta[q] : 0.0f;
    }

    /* Per-lane fragment bases (flex_frag_base): Q and dO as A operands by
     * row; K and V as B operands read as the forward reads K; K transposed
     * as the forward reads V. */
    const flex_u32 a_q = flex_frag_base(sQ, warp * 16 + (lane & 15), lane >> 4, FLEX_DQ);
    const flex_u32 a_do = flex_frag_base(sdO, warp * 16 + (lane & 15), lane >> 4, FLEX_DV);
    const int nrow = ((lane >> 4) << 3) + (lane & 7), nc0 = (lane >> 3) & 1;
    const flex_u32 b_k = flex_frag_base(sK, nrow, nc0, FLEX_DQ);
    const flex_u32 b_v = flex_frag_base(sV, nrow, nc0, FLEX_DV);
    const flex_u32 t_k =
        flex_frag_base(sK, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, FLEX_DQ);

    float acc[FLEX_DQ / 8][4];
#pragma unroll
    for (int i = 0; i < FLEX_DQ / 8; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            acc[i][r] = 0.0f;
    unsigned oob = 0;

    for (int step = 0; step < nsteps; step++) {
        const int kv0 = next_kv0;
        const bool partial = next_partial;
        const int stage = step & 1;
        __syncthreads(); /* everyone is done with the stage refilled next */
        if (step + 1 < nsteps) {
            const int blk = (step + 1) / steps_per_block;
            next_kv0 = flex_walk_block(p, walk, blk, next_partial) * p.mask_kvblock +
                       (step + 1 - blk * steps_per_block) * BN;
            const int ns = stage ^ 1;
            flex_load_tile<BN, FLEX_DQ, false, T>(sK + ns * BN * FLEX_DQ * 2, gk, p.k_ss, next_kv0,
                                                  p.Lkv, p.D, tid);
            flex_load_tile<BN, FLEX_DV, false, T>(sV + ns * BN * FLEX_DV * 2, gv, p.v_ss, next_kv0,
                                                  p.Lkv, p.Dv, tid);
        }
        flex_cp_async_commit();
        flex_cp_async_wait<1>();
        __syncthreads();
        if (kv0 >= p.Lkv) continue; /* a step past the end of a clipped last block */
        const flex_u32 k_off = stage * BN * FLEX_DQ * 2, v_off = stage * BN * FLEX_DV * 2;

        /* S = Q Kᵀ and dP = dO Vᵀ for this warp's 16 rows. */
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++)
                s[nt][r] = dp[nt][r] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
            flex_u32 a[4];
            flex_ldmatrix_x4(a, flex_frag_at(a_q, kk));
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4(bf, flex_frag_at(b_k + k_off, kk) + np * 16 * FLEX_DQ * 2);
                flex_mma_pair(s[2 * np], s[2 * np + 1], a, bf);
            }
        }
#pragma unroll
        for (int kk = 0; kk < FLEX_DV / 16; kk++) {
            flex_u32 a[4];
            flex_ldmatrix_x4(a, flex_frag_at(a_do, kk));
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4(bf, flex_frag_at(b_v + v_off, kk) + np * 16 * FLEX_DV * 2);
                flex_mma_pair(dp[2 * np], dp[2 * np + 1], a, bf);
            }
        }

        /* scale * dS in place of dP, the main kernel's arithmetic per score. */
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int q = row0 + ((r & 2) ? 8 : 0);
                const int kv = kv0 + nt * 8 + (lane & 3) * 2 + (r & 1);
                float dscore;
                flex_grad_terms terms;
                const float pr = flex_bwd_prob(bp, s[nt][r], b, h, q, kv, partial, -1, lse[r >> 1],
                                               dscore, terms, oob);
                dp[nt][r] = flex_score_grads_only(pr, dp[nt][r], delta[r >> 1], dscore) * p.scale;
            }
        }

        /* dQ += dS K */
#pragma unroll
        for (int kk = 0; kk < NT / 2; kk++) {
            flex_u32 da[4];
            da[0] = flex_pack2(dp[2 * kk][0], dp[2 * kk][1]);
            da[1] = flex_pack2(dp[2 * kk][2], dp[2 * kk][3]);
            da[2] = flex_pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            da[3] = flex_pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
            for (int d2 = 0; d2 < FLEX_DQ / 16; d2++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4_trans(bf, flex_frag_at(t_k + k_off, d2) + kk * 16 * FLEX_DQ * 2);
                flex_mma_pair(acc[2 * d2], acc[2 * d2 + 1], da, bf);
            }
        }
    }
    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);

    /* Every row of the tile is written, 0 where no key is attended. */
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = row0 + 8 * hf;
        if (q >= p.Lq) continue;
        const long long row = b * bp.dq_sb + h * bp.dq_sh + (long long)q * bp.dq_ss;
#pragma unroll
        for (int dt = 0; dt < FLEX_DQ / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            if (col < p.D) flex_st(bp.dq, row + col, acc[dt][2 * hf]);
            if (col + 1 < p.D) flex_st(bp.dq, row + col + 1, acc[dt][2 * hf + 1]);
        }
    }
}

#else
/* ============================ f32 exact path ============================ */

#define FLEX_DQP_LANE_Q (FLEX_DQ / 32)
#define FLEX_DQP_LANE_V (FLEX_DV / 32)

/* One warp per query row (FLEX_BWD_DQ_WARPS a CTA), lanes splitting the
 * head dims, the keys of the row's kv blocks one after the other. Grid
 * (B * Hq, ceil(Lq / FLEX_BWD_DQ_WARPS)). */
extern "C" __global__ void __launch_bounds__(FLEX_BWD_DQ_WARPS * 32)
    flex_bwd_dq_kernel(const flex_bwd_params bp) {
    const flex_fwd_params &p = bp.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq;
    const int hk = h / (p.Hq / p.Hkv);
    const int q = blockIdx.y * FLEX_BWD_DQ_WARPS + warp;
    if (q >= p.Lq) return;
    const float *qrow = (const float *)p.q + b * p.q_sb + h * p.q_sh + (long long)q * p.q_ss;
    const float *dorow =
        (const float *)bp.dout + b * bp.do_sb + h * bp.do_sh + (long long)q * bp.do_ss;
    const float *gk = (const float *)p.k + b * p.k_sb + hk * p.k_sh;
    const float *gv = (const float *)p.v + b * p.v_sb + hk * p.v_sh;
    float qr[FLEX_DQP_LANE_Q], dor[FLEX_DQP_LANE_V], dq[FLEX_DQP_LANE_Q];
#pragma unroll
    for (int j = 0; j < FLEX_DQP_LANE_Q; j++) {
        const int d = lane + 32 * j;
        qr[j] = d < p.D ? qrow[d] : 0.0f;
        dq[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < FLEX_DQP_LANE_V; j++) {
        const int d = lane + 32 * j;
        dor[j] = d < p.Dv ? dorow[d] : 0.0f;
    }
    const float lse = p.lse[b * p.l_sb + h * p.l_sh + (long long)q * p.l_ss];
    const float delta = bp.delta[((long long)b * p.Hq + h) * p.Lq + q];
    unsigned oob = 0;
    const flex_kv_walk walk = flex_walk_for(p, b, h, q / p.mask_qblock);
    for (int i = 0; i < walk.n_full + walk.n_part; i++) {
        bool partial;
        const int kb = flex_walk_block(p, walk, i, partial);
        const int k_end = min(p.Lkv, (kb + 1) * p.mask_kvblock);
        for (int kv = kb * p.mask_kvblock; kv < k_end; kv++) {
            const float *krow = gk + (long long)kv * p.k_ss;
            const float *vrow = gv + (long long)kv * p.v_ss;
            float dot, dpv;
            flex_warp_dots(qr, krow, dor, vrow, p.D, p.Dv, lane, dot, dpv);
            float dscore;
            flex_grad_terms terms;
            const float pr =
                flex_bwd_prob(bp, dot, b, h, q, kv, partial, -1, lse, dscore, terms, oob);
            if (pr == 0.0f) continue; /* the same for the whole warp */
            const float ds = flex_score_grads_only(pr, dpv, delta, dscore) * p.scale;
#pragma unroll
            for (int j = 0; j < FLEX_DQP_LANE_Q; j++) {
                const int d = lane + 32 * j;
                if (d < p.D) dq[j] = fmaf(ds, krow[d], dq[j]);
            }
        }
    }
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    float *out = (float *)bp.dq + b * bp.dq_sb + h * bp.dq_sh + (long long)q * bp.dq_ss;
#pragma unroll
    for (int j = 0; j < FLEX_DQP_LANE_Q; j++) {
        const int d = lane + 32 * j;
        if (d < p.D) out[d] = dq[j];
    }
}
#endif
