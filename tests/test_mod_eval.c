/*
 * What mods compute: constant folding and the scalar interpreters (f32 and
 * f64) against hand-computed values for every operator and function, and
 * buffer reads of every dtype.
 *
 * Each value case is evaluated three ways: with its inputs x, y (int) and s
 * (float) bound by lets to q, kv and score and run through the f32 and f64
 * interpreters, and with x, y, s given as params so that the whole mod folds
 * to one constant at compile time. Folding must give exactly the run-time
 * value.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "internal.h"
#include "mod/parse.h"

static flex_mod *compile_score(const char *text, const flex_param *params, int num_params) {
    flex_mod_desc d = {FLEX_MOD_SCORE, text, params, num_params, NULL, 0};
    flex_mod *m = NULL;
    flex_status st = flex_mod_compile(NULL, &d, &m);
    ck_assert_msg(st == FLEX_OK, "'%s': %s", text, flex_error_message(NULL));
    return m;
}

typedef struct results {
    float interp;    /* f32 interpreter */
    double interp64; /* f64 interpreter */
    float folded;    /* the constant the params version folds to */
} results;

/* Evaluates the float expression expr of x, y, s all three ways. */
static results evaluate(const char *expr, int32_t x, int32_t y, float s) {
    results r;
    char text[512];
    snprintf(text, sizeof text, "let x = q; let y = kv; let s = score;\n%s", expr);
    flex_mod *m = compile_score(text, NULL, 0);
    ir_value scratch[256], out;
    double scratch64[256];
    mod_bounds_error err = {0};
    ck_assert_int_le(m->ir.num_nodes, 256);
    ck_assert_int_eq(mod_eval_point(&m->ir, NULL, s, 0, 0, x, y, scratch, &out, &err), 0);
    r.interp = out.f;
    ck_assert_int_eq(
        mod_eval_point_f64(&m->ir, NULL, (double)s, 0, 0, x, y, scratch64, &r.interp64, &err), 0);
    flex_mod_destroy(m);

    flex_param params[3] = {{"x", 0, x}, {"y", 0, y}, {"s", 1, s}};
    m = compile_score(expr, params, 3);
    ck_assert_msg(m->ir.num_nodes == 1 && m->ir.nodes[0].op == IR_CONST,
                  "'%s' with constant inputs did not fold to a constant: %s", expr, m->canonical);
    r.folded = m->ir.nodes[0].imm.f;
    flex_mod_destroy(m);
    return r;
}

static int same_float(float a, float b) {
    if (a != a && b != b) return 1;
    return memcmp(&a, &b, sizeof a) == 0;
}

/* ---- bool results: each expression must be true ---- */

static const struct {
    const char *expr;
    int32_t x, y;
    float s;
} truths[] = {
    /* floor division and remainder, ints */
    {"x // y == -4", -7, 2, 0},
    {"x / y == -4", -7, 2, 0},
    {"x % y == 1", -7, 2, 0},
    {"x % y == -1", 7, -2, 0},
    {"x // y == -4", 7, -2, 0},
    {"x // y == 3", -7, -2, 0},
    {"x % y == -1", -7, -2, 0},
    {"x // y == 3 && x % y == 1", 7, 2, 0},
    {"x % y == 0 && x // y == -3", -6, 2, 0},
    /* division by zero and the one overflowing quotient */
    {"x // y == 0 && x % y == 0 && x / y == 0", 5, 0, 0},
    {"x // y == 0 && x % y == 0", -5, 0, 0},
    {"x // y == -2147483648 && x % y == 0", INT32_MIN, -1, 0},
    /* wraparound */
    {"x + 1 == -2147483648", INT32_MAX, 0, 0},
    {"x - y == 2147483647", INT32_MIN, 1, 0},
    {"x * y == 0", 65536, 65536, 0},
    {"x * y == -2147483648", 65536, 32768, 0},
    {"-x == x && abs(x) == x", INT32_MIN, 0, 0},
    {"abs(x) == 7 && abs(y) == 7", -7, 7, 0},
    /* int() of floats: truncation toward zero, NaN -> 0, saturation */
    {"int(s) == 2", 0, 0, 2.9f},
    {"int(s) == -2", 0, 0, -2.9f},
    {"int(s) == 0", 0, 0, NAN},
    {"int(s) == 2147483647", 0, 0, INFINITY},
    {"int(s) == -2147483648", 0, 0, -INFINITY},
    {"int(s) == 2147483647", 0, 0, 3e9f},
    {"int(s) == -2147483648", 0, 0, -3e9f},
    {"int(x < y) == 1 && int(x) == x", 1, 2, 0},
    /* bool logic with & | ^ ~ ! */
    {"(x < y) & (y > 0)", 1, 2, 0},
    {"!((x < y) & (y < 0))", 1, 2, 0},
    {"(x < y) | (y < 0)", 1, 2, 0},
    {"!((x > y) | (y < 0))", 1, 2, 0},
    {"((x < y) ^ (y > 0)) == false", 1, 2, 0},
    {"(x < y) ^ (y < 0)", 1, 2, 0},
    {"~(x > y) && !(x > y)", 1, 2, 0},
    {"(true && !false) && (true || false) && !(false || false)", 0, 0, 0},
    {"true ^ false && !(true ^ true)", 0, 0, 0},
    /* ints: bitwise */
    {"(x & y) == 4 && (x | y) == 14 && (x ^ y) == 10", 6, 12, 0},
    {"~x == -7 && ~~x == x", 6, 0, 0},
    {"(x & -1) == x && (x | 0) == x && (x ^ x) == 0", 12345, 0, 0},
    /* promotion */
    {"(x < y) + 1 == 2", 1, 2, 0},
    {"((x < y) & 3) == 1", 1, 2, 0},
    {"(x < y) == 1", 1, 2, 0},
    {"x + 0.5 == 7.5", 7, 0, 0},
    {"x / 2 == 3 && x / 2.0 == 3.5 && x // 2.0 == 3.0", 7, 0, 0},
    {"x / y == 0 && x / 0.0 == -inf", -7, 0, 0},
    {"float(x) / float(y) == -3.5", -7, 2, 0},
    {"(x > y ? 1.5 : y) == 2.0", 1, 2, 0},
    {"min(x, s) == -0.5 && max(x, s) == 3.0", 3, 0, -0.5f},
    /* floats: floor division and remainder take the divisor's sign */
    {"s // 2.0 == -4.0", 0, 0, -7.5f},
    {"s % 2.0 == 0.5", 0, 0, -7.5f},
    {"s % -2.0 == -1.5", 0, 0, -7.5f},
    {"s % 2.0 == 1.5", 0, 0, 7.5f},
    {"s % -2.0 == -0.5", 0, 0, 7.5f},
    {"s % 2.5 == 0.0", 0, 0, 5.0f},
    {"!(s % 0.0 == s % 0.0)", 0, 0, 1.0f},
    /* float division by zero */
    {"s / 0.0 == inf && -s / 0.0 == -inf", 0, 0, 1.0f},
    {"x / 0.0 == -inf", -1, 0, 0},
    {"!(s / 0.0 == s / 0.0)", 0, 0, 0.0f},
    /* where, clamp, min, max */
    {"clamp(x, 0, 10) == 10 && clamp(y, 0, 10) == 0", 15, -3, 0},
    {"clamp(s, -1, 1) == 0.25", 0, 0, 0.25f},
    {"where(x > y, x, y) == max(x, y) && where(x < y, x, y) == min(x, y)", 4, 9, 0},
    {"where(x > y, s, 2) == 2.0", 1, 2, 0.5f},
    {"x > y ? x > 0 : y > 0", 1, 2, 0},
    {"min(s, 1.0) != min(s, 1.0) && max(2.0, s) != max(2.0, s)", 0, 0, NAN},
    /* of two zeros, -0 is the smaller, whichever operand it is */
    {"1.0 / min(s, -s) == -inf && 1.0 / min(-s, s) == -inf && 1.0 / max(s, -s) == inf && "
     "1.0 / max(-s, s) == inf",
     0, 0, 0.0f},
    {"1.0 / min(s, 0.0) == -inf && 1.0 / max(0.0, s) == inf && 1.0 / max(s, s) == -inf", 0, 0,
     -0.0f},
    /* floor / ceil / abs */
    {"floor(s) == -8.0 && ceil(s) == -7.0 && abs(s) == 7.5", 0, 0, -7.5f},
    {"floor(x) == x && ceil(x) == x", -3, 0, 0},
    /* comparisons with infinities and NaN */
    {"s < inf && -inf < s && s <= s", 0, 0, 1e30f},
    {"!(s == s) && s != s && !(s < 1.0) && !(s >= 1.0)", 0, 0, NAN},
    {"x <= y && x < y && y > x && y >= x && x != y && !(x == y)", 1, 2, 0},
    /* literals */
    {"1e-3 == 0.001 && .5 == 0.5 && 2. == 2.0 && 1.5e2 == 150.0", 0, 0, 0},
    {"-2147483648 < x", 0, 0, 0},
};

