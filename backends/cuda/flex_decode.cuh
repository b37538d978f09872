/*
 * flex_decode.cuh: decode and serving (docs/decode.md). A few query rows
 * (Lq up to 16) against a long, possibly paged, KV cache, with per-batch
 * query offsets and kv lengths that are kernel arguments, never params.
 *
 * The host prepends vendor.cuh, flex_gpu_params.h, a configuration block, the emitted mods,
 * core/lse_merge.h, flex_common.cuh and flex_mma_sm80.cuh, and appends
 * flex_splitkv_combine.cuh. Configuration macros (besides the forward's
 * FLEX_ELEM_*, FLEX_DQ, FLEX_DV, FLEX_DV_EXACT, FLEX_VEC):
 *   FLEX_DEC_RT   16-row tiles of packed query rows per CTA (1, 2 or 4)
 *
 * Work: one CTA per (batch, kv head, chunk of packed rows, kv split).
 *   - GQA packing: the rows of a CTA are the Lq rows of every query head
 *     of one kv group, row r = g * Lq + i for head hk * G + g, so a kv
 *     head's K and V are read once for its whole group.
 *   - Split-KV: batch b's kv range [0, kv_lengths[b]) is cut into
 *     `splits` pieces of whole 64-key steps; each CTA leaves its piece's
 *     normalised output and LSE, and flex_splitkv_combine merges them by
 *     core/lse_merge.h. With one split the CTA writes out and lse itself.
 *   - Four warps: FLEX_DEC_RT row tiles times 4 / FLEX_DEC_RT key groups;
 *     a warp computes its 16 rows against its share of each 64-key step
 *     with mma.sync (S = Q Kᵀ, O += P V), keeps its own online softmax, and
 *     the key groups are merged through shared memory at the end. With one
 *     row tile (Lq * G <= 16, the usual decode) every warp reads a quarter
 *     of each step, so the tensor cores never wait on padding rows.
 *   - Paging: key position p of batch b is row p % page_size of page
 *     page_table[b][p / page_size]; each row of a step is located on its
 *     own, so pages of any size (not only multiples of 64) work.
 *   - Block masks, in logical positions: the rows of a CTA may lie in
 *     several q blocks and (per-head masks) several heads. Their distinct
 *     mask rows ("keys") get a row of block classes in shared memory for a
 *     window of 4096 keys, filled from the mask's kv-major lists; a step
 *     is skipped when every key finds it empty, runs unmasked when every
 *     key finds it full, and otherwise evaluates the class (and the mask
 *     mod in partial blocks) per score.
 *   - Device-resident offsets, lengths and page numbers out of range are
 *     clamped and reported through the bounds flag's decode word (bit 0
 *     q_offsets, 1 kv_lengths, 2 page_table), which flex_synchronize reads.
 *
 * f32: the exact path, one warp per (row, split), plain FMA, the row's own
 * mask lists; same partials and combine.
 */

/* Parameters: the members of the head (struct flex_gpu_dec_head,
 * flex_gpu_params.h), then the forward's whole block (q, k, v, out, lse,
 * mask, dims, scale, mods' buffers) last. */
struct flex_dec_params {
    FLEX_GPU_DEC_HEAD_FIELDS
    flex_fwd_params f;
};
/* The host writes the forward block right after the head (flex_gpu_dec_blob). */
static_assert(sizeof(flex_dec_params) == FLEX_GPU_DEC_FWD_AT + sizeof(flex_fwd_params),
              "struct flex_dec_params: the forward block follows the head unpadded");

#define FLEX_DEC_STEP    64   /* keys per pipeline step */
#define FLEX_DEC_WINDOW  4096 /* keys whose block classes are in shared memory at once */
/* Block classes in the shared-memory table. */
#define FLEX_DEC_EMPTY   0
#define FLEX_DEC_PARTIAL 1
#define FLEX_DEC_FULL    2
#define FLEX_DEC_FLAG_QO 1u
#define FLEX_DEC_FLAG_KL 2u
#define FLEX_DEC_FLAG_PT 4u

