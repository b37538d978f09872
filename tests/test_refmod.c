/*
 * The independent mod evaluator (refmod.c) that the oracles use.
 *
 * 1. Against values computed by hand from docs/mod-language.md: every
 *    operator with its int / float / bool meaning, precedence, lets,
 *    literals, functions, params, buffers of every dtype and 1-4 dims,
 *    out-of-range reads (also in an untaken branch), type errors, and the
 *    dual-number derivatives.
 * 2. Against the library on every preset without buffers and on mods with
 *    buffers: two implementations written apart must agree at every point
 *    (masks exactly, scores to float rounding). A fault in the library's
 *    lexer, parser, folding or interpreter shows here as a disagreement.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "refmod.h"

/* ---- hand-computed values ---- */

/* Value of text (a score mod when kind is FLEX_MOD_SCORE) at one point. */
static double value_at(flex_mod_kind kind, const char *text, double score, int32_t q, int32_t kv) {
    refmod *m = NULL;
    char err[256];
    ck_assert_msg(refmod_parse(text, kind, NULL, 0, NULL, 0, &m, err, sizeof err) == 0,
                  "'%s': %s", text, err);
    refmod_result r;
    ck_assert_msg(refmod_eval(m, REFMOD_F64, 0, score, 0, 1, q, kv, &r, err, sizeof err) == 0,
                  "'%s': %s", text, err);
    refmod_free(m);
    return r.value;
}

typedef struct value_case {
    flex_mod_kind kind;
    const char *text;
    double want; /* NAN: a NaN is wanted */
} value_case;

#define S FLEX_MOD_SCORE
#define M FLEX_MOD_MASK

