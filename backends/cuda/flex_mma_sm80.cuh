/*
 * flex_mma_sm80.cuh: the sm_80 tensor-core primitives the f16/bf16 kernels
 * share (forward, backward): XOR-swizzled shared-memory tiles and their
 * cp.async loads with row strides, ldmatrix fragment addressing, mma.sync
 * m16n8k16 with fp32 accumulators, conversions and exp2. Inline PTX of our
 * own, so NVRTC needs no toolkit header. Expects FLEX_WARPS (warps per CTA)
 * and FLEX_VEC (16-byte aligned rows) from the configuration block. For AMD
 * GPUs (FLEX_HIP) the PTX functions are left out and
 * backends/hip/flex_mma_hip.cuh, placed before this file, defines them.
 */

#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)

typedef flex_u16 flex_elem;

#define FLEX_THREADS (FLEX_WARPS * 32)

/* Element offset of (row, 16-byte chunk c) in a tile with `dpad` columns:
 * the chunk index is XORed with the row's low bits so the 8 rows an
 * ldmatrix reads fall in 8 different bank groups. */
static FLEX_DEVICE_INLINE int flex_swz(int row, int chunk, int dpad) {
    return row * dpad + ((chunk & ~7) | ((chunk ^ row) & 7)) * 8;
}

#if !defined(FLEX_HIP) /* AMD: flex_mma_hip.cuh */
static FLEX_DEVICE_INLINE flex_u32 flex_smem_addr(const void *p) {
    return (flex_u32)__cvta_generic_to_shared(p);
}
#endif

/* ldmatrix addresses without a register per fragment. In a tile whose base
 * is 128-byte aligned and whose rows are a multiple of 128 bytes, the
 * swizzled byte offset of (row, chunk 2 * kk + c0) is
 *   row * rowbytes + 128 * (kk >> 2) + ((32 * (kk & 3)) ^ (16 * ((c0 ^ row) & 7))),
 * so a lane keeps one base (kk = 0) and every fragment is that base XOR a
 * constant plus a constant, which the compiler folds into the instruction.
 * Rows 16 further down add 16 * rowbytes and keep the swizzle. */
static FLEX_DEVICE_INLINE flex_u32 flex_frag_base(flex_u32 tile, int row, int c0, int dpad) {
    return tile + (flex_u32)(row * dpad * 2) + (flex_u32)(((c0 ^ row) & 7) << 4);
}
static FLEX_DEVICE_INLINE flex_u32 flex_frag_at(flex_u32 base, int kk) {
    return (base ^ (flex_u32)((kk & 3) << 5)) + (flex_u32)((kk >> 2) << 7);
}

