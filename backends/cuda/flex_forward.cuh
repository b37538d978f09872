/*
 * flex_forward.cuh: the block-sparse attention forward.
 *
 * The host prepends vendor.cuh, flex_gpu_params.h, a configuration block, the emitted mods
 * (flex_mask_mod, flex_score_mod, struct flex_buffers), flex_common.cuh
 * (the parameter block and the kv walk) and flex_mma_sm80.cuh (the
 * tensor-core primitives), and compiles the result with NVRTC. Configuration macros:
 *   FLEX_ELEM_BF16 / FLEX_ELEM_F16 / FLEX_ELEM_F32   input and output dtype
 *   FLEX_DQ, FLEX_DV      head dims padded to a multiple of 64
 *   FLEX_WARPS            warps per CTA
 *   FLEX_MT               16-row m-tiles per warp (rows per warp = 16 * FLEX_MT)
 *   FLEX_BLOCK_N          kv rows per pipeline step (divides the mask's kv block)
 *   FLEX_VEC              1: q/k/v rows are 16-byte aligned, copy with cp.async
 *   FLEX_SCALE_POSITIVE   1: the softmax scale is > 0
 *
 * f16/bf16 (sm_80 and later): FlashAttention-2-style. A CTA owns
 * FLEX_WARPS * 16 * FLEX_MT query rows of one (batch, head); each warp owns
 * its rows, keeps the online softmax (max m, sum l) and the output
 * accumulator in registers, computes S = Q Kᵀ and O += P V with
 * mma.sync m16n8k16 (fp32 accumulate) fed by ldmatrix from XOR-swizzled
 * shared memory, and the next K/V step is copied with cp.async while the
 * current one is computed (double buffering). Exponentials are exp2 with
 * log2(e) folded into the scale. The kv walk follows the block mask's lists:
 * full blocks evaluate no mask, partial blocks evaluate flex_mask_mod per
 * element or, with FLEX_PARTIAL_BITS, read the bit masks made once for
 * them (flex_partial_bits.cuh), the score mod is applied everywhere.
 *
 * f32: a plain FMA path (one warp per query row), exact f32 arithmetic.
 *
 * On sm_90a the host appends flex_forward_sm90.cuh (FLEX_WGMMA 1), whose
 * kernel replaces the mma.sync one below and reuses everything else here.
 */

#ifndef FLEX_WGMMA
#define FLEX_WGMMA 0
#endif
/* 1: partial blocks read their keep bits from bit masks made once
 * (flex_partial_bits.cuh, placed before this file) instead of evaluating
 * the mask mod. */
#ifndef FLEX_PARTIAL_BITS
#define FLEX_PARTIAL_BITS 0
#endif

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
/* ===================== tensor-core path (f16 / bf16) ===================== */
/* (flex_elem, FLEX_THREADS and the primitives: flex_mma_sm80.cuh) */

#define FLEX_BLOCK_M (FLEX_WARPS * 16 * FLEX_MT)
#define FLEX_STAGES  2 /* K/V pipeline depth; cuda_backend.c sizes shared memory by it */
/* Q fragments stay in registers for the whole kv walk when they fit (saves
 * a tenth of the shared-memory traffic); otherwise they are re-read. */
#if FLEX_MT == 1 && FLEX_DQ <= 128
#define FLEX_Q_IN_REGS 1
#else
#define FLEX_Q_IN_REGS 0
#endif
/* Keys per softmax sub-step: the scores of all m-tiles live in registers at
 * once, so several m-tiles take narrower sub-steps. */
#ifndef FLEX_SUB_N
#if FLEX_MT > 1 && FLEX_BLOCK_N > 32
#define FLEX_SUB_N 32
#else
#define FLEX_SUB_N FLEX_BLOCK_N
#endif
#endif

/* kv0 of step j of the walk: the mask's kv blocks split into steps of
 * FLEX_BLOCK_N keys; partial as in flex_walk_block. */
static FLEX_DEVICE_INLINE int flex_step_kv0(const flex_fwd_params &p, const flex_kv_walk &w, int j,
                                            bool &partial) {
    const int steps_per_block = p.mask_kvblock / FLEX_BLOCK_N;
    const int blk = j / steps_per_block, within = j - blk * steps_per_block;
    return flex_walk_block(p, w, blk, partial) * p.mask_kvblock + within * FLEX_BLOCK_N;
}


/* Without a score mod and with a positive scale the scores stay unscaled
 * until the exponent, where scale * log2(e) and the running max meet in
 * one fused multiply-add (one instruction less per score). */
#if !FLEX_HAS_SCORE_MOD && FLEX_SCALE_POSITIVE
#define FLEX_RAW_SCORES 1
#else
#define FLEX_RAW_SCORES 0
#endif

/* Per-warp state of the online softmax and the output accumulator. */
struct flex_warp_state {
    float o[FLEX_MT][FLEX_DV / 8][4];
    float m[FLEX_MT][2]; /* running max, log2 units */
    float l[FLEX_MT][2]; /* running sum (this thread's columns only) */
};

/* Row and key of score r of n-tile nt in this lane's share of a 16-row
 * m-tile (the m16n8 accumulator layout). */