/* At score 1.5, b 0, h 1, q 5, kv 2. */
static const value_case values[] = {
    /* ints wrap at 32 bits */
    {S, "2147483647 + 1", -2147483648.0},
    {S, "2147483647 * 2", -2.0},
    {S, "-(-2147483648)", -2147483648.0},
    {S, "abs(-2147483648)", -2147483648.0},
    {M, "-2147483648 - 1 == 2147483647", 1}, /* a score would round it to float */
    /* division and remainder */
    {S, "-7 // 2", -4},
    {S, "7 // -2", -4},
    {S, "-7 / 2", -4},
    {S, "7 / 2", 3},
    {S, "float(7) / 2", 3.5},
    {S, "-7 % 2", 1},
    {S, "7 % -2", -1},
    {S, "-7 % 3", 2},
    {S, "(kv - q) % 4", 1}, /* -3 % 4 */
    {S, "-7.5 % 2.0", 0.5},
    {S, "7.5 % -2.0", -0.5},
    {S, "q // 0", 0},
    {S, "q % 0", 0},
    {S, "q / 0", 0},
    {S, "-2147483648 // -1", -2147483648.0},
    {S, "-2147483648 % -1", 0},
    {S, "1.0 / 0.0", INFINITY},
    {S, "-1.0 / 0.0", -INFINITY},
    {S, "0.0 / 0.0", NAN},
    {S, "5.0 % 0.0", NAN},
    {S, "-7.0 // 2.0", -4},
    {S, "7 // 2.0", 3},
    {S, "q // 2", 2},
    {S, "q % 2", 1},
    /* bools in arithmetic */
    {S, "true + true", 2},
    {S, "score + true", 2.5},
    {S, "min(true, false)", 0},
    {S, "(q > kv) * 3", 3},
    /* precedence: & | ^ are looser than comparisons; ^ tighter than & */
    {S, "5 & 3 | 8", 9},
    {S, "6 ^ 3 & 5", 5},
    {S, "1 | 2 ^ 3", 1},
    {S, "~5", -6},
    {S, "2 + 3 * 4", 14},
    {S, "(2 + 3) * 4", 20},
    {S, "10 - 4 - 3", 3},
    {S, "2 * 3 % 4", 2},
    {S, "-q * 2", -10},
    {S, "true ? 1 : 2", 1},
    {S, "false ? 1 : true ? 2 : 3", 2},
    {S, "q > kv ? score : 0", 1.5},
    {M, "q >= kv & q == 5", 1},
    {M, "q >= kv & q == 4", 0},
    {M, "q >= kv && kv == 2 || false", 1},
    {M, "!(q < kv)", 1},
    {M, "~(q < kv)", 1},
    {M, "true ^ true", 0},
    {M, "true & false | true", 1},
    {M, "false < true", 1},
    {M, "q == 5.0", 1},
    {M, "score_like == 3", 0}, /* replaced below: unknown names fail */
    /* lets, aliases, comments, literals */
    {S, "let d = q - kv; d * d", 9},
    {S, "let a = q; let b2 = a * a; b2 + a;", 30},
    {S, "q_idx + kv_idx * 10 + head * 100 + batch * 1000", 125},
    {S, "# a comment\nq # another\n", 5},
    {S, ".5 + 2.", 2.5},
    {S, "1e-3", (double)1e-3f},
    {S, "1e-50", 0.0},
    {S, "2.5e1", 25},
    {S, "inf", INFINITY},
    {S, "-inf", -INFINITY},
    {S, "-2147483648", -2147483648.0},
    {S, "0.1", (double)0.1f},
    {S, "float(16777217)", 16777216.0},
    /* functions */
    {S, "abs(-3)", 3},
    {S, "abs(-2.5)", 2.5},
    {S, "min(3, 2.5)", 2.5},
    {S, "max(q, kv)", 5},
    {S, "max(score, 0.0 / 0.0)", NAN},
    {S, "min(0.0 / 0.0, score)", NAN},
    {S, "1.0 / min(0.0, -0.0)", -INFINITY},
    {S, "1.0 / min(-0.0, 0.0)", -INFINITY},
    {S, "1.0 / max(-0.0, 0.0)", INFINITY},
    {S, "1.0 / max(0.0, -0.0)", INFINITY},
    {S, "clamp(q, 1, 3)", 3},
    {S, "clamp(kv, 3, 4)", 3},
    {S, "clamp(score, 0, 1)", 1},
    {S, "where(q < kv, 1.5, 2)", 2},
    {S, "where(q > kv, 1.5, 2)", 1.5},
    {S, "exp(0.0)", 1},
    {S, "exp2(3)", 8},
    {S, "log(1)", 0},
    {S, "log2(8.0)", 3},
    {S, "sqrt(16)", 4},
    {S, "rsqrt(4)", 0.5},
    {S, "sin(0)", 0},
    {S, "cos(0)", 1},
    {S, "tan(0)", 0},
    {S, "tanh(0)", 0},
    {S, "tanh_approx(0.0)", 0},
    {S, "sigmoid(0)", 0.5},
    {S, "pow(2, 10)", 1024},
    {S, "floor(-2.5)", -3},
    {S, "ceil(2.1)", 3},
    {S, "floor(7)", 7},
    {S, "float(true)", 1},
    {S, "int(2.7)", 2},
    {S, "int(-2.7)", -2},
    {M, "int(1e10) == 2147483647", 1},
    {S, "int(-1e10)", -2147483648.0},
    {S, "int(0.0 / 0.0)", 0},
    {S, "int(true)", 1},
    {S, "int(q) // 2", 2},
};

START_TEST(test_values) {
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        const value_case *c = &values[i];
        if (strstr(c->text, "score_like")) continue; /* the name case is in test_errors */
        double got = value_at(c->kind, c->text, 1.5, 5, 2);
        if (isnan(c->want))
            ck_assert_msg(isnan(got), "'%s' = %g, want NaN", c->text, got);
        else
            ck_assert_msg(got == c->want, "'%s' = %.9g, want %.9g", c->text, got, c->want);
    }
}
END_TEST

/* The f32 precision rounds after every operation; f64 does not. */
START_TEST(test_precision) {
    refmod *m = NULL;
    char err[256];
    ck_assert_int_eq(refmod_parse("score + 1e-8 * 1.0", FLEX_MOD_SCORE, NULL, 0, NULL, 0, &m, err,
                                  sizeof err),
                     0);
    refmod_result r;
    ck_assert_int_eq(refmod_eval(m, REFMOD_F64, 0, 1.0, 0, 0, 0, 0, &r, err, sizeof err), 0);
    ck_assert(r.value > 1.0);
    ck_assert_int_eq(refmod_eval(m, REFMOD_F32, 0, 1.0, 0, 0, 0, 0, &r, err, sizeof err), 0);
    ck_assert(r.value == 1.0);
    refmod_free(m);
}
END_TEST

static int parse_fails(flex_mod_kind kind, const char *text) {
    refmod *m = NULL;
    char err[256];
    int rc = refmod_parse(text, kind, NULL, 0, NULL, 0, &m, err, sizeof err);
    refmod_free(m);
    return rc != 0;
}

