/*
 * flex_forward_sm90.cuh: the Hopper (sm_90a) forward, appended after
 * flex_forward.cuh when the host picks it (FLEX_WGMMA 1). It shares the
 * parameter block, the kv walk, the online softmax and the epilogue with the
 * mma.sync kernel; what differs is how the two products are computed and
 * how K and V arrive.
 *
 * 128 query rows of one (batch, head) per CTA, in two consumer warpgroups of
 * 64 rows. S = Q Kᵀ is one chain of wgmma m64n128k16 per warpgroup with both
 * operands in shared memory (128-byte swizzled tiles, the layout wgmma reads
 * directly); O += P V takes P from registers (the scores' accumulator layout
 * packs straight into wgmma's A fragments) and V from shared memory,
 * transposed by the instruction. Within a warpgroup the products of step
 * s + 1 and s overlap the softmax: S(s + 1) and P(s) V(s) are issued
 * together, the softmax of S(s + 1) runs while P(s) V(s) is still on the
 * tensor cores, and only the rescale of O waits for it.
 *
 * Two kernels share that step. FLEX_TMA 1 (the default): a third, producer
 * warpgroup issues every copy by TMA, tied to the consumers by mbarriers,
 * and the consumers take turns on the tensor cores. FLEX_TMA 0 (layouts TMA
 * cannot take): all threads copy with cp.async and one barrier per step
 * publishes the stages.
 *
 * The wgmma primitives (descriptors, products, fences) are
 * flex_wgmma_sm90.cuh's and the TMA copies and mbarriers
 * flex_tma_sm90.cuh's, which the host places just before this file.
 *
 * Requires: 16-bit elements, FLEX_VEC (16-byte aligned rows), FLEX_DQ and
 * FLEX_DV in {64, 128, 192, 256}, FLEX_WARPS 8, FLEX_MT 1, FLEX_BLOCK_N 64
 * or 128. Head dims over 128 take 64-key steps (the host's choice), so that
 * O's 64 x FLEX_DV accumulators, the scores and the probabilities fit a
 * consumer's registers; FLEX_Q_BUFS (TMA kernel: 1 or 2) is how many Q
 * tiles the producer keeps, 1 where two do not fit beside the K/V stages.
 */
#if FLEX_WGMMA

#if FLEX_WARPS != 8 || FLEX_MT != 1 || (FLEX_BLOCK_N != 64 && FLEX_BLOCK_N != 128) || !FLEX_VEC
#error "the sm_90a forward needs 8 warps, 1 m-tile, 64- or 128-key steps and 16-byte rows"
#endif
#if FLEX_DQ % 64 || FLEX_DV % 64 || FLEX_DQ > 256 || FLEX_DV > 256
#error "the sm_90a forward needs head dims of 64, 128, 192 or 256"
#endif

/* n-tiles of 8 keys in a step's scores (the m16n8 accumulator layout). */
#define FLEX_SM90_NT (FLEX_BLOCK_N / 8)

/* Descriptors of one step's products, all formed before the products are
 * issued: a register defined between two wgmma of one batch serialises
 * them (ptxas keeps the batch in order by waiting for each). */
struct flex_sm90_descs {
    unsigned long long q[FLEX_DQ / 16], k[FLEX_DQ / 16], v[FLEX_BLOCK_N / 16];
};

/* S = Q Kᵀ: both K-major; 16 columns are 32 bytes further inside a
 * 64-column block, or the next block. V is MN-major: 16 keys are two 8-row
 * groups, 2 KB further. Q's descriptors are the same on every step but are
 * re-formed (a few adds) rather than kept in 16 registers across the loop. */
static FLEX_DEVICE_INLINE void flex_sm90_make_descs(flex_sm90_descs &d, unsigned long long q_desc,
                                                    unsigned long long k_desc,
                                                    unsigned long long v_desc) {
#pragma unroll
    for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
        d.q[kk] =
            q_desc + (unsigned long long)(((kk >> 2) * FLEX_BLOCK_M * 128 + (kk & 3) * 32) >> 4);
        d.k[kk] =
            k_desc + (unsigned long long)(((kk >> 2) * FLEX_BLOCK_N * 128 + (kk & 3) * 32) >> 4);
        asm volatile("" : "+l"(d.q[kk]), "+l"(d.k[kk]));
    }
#pragma unroll
    for (int kk = 0; kk < FLEX_BLOCK_N / 16; kk++) {
        d.v[kk] = v_desc + (unsigned long long)((kk * 16 * 128) >> 4);
        asm volatile("" : "+l"(d.v[kk]));
    }
}

