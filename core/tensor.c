/*
 * Tensor views and dtypes.
 */
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