/* Batch b's query offset and kv length, clamped into range. */
static FLEX_DEVICE_INLINE int flex_dec_kv_end(const flex_dec_params &dp, int b, unsigned &bad) {
    if (!dp.kv_lengths) return dp.kv_len;
    const int n = dp.kv_lengths[b * dp.kl_stride];
    if (n < 0 || n > dp.kv_len) {
        bad |= FLEX_DEC_FLAG_KL;
        return n < 0 ? 0 : dp.kv_len;
    }
    return n;
}
static FLEX_DEVICE_INLINE int flex_dec_q_offset(const flex_dec_params &dp, int b, int kv_end,
                                                unsigned &bad) {
    if (!dp.q_offsets) return 0;
    const int o = dp.q_offsets[b * dp.qo_stride];
    if (o < 0 || o > kv_end) {
        bad |= FLEX_DEC_FLAG_QO;
        return o < 0 ? 0 : kv_end;
    }
    /* rows past a given block mask would find no mask row of their own */
    if (!dp.f.dense && o + dp.f.Lq > dp.f.mask_nq * dp.f.mask_qblock) bad |= FLEX_DEC_FLAG_QO;
    return o;
}

/* Batch b's piece s of its kv range: [lo, hi), whole steps. */
static FLEX_DEVICE_INLINE void flex_dec_split_range(const flex_dec_params &dp, int kv_end, int s,
                                                    int &lo, int &hi) {
    const int steps = (kv_end + FLEX_DEC_STEP - 1) / FLEX_DEC_STEP;
    const int per = (steps + dp.splits - 1) / dp.splits;
    lo = min(kv_end, s * per * FLEX_DEC_STEP);
    hi = min(kv_end, (s + 1) * per * FLEX_DEC_STEP);
}

/* Element offset of key position pos (< kv_end) of batch b in a k or v
 * whose batch (paged: page) and row strides are sb and ss. */
static FLEX_DEVICE_INLINE long long flex_dec_row(const flex_dec_params &dp, int b, int pos,
                                                 long long sb, long long ss, unsigned &bad) {
    if (!dp.page_table) return b * sb + (long long)pos * ss;
    const int slot = pos / dp.page_size;
    int page = dp.page_table[b * dp.pt_sb + slot * dp.pt_sp];
    if (page < 0 || page >= dp.num_pages) {
        bad |= FLEX_DEC_FLAG_PT;
        page = page < 0 ? 0 : dp.num_pages - 1;
    }
    return page * sb + (long long)(pos - slot * dp.page_size) * ss;
}

/* Where piece s of row i of (b, h) leaves its output and LSE. */
static FLEX_DEVICE_INLINE long long flex_dec_piece(const flex_dec_params &dp, int b, int h, int s,
                                                   int i) {
    return (((long long)b * dp.f.Hq + h) * dp.splits + s) * dp.f.Lq + i;
}

/* One row's merged result (o already divided by l, or 0 and lse -inf for
 * an empty row): into out/lse with one split, else into the partials. */
static FLEX_DEVICE_INLINE void flex_dec_lse_store(const flex_dec_params &dp, int b, int h, int s,
                                                  int i, float lse) {
    const flex_fwd_params &p = dp.f;
    if (dp.splits > 1)
        dp.part_lse[flex_dec_piece(dp, b, h, s, i)] = lse;
    else if (p.lse)
        p.lse[b * p.l_sb + h * p.l_sh + (long long)i * p.l_ss] = lse;
}

/* out[b, h, i, c] = x in the attention dtype. */
static FLEX_DEVICE_INLINE void flex_dec_store_out(const flex_fwd_params &p, int b, int h, int i,
                                                  int c, float x) {
    const long long at = b * p.o_sb + h * p.o_sh + (long long)i * p.o_ss + c;
#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
    ((flex_u16 *)p.out)[at] = flex_to_elem(x);
#else
    ((float *)p.out)[at] = x;
#endif
}

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)
/* ===================== tensor-core path (f16 / bf16) ===================== */

#define FLEX_DEC_ROWS (16 * FLEX_DEC_RT)   /* packed rows per CTA */
#define FLEX_DEC_KG   (4 / FLEX_DEC_RT)    /* key groups */
#define FLEX_DEC_NW   (FLEX_DEC_STEP / FLEX_DEC_KG) /* keys per warp per step */
#define FLEX_DEC_NT   (FLEX_DEC_NW / 8)    /* n-tiles per warp per step */
#define FLEX_DEC_CLASS_COLS (FLEX_DEC_WINDOW / 16 + 1) /* mask blocks of a window, at most */
#define FLEX_DEC_WSTEPS (FLEX_DEC_WINDOW / FLEX_DEC_STEP)