/* S (64 x FLEX_BLOCK_N per warpgroup) = Q Kᵀ over FLEX_DQ. */
static FLEX_DEVICE_INLINE void flex_sm90_scores(float (&s)[FLEX_SM90_NT][4],
                                                const flex_sm90_descs &d) {
#if FLEX_BLOCK_N == 128
    flex_wgmma_ss_n128_fresh(s, d.q[0], d.k[0]);
#pragma unroll
    for (int kk = 1; kk < FLEX_DQ / 16; kk++)
        flex_wgmma_ss_n128(s, d.q[kk], d.k[kk]);
#else
    flex_wgmma_ss_n64_fresh<0, 0>(s, d.q[0], d.k[0]);
#pragma unroll
    for (int kk = 1; kk < FLEX_DQ / 16; kk++)
        flex_wgmma_ss_n64<0, 0>(s, d.q[kk], d.k[kk]);
#endif
}

/* O += P V over FLEX_BLOCK_N keys: products of 128 columns, and one of 64
 * for the rest (V's column block c is c x FLEX_BLOCK_N x 128 bytes on). */
template <int C = 0>
static FLEX_DEVICE_INLINE void flex_sm90_pv_cols(float (&o)[FLEX_DV / 8][4],
                                                 const flex_u32 (&a)[4], unsigned long long v) {
    constexpr unsigned long long COL128 = (2ull * FLEX_BLOCK_N * 128) >> 4;
    if constexpr (FLEX_DV - 128 * C >= 128) {
        flex_wgmma_rs_n128<16 * C>(o, a, v + C * COL128);
        flex_sm90_pv_cols<C + 1>(o, a, v);
    } else if constexpr (FLEX_DV - 128 * C == 64) {
        flex_wgmma_rs_n64<16 * C>(o, a, v + C * COL128);
    }
}
static FLEX_DEVICE_INLINE void flex_sm90_pv(float (&o)[FLEX_DV / 8][4],
                                            const flex_u32 (&pa)[FLEX_BLOCK_N / 16][4],
                                            const flex_sm90_descs &d) {
#pragma unroll
    for (int kk = 0; kk < FLEX_BLOCK_N / 16; kk++)
        flex_sm90_pv_cols(o, pa[kk], d.v[kk]);
}

/* One step's products, in two commit groups: S = Q Kᵀ first, so that
 * wgmma.wait_group 1 waits for S alone while O += P V still runs. */
static FLEX_DEVICE_INLINE void flex_sm90_issue(float (&s)[FLEX_SM90_NT][4],
                                               float (&o)[FLEX_DV / 8][4],
                                               const flex_u32 (&pa)[FLEX_BLOCK_N / 16][4],
                                               const flex_sm90_descs &d) {
    flex_wgmma_fence();
    flex_sm90_scores(s, d);
    flex_wgmma_commit();
    flex_sm90_pv(o, pa, d);
    flex_wgmma_commit();
}

/* Mods, mask and online softmax of a warpgroup's 64 x FLEX_BLOCK_N scores
 * of the step at kv0, packed as the A fragments of the next P V into pa
 * (with FLEX_STEP_CUTS left in s, and packed by flex_sm90_take_probs after
 * the wait for the product in flight): the plain path
 * for blocks without mask or bounds, the masked one otherwise; with a score
 * mod whose reads do not depend on the score, one copy of the score mod
 * serves both (flex_softmax_probs_split). bits_at: a partial step's bit
 * block (FLEX_PARTIAL_BITS). diag: the warp's diagonal table
 * (FLEX_DIAG_VALUES; the TMA kernel's), filled here for the step. */
static FLEX_DEVICE_INLINE void flex_sm90_probs(const flex_fwd_params &p, flex_warp_state &st,
                                               float (&s)[FLEX_SM90_NT][4],
                                               flex_u32 (&pa)[FLEX_BLOCK_N / 16][4],
                                               float (&alphas)[2], int b, int h, int qrow0, int kv0,
                                               bool partial, bool q_bounds, int bits_at, int lane,
                                               unsigned &oob, float *diag = nullptr) {
    const bool bounds = q_bounds || kv0 + FLEX_BLOCK_N > p.Lkv;
#if FLEX_DIAG_VALUES
    flex_diag_fill(p, diag, b, h, qrow0, kv0, lane);
#endif
#if FLEX_HAS_SCORE_MOD && !FLEX_SCORE_INDEX_USES_SCORE
    flex_softmax_probs_split<FLEX_SM90_NT>(p, st.m[0], st.l[0], s, alphas, b, h, qrow0, kv0,
                                           partial, bounds, bits_at, lane, oob, diag);
#else
    if (partial || bounds)
        flex_softmax_probs<true, FLEX_SM90_NT>(p, st.m[0], st.l[0], s, alphas, b, h, qrow0, kv0,
                                               partial, bounds, bits_at, lane, oob, diag);
    else
        flex_softmax_probs<false, FLEX_SM90_NT>(p, st.m[0], st.l[0], s, alphas, b, h, qrow0, kv0,
                                                false, false, 0, lane, oob, diag);
#endif
#if !FLEX_STEP_CUTS
    flex_pack_probs<FLEX_SM90_NT>(s, pa);
#else
    (void)pa;
#endif
}

