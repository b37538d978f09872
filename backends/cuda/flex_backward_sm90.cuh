/*
 * flex_backward_sm90.cuh: the Hopper (sm_90a) f16/bf16 backward main
 * kernel, appended after flex_backward.cuh (and flex_wgmma_sm90.cuh's
 * primitives) when the host picks it (FLEX_BWD_WGMMA 1). It replaces only
 * flex_bwd_kernel: the walk, the mods, P and dS from the accumulators
 * (flex_bwd_scores), their packing, the dS store, the dQ reductions and
 * the dK/dV epilogue are flex_backward.cuh's, and so are the preprocess,
 * dQ-store and deterministic dQ kernels. What differs is that the five
 * products run on wgmma, which mma.sync reaches only about half of on
 * sm_90, and that the tiles are in wgmma's 128-byte swizzle.
 *
 * One CTA of 8 warps = 2 warpgroups per (batch, kv head, 128 kv rows);
 * warpgroup g owns kv rows 64 g .. 64 g + 63 and warp w of it rows 16 w
 * on from there: the rows warp 4 g + w owns in the mma.sync kernel. A
 * wgmma m64nN fp32 accumulator is, per warp, the m16n8 layout of mma.sync
 * over columns 0 .. N - 1, so everything after the products is unchanged.
 * Per step of 64 query rows:
 *   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ   ss, m64n64: A = the warpgroup's 64 K (V) rows,
 *                            B = Q (dO), both K-major;
 *   dV += Pᵀ dO, dK += dSᵀ Q rs: A = P, dS packed from the accumulators (as
 *                            the forward's P for P V), B = dO (Q) read
 *                            MN-major, transposed by the instruction;
 *   dQ = dS K                ss, m64n64: A = dS from shared memory, stored
 *                            kv-major by flex_bwd_store_ds and read MN-major,
 *                            B = K read MN-major. At a head dim of 128 each
 *                            warpgroup takes 64 of dQ's columns over all 128
 *                            kv rows (so dS of both warpgroups); at 64 each
 *                            takes all columns over its own 64 kv rows, and
 *                            both add into the accumulator.
 * dQ is added to the fp32 accumulator by bulk asynchronous reductions
 * (FLEX_BWD_DQ_BULK, flex_bwd90_dq_bulk): each warp stores its 16 rows to
 * its own shared region and 16 of its lanes add one row each, the copy
 * engine reading the region while the next step computes; without it by
 * flex_bwd_dq_add's reductions from registers.
 *
 * Sᵀ and dPᵀ are two product groups: with FLEX_BWD_SPLIT_WAIT (and no
 * score mod) P is computed while dPᵀ is still in flight.
 *
 * Copies come one of two ways. K and V are copied once with cp.async by
 * all threads either way.
 *   FLEX_BWD_TMA 2 or 3 (where the host can make tensor maps): one thread
 *     walks the mask's lists and issues each step's Q, dO, lse and delta by
 *     TMA into a ring of that many stages, handing the step over in a slot
 *     beside it; a full mbarrier per stage counts the bytes in, an empty
 *     one counts the warps done with it. dS has two tiles, a step's and the
 *     previous one's, so one barrier a step remains:
 *   C (after dS is stored and the dK/dV products issued): dS is complete
 *     for dQ, which reads other warps' rows: the whole CTA's at a head dim
 *     of 128, only the warpgroup's own at 64, where with
 *     FLEX_BWD_WG_BARRIER it is a named barrier of the warpgroup's 128
 *     threads (each writer's fence.proxy.async comes before it either way).
 *     After it the issuing thread refills the stage the previous step used
 *     (at a head dim of 128 every warp is done with it by then); with
 *     FLEX_BWD_REFILL_EARLY at the top of the step instead, once every warp
 *     is done with it.
 *   FLEX_BWD_TMA 0: cp.async by all threads (Q, dO, lse and delta of the
 *     next step into the other stage, FLEX_BWD_PIPE), published to wgmma's
 *     async proxy by fence.proxy.async before barrier B at the top of each
 *     step: the step's stage has landed, and every warp has waited for all
 *     of its products of the previous step, so the other stage (refilled
 *     right after) and the one dS tile are free. Barrier C as above.
 *
 * Requires: 16-bit elements, FLEX_VEC, FLEX_DQ and FLEX_DV in {64, 128},
 * FLEX_WARPS 8, FLEX_BWD_BLOCK_M 64 (gpu_host.c's flex_gpu_bwd_smem adds
 * the 1 KB of alignment slack below, the dQ regions with FLEX_BWD_DQ_BULK
 * and the second dS tile with FLEX_BWD_TMA).
 */
