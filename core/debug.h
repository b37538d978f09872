/*
 * FLEXATTN_DEBUG=key=value,key=value: the experiment switches (tile
 * overrides, kernel variants for comparison), in one variable that is read
 * once, when a context is created, into the context. docs/debugging.md lists
 * the keys. Backends read them through flex_debug_int / flex_debug_string,
 * never through getenv, so a context's switches do not change under it.
 */
#ifndef FLEXATTN_DEBUG_H
#define FLEXATTN_DEBUG_H

#include <stddef.h>

struct flex_context;

/* Values longer than this are refused with a warning. */
enum { FLEX_DEBUG_VALUE_MAX = 32 };

/* Keys, in the order of the table in core/debug.c. */
typedef enum flex_debug_key {
    FLEX_DEBUG_CPU_REFERENCE,
    FLEX_DEBUG_CPU_SIMD,
    FLEX_DEBUG_CPU_TILES,
    FLEX_DEBUG_CUDA_TILE,
    FLEX_DEBUG_CUDA_TMA,
    FLEX_DEBUG_CUDA_WGMMA_STEP,
    FLEX_DEBUG_CUDA_PERSISTENT,
    FLEX_DEBUG_CUDA_CHAIN,
    FLEX_DEBUG_CUDA_STEP_CUTS,
    FLEX_DEBUG_CUDA_DIAG,
    FLEX_DEBUG_CUDA_CTAS,
    FLEX_DEBUG_CUDA_READS_IN_RANGE,
    FLEX_DEBUG_CUDA_MASK_BITS,
    FLEX_DEBUG_CUDA_PARTIAL_BITS,
    FLEX_DEBUG_CUDA_HEAD_GROUP,
    FLEX_DEBUG_CUDA_BWD_TILE,
    FLEX_DEBUG_CUDA_BWD_PIPELINE,
    FLEX_DEBUG_CUDA_BWD_EXP2,
    FLEX_DEBUG_CUDA_BWD_DQ_RED,
    FLEX_DEBUG_CUDA_BWD_KV_FASTEST,
    FLEX_DEBUG_CUDA_BWD_HEAD_GROUP,
    FLEX_DEBUG_CUDA_BWD_WGMMA,
    FLEX_DEBUG_CUDA_BWD_SPLIT_WAIT,
    FLEX_DEBUG_CUDA_BWD_WG_BARRIER,
    FLEX_DEBUG_CUDA_BWD_GRAD_SMEM,
    FLEX_DEBUG_CUDA_BWD_DQ_BULK,
    FLEX_DEBUG_CUDA_BWD_TMA,
    FLEX_DEBUG_CUDA_BWD_REFILL_EARLY,
    FLEX_DEBUG_SCORE_SPARSITY,
    FLEX_DEBUG_NUM_KEYS
} flex_debug_key;

/* The values set, as text; owned by the context. */
typedef struct flex_debug {
    unsigned char set[FLEX_DEBUG_NUM_KEYS];
    char value[FLEX_DEBUG_NUM_KEYS][FLEX_DEBUG_VALUE_MAX + 1];
} flex_debug;

/*
 * Parses text ("key=value,key=value"; NULL or "" sets nothing) into *debug.
 * Never fails: an unknown key, an item without '=', or a value too long is
 * skipped with a warning (FLEXATTN_LOG) that names it and the known keys.
 * Returns the number of items skipped.
 */
int flex_debug_parse(const char *text, flex_debug *debug);

/* The key's name ("cuda_tile"). Static string. */
const char *flex_debug_key_name(flex_debug_key key);

/* The value of key as a whole decimal number in [lo, hi], otherwise (unset,
 * not a number, out of range) dflt. */
int flex_debug_int(const struct flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi);

/* The value of key as text, or NULL when it is not set. Owned by ctx. */
const char *flex_debug_string(const struct flex_context *ctx, flex_debug_key key);

#endif /* FLEXATTN_DEBUG_H */
