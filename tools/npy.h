/*
 * A small reader and writer of NumPy .npy files (format versions 1.0, 2.0
 * and 3.0; little-endian; C order; up to 8 dims).
 *
 * dtypes: '<f4' f32, '<f2' f16, '<i4' i32, '<i8' i64, '|u1' u8, '|b1' bool.
 * bfloat16 has no NumPy dtype of its own. It is written as '<V2', the
 * descr NumPy writes for an ml_dtypes.bfloat16 array, so such a file loads
 * with `np.load(f).view(ml_dtypes.bfloat16)` (or `.view(np.uint16)` for
 * the raw bits). It is read from '<V2', '|V2' and '<u2' (the raw bits, as
 * `a.view(np.uint16)` saves them): a '<u2' file is therefore read as bf16.
 *
 * Reading is safe on any file: only regular files are opened (a FIFO or a
 * device is refused without blocking), and the size the header claims is
 * checked against NPY_MAX_BYTES and against the file's size before any
 * allocation; a file longer or shorter than its header says is refused.
 */
#ifndef FLEXATTN_NPY_H
#define FLEXATTN_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"

#define NPY_MAX_DIMS 8
/* The longest header read (format 2.0 and 3.0 allow 4 GiB). */
#define NPY_MAX_HEADER ((size_t)1 << 20)
/* The largest array read: 64 GiB. */
#define NPY_MAX_BYTES ((uint64_t)1 << 36)

typedef struct npy_array {
    flex_dtype dtype;
    int ndim;
    int64_t shape[NPY_MAX_DIMS];
    void *data;   /* malloc'd, owned by the array (npy_free) */
    size_t bytes; /* size of data */
} npy_array;

/*
 * Reads path into *out. On failure returns FLEX_ERR_IO (file missing, not a
 * regular file, truncated or with trailing bytes, malformed header,
 * unsupported dtype, Fortran order, big-endian, larger than NPY_MAX_BYTES)
 * with a message naming the file in err, and leaves *out empty.
 */
flex_status npy_read(const char *path, npy_array *out, char *err, size_t err_cap);

/* Writes a C-order array (format 1.0) to a new or regular file; FLEX_ERR_IO
 * with a message naming the file. */
flex_status npy_write(const char *path, flex_dtype dtype, int ndim, const int64_t *shape,
                      const void *data, char *err, size_t err_cap);

void npy_free(npy_array *a);

#endif /* FLEXATTN_NPY_H */
