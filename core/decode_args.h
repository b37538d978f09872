/*
 * The decode and serving arguments of flex_attention (q_offsets, kv_lengths,
 * page_table of flex_attention_options): their checks, in two steps that
 * core/attention.c calls around resolving the block mask.
 */
#ifndef FLEXATTN_DECODE_ARGS_H
#define FLEXATTN_DECODE_ARGS_H

#include <stdint.h>

#include "flexattn.h"

/* What the checks learned; zero-initialise. The tensors are borrowed from
 * the caller's options for the call. */
typedef struct flex_decode_args {
    const flex_tensor *q_offsets, *kv_lengths, *page_table;
    int active;         /* any of the three given */
    int64_t page_size;  /* k->sizes[2] when paged, else 0 */
    int64_t num_pages;  /* k->sizes[0] when paged */
    int64_t kv_len;     /* logical kv length */
    int values_on_host; /* every given tensor is host memory (values checked) */
    int64_t q_end;      /* largest q_offsets[b] + Lq (host values), else Lq */
} flex_decode_args;

/* Element i of a 1-D or (row, col) of a 2-D int32 host tensor. Only for
 * tensors that passed the checks. */
int32_t flex_decode_load(const flex_tensor *t, int64_t row, int64_t col);

/*
 * Step 1, before k and v are matched with q: the tensors' dtype, dims and
 * device, the geometry of a paged k and v, and the logical kv length. B is
 * q's batch and Lq its length. Fills *d.
 */
flex_status flex_decode_check_tensors(flex_context *ctx, const char *fn,
                                      const flex_attention_options *opts, int64_t B, int64_t Lq,
                                      const flex_tensor *k, const flex_tensor *v,
                                      flex_decode_args *d);

/*
 * Step 2: the values of host tensors. Every q_offsets[b] >= 0 and at most
 * its batch's kv length; every kv_lengths[b] in [0, d->kv_len]; every page
 * a batch reads (those below its kv length) in [0, num_pages). Sets
 * d->q_end. Then, when mask_q_len >= 0 (a block mask is given), every
 * q_offsets[b] + Lq must be <= mask_q_len. Values on a device are left to
 * the backend.
 */
flex_status flex_decode_check_values(flex_context *ctx, const char *fn, flex_decode_args *d,
                                     int64_t B, int64_t Lq, int64_t mask_q_len);

#endif /* FLEXATTN_DECODE_ARGS_H */
