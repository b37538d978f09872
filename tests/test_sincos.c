/*
 * The inline sin and cos of the GPU mods (core/mod/sincos.h), compiled here
 * as host C with the same float operations and fused multiply-adds the
 * device runs, against the C library's double-precision sin and cos: at
 * most 1.55 ulp (an exhaustive pass over every float up to
 * FLEX_SINCOS_NEAR, FLEXATTN_SINCOS_ALL=1, measured 1.541 for sin and 1.537
 * for cos), on a sample of the range, on the floats nearest the multiples
 * of pi/2 (where the reduction cancels most), and the special values. Also
 * which path the emitter picks for which argument.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/emit.h"
#include "mod/parse.h"
#include "mod/sincos.h"

#define MAX_ULPS 1.55

static float float_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* |got - want| in units of the last place of want rounded to float. */
static double ulps(float got, double want) {
    const float w = (float)fabs(want);
    double unit = 0x1p-149;
    if (w >= 0x1p-126f) {
        int e;
        frexpf(w, &e);
        unit = ldexp(1.0, e - 24);
    }
    return fabs((double)got - want) / unit;
}

typedef struct worst {
    double sin_ulps, cos_ulps;
    float sin_at, cos_at;
} worst;

static void measure(float x, worst *w) {
    const double es = ulps(flex_sincos_near(x, 0), sin((double)x));
    const double ec = ulps(flex_sincos_near(x, 1), cos((double)x));
    if (es > w->sin_ulps) w->sin_ulps = es, w->sin_at = x;
    if (ec > w->cos_ulps) w->cos_ulps = ec, w->cos_at = x;
}

static void check_worst(const worst *w, const char *what) {
    printf("%s: sin %.3f ulp at %a, cos %.3f ulp at %a\n", what, w->sin_ulps, (double)w->sin_at,
           w->cos_ulps, (double)w->cos_at);
    ck_assert_msg(w->sin_ulps <= MAX_ULPS, "%s: sin is %.3f ulp off at %a", what, w->sin_ulps,
                  (double)w->sin_at);
    ck_assert_msg(w->cos_ulps <= MAX_ULPS, "%s: cos is %.3f ulp off at %a", what, w->cos_ulps,
                  (double)w->cos_at);
}

/* Every 61st float from 0 to FLEX_SINCOS_NEAR, both signs (every float
 * with FLEXATTN_SINCOS_ALL=1: about a minute). */
START_TEST(test_range) {
    const char *all = getenv("FLEXATTN_SINCOS_ALL");
    const uint32_t step = all && strcmp(all, "1") == 0 ? 1 : 61;
    const uint32_t last = bits_of(FLEX_SINCOS_NEAR);
    worst w = {0};
    for (uint64_t u = 0; u <= last; u += step) {
        const float x = float_of((uint32_t)u);
        measure(x, &w);
        measure(-x, &w);
    }
    check_worst(&w, step == 1 ? "every float" : "every 61st float");
}
END_TEST

/* The float nearest each multiple k pi/2 within the range and its two
 * neighbours: the remainders there are the smallest, so the three-step
 * reduction's error weighs most. */
START_TEST(test_near_multiples_of_half_pi) {
    worst w = {0};
    const double half_pi = 1.57079632679489661923;
    for (int k = 1; k * half_pi <= FLEX_SINCOS_NEAR; k++) {
        const float x = (float)(k * half_pi);
        const float xs[3] = {nextafterf(x, 0.0f), x, nextafterf(x, INFINITY)};
        for (int i = 0; i < 3; i++)
            if (xs[i] <= FLEX_SINCOS_NEAR) {
                measure(xs[i], &w);
                measure(-xs[i], &w);
            }
    }
    check_worst(&w, "floats nearest k pi/2");
}
END_TEST