static int eval_fails(flex_mod_kind kind, const char *text) {
    refmod *m = NULL;
    char err[256];
    ck_assert_msg(refmod_parse(text, kind, NULL, 0, NULL, 0, &m, err, sizeof err) == 0, "'%s': %s",
                  text, err);
    refmod_result r;
    int rc = refmod_eval(m, REFMOD_F64, 0, 1.0, 0, 0, 3, 2, &r, err, sizeof err);
    refmod_free(m);
    return rc != 0;
}

START_TEST(test_errors) {
    ck_assert(parse_fails(M, "0 <= q < 10"));
    ck_assert(parse_fails(M, "q == kv == true"));
    ck_assert(parse_fails(M, "score_like == 3"));
    ck_assert(parse_fails(M, "score > 0.0")); /* no score in a mask mod */
    ck_assert(parse_fails(S, "2147483648"));
    ck_assert(parse_fails(S, "1e39"));
    ck_assert(parse_fails(S, "min(1)"));
    ck_assert(parse_fails(S, "nosuch(1)"));
    ck_assert(parse_fails(S, "q +"));
    ck_assert(parse_fails(S, "(q"));
    ck_assert(parse_fails(S, "q kv"));
    ck_assert(parse_fails(S, "let x = 1 x"));
    ck_assert(eval_fails(M, "q + kv"));          /* a mask mod returns bool */
    ck_assert(eval_fails(S, "q > kv"));          /* a score mod does not */
    ck_assert(eval_fails(S, "-true"));           /* unary minus on a bool */
    ck_assert(eval_fails(M, "q && true"));       /* && needs bools */
    ck_assert(eval_fails(S, "1.5 & 1"));         /* & on a float */
    ck_assert(eval_fails(S, "where(q, 1, 2)"));  /* a condition is a bool */
    ck_assert(eval_fails(S, "!q"));              /* ! needs a bool */
    ck_assert(!eval_fails(S, "score"));
}
END_TEST

/* ---- params and buffers ---- */

static uint16_t to_half(float f) {
    /* exact for the small values used here */
    uint16_t sign = f < 0 ? 0x8000 : 0;
    f = fabsf(f);
    int e;
    float m = frexpf(f, &e); /* f = m * 2^e, m in [0.5, 1) */
    return (uint16_t)(sign | (uint16_t)((e + 14) << 10) | (uint16_t)((m * 2048.0f) - 1024.0f));
}