static FLEX_DEVICE_INLINE int flex_score_q(int qrow0, int lane, int r) {
    return qrow0 + (lane >> 2) + ((r & 2) ? 8 : 0);
}
static FLEX_DEVICE_INLINE int flex_score_kv(int kv0, int lane, int nt, int r) {
    return kv0 + nt * 8 + (lane & 3) * 2 + (r & 1);
}

/* The row (or column) a mod is evaluated at. Where its buffer reads are
 * proved in range over q < Lq and kv < Lkv only (CLAMP: the mask mod's
 * with FLEX_MASK_READS_IN_RANGE, the score mod's with FLEX_SCORE_CLAMP,
 * flex_gpu_score_reads_in_range; otherwise the score mod's are proved over
 * a tile of margin past the ends), the scores of a tile past the end,
 * whose results are discarded, evaluate it at the last row and column. */
template <bool CLAMP> static FLEX_DEVICE_INLINE int flex_mod_index(int i, int len) {
    return CLAMP ? min(i, len - 1) : i;
}

/* Whether the score at (q, kv) of a partial and/or bounds block is kept:
 * inside the sequences and, in a partial block, allowed by the mask mod,
 * whose buffer-bounds bits count only inside the sequences. */
static FLEX_DEVICE_INLINE bool flex_keep(const flex_fwd_params &p, int b, int h, int q, int kv,
                                         bool partial, bool bounds, unsigned &oob) {
    unsigned mask_oob = 0;
    const bool inside = !bounds || (q < p.Lq && kv < p.Lkv);
    const bool allowed =
        flex_mask_mod(b, h, flex_mod_index<FLEX_MASK_READS_IN_RANGE>(q, p.Lq),
                      flex_mod_index<FLEX_MASK_READS_IN_RANGE>(kv, p.Lkv), p.bufs, mask_oob);
    const bool keep = inside && (!partial || allowed);
    oob |= (inside && partial) ? mask_oob : 0u;
    return keep;
}

#if !FLEX_PARTIAL_BITS
/* Keep bits of this lane's scores in a step of NT n-tiles: score r of
 * n-tile nt is bit 4 * (nt & 7) + r of word nt / 8. */
template <int NT> struct flex_keep_words {
    unsigned w[(NT + 7) / 8];
};

/* The keep words for every n-tile pair, from a loop the compiler keeps
 * rolled: one pair's worth of the mask mod in the kernel instead of NT,
 * which is most of the kernel's compile time and registers for masks that
 * read buffers. */
template <int NT>
static FLEX_DEVICE_INLINE void flex_keep_bits(const flex_fwd_params &p, int b, int h, int qrow0,
                                              int kv0, bool partial, bool bounds, int lane,
                                              unsigned &oob, flex_keep_words<NT> &kw) {
    static_assert(NT % 2 == 0, "n-tiles come in pairs");
#pragma unroll
    for (int w = 0; w < (NT + 7) / 8; w++)
        kw.w[w] = 0u;
#pragma unroll 1
    for (int pair = 0; pair < NT / 2; pair++) {
        unsigned pb = 0u;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int nt = 2 * pair + (i >> 2), r = i & 3;
            const int q = flex_score_q(qrow0, lane, r), kv = flex_score_kv(kv0, lane, nt, r);
            pb |= (unsigned)flex_keep(p, b, h, q, kv, partial, bounds, oob) << i;
        }
        /* pair 4 w + j goes to bits [8 j, 8 j + 8) of word w */
#pragma unroll
        for (int w = 0; w < (NT + 7) / 8; w++)
            kw.w[w] |= (pair >> 2) == w ? pb << (8 * (pair & 3)) : 0u;
    }
}

/* Score r of n-tile nt's bit in flex_keep_bits' words. */
template <int NT>
static FLEX_DEVICE_INLINE bool flex_kept(const flex_keep_words<NT> &kw, int nt, int r) {
    return (kw.w[nt >> 3] >> (4 * (nt & 7) + r)) & 1u;
}
#else /* the bit masks of partial blocks (flex_partial_bits.cuh) */
/* The bit block of step j of a tile's walk (a partial step): its word
 * offset in p.bits, from the host's table of one entry per (plane, partial
 * list entry). The plane is the (b, h) the mask mod tells apart where the
 * mask's lists do not (a broadcast mask whose mod reads b or h); the list
 * entry is where the walk finds the block. */
static FLEX_DEVICE_INLINE int flex_step_bits_at(const flex_fwd_params &p, const flex_kv_walk &w,
                                                int j, int b, int h) {
    const int entry = w.part0 + j / (p.mask_kvblock / FLEX_BLOCK_N) - w.n_full;
    const int plane =
        (p.bit_planes_b > 1 ? b * p.bit_planes_h : 0) + (p.bit_planes_h > 1 ? h : 0);
    return p.bit_words[(long long)plane * p.bit_entries + entry];
}

/* Keep bits of this lane's scores in a step of NT n-tiles (flex_keep_bits'
 * words with partial bits): per row half hf (rows qrow0 + lane / 4 + 8 hf),
 * word g holds keys kv0 + 32 g .. + 31, shifted right by 2 (lane & 3) so
 * that score r of n-tile nt is bit (nt & 3) * 8 + (r & 1) of word nt / 4 of
 * half r / 2. */