START_TEST(test_truths) {
    for (size_t i = 0; i < sizeof truths / sizeof truths[0]; i++) {
        const int expect = 1;
        char expr[512];
        snprintf(expr, sizeof expr, "where(%s, 1.0, 0.0)", truths[i].expr);
        results r = evaluate(expr, truths[i].x, truths[i].y, truths[i].s);
        ck_assert_msg(r.interp == (float)expect, "'%s' (x=%d y=%d s=%g): interpreter says %g",
                      truths[i].expr, (int)truths[i].x, (int)truths[i].y, (double)truths[i].s,
                      (double)r.interp);
        ck_assert_msg(r.interp64 == (double)expect, "'%s': f64 interpreter says %g", truths[i].expr,
                      r.interp64);
        ck_assert_msg(r.folded == (float)expect, "'%s': folding says %g", truths[i].expr,
                      (double)r.folded);
    }
}
END_TEST

/* ---- float results ---- */

static const struct {
    const char *expr;
    int32_t x, y;
    float s;
    double expect;
    double tol; /* relative; 0: bit-exact as a float */
} values[] = {
    {"exp(s)", 0, 0, 1.0f, 2.718281828459045, 1e-6},
    {"exp2(s)", 0, 0, 3.0f, 8.0, 0},
    {"exp2(x)", -2, 0, 0, 0.25, 0},
    {"log(s)", 0, 0, 2.0f, 0.6931471805599453, 1e-6},
    {"log2(s)", 0, 0, 8.0f, 3.0, 0},
    {"log(s)", 0, 0, 0.0f, -INFINITY, 0},
    {"log(s)", 0, 0, -1.0f, NAN, 0},
    {"sqrt(s)", 0, 0, 2.0f, 1.4142135623730951, 1e-6},
    {"sqrt(x)", 9, 0, 0, 3.0, 0},
    {"rsqrt(s)", 0, 0, 4.0f, 0.5, 0},
    {"pow(s, 3)", 0, 0, 2.0f, 8.0, 0},
    {"pow(s, 0.5)", 0, 0, 2.0f, 1.4142135623730951, 1e-6},
    {"pow(x, y)", 3, 4, 0, 81.0, 0},
    {"sin(s)", 0, 0, 0.5f, 0.479425538604203, 1e-6},
    {"cos(s)", 0, 0, 0.5f, 0.8775825618903728, 1e-6},
    {"tan(s)", 0, 0, 0.5f, 0.5463024898437905, 1e-6},
    {"tanh(s)", 0, 0, 0.5f, 0.46211715726000974, 1e-6},
    {"tanh_approx(s)", 0, 0, 0.5f, 0.46211715726000974, 1e-6},
    {"sigmoid(s)", 0, 0, 0.0f, 0.5, 0},
    {"sigmoid(s)", 0, 0, 2.0f, 0.8807970779778823, 1e-6},
    {"sigmoid(s)", 0, 0, -2.0f, 0.11920292202211755, 1e-6},
    {"sigmoid(s)", 0, 0, 200.0f, 1.0, 0},
    {"sigmoid(s)", 0, 0, -200.0f, 0.0, 0},
    {"30.0 * tanh(s / 30.0)", 0, 0, 60.0f, 28.920827402274507, 1e-6},
    {"s + float(y - x)", 10, 3, 0.25f, -6.75, 0},
    {"s * 2.0 + x * 0.5", 3, 0, 1.25f, 4.0, 0},
    {"float(x // y)", -7, 2, 0, -4.0, 0},
    {"float(x % y)", -7, 2, 0, 1.0, 0},
    {"int(s) + 0.5", 0, 0, -2.5f, -1.5, 0},
    {"(x < y) + s", 1, 2, 0.5f, 1.5, 0},
    {"s * -2147483648", 0, 0, 0.5f, -1073741824.0, 0},
    {"s / x", 4, 0, 1.0f, 0.25, 0},
    {"s // x", 4, 0, -1.0f, -1.0, 0},
    {"min(s, 1.0) + max(s, -1.0)", 0, 0, 0.5f, 1.0, 0},
    {"where(x >= y, s, -inf)", 1, 2, 3.0f, -INFINITY, 0},
    {"where(x >= y, s, -inf)", 2, 2, 3.0f, 3.0, 0},
    /* identities that must not be applied to floats */
    {"s * 0.0", 0, 0, INFINITY, NAN, 0},
    {"s * 0.0", 0, 0, -1.0f, -0.0, 0},
    {"s + 0.0", 0, 0, -0.0f, 0.0, 0},
    {"s - 0.0", 0, 0, -0.0f, -0.0, 0},
    {"s - s", 0, 0, INFINITY, NAN, 0},
    {"(s + 1e8) - 1e8", 0, 0, 1.0f, 0.0, 0},
    {"s * 1.0 / 1.0", 0, 0, -0.0f, -0.0, 0},
};