enum { FLEX_DEC_SKIP = 0, FLEX_DEC_PLAIN = 1, FLEX_DEC_MASKED = 2 };

/* Shared memory besides the Q tile and the K/V stages. */
struct flex_dec_smem {
    int key_of[FLEX_DEC_ROWS];           /* row -> index of its mask row in key_row */
    int key_row[FLEX_DEC_ROWS];          /* distinct mask rows (list row numbers) */
    int nkeys;
    unsigned char step_kind[FLEX_DEC_WSTEPS];
    unsigned char cls[FLEX_DEC_ROWS][FLEX_DEC_CLASS_COLS]; /* [key][block - window's first] */
};

/* The mask row (an index of the kv-major lists) of packed row r. */
static FLEX_DEVICE_INLINE int flex_dec_mask_row(const flex_dec_params &dp, int b, int hk, int q_off,
                                                int r) {
    const flex_fwd_params &p = dp.f;
    const int rr = min(r, dp.rows - 1);
    const int h = hk * dp.group + rr / p.Lq, q = q_off + rr % p.Lq;
    const int mb = p.mask_B > 1 ? b : 0, mh = p.mask_H > 1 ? h : 0;
    return (mb * p.mask_H + mh) * p.mask_nq + min(q / p.mask_qblock, p.mask_nq - 1);
}

/* Distinct mask rows of the CTA's rows: runs of equal rows share one
 * (rows of one head are in order of position, so only runs can repeat;
 * a row repeated across heads costs a second copy, never a wrong one). */
static FLEX_DEVICE_INLINE void flex_dec_find_keys(const flex_dec_params &dp, flex_dec_smem &sm,
                                                  int b, int hk, int q_off, int r0, int tid) {
    if (tid < 32) {
        int base = 0;
        for (int c = 0; c < FLEX_DEC_ROWS; c += 32) {
            const int r = c + tid;
            const bool in = r < FLEX_DEC_ROWS; /* one row tile: lanes 16-31 idle */
            const int row = in ? flex_dec_mask_row(dp, b, hk, q_off, r0 + r) : 0;
            const bool start =
                in && (r == 0 || row != flex_dec_mask_row(dp, b, hk, q_off, r0 + r - 1));
            const unsigned starts = __ballot_sync(0xffffffffu, start);
            const int k = base + __popc(starts & ((2u << tid) - 1u)) - 1;
            if (in) sm.key_of[r] = k;
            if (start) sm.key_row[k] = row;
            base += __popc(starts);
        }
        if (tid == 0) sm.nkeys = base;
    }
}

/* Block classes of every key for the mask blocks of window [w0, w0 +
 * FLEX_DEC_WINDOW), then the kind of each step of the window that lies in
 * [lo, hi). Blocks not in a key's lists stay empty. */
static FLEX_DEVICE_INLINE void flex_dec_classify(const flex_dec_params &dp, flex_dec_smem &sm,
                                                 int w0, int lo, int hi, int tid) {
    const flex_fwd_params &p = dp.f;
    const int kb0 = w0 / p.mask_kvblock;
    const int ncols = (min(w0 + FLEX_DEC_WINDOW, hi) - 1) / p.mask_kvblock - kb0 + 1;
    const int nkeys = sm.nkeys;
    if (!p.dense) {
        for (int i = tid; i < nkeys * FLEX_DEC_CLASS_COLS; i += FLEX_THREADS)
            sm.cls[i / FLEX_DEC_CLASS_COLS][i % FLEX_DEC_CLASS_COLS] = FLEX_DEC_EMPTY;
        __syncthreads();
        for (int k = 0; k < nkeys; k++) {
            const int row = sm.key_row[k];
            const int f0 = p.full_off[row], f1 = p.full_off[row + 1];
            const int p0 = p.part_off[row], p1 = p.part_off[row + 1];
            for (int e = f0 + tid; e < f1; e += FLEX_THREADS) {
                const int c = p.full_idx[e] - kb0;
                if (c >= 0 && c < ncols) sm.cls[k][c] = FLEX_DEC_FULL;
            }
            for (int e = p0 + tid; e < p1; e += FLEX_THREADS) {
                const int c = p.part_idx[e] - kb0;
                if (c >= 0 && c < ncols) sm.cls[k][c] = FLEX_DEC_PARTIAL;
            }
        }
        __syncthreads();
    }
    for (int t = tid; t < FLEX_DEC_WSTEPS; t += FLEX_THREADS) {
        const int s0 = max(w0 + t * FLEX_DEC_STEP, lo), s1 = min(w0 + (t + 1) * FLEX_DEC_STEP, hi);
        unsigned char kind = FLEX_DEC_SKIP;
        if (s0 < s1) {
            bool any = p.dense, all_full = true;
            if (!p.dense) {
                const int c0 = s0 / p.mask_kvblock - kb0, c1 = (s1 - 1) / p.mask_kvblock - kb0;
                for (int k = 0; k < nkeys; k++)
                    for (int c = c0; c <= c1; c++) {
                        const unsigned char x = sm.cls[k][c];
                        any |= x != FLEX_DEC_EMPTY;
                        all_full &= x == FLEX_DEC_FULL;
                    }
            }
            if (any) kind = all_full && s1 - s0 == FLEX_DEC_STEP ? FLEX_DEC_PLAIN : FLEX_DEC_MASKED;
        }
        sm.step_kind[t] = kind;
    }
    __syncthreads();
}