template <int NT> struct flex_keep_words {
    unsigned w[2][(NT + 3) / 4];
};

template <int NT>
static FLEX_DEVICE_INLINE bool flex_kept(const flex_keep_words<NT> &kw, int nt, int r) {
    return (kw.w[r >> 1][nt >> 2] >> ((nt & 3) * 8 + (r & 1))) & 1u;
}

/* The words of a partial step from its bit block (bits_at: its word
 * offset), or of a full step cut by the sequence ends from the lengths.
 * A partial block's bits are already 0 past the ends. Step kv0 and the
 * tile's rows lie inside one mask block, aligned to its power-of-two
 * sizes. */
template <int NT>
static FLEX_DEVICE_INLINE void flex_keep_words_of(const flex_fwd_params &p, int qrow0, int kv0,
                                                  bool partial, int bits_at, int lane,
                                                  flex_keep_words<NT> &kw) {
    constexpr int G = (NT + 3) / 4; /* 32-key groups of the step */
    const int shift = 2 * (lane & 3);
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = qrow0 + (lane >> 2) + 8 * hf;
        if (partial) {
            const int kin = kv0 & (p.mask_kvblock - 1);
            const unsigned *row = p.bits + bits_at +
                                  (q & (p.mask_qblock - 1)) * p.bit_row_words + (kin >> 5);
            if (G == 4) {
                /* 128 keys of a 128-key step: 16-byte aligned (row_words
                 * and the block's words are multiples of 4, kin of 128) */
                const uint4 v = __ldg(reinterpret_cast<const uint4 *>(row));
                kw.w[hf][0] = v.x >> shift;
                kw.w[hf][G > 1 ? 1 : 0] = v.y >> shift;
                kw.w[hf][G > 2 ? 2 : 0] = v.z >> shift;
                kw.w[hf][G > 3 ? 3 : 0] = v.w >> shift;
            } else {
#pragma unroll
                for (int g = 0; g < G; g++)
                    kw.w[hf][g] = (__ldg(row + g) >> (kin & 31)) >> shift;
            }
        } else {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const int n = p.Lkv - (kv0 + 32 * g); /* keys of the group inside */
                const unsigned keys = n >= 32 ? ~0u : n <= 0 ? 0u : (1u << n) - 1u;
                kw.w[hf][g] = q < p.Lq ? keys >> shift : 0u;
            }
        }
    }
}
#endif

/* The keep words of a masked step (partial and/or cut by the sequence
 * ends): from the partial block's bit mask at word bits_at with
 * FLEX_PARTIAL_BITS, where the mask mod is never called and its bounds
 * bits come from the kernel that made the bits; otherwise from the mask
 * mod. */
template <int NT>
static FLEX_DEVICE_INLINE void flex_step_keep(const flex_fwd_params &p, int b, int h, int qrow0,
                                              int kv0, bool partial, bool bounds, int bits_at,
                                              int lane, unsigned &oob, flex_keep_words<NT> &kw) {
#if FLEX_PARTIAL_BITS
    (void)b;
    (void)h;
    (void)bounds;
    (void)oob;
    flex_keep_words_of<NT>(p, qrow0, kv0, partial, bits_at, lane, kw);
#else
    (void)bits_at;
    flex_keep_bits<NT>(p, b, h, qrow0, kv0, partial, bounds, lane, oob, kw);
#endif
}

/* Keep words rather than the mask mod per score: the rolled loop of
 * flex_keep_bits (FLEX_MASK_BITS), or the bit masks. */
#define FLEX_KEEP_WORDS (FLEX_MASK_BITS || FLEX_PARTIAL_BITS)

/* The first diagonal kv - q of a warp's 16 rows from qrow0 and the keys
 * from kv0: entry 0 of its diagonal table. */
static FLEX_DEVICE_INLINE int flex_diag_first(int qrow0, int kv0) {
    return kv0 - qrow0 - 15;
}

#if FLEX_DIAG_VALUES
/* The score mod's diagonal table (core/mod/diagonal.h) for a warp's 16 rows
 * from qrow0 and the FLEX_BLOCK_N keys from kv0: entry i holds the split's
 * values on the diagonal flex_diag_first + i, the lanes taking the entries
 * in turn. Every lane reads entries other lanes wrote: the first
 * __syncwarp keeps this step's writes after the previous step's reads, the
 * second makes them visible. */
static FLEX_DEVICE_INLINE void flex_diag_fill(const flex_fwd_params &p, float *table, int b, int h,
                                              int qrow0, int kv0, int lane) {
    const int lo = flex_diag_first(qrow0, kv0);
    __syncwarp();
    for (int i = lane; i < FLEX_BLOCK_N + 15; i += 32)
        flex_score_diag_fill(b, h, lo + i, p.bufs, table + i);
    __syncwarp();
}
#endif

/* The score mod at indices (q, kv) of a warp's step whose diagonal table
 * is flex_diag_fill's (NULL without one). */
static FLEX_DEVICE_INLINE float flex_score_at(float x, int b, int h, int q, int kv,
                                              const flex_buffers &bufs, unsigned &oob,
                                              const float *diag, int qrow0, int kv0) {
#if FLEX_DIAG_VALUES
    return flex_score_mod_diag(x, b, h, q, kv, bufs, oob,
                               diag + (kv - q - flex_diag_first(qrow0, kv0)));
#else
    (void)diag;
    (void)qrow0;
    (void)kv0;
    return flex_score_mod(x, b, h, q, kv, bufs, oob);
#endif
}