#if FLEX_BWD_WGMMA

#if !defined(FLEX_ELEM_BF16) && !defined(FLEX_ELEM_F16)
#error "the sm_90a backward needs 16-bit elements"
#endif
#if FLEX_WARPS != 8 || FLEX_BWD_BLOCK_M != 64 || !FLEX_VEC
#error "the sm_90a backward needs 8 warps, 64-row query steps and 16-byte rows"
#endif
#if (FLEX_DQ != 64 && FLEX_DQ != 128) || (FLEX_DV != 64 && FLEX_DV != 128)
#error "the sm_90a backward needs head dims of 64 or 128"
#endif
static_assert(FLEX_BWD_BLOCK_N == 128 && FLEX_DS_COLS == 64, "128 kv rows, dS rows of 128 bytes");
#if FLEX_BWD_TMA && ((FLEX_BWD_TMA != 2 && FLEX_BWD_TMA != 3) || !FLEX_BWD_PIPE)
#error "the TMA copies run a pipeline of 2 or 3 stages"
#endif
#ifndef FLEX_BWD_REFILL_EARLY
#define FLEX_BWD_REFILL_EARLY 0
#endif

/* Shared memory, from a 1024-byte aligned base (every tile starts on a
 * 1024-byte boundary, where the swizzle's 8-row pattern starts): K and V
 * of the tile, the Q and dO stages, dS (kv-major: 128 rows of 64 query
 * columns, one 128-byte swizzled block, the layout flex_bwd_store_ds
 * writes; two such tiles with FLEX_BWD_TMA), lse and delta, then the dQ
 * regions (FLEX_BWD_DQ_BULK) and the gradient region (FLEX_BWD_GRAD_SMEM
 * floats). flex_gpu_bwd_smem: the same sum + 1 KB. */
#define FLEX_BWD90_Q_STAGE  (FLEX_BWD_BLOCK_M * FLEX_DQ * 2)
#define FLEX_BWD90_DO_STAGE (FLEX_BWD_BLOCK_M * FLEX_DV * 2)
#define FLEX_BWD90_SK       0
#define FLEX_BWD90_SV       (FLEX_BWD90_SK + FLEX_BWD_BLOCK_N * FLEX_DQ * 2)
#define FLEX_BWD90_SQ       (FLEX_BWD90_SV + FLEX_BWD_BLOCK_N * FLEX_DV * 2)
#define FLEX_BWD90_SDO      (FLEX_BWD90_SQ + FLEX_BWD_STAGES * FLEX_BWD90_Q_STAGE)
#define FLEX_BWD90_SDS      (FLEX_BWD90_SDO + FLEX_BWD_STAGES * FLEX_BWD90_DO_STAGE)
#define FLEX_BWD90_DS_TILE  (FLEX_BWD_BLOCK_N * FLEX_DS_COLS * 2)
#define FLEX_BWD90_DS_TILES (FLEX_BWD_TMA ? 2 : 1)
#define FLEX_BWD90_SLSE     (FLEX_BWD90_SDS + FLEX_BWD90_DS_TILES * FLEX_BWD90_DS_TILE)
#define FLEX_BWD90_SDELTA   (FLEX_BWD90_SLSE + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * 4)
static_assert(FLEX_BWD90_SQ % 1024 == 0 && FLEX_BWD90_SDO % 1024 == 0 &&
                  FLEX_BWD90_SDS % 1024 == 0 && FLEX_BWD90_Q_STAGE % 1024 == 0 &&
                  FLEX_BWD90_DO_STAGE % 1024 == 0,
              "every wgmma tile starts on a 1024-byte boundary");
static_assert(FLEX_BWD90_SLSE % 128 == 0 && FLEX_BWD90_SDELTA % 128 == 0 &&
                  FLEX_BWD_BLOCK_M * 4 % 128 == 0,
              "TMA writes lse and delta to 128-byte aligned rows");
/* With FLEX_BWD_TMA, after delta: the stages' mbarriers (full ones, then
 * empty ones, 8 bytes each) and the slots of the steps handed over with
 * them, in 128 bytes (in the dynamic region, so that the kernel has no
 * static shared memory for the host to count). */
