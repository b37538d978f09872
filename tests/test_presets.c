/*
 * Presets: every one compiles, compiling a preset is compiling its text,
 * overrides, errors, what the seed patterns compute, and sequence ids from
 * offsets.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static flex_context *ctx;

static void setup(void) {
    ck_assert_int_eq(flex_context_create("cpu", &ctx), FLEX_OK);
}

static void teardown(void) {
    flex_context_destroy(ctx);
    ctx = NULL;
}

static flex_mod *preset(const char *name, const flex_param *ov, int n) {
    flex_mod *mod = NULL;
    flex_status st = flex_preset_compile(ctx, name, ov, n, &mod);
    ck_assert_msg(st == FLEX_OK, "preset %s: %s", name, flex_error_message(ctx));
    return mod;
}

/* Evaluates a mod at one point with buffers bound on it. */
static ir_value eval_at(const flex_mod *mod, float score, int b, int h, int q, int kv) {
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(copies, 0, sizeof copies);
    ck_assert_int_eq(flex_mod_host_views(ctx, mod, views, copies), FLEX_OK);
    ir_value *scratch = malloc(sizeof(ir_value) * (size_t)mod->ir.num_nodes + 1);
    ir_value r;
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    ck_assert_int_eq(mod_eval_point(&mod->ir, views, score, b, h, q, kv, scratch, &r, &err), 0);
    free(scratch);
    flex_mod_release_host_views(copies);
    return r;
}

static void bind_i32(flex_mod *mod, const char *name, int32_t *data, int ndim,
                     const int64_t *sizes) {
    flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, ndim, sizes, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(ctx, mod, name, &t), FLEX_OK);
}

START_TEST(test_table) {
    int n = flex_preset_count();
    ck_assert_int_ge(n, 17);
    ck_assert_ptr_null(flex_preset_at(-1));
    ck_assert_ptr_null(flex_preset_at(n));
    ck_assert_ptr_null(flex_preset_find("no_such_preset"));
    ck_assert_ptr_null(flex_preset_find(NULL));
    static const char *required[] = {"noop",
                                     "causal",
                                     "causal_score",
                                     "sliding_window",
                                     "sliding_window_bidirectional",
                                     "prefix_lm",
                                     "document",
                                     "document_causal",
                                     "jagged_causal",
                                     "sasa",
                                     "natten",
                                     "alibi",
                                     "alibi_functional",
                                     "softcap",
                                     "softcap_approx",
                                     "checkerboard",
                                     "flamingo"};
    for (int k = 0; k < (int)(sizeof required / sizeof required[0]); k++)
        ck_assert_msg(flex_preset_find(required[k]) != NULL, "missing preset %s", required[k]);
    for (int i = 0; i < n; i++) {
        const flex_preset *p = flex_preset_at(i);
        ck_assert_ptr_eq(flex_preset_find(p->name), p);
        ck_assert(p->description && strlen(p->description) > 10);
        ck_assert(strchr(p->description, '\n') == NULL);
        ck_assert(p->text && p->text[0]);
    }
}
END_TEST

START_TEST(test_every_preset_is_its_text) {
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        flex_mod *from_preset = preset(p->name, NULL, 0);
        flex_mod_desc desc = {p->kind,       p->text,    p->params,
                              p->num_params, p->buffers, p->num_buffers};
        flex_mod *from_text = NULL;
        ck_assert_msg(flex_mod_compile(ctx, &desc, &from_text) == FLEX_OK, "%s: %s", p->name,
                      flex_error_message(ctx));
        ck_assert_int_eq(flex_mod_get_kind(from_preset), p->kind);
        ck_assert_str_eq(flex_mod_canonical_text(from_preset), flex_mod_canonical_text(from_text));
        ck_assert(flex_mod_hash(from_preset) == flex_mod_hash(from_text));
        flex_mod_destroy(from_preset);
        flex_mod_destroy(from_text);
    }
}
END_TEST

