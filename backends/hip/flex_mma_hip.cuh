/*
 * flex_mma_hip.cuh: the AMD versions of the primitives that
 * flex_mma_sm80.cuh writes in PTX, so that the f16/bf16 mainloops
 * (flex_forward.cuh) compile for AMD GPUs unchanged. The host puts this
 * file before flex_mma_sm80.cuh, whose layout code (swizzled tiles,
 * fragment addressing, tile loads) is shared and whose PTX is left out
 * under FLEX_HIP.
 *
 * The mainloops think in 32-lane warps and mma.sync's m16n8k16 fragment
 * layouts. Here a "warp" is 32 lanes of a wavefront: the whole wave on
 * RDNA (wave32), half of it on CDNA (wave64), where two of the kernel's
 * warps share one wave. Every primitive reads other lanes only inside its
 * own 32-lane warp (ds_bpermute), so both shapes run the same code.
 *
 * This is the scalar fallback, the same on every AMD architecture: the
 * products are the fp32 sums mma.sync computes, gathered across the warp
 * lane by lane; ldmatrix becomes LDS reads from the addresses the other
 * lanes hold; cp.async becomes a plain 16-byte copy (the mainloop's barriers
 * already order it). It is correct by construction of the fragment layouts
 * and slow; MFMA (CDNA) and WMMA (RDNA3) versions of flex_mma are not
 * written yet (docs/hip-backend.md). Compiled, never run: the project has
 * no AMD GPU.
 */
#if defined(FLEX_ELEM_BF16) || defined(FLEX_ELEM_F16)

/* LDS addresses are 32-bit offsets, as CUDA's shared-window addresses are. */
typedef __attribute__((address_space(3))) flex_u32 flex_lds_u32;
typedef __attribute__((address_space(3))) flex_u16 flex_lds_u16;
typedef flex_u32 flex_u32x4 __attribute__((ext_vector_type(4)));
typedef __attribute__((address_space(3))) flex_u32x4 flex_lds_u32x4;

static FLEX_DEVICE_INLINE flex_u32 flex_smem_addr(const void *p) {
    return (flex_u32)(unsigned long)(const __attribute__((address_space(3))) void *)p;
}

/* This lane's index in its 32-lane warp, and x as lane src of it holds it. */
static FLEX_DEVICE_INLINE int flex_warp_lane() {
#if __AMDGCN_WAVEFRONT_SIZE == 64
    return (int)__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u)) & 31;
#else
    return (int)__builtin_amdgcn_mbcnt_lo(~0u, 0u);
#endif
}
static FLEX_DEVICE_INLINE flex_u32 flex_warp_read(flex_u32 x, int src) {
#if __AMDGCN_WAVEFRONT_SIZE == 64
    const int wave_lane =
        (int)__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
    const int from = (wave_lane & 32) | (src & 31);
#else
    const int from = src & 31;
#endif
    return (flex_u32)__builtin_amdgcn_ds_bpermute(from << 2, (int)x);
}

static FLEX_DEVICE_INLINE void flex_st_shared_u16(flex_u32 addr, flex_u16 x) {
    *(flex_lds_u16 *)(unsigned long)addr = x;
}
static FLEX_DEVICE_INLINE flex_u32 flex_ld_shared_u32(flex_u32 addr) {
    return *(const flex_lds_u32 *)(unsigned long)addr;
}
static FLEX_DEVICE_INLINE flex_u32 flex_ld_shared_u16(flex_u32 addr) {
    return *(const flex_lds_u16 *)(unsigned long)addr;
}

/* cp.async: a synchronous 16-byte copy (zeros when !valid). */
static FLEX_DEVICE_INLINE void flex_cp_async16(flex_u32 dst, const void *src, bool valid) {
    const flex_u32x4 zero = {0u, 0u, 0u, 0u};
    *(flex_lds_u32x4 *)(unsigned long)dst = valid ? *(const flex_u32x4 *)src : zero;
}
static FLEX_DEVICE_INLINE void flex_cp_async_commit() {}
template <int N> static FLEX_DEVICE_INLINE void flex_cp_async_wait() {}

/* ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8 and
 * receives word l % 4 of row l / 4 of each matrix. */
static FLEX_DEVICE_INLINE void flex_ldmatrix_x4(flex_u32 *r, flex_u32 addr) {
    const int lane = flex_warp_lane();
#pragma unroll
    for (int j = 0; j < 4; j++)
        r[j] = flex_ld_shared_u32(flex_warp_read(addr, 8 * j + (lane >> 2)) + 4 * (lane & 3));
}
/* .trans: lane l receives elements (2 (l % 4), l / 4) and (2 (l % 4) + 1,
 * l / 4) of each matrix, low half first. */
