/*
 * The tile interpreter agrees with the scalar interpreter bit for bit, on
 * random mods and on the seed mods, and reports out-of-range buffer reads
 * at the right point.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/eval.h"
#include "mod/parse.h"
#include "mod_random.h"

#define MAX_ROWS 16
#define MAX_COLS 24
/* tiles may exceed the scratch size; the interpreter then works in pieces */
#define TILE_ROWS_LIMIT (MAX_ROWS + 9)
#define TILE_COLS_LIMIT (MAX_COLS + 13)

typedef struct tile_case {
    int32_t b, h, q0, kv0;
    int rows, cols, ld;
} tile_case;

/*
 * Runs the tile interpreter on one tile and checks it against
 * mod_eval_point at every element. Returns the number of elements at which
 * the scalar interpreter hit an out-of-range read.
 */
static int check_tile(const ir_mod *m, mod_tile *t, const mod_buffer_view *views,
                      const tile_case *c, rnd *r, const char *what) {
    size_t n = (size_t)c->rows * (size_t)c->ld;
    float *score = malloc((n ? n : 1) * sizeof *score);
    float *score_in = malloc((n ? n : 1) * sizeof *score_in);
    uint8_t *mask = malloc(n ? n : 1);
    ir_value *scratch = malloc((size_t)m->num_nodes * sizeof *scratch);
    ck_assert(score && score_in && mask && scratch);
    for (size_t k = 0; k < n; k++) {
        score_in[k] = rnd_below(r, 6) == 0 ? rm_special_float(r) : (rnd_unit(r) - 0.5f) * 8.0f;
        score[k] = score_in[k];
        mask[k] = 0xAA;
    }
    mod_bounds_error err;
    memset(&err, 0, sizeof err);
    int rc;
    if (m->kind == FLEX_MOD_SCORE)
        rc = mod_tile_score(t, views, c->b, c->h, c->q0, c->rows, c->kv0, c->cols, score, c->ld,
                            &err);
    else
        rc =
            mod_tile_mask(t, views, c->b, c->h, c->q0, c->rows, c->kv0, c->cols, mask, c->ld, &err);

    int failures = 0;
    for (int i = 0; i < c->rows; i++) {
        for (int j = 0; j < c->cols; j++) {
            size_t at = (size_t)i * (size_t)c->ld + (size_t)j;
            ir_value want;
            mod_bounds_error perr;
            memset(&perr, 0, sizeof perr);
            int prc = mod_eval_point(m, views, score_in[at], c->b, c->h, c->q0 + i, c->kv0 + j,
                                     scratch, &want, &perr);
            if (prc != 0) {
                failures++;
                continue;
            }
            if (rc != 0) continue;
            if (m->kind == FLEX_MOD_SCORE) {
                if (!rm_same_float(score[at], want.f))
                    ck_abort_msg("%s: score at q=%d kv=%d: tile %a, point %a", what, c->q0 + i,
                                 c->kv0 + j, (double)score[at], (double)want.f);
            } else {
                if (mask[at] != (want.i != 0))
                    ck_abort_msg("%s: mask at q=%d kv=%d: tile %d, point %d", what, c->q0 + i,
                                 c->kv0 + j, mask[at], want.i);
            }
        }
        /* padding between rows is never written */
        for (int j = c->cols; j < c->ld; j++) {
            size_t at = (size_t)i * (size_t)c->ld + (size_t)j;
            int kept = m->kind == FLEX_MOD_SCORE ? rm_same_float(score[at], score_in[at])
                                                 : mask[at] == 0xAA;
            if (!kept) ck_abort_msg("%s: padding after column %d was written", what, c->cols);
        }
    }
    if (failures == 0) {
        ck_assert_msg(rc == 0, "%s: tile reported a bounds error the point evaluator never hit",
                      what);
    } else {
        ck_assert_msg(rc != 0, "%s: %d out-of-range points but the tile returned 0", what,
                      failures);
        ck_assert(err.set);
        ck_assert_int_eq(err.b, c->b);
        ck_assert_int_eq(err.h, c->h);
        ck_assert(err.q >= c->q0 && err.q < c->q0 + c->rows);
        ck_assert(err.kv >= c->kv0 && err.kv < c->kv0 + c->cols);
        /* the scalar interpreter fails at the reported point, on the same read */
        mod_bounds_error perr;
        memset(&perr, 0, sizeof perr);
        ir_value dummy;
        size_t at = (size_t)(err.q - c->q0) * (size_t)c->ld + (size_t)(err.kv - c->kv0);
        int prc = mod_eval_point(m, views, score_in[at], err.b, err.h, err.q, err.kv, scratch,
                                 &dummy, &perr);
        ck_assert_msg(prc != 0, "%s: reported point q=%d kv=%d evaluates fine", what, err.q,
                      err.kv);
        ck_assert_int_eq(perr.buffer, err.buffer);
        ck_assert_int_eq(perr.dim, err.dim);
        ck_assert_int_eq(perr.index, err.index);
        ck_assert_int_eq(perr.size, err.size);
    }
    free(score);
    free(score_in);
    free(mask);
    free(scratch);
    return failures;
}