#define FLEX_BWD90_SBAR    (FLEX_BWD90_SDELTA + FLEX_BWD_STAGES * FLEX_BWD_BLOCK_M * 4)
#define FLEX_BWD90_SSLOT   (FLEX_BWD90_SBAR + 2 * FLEX_BWD_STAGES * 8)
#define FLEX_BWD90_BAR_END (FLEX_BWD90_SBAR + (FLEX_BWD_TMA ? 128 : 0))
#if FLEX_BWD_DQ_BULK
/* dQ staged for the bulk reductions, after delta: one region per warp of
 * its 16 query rows x 64 fp32 columns, rows padded to 72 floats (288
 * bytes, 8 banks further per row) so that the 8-byte fragment stores of a
 * half-warp (rows r .. r + 3, four column pairs each) hit 32 distinct
 * banks. flex_gpu_bwd_smem: FLEX_WARPS x FLEX_BWD90_DQ_WARP more. */
#define FLEX_BWD90_DQ_ROW  ((64 + 8) * 4)
#define FLEX_BWD90_DQ_WARP (16 * FLEX_BWD90_DQ_ROW)
#define FLEX_BWD90_SDQ     FLEX_BWD90_BAR_END
static_assert(FLEX_BWD90_SDQ % 16 == 0 && FLEX_BWD90_DQ_ROW % 16 == 0,
              "bulk copies read 16-byte aligned shared memory");
#endif
/* The gradient region (FLEX_BWD_GRAD_SMEM floats) after the dQ regions. */
#if FLEX_BWD_DQ_BULK
#define FLEX_BWD90_SGRAD (FLEX_BWD90_SDQ + FLEX_WARPS * FLEX_BWD90_DQ_WARP)
#else
#define FLEX_BWD90_SGRAD FLEX_BWD90_BAR_END
#endif

/* P of a step computed while its dPᵀ product is in flight (two product
 * groups, FLEX_BWD_SPLIT_WAIT), where there is no score mod: with one, a
 * thread would hold the derivative terms of all 32 of its scores across
 * the wait (soft-capping's spills doubled at a head dim of 128). */
#define FLEX_BWD90_SPLIT (FLEX_BWD_SPLIT_WAIT && !FLEX_HAS_SCORE_MOD)
/* Barrier C of the warpgroup only (FLEX_BWD_WG_BARRIER) where dQ reads
 * just the warpgroup's own dS rows: at a head dim of 64 (flex_bwd90_dq). */
#define FLEX_BWD90_WG_BARRIER (FLEX_BWD_WG_BARRIER && FLEX_DQ == 64)

#if FLEX_BWD_GRAD_SMEM
/* The gradient region, from the aligned base as the kernel computes it. */
static FLEX_DEVICE_INLINE flex_u32 flex_bwd_grad_region() {
    return ((flex_smem_addr(flex_bwd_dyn_smem) + 1023u) & ~1023u) + FLEX_BWD90_SGRAD;
}
#endif

/* Named barrier 1 + wg over warpgroup wg's 128 threads (0 is
 * __syncthreads'); immediate ids, so that ptxas reserves only these. */