/* The first step of the window after t (-1: the first) that is not
 * skipped; FLEX_DEC_WSTEPS when none. */
static FLEX_DEVICE_INLINE int flex_dec_next_step(const flex_dec_smem &sm, int t) {
    for (t++; t < FLEX_DEC_WSTEPS; t++)
        if (sm.step_kind[t] != FLEX_DEC_SKIP) break;
    return t;
}

/* Copies the rows of positions [kv0, kv0 + 64) of one of K, V (g, its
 * batch and row strides, `cols` head dims padded to DPAD) into the tile at
 * dst (rows at or past kv_end read as zero), each row found through the
 * page table. */
template <int DPAD>
static FLEX_DEVICE_INLINE void flex_dec_load_rows(const flex_dec_params &dp, flex_u32 dst,
                                                  const flex_elem *g, long long sb, long long ss,
                                                  int cols, int b, int kv0, int kv_end, int tid,
                                                  unsigned &bad) {
    constexpr int NC = DPAD / 8;
#pragma unroll 1
    for (int i = tid; i < FLEX_DEC_STEP * NC; i += FLEX_THREADS) {
        const int r = i / NC, c = i % NC, pos = kv0 + r;
        const bool row_ok = pos < kv_end;
        const long long at = row_ok ? flex_dec_row(dp, b, pos, sb, ss, bad) : 0;
#if FLEX_VEC
        const bool valid = row_ok && c * 8 < cols;
        flex_cp_async16(dst + flex_tile_offset<FLEX_DEC_STEP, DPAD, false>(r, c),
                        valid ? g + at + c * 8 : g, valid);
#else
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int col = c * 8 + e;
            flex_st_shared_u16(dst + flex_tile_offset<FLEX_DEC_STEP, DPAD, false>(r, c) + 2 * e,
                               row_ok && col < cols ? g[at + col] : (flex_elem)0);
        }
#endif
    }
}

/* Copies the K and V rows of positions [kv0, kv0 + 64) into a stage. */
static FLEX_DEVICE_INLINE void flex_dec_load_kv(const flex_dec_params &dp, flex_u32 sK, flex_u32 sV,
                                                const flex_elem *gk, const flex_elem *gv, int b,
                                                int kv0, int kv_end, int tid, unsigned &bad) {
    const flex_fwd_params &p = dp.f;
    flex_dec_load_rows<FLEX_DQ>(dp, sK, gk, p.k_sb, p.k_ss, p.D, b, kv0, kv_end, tid, bad);
    flex_dec_load_rows<FLEX_DV>(dp, sV, gv, p.v_sb, p.v_ss, p.Dv, b, kv0, kv_end, tid, bad);
}

/* The per-thread view of its two rows (halves hf of the m16n8 layout). */
struct flex_dec_rows {
    int h[2], q[2], key[2];
};

/* Scores of one warp's share of a step -> mods, classes, mask -> online
 * softmax (flex_softmax_update). kvw: the warp's first key position. */
