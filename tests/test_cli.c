/*
 * The `flexattn` program run as a user runs it (its path is this test's
 * argument): .npy files written to a temporary folder, the program's exit
 * status and what it prints checked. Under the ASan build the program is
 * the sanitized one, so a read past an input would fail here too.
 */
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "npy.h"
#include "npy_raw.h"

static const char *program;  /* the flexattn binary */
static char dir[256];        /* a fresh folder per test (Check forks each test) */
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

START_TEST(load_backward_check_skip_says_why) {
    make_dir();
    /* 1 * 1 * 2048 * 2048 * 128 = 5.4e8, past the backward oracle's limit:
     * the hint speaks of the loaded files, not of --len */
    write_qkv((int64_t[]){1, 1, 2048, 64}, (int64_t[]){1, 1, 2048, 64},
              (int64_t[]){1, 1, 2048, 64});
    ck_assert_int_eq(run("run", "causal", "--load", dir, "--iters", "1", "--warmup", "0",
                         "--backward", "--check", NULL),
                     0);
    expect_output("backward check: skipped (the loaded problem is too large");
    expect_no_output("--len");
    remove_dir();
}
END_TEST

/* ---- papercuts ---- */

/* Writes dir/name through npy_write_raw. */
static void write_raw(const char *name, const char *dict, size_t bytes) {
    npy_write_raw(in_dir(name), dict, bytes, 0);
}

START_TEST(load_dir_gives_any_buffer) {
    make_dir();
    write_qkv((int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 2, 32, 8}, (int64_t[]){1, 2, 32, 8});
    write_f32("bias.npy", 2, (int64_t[]){2, 32});
    ck_assert_int_eq(
        run("run", "--text", "score + bias[h][kv]", "--load", dir, "--iters", "1", "--check", NULL),
        0);
    expect_output("check: PASS");
    /* a preset's buffer from the folder: no generated data, no note; int64
     * (NumPy's default integer) for the preset's i32 */
    int64_t doc[32];
    for (int i = 0; i < 32; i++)
        doc[i] = i / 10;
    char err[512];
    ck_assert_int_eq(
        npy_write(in_dir("doc.npy"), FLEX_I64, 1, (int64_t[]){32}, doc, err, sizeof err), FLEX_OK);
    ck_assert_int_eq(run("run", "document_causal", "--load", dir, "--block", "16", "--iters", "1",
                         "--check", NULL),
                     0);
    expect_no_output("no data given");
    expect_output("check: PASS");
    /* documents of 10 tokens leave 1 of the 4 blocks empty; the generated
     * 4 documents of 8 would leave 2 */
    expect_output("sparsity 25.00%");
    doc[5] = (int64_t)1 << 40;
    ck_assert_int_eq(
        npy_write(in_dir("doc.npy"), FLEX_I64, 1, (int64_t[]){32}, doc, err, sizeof err), FLEX_OK);
    ck_assert_int_eq(run("run", "document_causal", "--load", dir, "--iters", "1", NULL), 2);
    expect_output("element 5 is 1099511627776, outside the i32");
    remove_dir();
}
END_TEST

START_TEST(generated_buffers_announced) {
    make_dir();
    ck_assert_int_eq(run("run", "alibi", "--mask", "document_causal", "--len", "64", "-H", "2",
                         "--iters", "1", NULL),
                     0);
    expect_output("note: no data given for buffer 'slopes': generated f32[2], the ALiBi slopes "
                  "of 2 heads");
    expect_output("note: no data given for buffer 'doc': generated i32[64]");
    ck_assert_int_eq(run("run", "causal", "--len", "64", "--iters", "1", NULL), 0);
    expect_no_output("note:");
    remove_dir();
}
END_TEST

START_TEST(score_in_a_comment_is_no_score_mod) {
    make_dir();
    ck_assert_int_eq(run("run", "--text", "q >= kv  # a mask; no score here", "--len", "64",
                         "--block", "16", "--iters", "1", NULL),
                     0);
    expect_output("sparsity 37.50%");
    /* a float expression without `score` is a score mod all the same */
    ck_assert_int_eq(run("run", "--text", "where(q >= kv, 0.0, -inf)", "--len", "64", "--iters",
                         "1", "--check", NULL),
                     0);
    expect_output("check: PASS");
    remove_dir();
}
END_TEST