START_TEST(test_values) {
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        results r = evaluate(values[i].expr, values[i].x, values[i].y, values[i].s);
        double e = values[i].expect;
        const char *what = values[i].expr;
        ck_assert_msg(same_float(r.folded, r.interp), "'%s': folded %a but run time %a", what,
                      (double)r.folded, (double)r.interp);
        if (e != e) {
            ck_assert_msg(r.interp != r.interp, "'%s': %g is not NaN", what, (double)r.interp);
            ck_assert_msg(r.interp64 != r.interp64, "'%s': f64 %g is not NaN", what, r.interp64);
        } else if (values[i].tol == 0) {
            ck_assert_msg(same_float(r.interp, (float)e), "'%s' (s=%g): %a, expected %a", what,
                          (double)values[i].s, (double)r.interp, (double)(float)e);
        } else {
            ck_assert_msg(fabs(r.interp - e) <= values[i].tol * fabs(e), "'%s': %.9g vs %.9g", what,
                          (double)r.interp, e);
        }
        if (e == e && !isinf(e) && strstr(what, "1e8") == NULL)
            ck_assert_msg(fabs(r.interp64 - e) <= 1e-12 * fabs(e) + 1e-80,
                          "'%s' f64: %.17g vs %.17g", what, r.interp64, e);
        if (isinf(e)) ck_assert(r.interp64 == e);
    }
}
END_TEST

START_TEST(test_f64_precision) {
    /* float // is floor(a / b) (documented): 1.0f / 0.1f rounds to 10 in f32,
     * while in f64 it stays below 10 */
    results fd = evaluate("s // 0.1", 0, 0, 1.0f);
    ck_assert(fd.interp == 10.0f && fd.folded == 10.0f);
    ck_assert(fd.interp64 == 9.0);

    /* f64 keeps what f32 rounds away */
    flex_mod *m = compile_score("score + 1e-8", NULL, 0);
    ir_value scratch[16], r;
    double scratch64[16], r64;
    ck_assert_int_eq(mod_eval_point(&m->ir, NULL, 1.0f, 0, 0, 0, 0, scratch, &r, NULL), 0);
    ck_assert(r.f == 1.0f);
    ck_assert_int_eq(mod_eval_point_f64(&m->ir, NULL, 1.0, 0, 0, 0, 0, scratch64, &r64, NULL), 0);
    ck_assert(r64 > 1.0 && r64 < 1.0 + 2e-8);
    flex_mod_destroy(m);
}
END_TEST

/* f64 and f32 agree exactly on integer arithmetic. */
START_TEST(test_f64_agrees_on_ints) {
    static const char *const texts[] = {
        ("let qx = q // 5; let kx = kv // 5; let cx = clamp(qx, 1, 6);\n"
         "abs(cx - kx) <= 1 && (q % 3 == kv % 3 || ((q ^ kv) & 1) == 0)"),
        "q * 65537 + kv * 40503 > h * 100000 - b",
        "max(q, kv) % 7 >= min(q, kv) // 3 || ~q == kv",
        "int(float(q) / 3.0) == kv // 2",
    };
    for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
        flex_mod_desc d = {FLEX_MOD_MASK, texts[t], NULL, 0, NULL, 0};
        flex_mod *m = NULL;
        ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_OK);
        ir_value scratch[128], r;
        double scratch64[128], r64;
        int trues = 0;
        for (int q = -40; q <= 40; q++) {
            for (int kv = -40; kv <= 40; kv++) {
                ck_assert_int_eq(mod_eval_point(&m->ir, NULL, 0, 1, 2, q, kv, scratch, &r, NULL),
                                 0);
                ck_assert_int_eq(
                    mod_eval_point_f64(&m->ir, NULL, 0, 1, 2, q, kv, scratch64, &r64, NULL), 0);
                ck_assert_msg((double)r.i == r64, "'%s' at q=%d kv=%d: %d vs %g", texts[t], q, kv,
                              (int)r.i, r64);
                for (int i = 0; i < m->ir.num_nodes; i++) {
                    if (m->ir.nodes[i].type == IR_FLOAT) continue;
                    ck_assert((double)scratch[i].i == scratch64[i]);
                }
                trues += r.i;
            }
        }
        /* the cases are neither always true nor always false */
        ck_assert_int_gt(trues, 0);
        ck_assert_int_lt(trues, 81 * 81);
        flex_mod_destroy(m);
    }
}
END_TEST