/* Zero: P before a tile's first product, and O after the TMA kernel's step
 * 0 product, which multiplied P = 0 by the Q tile read as a V stage (any
 * readable bytes, so the product may hold NaN). Step 0 still issues that
 * product because a product issued on one path only makes ptxas serialise
 * all of them. */
template <typename T, int N> static FLEX_DEVICE_INLINE void flex_sm90_clear(T (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            a[i][r] = 0;
    /* Zeros in the registers the products use: left as constants, ptxas
     * spilled most of a 256-column O to keep them. */
    flex_pin(a);
}

/* Waits for the step's P V: O is up to date, and P's registers, which the
 * product read, are free again (flex_pin keeps the compiler from reusing
 * either before the wait). */
static FLEX_DEVICE_INLINE void flex_sm90_wait_pv(float (&o)[FLEX_DV / 8][4],
                                                 flex_u32 (&pa)[FLEX_BLOCK_N / 16][4]) {
    flex_wgmma_wait<0>();
    flex_pin(o);
    flex_pin(pa);
}

/* P of the step just finished (next, or with FLEX_STEP_CUTS s) becomes the
 * operand of the next product. With the cuts it is packed here, after the
 * wait, into the registers the finished product read: a second set of
 * fragments packed beside the product costs 32 registers and a copy on
 * every step, and the product is long done by the time the softmax is. */
static FLEX_DEVICE_INLINE void flex_sm90_take_probs(flex_u32 (&pa)[FLEX_BLOCK_N / 16][4],
                                                    const flex_u32 (&next)[FLEX_BLOCK_N / 16][4],
                                                    const float (&s)[FLEX_SM90_NT][4]) {
#if FLEX_STEP_CUTS
    (void)next;
    flex_pack_probs<FLEX_SM90_NT>(s, pa);
#else
    (void)s;
#pragma unroll
    for (int kk = 0; kk < FLEX_BLOCK_N / 16; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            pa[kk][r] = next[kk][r];
#endif
}

#if !FLEX_TMA

#if FLEX_DIAG_VALUES
#error "the diagonal tables are the TMA kernel's"
#endif

/* The cp.async kernel: K(j) and V(j) copied by all threads one step ahead
 * into two stages each; one barrier per step publishes them. */
extern "C" __global__ void __launch_bounds__(FLEX_THREADS, 1)
    flex_forward_kernel(const flex_fwd_params p) {
    extern __shared__ __align__(1024) unsigned char flex_smem[];
    /* Q, then two K stages, then two V stages, each 1024-byte aligned (the
     * host adds 1 KB of slack for the alignment of the base). */
    const flex_u32 sQ = (flex_smem_addr(flex_smem) + 1023u) & ~1023u;
    const flex_u32 sK = sQ + FLEX_BLOCK_M * FLEX_DQ * 2;
    const flex_u32 sV = sK + 2 * FLEX_BLOCK_N * FLEX_DQ * 2;
    constexpr flex_u32 K_STAGE = FLEX_BLOCK_N * FLEX_DQ * 2, V_STAGE = FLEX_BLOCK_N * FLEX_DV * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
#if FLEX_PARTIAL_BITS
    flex_raise_bits_oob(p);
#endif
    flex_tile tile;
    if (!flex_tile_for(p, tile)) return;
    const int nsteps = tile.nsteps;
    flex_warp_state st;
    flex_init_state(st);

    const int qrow0 = tile.q0 + warp * 16; /* this warp's 16 rows */
    const bool q_bounds = tile.q0 + FLEX_BLOCK_M > p.Lq;
    unsigned oob = 0;
    /* Descriptors: this warpgroup's 64 rows of Q; K and V stage 0. */
    const unsigned long long q_desc = flex_sw128_desc(sQ + wg * 64 * 128, 16);
    const unsigned long long k_desc0 = flex_sw128_desc(sK, 16);
    const unsigned long long v_desc0 = flex_sw128_desc(sV, FLEX_BLOCK_N * 128);

    /* Step j computes S(j) beside P(j - 1) V(j - 1), then the softmax of
     * S(j) while that product runs. Every product is issued on every step
     * (a product issued on one path only makes ptxas serialise all of them):
     * step 0 multiplies P = 0 by a zeroed V stage, step nsteps computes an S
     * on a stale K stage and does not use it. K(j) sits in K stage j & 1,
     * V(j) in V stage j & 1; each is copied one step before it is used.
     * (The TMA kernel reads Q as step 0's V stage and clears O instead; here
     * that measured 15% slower on noop: the choice between the two
     * descriptors costs registers the step cannot spare.) */
    int kv_cur = 0, kv_next = 0, bits_cur = 0, bits_next = 0;
    bool partial_cur = false, partial_next = false;
    float s[FLEX_SM90_NT][4];
    flex_u32 pa[FLEX_BLOCK_N / 16][4];
    flex_sm90_clear(pa);
    if (nsteps > 0) {
        kv_cur = flex_step_kv0(p, tile.walk, 0, partial_cur);
#if FLEX_PARTIAL_BITS
        if (partial_cur) bits_cur = flex_step_bits_at(p, tile.walk, 0, tile.b, tile.h);
#endif
        flex_load_tile<FLEX_BLOCK_M, FLEX_DQ, true>(sQ, tile.gq, p.q_ss, tile.q0, p.Lq, p.D, tid);
        flex_load_tile<FLEX_BLOCK_N, FLEX_DQ, true>(sK, tile.gk, p.k_ss, kv_cur, p.Lkv, p.D, tid);
        /* V stage 1 feeds step 0's product with P = 0: zeros, never NaN. */
        for (int i = tid; i < V_STAGE / 16; i += FLEX_THREADS)
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(sV + V_STAGE + i * 16),
                         "r"(0u));
        flex_cp_async_commit();
    }
    for (int step = 0; nsteps > 0 && step <= nsteps; step++) { /* no kv block: O = 0 */
        const bool last = step == nsteps;
        /* K(step) and V(step - 1) have landed, for every thread; every
         * warpgroup is past step - 1, so the stages refilled below (K(step -
         * 1)'s and V(step - 2)'s) are free. */
        flex_cp_async_wait<0>();
        flex_fence_proxy_async();
        __syncthreads();
        if (!last)
            flex_load_tile<FLEX_BLOCK_N, FLEX_DV, true>(sV + (step & 1) * V_STAGE, tile.gv, p.v_ss,
                                                        kv_cur, p.Lkv, p.Dv, tid);
        if (step + 1 < nsteps) {
            kv_next = flex_step_kv0(p, tile.walk, step + 1, partial_next);
#if FLEX_PARTIAL_BITS
            if (partial_next)
                bits_next = flex_step_bits_at(p, tile.walk, step + 1, tile.b, tile.h);
#endif
            flex_load_tile<FLEX_BLOCK_N, FLEX_DQ, true>(sK + ((step + 1) & 1) * K_STAGE, tile.gk,
                                                        p.k_ss, kv_next, p.Lkv, p.D, tid);
        }
        flex_cp_async_commit();

        flex_sm90_descs d;
        flex_sm90_make_descs(d, q_desc, k_desc0 + (unsigned long long)(((step & 1) * K_STAGE) >> 4),
                             v_desc0 + (unsigned long long)((((step + 1) & 1) * V_STAGE) >> 4));
        flex_sm90_issue(s, st.o[0], pa, d);

        flex_wgmma_wait<1>(); /* S(step) is done; P V still runs */
        flex_pin(s);
        float alphas[2] = {1.0f, 1.0f};
        flex_u32 pa_next[FLEX_BLOCK_N / 16][4];
        if (!last)
            flex_sm90_probs(p, st, s, pa_next, alphas, tile.b, tile.h, qrow0, kv_cur, partial_cur,
                            q_bounds, bits_cur, lane, oob);
        flex_sm90_wait_pv(st.o[0], pa);
        if (!last) {
            flex_rescale(st.o[0], alphas);
            flex_sm90_take_probs(pa, pa_next, s);
            kv_cur = kv_next;
            partial_cur = partial_next;
            bits_cur = bits_next;
        }
    }

    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    flex_store_output(p, st, tile.b, tile.h, tile.q0, warp, lane);
}

#else /* FLEX_TMA */

#if FLEX_Q_BUFS != 1 && FLEX_Q_BUFS != 2
#error "the TMA forward keeps one or two Q tiles"
#endif

/* The tensor maps of Q, K and V (dims D, L, H, B; flex_tma_sm90.cuh), the
 * kernel's second parameter. */
struct flex_tmaps {
    flex_tmap q, k, v;
};

/* Warp specialisation: a producer warpgroup (one thread issues every TMA
 * copy; the warpgroup gives its registers to the others) and two consumer
 * warpgroups of 64 rows each, tied by mbarriers instead of CTA barriers:
 * full barriers count the bytes of a stage in, empty barriers count the
 * consumer warps done with it, so the producer runs up to two stages ahead.
 * The consumers take turns issuing their products (named barriers 1 and
 * 2), so that one warpgroup's softmax overlaps the other's products. */
static FLEX_DEVICE_INLINE void flex_named_sync(int id) {
    asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
static FLEX_DEVICE_INLINE void flex_named_arrive(int id) {
    asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

/* The tiles of this CTA: with a grid of one CTA per tile that is the
 * CTA's own; with fewer CTAs (persistent), CTA c of G takes the tiles c,
 * 2G - 1 - c, 2G + c, ... of flex_tile_of's order (pairs of heads, the
 * mask's rows heaviest first), so every round's G tiles weigh about the
 * same and the snake evens out the rest. */
struct flex_tile_cursor {
    long long count; /* tiles in the grid order */
    int round;
};

/* The cursor's next tile, with or without kv steps (false: none left). */
static FLEX_DEVICE_INLINE bool flex_next_tile(const flex_fwd_params &p, flex_tile_cursor &cur,
                                              flex_tile &tile) {
    const long long g = gridDim.x;
    for (cur.round++; cur.round * g < cur.count; cur.round++) {
        const long long t = cur.round * g + ((cur.round & 1) ? g - 1 - blockIdx.x : blockIdx.x);
        if (t < cur.count && flex_tile_of(p, t, tile)) return true;
    }
    return false;
}

/* What the producer hands the consumers with each Q buffer and K stage
 * (written before the arrive that completes the buffer's full barrier,
 * whose release makes them visible to the waiting consumers), so that the
 * consumers read no mask lists from global memory. nsteps 0: a tile
 * without kv steps (no Q copied; the consumers store zeros and -inf);
 * nsteps -1: no tiles left. */
struct flex_tile_info {
    int b, h, q0, nsteps;
};
#if FLEX_STEP_CUTS
#define FLEX_STEP_INFO_ALIGN __align__(16) /* flex_read_step's one load */
#else
#define FLEX_STEP_INFO_ALIGN
#endif
struct FLEX_STEP_INFO_ALIGN flex_step_info {
    int kv0, partial;
    int bits_at; /* a partial step's bit block (FLEX_PARTIAL_BITS) */
};

#if FLEX_STEP_CUTS
/* A consumer's read of step slot i's info (after the wait on its K stage),
 * from the slots at shared address `at`, in one 16-byte load: read through
 * the array, the compiler forms the slot's address again on every step,
 * from the cluster id. */
static FLEX_DEVICE_INLINE flex_step_info flex_read_step(flex_u32 at, int i) {
    flex_step_info s;
    int unused;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(s.kv0), "=r"(s.partial), "=r"(s.bits_at), "=r"(unused)
                 : "r"(at + 16 * i)
                 : "memory");
    return s;
}
#endif

/* The consumers' next tile with kv steps from the Q ring, from round k on:
 * tiles without steps on the way are stored (zeros and -inf) and their Q
 * buffers released. Returns false at the end of the walk, with k left at
 * the end marker's round (waiting on it again returns at once). */
static FLEX_DEVICE_INLINE bool flex_take_tile(const flex_fwd_params &p, const flex_tile_info *tiles,
                                              flex_u32 full_q, flex_u32 empty_q, int &k,
                                              flex_tile_info &t, int cwarp, int lane) {
    for (;; k++) {
        const int qb = k % FLEX_Q_BUFS;
        flex_mbar_wait(full_q + 8 * qb, (k / FLEX_Q_BUFS) & 1);
        t.b = tiles[qb].b, t.h = tiles[qb].h, t.q0 = tiles[qb].q0, t.nsteps = tiles[qb].nsteps;
        if (t.nsteps != 0) return t.nsteps > 0;
        if (lane == 0) flex_mbar_arrive(empty_q + 8 * qb);
        flex_warp_state empty;
        flex_init_state(empty);
        flex_store_output(p, empty, t.b, t.h, t.q0, cwarp, lane);
    }
}

/* Register split between the producer warpgroup and the two consumers.
 * setmaxnreg moves registers within the CTA's own allocation: ptxas gives
 * each of the 384 threads (64K / 384) rounded down to 8 = 168, and a
 * consumer's setmaxnreg.inc waits until the producer's .dec has freed
 * enough, so a split above that total never returns (the kernel hangs). */
#define FLEX_LAUNCH_REGS   ((65536 / (FLEX_THREADS + 128)) & ~7)
#if FLEX_DV > 192
/* O's 128 accumulators a thread: the consumers take 8 more, and the
 * producer spills a few values of the walk (one thread, L1 hits). */
#define FLEX_PRODUCER_REGS 40
#define FLEX_CONSUMER_REGS 232
#else
#define FLEX_PRODUCER_REGS 56 /* the walk lives in the producer: 40 spills */
#define FLEX_CONSUMER_REGS 224
#endif
static_assert(128 * FLEX_PRODUCER_REGS + FLEX_THREADS * FLEX_CONSUMER_REGS <=
                  (FLEX_THREADS + 128) * FLEX_LAUNCH_REGS,
              "setmaxnreg split exceeds the CTA's registers");

/* Consumer warp w's diagonal table: FLEX_DIAG_ROWS x FLEX_DIAG_STRIDE
 * floats (the host counts them in flex_gpu_fwd_smem). */
#if FLEX_DIAG_VALUES
#define FLEX_DIAG_TABLE(w) (diag_tables + (w) * (FLEX_DIAG_ROWS * FLEX_DIAG_STRIDE))
#else
#define FLEX_DIAG_TABLE(w) nullptr
#endif

extern "C" __global__ void __launch_bounds__(FLEX_THREADS + 128, 1)
    flex_forward_kernel(const flex_fwd_params p, const __grid_constant__ flex_tmaps tm) {
    extern __shared__ __align__(1024) unsigned char flex_smem[];
    /* mbarriers: full Q 0, 1; empty Q 0, 1; full K 0, 1; full V 0, 1;
     * empty K 0, 1; empty V 0, 1. */
    __shared__ __align__(8) unsigned long long flex_bars[12];
    __shared__ flex_tile_info flex_tiles[FLEX_Q_BUFS];  /* per Q buffer */
    __shared__ flex_step_info flex_steps[2];            /* per K stage */
#if FLEX_TMA_CHAIN
    __shared__ flex_tile_info flex_done[2][FLEX_WARPS]; /* per consumer warp: its last two tiles */
#endif
    const flex_u32 full_q = flex_keep_addr(flex_smem_addr(&flex_bars[0])), empty_q = full_q + 16,
                   full_k = full_q + 32, full_v = full_q + 48, empty_k = full_q + 64,
                   empty_v = full_q + 80;
    /* FLEX_Q_BUFS Q buffers (a tile's and, with two, the next one's), two
     * K stages, two V stages, each 1024-byte aligned. */
    constexpr flex_u32 Q_BUF = FLEX_BLOCK_M * FLEX_DQ * 2, K_STAGE = FLEX_BLOCK_N * FLEX_DQ * 2,
                       V_STAGE = FLEX_BLOCK_N * FLEX_DV * 2;
    const flex_u32 sQ = flex_keep_addr((flex_smem_addr(flex_smem) + 1023u) & ~1023u);
    const flex_u32 sK = sQ + FLEX_Q_BUFS * Q_BUF;
    const flex_u32 sV = sK + 2 * K_STAGE;
#if FLEX_DIAG_VALUES
    /* then each consumer warp's diagonal table (flex_diag_fill) */
    float *const diag_tables =
        (float *)(flex_smem + (sV + 2 * V_STAGE - flex_smem_addr(flex_smem)));
#endif
#if FLEX_STEP_CUTS
    const flex_u32 steps = flex_keep_addr(flex_smem_addr(flex_steps)); /* flex_read_step */
#endif

    const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7;
#if FLEX_PARTIAL_BITS
    flex_raise_bits_oob(p);
#endif
    if (tid == 0) {
        for (int i = 0; i < 2; i++) {
            flex_mbar_init(full_q + 8 * i, 1);
            flex_mbar_init(empty_q + 8 * i, FLEX_WARPS);
            flex_mbar_init(full_k + 8 * i, 1);
            flex_mbar_init(full_v + 8 * i, 1);
            flex_mbar_init(empty_k + 8 * i, FLEX_WARPS);
            flex_mbar_init(empty_v + 8 * i, FLEX_WARPS);
        }
        flex_mbar_init_fence();
    }
    __syncthreads(); /* the last barrier of all 384 threads */

    /* Uses of a ring slot: the n-th fill of slot i waits for the release of
     * fill n - 1, the (n - 1)-th completion of its empty barrier. */
    if (wg == 0) { /* producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(FLEX_PRODUCER_REGS) : "memory");
        if (tid != 0) return;
        flex_tile_cursor cursor = {(long long)p.B * p.Hq * p.mask_nq * p.tiles_per_row, -1};
        flex_tile tile;
        int g = 0; /* kv steps issued so far, over every tile */
        for (int k = 0;; k++) {
            const bool have = flex_next_tile(p, cursor, tile);
            const int qb = k % FLEX_Q_BUFS;
            if (k >= FLEX_Q_BUFS) flex_mbar_wait(empty_q + 8 * qb, (k / FLEX_Q_BUFS + 1) & 1);
            volatile flex_tile_info *info = &flex_tiles[qb];
            info->b = tile.b, info->h = tile.h, info->q0 = tile.q0;
            info->nsteps = have ? tile.nsteps : -1;
            if (have && tile.nsteps > 0)
                flex_tma_tile<FLEX_BLOCK_M, FLEX_DQ>(sQ + qb * Q_BUF, tm.q, tile.q0, tile.h, tile.b,
                                                     full_q + 8 * qb);
            else
                flex_mbar_arrive(full_q + 8 * qb);
            if (!have) break;
            const int hk = tile.h / (p.Hq / p.Hkv);
            for (int j = 0; j < tile.nsteps; j++, g++) {
                const int st = g & 1;
                const unsigned parity = ((g >> 1) + 1) & 1;
                bool partial;
                const int kv0 = flex_step_kv0(p, tile.walk, j, partial);
                if (g >= 2) flex_mbar_wait(empty_k + 8 * st, parity);
                volatile flex_step_info *step = &flex_steps[st];
                step->kv0 = kv0, step->partial = partial;
#if FLEX_PARTIAL_BITS
                step->bits_at = partial ? flex_step_bits_at(p, tile.walk, j, tile.b, tile.h) : 0;
#endif
                flex_tma_tile<FLEX_BLOCK_N, FLEX_DQ>(sK + st * K_STAGE, tm.k, kv0, hk, tile.b,
                                                     full_k + 8 * st);
                if (g >= 2) flex_mbar_wait(empty_v + 8 * st, parity);
                flex_tma_tile<FLEX_BLOCK_N, FLEX_DV>(sV + st * V_STAGE, tm.v, kv0, hk, tile.b,
                                                     full_v + 8 * st);
            }
        }
        return;
    }

    /* consumers: warpgroup c = wg - 1 owns rows 64 c .. 64 c + 63 */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(FLEX_CONSUMER_REGS) : "memory");
    const int c = wg - 1, cwarp = (tid - 128) >> 5;
    unsigned oob = 0;
    const unsigned long long k_desc0 = flex_sw128_desc(sK, 16);
    const unsigned long long v_desc0 = flex_sw128_desc(sV, FLEX_BLOCK_N * 128);

    float s[FLEX_SM90_NT][4];
    flex_u32 pa[FLEX_BLOCK_N / 16][4];
    if (c == 1) flex_named_arrive(1); /* consumer 0 goes first */
    flex_tile_info cur;               /* the tile whose S is computed */
#if FLEX_TMA_CHAIN
    /* One pipeline over all of the CTA's tiles: iteration g issues S of kv
     * step g (over every tile) beside P V of step g - 1, which at a tile's
     * first step is the previous tile's last, so a tile boundary costs no
     * product. Only the CTA's first step multiplies P = 0 (by its Q tile
     * read as a V stage) and only its last S is not used (it reads a K slot
     * it does not wait for). S belongs to tile `cur` (round k of the Q
     * ring, the CTA's tile number tn), O to the previous tile on a chained
     * first step, whose softmax waits for that product so that the old
     * tile's statistics need no registers. Each warp keeps the coordinates
     * of its last two tiles in shared memory (flex_done; every lane writes
     * the same values and reads its own write), so that they take no
     * registers in the loop either. */
    int k = 0;
    if (flex_take_tile(p, flex_tiles, full_q, empty_q, k, cur, cwarp, lane)) {
        flex_warp_state st;
        flex_init_state(st);
        flex_sm90_clear(pa);
        int tn = 0, j = 0, g = 0;
        flex_done[0][cwarp] = cur;
        bool fresh = true; /* this iteration's P V is the dummy one */
        for (;;) {
            const bool last = j == cur.nsteps; /* the CTA's last tile is done: S unused */
            const bool chained = j == 0 && !fresh;
            if (!last) flex_mbar_wait(full_k + 8 * (g & 1), (g >> 1) & 1);
            if (!fresh) flex_mbar_wait(full_v + 8 * ((g - 1) & 1), ((g - 1) >> 1) & 1);

            flex_sm90_descs d;
            flex_sm90_make_descs(
                d, flex_sw128_desc(sQ + (k % FLEX_Q_BUFS) * Q_BUF + c * 64 * 128, 16),
                k_desc0 + (unsigned long long)(((g & 1) * K_STAGE) >> 4),
                fresh ? flex_sw128_desc(sQ + (k % FLEX_Q_BUFS) * Q_BUF, FLEX_BLOCK_N * 128)
                      : v_desc0 + (unsigned long long)(((((g - 1) & 1) * V_STAGE) >> 4)));
            flex_named_sync(1 + c);
            flex_sm90_issue(s, st.o[0], pa, d);
            flex_named_arrive(2 - c);

            flex_wgmma_wait<1>(); /* S(g) is done; P V still runs */
            flex_pin(s);
            if (chained || last) {
                /* This step's P V finishes O: store it and start the next
                 * tile's statistics (S(g)'s softmax then runs after the
                 * product instead of beside it, once a tile). */
                flex_wgmma_wait<0>();
                flex_pin(st.o[0]);
                const flex_tile_info &done = flex_done[(tn - chained) & 1][cwarp];
                flex_store_output(p, st, done.b, done.h, done.q0, cwarp, lane);
                st.m[0][0] = st.m[0][1] = FLEX_NEG_INF;
                st.l[0][0] = st.l[0][1] = 0.0f;
            }
            float alphas[2] = {1.0f, 1.0f};
            flex_u32 pa_next[FLEX_BLOCK_N / 16][4];
            if (!last) {
                /* The step's kv block, read before its K stage is released. */
#if FLEX_STEP_CUTS
                const flex_step_info info = flex_read_step(steps, g & 1);
                const int kv0 = info.kv0;
                const bool partial = info.partial != 0;
                const int bits_at = FLEX_PARTIAL_BITS ? info.bits_at : 0;
#else
                const int kv0 = flex_steps[g & 1].kv0;
                const bool partial = flex_steps[g & 1].partial != 0;
                const int bits_at = FLEX_PARTIAL_BITS ? flex_steps[g & 1].bits_at : 0;
#endif
                if (lane == 0) flex_mbar_arrive(empty_k + 8 * (g & 1));
                flex_sm90_probs(p, st, s, pa_next, alphas, cur.b, cur.h, cur.q0 + cwarp * 16, kv0,
                                partial, cur.q0 + FLEX_BLOCK_M > p.Lq, bits_at, lane, oob,
                                FLEX_DIAG_TABLE(cwarp));
            }
            flex_sm90_wait_pv(st.o[0], pa);
            if (lane == 0) {
                if (!fresh) flex_mbar_arrive(empty_v + 8 * ((g - 1) & 1));
                /* the tile's last read of its Q buffer */
                if (j == cur.nsteps - 1) flex_mbar_arrive(empty_q + 8 * (k % FLEX_Q_BUFS));
            }
            if (last) break;
            if (fresh || chained)
                flex_sm90_clear(st.o[0]);
            else
                flex_rescale(st.o[0], alphas);
            flex_sm90_take_probs(pa, pa_next, s);
            fresh = false;
            g++;
            /* After a tile's last step, the next tile with steps chains on;
             * without one the next iteration is the last. */
            if (++j == cur.nsteps) {
                k++;
                if (flex_take_tile(p, flex_tiles, full_q, empty_q, k, cur, cwarp, lane))
                    j = 0, flex_done[++tn & 1][cwarp] = cur;
                else
                    cur.nsteps = j;
            }
        }
    }
#else
    int g = 0; /* kv steps consumed so far, over every tile */
    for (int k = 0; flex_take_tile(p, flex_tiles, full_q, empty_q, k, cur, cwarp, lane); k++) {
        const int qb = k % FLEX_Q_BUFS, nsteps = cur.nsteps;
        flex_warp_state st;
        flex_init_state(st);
        const int qrow0 = cur.q0 + cwarp * 16; /* this warp's 16 rows */
        const bool q_bounds = cur.q0 + FLEX_BLOCK_M > p.Lq;
        const unsigned long long q_desc = flex_sw128_desc(sQ + qb * Q_BUF + c * 64 * 128, 16);
        /* Step 0's product reads the Q tile as its V stage (flex_sm90_clear). */
        const unsigned long long v_desc_first =
            flex_sw128_desc(sQ + qb * Q_BUF, FLEX_BLOCK_N * 128);
        flex_sm90_clear(pa);
        for (int step = 0; step <= nsteps; step++) {
            /* Ring slots of this step's K and of the previous step's V. The
             * last step's S reads a K slot it does not wait for (maybe the
             * next tile's, arriving) and is not used. */
            const bool last = step == nsteps;
            const int gk = g + step, gv = g + step - 1;
            if (!last) flex_mbar_wait(full_k + 8 * (gk & 1), (gk >> 1) & 1);
            if (step > 0) flex_mbar_wait(full_v + 8 * (gv & 1), (gv >> 1) & 1);

            flex_sm90_descs d;
            flex_sm90_make_descs(
                d, q_desc, k_desc0 + (unsigned long long)(((gk & 1) * K_STAGE) >> 4),
                step == 0 ? v_desc_first
                          : v_desc0 + (unsigned long long)((((gv & 1) * V_STAGE) >> 4)));
            flex_named_sync(1 + c);
            flex_sm90_issue(s, st.o[0], pa, d);
            flex_named_arrive(2 - c);

            flex_wgmma_wait<1>(); /* S(step) is done; P V still runs */
            flex_pin(s);
            /* The step's kv block, read before its K stage is released. */
#if FLEX_STEP_CUTS
            flex_step_info info = {0, 0, 0};
            if (!last) info = flex_read_step(steps, gk & 1);
            const int kv0 = info.kv0;
            const bool partial = info.partial != 0;
            const int bits_at = FLEX_PARTIAL_BITS && partial ? info.bits_at : 0;
#else
            const int kv0 = last ? 0 : flex_steps[gk & 1].kv0;
            const bool partial = !last && flex_steps[gk & 1].partial != 0;
            const int bits_at = FLEX_PARTIAL_BITS && partial ? flex_steps[gk & 1].bits_at : 0;
#endif
            if (lane == 0) {
                if (!last)
                    flex_mbar_arrive(empty_k + 8 * (gk & 1));
                else
                    flex_mbar_arrive(empty_q + 8 * qb); /* the tile's last read of Q */
            }
            float alphas[2] = {1.0f, 1.0f};
            flex_u32 pa_next[FLEX_BLOCK_N / 16][4];
            if (!last)
                flex_sm90_probs(p, st, s, pa_next, alphas, cur.b, cur.h, qrow0, kv0, partial,
                                q_bounds, bits_at, lane, oob, FLEX_DIAG_TABLE(cwarp));
            flex_sm90_wait_pv(st.o[0], pa);
            if (step > 0 && lane == 0) flex_mbar_arrive(empty_v + 8 * (gv & 1));
            if (step == 0)
                flex_sm90_clear(st.o[0]);
            else if (!last)
                flex_rescale(st.o[0], alphas);
            if (!last) flex_sm90_take_probs(pa, pa_next, s);
        }
        g += nsteps;
        flex_store_output(p, st, cur.b, cur.h, cur.q0, cwarp, lane);
    }
#endif
    if (c == 0) flex_named_sync(1); /* consumer 1's last turn signal */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
}
#endif /* FLEX_TMA */

#endif /* FLEX_WGMMA */