START_TEST(unsupported_dtype_named_alone) {
    make_dir();
    write_raw("f8.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16);
    char arg[600];
    snprintf(arg, sizeof arg, "f=%s", in_dir("f8.npy"));
    ck_assert_int_eq(run("run", "--text", "score + f[0]", "--buffer", arg, NULL), 2);
    expect_output("unsupported dtype '<f8' (float64)");
    expect_no_output("fortran");
    remove_dir();
}
END_TEST

START_TEST(flag_buffer_advice_and_extra_index) {
    make_dir();
    write_raw("flag.npy", "{'descr': '|u1', 'fortran_order': False, 'shape': (64,), }", 64);
    char arg[600];
    snprintf(arg, sizeof arg, "flag=%s", in_dir("flag.npy"));
    ck_assert_int_eq(run("run", "--text", "flag[q] || q >= kv", "--buffer", arg, "--len", "64",
                         "--iters", "1", NULL),
                     2);
    expect_output("compare the int with 0: 'flag[q] != 0'");
    expect_output("buffer 'flag' is u8 with 1 dim, shape (64)");
    /* the advice works */
    ck_assert_int_eq(run("run", "--text", "flag[q] != 0 || q >= kv", "--buffer", arg, "--len", "64",
                         "--iters", "1", NULL),
                     0);
    write_f32("bias.npy", 2, (int64_t[]){4, 64});
    snprintf(arg, sizeof arg, "bias=%s", in_dir("bias.npy"));
    ck_assert_int_eq(run("run", "--text", "score + bias[h][q][kv]", "--buffer", arg, "--len", "64",
                         "-H", "4", "--iters", "1", NULL),
                     2);
    expect_output("buffer 'bias' has 2 dimensions, so it takes 2 indices; this is index 3");
    expect_output("buffer 'bias' is f32 with 2 dims, shape (4, 64)");
    remove_dir();
}
END_TEST

/* Reads dir/name as f32 of the expected shape; the data is the caller's. */
static float *read_f32(const char *name, int ndim, const int64_t *shape) {
    npy_array a;
    char err[512];
    ck_assert_msg(npy_read(in_dir(name), &a, err, sizeof err) == FLEX_OK, "%s", err);
    ck_assert_int_eq(a.dtype, FLEX_F32);
    ck_assert_int_eq(a.ndim, ndim);
    for (int i = 0; i < ndim; i++)
        ck_assert_int_eq(a.shape[i], shape[i]);
    return a.data;
}

START_TEST(save_backward_writes_every_gradient) {
    make_dir();
    enum { H = 2, L = 16, D = 8 };
    write_qkv((int64_t[]){1, H, L, D}, (int64_t[]){1, H, L, D}, (int64_t[]){1, H, L, D});
    write_f32("bias.npy", 3, (int64_t[]){H, L, L});
    char save[600];
    snprintf(save, sizeof save, "%s/saved", dir);
    ck_assert_int_eq(run("run", "--text", "score + bias[h][q][kv]", "--mask", "causal", "--load",
                         dir, "--iters", "1", "--backward", "--save", save, NULL),
                     0);
    float *k = read_f32("k.npy", 4, (int64_t[]){1, H, L, D});
    float *dq = read_f32("saved/dq.npy", 4, (int64_t[]){1, H, L, D});
    float *dbias = read_f32("saved/dbias.npy", 3, (int64_t[]){H, L, L});
    free(read_f32("saved/dk.npy", 4, (int64_t[]){1, H, L, D}));
    free(read_f32("saved/dv.npy", 4, (int64_t[]){1, H, L, D}));
    free(read_f32("saved/dout.npy", 4, (int64_t[]){1, H, L, D}));
    /* The buffer's gradient is the score's (the mod adds it), so dq =
     * scale * dbias . k: the buffer-gradient path checked against dq's. */
    double worst = 0.0, largest = 0.0;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < L; i++)
            for (int d = 0; d < D; d++) {
                double want = 0.0;
                for (int j = 0; j < L; j++)
                    want += (double)dbias[(h * L + i) * L + j] * k[(h * L + j) * D + d];
                want /= sqrt((double)D);
                double got = dq[(h * L + i) * D + d], diff = got > want ? got - want : want - got;
                if (diff > worst) worst = diff;
                if ((got < 0 ? -got : got) > largest) largest = got < 0 ? -got : got;
            }
    ck_assert_msg(largest > 1e-3, "dq is all but zero (%g)", largest);
    ck_assert_msg(worst <= 1e-5 * largest + 1e-7, "dq differs from scale * dbias . k by %g", worst);
    free(k);
    free(dq);
    free(dbias);
    remove_dir();
}
END_TEST

/* A check of a backend the caller named that cannot run here fails: HIP's
 * runtime is absent wherever these tests run (where it is present, the
 * check must have run its cases instead). */
START_TEST(check_of_an_unusable_named_backend_fails) {
    make_dir();
    const int status = run("check", "--backend", "hip", "--quick", NULL);
    if (strstr(output, "skipped: hip:")) {
        ck_assert_int_eq(status, 1);
        expect_output("0 passed, 0 failed, 1 skipped");
    } else {
        expect_output("backend hip:");
    }
    ck_assert_int_eq(run("check", "--backend", "cpu", "--quick", NULL), 0);
    expect_no_output("skipped: cpu");
    remove_dir();
}
END_TEST

/* --deterministic: the backward's deterministic mode, checked against the
 * oracle by `run` and by `check`; an option of the backward only. */
START_TEST(deterministic_backward_option) {
    make_dir();
    ck_assert_int_eq(run("run", "alibi", "--mask", "causal", "--len", "70", "-H", "4", "--hkv",
                         "2", "-D", "16", "--block", "32", "--iters", "1", "--warmup", "0",
                         "--backward", "--deterministic", "--check", NULL),
                     0);
    expect_output("backward check: PASS");
    ck_assert_int_ne(run("run", "causal", "--len", "64", "--deterministic", NULL), 0);
    expect_output("--deterministic is an option of the backward");
    ck_assert_int_eq(run("check", "--backend", "cpu", "--quick", "--deterministic", NULL), 0);
    expect_output("backward cases with opts->deterministic = 1");
    expect_output("PASS  cpu   backward");
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
    tcase_add_test(load, load_backward_check_skip_says_why);
    suite_add_tcase(s, load);
    TCase *papercuts = tcase_create("papercuts");
    tcase_add_test(papercuts, load_dir_gives_any_buffer);
    tcase_add_test(papercuts, generated_buffers_announced);
    tcase_add_test(papercuts, score_in_a_comment_is_no_score_mod);
    tcase_add_test(papercuts, unsupported_dtype_named_alone);
    tcase_add_test(papercuts, flag_buffer_advice_and_extra_index);
    tcase_add_test(papercuts, save_backward_writes_every_gradient);
    tcase_add_test(papercuts, check_of_an_unusable_named_backend_fails);
    tcase_add_test(papercuts, deterministic_backward_option);
    suite_add_tcase(s, papercuts);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
