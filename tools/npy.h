/*
 * A small reader and writer of NumPy .npy files (format versions 1.0, 2.0
 * and 3.0; little-endian; C order; up to 8 dims).
 *
 * dtypes: '<f4' f32, '<f2' f16, '<i4' i32, '<i8' i64, '|u1' u8, '|b1' bool.
 * bfloat16 has no NumPy dtype of its own: it is read from '<u2' (the raw
 * bits, as `a.view(np.uint16)` saves them) or from a two-byte void '|V2' /
 * '<V2' (how ml_dtypes.bfloat16 arrays are saved), and written as '<u2'.
 * Load such a file with `np.load(f).view(ml_dtypes.bfloat16)`.
 * A file whose dtype is '<u2' is therefore read as bf16 unless the caller
 * asks for another meaning.
 */
#ifndef FLEXATTN_NPY_H
#define FLEXATTN_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"

#define NPY_MAX_DIMS 8

typedef struct npy_array {
    flex_dtype dtype;
    int ndim;
    int64_t shape[NPY_MAX_DIMS];
    void *data;   /* malloc'd, owned by the array (npy_free) */
    size_t bytes; /* size of data */
} npy_array;

/*
 * Reads path into *out. On failure returns FLEX_ERR_IO (file missing,
 * truncated, malformed header, unsupported dtype, Fortran order, big-endian)
 * with a message naming the file in err, and leaves *out empty.
 */
flex_status npy_read(const char *path, npy_array *out, char *err, size_t err_cap);

/* Writes a C-order array; FLEX_ERR_IO with a message naming the file. */
flex_status npy_write(const char *path, flex_dtype dtype, int ndim, const int64_t *shape,
                      const void *data, char *err, size_t err_cap);

void npy_free(npy_array *a);

#endif /* FLEXATTN_NPY_H */
