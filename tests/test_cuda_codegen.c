/*
 * CUDA code generation without a GPU: every preset and the seed mods are
 * emitted into the forward template (and mask mods into the mask-block
 * template) and compiled with NVRTC for sm_80 and sm_90a. When NVRTC cannot
 * be loaded the compile cases print "SKIPPED: <reason>" and the program
 * exits with 77, which meson reports as a skipped test, never as a pass.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/emit.h"
#include "mod/parse.h"
#include "../backends/cuda/cuda_compile.h"
#include "../backends/cuda/cuda_loader.h"

static int nvrtc_skipped;

/* Seed mods beyond the presets, and one that touches every op kind. */
static const flex_buffer_decl bias_buf[] = {{"bias", FLEX_BF16, 2},
                                            {"mask8", FLEX_U8, 1},
                                            {"ids64", FLEX_I64, 1},
                                            {"hb", FLEX_F16, 1},
                                            {"keep", FLEX_BOOL, 1}};
static const flex_param seed_params[] = {{"W", 0, 256}, {"T", 1, 0.5}};
static const struct {
    flex_mod_kind kind;
    const char *text;
} seed_mods[] = {
    {FLEX_MOD_MASK, "q >= kv && q - kv <= W"},
    {FLEX_MOD_SCORE, "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)"},
    {FLEX_MOD_SCORE,
     "let a = (q * 2147483) // (kv - 7) + q % -3 - ~kv;\n"
     "let f = float(a) / 3.0 + pow(abs(score), T) + sigmoid(score) - rsqrt(1.0 + score * score);\n"
     "let g = min(f, max(score, -1.0)) + exp(-abs(score)) + log(2.0 + abs(score)) + sqrt(abs(f));\n"
     "let i = int(g * 1e9) ^ (a | 5) & 255;\n"
     "let bb = float(bias[h][q % 7]) + float(hb[kv % 3]) + float(mask8[q % 5] + ids64[kv % 2]);\n"
     "where(keep[q % 4] && i != 0, g + floor(f) - ceil(f) + sin(g) * cos(g) + tan(0.1) + "
     "tanh_approx(g) + exp2(-2.0) + log2(8.0) + bb, -inf)"},
};

static int parse_text(flex_mod_kind kind, const char *text, const flex_param *params, int np,
                      const flex_buffer_decl *bufs, int nb, ir_mod *out) {
    flex_mod_desc desc = {kind, text, params, np, bufs, nb};
    char err[1024];
    flex_status s = mod_parse(&desc, out, err, sizeof err);
    if (s != FLEX_OK) fprintf(stderr, "parse failed for '%s': %s\n", text, err);
    return s == FLEX_OK ? 0 : -1;
}

static int parse_preset(const flex_preset *p, ir_mod *out) {
    return parse_text(p->kind, p->text, p->params, p->num_params, p->buffers, p->num_buffers, out);
}

/* Every case to compile: a mask, a score (either may be absent), a config. */
typedef struct compile_case {
    char name[96];
    ir_mod mask, score;
    int has_mask, has_score;
    flex_cuda_fwd_config cfg;
    const char *arch;
    int mask_blocks; /* compile the mask-block evaluator instead */
    flex_status status;
    size_t cubin_size;
    char message[512];
} compile_case;

static compile_case cases[256];
static int num_cases;
static int next_case;
static pthread_mutex_t case_lock = PTHREAD_MUTEX_INITIALIZER;
static const flex_cuda_api *api;

/* Small tiles keep the many mod compiles quick (the mods are what differs);
 * the production tile sizes are compiled for a few mods below. */
