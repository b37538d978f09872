/*
 * FLEXATTN_DEBUG: the parser and the accessors (see debug.h). Each key has a
 * form, checked when the variable is parsed, so a typo is a warning at
 * context creation rather than a switch silently left at its default.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef enum value_form {
    FORM_SWITCH,  /* 0 or 1 */
    FORM_COUNT,   /* a whole number >= 0 */
    FORM_SIMD,    /* auto, portable or avx512 */
    FORM_2_SIZES, /* AxB, numbers >= 1 */
    FORM_3_SIZES  /* AxBxC, numbers >= 1 */
} value_form;

typedef struct key_info {
    const char *name;
    value_form form;
} key_info;

static const key_info keys[FLEX_DEBUG_NUM_KEYS] = {
    [FLEX_DEBUG_CPU_REFERENCE] = {"cpu_reference", FORM_SWITCH},
    [FLEX_DEBUG_CPU_SIMD] = {"cpu_simd", FORM_SIMD},
    [FLEX_DEBUG_CPU_TILES] = {"cpu_tiles", FORM_2_SIZES},
    [FLEX_DEBUG_CUDA_TILE] = {"cuda_tile", FORM_3_SIZES},
    [FLEX_DEBUG_CUDA_TMA] = {"cuda_tma", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_WGMMA_STEP] = {"cuda_wgmma_step", FORM_COUNT},
    [FLEX_DEBUG_CUDA_PERSISTENT] = {"cuda_persistent", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_CHAIN] = {"cuda_chain", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_STEP_CUTS] = {"cuda_step_cuts", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_DIAG] = {"cuda_diag", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_CTAS] = {"cuda_ctas", FORM_COUNT},
    [FLEX_DEBUG_CUDA_READS_IN_RANGE] = {"cuda_reads_in_range", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_MASK_BITS] = {"cuda_mask_bits", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_PARTIAL_BITS] = {"cuda_partial_bits", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_HEAD_GROUP] = {"cuda_head_group", FORM_COUNT},
    [FLEX_DEBUG_CUDA_BWD_TILE] = {"cuda_bwd_tile", FORM_2_SIZES},
    [FLEX_DEBUG_CUDA_BWD_PIPELINE] = {"cuda_bwd_pipeline", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_EXP2] = {"cuda_bwd_exp2", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_DQ_RED] = {"cuda_bwd_dq_red", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_KV_FASTEST] = {"cuda_bwd_kv_fastest", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_HEAD_GROUP] = {"cuda_bwd_head_group", FORM_COUNT},
    [FLEX_DEBUG_CUDA_BWD_WGMMA] = {"cuda_bwd_wgmma", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_SPLIT_WAIT] = {"cuda_bwd_split_wait", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_WG_BARRIER] = {"cuda_bwd_wg_barrier", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_GRAD_SMEM] = {"cuda_bwd_grad_smem", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_DQ_BULK] = {"cuda_bwd_dq_bulk", FORM_SWITCH},
    [FLEX_DEBUG_CUDA_BWD_TMA] = {"cuda_bwd_tma", FORM_COUNT},
    [FLEX_DEBUG_CUDA_BWD_REFILL_EARLY] = {"cuda_bwd_refill_early", FORM_SWITCH},
    [FLEX_DEBUG_SCORE_SPARSITY] = {"score_sparsity", FORM_SWITCH},
};

static const char *const form_text[] = {
    [FORM_SWITCH] = "0 or 1",
    [FORM_COUNT] = "a whole number >= 0",
    [FORM_SIMD] = "auto, portable or avx512",
    [FORM_2_SIZES] = "AxB with whole numbers >= 1",
    [FORM_3_SIZES] = "AxBxC with whole numbers >= 1",
};

const char *flex_debug_key_name(flex_debug_key key) {
    return (unsigned)key < FLEX_DEBUG_NUM_KEYS ? keys[key].name : "?";
}

/* Reads a whole decimal number of at most 9 digits at *p; 0 and advances
 * *p, or -1. */