static FLEX_DEVICE_INLINE void flex_ldmatrix_x4_trans(flex_u32 *r, flex_u32 addr) {
    const int lane = flex_warp_lane();
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const flex_u32 row0 = flex_warp_read(addr, 8 * j + 2 * (lane & 3));
        const flex_u32 row1 = flex_warp_read(addr, 8 * j + 2 * (lane & 3) + 1);
        r[j] = flex_ld_shared_u16(row0 + 2 * (lane >> 2)) |
               (flex_ld_shared_u16(row1 + 2 * (lane >> 2)) << 16);
    }
}

/* The two 16-bit elements of a packed word as floats. */
static FLEX_DEVICE_INLINE float flex_elem_lo(flex_u32 x) {
#if defined(FLEX_ELEM_BF16)
    return __builtin_bit_cast(float, x << 16);
#else
    return (float)__builtin_bit_cast(_Float16, (flex_u16)(x & 0xffffu));
#endif
}
static FLEX_DEVICE_INLINE float flex_elem_hi(flex_u32 x) {
#if defined(FLEX_ELEM_BF16)
    return __builtin_bit_cast(float, x & 0xffff0000u);
#else
    return (float)__builtin_bit_cast(_Float16, (flex_u16)(x >> 16));
#endif
}

/* d += a * b, m16n8k16, fp32 accumulate, in mma.sync's fragment layout:
 * lane l = 4 g + t holds A rows g and g + 8 (k 2t, 2t + 1 in a[0] / a[1],
 * k 2t + 8, 2t + 9 in a[2] / a[3]), B column g (k 2t, 2t + 1 in b0, k 2t + 8,
 * 2t + 9 in b1) and D rows g, g + 8, columns 2t, 2t + 1. Row g's A words
 * for k pair tk sit in lane 4 g + tk, column n's B words in lane 4 n + tk. */
static FLEX_DEVICE_INLINE void flex_mma(float *d, const flex_u32 *a, flex_u32 b0, flex_u32 b1) {
    const int lane = flex_warp_lane(), g = lane >> 2, t = lane & 3;
    float c0 = d[0], c1 = d[1], c2 = d[2], c3 = d[3];
#pragma unroll
    for (int tk = 0; tk < 4; tk++) {
        const int arow = 4 * g + tk, bn0 = 8 * t + tk, bn1 = 8 * t + 4 + tk;
        const flex_u32 a0 = flex_warp_read(a[0], arow), a1 = flex_warp_read(a[1], arow);
        const flex_u32 a2 = flex_warp_read(a[2], arow), a3 = flex_warp_read(a[3], arow);
        const flex_u32 p0 = flex_warp_read(b0, bn0), p1 = flex_warp_read(b1, bn0);
        const flex_u32 q0 = flex_warp_read(b0, bn1), q1 = flex_warp_read(b1, bn1);
        c0 += flex_elem_lo(a0) * flex_elem_lo(p0) + flex_elem_hi(a0) * flex_elem_hi(p0) +
              flex_elem_lo(a2) * flex_elem_lo(p1) + flex_elem_hi(a2) * flex_elem_hi(p1);
        c1 += flex_elem_lo(a0) * flex_elem_lo(q0) + flex_elem_hi(a0) * flex_elem_hi(q0) +
              flex_elem_lo(a2) * flex_elem_lo(q1) + flex_elem_hi(a2) * flex_elem_hi(q1);
        c2 += flex_elem_lo(a1) * flex_elem_lo(p0) + flex_elem_hi(a1) * flex_elem_hi(p0) +
              flex_elem_lo(a3) * flex_elem_lo(p1) + flex_elem_hi(a3) * flex_elem_hi(p1);
        c3 += flex_elem_lo(a1) * flex_elem_lo(q0) + flex_elem_hi(a1) * flex_elem_hi(q0) +
              flex_elem_lo(a3) * flex_elem_lo(q1) + flex_elem_hi(a3) * flex_elem_hi(q1);
    }
    d[0] = c0;
    d[1] = c1;
    d[2] = c2;
    d[3] = c3;
}

/* Two floats -> two packed 16-bit values, lo in the low half, rounded to
 * nearest even (NaN stays NaN), as cvt.rn does. */
static FLEX_DEVICE_INLINE flex_u32 flex_elem_bits(float x) {
#if defined(FLEX_ELEM_BF16)
    const flex_u32 u = __builtin_bit_cast(flex_u32, x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
#else
    return __builtin_bit_cast(flex_u16, (_Float16)x);
#endif
}
static FLEX_DEVICE_INLINE flex_u32 flex_pack2(float lo, float hi) {
    return flex_elem_bits(lo) | (flex_elem_bits(hi) << 16);
}
static FLEX_DEVICE_INLINE float flex_exp2(float x) {
    return __builtin_exp2f(x);
}

#endif /* FLEX_ELEM_BF16 || FLEX_ELEM_F16 */