/* Scores of one 16-row m-tile (NT n-tiles of 8 keys, the m16n8 accumulator
 * layout that wgmma's m64 accumulators share per warp) -> mods, mask and
 * the online-softmax update of the tile's rows (flex_softmax_update).
 * diag: the score mod's diagonal table of the step (FLEX_DIAG_VALUES). */
template <bool MASKED, int NT>
static FLEX_DEVICE_INLINE void
flex_softmax_probs(const flex_fwd_params &p, float (&m)[2], float (&l)[2], float (&s)[NT][4],
                   float (&alphas)[2], int b, int h, int qrow0, int kv0, bool partial, bool bounds,
                   int bits_at, int lane, unsigned &oob, const float *diag = nullptr) {
    (void)diag;
    /* Raw scores only on the unmasked path, which has registers to spare
     * (and the masked path's arithmetic does not depend on where its keep
     * bits come from, so results are the same with and without the bit
     * masks). */
    constexpr bool RAW = FLEX_RAW_SCORES && !MASKED;
#if FLEX_KEEP_WORDS
    flex_keep_words<NT> kw;
    if (MASKED)
        flex_step_keep<NT>(p, b, h, qrow0, kv0, partial, bounds, bits_at, lane, oob, kw);
#else
    (void)bits_at;
#endif
        /* Scores in log2 units (raw: unscaled), modified and masked. */
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int q = flex_score_q(qrow0, lane, r), kv = flex_score_kv(kv0, lane, nt, r);
            float x = s[nt][r];
            /* Without branches (a branch per score keeps the compiler from
             * interleaving the scores): the mods run for every score, the
             * buffer-bounds bits they raise count only where the score is
             * kept (mods have no stores; their loads are clamped). */
#if FLEX_KEEP_WORDS
            const bool keep = !MASKED || flex_kept<NT>(kw, nt, r);
#else
            const bool keep = !MASKED || flex_keep(p, b, h, q, kv, partial, bounds, oob);
#endif
#if FLEX_HAS_SCORE_MOD
            unsigned score_oob = 0;
            /* (the plain path's scores are all inside the sequences) */
            x = flex_score_at(__fmul_rn(x, p.scale), b, h,
                              flex_mod_index<(MASKED && FLEX_SCORE_CLAMP)>(q, p.Lq),
                              flex_mod_index<(MASKED && FLEX_SCORE_CLAMP)>(kv, p.Lkv), p.bufs,
                              score_oob, diag, qrow0, kv0);
            oob |= keep ? score_oob : 0u;
#else
            if (!RAW) x *= p.scale_log2;
#endif
            s[nt][r] = keep ? x : FLEX_NEG_INF;
            (void)q;
            (void)kv;
        }
    }
#if FLEX_HAS_SCORE_MOD
    flex_softmax_update<true>(m, l, s, alphas, FLEX_LOG2E); /* natural units */
#else
    flex_softmax_update<RAW>(m, l, s, alphas, p.scale_log2);
#endif
}

#if FLEX_HAS_SCORE_MOD && !FLEX_SCORE_INDEX_USES_SCORE
/* The score mod's buffer-bounds bits at one score of a warp's step: the
 * mod with its value unused, so the compiler keeps only the index
 * arithmetic of its reads and, with a diagonal table, the read of the
 * entry's bits (valid because no read index depends on the score). */
static FLEX_DEVICE_INLINE unsigned flex_score_oob(int b, int h, int q, int kv,
                                                  const flex_buffers &bufs, const float *diag,
                                                  int qrow0, int kv0) {
    unsigned oob = 0;
    (void)flex_score_at(0.0f, b, h, q, kv, bufs, oob, diag, qrow0, kv0);
    return oob;
}

/* The split form of flex_softmax_probs for kernels with a score mod: the
 * score mod runs once for the tile whether or not it is masked (one copy of
 * it in the kernel instead of two, which is most of the compile time of an
 * expensive mod), the mask and the bounds only where needed. Results are
 * those of flex_softmax_probs, buffer-bounds bits included. */