static tile_case random_case(rnd *r, int small) {
    tile_case c;
    c.b = rnd_range(r, 0, 3);
    c.h = rnd_range(r, 0, 5);
    int kind = rnd_below(r, 10);
    c.rows = kind == 0 ? 1 : rnd_range(r, 1, kind < 3 ? MAX_ROWS : TILE_ROWS_LIMIT);
    c.cols = kind == 0 ? 1 : rnd_range(r, 1, kind < 3 ? MAX_COLS : TILE_COLS_LIMIT);
    if (small) {
        c.rows = c.rows > 9 ? 9 : c.rows;
        c.cols = c.cols > 11 ? 11 : c.cols;
    }
    c.q0 = rnd_range(r, -20, 400);
    c.kv0 = rnd_range(r, -20, 400);
    c.ld = c.cols + (rnd_below(r, 2) ? 0 : rnd_range(r, 1, 5));
    return c;
}

START_TEST(random_mods_match_point_evaluator) {
    rnd r;
    int total_errors = 0, total_tiles = 0;
    for (int iter = 0; iter < 600; iter++) {
        rnd_seed(&r, 1000 + (uint64_t)iter);
        flex_mod_kind kind = rnd_below(&r, 2) ? FLEX_MOD_SCORE : FLEX_MOD_MASK;
        ir_mod m;
        rm_buffers bufs;
        ck_assert_int_eq(
            rm_random_mod(&r, kind, rnd_range(&r, 1, 6), iter % 3 == 0 ? 6 : 0, &m, &bufs), 0);
        mod_tile *t = mod_tile_create(&m, MAX_ROWS, MAX_COLS);
        ck_assert_ptr_nonnull(t);
        char what[64];
        snprintf(what, sizeof what, "random mod %d", iter);
        for (int k = 0; k < 6; k++) {
            tile_case c = random_case(&r, 0);
            total_errors += check_tile(&m, t, bufs.views, &c, &r, what) > 0;
            total_tiles++;
        }
        mod_tile_destroy(t);
        rm_buffers_free(&bufs);
        ir_free(&m);
    }
    /* the generator reaches both outcomes */
    ck_assert_int_gt(total_errors, 10);
    ck_assert_int_lt(total_errors, total_tiles / 2);
}
END_TEST

/* Every op over every combination of operand shapes (scalar, per-row,
 * per-column, full): binary ops on pairs of leaves with distinct
 * dependencies. */