static const flex_cuda_fwd_config configs[] = {
    {FLEX_BF16, 64, 64, 4, 1, 16, 1, 1},
    {FLEX_F16, 64, 64, 4, 1, 16, 0, 0},
    {FLEX_F32, 64, 64, 4, 1, 0, 0, 1},
};
static const flex_cuda_fwd_config full_configs[] = {
    {FLEX_BF16, 128, 128, 4, 2, 64, 1, 1},
    {FLEX_F16, 256, 192, 4, 1, 32, 1, 0},
    {FLEX_BF16, 128, 128, 8, 1, 64, 1, 1},
    {FLEX_F16, 128, 64, 4, 2, 64, 0, 1},
};

static void add_case(const char *label, const ir_mod *mask, const ir_mod *score, int cfg_index,
                     const char *arch, int mask_blocks) {
    ck_assert_int_lt(num_cases, (int)(sizeof cases / sizeof cases[0]));
    compile_case *c = &cases[num_cases++];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s/%s/%s", label, mask_blocks ? "mask_blocks" : "forward",
             arch);
    if (mask) {
        ck_assert_int_eq(ir_copy(&c->mask, mask), 0);
        c->has_mask = 1;
    }
    if (score) {
        ck_assert_int_eq(ir_copy(&c->score, score), 0);
        c->has_score = 1;
    }
    if (cfg_index < 0)
        c->cfg =
            full_configs[(-cfg_index - 1) % (int)(sizeof full_configs / sizeof full_configs[0])];
    else
        c->cfg = configs[cfg_index % (int)(sizeof configs / sizeof configs[0])];
    c->arch = arch;
    c->mask_blocks = mask_blocks;
}

static void *compile_worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&case_lock);
        int i = next_case < num_cases ? next_case++ : -1;
        pthread_mutex_unlock(&case_lock);
        if (i < 0) return NULL;
        compile_case *c = &cases[i];
        const ir_mod *m = c->has_mask ? &c->mask : NULL, *s = c->has_score ? &c->score : NULL;
        char *src = c->mask_blocks ? flex_cuda_mask_blocks_source(m)
                                   : flex_cuda_forward_source(&c->cfg, m, s);
        if (!src) {
            c->status = FLEX_ERR_OUT_OF_MEMORY;
            continue;
        }
        void *bin = NULL;
        c->status =
            flex_cuda_compile(NULL, api, src, c->mask_blocks ? "flex_mask_blocks" : "flex_forward",
                              c->arch, &bin, &c->cubin_size);
        if (c->status != FLEX_OK)
            snprintf(c->message, sizeof c->message, "%.500s", flex_error_message(NULL));
        free(bin);
        free(src);
    }
}

START_TEST(test_emit_every_preset) {
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        ir_mod m;
        ck_assert_msg(parse_preset(p, &m) == 0, "preset %s parses", p->name);
        const int is_mask = p->kind == FLEX_MOD_MASK;
        char *text = flex_emit_mods(is_mask ? &m : NULL, is_mask ? NULL : &m);
        ck_assert_ptr_nonnull(text);
        ck_assert_ptr_nonnull(strstr(text, "flex_mask_mod(int b, int h, int q, int kv"));
        ck_assert_ptr_nonnull(strstr(text, "flex_score_mod(float score"));
        ck_assert_ptr_nonnull(
            strstr(text, is_mask ? "#define FLEX_HAS_MASK_MOD 1" : "#define FLEX_HAS_SCORE_MOD 1"));
        /* Buffer reads become typed, checked loads of the right slot. */
        for (int b = 0; b < p->num_buffers; b++) {
            char want[64];
            snprintf(want, sizeof want, "bufs.buf[%d], oob, %d", b, b);
            ck_assert_msg(strstr(text, want) != NULL, "%s reads slot %d", p->name, b);
        }
        free(text);
        ir_free(&m);
    }
}
END_TEST

static int count_occurrences(const char *text, const char *what) {
    int n = 0;
    for (const char *at = strstr(text, what); at; at = strstr(at + 1, what))
        n++;
    return n;
}