template <int NT>
static FLEX_DEVICE_INLINE void
flex_softmax_probs_split(const flex_fwd_params &p, float (&m)[2], float (&l)[2], float (&s)[NT][4],
                         float (&alphas)[2], int b, int h, int qrow0, int kv0, bool partial,
                         bool bounds, int bits_at, int lane, unsigned &oob,
                         const float *diag = nullptr) {
    unsigned score_oob = 0; /* of every score, kept or not */
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int q = flex_score_q(qrow0, lane, r), kv = flex_score_kv(kv0, lane, nt, r);
            s[nt][r] = flex_score_at(__fmul_rn(s[nt][r], p.scale), b, h,
                                     flex_mod_index<FLEX_SCORE_CLAMP>(q, p.Lq),
                                     flex_mod_index<FLEX_SCORE_CLAMP>(kv, p.Lkv), p.bufs, score_oob,
                                     diag, qrow0, kv0);
        }
    if (partial || bounds) {
#if FLEX_KEEP_WORDS
        flex_keep_words<NT> kw;
        flex_step_keep<NT>(p, b, h, qrow0, kv0, partial, bounds, bits_at, lane, oob, kw);
#else
        (void)bits_at;
#endif
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int q = flex_score_q(qrow0, lane, r), kv = flex_score_kv(kv0, lane, nt, r);
#if FLEX_KEEP_WORDS
                const bool keep = flex_kept<NT>(kw, nt, r);
#else
                const bool keep = flex_keep(p, b, h, q, kv, partial, bounds, oob);
#endif
                oob |= keep ? flex_score_oob(b, h, flex_mod_index<FLEX_SCORE_CLAMP>(q, p.Lq),
                                             flex_mod_index<FLEX_SCORE_CLAMP>(kv, p.Lkv), p.bufs,
                                             diag, qrow0, kv0)
                            : 0u;
                s[nt][r] = keep ? s[nt][r] : FLEX_NEG_INF;
            }
    } else {
        oob |= score_oob; /* every score is kept */
    }
    flex_softmax_update<true>(m, l, s, alphas, FLEX_LOG2E); /* natural units */
}
#endif

/* Scores of one m-tile -> probabilities, rescaled accumulators, P fragments. */
template <bool MASKED>
static FLEX_DEVICE_INLINE void
flex_softmax_tile(const flex_fwd_params &p, flex_warp_state &st, float (&s)[FLEX_SUB_N / 8][4],
                  flex_u32 (&pa)[FLEX_SUB_N / 16][4], int mt, int b, int h, int qrow0, int kv0,
                  bool partial, bool bounds, int bits_at, int lane, unsigned &oob) {
    float alphas[2];
    flex_softmax_probs<MASKED, FLEX_SUB_N / 8>(p, st.m[mt], st.l[mt], s, alphas, b, h, qrow0, kv0,
                                               partial, bounds, bits_at, lane, oob);
    flex_rescale(st.o[mt], alphas);
    flex_pack_probs<FLEX_SUB_N / 8>(s, pa);
}

/* One kv step: S = Q Kᵀ, mods, online softmax, O += P V, in sub-steps of
 * FLEX_SUB_N keys (so the scores of several m-tiles fit in registers beside
 * their accumulators). MASKED selects the path that evaluates the mask mod
 * (partial blocks) and/or the sequence ends; the plain path does neither.
 * With several m-tiles per warp every K and V fragment read from shared
 * memory feeds each of them, which halves (MT = 2) the shared-memory
 * traffic per tensor-core operation. */
template <bool MASKED>
static FLEX_DEVICE_INLINE void flex_step(const flex_fwd_params &p, flex_warp_state &st,
                                         const flex_u32 (&qf)[FLEX_MT][FLEX_DQ / 16][4],
                                         flex_u32 sQ, flex_u32 sK, flex_u32 sV, int b, int h,
                                         int q0, int kv0, bool partial, bool bounds, int bits_at,
                                         int warp, int lane, unsigned &oob) {
    constexpr int NT = FLEX_SUB_N / 8;
    const int wrow = warp * 16 * FLEX_MT;
    /* Per-lane fragment bases (see flex_frag_base). */
    const flex_u32 k_base =
        flex_frag_base(sK, ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1, FLEX_DQ);
    const flex_u32 v_base =
        flex_frag_base(sV, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4, FLEX_DV);
#if !FLEX_Q_IN_REGS
    const flex_u32 q_base = flex_frag_base(sQ, wrow + (lane & 15), lane >> 4, FLEX_DQ);
#endif
    (void)qf;
    (void)sQ;

    /* Rolled: the sub-steps share one copy of the inlined mods (half the
     * code to compile, no measurable cost). */
#pragma unroll 1
    for (int sub = 0; sub < FLEX_BLOCK_N / FLEX_SUB_N; sub++) {
        const flex_u32 k_sub = k_base + sub * FLEX_SUB_N * FLEX_DQ * 2;
        const flex_u32 v_sub = v_base + sub * FLEX_SUB_N * FLEX_DV * 2;
        float s[FLEX_MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < FLEX_MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++)
                    s[mt][nt][r] = 0.0f;
#if FLEX_Q_IN_REGS
#pragma unroll
#else
#pragma unroll 1
#endif
        for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
            flex_u32 a[FLEX_MT][4];
#pragma unroll
            for (int mt = 0; mt < FLEX_MT; mt++) {
#if FLEX_Q_IN_REGS
#pragma unroll
                for (int r = 0; r < 4; r++)
                    a[mt][r] = qf[mt][kk][r];
#else
                flex_ldmatrix_x4(a[mt], flex_frag_at(q_base, kk) + mt * 16 * FLEX_DQ * 2);
#endif
            }
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4(bf, flex_frag_at(k_sub, kk) + np * 16 * FLEX_DQ * 2);
#pragma unroll
                for (int mt = 0; mt < FLEX_MT; mt++) {
                    flex_mma_pair(s[mt][2 * np], s[mt][2 * np + 1], a[mt], bf);
                }
            }
        }

        flex_u32 pa[FLEX_MT][FLEX_SUB_N / 16][4];