/* ---- folding: structure ---- */

static const struct {
    flex_mod_kind kind;
    const char *text, *canonical;
} folds[] = {
    {FLEX_MOD_SCORE, "score * 1.0", "score"},
    {FLEX_MOD_SCORE, "1 * score", "score"},
    {FLEX_MOD_SCORE, "score / 1.0", "score"},
    {FLEX_MOD_SCORE, "score - 0.0", "score"},
    {FLEX_MOD_SCORE, "score + -0.0", "score"},
    {FLEX_MOD_SCORE, "score + 0.0", "score + 0.0"},
    {FLEX_MOD_SCORE, "score * 0.0", "score * 0.0"},
    {FLEX_MOD_SCORE, "0.0 * score", "0.0 * score"},
    {FLEX_MOD_SCORE, "score - score", "score - score"},
    {FLEX_MOD_SCORE, "score + 1.0 + 2.0", "score + 1.0 + 2.0"},
    {FLEX_MOD_SCORE, "-(-score)", "score"},
    {FLEX_MOD_SCORE, "score + 2.0 * 3.0 - exp2(3)", "score + 6.0 - 8.0"},
    {FLEX_MOD_SCORE, "where(true, score, -inf)", "score"},
    {FLEX_MOD_SCORE, "where(q > kv, score, score)", "score"},
    {FLEX_MOD_SCORE, "where(!(q > kv), score, -inf)", "where(q > kv, -inf, score)"},
    {FLEX_MOD_MASK, "q + 0 >= kv * 1 - 0", "q >= kv"},
    {FLEX_MOD_MASK, "0 + q >= 1 * kv // 1", "q >= kv"},
    {FLEX_MOD_MASK, "q - q == 0 || kv > 3", "true"},
    {FLEX_MOD_MASK, "q * 0 == 0 && h >= 0", "h >= 0"},
    {FLEX_MOD_MASK, "q % 1 == 0 && h >= 0", "h >= 0"},
    {FLEX_MOD_MASK, "true && q >= kv", "q >= kv"},
    {FLEX_MOD_MASK, "q >= kv && true", "q >= kv"},
    {FLEX_MOD_MASK, "false || q >= kv", "q >= kv"},
    {FLEX_MOD_MASK, "q >= kv && false", "false"},
    {FLEX_MOD_MASK, "q >= kv || true", "true"},
    {FLEX_MOD_MASK, "!!(q >= kv)", "q >= kv"},
    {FLEX_MOD_MASK, "q >= kv ? true : false", "q >= kv"},
    {FLEX_MOD_MASK, "q >= kv ? false : true", "!(q >= kv)"},
    {FLEX_MOD_MASK, "(q < kv) ^ true", "!(q < kv)"},
    {FLEX_MOD_MASK, "(q < kv) ^ false", "q < kv"},
    {FLEX_MOD_MASK, "q >= kv && q >= kv", "q >= kv"},
    {FLEX_MOD_MASK, "q == q && kv <= kv && !(q < q)", "true"},
    {FLEX_MOD_MASK, "where(1 > 0, q, kv) >= 0", "q >= 0"},
    {FLEX_MOD_MASK, "where(q > 3, kv, kv) >= 2", "kv >= 2"},
    {FLEX_MOD_MASK, "-(-q) >= ~~kv", "q >= kv"},
    {FLEX_MOD_MASK, "min(q, q) >= max(kv, kv)", "q >= kv"},
    {FLEX_MOD_MASK, "(q & -1 | 0 ^ 0) >= kv", "q >= kv"},
    {FLEX_MOD_MASK, "(q & 0) == 0 && (kv | -1) == -1", "true"},
    {FLEX_MOD_MASK, "abs(abs(q - kv)) <= 3", "abs(q - kv) <= 3"},
    {FLEX_MOD_MASK, "2147483647 + 1 == -2147483648", "true"},
    {FLEX_MOD_MASK, "q - kv <= 3 * 4 + 1", "q - kv <= 13"},
    {FLEX_MOD_MASK, "score_is_absent_here == 0 || true", ""},
};

START_TEST(test_folding) {
    for (size_t i = 0; i < sizeof folds / sizeof folds[0]; i++) {
        flex_mod_desc d = {folds[i].kind, folds[i].text, NULL, 0, NULL, 0};
        flex_mod *m = NULL;
        flex_status st = flex_mod_compile(NULL, &d, &m);
        if (folds[i].canonical[0] == '\0') {
            /* names are checked before anything folds away */
            ck_assert_int_eq(st, FLEX_ERR_MOD_NAME);
            continue;
        }
        ck_assert_msg(st == FLEX_OK, "'%s': %s", folds[i].text, flex_error_message(NULL));
        ck_assert_msg(strcmp(m->canonical, folds[i].canonical) == 0,
                      "'%s' folded to '%s', expected '%s'", folds[i].text, m->canonical,
                      folds[i].canonical);
        /* ir_fold is idempotent */
        char *before = strdup(m->canonical);
        ck_assert_int_eq(ir_fold(&m->ir), 0);
        char *after = ir_canonical_text(&m->ir);
        ck_assert_str_eq(after, before);
        free(before);
        free(after);
        flex_mod_destroy(m);
    }
}
END_TEST

/* ---- ir_apply directly ---- */

