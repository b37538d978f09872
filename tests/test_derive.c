/*
 * The score-mod derivative (core/mod/derive.c): every derivative node is
 * checked against central finite differences of the f64 point interpreter,
 * and the rules at non-smooth points against their documented values.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/derive.h"
#include "mod/eval.h"
#include "mod/parse.h"
#include "mod/tile_multi.h"
#include "mod_random.h"

enum { NUM_HEADS = 3, BIAS_LEN = 16 };

/* Buffers every test mod may use: head_scale[h], bias[h][i], table[i]. */
static float head_scale[NUM_HEADS];
static float bias[NUM_HEADS * BIAS_LEN];
static float table[BIAS_LEN];

static const flex_buffer_decl decls[] = {
    {"head_scale", FLEX_F32, 1},
    {"bias", FLEX_F32, 2},
    {"table", FLEX_F32, 1},
};

static void fill_buffers(void) {
    /* Multiples of 1/64, so that x +- 1/1024 is exact in f32. */
    for (int i = 0; i < NUM_HEADS; i++)
        head_scale[i] = 0.5f + (float)i * 0.328125f;
    for (int i = 0; i < NUM_HEADS * BIAS_LEN; i++)
        bias[i] = (float)((i * 37) % 29 - 14) / 16.0f;
    for (int i = 0; i < BIAS_LEN; i++)
        table[i] = (float)((i * 11) % 13) / 8.0f - 0.75f;
}

static void make_views(mod_buffer_view *v) {
    memset(v, 0, 3 * sizeof *v);
    v[0] = (mod_buffer_view){head_scale, FLEX_F32, 1, {NUM_HEADS}, {1}};
    v[1] = (mod_buffer_view){bias, FLEX_F32, 2, {NUM_HEADS, BIAS_LEN}, {BIAS_LEN, 1}};
    v[2] = (mod_buffer_view){table, FLEX_F32, 1, {BIAS_LEN}, {1}};
}

static void compile(const char *text, flex_mod_kind kind, ir_mod *m) {
    flex_mod_desc desc = {.kind = kind, .text = text, .buffers = decls, .num_buffers = 3};
    char err[512];
    flex_status st = mod_parse(&desc, m, err, sizeof err);
    ck_assert_msg(st == FLEX_OK, "parse of '%s' failed: %s", text, err);
}

/* f(score) at a point, in f64, on the underived IR. */
static double value_at(const ir_mod *m, const mod_buffer_view *views, double score, int h, int q,
                       int kv) {
    double *scratch = malloc((size_t)m->num_nodes * sizeof *scratch);
    double r = NAN;
    mod_bounds_error e;
    memset(&e, 0, sizeof e);
    ck_assert_int_eq(mod_eval_point_f64(m, views, score, 0, h, q, kv, scratch, &r, &e), 0);
    free(scratch);
    return r;
}

/* Evaluates every node of the derived IR at a point; returns the scratch
 * (caller frees). */
static double *nodes_at(const ir_mod *m, const mod_buffer_view *views, double score, int h, int q,
                        int kv) {
    double *scratch = malloc((size_t)m->num_nodes * sizeof *scratch);
    double r;
    mod_bounds_error e;
    memset(&e, 0, sizeof e);
    ck_assert_int_eq(mod_eval_point_f64(m, views, score, 0, h, q, kv, scratch, &r, &e), 0);
    return scratch;
}

static float *buffer_data(int buffer) {
    return buffer == 0 ? head_scale : buffer == 1 ? bias : table;
}

static int64_t buffer_flat(int buffer, const double *scratch, const ir_node *load) {
    if (buffer == 1)
        return (int64_t)scratch[load->args[0]] * BIAS_LEN + (int64_t)scratch[load->args[1]];
    return (int64_t)scratch[load->args[0]];
}

static void check_close(double got, double want, double tol, const char *what, const char *text,
                        double score) {
    double err = fabs(got - want) / (fabs(want) > 1.0 ? fabs(want) : 1.0);
    ck_assert_msg(err <= tol, "%s of '%s' at score %.6f: derived %.10g, finite difference %.10g",
                  what, text, score, got, want);
}