START_TEST(test_params_and_buffers) {
    int32_t doc[6] = {0, 0, 1, 1, 1, 2};
    float bias[2][3] = {{0.5f, 1.5f, 2.5f}, {-1.0f, -2.0f, -3.0f}};
    int64_t wide[2] = {(1ll << 32) + 5, -1};
    uint8_t bytes[3] = {7, 200, 0};
    uint8_t flags[2] = {0, 3};
    uint16_t halves[2] = {to_half(0.75f), to_half(-3.5f)};
    uint16_t bhalves[2] = {0x3fc0, 0xc060}; /* 1.5, -3.5 */
    int32_t cube[2][2][2][2] = {{{{1, 2}, {3, 4}}, {{5, 6}, {7, 8}}},
                                {{{9, 10}, {11, 12}}, {{13, 14}, {15, 16}}}};
    int32_t iv[2][2] = {{0, 3}, {3, 6}};
    flex_buffer_decl decls[] = {{"doc", FLEX_I32, 1},     {"bias", FLEX_F32, 2},
                                {"wide", FLEX_I64, 1},    {"bytes", FLEX_U8, 1},
                                {"flags", FLEX_BOOL, 1},  {"halves", FLEX_F16, 1},
                                {"bhalves", FLEX_BF16, 1}, {"cube", FLEX_I32, 4},
                                {"iv", FLEX_I32, 2}};
    refmod_buffer data[] = {
        {"doc", doc, FLEX_I32, 1, {6}, {1}},
        {"bias", bias, FLEX_F32, 2, {2, 3}, {3, 1}},
        {"wide", wide, FLEX_I64, 1, {2}, {1}},
        {"bytes", bytes, FLEX_U8, 1, {3}, {1}},
        {"flags", flags, FLEX_BOOL, 1, {2}, {1}},
        {"halves", halves, FLEX_F16, 1, {2}, {1}},
        {"bhalves", bhalves, FLEX_BF16, 1, {2}, {1}},
        {"cube", cube, FLEX_I32, 4, {2, 2, 2, 2}, {8, 4, 2, 1}},
        {"iv", iv, FLEX_I32, 2, {2, 2}, {2, 1}},
    };
    flex_param params[] = {{"W", 0, 3}, {"cap", 1, 0.1}};
    struct {
        flex_mod_kind kind;
        const char *text;
        double want; /* NAN: the evaluation must fail (out of range) */
    } cases[] = {
        {S, "W + cap", 3.0 + (double)0.1f},
        {M, "doc[q] == doc[kv]", 0}, /* q 4, kv 1 */
        {M, "doc[q] == doc[kv + 1]", 1},
        {S, "bias[h][kv]", -2.0},
        {S, "bias[h, kv]", -2.0},
        {S, "wide[0] + wide[1]", 4},
        {S, "bytes[1] + bytes[0]", 207},
        {M, "flags[1] && !flags[0]", 1},
        {S, "flags[1] + 1", 2},
        {S, "halves[0] + halves[1]", -2.75},
        {S, "bhalves[0] * bhalves[1]", -5.25},
        {S, "cube[1][0][1][1] + cube[0, 1, 1, 0]", 19},
        {S, "let r = iv[h]; r[1] - r[0]", 3},
        {M, "let img = doc[q]; let r = iv[img]; q >= r[0] && q < r[1]", 1},
        {S, "doc[q + 2]", NAN},                       /* 6 is out of range */
        {S, "doc[-1]", NAN},                          /* no wrap from the end */
        {S, "where(q < 2, doc[q + 5], 0)", NAN},      /* the untaken branch too */
        {S, "where(q < 2, doc[min(q + 5, 5)], 0)", 0}, /* clamped: fine */
        {S, "let unused = doc[q + 9]; score", 1.5},   /* a let never used is never read */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        refmod *m = NULL;
        char err[256];
        ck_assert_msg(refmod_parse(cases[i].text, cases[i].kind, params, 2, decls, 9, &m, err,
                                   sizeof err) == 0,
                      "'%s': %s", cases[i].text, err);
        ck_assert_int_eq(refmod_bind(m, data, 9, err, sizeof err), 0);
        refmod_result r;
        int rc = refmod_eval(m, REFMOD_F64, 0, 1.5, 0, 1, 4, 1, &r, err, sizeof err);
        if (isnan(cases[i].want)) {
            ck_assert_msg(rc != 0, "'%s' read out of range without an error", cases[i].text);
            ck_assert_msg(strstr(err, "doc") && strstr(err, "out of range"), "'%s': %s",
                          cases[i].text, err);
        } else {
            ck_assert_msg(rc == 0, "'%s': %s", cases[i].text, err);
            ck_assert_msg(r.value == cases[i].want, "'%s' = %.9g, want %.9g", cases[i].text,
                          r.value, cases[i].want);
        }
        refmod_free(m);
    }
}
END_TEST

/* ---- derivatives ---- */

