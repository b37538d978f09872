/*
 * flex_mma_hip.cuh: the AMD versions of the primitives that
 * flex_mma_sm80.cuh writes in PTX, so that the f16/bf16 mainloops
 * (flex_forward.cuh, flex_backward.cuh) compile for AMD GPUs unchanged. The
 * host puts this file before flex_mma_sm80.cuh, whose layout code (swizzled
 * tiles, fragment addressing, tile loads) is shared and whose PTX is left
 * out under FLEX_HIP.
 *
 * The mainloops think in 32-lane warps and mma.sync's m16n8k16 fragment
 * layouts. Here a "warp" is 32 lanes of a wavefront: the whole wave on
 * RDNA (wave32), half of it on CDNA (wave64), where two of the kernel's
 * warps share one wave.
 *
 * The products come in pairs of n-tiles (flex_mma_pair: 16 columns, one
 * ldmatrix.x4 of B), the size of one 16x16x16 matrix instruction:
 *   - CDNA (gfx90a, gfx940-942; wave64): two MFMAs per wave, one per warp
 *     (v_mfma_f32_16x16x16{f16,bf16}), operands and results moved between
 *     the layouts with ds_bpermute across the wave. Both warps of a wave
 *     must issue each pair together, which the mainloops do when the warps
 *     of a CTA are even and, in the backward, the 16-row query tiles of a
 *     step too (FLEX_AMD_HAVE_MFMA below); otherwise the scalar products
 *     serve.
 *   - RDNA3 (gfx1100-1102; wave32): one WMMA per warp
 *     (v_wmma_f32_16x16x16_{f16,bf16}_w32).
 *   - Any other AMD target: the scalar flex_mma below, twice.
 * The lane permutations are in flex_amd_lanes.h, whose text the host puts
 * in place of its include line below (the run-time compiler has no include
 * path); a host test runs that same text against the instructions'
 * documented layouts (tests/test_hip_lanes.c).
 *
 * The scalar fallback computes mma.sync's fp32 sums lane by lane, every
 * primitive reading other lanes only inside its own 32-lane warp
 * (ds_bpermute), so both wave sizes run it; ldmatrix becomes LDS reads from
 * the addresses the other lanes hold; cp.async (16 and 4 bytes) becomes a
 * plain copy (the mainloops' barriers already order it; the wait is a
 * no-op, so the backward's second Q/dO stage would overlap nothing and
 * hip_backend.c leaves it off); the backward's sm_90 vector reduction
 * becomes four float atomics. Compiled, never run: the project has no AMD
 * GPU (docs/hip-backend.md).
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
static FLEX_DEVICE_INLINE void flex_st_shared_u32(flex_u32 addr, flex_u32 x) {
    *(flex_lds_u32 *)(unsigned long)addr = x;
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
/* The 4-byte cp.async (a float of lse or delta): a synchronous copy too. */
static FLEX_DEVICE_INLINE void flex_cp_async4(flex_u32 dst, const void *src, bool valid) {
    *(flex_lds_u32 *)(unsigned long)dst = valid ? *(const flex_u32 *)src : 0u;
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

/* The scalar product: d += a * b, m16n8k16, fp32 accumulate, in mma.sync's
 * fragment layout: lane l = 4 g + t holds A rows g and g + 8 (k 2t, 2t + 1
 * in a[0] / a[1], k 2t + 8, 2t + 9 in a[2] / a[3]), B column g (k 2t, 2t + 1
 * in b0, k 2t + 8, 2t + 9 in b1) and D rows g, g + 8, columns 2t, 2t + 1.
 * Row g's A words for k pair tk sit in lane 4 g + tk, column n's B words in
 * lane 4 n + tk. */
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

/* ---- the matrix instructions (flex_amd_lanes.h) ---- */

/* MFMA needs a wave's two warps together: a CTA of whole waves (the
 * backward's 128-row kv tiles are 8 warps), and in the backward an even
 * number of 16-row query tiles a step. Every other product loop runs alike
 * in every warp; the dQ loop (flex_bwd_dq) hands its items, m-tiles x
 * column groups, to warps w, w + FLEX_WARPS, ..., so with the warps and the
 * m-tiles even both warps of a wave take as many items (hip_compile.c
 * appends a static_assert on the loop's own count). CDNA runs wave64 only;
 * RDNA3 runs HIP in wave32 unless told otherwise. */
#if (defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) ||                          \
     defined(__gfx942__)) &&                                                                       \
    FLEX_WARPS % 2 == 0 && (!defined(FLEX_BWD_BLOCK_M) || FLEX_BWD_BLOCK_M % 32 == 0)
#define FLEX_AMD_HAVE_MFMA 1
#elif (defined(__gfx1100__) || defined(__gfx1101__) || defined(__gfx1102__)) &&                    \
    (!defined(__AMDGCN_WAVEFRONT_SIZE) || __AMDGCN_WAVEFRONT_SIZE == 32)
#define FLEX_AMD_HAVE_WMMA 1
#endif

#if defined(FLEX_AMD_HAVE_MFMA) || defined(FLEX_AMD_HAVE_WMMA)
#define FLEX_AMD_FN     static FLEX_DEVICE_INLINE
#define FLEX_AMD_UNROLL _Pragma("unroll")

