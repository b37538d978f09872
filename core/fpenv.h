/*
 * The floating-point environment of each piece of arithmetic.
 *
 * Mods are evaluated in IEEE single precision with subnormals everywhere:
 * constant folding, interval analysis, block-mask building, the CPU
 * backend's mod evaluation and the CUDA kernels (NVRTC without --ftz). So a
 * mask mod with tiny constants gives the same bits whether a block is
 * decided by interval analysis, by the block-mask builder or inside a
 * kernel (docs/decisions.md, "Subnormals").
 *
 * The CPU kernels' own products (scores, exp, P V and the backward's) run
 * with subnormals flushed to zero (x86 FTZ and DAZ), for speed; and a
 * caller's thread may run flushed too (programs built with -ffast-math set
 * FTZ and DAZ at start-up). Whoever evaluates a mod therefore first puts the
 * thread in the IEEE state with flex_fp_mods_begin(), and puts back what it
 * found with flex_fp_restore(). MXCSR is per thread: a parallel region sets
 * it in each of its threads. Elsewhere than x86 nothing changes (the kernels
 * do not flush there).
 *
 * All inline: each call is a read and a write of MXCSR (a few cycles), made
 * once per tile or per block-mask walk, never per element.
 */
#ifndef FLEXATTN_FPENV_H
#define FLEXATTN_FPENV_H

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h> /* MXCSR; before any AVX-512 target region */

enum { FLEX_FP_FTZ_DAZ = 0x8040u }; /* FTZ (bit 15) and DAZ (bit 6) */

/* Subnormals kept (IEEE): the arithmetic of every mod evaluation. Returns
 * the state to restore. */
static inline unsigned flex_fp_mods_begin(void) {
    unsigned saved = _mm_getcsr();
    if (saved & FLEX_FP_FTZ_DAZ) _mm_setcsr(saved & ~(unsigned)FLEX_FP_FTZ_DAZ);
    return saved;
}

/* Subnormals flushed to zero: the CPU kernels' products. Returns the state
 * to restore. */
static inline unsigned flex_fp_flush_begin(void) {
    unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | FLEX_FP_FTZ_DAZ);
    return saved;
}

static inline void flex_fp_restore(unsigned saved) {
    if (_mm_getcsr() != saved) _mm_setcsr(saved);
}
#else
static inline unsigned flex_fp_mods_begin(void) {
    return 0;
}
static inline unsigned flex_fp_flush_begin(void) {
    return 0;
}
static inline void flex_fp_restore(unsigned saved) {
    (void)saved;
}
#endif

#endif /* FLEXATTN_FPENV_H */