/* Checks d/dscore and d/dload of `text` at a few points against central
 * differences. Points where the mod is not smooth (ties, branch switches)
 * are avoided by the choice of scores. */
static void check_mod(const char *text) {
    fill_buffers();
    mod_buffer_view views[3];
    make_views(views);
    ir_mod m, d;
    compile(text, FLEX_MOD_SCORE, &m);
    ck_assert_int_eq(ir_copy(&d, &m), 0);
    mod_derivative der;
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    ck_assert_int_eq(d.root, m.root);
    ck_assert_int_eq(der.value, m.root);

    static const double scores[] = {-2.3, -0.71, 0.37, 1.13, 2.9};
    static const int points[][3] = {{0, 5, 2}, {1, 3, 3}, {2, 7, 1}, {1, 2, 6}};
    const double h = 1e-5;
    for (size_t si = 0; si < sizeof scores / sizeof *scores; si++)
        for (size_t pi = 0; pi < sizeof points / sizeof *points; pi++) {
            double s = scores[si];
            int hh = points[pi][0], q = points[pi][1], kv = points[pi][2];
            double *sc = nodes_at(&d, views, s, hh, q, kv);
            double base = value_at(&m, views, s, hh, q, kv);
            ck_assert_msg(sc[der.value] == base || (isnan(base) && isnan(sc[der.value])),
                          "derived IR changed the value of '%s'", text);
            if (!isfinite(base)) {
                free(sc);
                continue;
            }
            double fd =
                (value_at(&m, views, s + h, hh, q, kv) - value_at(&m, views, s - h, hh, q, kv)) /
                (2 * h);
            check_close(sc[der.dscore], fd, 2e-5, "d/dscore", text, s);
            for (int l = 0; l < der.num_loads; l++) {
                const ir_node *load = &d.nodes[der.loads[l].load];
                float *data = buffer_data(der.loads[l].buffer);
                int64_t at = buffer_flat(der.loads[l].buffer, sc, load);
                float saved = data[at];
                const float step = 1.0f / 1024.0f;
                data[at] = saved + step;
                double up = value_at(&m, views, s, hh, q, kv);
                data[at] = saved - step;
                double down = value_at(&m, views, s, hh, q, kv);
                data[at] = saved;
                /* the mod may read the same element through several loads:
                 * sum the derived terms of loads that hit this element */
                double derived = 0.0;
                for (int l2 = 0; l2 < der.num_loads; l2++) {
                    const ir_node *o = &d.nodes[der.loads[l2].load];
                    if (der.loads[l2].buffer == der.loads[l].buffer &&
                        buffer_flat(der.loads[l2].buffer, sc, o) == at)
                        derived += sc[der.loads[l2].node];
                }
                check_close(derived, (up - down) / (2.0 * step), 1e-4, "d/dbuffer", text, s);
            }
            free(sc);
        }
    ir_free(&d);
    ir_free(&m);
}

static const char *const smooth_mods[] = {
    "score",
    "score * score",
    "sin(cos(score))",
    "30.0 * tanh(score / 30.0)",
    "exp(score) - exp2(score * 0.5)",
    "log(score * score + 1.0) + log2(abs(score) + 2.0)",
    "sqrt(score * score + 0.25) * rsqrt(score * score + 2.0)",
    "tan(score * 0.3) + sigmoid(score)",
    "tanh_approx(score * 0.7)",
    "pow(score, 3.0) + pow(2.0, score)",
    "pow(abs(score) + 0.5, score)",
    "score / (1.0 + score * score)",
    "min(score, 0.5 * score + 1.0) + max(score * score, 0.1)",
    "clamp(score, -1.5, 1.5)",
    "score % 1.7 + 2.5 % (abs(score) + 1.0)",
    "-score + abs(score - 0.2)",
    "where(q >= kv, score + (q - kv), -inf)",
    "score * head_scale[h]",
    "score + bias[h][q - kv + 8]",
    "score + head_scale[h] * (kv - q)",
    "let t = table[q + kv]; score * t + t * t",
    "score * float(q - kv) + floor(score) * 0.0 + 1.0",
    "let c = bias[h][q] > 0.0; c ? score * bias[h][kv] : score - bias[h][kv + 1]",
    "30.0 * tanh((score + bias[h][q]) / 30.0) * head_scale[h]",
    "max(score, head_scale[h]) + min(score * 0.5, table[kv])",
    "pow(head_scale[h], score) + sqrt(table[q] * table[q] + 1.0)",
};