START_TEST(test_emit_exact_constants_and_slots) {
    ir_mod mask, score;
    ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "doc[q] == doc[kv]", NULL, 0,
                                (const flex_buffer_decl[]){{"doc", FLEX_I32, 1}}, 1, &mask),
                     0);
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "score * 0.1 + slopes[h]", NULL, 0,
                                (const flex_buffer_decl[]){{"slopes", FLEX_F32, 1}}, 1, &score),
                     0);
    char *text = flex_emit_mods(&mask, &score);
    ck_assert_ptr_nonnull(text);
    /* 0.1f as exact bits, and the score mod's buffer after the mask's. */
    ck_assert_ptr_nonnull(strstr(text, "__int_as_float(0x3dcccccd)"));
    ck_assert_ptr_nonnull(strstr(text, "flex_load_f32(bufs.buf[1], oob, 1, 1"));
    ck_assert_ptr_nonnull(strstr(text, "flex_load_i32(bufs.buf[0], oob, 0, 1"));
    ck_assert_ptr_nonnull(strstr(text, "#define FLEX_NUM_BUFFERS 2"));
    /* Float arithmetic is never contracted. */
    ck_assert_ptr_nonnull(strstr(text, "__fmul_rn("));
    ck_assert_int_eq(flex_emit_num_slots(&mask, &score), 2);
    free(text);
    ir_free(&mask);
    ir_free(&score);
}
END_TEST

START_TEST(test_division_by_constant) {
    ir_mod score;
    ck_assert_int_eq(parse_text(FLEX_MOD_SCORE, "score / 30.0 + score / 1e-30 + score / q", NULL, 0,
                                NULL, 0, &score),
                     0);
    char *text = flex_emit_mods(NULL, &score);
    ck_assert_ptr_nonnull(text);
    /* 1/30 correctly rounded is 0x3d088889; 1e-30 is outside the fast range
     * and a divisor that is not a constant always takes the full division. */
    ck_assert_ptr_nonnull(strstr(text, "__int_as_float(0x3d088889))"));
    ck_assert_int_eq(count_occurrences(text, "flex_fdiv_const(v"), 1);
    ck_assert_int_ge(count_occurrences(text, "__fdiv_rn(v"), 2);
    free(text);
    ir_free(&score);
    /* The device formula (product with the reciprocal, one fused
     * correction) is the correctly rounded quotient over the range it
     * serves: checked here with the host's fused multiply-add on random
     * constants and numerators. */
    uint32_t state = 12345u;
    for (int i = 0; i < 200000; i++) {
        state = state * 1664525u + 1013904223u;
        const uint32_t cb =
            (state & 0x807fffffu) | ((uint32_t)(127 - 20 + (state >> 24) % 41) << 23);
        state = state * 1664525u + 1013904223u;
        const uint32_t ab =
            (state & 0x807fffffu) | ((uint32_t)(127 - 60 + (state >> 23) % 121) << 23);
        float c, a;
        memcpy(&c, &cb, sizeof c);
        memcpy(&a, &ab, sizeof a);
        volatile float one = 1.0f;
        const float rc = one / c;
        const float q = a * rc;
        const float got = fmaf(fmaf(-q, c, a), rc, q);
        const float want = a / c;
        ck_assert_msg(memcmp(&got, &want, sizeof got) == 0, "%a / %a: %a, want %a", (double)a,
                      (double)c, (double)got, (double)want);
    }
}
END_TEST