#pragma unroll
        for (int mt = 0; mt < FLEX_MT; mt++)
            flex_softmax_tile<MASKED>(p, st, s[mt], pa[mt], mt, b, h, q0 + wrow + mt * 16,
                                      kv0 + sub * FLEX_SUB_N, partial, bounds, bits_at, lane, oob);

            /* O += P V */
#pragma unroll
        for (int kk = 0; kk < FLEX_SUB_N / 16; kk++) {
#pragma unroll
            for (int dp = 0; dp < FLEX_DV / 16; dp++) {
                flex_u32 bf[4];
                flex_ldmatrix_x4_trans(bf, flex_frag_at(v_sub, dp) + kk * 16 * FLEX_DV * 2);
#pragma unroll
                for (int mt = 0; mt < FLEX_MT; mt++) {
                    flex_mma_pair(st.o[mt][2 * dp], st.o[mt][2 * dp + 1], pa[mt][kk], bf);
                }
            }
        }
    }
}

/* One query tile: FLEX_BLOCK_M rows of one (batch, head) and their kv walk. */
struct flex_tile {
    int b, h, q0;
    const flex_elem *gq, *gk, *gv; /* this (batch, head)'s rows; k and v of its kv head */
    flex_kv_walk walk;
    int nsteps; /* kv steps of FLEX_BLOCK_N keys */
};

/* The tile of (batch, head) bh at grid row y: the mask's q-block row
 * (heaviest first when the host ordered them) and the tile within it; false
 * when the tile starts past the end. */
static FLEX_DEVICE_INLINE bool flex_tile_at(const flex_fwd_params &p, int bh, int y, flex_tile &t) {
    t.b = bh / p.Hq;
    t.h = bh % p.Hq;
    const int hk = t.h / (p.Hq / p.Hkv);
    const int rank = y / p.tiles_per_row, sub = y % p.tiles_per_row;
    const int mrow = p.row_order ? p.row_order[rank] : rank;
    t.q0 = mrow * p.mask_qblock + sub * FLEX_BLOCK_M;
    if (t.q0 >= p.Lq) return false;
    t.gq = (const flex_elem *)p.q + t.b * p.q_sb + t.h * p.q_sh;
    t.gk = (const flex_elem *)p.k + t.b * p.k_sb + hk * p.k_sh;
    t.gv = (const flex_elem *)p.v + t.b * p.v_sb + hk * p.v_sh;
    t.walk = flex_walk_for(p, t.b, t.h, mrow);
    t.nsteps = (t.walk.n_full + t.walk.n_part) * (p.mask_kvblock / FLEX_BLOCK_N);
    return true;
}

/* Tile t of the grid order: groups of p.head_group consecutive (batch,
 * head) pairs, one after the other; within a group the mask's rows go
 * heaviest first and the pairs of the group alternate. The tiles in flight
 * at one time then read the K and V of a few heads, which L2 keeps, where
 * (batch, head) fastest would stream every head's K and V from memory on
 * every round of tiles. head_group 0 is that order. */
static FLEX_DEVICE_INLINE bool flex_tile_of(const flex_fwd_params &p, long long t,
                                            flex_tile &tile) {
    const int bh_count = p.B * p.Hq;
    if (p.head_group <= 0) return flex_tile_at(p, (int)(t % bh_count), (int)(t / bh_count), tile);
    const long long span = (long long)p.mask_nq * p.tiles_per_row * p.head_group;
    const long long group = t / span, within = t - group * span;
    const int bh0 = (int)group * p.head_group;
    const int n = bh_count - bh0 < p.head_group ? bh_count - bh0 : p.head_group;
    return flex_tile_at(p, bh0 + (int)(within % n), (int)(within / n), tile);
}

/* The tile of this CTA in a grid of (batch x head, tile rows): its linear
 * index taken in flex_tile_of's order. */
static FLEX_DEVICE_INLINE bool flex_tile_for(const flex_fwd_params &p, flex_tile &t) {
    return flex_tile_of(p, (long long)blockIdx.y * gridDim.x + blockIdx.x, t);
}

/* Running max -inf, sums and accumulators 0. */
static FLEX_DEVICE_INLINE void flex_init_state(flex_warp_state &st) {
#pragma unroll
    for (int mt = 0; mt < FLEX_MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            st.m[mt][hf] = FLEX_NEG_INF;
            st.l[mt][hf] = 0.0f;
        }
#pragma unroll
        for (int dt = 0; dt < FLEX_DV / 8; dt++)
#pragma unroll
            for (int r = 0; r < 4; r++)
                st.o[mt][dt][r] = 0.0f;
    }
}

/* Epilogue: out = O / l, lse = (m + log2 l) ln 2; empty rows (l == 0): 0 and
 * -inf; rows with a kept NaN or +inf score (l NaN: the sum takes the NaN
 * that fmaxf drops from the max): NaN and NaN, as in PyTorch.
 * Warp `warp` owns rows q0 + 16 * FLEX_MT * warp onwards (in both kernels). */
