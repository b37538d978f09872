/*
 * Buffer reads for the host evaluators, and bounds errors in words.
 */
#include <stdio.h>
#include <string.h>

#include "dtype.h"
#include "mod/eval.h"

int mod_buffer_read(const mod_buffer_view *view, int buffer, const int32_t *idx, ir_value *out,
                    mod_bounds_error *err) {
    int64_t offset = 0;
    for (int d = 0; d < view->ndim; d++) {
        int64_t i = idx[d];
        if (i < 0 || i >= view->sizes[d]) {
            if (err && !err->set) {
                err->set = 1;
                err->buffer = buffer;
                err->dim = d;
                err->index = i;
                err->size = view->sizes[d];
            }
            return -1;
        }
        offset += i * view->strides[d];
    }
    const unsigned char *base = view->data;
    switch (view->dtype) {
    case FLEX_F32: {
        float f;
        memcpy(&f, base + offset * 4, sizeof f);
        out->f = f;
        break;
    }
    case FLEX_F16: {
        uint16_t h;
        memcpy(&h, base + offset * 2, sizeof h);
        out->f = flex_f16_to_float(h);
        break;
    }
    case FLEX_BF16: {
        uint16_t h;
        memcpy(&h, base + offset * 2, sizeof h);
        out->f = flex_bf16_to_float(h);
        break;
    }
    case FLEX_I32: {
        int32_t v;
        memcpy(&v, base + offset * 4, sizeof v);
        out->i = v;
        break;
    }
    case FLEX_I64: {
        /* keeps the low 32 bits, as torch's .int() does */
        uint64_t v;
        memcpy(&v, base + offset * 8, sizeof v);
        uint32_t low = (uint32_t)v;
        int32_t s;
        memcpy(&s, &low, sizeof s);
        out->i = s;
        break;
    }
    case FLEX_U8:
        out->i = base[offset];
        break;
    case FLEX_BOOL:
        out->i = base[offset] != 0;
        break;
    default:
        out->i = 0;
        break;
    }
    return 0;
}

void mod_bounds_error_format(const ir_mod *m, const mod_bounds_error *err, char *msg, size_t cap) {
    if (!msg || cap == 0) return;
    if (!err || !err->set) {
        snprintf(msg, cap, "no buffer read was out of range");
        return;
    }
    const char *name = "?";
    int ndim = 0;
    if (m && err->buffer >= 0 && err->buffer < m->num_buffers) {
        name = m->buffers[err->buffer].name;
        ndim = m->buffers[err->buffer].ndim;
    }
    if (ndim > 1)
        snprintf(msg, cap,
                 "buffer '%s' was read out of range: index %lld of dimension %d, whose size is "
                 "%lld (at b=%d, h=%d, q=%d, kv=%d)",
                 name, (long long)err->index, err->dim, (long long)err->size, (int)err->b,
                 (int)err->h, (int)err->q, (int)err->kv);
    else
        snprintf(msg, cap,
                 "buffer '%s' was read out of range: index %lld, whose size is %lld (at b=%d, "
                 "h=%d, q=%d, kv=%d)",
                 name, (long long)err->index, (long long)err->size, (int)err->b, (int)err->h,
                 (int)err->q, (int)err->kv);
}
