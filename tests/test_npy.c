/*
 * The .npy reader and writer of the `flexattn` program (tools/npy.c): round
 * trips of every dtype, and the files it must refuse before it allocates
 * or blocks: truncated data, trailing bytes, a header that claims 2^60
 * elements or a header longer than the file, a FIFO, a folder, and the
 * dtypes it does not read (named in the message without the rest of the
 * header).
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "npy.h"
#include "npy_raw.h"

/* A fresh temporary folder per test (Check forks each test). */
static char dir[256];

static void make_dir(void) {
    snprintf(dir, sizeof dir, "/tmp/flexattn-npy-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void remove_dir(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static const char *path_of(const char *name) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

/* Writes dir/name through npy_write_raw. */
static void write_raw(const char *name, const char *dict, size_t bytes) {
    npy_write_raw(path_of(name), dict, bytes, 1);
}

/* Reads name, expects failure with a message containing `want`. */
static void expect_refused(const char *name, const char *want) {
    npy_array a;
    char err[512] = "";
    ck_assert_int_eq(npy_read(path_of(name), &a, err, sizeof err), FLEX_ERR_IO);
    ck_assert_msg(strstr(err, want) != NULL, "message '%s' lacks '%s'", err, want);
    ck_assert_msg(strstr(err, name) != NULL, "message '%s' does not name the file", err);
    ck_assert_ptr_null(a.data);
}

START_TEST(round_trip_every_dtype) {
    make_dir();
    static const flex_dtype dts[] = {FLEX_F32, FLEX_F16, FLEX_BF16, FLEX_I32,
                                     FLEX_I64, FLEX_U8,  FLEX_BOOL};
    for (size_t k = 0; k < sizeof dts / sizeof dts[0]; k++) {
        int64_t shape[3] = {2, 3, 5};
        size_t bytes = 30 * flex_dtype_size(dts[k]);
        unsigned char *data = malloc(bytes);
        for (size_t i = 0; i < bytes; i++)
            data[i] = (unsigned char)(i * 7 + k);
        char err[512];
        ck_assert_int_eq(npy_write(path_of("a.npy"), dts[k], 3, shape, data, err, sizeof err),
                         FLEX_OK);
        npy_array a;
        ck_assert_int_eq(npy_read(path_of("a.npy"), &a, err, sizeof err), FLEX_OK);
        ck_assert_int_eq(a.dtype, dts[k]);
        ck_assert_int_eq(a.ndim, 3);
        ck_assert_int_eq(a.shape[0], 2);
        ck_assert_int_eq(a.shape[2], 5);
        ck_assert_uint_eq(a.bytes, bytes);
        ck_assert_int_eq(memcmp(a.data, data, bytes), 0);
        npy_free(&a);
        free(data);
    }
    remove_dir();
}
END_TEST

START_TEST(bf16_written_as_ml_dtypes_descr) {
    make_dir();
    uint16_t bits[2] = {0x3f80, 0xc000}; /* 1.0, -2.0 */
    int64_t shape[1] = {2};
    char err[512];
    ck_assert_int_eq(npy_write(path_of("b.npy"), FLEX_BF16, 1, shape, bits, err, sizeof err),
                     FLEX_OK);
    FILE *f = fopen(path_of("b.npy"), "rb");
    char head[128] = "";
    ck_assert_uint_eq(fread(head, 1, 60, f), 60);
    fclose(f);
    ck_assert_ptr_nonnull(strstr(head + 10, "'descr': '<V2'"));
    /* the raw bits and the void forms read as bf16 too */
    write_raw("u2.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", 4);
    write_raw("v2.npy", "{'descr': '|V2', 'fortran_order': False, 'shape': (2,), }", 4);
    npy_array a;
    ck_assert_int_eq(npy_read(path_of("u2.npy"), &a, err, sizeof err), FLEX_OK);
    ck_assert_int_eq(a.dtype, FLEX_BF16);
    npy_free(&a);
    ck_assert_int_eq(npy_read(path_of("v2.npy"), &a, err, sizeof err), FLEX_OK);
    ck_assert_int_eq(a.dtype, FLEX_BF16);
    npy_free(&a);
    remove_dir();
}
END_TEST

START_TEST(truncated_data_refused) {
    make_dir();
    write_raw("t.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }", 127);
    expect_refused("t.npy", "claims 128 bytes of data, the file holds 127 (truncated)");
    write_raw("long.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), }", 129);
    expect_refused("long.npy", "(trailing bytes)");
    /* a file cut inside its header */
    FILE *f = fopen(path_of("h.npy"), "wb");
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0x76, 0};
    fwrite(pre, 1, 10, f);
    fputs("{'descr': '<f4', ", f);
    fclose(f);
    expect_refused("h.npy", "header length 118 is longer than the file");
    remove_dir();
}
END_TEST

START_TEST(huge_claims_refused_before_allocating) {
    make_dir();
    /* 2^60 f32 elements, and a product that would overflow 64 bits: refused
     * by the cap before any allocation, with a small file behind them. */
    write_raw("big.npy",
              "{'descr': '<f4', 'fortran_order': False, 'shape': (1152921504606846976,), }", 16);
    expect_refused("big.npy", "the shape claims more than 64 GiB of data");
    write_raw("wrap.npy",
              "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", 16);
    expect_refused("wrap.npy", "more than 64 GiB");
    /* under the cap but larger than the file: refused by the file's size */
    write_raw("gib.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (268435456,), }", 16);
    expect_refused("gib.npy", "claims 1073741824 bytes of data, the file holds 16");
    /* a version 2.0 header length of 4 GiB - 1 */
    FILE *f = fopen(path_of("hdr.npy"), "wb");
    unsigned char pre[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0xff, 0xff, 0xff, 0xff};
    fwrite(pre, 1, 12, f);
    fclose(f);
    expect_refused("hdr.npy", "longer than 1 MiB");
    remove_dir();
}
END_TEST

START_TEST(fifo_and_folder_refused_without_blocking) {
    make_dir();
    ck_assert_int_eq(mkfifo(path_of("fifo.npy"), 0600), 0);
    time_t t0 = time(NULL);
    expect_refused("fifo.npy", "is a FIFO, not a regular file");
    char err[512] = "";
    int64_t shape[1] = {1};
    float x = 1.0f;
    ck_assert_int_eq(npy_write(path_of("fifo.npy"), FLEX_F32, 1, shape, &x, err, sizeof err),
                     FLEX_ERR_IO);
    ck_assert_ptr_nonnull(strstr(err, "FIFO"));
    ck_assert_int_le(time(NULL) - t0, 2);
    ck_assert_int_eq(mkdir(path_of("d.npy"), 0700), 0);
    expect_refused("d.npy", "is a folder");
    remove_dir();
}
END_TEST

START_TEST(unsupported_dtypes_named_alone) {
    make_dir();
    write_raw("f8.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16);
    expect_refused("f8.npy", "unsupported dtype '<f8' (float64); flexattn reads <f4");
    npy_array a;
    char err[512];
    npy_read(path_of("f8.npy"), &a, err, sizeof err);
    ck_assert_msg(strstr(err, "fortran") == NULL, "message '%s' quotes the header", err);
    write_raw("be.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8);
    expect_refused("be.npy", "dtype '>f4' is big-endian");
    write_raw("st.npy", "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8);
    expect_refused("st.npy", "structured dtypes are not supported");
    write_raw("fo.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16);
    expect_refused("fo.npy", "Fortran-order");
    expect_refused("missing.npy", "No such file");
    remove_dir();
}
END_TEST

int main(void) {
    Suite *s = suite_create("npy");
    TCase *tc = tcase_create("npy");
    tcase_add_test(tc, round_trip_every_dtype);
    tcase_add_test(tc, bf16_written_as_ml_dtypes_descr);
    tcase_add_test(tc, truncated_data_refused);
    tcase_add_test(tc, huge_claims_refused_before_allocating);
    tcase_add_test(tc, fifo_and_folder_refused_without_blocking);
    tcase_add_test(tc, unsupported_dtypes_named_alone);
    suite_add_tcase(s, tc);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
