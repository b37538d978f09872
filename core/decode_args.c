/*
 * Checks of the decode and serving arguments (decode_args.h). Every value
 * a kernel will use to form an address (a page number, a kv length, an
 * offset that picks a block-mask row) is checked here when it lives on the
 * host, so that no backend reads memory outside the caller's tensors.
 */
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "decode_args.h"

int32_t flex_decode_load(const flex_tensor *t, int64_t row, int64_t col) {
    int64_t off = row * t->strides[0] + (t->ndim > 1 ? col * t->strides[1] : 0);
    return ((const int32_t *)t->data)[off];
}

/* An int32 tensor of ndim dims with sizes[0] == size0 and, for 2 dims,
 * sizes[1] >= 1; on the host or the context's device. */
static flex_status check_index_tensor(flex_context *ctx, const char *fn, const char *name,
                                      const flex_tensor *t, int ndim, int64_t size0) {
    if (!t->data) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: %s->data is NULL", fn, name);
    if (t->dtype != FLEX_I32)
        return flex_fail(ctx, FLEX_ERR_DTYPE, "%s: %s has dtype %s; i32 expected", fn, name,
                         flex_dtype_name(t->dtype));
    if (t->ndim != ndim)
        return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: %s must have %d dim%s, has %d", fn, name, ndim,
                         ndim > 1 ? "s" : "", t->ndim);
    if (t->sizes[0] != size0)
        return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: %s->sizes[0] is %lld; q's batch %lld expected",
                         fn, name, (long long)t->sizes[0], (long long)size0);
    for (int d = 0; d < ndim; d++) {
        if (t->sizes[d] < 1 || t->sizes[d] > INT32_MAX)
            return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: %s->sizes[%d] is %lld; 1 to 2^31-1 allowed",
                             fn, name, d, (long long)t->sizes[d]);
        if (t->strides[d] < 0)
            return flex_fail(ctx, FLEX_ERR_SHAPE, "%s: %s->strides[%d] is negative", fn, name, d);
    }
    uint64_t bytes;
    int bad = flex_tensor_byte_extent(t, &bytes);
    if (bad >= 0)
        return flex_fail(ctx, FLEX_ERR_OVERFLOW,
                         "%s: %s->strides[%d] reaches beyond the address space", fn, name, bad);
    int on_host = t->device == FLEX_DEVICE_CPU;
    int on_ctx = t->device == ctx->backend->device_type && t->device_index == ctx->device_index;
    if (!on_host && !on_ctx)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s: %s is on device type %d:%d; the host or the context's device "
                         "(%d:%d) is needed",
                         fn, name, (int)t->device, t->device_index, (int)ctx->backend->device_type,
                         ctx->device_index);
    return FLEX_OK;
}

flex_status flex_decode_check_tensors(flex_context *ctx, const char *fn,
                                      const flex_attention_options *opts, int64_t B, int64_t Lq,
                                      const flex_tensor *k, const flex_tensor *v,
                                      flex_decode_args *d) {
    memset(d, 0, sizeof *d);
    d->kv_len = k->sizes[2];
    d->q_end = Lq;
    d->values_on_host = 1;
    if (!opts) return FLEX_OK;
    d->q_offsets = opts->q_offsets;
    d->kv_lengths = opts->kv_lengths;
    d->page_table = opts->page_table;
    d->active = d->q_offsets || d->kv_lengths || d->page_table;
    flex_status st;
    if (d->q_offsets && (st = check_index_tensor(ctx, fn, "opts->q_offsets", d->q_offsets, 1, B)))
        return st;
    if (d->kv_lengths &&
        (st = check_index_tensor(ctx, fn, "opts->kv_lengths", d->kv_lengths, 1, B)))
        return st;
    if (d->page_table) {
        if ((st = check_index_tensor(ctx, fn, "opts->page_table", d->page_table, 2, B))) return st;
        d->page_size = k->sizes[2];
        d->num_pages = k->sizes[0];
        if (v->sizes[0] != d->num_pages || v->sizes[2] != d->page_size)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: with a page table v must be (num_pages %lld, Hkv, page_size "
                             "%lld, Dv) like k, has (%lld, ., %lld, .)",
                             fn, (long long)d->num_pages, (long long)d->page_size,
                             (long long)v->sizes[0], (long long)v->sizes[2]);
        int64_t max_pages = d->page_table->sizes[1];
        if (max_pages > INT32_MAX / d->page_size)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "%s: opts->page_table has %lld pages of %lld rows per batch; the "
                             "logical kv length must fit 2^31-1",
                             fn, (long long)max_pages, (long long)d->page_size);
        d->kv_len = max_pages * d->page_size;
    }
    const flex_tensor *given[3] = {d->q_offsets, d->kv_lengths, d->page_table};
    for (int i = 0; i < 3; i++)
        if (given[i] && given[i]->device != FLEX_DEVICE_CPU) d->values_on_host = 0;
    return FLEX_OK;
}

flex_status flex_decode_check_values(flex_context *ctx, const char *fn, flex_decode_args *d,
                                     int64_t B, int64_t Lq, int64_t mask_q_len) {
    if (!d->active || !d->values_on_host) return FLEX_OK;
    int64_t q_end = Lq;
    for (int64_t b = 0; b < B; b++) {
        int64_t len = d->kv_len;
        if (d->kv_lengths) {
            int32_t n = flex_decode_load(d->kv_lengths, b, 0);
            if (n < 0 || n > d->kv_len)
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                 "%s: opts->kv_lengths[%lld] = %d is outside [0, %lld] (the "
                                 "%s kv length)",
                                 fn, (long long)b, (int)n, (long long)d->kv_len,
                                 d->page_table ? "page table's" : "cache's");
            len = n;
        }
        if (d->q_offsets) {
            int32_t off = flex_decode_load(d->q_offsets, b, 0);
            if (off < 0)
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                 "%s: opts->q_offsets[%lld] = %d is negative", fn, (long long)b,
                                 (int)off);
            if (off > len)
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                 "%s: opts->q_offsets[%lld] = %d is past batch %lld's kv length "
                                 "%lld",
                                 fn, (long long)b, (int)off, (long long)b, (long long)len);
            if ((int64_t)off + Lq > INT32_MAX)
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                 "%s: opts->q_offsets[%lld] = %d with Lq %lld passes 2^31-1", fn,
                                 (long long)b, (int)off, (long long)Lq);
            if (off + Lq > q_end) q_end = off + Lq;
            if (mask_q_len >= 0 && off + Lq > mask_q_len)
                return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                 "%s: opts->q_offsets[%lld] = %d with Lq %lld reaches position "
                                 "%lld, past the block mask's q_len %lld",
                                 fn, (long long)b, (int)off, (long long)Lq, (long long)(off + Lq),
                                 (long long)mask_q_len);
        }
        if (d->page_table) {
            int64_t pages_read = (len + d->page_size - 1) / d->page_size;
            for (int64_t p = 0; p < pages_read; p++) {
                int32_t page = flex_decode_load(d->page_table, b, p);
                if (page < 0 || page >= d->num_pages)
                    return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                                     "%s: opts->page_table[%lld][%lld] = %d is outside [0, %lld) "
                                     "(the pages of k and v)",
                                     fn, (long long)b, (long long)p, (int)page,
                                     (long long)d->num_pages);
            }
        }
    }
    d->q_end = q_end;
    return FLEX_OK;
}
