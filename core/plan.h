/*
 * Tiling plans: the one place where a backend's tile choices live.
 *
 * The core makes a plan for every attention call (flex_plan_make) and hands
 * it to the backend in flex_forward_args.plan / flex_backward_args.plan. A
 * backend reads the fields it understands; GPU backends add their own fields
 * at the end of the struct (keep every field meaningful when zero-initialised
 * so that a plan built by older code stays valid).
 */
#ifndef FLEXATTN_PLAN_H
#define FLEXATTN_PLAN_H

#include "flexattn.h"
#include "backend.h"

struct flex_plan {
    /* ---- every backend ---- */
    int q_tile;        /* query rows per work item (power of two) */
    int kv_tile;       /* key/value columns per inner step (power of two) */
    int longest_first; /* order work items by descending non-empty block count */

    /* ---- CPU backend ---- */
    int use_reference;           /* take the plain untiled reference path (tests) */
    int num_threads;             /* 0 = the OpenMP default (OMP_NUM_THREADS) */
    int simd;                    /* micro-kernels: FLEX_PLAN_SIMD_* */
    int prepack_kv;              /* pack all K/V tiles once per call (else per tile) */
    int64_t prepack_limit_bytes; /* largest such packed copy; 0 = no limit */

    /* ---- GPU backends add their fields below ---- */
};

/* Micro-kernel families of the CPU backend. */
enum {
    FLEX_PLAN_SIMD_AUTO = 0,     /* the best the CPU supports */
    FLEX_PLAN_SIMD_PORTABLE = 1, /* plain C that the compiler vectorises */
    FLEX_PLAN_SIMD_AVX512 = 2    /* AVX-512F + FMA intrinsics (x86-64) */
};

/*
 * Fills *plan for the call described by args (whose plan field is ignored).
 * Tiles respect the block mask: q_tile divides the mask's q_block and kv_tile
 * divides its kv_block, so every tile lies inside one block. The context's
 * FLEXATTN_DEBUG switches (core/debug.h): cpu_reference=1 selects the CPU
 * reference path, cpu_simd=portable|avx512 forces a micro-kernel family and
 * cpu_tiles=QxKV (powers of two) sets q_tile and kv_tile. The core
 * then applies the caller's kernel hints (flex_attention_options) on top.
 * Borrows args for the call. Never fails today; returns FLEX_OK.
 */
flex_status flex_plan_make(flex_context *ctx, const flex_forward_args *args,
                           struct flex_plan *plan);

#endif /* FLEXATTN_PLAN_H */
