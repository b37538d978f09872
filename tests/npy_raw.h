/*
 * A version 1.0 .npy file written byte by byte, for tests of the reader and
 * of the program: any header dict, padded as NumPy pads it, then `bytes`
 * bytes of data (zeros, or the counting pattern i & 0xff). The caller owns
 * the file at `path`.
 */
#ifndef FLEXATTN_TESTS_NPY_RAW_H
#define FLEXATTN_TESTS_NPY_RAW_H

#include <check.h>
#include <stdio.h>
#include <string.h>

static inline void npy_write_raw(const char *path, const char *dict, size_t bytes, int counting) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    size_t n = strlen(dict), total = 10 + n + 1, pad = (64 - total % 64) % 64;
    unsigned hlen = (unsigned)(n + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    ck_assert_uint_eq(fwrite(pre, 1, 10, f), 10);
    ck_assert_uint_eq(fwrite(dict, 1, n, f), n);
    for (size_t i = 0; i < pad; i++)
        fputc(' ', f);
    fputc('\n', f);
    for (size_t i = 0; i < bytes; i++)
        fputc(counting ? (int)(i & 0xff) : 0, f);
    ck_assert_int_eq(fclose(f), 0);
}

#endif
