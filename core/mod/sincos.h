/*
 * sin and cos of a float near zero, for the code the GPU backends emit for
 * mods (core/mod/emit.c puts this text before the mods' helpers).
 *
 * The library's sinf and cosf are exact to 2 ulp everywhere, but their far
 * path (Payne-Hanek reduction over a table in local memory) is a loop that
 * a kernel cannot afford at each of the 64 scores a thread holds, so the
 * emitted mods call them out of line; a called function then runs its
 * dependent chain of about 40 instructions alone. Here the usual path is
 * inline, so the scores' chains interleave, and only arguments beyond
 * FLEX_SINCOS_NEAR go to the library (flex_sinf and flex_cosf in emit.c):
 *
 *   j = rint(a * 2/pi); r = a - j * pi/2, in three fused steps with pi/2
 *   split into three floats (c1 + c2 + c3, 72 bits of pi/2); then sin or
 *   cos of r in [-pi/4, pi/4] (a little beyond, where a * 2/pi rounded up
 *   to the next integer) by minimax polynomials in r^2, the quadrant
 *   (j + quarter) mod 4 choosing which and its sign.
 *
 * The polynomials' coefficients are a least-squares fit of relative error
 * reweighted toward minimax (scripts/fit_sincos.py) on |r| <= 0.792,
 * rounded to float. Every operation is a single float operation or an
 * explicit fmaf, so the host compiles the same arithmetic as the device:
 * tests/test_sincos.c checks it against double precision (every float up to
 * FLEX_SINCOS_NEAR with FLEXATTN_SINCOS_ALL=1: at most 1.541 ulp for sin,
 * 1.537 for cos; CUDA's sinf and cosf are within 2).
 *
 * Plain C on the host; inside emitted kernel source (where vendor.cuh has
 * defined FLEX_DEVICE_INLINE) CUDA or HIP device code.
 */
#ifndef FLEXATTN_MOD_SINCOS_H
#define FLEXATTN_MOD_SINCOS_H

/* No include directive: the text is spliced into kernel source, and hiprtc has no
 * include path. A host includer includes <math.h> first (rintf, fmaf). */
#ifdef FLEX_DEVICE_INLINE
#define FLEX_SINCOS_FN static FLEX_DEVICE_INLINE
#else
#define FLEX_SINCOS_FN static inline
#endif

/* The largest |a| the inline path takes: beyond it j * c3 is no longer
 * small enough against the smallest remainders (the bound of the three-step
 * reduction). */
#define FLEX_SINCOS_NEAR 105615.0f

/* sin(a) for quarter 0, cos(a) = sin(a + pi/2) for quarter 1; |a| <=
 * FLEX_SINCOS_NEAR (NaN and the infinities give NaN). */
FLEX_SINCOS_FN float flex_sincos_near(float a, int quarter) {
    const float j = rintf(a * 0x1.45f306p-1f); /* 2/pi */
    float r = fmaf(j, -0x1.921fb6p+0f, a);     /* c1: pi/2 rounded to float */
    r = fmaf(j, 0x1.777a5cp-25f, r);           /* c2 = pi/2 - c1, negative */
    r = fmaf(j, 0x1.ee59dap-50f, r);           /* c3 = pi/2 - c1 - c2, negative */
    const int q = (int)j + quarter;
    const float s = r * r;
    /* sin r = r + r^3 (s1 + s2 r^2 + s3 r^4) */
    float ps = fmaf(-0x1.992686p-13f, s, 0x1.1106e6p-7f);
    ps = fmaf(ps, s, -0x1.555544p-3f);
    const float sin_r = fmaf(ps, r * s, r);
    /* cos r = 1 + r^2 (-1/2 + k2 r^2 + k3 r^4 + k4 r^6) */
    float pc = fmaf(0x1.98f812p-16f, s, -0x1.6c076ep-10f);
    pc = fmaf(pc, s, 0x1.55553cp-5f);
    pc = fmaf(pc, s, -0.5f);
    const float cos_r = fmaf(pc, s, 1.0f);
    const float v = (q & 1) ? cos_r : sin_r;
    /* sin(-0) is -0 (the reduction's sums give +0) */
    return (q & 2) ? -v : (quarter == 0 && a == 0.0f) ? a : v;
}

#endif /* FLEXATTN_MOD_SINCOS_H */
