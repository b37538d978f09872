/*
 * Element conversions shared by every host-side reader and writer of f16 and
 * bf16 data. Round-to-nearest-even on the way down, exact on the way up;
 * NaN stays NaN and infinities stay infinite.
 */
#ifndef FLEXATTN_DTYPE_H
#define FLEXATTN_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "flexattn.h"

static inline float flex_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t flex_float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float flex_f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {
        /* subnormal: renormalise */
        int shift = 0;
        while (!(man & 0x400u)) {
            man <<= 1;
            shift++;
        }
        man &= 0x3ffu;
        u = sign | ((uint32_t)(113 - shift) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t flex_float_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    if (abs < 0x38800000u) {
        /* result is subnormal or zero: scale into the 10-bit mantissa */
        if (abs < 0x33000000u) return sign; /* below half the smallest subnormal */
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exp; /* 14 + (112 - exp) - 1 + 1 */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* Element i of an f32, f16 or bf16 array, as a float. */
static inline float flex_load_as_float(const void *base, flex_dtype dt, int64_t i) {
    switch (dt) {
    case FLEX_F16:
        return flex_f16_to_float(((const uint16_t *)base)[i]);
    case FLEX_BF16:
        return flex_bf16_to_float(((const uint16_t *)base)[i]);
    default:
        return ((const float *)base)[i];
    }
}

/* Stores v as element i of an f32, f16 or bf16 array (rounded to nearest
 * even for the 16-bit types). */
static inline void flex_store_from_float(void *base, flex_dtype dt, int64_t i, float v) {
    switch (dt) {
    case FLEX_F16:
        ((uint16_t *)base)[i] = flex_float_to_f16(v);
        break;
    case FLEX_BF16:
        ((uint16_t *)base)[i] = flex_float_to_bf16(v);
        break;
    default:
        ((float *)base)[i] = v;
        break;
    }
}

#endif /* FLEXATTN_DTYPE_H */