static int read_count(const char **p, long *out) {
    const char *s = *p;
    long n = 0;
    int digits = 0;
    while (*s >= '0' && *s <= '9' && digits < 10) {
        n = n * 10 + (*s++ - '0');
        digits++;
    }
    if (digits == 0 || digits > 9) return -1;
    *p = s;
    *out = n;
    return 0;
}

/* Whether value has the form of sizes: `count` numbers >= 1 joined by 'x'. */
static int is_sizes(const char *value, int count) {
    const char *p = value;
    for (int i = 0; i < count; i++) {
        long n;
        if (i > 0 && *p++ != 'x') return 0;
        if (read_count(&p, &n) != 0 || n < 1) return 0;
    }
    return *p == 0;
}

static int value_fits(value_form form, const char *value) {
    const char *p = value;
    long n;
    switch (form) {
    case FORM_SWITCH:
        return !strcmp(value, "0") || !strcmp(value, "1");
    case FORM_COUNT:
        return read_count(&p, &n) == 0 && *p == 0;
    case FORM_SIMD:
        return !strcmp(value, "auto") || !strcmp(value, "portable") || !strcmp(value, "avx512");
    case FORM_2_SIZES:
        return is_sizes(value, 2);
    case FORM_3_SIZES:
        return is_sizes(value, 3);
    }
    return 0;
}

static void warn_unknown(const char *item, size_t len) {
    char known[512] = "";
    for (int k = 0; k < FLEX_DEBUG_NUM_KEYS; k++) {
        size_t used = strlen(known);
        snprintf(known + used, sizeof known - used, "%s%s", k ? ", " : "", keys[k].name);
    }
    flex_log(FLEX_LOG_WARN, "FLEXATTN_DEBUG: unknown key '%.*s' ignored; known keys: %s",
             (int)(len > 64 ? 64 : len), item, known);
}

int flex_debug_parse(const char *text, flex_debug *debug) {
    memset(debug, 0, sizeof *debug);
    int skipped = 0;
    const char *p = text ? text : "";
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        size_t key_len = eq ? (size_t)(eq - p) : len;
        int key = -1;
        for (int k = 0; k < FLEX_DEBUG_NUM_KEYS; k++)
            if (strlen(keys[k].name) == key_len && !strncmp(keys[k].name, p, key_len)) key = k;
        if (len == 0) {
            /* an empty item ("a=1,,b=0" or a trailing ',') is harmless */
        } else if (key < 0) {
            warn_unknown(p, key_len);
            skipped++;
        } else if (!eq) {
            flex_log(FLEX_LOG_WARN, "FLEXATTN_DEBUG: '%s' has no value (%s=%s expected); ignored",
                     keys[key].name, keys[key].name, form_text[keys[key].form]);
            skipped++;
        } else {
            size_t value_len = len - key_len - 1;
            char value[FLEX_DEBUG_VALUE_MAX + 1];
            snprintf(value, sizeof value, "%.*s", (int)value_len, eq + 1);
            if (value_len > FLEX_DEBUG_VALUE_MAX || !value_fits(keys[key].form, value)) {
                flex_log(FLEX_LOG_WARN, "FLEXATTN_DEBUG: %s=%.*s ignored; the value must be %s",
                         keys[key].name, (int)(value_len > 64 ? 64 : value_len), eq + 1,
                         form_text[keys[key].form]);
                skipped++;
            } else {
                debug->set[key] = 1;
                memcpy(debug->value[key], value, value_len + 1);
            }
        }
        p += len;
        if (*p == ',') p++;
    }
    return skipped;
}

const char *flex_debug_string(const struct flex_context *ctx, flex_debug_key key) {
    if (!ctx || (unsigned)key >= FLEX_DEBUG_NUM_KEYS || !ctx->debug.set[key]) return NULL;
    return ctx->debug.value[key];
}

int flex_debug_int(const struct flex_context *ctx, flex_debug_key key, int dflt, int lo, int hi) {
    const char *v = flex_debug_string(ctx, key);
    if (!v) return dflt;
    char *end = NULL;
    const long n = strtol(v, &end, 10);
    return end != v && !*end && n >= lo && n <= hi ? (int)n : dflt;
}
