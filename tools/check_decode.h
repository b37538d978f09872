/*
 * One decode case against the fp64 oracle, for `flexattn check` and
 * `flexattn run --check`: Lq query rows per batch at absolute positions
 * q_offsets[b] .. q_offsets[b] + Lq - 1 against the first kv_lengths[b]
 * keys of a cache, contiguous or in a pool of shuffled pages.
 */
#ifndef FLEXATTN_CHECK_DECODE_H
#define FLEXATTN_CHECK_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"

typedef struct check_decode_case {
    int B, Hq, Hkv, Lq, D, Dv;
    int cap; /* the cache's logical length (rounded up to whole pages when paged) */
    flex_dtype dtype;
    int page_size;     /* 0: a contiguous cache */
    int shuffle_pages; /* pages in a pseudo-random order (else in order) */
    int kv_splits;     /* the hint passed on */
    int args_on_device; /* q_offsets, kv_lengths and the page table copied to the device */
    /* B entries each; borrowed. kv_lengths in [0, cap], q_offsets >= 0. */
    const int32_t *q_offsets, *kv_lengths;
} check_decode_case;

/* The decode call's inputs on the context's device (k and v as the cache
 * or the page pools; rows past a batch's kv length and unused pages hold
 * NaN), and the host copies the oracle reads. Built by check_decode_make,
 * freed by check_decode_free. */
typedef struct check_decode_data {
    flex_context *ctx;
    void *host_q, *host_k,
        *host_v;  /* (B, Hq, cap, D) queries at every position, (B, Hkv, cap, D / Dv) */
    void *dev[8]; /* q, k, v, out, lse; q_offsets, kv_lengths, page table (args_on_device) */
    size_t bytes[8];
    flex_tensor t[5];
    int32_t *table; /* (B, max_pages) when paged */
    flex_tensor offsets_t, lengths_t, table_t;
    flex_attention_options opts;
} check_decode_data;

/* Returns 0, or -1 with a message in why. */
int check_decode_make(flex_context *ctx, const check_decode_case *c, uint64_t seed,
                      check_decode_data *d, char *why, size_t cap);
void check_decode_free(check_decode_data *d);

/* Runs the forward once (mask: a block mask in logical positions, or NULL
 * with mask_mod in the options). */
flex_status check_decode_forward(check_decode_data *d, const flex_mod *score,
                                 const flex_mod *mask_mod, const flex_block_mask *mask);

/*
 * Compares the last forward's out and lse with the oracle by the tolerance
 * rule (tests/tolerance.h); *rel and *lse_err are the parts of the bounds
 * used. Returns 1 pass, 0 fail (why says how), -1 on an error (why).
 */
int check_decode_compare(check_decode_data *d, const check_decode_case *c, const flex_mod *score,
                         const flex_mod *mask_mod, double *rel, double *lse_err, char *why,
                         size_t cap);

#endif /* FLEXATTN_CHECK_DECODE_H */
