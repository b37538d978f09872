/*
 * The diagonal split of score mods (core/mod/diagonal.h) and the two
 * functions the emitter writes for it.
 *
 * The split's promise is checked with the scalar interpreter, which knows
 * nothing of the split: every value node must come out the same at (q, kv)
 * and at (q + t, kv + t), whatever the score, and a value read from a table
 * filled at other indices on the same diagonal must give the mod's result.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mod/diagonal.h"
#include "mod/emit.h"
#include "mod/eval.h"
#include "mod/parse.h"

#define T5_TEXT                                                                                    \
    "let rel = kv - q; let n = abs(rel);"                                                          \
    "let large = clamp(8 + int(log(float(n) / 8.0 + 0.000001) / 2.7725887 * 8.0), 0, 15);"         \
    "score + tab[h][where(rel > 0, 16, 0) + where(n < 8, n, large)]"

static const flex_buffer_decl buffers[] = {
    {"tab", FLEX_F32, 2}, {"bias", FLEX_F32, 2}, {"slopes", FLEX_F32, 1}, {"doc", FLEX_I32, 1}};
static float tab_data[4][32], rel_data[4][400], slope_data[4];
static int32_t doc_data[300];

static void parse_score(const char *text, ir_mod *m) {
    const flex_mod_desc desc = {FLEX_MOD_SCORE, text, NULL, 0, buffers, 4};
    char err[256];
    ck_assert_msg(mod_parse(&desc, m, err, sizeof err) == FLEX_OK, "%s: %s", text, err);
}

/* Every read proved in range, as the host's analysis would find for these
 * buffers (the tests' indices stay inside them). */
static unsigned char *all_proved(const ir_mod *m) {
    unsigned char *f = malloc((size_t)m->num_nodes);
    ck_assert_ptr_nonnull(f);
    memset(f, 1, (size_t)m->num_nodes);
    return f;
}

static void views(mod_buffer_view *v) {
    memset(v, 0, 4 * sizeof *v);
    const struct {
        const void *data;
        flex_dtype dt;
        int ndim;
        int64_t s0, s1;
    } b[4] = {{tab_data, FLEX_F32, 2, 4, 32},
              {rel_data, FLEX_F32, 2, 4, 400},
              {slope_data, FLEX_F32, 1, 4, 0},
              {doc_data, FLEX_I32, 1, 300, 0}};
    for (int i = 0; i < 4; i++) {
        v[i].data = b[i].data;
        v[i].dtype = b[i].dt;
        v[i].ndim = b[i].ndim;
        v[i].sizes[0] = b[i].s0;
        v[i].sizes[1] = b[i].s1;
        v[i].strides[0] = b[i].ndim == 2 ? b[i].s1 : 1;
        v[i].strides[1] = 1;
    }
}

static void fill_buffers(void) {
    uint32_t s = 99u;
    for (int h = 0; h < 4; h++) {
        for (int i = 0; i < 32; i++)
            tab_data[h][i] = (float)((s = s * 1664525u + 1013904223u) >> 8) * 0x1p-24f - 0.5f;
        for (int i = 0; i < 400; i++)
            rel_data[h][i] = (float)((s = s * 1664525u + 1013904223u) >> 8) * 0x1p-24f - 0.5f;
        slope_data[h] = 0.25f * (float)(h + 1);
    }
    for (int i = 0; i < 300; i++)
        doc_data[i] = i / 37;
}

/* The mods the split is checked on: how many values each splits into (with
 * every read proved). */
