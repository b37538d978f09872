/*
 * The `flexattn` program run as a user runs it (its path is this test's
 * argument): .npy files written to a temporary folder, the program's exit
 * status and what it prints checked. Under the ASan build the program is
 * the sanitized one, so a read past an input would fail here too.
 */
#include <check.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "npy.h"

static const char *program; /* the flexattn binary */
static char dir[256];       /* a fresh folder per test (Check forks each test) */
static char output[1 << 16]; /* stdout and stderr of the last run */

static void make_dir(void) {
    snprintf(dir, sizeof dir, "/tmp/flexattn-cli-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void remove_dir(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* dir/name, in one of a few rotating buffers so several fit in one call. */
static const char *in_dir(const char *name) {
    static char paths[8][512];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, sizeof paths[0], "%s/%s", dir, name);
    return p;
}

/* Writes dir/name: an f32 array of the given shape with small values. */
static void write_f32(const char *name, int ndim, const int64_t *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    float *x = malloc(n * sizeof *x + 1);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    char err[512];
    ck_assert_msg(npy_write(in_dir(name), FLEX_F32, ndim, shape, x, err, sizeof err) == FLEX_OK,
                  "%s", err);
    free(x);
}

static void write_qkv(const int64_t q[4], const int64_t k[4], const int64_t v[4]) {
    write_f32("q.npy", 4, q);
    write_f32("k.npy", 4, k);
    write_f32("v.npy", 4, v);
}

/*
 * Runs `flexattn ARGS...` (NULL-terminated) on the CPU backend with its
 * output in `output`; returns the exit status (-1 when it did not exit).
 */
static int run(const char *first, ...) {
    const char *argv[64];
    int n = 0;
    argv[n++] = program;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 63; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    const char *log = in_dir("output.txt");
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) _exit(127);
        dup2(fd, 1);
        dup2(fd, 2);
        setenv("FLEXATTN_BACKEND", "cpu", 1);
        setenv("FLEXATTN_CACHE_DIR", "off", 1);
        execv(program, (char *const *)argv);
        _exit(127);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    FILE *f = fopen(log, "rb");
    size_t got = f ? fread(output, 1, sizeof output - 1, f) : 0;
    output[got] = '\0';
    if (f) fclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#define expect_output(want)                                                                        \
    ck_assert_msg(strstr(output, want) != NULL, "output lacks '%s':\n%s", want, output)
#define expect_no_output(unwanted)                                                                 \
    ck_assert_msg(strstr(output, unwanted) == NULL, "output has '%s':\n%s", unwanted, output)

/* ---- D1: --load checks every shape relation ---- */

START_TEST(load_head_dim_mismatch) {
    make_dir();
    write_qkv((int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 2, 32, 4}, (int64_t[]){1, 2, 32, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("k.npy: head dim 4, ");
    expect_output("q.npy has 8");
    remove_dir();
}
END_TEST

START_TEST(load_value_length_mismatch) {
    make_dir();
    write_qkv((int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 2, 31, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("v.npy: length 31, ");
    expect_output("k.npy has 32");
    remove_dir();
}
END_TEST

START_TEST(load_value_heads_mismatch) {
    make_dir();
    write_qkv((int64_t[]){1, 4, 32, 8}, (int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 4, 32, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("v.npy: 4 kv heads, ");
    expect_output("k.npy has 2");
    remove_dir();
}
END_TEST

START_TEST(load_batch_mismatch) {
    make_dir();
    /* a larger B in k, then in v, then a smaller one */
    write_qkv((int64_t[]){1, 2, 32, 8}, (int64_t[]){2, 2, 32, 8}, (int64_t[]){1, 2, 32, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("k.npy: batch 2, ");
    expect_output("q.npy has 1");
    write_qkv((int64_t[]){2, 2, 32, 8}, (int64_t[]){2, 2, 32, 8}, (int64_t[]){1, 2, 32, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("v.npy: batch 1, ");
    remove_dir();
}
END_TEST

START_TEST(load_heads_not_a_multiple) {
    make_dir();
    write_qkv((int64_t[]){1, 4, 32, 8}, (int64_t[]){1, 3, 32, 8}, (int64_t[]){1, 3, 32, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("q.npy: 4 heads, not a multiple of the 3 kv heads");
    write_f32("k.npy", 3, (int64_t[]){1, 3, 32});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("k.npy has 3 dims");
    remove_dir();
}
END_TEST

START_TEST(load_fitting_shapes_run_and_check) {
    make_dir();
    /* GQA 4:2, Lq != Lkv, Dv != D; the three-file form of --load as well */
    write_qkv((int64_t[]){2, 4, 16, 8}, (int64_t[]){2, 2, 24, 8}, (int64_t[]){2, 2, 24, 6});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", "--check", NULL), 0);
    expect_output("B=2 H=4 Hkv=2 q_len=16 kv_len=24 D=8 Dv=6");
    expect_output("check: PASS");
    char files[1600];
    snprintf(files, sizeof files, "%s,%s,%s", in_dir("q.npy"), in_dir("k.npy"), in_dir("v.npy"));
    ck_assert_int_eq(run("run", "causal", "--load", files, "--iters", "1", "--check", NULL), 0);
    expect_output("check: PASS");
    remove_dir();
}
END_TEST

START_TEST(load_refuses_shape_options_and_converts_dtype) {
    make_dir();
    write_qkv((int64_t[]){1, 2, 16, 8}, (int64_t[]){1, 2, 16, 8}, (int64_t[]){1, 2, 16, 8});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--len", "256", NULL), 2);
    expect_output("--len cannot be used with --load");
    ck_assert_int_eq(run("run", "causal", "-B", "2", "--load", dir, NULL), 2);
    expect_output("-B cannot be used with --load");
    /* f32 files run as bf16 with --dtype bf16 */
    ck_assert_int_eq(
        run("run", "causal", "--load", dir, "--dtype", "bf16", "--iters", "1", "--check", NULL), 0);
    expect_output("bf16, B=1 H=2");
    expect_output("check: PASS");
    remove_dir();
}
END_TEST

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_cli PATH-OF-flexattn\n");
        return EXIT_FAILURE;
    }
    program = argv[1];
    Suite *s = suite_create("cli");
    TCase *load = tcase_create("load");
    tcase_add_test(load, load_head_dim_mismatch);
    tcase_add_test(load, load_value_length_mismatch);
    tcase_add_test(load, load_value_heads_mismatch);
    tcase_add_test(load, load_batch_mismatch);
    tcase_add_test(load, load_heads_not_a_multiple);
    tcase_add_test(load, load_fitting_shapes_run_and_check);
    tcase_add_test(load, load_refuses_shape_options_and_converts_dtype);
    suite_add_tcase(s, load);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