START_TEST(test_smooth_mods_match_finite_differences) {
    check_mod(smooth_mods[_i]);
}
END_TEST

/* The derivative nodes of one mod at a single point (score, h=0, q, kv). */
static void rule_values(const char *text, double score, int q, int kv, double *dscore,
                        double *value) {
    fill_buffers();
    mod_buffer_view views[3];
    make_views(views);
    ir_mod d;
    compile(text, FLEX_MOD_SCORE, &d);
    mod_derivative der;
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    double *sc = nodes_at(&d, views, score, 0, q, kv);
    *dscore = sc[der.dscore];
    if (value) *value = sc[der.value];
    free(sc);
    ir_free(&d);
}

START_TEST(test_rules_at_non_smooth_points) {
    double g, v;
    rule_values("abs(score)", 0.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    rule_values("abs(score)", -2.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, -1.0);
    /* ties split the gradient evenly (torch.maximum / torch.minimum) */
    rule_values("max(score, 0.0)", 0.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.5);
    rule_values("min(score, 1.0)", 1.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.5);
    rule_values("max(score, score)", 0.7, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 1.0);
    /* clamp is min(max(..)): half the gradient exactly at a bound */
    rule_values("clamp(score, -1.0, 1.0)", 1.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.5);
    rule_values("clamp(score, -1.0, 1.0)", 3.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    /* step functions have derivative 0 */
    rule_values("floor(score) + ceil(score) + float(int(score))", 1.5, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    rule_values("score > 0.0 ? 1.0 : 2.0", 0.5, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    /* where passes the gradient through the chosen branch only */
    rule_values("where(q >= kv, score * 3.0, -inf)", 0.5, 2, 1, &g, NULL);
    ck_assert_double_eq(g, 3.0);
    rule_values("where(q >= kv, score * 3.0, -inf)", 0.5, 1, 2, &g, &v);
    ck_assert_double_eq(g, 0.0);
    ck_assert(v == -INFINITY);
    rule_values("where(q >= kv, score, log(score))", -1.0, 3, 1, &g, NULL);
    ck_assert_double_eq(g, 1.0);
    /* pow at 0: torch's masking */
    rule_values("pow(score, 2.0)", 0.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    rule_values("pow(0.0 * float(q), score)", 0.5, 1, 0, &g, NULL);
    ck_assert_double_eq(g, 0.0);
    /* float remainder: d/da = 1, d/db = -floor(a / b) */
    rule_values("score % 0.75", 2.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 1.0);
    rule_values("2.5 % score", 1.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, -2.0);
    /* tanh_approx differentiates like tanh */
    double gt;
    rule_values("tanh(score)", 0.3, 0, 0, &gt, NULL);
    rule_values("tanh_approx(score)", 0.3, 0, 0, &g, NULL);
    ck_assert_double_eq_tol(g, gt, 1e-12);
    /* the score's own derivative, and a mod that ignores the score */
    rule_values("score", 4.0, 0, 0, &g, NULL);
    ck_assert_double_eq(g, 1.0);
    rule_values("float(q - kv)", 4.0, 3, 1, &g, &v);
    ck_assert_double_eq(g, 0.0);
    ck_assert_double_eq(v, 2.0);
}
END_TEST

static int count_op(const ir_mod *m, ir_op op) {
    int n = 0;
    for (int i = 0; i < m->num_nodes; i++)
        n += m->nodes[i].op == op;
    return n;
}

START_TEST(test_derivative_shares_forward_nodes) {
    ir_mod m, d;
    compile("30.0 * tanh(score / 30.0)", FLEX_MOD_SCORE, &m);
    ck_assert_int_eq(ir_copy(&d, &m), 0);
    mod_derivative der;
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    /* 1 - t*t reuses the forward's tanh node instead of making another */
    ck_assert_int_eq(count_op(&d, IR_TANH), count_op(&m, IR_TANH));
    /* the forward's nodes keep their indices and the root is unchanged */
    ck_assert_int_ge(d.num_nodes, m.num_nodes);
    ck_assert_int_eq(memcmp(d.nodes, m.nodes, (size_t)m.num_nodes * sizeof *m.nodes), 0);
    ck_assert_int_eq(d.root, m.root);
    ck_assert_int_eq(der.num_loads, 0);
    /* topological order holds for the new nodes */
    for (int i = 0; i < d.num_nodes; i++)
        for (int a = 0; a < d.nodes[i].nargs; a++)
            ck_assert_int_lt(d.nodes[i].args[a], i);
    ir_free(&d);
    ir_free(&m);
}
END_TEST

START_TEST(test_identity_and_linear_mods_fold) {
    ir_mod d;
    mod_derivative der;
    /* score * head_scale[h]: d/dscore is the load itself, d/dload is score */
    compile("score * head_scale[h]", FLEX_MOD_SCORE, &d);
    int before = d.num_nodes;
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    ck_assert_int_eq(d.nodes[der.dscore].op, IR_LOAD);
    ck_assert_int_eq(der.num_loads, 1);
    ck_assert_int_eq(d.nodes[der.loads[0].node].op, IR_SCORE);
    ck_assert_int_eq(der.loads[0].buffer, 0);
    ck_assert_int_le(d.num_nodes, before + 1); /* at most the constant 1 */
    ir_free(&d);

    /* score + bias[..]: both derivatives are the constant 1 */
    compile("score + bias[h][q - kv + 8]", FLEX_MOD_SCORE, &d);
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    ck_assert_int_eq(d.nodes[der.dscore].op, IR_CONST);
    ck_assert(d.nodes[der.dscore].imm.f == 1.0f);
    ck_assert_int_eq(der.num_loads, 1);
    ck_assert_int_eq(d.nodes[der.loads[0].node].op, IR_CONST);
    ck_assert(d.nodes[der.loads[0].node].imm.f == 1.0f);
    ir_free(&d);

    /* a buffer used only in a condition is not differentiated */
    compile("bias[h][q] > 0.0 ? score : score * 2.0", FLEX_MOD_SCORE, &d);
    ck_assert_int_eq(mod_derive(&d, &der), 0);
    ck_assert_int_eq(der.num_loads, 0);
    ir_free(&d);
}
END_TEST

START_TEST(test_mask_mod_is_refused) {
    ir_mod d;
    mod_derivative der;
    compile("q >= kv", FLEX_MOD_MASK, &d);
    ck_assert_int_eq(mod_derive(&d, &der), MOD_DERIVE_NOT_SCORE);
    ir_free(&d);
}
END_TEST

/* Random mods (score and mask): mod_derive keeps the forward intact and its
 * new nodes in topological order, and the multi-output tile evaluator gives,
 * bit for bit, what the point interpreter gives for every output: the
 * value, d/dscore, each d/dload and a few inner nodes. */
START_TEST(test_random_mods_multi_output_evaluator) {
    rnd r;
    rnd_seed(&r, 0xd371ce + (uint64_t)_i);
    enum { ROWS = 5, COLS = 7 };
    for (int iter = 0; iter < 40; iter++) {
        flex_mod_kind kind = rnd_below(&r, 4) == 0 ? FLEX_MOD_MASK : FLEX_MOD_SCORE;
        ir_mod m;
        rm_buffers bufs;
        ck_assert_int_eq(rm_random_mod(&r, kind, 4, 0, &m, &bufs), 0);
        int forward_nodes = m.num_nodes, root = m.root;
        ir_node *saved = malloc((size_t)forward_nodes * sizeof *saved);
        memcpy(saved, m.nodes, (size_t)forward_nodes * sizeof *saved);
        int outputs[MOD_DERIVE_MAX_LOADS + 8], n = 0;
        outputs[n++] = m.root;
        if (kind == FLEX_MOD_SCORE) {
            mod_derivative der;
            int rc = mod_derive(&m, &der);
            ck_assert_int_eq(rc, 0);
            ck_assert_int_eq(m.root, root);
            ck_assert_int_eq(memcmp(m.nodes, saved, (size_t)forward_nodes * sizeof *saved), 0);
            outputs[n++] = der.dscore;
            for (int l = 0; l < der.num_loads && n < MOD_DERIVE_MAX_LOADS; l++)
                outputs[n++] = der.loads[l].node;
        } else {
            mod_derivative der;
            ck_assert_int_eq(mod_derive(&m, &der), MOD_DERIVE_NOT_SCORE);
        }
        for (int i = 0; i < m.num_nodes; i++)
            for (int a = 0; a < m.nodes[i].nargs; a++)
                ck_assert_int_lt(m.nodes[i].args[a], i);
        for (int k = 0; k < 4; k++)
            outputs[n++] = rnd_below(&r, m.num_nodes);

        mod_multi *mm = mod_multi_create(&m, outputs, n, ROWS * COLS);
        ck_assert_ptr_nonnull(mm);
        float score[ROWS * COLS];
        for (int e = 0; e < ROWS * COLS; e++)
            score[e] = rnd_below(&r, 5) == 0 ? rm_special_float(&r) : (rnd_unit(&r) - 0.5f) * 8;
        int32_t b = rnd_below(&r, 3), h = rnd_below(&r, 4);
        int32_t q0 = rnd_range(&r, -3, 20), kv0 = rnd_range(&r, -3, 20);
        mod_bounds_error e1, e2;
        memset(&e1, 0, sizeof e1);
        int multi_rc = mod_multi_eval(mm, bufs.views, b, h, q0, ROWS, kv0, COLS, score, COLS, &e1);
        ir_value *scratch = malloc((size_t)m.num_nodes * sizeof *scratch);
        int any_point_failed = 0;
        for (int rr = 0; rr < ROWS; rr++)
            for (int c = 0; c < COLS; c++) {
                ir_value res;
                memset(&e2, 0, sizeof e2);
                if (mod_eval_point(&m, bufs.views, score[rr * COLS + c], b, h, q0 + rr, kv0 + c,
                                   scratch, &res, &e2) != 0) {
                    any_point_failed = 1;
                    continue;
                }
                if (multi_rc != 0) continue;
                for (int o = 0; o < n; o++) {
                    const ir_value *got = mod_multi_output(mm, o);
                    ir_value want = scratch[outputs[o]];
                    ir_value g = got[rr * COLS + c];
                    if (m.nodes[outputs[o]].type == IR_FLOAT)
                        ck_assert_msg(rm_same_float(g.f, want.f),
                                      "seed %d iter %d output %d (node %d, %s) at (%d, %d): "
                                      "%.9g vs %.9g",
                                      _i, iter, o, outputs[o], ir_op_name(m.nodes[outputs[o]].op),
                                      rr, c, g.f, want.f);
                    else
                        ck_assert_int_eq(g.i, want.i);
                }
            }
        /* the tile fails exactly when some point does */
        ck_assert_int_eq(multi_rc != 0, any_point_failed);
        free(scratch);
        mod_multi_destroy(mm);
        free(saved);
        ir_free(&m);
        rm_buffers_free(&bufs);
    }
}
END_TEST

static Suite *derive_suite(void) {
    Suite *s = suite_create("derive");
    TCase *tc = tcase_create("derive");
    tcase_add_loop_test(tc, test_smooth_mods_match_finite_differences, 0,
                        (int)(sizeof smooth_mods / sizeof *smooth_mods));
    tcase_add_test(tc, test_rules_at_non_smooth_points);
    tcase_add_test(tc, test_derivative_shares_forward_nodes);
    tcase_add_test(tc, test_identity_and_linear_mods_fold);
    tcase_add_test(tc, test_mask_mod_is_refused);
    tcase_add_loop_test(tc, test_random_mods_multi_output_evaluator, 0, 5);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(derive_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