static const struct {
    const char *text;
    int values;
} mods[] = {
    {T5_TEXT, 1},
    {"score + bias[h][q - kv + 200]", 1},     /* a read and an add: saves 2 */
    {"score + slopes[h] * float(kv - q)", 0}, /* saves 1: not worth a table */
    {"score + float(doc[q]) * 0.5", 0},       /* no difference at all */
    {"score * 2.0 + float(q - kv)", 0},       /* the conversion alone */
    {"let s = where(abs(kv - q) % 3 == 1, score * 0.5, score);"
     "where(abs(kv - q) % 2 == 0, s * 2.0, s)",
     2}, /* two bools */
    {"score + 0.5 * log(1.0 + float(abs(kv - q))) * where(kv > q, 1.0, -0.5) + "
     "float(where(kv > q, (q - kv) % 3, 1))",
     2}, /* a float and an int */
    {"where(abs(kv - q) % 3 == 0, score, 0.0) + where(abs(kv - q) % 5 == 1, score, 1.0) + "
     "where(abs(kv - q) % 7 == 2, score, 2.0)",
     0}, /* three values: more than a table takes */
    {"float(abs(kv - q)) / 3.0 + log(float(abs(q - kv) + 1))", 1}, /* the result itself */
    {"score + float(q) * 0.25 + log(float(abs(kv - q)) + 1.0) * slopes[h]", 1},
    {"score + log(float(abs(kv - q)) + 1.0) * float(doc[kv])", 1},    /* doc[kv] stays per score */
    {"score + exp(score * 0.0 + float(kv - q) * 0.01)", 0},           /* the score enters */
    {"score + log(float(abs(kv - q) + q % 2) + 1.0)", 0},             /* q enters */
    {"score + log(float(abs(kv - q)) + 1.0) * float(kv % 3 + 1)", 1}, /* the log alone */
    {"score + bias[h][q - kv + 20] * 2.0", 1}, /* out of range for q - kv < -20 */
};

START_TEST(test_split_counts) {
    for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        ir_mod m;
        parse_score(mods[i].text, &m);
        unsigned char *proved = all_proved(&m);
        unsigned char *role = malloc((size_t)m.num_nodes);
        mod_diagonal_split split;
        ck_assert_int_eq(mod_diagonal_split_find(&m, proved, &split, role), 0);
        ck_assert_msg(split.num_values == mods[i].values, "%s: %d values, want %d", mods[i].text,
                      split.num_values, mods[i].values);
        if (split.num_values > 0) ck_assert_int_ge(split.weight, MOD_DIAGONAL_MIN_WEIGHT);
        ck_assert_int_eq(split.checked, 0); /* every read proved */
        ck_assert_int_eq(split.rows, split.num_values);
        for (int k = 0; k < split.num_values; k++)
            ck_assert_int_eq(role[split.values[k]], MOD_DIAG_VALUE);
        int marked = 0;
        for (int n = 0; n < m.num_nodes; n++)
            marked += role[n] == MOD_DIAG_VALUE;
        ck_assert_int_eq(marked, split.num_values);
        free(role);
        free(proved);
        ir_free(&m);
    }
}
END_TEST

/* A table entry is computed for diagonals no kept score may have: the
 * bounds bits of a read the host did not prove inside its buffer go into
 * the table as one more row, for each score to take as its own. */
START_TEST(test_unproved_reads_go_into_the_table) {
    ir_mod m;
    parse_score(T5_TEXT, &m);
    mod_diagonal_split split;
    ck_assert_int_eq(mod_diagonal_split_find(&m, NULL, &split, NULL), 0);
    ck_assert_int_eq(split.num_values, 1);
    ck_assert_int_eq(split.checked, 1);
    ck_assert_int_eq(split.rows, 2);
    unsigned char *proved = all_proved(&m);
    ck_assert_int_eq(mod_diagonal_split_find(&m, proved, &split, NULL), 0);
    ck_assert_int_eq(split.checked, 0);
    ck_assert_int_eq(split.rows, 1);
    free(proved);
    ir_free(&m);
    /* a per-score read (doc[kv]) stays out of the table, proved or not */
    parse_score("score + log(float(abs(kv - q)) + 1.0) * float(doc[kv])", &m);
    ck_assert_int_eq(mod_diagonal_split_find(&m, NULL, &split, NULL), 0);
    ck_assert_int_eq(split.num_values, 1);
    ck_assert_int_eq(split.checked, 0);
    ir_free(&m);
}
END_TEST