START_TEST(test_derivatives) {
    float bias[3] = {0.5f, -2.0f, 4.0f};
    flex_buffer_decl decl = {"bias", FLEX_F32, 1};
    refmod_buffer data = {"bias", bias, FLEX_F32, 1, {3}, {1}};
    double s = 3.0, t = tanh(0.1);
    struct {
        const char *text;
        double dscore;
        int64_t element; /* -1: no partial wanted */
        double partial;
    } cases[] = {
        {"30.0 * tanh(score / 30.0)", 1.0 - t * t, -1, 0},
        {"score * bias[h]", -2.0, 1, 3.0},
        {"score + bias[h] * bias[h]", 1.0, 1, -4.0},
        {"where(q >= kv, score, -inf)", 1.0, -1, 0},
        {"where(q < kv, score, 2.0 * score)", 2.0, -1, 0},
        {"max(score, 3.0)", 0.5, -1, 0}, /* a tie splits the gradient */
        {"max(score, 2.0)", 1.0, -1, 0},
        {"min(score, 2.0)", 0.0, -1, 0},
        {"abs(score - 3.0)", 0.0, -1, 0},
        {"abs(-score)", 1.0, -1, 0},
        {"score % 2.0", 1.0, -1, 0},
        {"pow(score, 2.0)", 6.0, -1, 0},
        {"exp(score)", exp(3.0), -1, 0},
        {"exp2(score)", exp2(3.0) * log(2.0), -1, 0},
        {"log(score)", 1.0 / 3.0, -1, 0},
        {"sqrt(score)", 0.5 / sqrt(3.0), -1, 0},
        {"rsqrt(score)", -0.5 * pow(3.0, -1.5), -1, 0},
        {"sigmoid(score)", exp(-3.0) / pow(1.0 + exp(-3.0), 2.0), -1, 0},
        {"score / bias[2]", 0.25, 2, -3.0 / 16.0},
        {"floor(score) + score * q", 4.0, -1, 0},
        {"float(q) * score", 4.0, -1, 0},
        {"clamp(score, 0.0, 10.0)", 1.0, -1, 0},
        {"let c = bias[0]; c * tanh(score / c)", 1.0 - pow(tanh(6.0), 2.0), 0,
         tanh(6.0) - 6.0 * (1.0 - pow(tanh(6.0), 2.0))},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        refmod *m = NULL;
        char err[256];
        ck_assert_msg(refmod_parse(cases[i].text, FLEX_MOD_SCORE, NULL, 0, &decl, 1, &m, err,
                                   sizeof err) == 0,
                      "'%s': %s", cases[i].text, err);
        ck_assert_int_eq(refmod_bind(m, &data, 1, err, sizeof err), 0);
        refmod_result r;
        ck_assert_msg(refmod_eval(m, REFMOD_F64, 1, s, 0, 1, 4, 1, &r, err, sizeof err) == 0,
                      "'%s': %s", cases[i].text, err);
        ck_assert_msg(fabs(r.dscore - cases[i].dscore) <= 1e-12 * fmax(1.0, fabs(r.dscore)),
                      "'%s': d/dscore %.15g, want %.15g", cases[i].text, r.dscore,
                      cases[i].dscore);
        if (cases[i].element >= 0) {
            int found = 0;
            for (int k = 0; k < r.num_partials; k++)
                if (r.partials[k].element == cases[i].element) {
                    found = 1;
                    ck_assert_msg(fabs(r.partials[k].d - cases[i].partial) <= 1e-12,
                                  "'%s': d/dbias[%lld] %.15g, want %.15g", cases[i].text,
                                  (long long)cases[i].element, r.partials[k].d, cases[i].partial);
                }
            ck_assert_msg(found, "'%s': no partial for bias[%lld]", cases[i].text,
                          (long long)cases[i].element);
        }
        refmod_free(m);
    }
}
END_TEST

/* ---- agreement with the library ---- */

/* Evaluates a compiled mod with the library's f32 interpreter and refmod
 * (f32 precision) over a grid of points and scores; masks must agree
 * exactly, scores within float rounding. */
static void expect_agreement(flex_mod *mod, const char *what, const refmod_buffer *data,
                             int num_data, const mod_buffer_view *views) {
    refmod *m = NULL;
    char err[256];
    const flex_mod_source *src = mod->source;
    ck_assert_msg(refmod_parse(src->text, src->kind, src->params, src->num_params, src->buffers,
                               src->num_buffers, &m, err, sizeof err) == 0,
                  "%s: %s", what, err);
    ck_assert_int_eq(refmod_bind(m, data, num_data, err, sizeof err), 0);
    ir_value *scratch = malloc((size_t)(mod->ir.num_nodes + 1) * sizeof *scratch);
    static const float scores[] = {-31.0f, -2.5f, -0.75f, 0.0f, 0.3f, 1.0f, 4.5f, 29.0f};
    int points = 0;
    for (int32_t b = 0; b < 2; b++)
        for (int32_t h = 0; h < 4; h++)
            for (int32_t q = 0; q < 40; q += 3)
                for (int32_t kv = 0; kv < 40; kv += 2)
                    for (size_t si = 0; si < sizeof scores / sizeof scores[0]; si++) {
                        ir_value lib;
                        mod_bounds_error e;
                        memset(&e, 0, sizeof e);
                        int lib_rc = mod_eval_point(&mod->ir, views, scores[si], b, h, q, kv,
                                                    scratch, &lib, &e);
                        refmod_result r;
                        int ref_rc = refmod_eval(m, REFMOD_F32, 0, scores[si], b, h, q, kv, &r, err,
                                                 sizeof err);
                        ck_assert_msg(lib_rc == 0 && ref_rc == 0, "%s at (%d,%d,%d,%d): %s", what,
                                      b, h, q, kv, err);
                        points++;
                        if (mod->ir.kind == FLEX_MOD_MASK) {
                            ck_assert_msg((lib.i != 0) == (r.value != 0.0),
                                          "%s at (b %d, h %d, q %d, kv %d): library %d, "
                                          "reference %g",
                                          what, b, h, q, kv, lib.i, r.value);
                            continue;
                        }
                        double want = r.value, got = lib.f;
                        int same = (isnan(want) && isnan(got)) || want == got ||
                                   fabs(got - want) <= 4e-7 * fmax(fabs(want), 1e-30);
                        ck_assert_msg(same,
                                      "%s at (b %d, h %d, q %d, kv %d, score %g): library %.9g, "
                                      "reference %.9g",
                                      what, b, h, q, kv, scores[si], got, want);
                    }
    ck_assert_int_gt(points, 0);
    free(scratch);
    refmod_free(m);
}