START_TEST(test_overrides) {
    flex_param w7 = {"W", 0, 7};
    flex_mod *def = preset("sliding_window", NULL, 0);
    flex_mod *small = preset("sliding_window", &w7, 1);
    const flex_preset *p = flex_preset_find("sliding_window");
    flex_mod_desc desc = {p->kind, p->text, &w7, 1, NULL, 0};
    flex_mod *direct = NULL;
    ck_assert_int_eq(flex_mod_compile(ctx, &desc, &direct), FLEX_OK);
    ck_assert(flex_mod_hash(small) == flex_mod_hash(direct));
    ck_assert(flex_mod_hash(small) != flex_mod_hash(def));
    ck_assert_int_eq(eval_at(def, 0, 0, 0, 10, 2).i, 1);
    ck_assert_int_eq(eval_at(small, 0, 0, 0, 10, 2).i, 0);
    ck_assert_int_eq(eval_at(small, 0, 0, 0, 10, 3).i, 1);
    flex_mod_destroy(def);
    flex_mod_destroy(small);
    flex_mod_destroy(direct);

    /* A float param keeps its type with an integral override. */
    flex_param c50 = {"C", 0, 50};
    flex_mod *cap = preset("softcap", &c50, 1);
    float got = eval_at(cap, 80.0f, 0, 0, 0, 0).f;
    ck_assert_float_eq_tol(got, 50.0f * tanhf(80.0f / 50.0f), 1e-4f);
    flex_mod_destroy(cap);

    flex_mod *out = (flex_mod *)1;
    flex_param bad = {"WINDOW", 0, 3};
    ck_assert_int_eq(flex_preset_compile(ctx, "sliding_window", &bad, 1, &out), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_null(out);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "WINDOW"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "params are: W"));
    ck_assert_int_eq(flex_preset_compile(ctx, "causal", &bad, 1, &out), FLEX_ERR_MOD_NAME);
    ck_assert_int_eq(flex_preset_compile(ctx, "casual", NULL, 0, &out), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_nonnull(strstr(flex_error_message(ctx), "casual"));
    ck_assert_int_eq(flex_preset_compile(ctx, NULL, NULL, 0, &out), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_preset_compile(ctx, "causal", NULL, 0, NULL), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_preset_compile(ctx, "causal", NULL, 2, &out), FLEX_ERR_NULL_POINTER);
}
END_TEST

/* The seed's functions, written in C, against the presets. */
static int seed_natten(int q, int kv, int H, int W, int KH, int KW) {
    int qx = q / W, qy = q % W, kx = kv / W, ky = kv % W;
    int cx = qx < KW / 2 ? KW / 2 : qx > (W - 1) - KW / 2 ? (W - 1) - KW / 2 : qx;
    int cy = qy < KH / 2 ? KH / 2 : qy > (H - 1) - KH / 2 ? (H - 1) - KH / 2 : qy;
    return abs(cx - kx) <= KW / 2 && abs(cy - ky) <= KH / 2;
}