static int same_value(const ir_node *n, ir_value a, ir_value b) {
    if (n->type == IR_FLOAT) return memcmp(&a.f, &b.f, sizeof a.f) == 0;
    return a.i == b.i;
}

/* The values depend on b, h and kv - q alone; and the mod with its values
 * taken from another point of the same diagonal (what a table filled by
 * diagonal gives every score of it) is the mod. */
START_TEST(test_values_follow_the_diagonal) {
    fill_buffers();
    mod_buffer_view v[4];
    views(v);
    uint32_t s = 7u;
    for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        ir_mod m;
        parse_score(mods[i].text, &m);
        unsigned char *proved = all_proved(&m);
        mod_diagonal_split split;
        ck_assert_int_eq(mod_diagonal_split_find(&m, proved, &split, NULL), 0);
        ir_value *a = malloc((size_t)m.num_nodes * sizeof *a);
        ir_value *b = malloc((size_t)m.num_nodes * sizeof *b);
        ir_value *c = malloc((size_t)m.num_nodes * sizeof *c);
        ck_assert(a && b && c);
        for (int trial = 0; trial < 2000 && split.num_values > 0; trial++) {
            s = s * 1664525u + 1013904223u;
            const int32_t bb = (int32_t)(s >> 30), h = (int32_t)((s >> 8) & 3);
            const int32_t q = (int32_t)((s >> 10) % 150), kv = (int32_t)((s >> 18) % 150);
            const int32_t t = (int32_t)((s >> 3) % 100) - 50;
            if (q + t < 0 || kv + t < 0) continue;
            const float score = (float)(int32_t)(s % 2001 - 1000) * 0.01f;
            ir_value r1, r2, r3;
            mod_bounds_error err = {0};
            /* a read out of range (the table's part is the only one that
             * leaves its buffer here) on both points of the diagonal or on
             * neither: the bounds bits follow the diagonal too */
            const int e1 = mod_eval_point(&m, v, score, bb, h, q, kv, a, &r1, &err);
            err.set = 0;
            const int e2 =
                mod_eval_point(&m, v, score * -3.0f + 1.0f, bb, h, q + t, kv + t, b, &r2, &err);
            ck_assert_msg(e1 == e2, "%s: a bounds error at one of (%d, %d) and (%d, %d) only",
                          mods[i].text, q, kv, q + t, kv + t);
            if (e1) continue;
            for (int k = 0; k < split.num_values; k++) {
                const int n = split.values[k];
                ck_assert_msg(same_value(&m.nodes[n], a[n], b[n]),
                              "%s: value node %d differs at (%d, %d) and (%d, %d)", mods[i].text, n,
                              q, kv, q + t, kv + t);
            }
            /* Recompute the mod at (q, kv) in node order with the values
             * replaced by those at (q + t, kv + t). */
            memcpy(c, a, (size_t)m.num_nodes * sizeof *c);
            for (int n = 0; n < m.num_nodes; n++) {
                int is_value = 0;
                for (int k = 0; k < split.num_values; k++)
                    is_value |= split.values[k] == n;
                const ir_node *node = &m.nodes[n];
                if (is_value) {
                    c[n] = b[n];
                } else if (node->op != IR_CONST && node->op != IR_SCORE && node->op != IR_B &&
                           node->op != IR_H && node->op != IR_Q && node->op != IR_KV &&
                           node->op != IR_LOAD) {
                    ir_value args[4];
                    for (int k = 0; k < node->nargs; k++)
                        args[k] = c[node->args[k]];
                    c[n] = ir_apply(node, args);
                }
            }
            r3 = c[m.root];
            ck_assert_msg(same_value(&m.nodes[m.root], r1, r3), "%s: the mod differs at (%d, %d)",
                          mods[i].text, q, kv);
        }
        free(a);
        free(b);
        free(c);
        free(proved);
        ir_free(&m);
    }
}
END_TEST

static int count_of(const char *s, const char *what) {
    int n = 0;
    for (const char *p = strstr(s, what); p; p = strstr(p + 1, what))
        n++;
    return n;
}

/* The emitted text: the fill sees only b, h and the diagonal; the mod
 * reads its values from the entry and keeps nothing the values needed. */