static FLEX_DEVICE_INLINE void flex_store_output(const flex_fwd_params &p,
                                                 const flex_warp_state &st, int b, int h, int q0,
                                                 int warp, int lane) {
    flex_elem *go = (flex_elem *)p.out + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int mt = 0; mt < FLEX_MT; mt++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float l = st.l[mt][hf];
            l += FLEX_SHFL_XOR(l, 1);
            l += FLEX_SHFL_XOR(l, 2);
            const float inv = l != 0.0f ? 1.0f / l : 0.0f;
            const int q = q0 + warp * 16 * FLEX_MT + mt * 16 + (lane >> 2) + hf * 8;
            if (q < p.Lq) {
                flex_elem *orow = go + (long long)q * p.o_ss;
#pragma unroll
                for (int dt = 0; dt < FLEX_DV / 8; dt++) {
                    const int col = dt * 8 + (lane & 3) * 2;
                    const float x0 = st.o[mt][dt][2 * hf] * inv,
                                x1 = st.o[mt][dt][2 * hf + 1] * inv;
                    /* (the guards also cost the chained Hopper kernel, which
                     * stores inside its step loop, ~100 bytes of spills) */
#if FLEX_VEC
                    if (FLEX_DV_EXACT || col < p.Dv) *(flex_u32 *)(orow + col) = flex_pack2(x0, x1);
#else
                    if (FLEX_DV_EXACT || col < p.Dv) orow[col] = flex_to_elem(x0);
                    if (FLEX_DV_EXACT || col + 1 < p.Dv) orow[col + 1] = flex_to_elem(x1);
#endif
                }
                if (p.lse && (lane & 3) == 0) {
                    const float lse =
                        l != 0.0f ? (st.m[mt][hf] + log2f(l)) * FLEX_LN2 : FLEX_NEG_INF;
                    p.lse[b * p.l_sb + h * p.l_sh + (long long)q * p.l_ss] = lse;
                }
            }
        }
    }
}

#if !FLEX_WGMMA
extern "C" __global__ void __launch_bounds__(FLEX_THREADS)
    flex_forward_kernel(const flex_fwd_params p) {
    extern __shared__ __align__(128) unsigned char flex_smem[];
    /* 32-bit shared-memory addresses (bytes): Q, then FLEX_STAGES K and V stages. */
    const flex_u32 sQ = flex_smem_addr(flex_smem);
    const flex_u32 sK = sQ + FLEX_BLOCK_M * FLEX_DQ * 2;
    const flex_u32 sV = sK + FLEX_STAGES * FLEX_BLOCK_N * FLEX_DQ * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
#if FLEX_PARTIAL_BITS
    flex_raise_bits_oob(p);
#endif
    flex_tile tile;
    if (!flex_tile_for(p, tile)) return;
    const int nsteps = tile.nsteps;
    flex_warp_state st;
    flex_init_state(st);

    /* Double buffering: the copy of step s + 1 is issued at the top of step
     * s, into the stage step s - 1 used (the first barrier retires its
     * readers), and waited for before step s + 1 (the second barrier
     * publishes it). A three-stage, one-barrier variant measured slower on
     * H100 (less L1 beside 128 KB of shared memory). */
    flex_load_tile<FLEX_BLOCK_M, FLEX_DQ>(sQ, tile.gq, p.q_ss, tile.q0, p.Lq, p.D, tid);
    int next_kv0 = 0, next_bits_at = 0;
    bool next_partial = false;
    if (tile.nsteps > 0) {
        next_kv0 = flex_step_kv0(p, tile.walk, 0, next_partial);
#if FLEX_PARTIAL_BITS
        if (next_partial) next_bits_at = flex_step_bits_at(p, tile.walk, 0, tile.b, tile.h);
#endif
        flex_load_tile<FLEX_BLOCK_N, FLEX_DQ>(sK, tile.gk, p.k_ss, next_kv0, p.Lkv, p.D, tid);
        flex_load_tile<FLEX_BLOCK_N, FLEX_DV>(sV, tile.gv, p.v_ss, next_kv0, p.Lkv, p.Dv, tid);
    }
    flex_cp_async_commit();

#if FLEX_Q_IN_REGS
    flex_u32 qf[FLEX_MT][FLEX_DQ / 16][4];
    flex_cp_async_wait<0>(); /* Q (and the first K/V step) have landed */
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < FLEX_DQ / 16; kk++)
        flex_ldmatrix_x4(
            qf[0][kk],
            flex_frag_at(flex_frag_base(sQ, warp * 16 + (lane & 15), lane >> 4, FLEX_DQ), kk));
#else
    flex_u32 qf[FLEX_MT][FLEX_DQ / 16][4]; /* unused: Q is read from shared memory */