START_TEST(test_nvrtc_compiles_presets_and_seeds) {
    char why[512];
    if (flex_cuda_load_nvrtc(&api, why, sizeof why) != 0) {
        printf("SKIPPED: NVRTC compile cases (%s)\n", why);
        nvrtc_skipped = 1;
        return;
    }
    /* Every mod for both targets as PTX (the NVRTC front end and optimiser:
     * what the emitted code can break), and the production tiles down to
     * machine code for both. */
    static const char *const archs[] = {"compute_80", "compute_90a"};
    static const char *const real_archs[] = {"sm_80", "sm_90a"};
    int k = 0;
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        ir_mod m;
        ck_assert_int_eq(parse_preset(p, &m), 0);
        const int is_mask = p->kind == FLEX_MOD_MASK;
        for (int a = 0; a < 2; a++, k++)
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, k, archs[a], 0);
        if (is_mask) add_case(p->name, &m, NULL, 0, real_archs[i % 2], 1);
        if (!strcmp(p->name, "document_causal") || !strcmp(p->name, "softcap_approx")) {
            for (int a = 0; a < 2; a++)
                add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, -1, real_archs[a], 0);
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, -2, "sm_90a", 0);
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, -3, "sm_90a", 0);
            add_case(p->name, is_mask ? &m : NULL, is_mask ? NULL : &m, -4, "sm_80", 0);
        }
        ir_free(&m);
    }
    for (size_t i = 0; i < sizeof seed_mods / sizeof seed_mods[0]; i++) {
        ir_mod m, causal;
        ck_assert_int_eq(
            parse_text(seed_mods[i].kind, seed_mods[i].text, seed_params, 2, bias_buf, 5, &m), 0);
        ck_assert_int_eq(parse_text(FLEX_MOD_MASK, "q >= kv", NULL, 0, NULL, 0, &causal), 0);
        const int is_mask = seed_mods[i].kind == FLEX_MOD_MASK;
        char label[32];
        snprintf(label, sizeof label, "seed%zu", i);
        for (int a = 0; a < 2; a++, k++)
            add_case(label, is_mask ? &m : &causal, is_mask ? NULL : &m, k, archs[a], 0);
        ir_free(&m);
        ir_free(&causal);
    }
    pthread_t threads[2];
    for (int t = 0; t < 2; t++)
        pthread_create(&threads[t], NULL, compile_worker, NULL);
    for (int t = 0; t < 2; t++)
        pthread_join(threads[t], NULL);
    int failed = 0;
    for (int i = 0; i < num_cases; i++) {
        if (cases[i].status != FLEX_OK || cases[i].cubin_size == 0) {
            fprintf(stderr, "%s: %s\n", cases[i].name, cases[i].message);
            failed++;
        }
        ir_free(&cases[i].mask);
        ir_free(&cases[i].score);
    }
    ck_assert_msg(failed == 0, "%d of %d NVRTC compiles failed", failed, num_cases);
    printf("%d NVRTC compiles for sm_80 and sm_90a passed\n", num_cases);
}
END_TEST

START_TEST(test_nvrtc_error_carries_log) {
    char why[512];
    if (flex_cuda_load_nvrtc(&api, why, sizeof why) != 0) {
        printf("SKIPPED: NVRTC error-log case (%s)\n", why);
        nvrtc_skipped = 1;
        return;
    }
    void *bin = NULL;
    size_t size = 0;
    flex_status s = flex_cuda_compile(NULL, api, "__global__ void k() { undefined_name(); }",
                                      "broken", "sm_80", &bin, &size);
    ck_assert_int_eq(s, FLEX_ERR_COMPILE);
    ck_assert_ptr_null(bin);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "undefined_name"));
}
END_TEST

int main(void) {
    Suite *suite = suite_create("cuda_codegen");
    TCase *emit = tcase_create("emit");
    tcase_add_test(emit, test_emit_every_preset);
    tcase_add_test(emit, test_emit_exact_constants_and_slots);
    tcase_add_test(emit, test_division_by_constant);
    suite_add_tcase(suite, emit);
    TCase *nvrtc = tcase_create("nvrtc");
    tcase_set_timeout(nvrtc, 600);
    tcase_add_test(nvrtc, test_nvrtc_compiles_presets_and_seeds);
    tcase_add_test(nvrtc, test_nvrtc_error_carries_log);
    suite_add_tcase(suite, nvrtc);
    SRunner *runner = srunner_create(suite);
    /* In-process, so the skip flag set by a case is seen here. */
    srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    if (failed) return 1;
    return nvrtc_skipped ? 77 : 0;
}