static FLEX_DEVICE_INLINE void flex_bar_sync_wg(int wg) {
    if (wg == 0)
        asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else
        asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

/* flex_bwd_load_step in the 128-byte swizzle (base: the aligned base). */
static FLEX_DEVICE_INLINE void flex_bwd90_load_step(const flex_bwd_params &bp, int b,
                                                    const flex_bwd_step &s, flex_u32 base,
                                                    int stage, int tid) {
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M;
    const flex_elem *gq = (const flex_elem *)p.q + b * p.q_sb + s.h * p.q_sh;
    const flex_elem *gdo = (const flex_elem *)bp.dout + b * bp.do_sb + s.h * bp.do_sh;
    flex_load_tile<BM, FLEX_DQ, true>(base + FLEX_BWD90_SQ + stage * FLEX_BWD90_Q_STAGE, gq, p.q_ss,
                                      s.q0, p.Lq, p.D, tid);
    flex_load_tile<BM, FLEX_DV, true>(base + FLEX_BWD90_SDO + stage * FLEX_BWD90_DO_STAGE, gdo,
                                      bp.do_ss, s.q0, p.Lq, p.Dv, tid);
    flex_bwd_load_lse_delta(bp, b, s, base + FLEX_BWD90_SLSE + stage * BM * 4,
                            base + FLEX_BWD90_SDELTA + stage * BM * 4, tid);
}

/* Sᵀ = K Qᵀ (tile: K, stage: Q) or dPᵀ = V dOᵀ (V, dO) for warpgroup wg's
 * 64 kv rows, both K-major (16 columns are 32 bytes further inside a
 * 64-column block, or the next block, rows x 128 bytes further): issued
 * and committed as one group, not waited for. */
template <int DIM>
static FLEX_DEVICE_INLINE void flex_bwd90_sdp_issue(float (&acc)[8][4], flex_u32 tile,
                                                    flex_u32 stage, int wg) {
    constexpr int BM = FLEX_BWD_BLOCK_M, BN = FLEX_BWD_BLOCK_N;
    const unsigned long long ad = flex_sw128_desc(tile + wg * 64 * 128, 16);
    const unsigned long long bd = flex_sw128_desc(stage, 16);
#pragma unroll
    for (int kk = 0; kk < DIM / 16; kk++) {
        const unsigned long long a =
            ad + (unsigned long long)(((kk >> 2) * BN * 128 + (kk & 3) * 32) >> 4);
        const unsigned long long b =
            bd + (unsigned long long)(((kk >> 2) * BM * 128 + (kk & 3) * 32) >> 4);
        if (kk == 0)
            flex_wgmma_ss_n64_fresh<0, 0>(acc, a, b);
        else
            flex_wgmma_ss_n64<0, 0>(acc, a, b);
    }
    flex_wgmma_commit();
}

/* dV += Pᵀ dO and dK += dSᵀ Q, issued and committed, not waited for: dO
 * and Q are read MN-major (16 query rows are two 8-row groups, 2 KB
 * further; the leading-dimension offset is the distance between 64-column
 * blocks). */
static FLEX_DEVICE_INLINE void flex_bwd90_dkdv(float (&dk)[FLEX_DQ / 8][4],
                                               float (&dv)[FLEX_DV / 8][4],
                                               const flex_u32 (&pa)[FLEX_BWD_BLOCK_M / 16][4],
                                               const flex_u32 (&da)[FLEX_BWD_BLOCK_M / 16][4],
                                               flex_u32 q_st, flex_u32 do_st) {
    constexpr int BM = FLEX_BWD_BLOCK_M;
    const unsigned long long dod = flex_sw128_desc(do_st, BM * 128);
    const unsigned long long qd = flex_sw128_desc(q_st, BM * 128);
    flex_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BM / 16; kk++) {
        const unsigned long long step = (unsigned long long)((kk * 16 * 128) >> 4);
#if FLEX_DV == 128
        flex_wgmma_rs_n128(dv, pa[kk], dod + step);
#else
        flex_wgmma_rs_n64(dv, pa[kk], dod + step);
#endif
#if FLEX_DQ == 128
        flex_wgmma_rs_n128(dk, da[kk], qd + step);
#else
        flex_wgmma_rs_n64(dk, da[kk], qd + step);
#endif
    }
    flex_wgmma_commit();
}

/* The dQ columns warpgroup wg adds: 64 from 64 wg at a head dim of 128,
 * all 64 otherwise. */
static FLEX_DEVICE_INLINE int flex_bwd90_dq_col0(int wg) {
    return FLEX_DQ == 128 ? 64 * wg : 0;
}

#if FLEX_BWD_DQ_BULK
/* The warp's dQ fragment (rows qrow0 .. qrow0 + 15, columns col0 .. col0
 * + 63 of the step, m16n8 layout) added to the accumulator gdq (rows of D
 * floats) by bulk reductions through the warp's region: lane r < 16 adds
 * row r's columns below D, one 16-byte multiple (D % 8 == 0, col0 % 64 ==
 * 0, the accumulator 256-byte aligned). The region is rewritten only once
 * the same lanes' previous reductions have read it, waited for here, as
 * late as it can be, so that the reads overlap the step in between. No
 * barrier beyond the warp: the region and its reductions are the warp's.
 * The caller waits for all of them before the CTA ends. */
static FLEX_DEVICE_INLINE void flex_bwd90_dq_bulk(float *gdq, int D, int Lq, int qrow0, int col0,
                                                  const float (&acc)[8][4], flex_u32 region,
                                                  int lane) {
    if (lane < 16) flex_bulk_wait_read<0>();
    __syncwarp();
    const flex_u32 at = region + (flex_u32)((lane >> 2) * FLEX_BWD90_DQ_ROW + (lane & 3) * 8);
#pragma unroll
    for (int dt = 0; dt < 8; dt++) {
        flex_st_shared_f32x2(at + dt * 32, acc[dt][0], acc[dt][1]);
        flex_st_shared_f32x2(at + 8 * FLEX_BWD90_DQ_ROW + dt * 32, acc[dt][2], acc[dt][3]);
    }
    flex_fence_proxy_async(); /* this lane's stores -> the copy engine's reads */
    __syncwarp();
    if (lane < 16) {
        const int q = qrow0 + lane, cols = D - col0 < 64 ? D - col0 : 64;
        if (q < Lq && cols > 0)
            flex_bulk_red_add_f32(gdq + (long long)q * D + col0,
                                  region + (flex_u32)(lane * FLEX_BWD90_DQ_ROW),
                                  (flex_u32)cols * 4u);
        flex_bulk_commit();
    }
}
#endif