START_TEST(test_ir_apply) {
    ir_node n;
    memset(&n, 0, sizeof n);
    n.buffer = -1;
    ir_value a[3];
    /* int ops */
    n.type = IR_INT;
    n.nargs = 2;
    n.imm.i = IR_INT;
    n.op = IR_FLOORDIV;
    a[0].i = INT32_MIN;
    a[1].i = -1;
    ck_assert_int_eq(ir_apply(&n, a).i, INT32_MIN);
    n.op = IR_MOD;
    ck_assert_int_eq(ir_apply(&n, a).i, 0);
    n.op = IR_MUL;
    ck_assert_int_eq(ir_apply(&n, a).i, INT32_MIN);
    n.op = IR_SUB;
    a[0].i = INT32_MIN;
    a[1].i = 1;
    ck_assert_int_eq(ir_apply(&n, a).i, INT32_MAX);
    /* comparisons read the operand type */
    n.type = IR_BOOL;
    n.op = IR_LT;
    n.imm.i = IR_FLOAT;
    a[0].f = -1.0f;
    a[1].f = 0.5f;
    ck_assert_int_eq(ir_apply(&n, a).i, 1);
    n.imm.i = IR_INT;
    a[0].i = 3;
    a[1].i = -3;
    ck_assert_int_eq(ir_apply(&n, a).i, 0);
    /* to_int from float and from bool */
    n.op = IR_TO_INT;
    n.type = IR_INT;
    n.nargs = 1;
    n.imm.i = IR_FLOAT;
    a[0].f = -1e10f;
    ck_assert_int_eq(ir_apply(&n, a).i, INT32_MIN);
    a[0].f = 2147483520.0f; /* the largest float below 2^31 */
    ck_assert_int_eq(ir_apply(&n, a).i, 2147483520);
    n.imm.i = IR_BOOL;
    a[0].i = 1;
    ck_assert_int_eq(ir_apply(&n, a).i, 1);
    /* to_float from int */
    n.op = IR_TO_FLOAT;
    n.type = IR_FLOAT;
    n.imm.i = IR_INT;
    a[0].i = -16777217;
    ck_assert(ir_apply(&n, a).f == -16777216.0f);
    /* select */
    n.op = IR_SELECT;
    n.nargs = 3;
    n.type = IR_FLOAT;
    n.imm.i = IR_BOOL;
    a[0].i = 0;
    a[1].f = 1.0f;
    a[2].f = 2.0f;
    ck_assert(ir_apply(&n, a).f == 2.0f);
    /* constants */
    n.op = IR_CONST;
    n.nargs = 0;
    n.imm.f = 4.5f;
    ck_assert(ir_apply(&n, a).f == 4.5f);
    /* names and arities */
    ck_assert_str_eq(ir_op_name(IR_SELECT), "select");
    ck_assert_int_eq(ir_op_arity(IR_SELECT), 3);
    ck_assert_int_eq(ir_op_arity(IR_LOAD), -1);
    ck_assert_int_eq(ir_op_arity(IR_ADD), 2);
    ck_assert_int_eq(ir_op_arity(IR_TANH), 1);
    for (int op = 0; op < IR_OP_COUNT; op++)
        ck_assert_ptr_nonnull(ir_op_name((ir_op)op));
}
END_TEST

START_TEST(test_ir_building) {
    ir_mod m;
    ir_init(&m, FLEX_MOD_MASK);
    int q = ir_leaf(&m, IR_Q), kv = ir_leaf(&m, IR_KV);
    int ge = ir_binary(&m, IR_GE, IR_BOOL, q, kv);
    ck_assert_int_eq(ir_binary(&m, IR_GE, IR_BOOL, q, kv), ge);
    ck_assert_int_ne(ir_binary(&m, IR_GE, IR_BOOL, kv, q), ge);
    ck_assert_int_eq(ir_const_float(&m, 0.0f), ir_const_float(&m, 0.0f));
    ck_assert_int_ne(ir_const_float(&m, 0.0f), ir_const_float(&m, -0.0f));
    ck_assert_int_ne(ir_const_int(&m, 1), ir_const_bool(&m, 1));
    ck_assert_int_eq(ir_binary(&m, IR_ADD, IR_INT, q, 999), -1);
    int dead = ir_binary(&m, IR_ADD, IR_INT, q, ir_const_int(&m, 5));
    ck_assert_int_ge(dead, 0);
    m.root = ge;
    uint8_t deps[16];
    ir_dependencies(&m, deps);
    ck_assert_int_eq(deps[ge], IR_DEP_Q | IR_DEP_KV);
    ck_assert_int_eq(deps[dead], IR_DEP_Q);
    ir_mod copy;
    ck_assert_int_eq(ir_copy(&copy, &m), 0);
    ck_assert_int_eq(ir_compact(&m), 0);
    ck_assert_int_eq(m.num_nodes, 3);
    ck_assert_int_eq(m.root, 2);
    /* the cons table still works after compaction, and in the copy */
    ck_assert_int_eq(ir_binary(&m, IR_GE, IR_BOOL, 0, 1), m.root);
    ck_assert_int_eq(ir_binary(&copy, IR_GE, IR_BOOL, q, kv), ge);
    ck_assert_int_eq(copy.num_nodes, 10);
    /* a node limit, not unbounded growth */
    int last = 0;
    for (int i = 0; i < IR_MAX_NODES + 10 && last >= 0; i++)
        last = ir_const_int(&copy, i + 100);
    ck_assert_int_eq(last, -1);
    ck_assert_int_eq(copy.num_nodes, IR_MAX_NODES);
    ir_free(&copy);
    ir_free(&m);
    ck_assert_int_eq(ir_type_of_dtype(FLEX_I64), IR_INT);
    ck_assert_int_eq(ir_type_of_dtype(FLEX_U8), IR_INT);
    ck_assert_int_eq(ir_type_of_dtype(FLEX_BOOL), IR_BOOL);
    ck_assert_int_eq(ir_type_of_dtype(FLEX_BF16), IR_FLOAT);
}
END_TEST

/* ---- buffers ---- */

static mod_buffer_view view1(const void *data, flex_dtype dtype, int64_t n) {
    mod_buffer_view v;
    memset(&v, 0, sizeof v);
    v.data = data;
    v.dtype = dtype;
    v.ndim = 1;
    v.sizes[0] = n;
    v.strides[0] = 1;
    return v;
}