START_TEST(test_seed_semantics) {
    /* NATTEN and SASA on a 12 x 10 image (non-square on purpose). */
    flex_param np[4] = {{"IH", 0, 12}, {"IW", 0, 10}, {"KH", 0, 5}, {"KW", 0, 3}};
    flex_mod *natten = preset("natten", np, 4);
    flex_param sp[2] = {{"IW", 0, 10}, {"WIN", 0, 2}};
    flex_mod *sasa = preset("sasa", sp, 2);
    for (int q = 0; q < 120; q += 7)
        for (int kv = 0; kv < 120; kv++) {
            ck_assert_int_eq(eval_at(natten, 0, 0, 0, q, kv).i, seed_natten(q, kv, 12, 10, 5, 3));
            int want = abs(q / 10 - kv / 10) <= 2 && abs(q % 10 - kv % 10) <= 2;
            ck_assert_int_eq(eval_at(sasa, 0, 0, 0, q, kv).i, want);
        }
    flex_mod_destroy(natten);
    flex_mod_destroy(sasa);

    /* Checkerboard: the seed halves every score, then doubles even
     * distances. */
    flex_mod *cb = preset("checkerboard", NULL, 0);
    ck_assert_float_eq(eval_at(cb, 3.0f, 0, 0, 5, 1).f, 3.0f);
    ck_assert_float_eq(eval_at(cb, 3.0f, 0, 0, 5, 2).f, 1.5f);
    ck_assert_float_eq(eval_at(cb, -8.0f, 0, 0, 2, 7).f, -4.0f);
    flex_mod_destroy(cb);

    /* Functional ALiBi: score + (q - kv) * 2^(-(h + 1) * 8 / NH). */
    flex_param nh = {"NH", 0, 8};
    flex_mod *af = preset("alibi_functional", &nh, 1);
    float want = 1.0f + (float)(9 - 4) * exp2f(-(2 + 1) * 8.0f / 8);
    ck_assert_float_eq_tol(eval_at(af, 1.0f, 0, 2, 9, 4).f, want, 1e-6f);
    flex_mod_destroy(af);

    /* Buffer ALiBi: score + slopes[h] * (kv - q). */
    flex_mod *alibi = preset("alibi", NULL, 0);
    float slopes[2] = {0.5f, 0.25f};
    int64_t ns = 2;
    flex_tensor st = flex_tensor_contiguous(slopes, FLEX_F32, 1, &ns, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(ctx, alibi, "slopes", &st), FLEX_OK);
    ck_assert_float_eq_tol(eval_at(alibi, 2.0f, 0, 1, 10, 2).f, 2.0f - 0.25f * 8, 1e-6f);
    flex_mod_destroy(alibi);

    /* Flamingo on the seed's example: 12 text tokens, 3 images of 3 tokens,
     * intervals [[0, 7], [1, 7], [7, 12]]. */
    flex_mod *fl = preset("flamingo", NULL, 0);
    int32_t img_of[9] = {0, 0, 0, 1, 1, 1, 2, 2, 2};
    int32_t iv[6] = {0, 7, 1, 7, 7, 12};
    int64_t n9 = 9, s32[2] = {3, 2};
    bind_i32(fl, "img_of", img_of, 1, &n9);
    bind_i32(fl, "intervals", iv, 2, s32);
    for (int q = 0; q < 12; q++)
        for (int kv = 0; kv < 9; kv++) {
            const int32_t *v = &iv[2 * img_of[kv]];
            ck_assert_int_eq(eval_at(fl, 0, 0, 0, q, kv).i, q >= v[0] && q < v[1]);
        }
    flex_mod_destroy(fl);

    /* Jagged causal: causal inside each packed sequence. */
    flex_mod *jg = preset("jagged_causal", NULL, 0);
    int32_t off[4] = {0, 3, 3, 8}, seq[8];
    ck_assert_int_eq(flex_sequence_ids_from_offsets(off, 4, seq, 8), FLEX_OK);
    int64_t n8 = 8, n4 = 4;
    bind_i32(jg, "seq", seq, 1, &n8);
    bind_i32(jg, "off", off, 1, &n4);
    for (int q = 0; q < 8; q++)
        for (int kv = 0; kv < 8; kv++)
            ck_assert_int_eq(eval_at(jg, 0, 0, 0, q, kv).i, seq[q] == seq[kv] && q >= kv);
    flex_mod_destroy(jg);

    /* Score-mod causal masks with -inf. */
    flex_mod *cs = preset("causal_score", NULL, 0);
    ck_assert(isinf(eval_at(cs, 1.0f, 0, 0, 2, 3).f));
    ck_assert_float_eq(eval_at(cs, 1.0f, 0, 0, 3, 3).f, 1.0f);
    flex_mod_destroy(cs);

    flex_mod *plm = preset("prefix_lm", NULL, 0);
    ck_assert_int_eq(eval_at(plm, 0, 0, 0, 5, 2048).i, 1);
    ck_assert_int_eq(eval_at(plm, 0, 0, 0, 5, 2049).i, 0);
    flex_mod_destroy(plm);
}
END_TEST

START_TEST(test_sequence_ids) {
    int32_t off[5] = {0, 2, 2, 5, 6}, ids[6];
    ck_assert_int_eq(flex_sequence_ids_from_offsets(off, 5, ids, 6), FLEX_OK);
    const int32_t want[6] = {0, 0, 2, 2, 2, 3};
    ck_assert_mem_eq(ids, want, sizeof want);
    int32_t zero[1] = {0};
    ck_assert_int_eq(flex_sequence_ids_from_offsets(zero, 1, NULL, 0), FLEX_OK);

    int32_t bad_start[3] = {1, 2, 6};
    ck_assert_int_eq(flex_sequence_ids_from_offsets(bad_start, 3, ids, 6),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "offsets[0]"));
    int32_t decreasing[4] = {0, 4, 3, 6};
    ck_assert_int_eq(flex_sequence_ids_from_offsets(decreasing, 4, ids, 6),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "decrease"));
    int32_t short_end[3] = {0, 2, 5};
    ck_assert_int_eq(flex_sequence_ids_from_offsets(short_end, 3, ids, 6),
                     FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_sequence_ids_from_offsets(NULL, 3, ids, 6), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_sequence_ids_from_offsets(off, 5, NULL, 6), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_sequence_ids_from_offsets(off, 0, ids, 6), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_sequence_ids_from_offsets(off, 5, ids, -1), FLEX_ERR_INVALID_ARGUMENT);
}
END_TEST

static Suite *presets_suite(void) {
    Suite *s = suite_create("presets");
    TCase *tc = tcase_create("presets");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_table);
    tcase_add_test(tc, test_every_preset_is_its_text);
    tcase_add_test(tc, test_overrides);
    tcase_add_test(tc, test_seed_semantics);
    tcase_add_test(tc, test_sequence_ids);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(presets_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