/* dQ (64 query rows x 64 columns) = dS K for warpgroup wg, issued and
 * committed, not waited for. Both operands MN-major: dS (the tile at ds) is
 * kv-major (rows are the reduction, query columns contiguous), K is kv rows
 * by head columns. Head dim 128: columns 64 wg .. of K (its column block wg), over
 * all 128 kv rows; 64: K's only block, over the warpgroup's own 64 rows. */
static FLEX_DEVICE_INLINE void flex_bwd90_dq(float (&acc)[8][4], flex_u32 base, flex_u32 ds,
                                             int wg) {
    constexpr int BN = FLEX_BWD_BLOCK_N;
#if FLEX_DQ == 128
    constexpr int KSTEPS = BN / 16;
    const flex_u32 a0 = ds, b0 = base + FLEX_BWD90_SK + wg * BN * 128;
#else
    constexpr int KSTEPS = BN / 32;
    const flex_u32 a0 = ds + wg * 64 * 128, b0 = base + FLEX_BWD90_SK + wg * 64 * 128;
#endif
    const unsigned long long ad = flex_sw128_desc(a0, BN * 128);
    const unsigned long long bd = flex_sw128_desc(b0, BN * 128);
    flex_wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
        const unsigned long long step = (unsigned long long)((kk * 16 * 128) >> 4);
        if (kk == 0)
            flex_wgmma_ss_n64_fresh<1, 1>(acc, ad + step, bd + step);
        else
            flex_wgmma_ss_n64<1, 1>(acc, ad + step, bd + step);
    }
    flex_wgmma_commit();
}

template <int N> static FLEX_DEVICE_INLINE void flex_bwd90_zero(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            a[i][r] = 0.0f;
}

#if FLEX_BWD_TMA
/* The tensor maps of Q and dO (dims D, L, H, B, 64-row boxes of 64
 * columns) and of lse and delta (dims L, 1, H, B, boxes of 64 floats): the
 * kernel's second parameter. */
struct flex_bwd_tmaps {
    flex_tmap q, dout, lse, delta;
};

/* A step as the issuing thread hands it over with its stage; valid 0: the
 * walk has ended. */
struct flex_bwd_slot {
    int h, q0, partial, bits_at, valid;
};
static_assert(2 * FLEX_BWD_STAGES * 8 + FLEX_BWD_STAGES * sizeof(flex_bwd_slot) <= 128,
              "the mbarriers and slots fit their 128 bytes");

/* The walk's next step into stage `stage` (full: its full barrier): the
 * step in slot, then its Q and dO rows, lse and delta by TMA, counted on
 * full; at the walk's end the slot says so and full completes with no
 * bytes. Rows past Lq read as zero, as with cp.async. The issuing thread
 * only; the stage is free (its previous step released it). */
static FLEX_DEVICE_INLINE void flex_bwd90_issue(const flex_bwd_params &bp, const flex_bwd_tmaps &tm,
                                                int b, int hk, int kb, flex_bwd_cursor &cur,
                                                volatile flex_bwd_slot *slot, flex_u32 base,
                                                int stage, flex_u32 full) {
    constexpr int BM = FLEX_BWD_BLOCK_M;
    flex_bwd_step s;
    if (!flex_bwd_next(bp, b, hk, kb, cur, s)) {
        slot->valid = 0;
        flex_mbar_arrive(full);
        return;
    }
    slot->h = s.h, slot->q0 = s.q0, slot->partial = s.partial, slot->bits_at = s.bits_at;
    slot->valid = 1;
    flex_mbar_expect_tx(full, BM * (FLEX_DQ + FLEX_DV) * 2 + 2 * BM * 4);
    flex_tma_rows<BM, FLEX_DQ>(base + FLEX_BWD90_SQ + stage * FLEX_BWD90_Q_STAGE, tm.q, s.q0, s.h,
                               b, full);
    flex_tma_rows<BM, FLEX_DV>(base + FLEX_BWD90_SDO + stage * FLEX_BWD90_DO_STAGE, tm.dout, s.q0,
                               s.h, b, full);
    flex_tma_box(base + FLEX_BWD90_SLSE + stage * BM * 4, tm.lse, s.q0, 0, s.h, b, full);
    flex_tma_box(base + FLEX_BWD90_SDELTA + stage * BM * 4, tm.delta, s.q0, 0, s.h, b, full);
}