template <bool MASKED>
static FLEX_DEVICE_INLINE void
flex_dec_scores(const flex_dec_params &dp, const flex_dec_smem &sm, float (&m)[2], float (&l)[2],
                float (&s)[FLEX_DEC_NT][4], float (&alphas)[2], const flex_dec_rows &rw, int b,
                int kvw, int kv_end, int window_kb0, int lane, unsigned &oob) {
    const flex_fwd_params &p = dp.f;
#pragma unroll
    for (int nt = 0; nt < FLEX_DEC_NT; nt++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int hf = r >> 1;
            const int kv = kvw + nt * 8 + (lane & 3) * 2 + (r & 1);
            const int kvc = min(kv, kv_end - 1); /* mods see positions inside the cache */
            bool keep = true;
            if (MASKED) {
                keep = kv < kv_end;
                if (!p.dense) {
                    const unsigned char c = sm.cls[rw.key[hf]][kvc / p.mask_kvblock - window_kb0];
                    unsigned mask_oob = 0;
                    const bool allowed =
                        c == FLEX_DEC_FULL ||
                        (c == FLEX_DEC_PARTIAL &&
                         flex_mask_mod(b, rw.h[hf], rw.q[hf], kvc, p.bufs, mask_oob));
                    oob |= (keep && c == FLEX_DEC_PARTIAL) ? mask_oob : 0u;
                    keep = keep && allowed;
                }
            }
            float x = s[nt][r];
#if FLEX_HAS_SCORE_MOD
            unsigned score_oob = 0;
            x = flex_score_mod(__fmul_rn(x, p.scale), b, rw.h[hf], rw.q[hf], kvc, p.bufs,
                               score_oob) *
                FLEX_LOG2E;
            oob |= keep ? score_oob : 0u;
#else
            x *= p.scale_log2;
#endif
            s[nt][r] = keep ? x : FLEX_NEG_INF;
        }
    }
    flex_softmax_update<false, FLEX_DEC_NT>(m, l, s, alphas);
}

extern "C" __global__ void __launch_bounds__(FLEX_THREADS)
    flex_decode_kernel(const flex_dec_params dp) {
    const flex_fwd_params &p = dp.f;
    extern __shared__ __align__(128) unsigned char flex_smem[];
    const flex_u32 sQ = flex_smem_addr(flex_smem);
    const flex_u32 sK = sQ + FLEX_DEC_ROWS * FLEX_DQ * 2;
    const flex_u32 sV = sK + 2 * FLEX_DEC_STEP * FLEX_DQ * 2;
    unsigned char *after_stages =
        flex_smem + FLEX_DEC_ROWS * FLEX_DQ * 2 + 2 * FLEX_DEC_STEP * (FLEX_DQ + FLEX_DV) * 2;
    flex_dec_smem &sm = *(flex_dec_smem *)after_stages;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int split = blockIdx.x % dp.splits, chunk = blockIdx.x / dp.splits;
    const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
    const int r0 = chunk * FLEX_DEC_ROWS;
    unsigned bad = 0, oob = 0;
    const int kv_end = flex_dec_kv_end(dp, b, bad);
    const int q_off = flex_dec_q_offset(dp, b, kv_end, bad);
    int lo, hi;
    flex_dec_split_range(dp, kv_end, split, lo, hi);

    const flex_elem *gk = (const flex_elem *)p.k + hk * p.k_sh;
    const flex_elem *gv = (const flex_elem *)p.v + hk * p.v_sh;

    /* Q: packed rows r0.. of this kv group (rows past the group read 0). */
    for (int i = tid; i < FLEX_DEC_ROWS * (FLEX_DQ / 8); i += FLEX_THREADS) {
        const int r = i / (FLEX_DQ / 8), c = i % (FLEX_DQ / 8), pr = r0 + r;
        const bool row_ok = pr < dp.rows;
        const int h = hk * dp.group + (row_ok ? pr / p.Lq : 0), qi = row_ok ? pr % p.Lq : 0;
        const flex_elem *src = (const flex_elem *)p.q + b * p.q_sb + h * p.q_sh + qi * p.q_ss;
#if FLEX_VEC
        const bool valid = row_ok && c * 8 < p.D;
        flex_cp_async16(sQ + flex_tile_offset<FLEX_DEC_ROWS, FLEX_DQ, false>(r, c),
                        valid ? src + c * 8 : (const flex_elem *)p.q, valid);
#else
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int col = c * 8 + e;
            flex_st_shared_u16(sQ + flex_tile_offset<FLEX_DEC_ROWS, FLEX_DQ, false>(r, c) + 2 * e,
                               row_ok && col < p.D ? src[col] : (flex_elem)0);
        }
#endif
    }
    flex_cp_async_commit();
    if (!p.dense) flex_dec_find_keys(dp, sm, b, hk, q_off, r0, tid);

    /* This warp's rows and keys. */
    const int rt = warp % FLEX_DEC_RT, kg = warp / FLEX_DEC_RT;
    flex_dec_rows rw;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int r = rt * 16 + (lane >> 2) + 8 * hf, pr = min(r0 + r, dp.rows - 1);
        rw.h[hf] = hk * dp.group + pr / p.Lq;
        rw.q[hf] = q_off + pr % p.Lq;
        rw.key[hf] = 0;
    }
    float o[FLEX_DV / 8][4], m[2], l[2];