START_TEST(test_buffer_reads) {
    const float f32[2] = {1.5f, -2.25f};
    const uint16_t f16[4] = {0x3E00, 0xC000, 0x7C00, 0x0001};
    const uint16_t bf16[3] = {0x3FC0, 0xC010, 0xFF80};
    const int32_t i32[2] = {-5, INT32_MAX};
    const int64_t i64[3] = {0x100000005LL, -3, INT64_MAX};
    const uint8_t u8[2] = {200, 0};
    const uint8_t boolean[3] = {2, 0, 1};
    ir_value v;
    mod_buffer_view w;
    int32_t idx[4] = {0};

    w = view1(f32, FLEX_F32, 2);
    idx[0] = 1;
    ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
    ck_assert(v.f == -2.25f);

    w = view1(f16, FLEX_F16, 4);
    static const float f16_expect[4] = {1.5f, -2.0f, INFINITY, 5.9604645e-8f};
    for (int i = 0; i < 4; i++) {
        idx[0] = i;
        ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
        ck_assert_msg(v.f == f16_expect[i], "f16[%d] = %g", i, (double)v.f);
    }
    w = view1(bf16, FLEX_BF16, 3);
    static const float bf16_expect[3] = {1.5f, -2.25f, -INFINITY};
    for (int i = 0; i < 3; i++) {
        idx[0] = i;
        ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
        ck_assert(v.f == bf16_expect[i]);
    }
    w = view1(i32, FLEX_I32, 2);
    idx[0] = 0;
    ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
    ck_assert_int_eq(v.i, -5);
    w = view1(i64, FLEX_I64, 3);
    static const int32_t i64_expect[3] = {5, -3, -1}; /* the low 32 bits */
    for (int i = 0; i < 3; i++) {
        idx[0] = i;
        ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
        ck_assert_int_eq(v.i, i64_expect[i]);
    }
    w = view1(u8, FLEX_U8, 2);
    idx[0] = 0;
    ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
    ck_assert_int_eq(v.i, 200);
    w = view1(boolean, FLEX_BOOL, 3);
    static const int32_t bool_expect[3] = {1, 0, 1};
    for (int i = 0; i < 3; i++) {
        idx[0] = i;
        ck_assert_int_eq(mod_buffer_read(&w, 0, idx, &v, NULL), 0);
        ck_assert_int_eq(v.i, bool_expect[i]);
    }
    /* the shared converters agree with the reads */
    ck_assert_uint_eq(flex_float_to_f16(1.5f), 0x3E00);
    ck_assert_uint_eq(flex_float_to_bf16(-2.25f), 0xC010);

    /* strided 2-D: column-major 3 x 4 */
    int32_t cm[12];
    for (int i = 0; i < 12; i++)
        cm[i] = i;
    mod_buffer_view m2;
    memset(&m2, 0, sizeof m2);
    m2.data = cm;
    m2.dtype = FLEX_I32;
    m2.ndim = 2;
    m2.sizes[0] = 3;
    m2.sizes[1] = 4;
    m2.strides[0] = 1;
    m2.strides[1] = 3;
    idx[0] = 2;
    idx[1] = 3;
    ck_assert_int_eq(mod_buffer_read(&m2, 0, idx, &v, NULL), 0);
    ck_assert_int_eq(v.i, 2 + 3 * 3);

    /* out of range: -1 and the first error kept */
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    idx[0] = 3;
    idx[1] = 0;
    ck_assert_int_eq(mod_buffer_read(&m2, 5, idx, &v, &err), -1);
    ck_assert_int_eq(err.set, 1);
    ck_assert_int_eq(err.buffer, 5);
    ck_assert_int_eq(err.dim, 0);
    ck_assert_int_eq(err.index, 3);
    ck_assert_int_eq(err.size, 3);
    idx[0] = 0;
    idx[1] = -1;
    ck_assert_int_eq(mod_buffer_read(&m2, 6, idx, &v, &err), -1);
    ck_assert_int_eq(err.buffer, 5);
    ck_assert_int_eq(err.index, 3);
    ck_assert_int_eq(mod_buffer_read(&m2, 6, idx, &v, NULL), -1);
}
END_TEST