#endif
    const bool q_bounds = tile.q0 + FLEX_BLOCK_M > p.Lq;
    unsigned oob = 0; /* buffer slots this thread read out of range */
    for (int step = 0; step < nsteps; step++) {
        const int kv0 = next_kv0, bits_at = next_bits_at;
        const bool partial = next_partial;
        const int stage = step & 1;
        __syncthreads(); /* everyone is done with the stage we refill next */
        if (step + 1 < nsteps) {
            next_kv0 = flex_step_kv0(p, tile.walk, step + 1, next_partial);
#if FLEX_PARTIAL_BITS
            if (next_partial)
                next_bits_at = flex_step_bits_at(p, tile.walk, step + 1, tile.b, tile.h);
#endif
            const int ns = stage ^ 1;
            flex_load_tile<FLEX_BLOCK_N, FLEX_DQ>(sK + ns * FLEX_BLOCK_N * FLEX_DQ * 2, tile.gk,
                                                  p.k_ss, next_kv0, p.Lkv, p.D, tid);
            flex_load_tile<FLEX_BLOCK_N, FLEX_DV>(sV + ns * FLEX_BLOCK_N * FLEX_DV * 2, tile.gv,
                                                  p.v_ss, next_kv0, p.Lkv, p.Dv, tid);
        }
        flex_cp_async_commit();
        flex_cp_async_wait<1>();
        __syncthreads();
        if (kv0 >= p.Lkv) continue; /* a step past the end of a clipped last block */
        const bool bounds = q_bounds || kv0 + FLEX_BLOCK_N > p.Lkv;
        const flex_u32 k_t = sK + stage * FLEX_BLOCK_N * FLEX_DQ * 2;
        const flex_u32 v_t = sV + stage * FLEX_BLOCK_N * FLEX_DV * 2;
        if (partial || bounds)
            flex_step<true>(p, st, qf, sQ, k_t, v_t, tile.b, tile.h, tile.q0, kv0, partial, bounds,
                            bits_at, warp, lane, oob);
        else
            flex_step<false>(p, st, qf, sQ, k_t, v_t, tile.b, tile.h, tile.q0, kv0, false, false, 0,
                             warp, lane, oob);
    }

    flex_cp_async_wait<0>(); /* nothing in flight when the CTA ends */
    if (oob) atomicOr(p.bufs.bounds_flag, oob);

    flex_store_output(p, st, tile.b, tile.h, tile.q0, warp, lane);
}
#endif /* !FLEX_WGMMA */

#else
/* ============================ f32 FMA path ============================= */

#define FLEX_ROWS_PER_CTA 4
#define FLEX_PER_LANE_Q   (FLEX_DQ / 32)
#define FLEX_PER_LANE_V   (FLEX_DV / 32)

extern "C" __global__ void __launch_bounds__(FLEX_ROWS_PER_CTA * 32)
    flex_forward_kernel(const flex_fwd_params p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.x;
    const int b = bh / p.Hq, h = bh % p.Hq;
    const int hk = h / (p.Hq / p.Hkv);
    const int q = blockIdx.y * FLEX_ROWS_PER_CTA + warp;
    if (q >= p.Lq) return;
    const float *gq = (const float *)p.q + b * p.q_sb + h * p.q_sh + (long long)q * p.q_ss;
    const float *gk = (const float *)p.k + b * p.k_sb + hk * p.k_sh;
    const float *gv = (const float *)p.v + b * p.v_sb + hk * p.v_sh;

    float qv[FLEX_PER_LANE_Q], acc[FLEX_PER_LANE_V];
#pragma unroll
    for (int i = 0; i < FLEX_PER_LANE_Q; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < p.D ? gq[d] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < FLEX_PER_LANE_V; i++)
        acc[i] = 0.0f;
    float m = FLEX_NEG_INF, l = 0.0f;
    unsigned oob = 0;

    const int mrow = q / p.mask_qblock;
    const flex_kv_walk walk = flex_walk_for(p, b, h, mrow);
    for (int i = 0; i < walk.n_full + walk.n_part; i++) {
        bool partial;
        const int kb = flex_walk_block(p, walk, i, partial);
        const int k_end = min(p.Lkv, (kb + 1) * p.mask_kvblock);
        for (int kv = kb * p.mask_kvblock; kv < k_end; kv++) {
            if (partial && !flex_mask_mod(b, h, q, kv, p.bufs, oob)) continue;
            const float *krow = gk + (long long)kv * p.k_ss;
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < FLEX_PER_LANE_Q; j++) {
                const int d = lane + 32 * j;
                if (d < p.D) dot = fmaf(qv[j], krow[d], dot);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                dot += FLEX_SHFL_XOR(dot, off);
            float x = dot * p.scale;
            x = flex_score_mod(x, b, h, q, kv, p.bufs, oob);
            if (x == FLEX_NEG_INF) continue;
            const float m_new = fmaxf(m, x);
            const float alpha = expf(m - m_new);
            const float e = expf(x - m_new);
            l = l * alpha + e;
            m = m_new;
            const float *vrow = gv + (long long)kv * p.v_ss;
#pragma unroll
            for (int j = 0; j < FLEX_PER_LANE_V; j++) {
                const int d = lane + 32 * j;
                acc[j] = fmaf(e, d < p.Dv ? vrow[d] : 0.0f, acc[j] * alpha);
            }
        }
    }
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    float *go = (float *)p.out + b * p.o_sb + h * p.o_sh + (long long)q * p.o_ss;
    const float inv = l != 0.0f ? 1.0f / l : 0.0f; /* NaN l: a NaN row */
#pragma unroll
    for (int j = 0; j < FLEX_PER_LANE_V; j++) {
        const int d = lane + 32 * j;
        if (d < p.Dv) go[d] = acc[j] * inv;
    }
    if (p.lse && lane == 0)
        p.lse[b * p.l_sb + h * p.l_sh + (long long)q * p.l_ss] =
            l != 0.0f ? m + logf(l) : FLEX_NEG_INF;
}
#endif