#pragma unroll
    for (int dt = 0; dt < FLEX_DV / 8; dt++)
#pragma unroll
        for (int r = 0; r < 4; r++)
            o[dt][r] = 0.0f;
    m[0] = m[1] = FLEX_NEG_INF;
    l[0] = l[1] = 0.0f;

    const flex_u32 k_base = flex_frag_base(sK, ((lane >> 4) << 3) + (lane & 7), (lane >> 3) & 1,
                                           FLEX_DQ) +
                            kg * FLEX_DEC_NW * FLEX_DQ * 2;
    const flex_u32 v_base = flex_frag_base(sV, (((lane >> 3) & 1) << 3) + (lane & 7), lane >> 4,
                                           FLEX_DV) +
                            kg * FLEX_DEC_NW * FLEX_DV * 2;
    const flex_u32 q_base = flex_frag_base(sQ, rt * 16 + (lane & 15), lane >> 4, FLEX_DQ);

    flex_cp_async_wait<0>();
    __syncthreads(); /* Q and the keys are in */
    if (!p.dense) {
        rw.key[0] = sm.key_of[rt * 16 + (lane >> 2)];
        rw.key[1] = sm.key_of[rt * 16 + (lane >> 2) + 8];
    }

#pragma unroll 1
    for (int w0 = lo - lo % FLEX_DEC_WINDOW; w0 < hi; w0 += FLEX_DEC_WINDOW) {
        __syncthreads(); /* the previous window's readers are done with its classes */
        flex_dec_classify(dp, sm, w0, lo, hi, tid);
        const int window_kb0 = w0 / p.mask_kvblock;
        int t = flex_dec_next_step(sm, -1), stage = 0;
        if (t < FLEX_DEC_WSTEPS)
            flex_dec_load_kv(dp, sK, sV, gk, gv, b, w0 + t * FLEX_DEC_STEP, kv_end, tid, bad);
        flex_cp_async_commit();
#pragma unroll 1
        while (t < FLEX_DEC_WSTEPS) {
            const int tn = flex_dec_next_step(sm, t);
            __syncthreads(); /* everyone is done with the stage refilled next */
            if (tn < FLEX_DEC_WSTEPS)
                flex_dec_load_kv(dp, sK + (stage ^ 1) * FLEX_DEC_STEP * FLEX_DQ * 2,
                                 sV + (stage ^ 1) * FLEX_DEC_STEP * FLEX_DV * 2, gk, gv, b,
                                 w0 + tn * FLEX_DEC_STEP, kv_end, tid, bad);
            flex_cp_async_commit();
            flex_cp_async_wait<1>();
            __syncthreads(); /* step t's stage has landed */

            const flex_u32 k_t = k_base + stage * FLEX_DEC_STEP * FLEX_DQ * 2;
            const flex_u32 v_t = v_base + stage * FLEX_DEC_STEP * FLEX_DV * 2;
            float s[FLEX_DEC_NT][4];
#pragma unroll
            for (int nt = 0; nt < FLEX_DEC_NT; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++)
                    s[nt][r] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < FLEX_DQ / 16; kk++) {
                flex_u32 a[4];
                flex_ldmatrix_x4(a, flex_frag_at(q_base, kk));
#pragma unroll
                for (int np = 0; np < FLEX_DEC_NT / 2; np++) {
                    flex_u32 bf[4];
                    flex_ldmatrix_x4(bf, flex_frag_at(k_t, kk) + np * 16 * FLEX_DQ * 2);
                    flex_mma_pair(s[2 * np], s[2 * np + 1], a, bf);
                }
            }
            const int kvw = w0 + t * FLEX_DEC_STEP + kg * FLEX_DEC_NW;
            float alphas[2];
            if (sm.step_kind[t] == FLEX_DEC_PLAIN)
                flex_dec_scores<false>(dp, sm, m, l, s, alphas, rw, b, kvw, kv_end, window_kb0,
                                       lane, oob);
            else
                flex_dec_scores<true>(dp, sm, m, l, s, alphas, rw, b, kvw, kv_end, window_kb0,
                                      lane, oob);
            flex_rescale(o, alphas);
            flex_u32 pa[FLEX_DEC_NT / 2][4];
            flex_pack_probs<FLEX_DEC_NT>(s, pa);
#pragma unroll
            for (int kk = 0; kk < FLEX_DEC_NT / 2; kk++)
#pragma unroll
                for (int dp2 = 0; dp2 < FLEX_DV / 16; dp2++) {
                    flex_u32 bf[4];
                    flex_ldmatrix_x4_trans(bf, flex_frag_at(v_t, dp2) + kk * 16 * FLEX_DV * 2);
                    flex_mma_pair(o[2 * dp2], o[2 * dp2 + 1], pa[kk], bf);
                }
            t = tn;
            stage ^= 1;
        }
        flex_cp_async_wait<0>();
    }
    __syncthreads(); /* the stages are free: they hold the key groups' results now */

    /* Key groups -> one result per row, through shared memory. */
    float *so = (float *)(flex_smem + FLEX_DEC_ROWS * FLEX_DQ * 2); /* [kg][row][FLEX_DV] */
    float *sml = (float *)after_stages + sizeof(flex_dec_smem) / sizeof(float) + 1; /* [kg][row][2] */
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float lsum = l[hf];
        lsum += FLEX_SHFL_XOR(lsum, 1);
        lsum += FLEX_SHFL_XOR(lsum, 2);
        const int r = rt * 16 + (lane >> 2) + 8 * hf;
        float *orow = so + ((size_t)kg * FLEX_DEC_ROWS + r) * FLEX_DV;