/* The issuing thread at step i: the stage step i - 1 used, refilled with
 * step i + STAGES - 1 once every warp is done with it (its empty barrier;
 * after barrier C at a head dim of 128 they all are). */
static FLEX_DEVICE_INLINE void flex_bwd90_refill(const flex_bwd_params &bp,
                                                 const flex_bwd_tmaps &tm, int b, int hk, int kb,
                                                 flex_bwd_cursor &cur,
                                                 volatile flex_bwd_slot *slots, flex_u32 base,
                                                 flex_u32 full0, flex_u32 empty0, int i) {
    const int refill = (i + FLEX_BWD_STAGES - 1) % FLEX_BWD_STAGES;
    if (i > 0) flex_mbar_wait(empty0 + 8 * refill, (unsigned)((i - 1) / FLEX_BWD_STAGES) & 1u);
    flex_bwd90_issue(bp, tm, b, hk, kb, cur, &slots[refill], base, refill, full0 + 8 * refill);
}
#endif

/* A step's first half, on the tiles of `stage` and the dS tile at ds: Sᵀ
 * and dPᵀ, P and dS from them, dS stored for dQ, dV += Pᵀ dO and dK += dSᵀ
 * Q issued (not waited for: pa and da must stay as they are until then),
 * and barrier C, after which dS is complete for dQ. */
static FLEX_DEVICE_INLINE void flex_bwd90_step_scores(
    const flex_bwd_params &bp, int b, const flex_bwd_step &st, int kv0, flex_u32 base,
    const unsigned char *gbase, int stage, flex_u32 ds, float (&dk)[FLEX_DQ / 8][4],
    float (&dv)[FLEX_DV / 8][4], flex_u32 (&pa)[FLEX_BWD_BLOCK_M / 16][4],
    flex_u32 (&da)[FLEX_BWD_BLOCK_M / 16][4], int wg, int warp, int lane, unsigned &oob) {
    constexpr int BM = FLEX_BWD_BLOCK_M, NT = BM / 8;
    const flex_u32 q_st = base + FLEX_BWD90_SQ + stage * FLEX_BWD90_Q_STAGE;
    const flex_u32 do_st = base + FLEX_BWD90_SDO + stage * FLEX_BWD90_DO_STAGE;
    const float *lse = (const float *)(gbase + FLEX_BWD90_SLSE) + stage * BM;
    const float *delta = (const float *)(gbase + FLEX_BWD90_SDELTA) + stage * BM;

    float s[NT][4], dp[NT][4];
    flex_wgmma_fence();
    flex_bwd90_sdp_issue<FLEX_DQ>(s, base + FLEX_BWD90_SK, q_st, wg);
    flex_bwd90_sdp_issue<FLEX_DV>(dp, base + FLEX_BWD90_SV, do_st, wg);
    /* a partial step's keep bits, read while the products run */
    const unsigned keep =
        FLEX_BWD_BITS && st.partial ? flex_bwd_keep_of<NT>(bp, st, kv0, warp, lane) : 0u;
#if FLEX_BWD90_SPLIT
    /* P while dPᵀ is still in flight, dS once it is done */
    flex_wgmma_wait<1>();
    flex_pin(s);
    float dsc[NT][4];
    flex_grad_terms terms[NT][4];
    flex_bwd_probs<NT>(bp, s, dsc, terms, b, st, kv0, lse, keep, warp, lane, oob);
    flex_wgmma_wait<0>();
    flex_pin(dp);
    flex_bwd_dscores<NT>(bp, s, dp, dsc, terms, delta, lane);
#else
    flex_wgmma_wait<0>();
    flex_pin(s);
    flex_pin(dp);
    flex_bwd_scores<NT>(bp, s, dp, b, st, kv0, lse, delta, keep, warp, lane, oob);
#endif
    flex_bwd_pack<NT>(s, pa);
    flex_bwd_pack<NT>(dp, da);
    if (bp.dq_acc) {
        flex_bwd_store_ds<NT>(ds, da, warp, lane);
        flex_fence_proxy_async(); /* this thread's dS -> dQ's reads */
    }
    flex_bwd90_dkdv(dk, dv, pa, da, q_st, do_st);
#if FLEX_BWD90_WG_BARRIER
    flex_bar_sync_wg(wg); /* C: the warpgroup's dS rows are complete for its dQ */
#else
    __syncthreads(); /* C: dS is complete for dQ, which reads other warps' rows */
#endif
}

/* Its second half: dQ = dS K issued, every product of the step waited for,
 * and dQ added to the accumulator. */