START_TEST(test_buffers_in_mods) {
    const flex_buffer_decl decls[] = {
        {"f", FLEX_F32, 1}, {"hf", FLEX_F16, 1}, {"bf", FLEX_BF16, 1}, {"i", FLEX_I32, 1},
        {"l", FLEX_I64, 1}, {"u", FLEX_U8, 1},   {"k", FLEX_BOOL, 1},  {"grid", FLEX_I32, 2},
    };
    const float f[3] = {0.5f, 1.5f, 2.5f};
    const uint16_t hf[3] = {0x3C00, 0x4000, 0x4200}; /* 1, 2, 3 */
    const uint16_t bf[3] = {0x3F80, 0x4000, 0x4040}; /* 1, 2, 3 */
    const int32_t i[3] = {10, 20, 30};
    const int64_t l[3] = {-1, -2, 0x100000003LL};
    const uint8_t u[3] = {255, 1, 2};
    const uint8_t k[3] = {1, 0, 7};
    int32_t grid[3][2] = {{0, 1}, {2, 3}, {4, 5}};
    flex_mod_desc d = {FLEX_MOD_SCORE,
                       "let row = grid[kv];\n"
                       "where(k[q], f[q] + hf[q] + bf[q], score) + float(i[q] + l[q] + u[q]) "
                       "+ float(row[0] * 100 + row[1])",
                       NULL,
                       0,
                       decls,
                       8};
    flex_mod *m = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_OK);
    int64_t n3 = 3;
    struct {
        const char *name;
        const void *data;
        flex_dtype dtype;
    } binds[] = {{"f", f, FLEX_F32}, {"hf", hf, FLEX_F16}, {"bf", bf, FLEX_BF16},
                 {"i", i, FLEX_I32}, {"l", l, FLEX_I64},   {"u", u, FLEX_U8},
                 {"k", k, FLEX_BOOL}};
    for (size_t b = 0; b < sizeof binds / sizeof binds[0]; b++) {
        flex_tensor t =
            flex_tensor_contiguous((void *)binds[b].data, binds[b].dtype, 1, &n3, FLEX_DEVICE_CPU);
        ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, binds[b].name, &t), FLEX_OK);
    }
    int64_t gs[2] = {3, 2};
    flex_tensor gt = flex_tensor_contiguous(grid, FLEX_I32, 2, gs, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "grid", &gt), FLEX_OK);
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    ck_assert_int_eq(flex_mod_host_views(NULL, m, views, copies), FLEX_OK);
    ir_value scratch[64], r;
    double scratch64[64], r64;
    static const double expect[3][3] = {
        /* q = 0: k true: 0.5 + 1 + 1; ints 10 - 1 + 255 */
        {2.5 + 264, 0, 0},
        /* q = 1: k false: score (-7); ints 20 - 2 + 1 */
        {-7.0 + 19, 0, 0},
        /* q = 2: k true: 2.5 + 3 + 3; ints 30 + 3 + 2 */
        {8.5 + 35, 0, 0},
    };
    for (int q = 0; q < 3; q++) {
        for (int kv = 0; kv < 3; kv++) {
            double want = expect[q][0] + grid[kv][0] * 100 + grid[kv][1];
            mod_bounds_error err = {0};
            ck_assert_int_eq(mod_eval_point(&m->ir, views, -7.0f, 0, 0, q, kv, scratch, &r, &err),
                             0);
            ck_assert_msg(r.f == (float)want, "q=%d kv=%d: %g, expected %g", q, kv, (double)r.f,
                          want);
            ck_assert_int_eq(
                mod_eval_point_f64(&m->ir, views, -7.0, 0, 0, q, kv, scratch64, &r64, &err), 0);
            ck_assert(r64 == want);
        }
    }
    /* a read out of range reports the buffer, the index and the point */
    mod_bounds_error err = {0};
    ck_assert_int_eq(mod_eval_point(&m->ir, views, 0.0f, 1, 2, 3, 0, scratch, &r, &err), -1);
    ck_assert_int_eq(err.set, 1);
    ck_assert_int_eq(err.index, 3);
    ck_assert_int_eq(err.size, 3);
    ck_assert_int_eq(err.q, 3);
    ck_assert_int_eq(err.h, 2);
    ck_assert_int_eq(err.b, 1);
    char msg[256];
    mod_bounds_error_format(&m->ir, &err, msg, sizeof msg);
    ck_assert_ptr_nonnull(strstr(msg, "index 3"));
    ck_assert_ptr_nonnull(strstr(msg, "size is 3"));
    ck_assert_ptr_nonnull(strstr(msg, "q=3"));
    ck_assert_ptr_nonnull(strstr(msg, m->ir.buffers[err.buffer].name));
    memset(&err, 0, sizeof err);
    ck_assert_int_eq(mod_eval_point_f64(&m->ir, views, 0.0, 0, 0, 0, -1, scratch64, &r64, &err),
                     -1);
    ck_assert_int_eq(err.kv, -1);
    ck_assert_str_eq(m->ir.buffers[err.buffer].name, "grid");
    ck_assert_int_eq(err.dim, 0);
    mod_bounds_error_format(&m->ir, &err, msg, sizeof msg);
    ck_assert_ptr_nonnull(strstr(msg, "'grid'"));
    ck_assert_ptr_nonnull(strstr(msg, "dimension 0"));
    flex_mod_release_host_views(copies);
    flex_mod_destroy(m);
}
END_TEST

/* ---- random expressions: folding == interpreting, f64 == f32 on ints,
 * and canonical text that parses back to the same mod ---- */

static uint32_t rng_state;