#pragma unroll
        for (int dt = 0; dt < FLEX_DV / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            orow[col] = o[dt][2 * hf];
            orow[col + 1] = o[dt][2 * hf + 1];
        }
        if ((lane & 3) == 0) {
            sml[(kg * FLEX_DEC_ROWS + r) * 2] = m[hf];
            sml[(kg * FLEX_DEC_ROWS + r) * 2 + 1] = lsum;
        }
    }
    __syncthreads();
    const int dv_cols = FLEX_DV_EXACT ? FLEX_DV : p.Dv;
    for (int i = tid; i < FLEX_DEC_ROWS * FLEX_DV; i += FLEX_THREADS) {
        const int r = i / FLEX_DV, c = i % FLEX_DV, pr = r0 + r;
        if (pr >= dp.rows || c >= dv_cols) continue;
        float mx = FLEX_NEG_INF;
#pragma unroll
        for (int g = 0; g < FLEX_DEC_KG; g++)
            mx = fmaxf(mx, sml[(g * FLEX_DEC_ROWS + r) * 2]);
        const float m_use = mx == FLEX_NEG_INF ? 0.0f : mx;
        float lsum = 0.0f, acc = 0.0f;
#pragma unroll
        for (int g = 0; g < FLEX_DEC_KG; g++) {
            const float w = flex_exp2(sml[(g * FLEX_DEC_ROWS + r) * 2] - m_use);
            lsum += w * sml[(g * FLEX_DEC_ROWS + r) * 2 + 1];
            acc += w * so[((size_t)g * FLEX_DEC_ROWS + r) * FLEX_DV + c];
        }
        const int h = hk * dp.group + pr / p.Lq, qi = pr % p.Lq;
        /* l NaN (a kept NaN or +inf score): out and lse NaN, as the forward */
        const float x = lsum != 0.0f ? acc / lsum : 0.0f;
        if (dp.splits > 1)
            dp.part_out[flex_dec_piece(dp, b, h, split, qi) * FLEX_DV + c] = x;
        else
            flex_dec_store_out(p, b, h, qi, c, x);
        if (c == 0)
            flex_dec_lse_store(dp, b, h, split, qi,
                               lsum != 0.0f ? (mx + log2f(lsum)) * FLEX_LN2 : FLEX_NEG_INF);
    }
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    if (bad) atomicOr(dp.decode_flag, bad);
}