START_TEST(every_op_every_shape) {
    static const ir_op int_ops[] = {IR_ADD, IR_SUB, IR_MUL, IR_DIV, IR_FLOORDIV, IR_MOD,
                                    IR_MIN, IR_MAX, IR_AND, IR_OR,  IR_XOR,      IR_EQ,
                                    IR_NE,  IR_LT,  IR_LE,  IR_GT,  IR_GE};
    static const ir_op float_ops[] = {IR_ADD, IR_SUB, IR_MUL, IR_DIV, IR_FLOORDIV,
                                      IR_MOD, IR_POW, IR_MIN, IR_MAX, IR_EQ,
                                      IR_NE,  IR_LT,  IR_LE,  IR_GT,  IR_GE};
    static const ir_op float_unary[] = {
        IR_NEG, IR_ABS, IR_EXP, IR_EXP2, IR_LOG,         IR_LOG2,    IR_SQRT,  IR_RSQRT,
        IR_SIN, IR_COS, IR_TAN, IR_TANH, IR_TANH_APPROX, IR_SIGMOID, IR_FLOOR, IR_CEIL};
    rnd r;
    rnd_seed(&r, 77);
    for (int shape_a = 0; shape_a < 4; shape_a++) {
        for (int shape_b = 0; shape_b < 4; shape_b++) {
            for (int is_float = 0; is_float < 2; is_float++) {
                int nops = is_float ? (int)(sizeof float_ops / sizeof float_ops[0])
                                    : (int)(sizeof int_ops / sizeof int_ops[0]);
                for (int k = 0; k < nops + (is_float ? 16 : 3); k++) {
                    ir_mod m;
                    ir_init(&m, FLEX_MOD_SCORE);
                    int q = ir_leaf(&m, IR_Q), kv = ir_leaf(&m, IR_KV);
                    int sc = ir_leaf(&m, IR_SCORE);
                    int operand[2];
                    for (int s = 0; s < 2; s++) {
                        int shape = s ? shape_b : shape_a;
                        int v;
                        /* int values around zero with both signs */
                        if (shape == 0)
                            v = ir_binary(&m, IR_SUB, IR_INT, ir_leaf(&m, IR_H),
                                          ir_const_int(&m, 3));
                        else if (shape == 1)
                            v = ir_binary(&m, IR_SUB, IR_INT, q, ir_const_int(&m, 7));
                        else if (shape == 2)
                            v = ir_binary(&m, IR_SUB, IR_INT, ir_const_int(&m, 9), kv);
                        else
                            v = ir_binary(&m, IR_SUB, IR_INT, q, kv);
                        if (is_float) {
                            v = ir_unary(&m, IR_TO_FLOAT, IR_FLOAT, v);
                            v = ir_binary(&m, IR_MUL, IR_FLOAT, v, ir_const_float(&m, 0.75f));
                            if (shape == 3) v = ir_binary(&m, IR_ADD, IR_FLOAT, v, sc);
                        }
                        operand[s] = v;
                    }
                    int res;
                    if (!is_float && k < nops) {
                        ir_op op = int_ops[k];
                        int cmp = op >= IR_EQ && op <= IR_GE;
                        res = ir_binary(&m, op, cmp ? IR_BOOL : IR_INT, operand[0], operand[1]);
                        if (cmp) res = ir_unary(&m, IR_TO_INT, IR_INT, res);
                    } else if (!is_float) {
                        static const ir_op un[] = {IR_NEG, IR_ABS, IR_BITNOT};
                        res = ir_unary(&m, un[k - nops], IR_INT, operand[0]);
                    } else if (k < nops) {
                        ir_op op = float_ops[k];
                        int cmp = op >= IR_EQ && op <= IR_GE;
                        res = ir_binary(&m, op, cmp ? IR_BOOL : IR_FLOAT, operand[0], operand[1]);
                        if (cmp) res = ir_select(&m, IR_FLOAT, res, operand[0], operand[1]);
                    } else {
                        res = ir_unary(&m, float_unary[k - nops], IR_FLOAT, operand[0]);
                    }
                    if (!is_float) {
                        int c = ir_binary(&m, IR_GT, IR_BOOL, operand[1], ir_const_int(&m, 0));
                        res = ir_select(&m, IR_INT, c, res, operand[0]);
                        res = ir_unary(&m, IR_TO_FLOAT, IR_FLOAT, res);
                    }
                    m.root = res;
                    ck_assert_int_eq(ir_compact(&m), 0);
                    mod_tile *t = mod_tile_create(&m, MAX_ROWS, MAX_COLS);
                    ck_assert_ptr_nonnull(t);
                    for (int rep = 0; rep < 3; rep++) {
                        tile_case c = random_case(&r, rep == 0);
                        char what[64];
                        snprintf(what, sizeof what, "op %d float %d shapes %d,%d", k, is_float,
                                 shape_a, shape_b);
                        ck_assert_int_eq(check_tile(&m, t, NULL, &c, &r, what), 0);
                    }
                    mod_tile_destroy(t);
                    ir_free(&m);
                }
            }
        }
    }
}
END_TEST

/* ---- seed mods through the parser ---- */

typedef struct seed_mod {
    const char *name;
    flex_mod_kind kind;
    const char *text;
} seed_mod;