static FLEX_DEVICE_INLINE void
flex_bwd90_step_dq(const flex_bwd_params &bp, int b, const flex_bwd_step &st, flex_u32 base,
                   flex_u32 ds, float (&dk)[FLEX_DQ / 8][4], float (&dv)[FLEX_DV / 8][4],
                   flex_u32 (&pa)[FLEX_BWD_BLOCK_M / 16][4],
                   flex_u32 (&da)[FLEX_BWD_BLOCK_M / 16][4], int wg, int warp, int lane) {
    const flex_fwd_params &p = bp.f;
    /* Issued whether or not dQ is wanted (then on a stale dS, unused): a
     * product issued on one path only makes ptxas serialise them all. */
    float dq[8][4];
    flex_bwd90_dq(dq, base, ds, wg);
    flex_wgmma_wait<0>();
    flex_pin(dk);
    flex_pin(dv);
    flex_pin(pa);
    flex_pin(da);
    flex_pin(dq);
    if (bp.dq_acc)
#if FLEX_BWD_DQ_BULK
        flex_bwd90_dq_bulk(bp.dq_acc + ((long long)b * p.Hq + st.h) * p.Lq * p.D, p.D, p.Lq,
                           st.q0 + (warp & 3) * 16, flex_bwd90_dq_col0(wg), dq,
                           base + FLEX_BWD90_SDQ + warp * FLEX_BWD90_DQ_WARP, lane);
#else
        flex_bwd_dq_add<8>(bp.dq_acc + ((long long)b * p.Hq + st.h) * p.Lq * p.D, p.D, p.Lq,
                           st.q0 + (warp & 3) * 16, flex_bwd90_dq_col0(wg), dq, lane);
#endif
}

