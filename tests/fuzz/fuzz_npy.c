/*
 * libFuzzer harness: bytes -> a .npy file -> the command-line program's
 * loader (tools/npy.c). A file the loader accepts must describe itself
 * consistently (data size = product of the shape times the dtype's size,
 * at most NPY_MAX_DIMS dims) and must survive a write and a second read
 * unchanged; a file it rejects must come with a message and leave the
 * array empty. Crashes, leaks and sanitizer reports abort.
 *
 * The loader reads paths, so each input goes through a file of this
 * process's own, named by the pid, in FUZZ_NPY_DIR, else /dev/shm, else
 * TMPDIR or /tmp.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "npy.h"

#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_npy: check failed: %s\n  ", #cond);                              \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static char g_in[512], g_out[512];


static void init_paths(void) {
    const char *dir = getenv("FUZZ_NPY_DIR");
    /* memory-backed where there is one: twenty times the executions */
    if (!dir && access("/dev/shm", W_OK) == 0) dir = "/dev/shm";
    if (!dir) dir = getenv("TMPDIR");
    if (!dir) dir = "/tmp";
    snprintf(g_in, sizeof g_in, "%s/fuzz_npy_in_%ld.npy", dir, (long)getpid());
    snprintf(g_out, sizeof g_out, "%s/fuzz_npy_out_%ld.npy", dir, (long)getpid());
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_in[0]) init_paths();
    FILE *f = fopen(g_in, "wb");
    FUZZ_CHECK(f != NULL, "cannot write %s", g_in);
    FUZZ_CHECK(size == 0 || fwrite(data, 1, size, f) == size, "short write");
    FUZZ_CHECK(fclose(f) == 0, "close");

    npy_array a;
    char err[512];
    err[0] = 0;
    flex_status st = npy_read(g_in, &a, err, sizeof err);
    unlink(g_in); /* each input's file lives for its call only */
    if (st != FLEX_OK) {
        FUZZ_CHECK(st == FLEX_ERR_IO, "status %d", (int)st);
        FUZZ_CHECK(err[0] != 0, "a rejected file without a message");
        FUZZ_CHECK(a.data == NULL && a.ndim == 0 && a.bytes == 0, "rejected but not empty");
        return 0;
    }
    FUZZ_CHECK(a.ndim >= 0 && a.ndim <= NPY_MAX_DIMS, "ndim %d", a.ndim);
    size_t count = 1;
    for (int i = 0; i < a.ndim; i++) {
        FUZZ_CHECK(a.shape[i] >= 0, "negative dim");
        count *= (size_t)a.shape[i];
    }
    FUZZ_CHECK(a.bytes == count * flex_dtype_size(a.dtype), "%zu bytes for %zu elements",
               a.bytes, count);
    FUZZ_CHECK(a.bytes <= size, "%zu data bytes from a %zu-byte file", a.bytes, size);
    FUZZ_CHECK(a.data != NULL, "no data");

    /* What was read, written and read again, is the same array. */
    st = npy_write(g_out, a.dtype, a.ndim, a.shape, a.data, err, sizeof err);
    FUZZ_CHECK(st == FLEX_OK, "write back: %s", err);
    npy_array b;
    st = npy_read(g_out, &b, err, sizeof err);
    unlink(g_out);
    FUZZ_CHECK(st == FLEX_OK, "read back: %s", err);
    FUZZ_CHECK(b.dtype == a.dtype && b.ndim == a.ndim && b.bytes == a.bytes, "round trip header");
    for (int i = 0; i < a.ndim; i++)
        FUZZ_CHECK(a.shape[i] == b.shape[i], "round trip shape");
    FUZZ_CHECK(a.bytes == 0 || memcmp(a.data, b.data, a.bytes) == 0, "round trip data");
    npy_free(&a);
    npy_free(&b);
    return 0;
}