static const seed_mod seeds[] = {
    {"causal", FLEX_MOD_MASK, "q >= kv"},
    {"sliding window", FLEX_MOD_MASK, "q >= kv && q - kv <= W"},
    {"prefix lm", FLEX_MOD_MASK, "kv <= P || q >= kv"},
    {"document causal", FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]"},
    {"natten", FLEX_MOD_MASK,
     "let qx = q / IW; let qy = q % IW; let kx = kv / IW; let ky = kv % IW;\n"
     "let cx = clamp(qx, K / 2, IH - 1 - K / 2); let cy = clamp(qy, K / 2, IW - 1 - K / 2);\n"
     "abs(cx - kx) <= K / 2 && abs(cy - ky) <= K / 2"},
    {"sasa", FLEX_MOD_MASK, "abs(q / IW - kv / IW) <= K && abs(q % IW - kv % IW) <= K"},
    {"flamingo", FLEX_MOD_MASK, "let img = img_of[kv]; q >= lo[img] && q < hi[img]"},
    {"alibi", FLEX_MOD_SCORE, "score + slopes[h] * (kv - q)"},
    {"softcap", FLEX_MOD_SCORE, "30.0 * tanh(score / 30.0)"},
    {"checkerboard", FLEX_MOD_SCORE, "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)"},
    {"relative bias", FLEX_MOD_SCORE, "score + bias[h][q - kv + 40]"},
    {"bf16 table", FLEX_MOD_SCORE, "score * scale16[h] + half[kv % 7] - float(flags[q % 5])"},
    {"mixed", FLEX_MOD_SCORE,
     "let d = q - kv; let s = sigmoid(float(d) / 8.0); "
     "where(d >= 0 && d % 3 != 1, score * s + exp(-abs(float(d))), -inf)"},
};

static const flex_param seed_params[] = {
    {"W", 0, 5}, {"P", 0, 7}, {"IW", 0, 8}, {"IH", 0, 6}, {"K", 0, 3},
};

enum { SEED_LEN = 64 };

typedef struct seed_data {
    int32_t doc[SEED_LEN];
    int64_t img_of[SEED_LEN];
    int32_t lo[8], hi[8];
    float slopes[8];
    float bias[8][SEED_LEN + 60];
    uint16_t scale16[8];
    uint16_t half[7];
    uint8_t flags[5];
} seed_data;

static void seed_views(seed_data *d, rnd *r, mod_buffer_view *views, flex_buffer_decl *decls,
                       int *count) {
    int doc = 0;
    for (int i = 0; i < SEED_LEN; i++) {
        if (rnd_below(r, 9) == 0) doc++;
        d->doc[i] = doc;
        d->img_of[i] = rnd_below(r, 8);
    }
    for (int i = 0; i < 8; i++) {
        d->lo[i] = rnd_range(r, 0, 40);
        d->hi[i] = d->lo[i] + rnd_range(r, 0, 30);
        d->slopes[i] = 1.0f / (float)(1 << i);
        d->scale16[i] = flex_float_to_bf16(rnd_unit(r) * 2.0f);
        for (int k = 0; k < SEED_LEN + 60; k++)
            d->bias[i][k] = rnd_unit(r) - 0.5f;
    }
    for (int i = 0; i < 7; i++)
        d->half[i] = flex_float_to_f16(rnd_unit(r) * 3.0f - 1.0f);
    for (int i = 0; i < 5; i++)
        d->flags[i] = (uint8_t)rnd_below(r, 2);
    struct {
        const char *name;
        flex_dtype dt;
        int ndim;
        int64_t s0, s1;
        const void *data;
    } list[] = {
        {"doc", FLEX_I32, 1, SEED_LEN, 0, d->doc},
        {"img_of", FLEX_I64, 1, SEED_LEN, 0, d->img_of},
        {"lo", FLEX_I32, 1, 8, 0, d->lo},
        {"hi", FLEX_I32, 1, 8, 0, d->hi},
        {"slopes", FLEX_F32, 1, 8, 0, d->slopes},
        {"bias", FLEX_F32, 2, 8, SEED_LEN + 60, d->bias},
        {"scale16", FLEX_BF16, 1, 8, 0, d->scale16},
        {"half", FLEX_F16, 1, 7, 0, d->half},
        {"flags", FLEX_BOOL, 1, 5, 0, d->flags},
    };
    *count = (int)(sizeof list / sizeof list[0]);
    for (int i = 0; i < *count; i++) {
        decls[i].name = list[i].name;
        decls[i].dtype = list[i].dt;
        decls[i].ndim = list[i].ndim;
    }
    /* views are filled per mod, in the order of the parsed mod's buffers */
    (void)views;
    (void)list;
}