START_TEST(test_presets_agree) {
    int tried = 0;
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        if (p->num_buffers > 0) continue; /* in test_buffer_mods_agree */
        flex_mod *mod = NULL;
        ck_assert_int_eq(flex_preset_compile(NULL, p->name, NULL, 0, &mod), FLEX_OK);
        expect_agreement(mod, p->name, NULL, 0, NULL);
        flex_mod_destroy(mod);
        tried++;
    }
    ck_assert_int_ge(tried, 10);
}
END_TEST

/* Mods written to exercise what the presets do not: Python's % and // on
 * negative operands, folding candidates (x % 2, x // 2, x * 1, ...), bit
 * operators, buffers. */
START_TEST(test_mods_agree) {
    int32_t doc[40];
    float slopes[4] = {0.5f, 0.25f, -0.125f, 2.0f};
    for (int i = 0; i < 40; i++)
        doc[i] = i / 7;
    flex_buffer_decl decls[] = {{"doc", FLEX_I32, 1}, {"slopes", FLEX_F32, 1}};
    refmod_buffer data[] = {{"doc", doc, FLEX_I32, 1, {40}, {1}},
                            {"slopes", slopes, FLEX_F32, 1, {4}, {1}}};
    mod_buffer_view views[2] = {{doc, FLEX_I32, 1, {40}, {1}}, {slopes, FLEX_F32, 1, {4}, {1}}};
    static const struct {
        flex_mod_kind kind;
        const char *text;
    } mods[] = {
        {M, "(q - kv) % 2 == 0"},
        {M, "(kv - q) % 3 == 1"},
        {M, "(kv - q) // 2 >= -3"},
        {M, "(q - kv) // 4 == (q // 4) - (kv // 4)"},
        {M, "((q ^ kv) & 1) == 0 | (q - kv) % 5 == -1"},
        {M, "(q * 1 + 0) // 1 >= kv % 1 + kv * 1"},
        {M, "doc[q] == doc[kv] && q >= kv"},
        {M, "(q + b * 7 - h * 13) % 6 != 2"},
        {S, "score * 1.0 + slopes[h] * (kv - q)"},
        {S, "where((kv - q) % 2 == 0, score * 2.0, score * 0.5)"},
        {S, "score + float((q - kv) // 3) - float((kv - q) % 7)"},
        {S, "clamp(score, -2.0, 2.0) * float(doc[kv] - doc[q])"},
        {S, "let d = q - kv; score - abs(d) * 0.125 + (d % 4) * 0.5"},
        {S, "score // 0.5 + score % 0.75"},
    };
    for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        flex_mod_desc desc = {mods[i].kind, mods[i].text, NULL, 0, decls, 2};
        flex_mod *mod = NULL;
        ck_assert_msg(flex_mod_compile(NULL, &desc, &mod) == FLEX_OK, "%s: %s", mods[i].text,
                      flex_error_message(NULL));
        /* the library's views are indexed like its buffer table */
        mod_buffer_view v[2];
        for (int k = 0; k < mod->ir.num_buffers; k++)
            v[k] = views[strcmp(mod->ir.buffers[k].name, "doc") == 0 ? 0 : 1];
        expect_agreement(mod, mods[i].text, data, 2, v);
        flex_mod_destroy(mod);
    }
}
END_TEST

static Suite *refmod_suite(void) {
    Suite *s = suite_create("refmod");
    TCase *tc = tcase_create("refmod");
    tcase_add_test(tc, test_values);
    tcase_add_test(tc, test_precision);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_params_and_buffers);
    tcase_add_test(tc, test_derivatives);
    tcase_add_test(tc, test_presets_agree);
    tcase_add_test(tc, test_mods_agree);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(refmod_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