static uint32_t rng(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

static int pick(int n) {
    return (int)(rng() % (uint32_t)n);
}

typedef struct gen {
    char *buf;
    size_t len, cap;
    int uses_float; /* a float value takes part */
} gen;

static void put(gen *g, const char *text) {
    size_t n = strlen(text);
    ck_assert_uint_lt(g->len + n, g->cap);
    memcpy(g->buf + g->len, text, n + 1);
    g->len += n;
}

static void gen_expr(gen *g, ir_type type, int depth);

static void gen_binary(gen *g, ir_type type, const char *op, ir_type operands, int depth) {
    put(g, "(");
    gen_expr(g, operands, depth - 1);
    put(g, op);
    gen_expr(g, operands, depth - 1);
    put(g, ")");
    (void)type;
}

static void gen_call(gen *g, const char *name, ir_type t1, int nargs, int depth) {
    put(g, name);
    put(g, "(");
    for (int i = 0; i < nargs; i++) {
        if (i) put(g, ", ");
        gen_expr(g, t1, depth - 1);
    }
    put(g, ")");
}

static void gen_expr(gen *g, ir_type type, int depth) {
    if (type == IR_FLOAT) g->uses_float = 1;
    if (depth <= 0 || pick(5) == 0) {
        static const char *const ints[] = {"x", "y",  "x", "y",  "0",
                                           "1", "-1", "3", "-7", "2147483647"};
        static const char *const floats[] = {"s",   "s",    "0.5", "-0.0",    "0.0",
                                             "1.0", "-2.5", "inf", "float(x)"};
        static const char *const bools[] = {"true", "false", "(x < y)", "(s >= 0.0)"};
        if (type == IR_INT)
            put(g, ints[pick(10)]);
        else if (type == IR_FLOAT)
            put(g, floats[pick(9)]);
        else
            put(g, bools[pick(4)]);
        if (type == IR_BOOL) g->uses_float = 1; /* (s >= 0.0) may appear */
        return;
    }
    if (type == IR_INT) {
        static const char *const ops[] = {" + ", " - ", " * ", " // ", " % ",
                                          " & ", " | ", " ^ ", " / "};
        switch (pick(12)) {
        case 0:
            put(g, "-");
            gen_expr(g, IR_INT, depth - 1);
            return;
        case 1:
            put(g, "~");
            gen_expr(g, IR_INT, depth - 1);
            return;
        case 2:
            gen_call(g, pick(2) ? "min" : "max", IR_INT, 2, depth);
            return;
        case 3:
            gen_call(g, "abs", IR_INT, 1, depth);
            return;
        case 4:
            gen_call(g, "clamp", IR_INT, 3, depth);
            return;
        case 5:
            put(g, "where(");
            gen_expr(g, IR_BOOL, depth - 1);
            put(g, ", ");
            gen_expr(g, IR_INT, depth - 1);
            put(g, ", ");
            gen_expr(g, IR_INT, depth - 1);
            put(g, ")");
            return;
        case 6:
            g->uses_float = 1;
            gen_call(g, "int", IR_FLOAT, 1, depth);
            return;
        default:
            gen_binary(g, type, ops[pick(9)], IR_INT, depth);
            return;
        }
    }
    if (type == IR_FLOAT) {
        static const char *const ops[] = {" + ", " - ", " * ", " / ", " // ", " % "};
        static const char *const fns[] = {"exp", "tanh",  "sigmoid", "sqrt", "log",
                                          "abs", "floor", "ceil",    "exp2", "sin"};
        switch (pick(8)) {
        case 0:
            put(g, "-");
            gen_expr(g, IR_FLOAT, depth - 1);
            return;
        case 1:
            gen_call(g, fns[pick(10)], IR_FLOAT, 1, depth);
            return;
        case 2:
            gen_call(g, pick(3) ? (pick(2) ? "min" : "max") : "pow", IR_FLOAT, 2, depth);
            return;
        case 3:
            put(g, "(");
            gen_expr(g, IR_BOOL, depth - 1);
            put(g, " ? ");
            gen_expr(g, IR_FLOAT, depth - 1);
            put(g, " : ");
            gen_expr(g, pick(2) ? IR_INT : IR_FLOAT, depth - 1);
            put(g, ")");
            return;
        case 4:
            put(g, "float(");
            gen_expr(g, IR_INT, depth - 1);
            put(g, ")");
            return;
        default:
            gen_binary(g, type, ops[pick(6)], IR_FLOAT, depth);
            return;
        }
    }
    static const char *const cmps[] = {" == ", " != ", " < ", " <= ", " > ", " >= "};
    static const char *const logic[] = {" && ", " || ", " & ", " | ", " ^ "};
    switch (pick(5)) {
    case 0:
        put(g, "!");
        gen_expr(g, IR_BOOL, depth - 1);
        return;
    case 1:
        gen_binary(g, type, logic[pick(5)], IR_BOOL, depth);
        return;
    case 2:
        gen_binary(g, type, cmps[pick(6)], IR_FLOAT, depth);
        return;
    default:
        gen_binary(g, type, cmps[pick(6)], IR_INT, depth);
        return;
    }
}

START_TEST(test_random_expressions) {
    rng_state = 12345;
    static const int32_t xs[] = {0, 1, -1, 5, -7, 13, INT32_MAX, INT32_MIN, 46341};
    static const float ss[] = {0.0f, -0.0f, 1.0f, -2.5f, 7.25f, 1e30f, INFINITY, NAN};
    char text[4096], with_lets[4200];
    int folded_consts = 0;
    for (int iter = 0; iter < 1500; iter++) {
        gen g = {text, 0, sizeof text, 0};
        ir_type type = (ir_type)pick(3);
        if (type == IR_INT) put(&g, "float(");
        if (type == IR_BOOL) put(&g, "where(");
        gen_expr(&g, type, 4);
        if (type == IR_INT) put(&g, ")");
        if (type == IR_BOOL) put(&g, ", 1.0, 0.0)");
        int32_t x = xs[pick(9)], y = xs[pick(9)];
        float sv = ss[pick(8)];

        results r = evaluate(text, x, y, sv);
        folded_consts++;
        ck_assert_msg(same_float(r.folded, r.interp),
                      "'%s' at x=%d y=%d s=%g: folded %a, interpreted %a", text, (int)x, (int)y,
                      (double)sv, (double)r.folded, (double)r.interp);
        if (!g.uses_float)
            ck_assert_msg(same_float((float)r.interp64, r.interp), "'%s': f64 %.17g vs f32 %a",
                          text, r.interp64, (double)r.interp);

        /* the canonical text of the variable version parses back to itself */
        snprintf(with_lets, sizeof with_lets, "let x = q; let y = kv; let s = score;\n%s", text);
        flex_mod *m = compile_score(with_lets, NULL, 0);
        flex_mod *again = compile_score(m->canonical, NULL, 0);
        ck_assert_msg(strcmp(again->canonical, m->canonical) == 0, "'%s':\n%s\nvs\n%s", text,
                      m->canonical, again->canonical);
        ck_assert_uint_eq(again->hash, m->hash);
        /* and computes the same */
        ir_value scratch[1024], a, b;
        ck_assert_int_le(m->ir.num_nodes, 1024);
        ck_assert_int_eq(mod_eval_point(&m->ir, NULL, sv, 0, 0, x, y, scratch, &a, NULL), 0);
        ck_assert_int_eq(mod_eval_point(&again->ir, NULL, sv, 0, 0, x, y, scratch, &b, NULL), 0);
        ck_assert(same_float(a.f, b.f));
        flex_mod_destroy(again);
        flex_mod_destroy(m);
    }
    ck_assert_int_eq(folded_consts, 1500);
}
END_TEST

static Suite *mod_eval_suite(void) {
    Suite *s = suite_create("mod_eval");
    TCase *tc = tcase_create("eval");
    tcase_add_test(tc, test_truths);
    tcase_add_test(tc, test_values);
    tcase_add_test(tc, test_f64_precision);
    tcase_add_test(tc, test_f64_agrees_on_ints);
    tcase_add_test(tc, test_folding);
    tcase_add_test(tc, test_ir_apply);
    tcase_add_test(tc, test_ir_building);
    tcase_add_test(tc, test_buffer_reads);
    tcase_add_test(tc, test_buffers_in_mods);
    tcase_add_test(tc, test_random_expressions);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(mod_eval_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
