/*
 * Tile choices for attention calls. The CPU numbers come from measurements
 * of the register-blocked micro-kernels (docs/cpu-backend.md): a 128 x 128
 * tile keeps the packed Q tile, the score tile and the output accumulator
 * (about 200 KiB at D = 128) inside L2 while K/V panels stream through L1.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "plan.h"

/* 128 x 128 tiles amortise packing and per-tile bookkeeping best; partial
 * blocks are trimmed per group of 32 rows inside the backend. */
enum { CPU_DEFAULT_Q_TILE = 128, CPU_DEFAULT_KV_TILE = 128 };

static int min_int(int a, int b) {
    return a < b ? a : b;
}

flex_status flex_plan_make(flex_context *ctx, const flex_forward_args *args,
                           struct flex_plan *plan) {
    memset(plan, 0, sizeof *plan);
    const struct flex_block_mask *mask = args ? args->block_mask : NULL;
    plan->q_tile = CPU_DEFAULT_Q_TILE;
    plan->kv_tile = CPU_DEFAULT_KV_TILE;
    plan->longest_first = 1;
    plan->use_reference = flex_debug_int(ctx, FLEX_DEBUG_CPU_REFERENCE, 0, 0, 1);
    plan->simd = FLEX_PLAN_SIMD_AUTO;
    /* Packing K/V once per call costs one f32 copy of them; per-tile packing
     * repeats the work for every q-tile. Above the limit the copy is not
     * worth the memory. */
    plan->prepack_kv = 1;
    plan->prepack_limit_bytes = (int64_t)1 << 30;
    const char *simd = flex_debug_string(ctx, FLEX_DEBUG_CPU_SIMD);
    if (simd && strcmp(simd, "portable") == 0) plan->simd = FLEX_PLAN_SIMD_PORTABLE;
    if (simd && strcmp(simd, "avx512") == 0) plan->simd = FLEX_PLAN_SIMD_AVX512;

    /* FLEXATTN_DEBUG=cpu_tiles=QxKV overrides the tile sizes (for tuning). */
    const char *tiles = flex_debug_string(ctx, FLEX_DEBUG_CPU_TILES);
    int tq = 0, tkv = 0;
    if (tiles && sscanf(tiles, "%dx%d", &tq, &tkv) == 2 && tq >= 1 && tq <= 1024 && tkv >= 1 &&
        tkv <= 1024 && !(tq & (tq - 1)) && !(tkv & (tkv - 1))) {
        plan->q_tile = tq;
        plan->kv_tile = tkv;
    }

    if (mask) {
        /* Block sizes are powers of two, so min() keeps divisibility. */
        plan->q_tile = min_int(plan->q_tile, mask->q_block);
        plan->kv_tile = min_int(plan->kv_tile, mask->kv_block);
    }
    return FLEX_OK;
}