/* Points the parsed mod's buffer views at the matching data by name. */
static void bind_views(const ir_mod *m, seed_data *d, mod_buffer_view *views) {
    for (int i = 0; i < m->num_buffers; i++) {
        mod_buffer_view *v = &views[i];
        memset(v, 0, sizeof *v);
        const char *n = m->buffers[i].name;
        v->dtype = m->buffers[i].dtype;
        v->ndim = m->buffers[i].ndim;
        v->strides[0] = 1;
        if (!strcmp(n, "doc")) {
            v->data = d->doc;
            v->sizes[0] = SEED_LEN;
        } else if (!strcmp(n, "img_of")) {
            v->data = d->img_of;
            v->sizes[0] = SEED_LEN;
        } else if (!strcmp(n, "lo")) {
            v->data = d->lo;
            v->sizes[0] = 8;
        } else if (!strcmp(n, "hi")) {
            v->data = d->hi;
            v->sizes[0] = 8;
        } else if (!strcmp(n, "slopes")) {
            v->data = d->slopes;
            v->sizes[0] = 8;
        } else if (!strcmp(n, "bias")) {
            v->data = d->bias;
            v->sizes[0] = 8;
            v->sizes[1] = SEED_LEN + 60;
            v->strides[0] = SEED_LEN + 60;
            v->strides[1] = 1;
        } else if (!strcmp(n, "scale16")) {
            v->data = d->scale16;
            v->sizes[0] = 8;
        } else if (!strcmp(n, "half")) {
            v->data = d->half;
            v->sizes[0] = 7;
        } else if (!strcmp(n, "flags")) {
            v->data = d->flags;
            v->sizes[0] = 5;
        }
    }
}

START_TEST(seed_mods_match_point_evaluator) {
    rnd r;
    rnd_seed(&r, 4242);
    seed_data data;
    mod_buffer_view views[IR_MAX_BUFFERS];
    flex_buffer_decl decls[16];
    int ndecls = 0;
    seed_views(&data, &r, views, decls, &ndecls);
    int bounds_seen = 0;
    for (size_t s = 0; s < sizeof seeds / sizeof seeds[0]; s++) {
        flex_mod_desc desc;
        memset(&desc, 0, sizeof desc);
        desc.kind = seeds[s].kind;
        desc.text = seeds[s].text;
        desc.params = seed_params;
        desc.num_params = (int)(sizeof seed_params / sizeof seed_params[0]);
        desc.buffers = decls;
        desc.num_buffers = ndecls;
        ir_mod m;
        char msg[512];
        flex_status st = mod_parse(&desc, &m, msg, sizeof msg);
        ck_assert_msg(st == FLEX_OK, "%s: %s", seeds[s].name, msg);
        bind_views(&m, &data, views);
        /* the forward kernel's tile shape, once per seed */
        mod_tile *big = mod_tile_create(&m, 64, 128);
        ck_assert_ptr_nonnull(big);
        tile_case full = {1, 3, rnd_range(&r, 0, 8), rnd_range(&r, -70, 0), 64, 128, 130};
        check_tile(&m, big, views, &full, &r, seeds[s].name);
        mod_tile_destroy(big);
        mod_tile *t = mod_tile_create(&m, MAX_ROWS, MAX_COLS);
        ck_assert_ptr_nonnull(t);
        for (int k = 0; k < 40; k++) {
            tile_case c = random_case(&r, 0);
            /* mostly inside the buffers' ranges, sometimes across their ends */
            c.q0 = rnd_range(&r, k % 5 == 0 ? -8 : 0, SEED_LEN - 4);
            c.kv0 = rnd_range(&r, k % 7 == 0 ? -8 : 0, SEED_LEN - 4);
            c.h = rnd_range(&r, 0, k % 9 == 0 ? 9 : 7);
            bounds_seen += check_tile(&m, t, views, &c, &r, seeds[s].name) > 0;
        }
        mod_tile_destroy(t);
        ir_free(&m);
    }
    ck_assert_int_gt(bounds_seen, 0);
}
END_TEST