START_TEST(test_special_values) {
    /* sin keeps the sign of a zero; cos of a zero is 1 */
    ck_assert_uint_eq(bits_of(flex_sincos_near(0.0f, 0)), bits_of(0.0f));
    ck_assert_uint_eq(bits_of(flex_sincos_near(-0.0f, 0)), bits_of(-0.0f));
    ck_assert(flex_sincos_near(0.0f, 1) == 1.0f && flex_sincos_near(-0.0f, 1) == 1.0f);
    /* sin x is x below 2^-12 and beyond, down to the subnormals */
    const float tiny[4] = {0x1p-13f, 0x1p-60f, 0x1p-126f, 0x1p-149f};
    for (int i = 0; i < 4; i++) {
        ck_assert_uint_eq(bits_of(flex_sincos_near(tiny[i], 0)), bits_of(tiny[i]));
        ck_assert_uint_eq(bits_of(flex_sincos_near(-tiny[i], 0)), bits_of(-tiny[i]));
        ck_assert(flex_sincos_near(tiny[i], 1) == 1.0f);
    }
    /* exact quarter turns of the sign: sin(-x) = -sin(x), cos(-x) = cos(x) */
    for (float x = 0.1f; x < 100.0f; x *= 1.7f) {
        ck_assert_uint_eq(bits_of(flex_sincos_near(-x, 0)), bits_of(-flex_sincos_near(x, 0)));
        ck_assert_uint_eq(bits_of(flex_sincos_near(-x, 1)), bits_of(flex_sincos_near(x, 1)));
    }
    /* the emitted functions send NaN and the infinities to the library, but
     * the inline path gives NaN for them too */
    ck_assert(isnan(flex_sincos_near(NAN, 0)) && isnan(flex_sincos_near(NAN, 1)));
    ck_assert(isnan(flex_sincos_near(INFINITY, 0)) && isnan(flex_sincos_near(-INFINITY, 1)));
}
END_TEST

/* The emitted score mod calls flex_sincos_near directly (no branch to the
 * far path) exactly where the argument is proved within FLEX_SINCOS_NEAR
 * for any indices and score. */
START_TEST(test_emitter_picks_the_path) {
    const struct {
        const char *text;
        const char *want, *not_want;
    } cases[] = {
        /* cos is in [-1, 1]; the cos of the score itself may be far */
        {"sin(cos(score))", "= flex_sincos_near(v", "= flex_sinf(v"},
        {"score + cos(tanh(score) * 3.0)", "= flex_sincos_near(v", "= flex_cosf(v"},
        {"score + sin(float(q % 1000) * 0.01)", "= flex_sincos_near(v", "= flex_sinf(v"},
        {"sin(score)", "= flex_sinf(v", "= flex_sincos_near(v"}, /* any float */
        {"score + cos(float(q - kv) * 0.001)", "= flex_cosf(v", "= flex_sincos_near(v"},
        {"score + sin(float(h))", "= flex_sinf(v", "= flex_sincos_near(v"}, /* up to 2^31 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const flex_mod_desc desc = {FLEX_MOD_SCORE, cases[i].text, NULL, 0, NULL, 0};
        ir_mod m;
        char err[256];
        ck_assert_int_eq(mod_parse(&desc, &m, err, sizeof err), FLEX_OK);
        char *src = flex_emit_mods(NULL, &m);
        ck_assert_ptr_nonnull(src);
        const char *body = strstr(src, "flex_score_mod(");
        ck_assert_ptr_nonnull(body);
        ck_assert_msg(strstr(body, cases[i].want) != NULL, "%s: no '%s' in\n%s", cases[i].text,
                      cases[i].want, body);
        ck_assert_msg(strstr(body, cases[i].not_want) == NULL, "%s: '%s' in\n%s", cases[i].text,
                      cases[i].not_want, body);
        free(src);
        ir_free(&m);
    }
}
END_TEST

int main(void) {
    Suite *suite = suite_create("sincos");
    TCase *tc = tcase_create("sincos");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_range);
    tcase_add_test(tc, test_near_multiples_of_half_pi);
    tcase_add_test(tc, test_special_values);
    tcase_add_test(tc, test_emitter_picks_the_path);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