/* This lane's index in its wavefront (the upper count adds nothing in
 * wave32), and x as lane src of the wave holds it. */
static FLEX_DEVICE_INLINE int flex_amd_lane() {
    return (int)__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
}
static FLEX_DEVICE_INLINE flex_u32 flex_amd_read(flex_u32 x, int src) {
    return (flex_u32)__builtin_amdgcn_ds_bpermute(src << 2, (int)x);
}
static FLEX_DEVICE_INLINE float flex_amd_readf(float x, int src) {
    return __builtin_bit_cast(float, flex_amd_read(__builtin_bit_cast(flex_u32, x), src));
}
#endif

#if defined(FLEX_AMD_HAVE_MFMA)
typedef flex_u32 flex_u32x2 __attribute__((ext_vector_type(2)));
typedef float flex_f32x4 __attribute__((ext_vector_type(4)));
/* d = a b, v_mfma_f32_16x16x16{f16,bf16} (gfx90a's bf16 form is the _1k
 * one; gfx940 names both without the suffix), accumulator 0. */
static FLEX_DEVICE_INLINE void flex_amd_mfma16(const flex_u32 *a, const flex_u32 *b, float *d) {
    const flex_u32x2 av = {a[0], a[1]}, bv = {b[0], b[1]};
    const flex_f32x4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(FLEX_ELEM_BF16)
    typedef short flex_i16x4 __attribute__((ext_vector_type(4)));
    const flex_f32x4 r = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(
        __builtin_bit_cast(flex_i16x4, av), __builtin_bit_cast(flex_i16x4, bv), zero, 0, 0, 0);
#else
    typedef _Float16 flex_h16x4 __attribute__((ext_vector_type(4)));
    const flex_f32x4 r = __builtin_amdgcn_mfma_f32_16x16x16f16(
        __builtin_bit_cast(flex_h16x4, av), __builtin_bit_cast(flex_h16x4, bv), zero, 0, 0, 0);
#endif
    d[0] = r[0];
    d[1] = r[1];
    d[2] = r[2];
    d[3] = r[3];
}
#endif

#if defined(FLEX_AMD_HAVE_WMMA)
typedef flex_u32 flex_u32x8 __attribute__((ext_vector_type(8)));
typedef float flex_f32x8 __attribute__((ext_vector_type(8)));
/* d = a b, v_wmma_f32_16x16x16_{f16,bf16} in wave32, accumulator 0. */
static FLEX_DEVICE_INLINE void flex_amd_wmma16(const flex_u32 *a, const flex_u32 *b, float *d) {
    const flex_u32x8 av = {a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]};
    const flex_u32x8 bv = {b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]};
    const flex_f32x8 zero = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#if defined(FLEX_ELEM_BF16)
    typedef short flex_i16x16 __attribute__((ext_vector_type(16)));
    const flex_f32x8 r = __builtin_amdgcn_wmma_f32_16x16x16_bf16_w32(
        __builtin_bit_cast(flex_i16x16, av), __builtin_bit_cast(flex_i16x16, bv), zero);
#else
    typedef _Float16 flex_h16x16 __attribute__((ext_vector_type(16)));
    const flex_f32x8 r = __builtin_amdgcn_wmma_f32_16x16x16_f16_w32(
        __builtin_bit_cast(flex_h16x16, av), __builtin_bit_cast(flex_h16x16, bv), zero);
#endif
#pragma unroll
    for (int i = 0; i < 8; i++)
        d[i] = r[i];
}
#endif

#if defined(FLEX_AMD_HAVE_MFMA) || defined(FLEX_AMD_HAVE_WMMA)
#include "flex_amd_lanes.h"
#endif

/* d0 += a * b over n-tile 0 (bf[0], bf[1]), d1 += a * b over n-tile 1
 * (bf[2], bf[3]), as flex_mma_sm80.cuh's pair of mma.sync. */
static FLEX_DEVICE_INLINE void flex_mma_pair(float *d0, float *d1, const flex_u32 *a,
                                             const flex_u32 *bf) {
#if defined(FLEX_AMD_HAVE_MFMA)
    /* A warp calling it without the other warp of its wave would hand the
     * MFMAs that warp's stale registers: stop the kernel instead. */
    if (__builtin_amdgcn_read_exec() != ~0ull) __builtin_trap();
    flex_amd_pair_mfma(d0, d1, a, bf);
#elif defined(FLEX_AMD_HAVE_WMMA)
    flex_amd_pair_wmma(d0, d1, a, bf);
#else
    flex_mma(d0, a, bf[0], bf[1]);
    flex_mma(d1, a, bf[2], bf[3]);
#endif
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

#if defined(FLEX_BWD_DQ_RED) && FLEX_BWD_DQ_RED
/* The backward's red.global.add.v4.f32 (sm_90): four float atomics. AMD
 * has no 16-byte reduction and the HIP host never asks for this variant
 * (dq_red 0); it is here so that every configuration compiles. */
static FLEX_DEVICE_INLINE void flex_red_add_v4(float *addr, float a, float b, float c, float d) {
    atomicAdd(addr, a);
    atomicAdd(addr + 1, b);
    atomicAdd(addr + 2, c);
    atomicAdd(addr + 3, d);
}
#endif

#endif /* FLEX_ELEM_BF16 || FLEX_ELEM_F16 */