/* A read that goes out of range at exactly one known point is reported
 * there, with the buffer, dim, index and size. */
START_TEST(bounds_error_coordinates) {
    int32_t table[10];
    for (int i = 0; i < 10; i++)
        table[i] = i * 3;
    mod_buffer_view view;
    memset(&view, 0, sizeof view);
    view.data = table;
    view.dtype = FLEX_I32;
    view.ndim = 1;
    view.sizes[0] = 10;
    view.strides[0] = 1;
    for (int variant = 0; variant < 3; variant++) {
        ir_mod m;
        ir_init(&m, FLEX_MOD_MASK);
        snprintf(m.buffers[0].name, sizeof m.buffers[0].name, "t");
        m.buffers[0].dtype = FLEX_I32;
        m.buffers[0].ndim = 1;
        m.num_buffers = 1;
        int q = ir_leaf(&m, IR_Q), kv = ir_leaf(&m, IR_KV);
        int32_t idx;
        if (variant == 0)
            idx = q; /* per-row index */
        else if (variant == 1)
            idx = kv; /* per-column index */
        else
            idx = ir_binary(&m, IR_SUB, IR_INT, q, kv); /* full-tile index */
        int load = ir_load(&m, 0, IR_INT, 1, &idx);
        m.root = ir_binary(&m, IR_GE, IR_BOOL, load, ir_const_int(&m, 0));
        ck_assert_int_eq(ir_compact(&m), 0);
        mod_tile *t = mod_tile_create(&m, 8, 8);
        uint8_t mask[8 * 8];
        mod_bounds_error err;
        memset(&err, 0, sizeof err);
        int rc;
        if (variant == 0) {
            rc = mod_tile_mask(t, &view, 1, 2, 5, 8, 0, 8, mask, 8, &err);
            ck_assert_int_eq(rc, -1);
            ck_assert_int_eq(err.q, 10);
            ck_assert_int_eq(err.kv, 0);
            ck_assert_int_eq(err.index, 10);
        } else if (variant == 1) {
            rc = mod_tile_mask(t, &view, 1, 2, 0, 8, -3, 8, mask, 8, &err);
            ck_assert_int_eq(rc, -1);
            ck_assert_int_eq(err.q, 0);
            ck_assert_int_eq(err.kv, -3);
            ck_assert_int_eq(err.index, -3);
        } else {
            /* q - kv reaches 10 first at row 3 (q = 10), column 0 (kv = 0) */
            rc = mod_tile_mask(t, &view, 1, 2, 7, 8, 0, 8, mask, 8, &err);
            ck_assert_int_eq(rc, -1);
            ck_assert_int_eq(err.q, 10);
            ck_assert_int_eq(err.kv, 0);
            ck_assert_int_eq(err.index, 10);
        }
        ck_assert_int_eq(err.set, 1);
        ck_assert_int_eq(err.b, 1);
        ck_assert_int_eq(err.h, 2);
        ck_assert_int_eq(err.buffer, 0);
        ck_assert_int_eq(err.dim, 0);
        ck_assert_int_eq(err.size, 10);
        /* in range: no error */
        memset(&err, 0, sizeof err);
        rc = mod_tile_mask(t, &view, 0, 0, 4, 4, 0, 4, mask, 8, &err);
        ck_assert_int_eq(rc, 0);
        ck_assert_int_eq(err.set, 0);
        mod_tile_destroy(t);
        ir_free(&m);
    }
}
END_TEST

static Suite *tile_suite(void) {
    Suite *s = suite_create("tile");
    /* one case per test, so CK_RUN_CASE can pick one */
    const struct {
        const char *name;
        const TTest *test;
    } tests[] = {
        {"random_mods_match_point_evaluator", random_mods_match_point_evaluator},
        {"every_op_every_shape", every_op_every_shape},
        {"seed_mods_match_point_evaluator", seed_mods_match_point_evaluator},
        {"bounds_error_coordinates", bounds_error_coordinates},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        TCase *tc = tcase_create(tests[i].name);
        tcase_set_timeout(tc, 600);
        tcase_add_test(tc, tests[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(tile_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