#if !defined(FLEX_HIP) /* AMD: flex_mma_hip.cuh */
static FLEX_DEVICE_INLINE void flex_st_shared_u16(flex_u32 addr, flex_u16 x) {
    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(x));
}
static FLEX_DEVICE_INLINE void flex_st_shared_u32(flex_u32 addr, flex_u32 x) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x));
}
static FLEX_DEVICE_INLINE void flex_cp_async16(flex_u32 dst, const void *src, bool valid) {
    const int n = valid ? 16 : 0; /* 0: zero-fill, nothing read */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
/* 4 bytes (a float of a strided vector); !valid: zero-fill, nothing read. */
static FLEX_DEVICE_INLINE void flex_cp_async4(flex_u32 dst, const void *src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static FLEX_DEVICE_INLINE void flex_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> static FLEX_DEVICE_INLINE void flex_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static FLEX_DEVICE_INLINE void flex_ldmatrix_x4(flex_u32 *r, flex_u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static FLEX_DEVICE_INLINE void flex_ldmatrix_x4_trans(flex_u32 *r, flex_u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* d += a * b, m16n8k16, fp32 accumulate. */
static FLEX_DEVICE_INLINE void flex_mma(float *d, const flex_u32 *a, flex_u32 b0, flex_u32 b1) {
#if defined(FLEX_ELEM_BF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* d0 += a * b over n-tile 0 (bf[0], bf[1]) and d1 += a * b over n-tile 1
 * (bf[2], bf[3]): the two products one ldmatrix.x4 of B feeds, which the
 * mainloops always issue together. Here exactly the two mma.sync; AMD's
 * matrix instructions compute the 16 columns in one (flex_mma_hip.cuh). */
static FLEX_DEVICE_INLINE void flex_mma_pair(float *d0, float *d1, const flex_u32 *a,
                                             const flex_u32 *bf) {
    flex_mma(d0, a, bf[0], bf[1]);
    flex_mma(d1, a, bf[2], bf[3]);
}

/* Two floats -> two packed 16-bit values, lo in the low half. */
static FLEX_DEVICE_INLINE flex_u32 flex_pack2(float lo, float hi) {
    flex_u32 r;
#if defined(FLEX_ELEM_BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
#endif

static FLEX_DEVICE_INLINE flex_u16 flex_to_elem(float x) {
    return (flex_u16)(flex_pack2(x, 0.0f) & 0xffffu);
}
#if !defined(FLEX_HIP) /* AMD: flex_mma_hip.cuh */
static FLEX_DEVICE_INLINE float flex_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#endif

/* Byte offset of (row, 16-byte chunk) in a tile with DPAD columns and ROWS
 * rows. SW128 0: the ldmatrix layout above (flex_swz, row-major). SW128 1:
 * wgmma's 128-byte swizzle (flex_forward_sm90.cuh): DPAD / 64 column blocks
 * of ROWS x 64 elements, the chunk index XORed with the row's low three
 * bits inside each 8-row, 1024-byte group. */
template <int ROWS, int DPAD, bool SW128>
static FLEX_DEVICE_INLINE flex_u32 flex_tile_offset(int row, int chunk) {
    if (SW128)
        return (flex_u32)((chunk >> 3) * ROWS * 128 + row * 128 + (((chunk ^ row) & 7) << 4));
    return (flex_u32)(2 * flex_swz(row, chunk, DPAD));
}

/* Copies rows [row0, row0 + ROWS) x columns [0, DPAD) of a (rows, cols)
 * global matrix into a swizzled shared tile (layout: flex_tile_offset); rows
 * >= nrows and columns >= ncols read as zero. THREADS threads (tid below
 * it) share the copy: FLEX_THREADS, unless a kernel of the module runs
 * another number. */
template <int ROWS, int DPAD, bool SW128 = false, int THREADS = FLEX_THREADS>
static FLEX_DEVICE_INLINE void flex_load_tile(flex_u32 tile, const flex_elem *g,
                                              long long row_stride, int row0, int nrows, int ncols,
                                              int tid) {
    constexpr int CHUNKS = DPAD / 8;
#if FLEX_VEC
    if constexpr (THREADS % CHUNKS == 0 && ROWS % (THREADS / CHUNKS) == 0) {
        /* Each thread copies one column chunk of every RSTEP-th row: one
         * source pointer and one stride per thread, nothing per row kept
         * live across the kv walk. */
        constexpr int RSTEP = THREADS / CHUNKS;
        const int r0 = tid / CHUNKS, c = tid % CHUNKS;
        const bool col_ok = c * 8 < ncols;
        const flex_elem *src = g + (long long)(row0 + r0) * row_stride + c * 8;
        const long long step = (long long)RSTEP * row_stride;
        /* Both layouts repeat every 8 rows: with RSTEP a multiple of 8 a
         * thread's rows are one offset plus multiples of RSTEP rows. */
        constexpr int ROW_BYTES = SW128 ? 128 : DPAD * 2;
        const flex_u32 base = tile + flex_tile_offset<ROWS, DPAD, SW128>(r0, c);
#pragma unroll
        for (int it = 0; it < ROWS / RSTEP; it++) {
            const int r = r0 + it * RSTEP;
            const bool valid = col_ok && row0 + r < nrows;
            const flex_u32 dst = RSTEP % 8 == 0 ? base + it * RSTEP * ROW_BYTES
                                                : tile + flex_tile_offset<ROWS, DPAD, SW128>(r, c);
            flex_cp_async16(dst, valid ? src : g, valid);
            src += step;
        }
        return;
    }
    constexpr int ITERS = (ROWS * CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int i = tid + it * THREADS;
        if (ROWS * CHUNKS % THREADS != 0 && i >= ROWS * CHUNKS) break;
        const int r = i / CHUNKS, c = i % CHUNKS;
        const bool valid = (row0 + r < nrows) && (c * 8 < ncols);
        const flex_elem *src = valid ? g + (long long)(row0 + r) * row_stride + c * 8 : g;
        flex_cp_async16(tile + flex_tile_offset<ROWS, DPAD, SW128>(r, c), src, valid);
    }
#else
    for (int i = tid; i < ROWS * DPAD; i += THREADS) {
        const int r = i / DPAD, col = i % DPAD;
        flex_elem x = 0;
        if (row0 + r < nrows && col < ncols) x = g[(long long)(row0 + r) * row_stride + col];
        flex_st_shared_u16(tile + flex_tile_offset<ROWS, DPAD, SW128>(r, col / 8) + 2 * (col & 7),
                           x);
    }
#endif
}

/* ---- the online softmax on the m16n8 accumulator layout (forward, decode) ---- */

/* Cuts of the Hopper forward's step (flex_forward_sm90.cuh), which the host
 * turns on with cuda_step_cuts=1 until they are measured; 0 in every other
 * kernel. */
#ifndef FLEX_STEP_CUTS
#define FLEX_STEP_CUTS 0
#endif

#if defined(FLEX_DV)
/* The online-softmax update of one 16-row m-tile's modified scores, in
 * log2 units, or with RAW in units that to_log2 (> 0) turns into log2
 * units: the unscaled scores of a kernel without a score mod (to_log2 =
 * scale * log2(e)) or a score mod's results (log2(e)). The factor then
 * meets the running max in the exponent's fused multiply-add, one
 * instruction a score less than a product of its own. s becomes the
 * unnormalised probabilities, m and l move on, alphas[i] is the factor the
 * accumulators of row half i must be rescaled by. */
template <bool RAW, int NT>
static FLEX_DEVICE_INLINE void flex_softmax_update(float (&m)[2], float (&l)[2],
                                                   float (&s)[NT][4], float (&alphas)[2],
                                                   float to_log2 = 1.0f) {
#if FLEX_STEP_CUTS
    /* Both row halves' maxima at once, each as a tree: a chain of NT
     * dependent maxima, then the other half's, held the exponentials back
     * (the maximum is exact, so the order does not change it). */
    float mx2[2][NT];
#pragma unroll
    for (int hf = 0; hf < 2; hf++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            mx2[hf][nt] = fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]);
#pragma unroll
    for (int w = 1; w < NT; w *= 2)
#pragma unroll
        for (int nt = 0; nt + w < NT; nt += 2 * w)
#pragma unroll
            for (int hf = 0; hf < 2; hf++)
                mx2[hf][nt] = fmaxf(mx2[hf][nt], mx2[hf][nt + w]);
#pragma unroll
    for (int lanes = 1; lanes <= 2; lanes *= 2) {
        const float other0 = FLEX_SHFL_XOR(mx2[0][0], lanes),
                    other1 = FLEX_SHFL_XOR(mx2[1][0], lanes);
        mx2[0][0] = fmaxf(mx2[0][0], other0);
        mx2[1][0] = fmaxf(mx2[1][0], other1);
    }
#endif
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
#if FLEX_STEP_CUTS
        float mx = mx2[hf][0];
#else
        float mx = FLEX_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            mx = fmaxf(mx, fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
        mx = fmaxf(mx, FLEX_SHFL_XOR(mx, 1));
        mx = fmaxf(mx, FLEX_SHFL_XOR(mx, 2));
#endif
        if (RAW) mx *= to_log2; /* a positive factor keeps the maximum where it is */
        const float m_new = fmaxf(m[hf], mx);
        const float m_use = m_new == FLEX_NEG_INF ? 0.0f : m_new;
        const float alpha = flex_exp2(m[hf] - m_use);
        m[hf] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const float e0 =
                flex_exp2(RAW ? fmaf(s[nt][2 * hf], to_log2, -m_use) : s[nt][2 * hf] - m_use);
            const float e1 = flex_exp2(RAW ? fmaf(s[nt][2 * hf + 1], to_log2, -m_use)
                                           : s[nt][2 * hf + 1] - m_use);
            s[nt][2 * hf] = e0;
            s[nt][2 * hf + 1] = e1;
            sum += e0 + e1;
        }
        l[hf] = l[hf] * alpha + sum;
        alphas[hf] = alpha;
    }
}

/* Past the first blocks the running max rarely moves: the rescale of the
 * accumulators is skipped when it moved for no row of the warp. */
static FLEX_DEVICE_INLINE void flex_rescale(float (&o)[FLEX_DV / 8][4], const float (&alphas)[2]) {
    if (FLEX_ANY(alphas[0] != 1.0f || alphas[1] != 1.0f)) {
#pragma unroll
        for (int dt = 0; dt < FLEX_DV / 8; dt++) {
            o[dt][0] *= alphas[0];
            o[dt][1] *= alphas[0];
            o[dt][2] *= alphas[1];
            o[dt][3] *= alphas[1];
        }
    }
}

/* Probabilities (m16n8 accumulator layout) -> 16-bit A fragments of P for
 * P V (m16n8k16 layout, which is also wgmma's register-A layout). */
template <int NT>
static FLEX_DEVICE_INLINE void flex_pack_probs(const float (&s)[NT][4], flex_u32 (&pa)[NT / 2][4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
        pa[kk][0] = flex_pack2(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = flex_pack2(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = flex_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = flex_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

#endif /* FLEX_DV */

#endif /* FLEX_ELEM_BF16 || FLEX_ELEM_F16 */
