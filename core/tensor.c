/*
 * Tensor views and dtypes, and the checked size of the memory a view reaches.
 */
#include <stdint.h>
#include <string.h>

#include "internal.h"

size_t flex_dtype_size(flex_dtype dtype) {
    switch (dtype) {
    case FLEX_F32:
    case FLEX_I32:
        return 4;
    case FLEX_F16:
    case FLEX_BF16:
        return 2;
    case FLEX_I64:
        return 8;
    case FLEX_U8:
    case FLEX_BOOL:
        return 1;
    }
    return 0;
}

const char *flex_dtype_name(flex_dtype dtype) {
    switch (dtype) {
    case FLEX_F32:
        return "f32";
    case FLEX_F16:
        return "f16";
    case FLEX_BF16:
        return "bf16";
    case FLEX_I32:
        return "i32";
    case FLEX_I64:
        return "i64";
    case FLEX_U8:
        return "u8";
    case FLEX_BOOL:
        return "bool";
    }
    return "unknown-dtype";
}

static flex_tensor view4(void *data, flex_dtype dtype, const int64_t sizes[4],
                         const int64_t strides[4], flex_device_type device) {
    flex_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.ndim = 4;
    memcpy(t.sizes, sizes, sizeof t.sizes);
    memcpy(t.strides, strides, sizeof t.strides);
    t.device = device;
    return t;
}

flex_tensor flex_tensor_bhsd(void *data, flex_dtype dtype, int64_t B, int64_t H, int64_t S,
                             int64_t D, flex_device_type device) {
    const int64_t sizes[4] = {B, H, S, D};
    const int64_t strides[4] = {H * S * D, S * D, D, 1};
    return view4(data, dtype, sizes, strides, device);
}

flex_tensor flex_tensor_bshd(void *data, flex_dtype dtype, int64_t B, int64_t H, int64_t S,
                             int64_t D, flex_device_type device) {
    const int64_t sizes[4] = {B, H, S, D};
    const int64_t strides[4] = {S * H * D, D, H * D, 1};
    return view4(data, dtype, sizes, strides, device);
}

flex_tensor flex_tensor_contiguous(void *data, flex_dtype dtype, int ndim, const int64_t *sizes,
                                   flex_device_type device) {
    flex_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    if (ndim < 1 || ndim > 4 || !sizes) return t; /* ndim 0 marks the view invalid */
    t.ndim = ndim;
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        t.sizes[d] = sizes[d];
        t.strides[d] = stride;
        stride *= sizes[d];
    }
    return t;
}

int flex_tensor_byte_extent(const flex_tensor *t, uint64_t *bytes) {
    /* Every step is checked: a stride near 2^62 times a size overflows
     * int64, and so can the sum of the dims' spans. */
    int64_t max_offset = 0, widest_span = -1;
    int widest = 0;
    for (int d = 0; d < t->ndim; d++) {
        int64_t span;
        if (__builtin_mul_overflow(t->sizes[d] - 1, t->strides[d], &span) ||
            __builtin_add_overflow(max_offset, span, &max_offset))
            return d;
        if (span > widest_span) {
            widest_span = span;
            widest = d;
        }
    }
    /* Elements to bytes, and the end address itself, must fit too; the dim
     * to blame is then the one that reaches furthest. */
    uint64_t total;
    uintptr_t end;
    if (__builtin_mul_overflow((uint64_t)max_offset + 1, (uint64_t)flex_dtype_size(t->dtype),
                               &total) ||
        total > (uint64_t)PTRDIFF_MAX || __builtin_add_overflow((uintptr_t)t->data, total, &end))
        return widest;
    *bytes = total;
    return -1;
}