START_TEST(test_emitted_functions) {
    ir_mod m;
    parse_score(T5_TEXT, &m);
    unsigned char *proved = all_proved(&m);
    char *src = flex_emit_mods_diagonal(NULL, &m, NULL, proved, 1);
    ck_assert_ptr_nonnull(src);
    ck_assert_ptr_nonnull(strstr(src, "#define FLEX_DIAG_VALUES 1\n"));
    const char *fill = strstr(src, "void flex_score_diag_fill(");
    const char *main_fn = strstr(src, "float flex_score_mod_diag(");
    ck_assert(fill && main_fn && fill < main_fn);
    const size_t fill_len = (size_t)(main_fn - fill);
    char *fill_text = strndup(fill, fill_len);
    ck_assert_ptr_nonnull(fill_text);
    ck_assert_ptr_null(strstr(fill_text, "= q;"));
    ck_assert_ptr_null(strstr(fill_text, "= kv;"));
    ck_assert_ptr_null(strstr(fill_text, "= score;"));
    ck_assert_ptr_nonnull(strstr(fill_text, "= d;"));
    ck_assert_ptr_nonnull(strstr(fill_text, "logf("));
    ck_assert_int_eq(count_of(fill_text, "at[0 * FLEX_DIAG_STRIDE] = "), 1);
    free(fill_text);
    ck_assert_ptr_nonnull(strstr(main_fn, "diag[0 * FLEX_DIAG_STRIDE]"));
    ck_assert_ptr_null(strstr(main_fn, "logf("));
    ck_assert_ptr_null(strstr(main_fn, "flex_load_"));
    /* the plain mod is there too, whole (the backward and the oob pass use it) */
    const char *plain = strstr(src, "float flex_score_mod(");
    ck_assert(plain && plain < fill);
    free(src);
    /* the read unproved: its bounds bits in a second row, added to oob */
    src = flex_emit_mods_diagonal(NULL, &m, NULL, NULL, 2);
    ck_assert_ptr_nonnull(src);
    ck_assert_ptr_nonnull(strstr(src, "#define FLEX_DIAG_VALUES 1\n#define FLEX_DIAG_ROWS 2\n"));
    ck_assert_ptr_nonnull(strstr(src, "at[1 * FLEX_DIAG_STRIDE] = __int_as_float((int)oob);"));
    ck_assert_ptr_nonnull(
        strstr(src, "oob |= (unsigned)__float_as_int(diag[1 * FLEX_DIAG_STRIDE]);"));
    free(src);
    /* without the split asked for: no tables */
    src = flex_emit_mods_in_range(NULL, &m, NULL, proved);
    ck_assert_ptr_nonnull(strstr(src, "#define FLEX_DIAG_VALUES 0\n"));
    ck_assert_ptr_null(strstr(src, "flex_score_diag_fill"));
    free(src);
    free(proved);
    ir_free(&m);
    /* an int and a float value: the int through its bits */
    parse_score(mods[6].text, &m);
    proved = all_proved(&m);
    src = flex_emit_mods_diagonal(NULL, &m, NULL, proved, 2);
    ck_assert_ptr_nonnull(src);
    ck_assert_ptr_nonnull(strstr(src, "#define FLEX_DIAG_VALUES 2\n"));
    ck_assert_ptr_nonnull(strstr(src, "= __int_as_float(v"));
    ck_assert_ptr_nonnull(strstr(src, "__float_as_int(diag[1 * FLEX_DIAG_STRIDE])"));
    free(src);
    free(proved);
    ir_free(&m);
}
END_TEST

int main(void) {
    Suite *suite = suite_create("diagonal");
    TCase *tc = tcase_create("diagonal");
    tcase_add_test(tc, test_split_counts);
    tcase_add_test(tc, test_unproved_reads_go_into_the_table);
    tcase_add_test(tc, test_values_follow_the_diagonal);
    tcase_add_test(tc, test_emitted_functions);
    suite_add_tcase(suite, tc);
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    const int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}