#else
/* ============================ f32 FMA path ============================= */

#define FLEX_DEC_F32_ROWS 4 /* warps (rows) per CTA */
#define FLEX_PER_LANE_Q   (FLEX_DQ / 32)
#define FLEX_PER_LANE_V   (FLEX_DV / 32)

/* One warp per (packed row, split): grid x = splits * row chunks of 4, y =
 * batch * kv head. The row's own mask lists, restricted to the split. */
extern "C" __global__ void __launch_bounds__(FLEX_DEC_F32_ROWS * 32)
    flex_decode_kernel(const flex_dec_params dp) {
    const flex_fwd_params &p = dp.f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x % dp.splits, chunk = blockIdx.x / dp.splits;
    const int b = blockIdx.y / p.Hkv, hk = blockIdx.y % p.Hkv;
    const int pr = chunk * FLEX_DEC_F32_ROWS + warp;
    if (pr >= dp.rows) return;
    unsigned bad = 0, oob = 0;
    const int kv_end = flex_dec_kv_end(dp, b, bad);
    const int q_off = flex_dec_q_offset(dp, b, kv_end, bad);
    int lo, hi;
    flex_dec_split_range(dp, kv_end, split, lo, hi);
    const int h = hk * dp.group + pr / p.Lq, qi = pr % p.Lq, q = q_off + qi;
    const float *gq = (const float *)p.q + b * p.q_sb + h * p.q_sh + (long long)qi * p.q_ss;
    const float *gk = (const float *)p.k + hk * p.k_sh;
    const float *gv = (const float *)p.v + hk * p.v_sh;

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

    const flex_kv_walk walk = flex_walk_for(p, b, h, min(q / p.mask_qblock, p.mask_nq - 1));
    for (int i = 0; i < walk.n_full + walk.n_part; i++) {
        bool partial;
        const int kb = flex_walk_block(p, walk, i, partial);
        const int k0 = max(lo, kb * p.mask_kvblock), k1 = min(hi, (kb + 1) * p.mask_kvblock);
        for (int kv = k0; kv < k1; kv++) {
            if (partial && !flex_mask_mod(b, h, q, kv, p.bufs, oob)) continue;
            const float *krow = gk + flex_dec_row(dp, b, kv, p.k_sb, p.k_ss, bad);
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < FLEX_PER_LANE_Q; j++) {
                const int d = lane + 32 * j;
                if (d < p.D) dot = fmaf(qv[j], krow[d], dot);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                dot += FLEX_SHFL_XOR(dot, off);
            float x = flex_score_mod(dot * p.scale, b, h, q, kv, p.bufs, oob);
            if (x == FLEX_NEG_INF) continue;
            const float m_new = fmaxf(m, x);
            const float alpha = expf(m - m_new);
            const float e = expf(x - m_new);
            l = l * alpha + e;
            m = m_new;
            const float *vrow = gv + flex_dec_row(dp, b, kv, p.v_sb, p.v_ss, bad);
#pragma unroll
            for (int j = 0; j < FLEX_PER_LANE_V; j++) {
                const int d = lane + 32 * j;
                acc[j] = fmaf(e, d < p.Dv ? vrow[d] : 0.0f, acc[j] * alpha);
            }
        }
    }
    const float inv = l != 0.0f ? 1.0f / l : 0.0f; /* NaN l: a NaN row */
    float *dst = dp.splits > 1 ? dp.part_out + flex_dec_piece(dp, b, h, split, qi) * FLEX_DV
                               : (float *)p.out + b * p.o_sb + h * p.o_sh + (long long)qi * p.o_ss;
#pragma unroll
    for (int j = 0; j < FLEX_PER_LANE_V; j++) {
        const int d = lane + 32 * j;
        if (d < p.Dv) dst[d] = acc[j] * inv;
    }
    if (lane == 0) flex_dec_lse_store(dp, b, h, split, qi, l != 0.0f ? m + logf(l) : FLEX_NEG_INF);
    if (oob) atomicOr(p.bufs.bounds_flag, oob);
    if (bad) atomicOr(dp.decode_flag, bad);
}
#endif