/* One CTA per (batch, kv head, tile of 128 kv rows). */
extern "C" __global__ void __launch_bounds__(FLEX_THREADS, 1)
#if FLEX_BWD_TMA
    flex_bwd_kernel(const flex_bwd_params bp, const __grid_constant__ flex_bwd_tmaps tm) {
#else
    flex_bwd_kernel(const flex_bwd_params bp) {
#endif
    const flex_fwd_params &p = bp.f;
    constexpr int BM = FLEX_BWD_BLOCK_M, BN = FLEX_BWD_BLOCK_N;
    extern __shared__ __align__(1024) unsigned char flex_smem[];
    /* the host adds 1 KB of slack for rounding the base up */
    const flex_u32 raw = flex_smem_addr(flex_smem), base = (raw + 1023u) & ~1023u;
    const unsigned char *gbase = flex_smem + (base - raw); /* generic address of base */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    /* The warpgroup, through a shuffle so that the compiler knows it is the
     * same across the warp (the descriptors stay in uniform registers). */
    const int wg = FLEX_SHFL(warp >> 2, 0);
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
    flex_load_tile<BN, FLEX_DQ, true>(base + FLEX_BWD90_SK, gk, p.k_ss, kv0, p.Lkv, p.D, tid);
    flex_load_tile<BN, FLEX_DV, true>(base + FLEX_BWD90_SV, gv, p.v_ss, kv0, p.Lkv, p.Dv, tid);
#if FLEX_BWD_GRAD_SMEM
    /* before the first barrier */
    flex_bwd_grad_zero<FLEX_THREADS>((float *)(gbase + FLEX_BWD90_SGRAD), tid);
#endif

    float dk[FLEX_DQ / 8][4], dv[FLEX_DV / 8][4];
    flex_bwd90_zero(dk);
    flex_bwd90_zero(dv);
    unsigned oob = 0;
    flex_bwd_cursor cur;
    flex_bwd_cursor_init(cur);

#if FLEX_BWD_TMA
    /* mbarriers: full 0 .. STAGES - 1 (the issuing thread's arrive and the
     * stage's bytes), empty 0 .. STAGES - 1 (one arrive per warp done with
     * the stage); the steps handed over with the stages (FLEX_BWD90_SBAR) */
    const flex_u32 full0 = base + FLEX_BWD90_SBAR, empty0 = full0 + 8 * FLEX_BWD_STAGES;
    volatile flex_bwd_slot *flex_bwd_slots = (volatile flex_bwd_slot *)(gbase + FLEX_BWD90_SSLOT);
    if (tid == 0) {
        for (int i = 0; i < FLEX_BWD_STAGES; i++) {
            flex_mbar_init(full0 + 8 * i, 1);
            flex_mbar_init(empty0 + 8 * i, FLEX_WARPS);
        }
        flex_mbar_init_fence();
        for (int j = 0; j + 1 < FLEX_BWD_STAGES; j++)
            flex_bwd90_issue(bp, tm, b, hk, kb, cur, &flex_bwd_slots[j], base, j, full0 + 8 * j);
    }
    flex_cp_async_commit();
    flex_cp_async_wait<0>();
    flex_fence_proxy_async(); /* K and V -> the products' reads */
    __syncthreads();          /* K, V, the barriers and the zeroed gradient region are there */

    for (int i = 0;; i++) {
        const int stage = i % FLEX_BWD_STAGES;
        flex_mbar_wait(full0 + 8 * stage, (unsigned)(i / FLEX_BWD_STAGES) & 1u);
        const volatile flex_bwd_slot *slot = &flex_bwd_slots[stage];
        if (!slot->valid) break;
        flex_bwd_step st;
        st.h = slot->h, st.q0 = slot->q0, st.partial = slot->partial != 0;
        st.bits_at = slot->bits_at;
#if FLEX_BWD_REFILL_EARLY
        /* the refill here: the load gets a whole step, warp 0 waits for
         * the slowest warp's end of step i - 1 */
        if (tid == 0)
            flex_bwd90_refill(bp, tm, b, hk, kb, cur, flex_bwd_slots, base, full0, empty0, i);
        __syncwarp(); /* warp 0 together again for the products */
#endif
        /* dS tiles alternate: step i - 1's dQ may still read the other */
        const flex_u32 ds = base + FLEX_BWD90_SDS + (flex_u32)(i & 1) * FLEX_BWD90_DS_TILE;
        flex_u32 pa[BM / 16][4], da[BM / 16][4];
        flex_bwd90_step_scores(bp, b, st, kv0, base, gbase, stage, ds, dk, dv, pa, da, wg, warp,
                               lane, oob);
#if !FLEX_BWD_REFILL_EARLY
        if (tid == 0)
            flex_bwd90_refill(bp, tm, b, hk, kb, cur, flex_bwd_slots, base, full0, empty0, i);
        __syncwarp(); /* warp 0 together again for the products */
#endif
        flex_bwd90_step_dq(bp, b, st, base, ds, dk, dv, pa, da, wg, warp, lane);
        __syncwarp();
        if (lane == 0) flex_mbar_arrive(empty0 + 8 * stage); /* the warp is done with the stage */
    }
#else
    flex_bwd_step st;
    bool have = flex_bwd_next(bp, b, hk, kb, cur, st);
#if FLEX_BWD_PIPE
    if (have) flex_bwd90_load_step(bp, b, st, base, 0, tid);
#endif
    flex_cp_async_commit();
    int stage = 0;
    while (have) {
        flex_bwd_step next;
#if !FLEX_BWD_PIPE
        __syncthreads(); /* every warp is past the previous step: the stage is free */
        flex_bwd90_load_step(bp, b, st, base, 0, tid);
        flex_cp_async_commit();
#endif
        flex_cp_async_wait<0>();
        flex_fence_proxy_async(); /* this thread's copies -> the products' reads */
        __syncthreads();          /* B */
        const bool have_next = flex_bwd_next(bp, b, hk, kb, cur, next);
#if FLEX_BWD_PIPE
        if (have_next) flex_bwd90_load_step(bp, b, next, base, stage ^ 1, tid);
        flex_cp_async_commit();
#endif
        flex_u32 pa[BM / 16][4], da[BM / 16][4];
        flex_bwd90_step_scores(bp, b, st, kv0, base, gbase, stage, base + FLEX_BWD90_SDS, dk, dv,
                               pa, da, wg, warp, lane, oob);
        flex_bwd90_step_dq(bp, b, st, base, base + FLEX_BWD90_SDS, dk, dv, pa, da, wg, warp, lane);
        st = next;
        have = have_next;
        stage ^= FLEX_BWD_STAGES - 1;
    }
#endif
    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends (a tile without steps) */
#if FLEX_BWD_DQ_BULK
    /* The dQ reductions complete, not only done reading their regions: the
     * shared memory stays the CTA's until then, and the PTX ISA promises
     * nothing of bulk writes still in flight at a CTA's end. */
    flex_bulk_wait<0>();
#endif
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    flex_bwd_store_dkdv(bp, dk, dv, b, hk, kv0, warp, lane);
#if FLEX_BWD_GRAD_SMEM
    __syncthreads(); /* every warp's additions (and the zeroing, where no step ran) are done */
    flex_bwd_grad_flush<FLEX_THREADS>(bp.grads, (const float *)(gbase + FLEX_BWD90_SGRAD), tid);
#endif
}

#endif /* FLEX_BWD_WGMMA */
