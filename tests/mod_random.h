/*
 * Random well-typed mods and buffers for the evaluator property tests
 * (test_tile.c, test_interval.c). Everything is driven by a fixed-seed
 * generator so a failure reproduces from its seed.
 */
#ifndef FLEXATTN_TESTS_MOD_RANDOM_H
#define FLEXATTN_TESTS_MOD_RANDOM_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "mod/eval.h"
#include "mod/ir.h"

/* ---- xorshift64* ---- */

typedef struct rnd {
    uint64_t s;
} rnd;

static inline void rnd_seed(rnd *r, uint64_t seed) {
    r->s = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    if (!r->s) r->s = 1;
}

static inline uint64_t rnd_next(rnd *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545F4914F6CDD1Dull;
}

/* uniform in [0, n) */
static inline int rnd_below(rnd *r, int n) {
    return (int)((rnd_next(r) >> 33) % (uint64_t)n);
}

/* uniform in [lo, hi] */
static inline int rnd_range(rnd *r, int lo, int hi) {
    return lo + rnd_below(r, hi - lo + 1);
}

static inline float rnd_unit(rnd *r) {
    return (float)(rnd_next(r) >> 40) / (float)(1 << 24);
}

/* ---- buffers ---- */

#define RM_MAX_BUFS 6

/* Host data for random buffers; views reference `data`. */
typedef struct rm_buffers {
    int count;
    mod_buffer_view views[RM_MAX_BUFS];
    void *data[RM_MAX_BUFS];
} rm_buffers;

static inline void rm_buffers_free(rm_buffers *b) {
    for (int i = 0; i < b->count; i++)
        free(b->data[i]);
    memset(b, 0, sizeof *b);
}

static inline float rm_special_float(rnd *r) {
    static const float specials[] = {0.0f,  -0.0f,  1.0f,  -1.0f, 0.5f,  2.0f,
                                     30.0f, -7.25f, 1e-3f, 1e30f, -1e30f};
    int k = rnd_below(r, 16);
    if (k < (int)(sizeof specials / sizeof specials[0])) return specials[k];
    if (k == 11) return INFINITY;
    if (k == 12) return -INFINITY;
    if (k == 13) return NAN;
    return (rnd_unit(r) - 0.5f) * 20.0f;
}

/* Fills element k of a buffer with a value of its dtype. Ints stay small
 * (so they make useful indices) unless `wide`. */
static inline void rm_fill_element(rnd *r, flex_dtype dt, void *data, int64_t k, int wide,
                                   int allow_nan) {
    float f;
    switch (dt) {
    case FLEX_F32:
    case FLEX_F16:
    case FLEX_BF16:
        f = rnd_below(r, 4) == 0 ? rm_special_float(r) : (rnd_unit(r) - 0.5f) * 16.0f;
        if (!allow_nan && f != f) f = 3.0f;
        if (!allow_nan && isinf(f)) f = -2.0f;
        flex_store_from_float(data, dt, (int64_t)k, f);
        break;
    case FLEX_I32:
        ((int32_t *)data)[k] = wide ? (int32_t)(uint32_t)rnd_next(r) : rnd_range(r, -4, 40);
        break;
    case FLEX_I64:
        ((int64_t *)data)[k] = wide ? (int64_t)rnd_next(r) : rnd_range(r, -4, 40);
        break;
    case FLEX_U8:
        ((uint8_t *)data)[k] = (uint8_t)rnd_below(r, wide ? 256 : 40);
        break;
    case FLEX_BOOL:
        ((uint8_t *)data)[k] = (uint8_t)(rnd_below(r, 3) == 0 ? 0 : rnd_below(r, 3));
        break;
    }
}

/*
 * Adds a buffer of ndim dims with random sizes to m (declaration) and bufs
 * (data). Views are sometimes strided: a 2-dim buffer may be a transposed
 * view of its memory, any buffer may skip every other element.
 */
static inline int rm_add_buffer(rnd *r, ir_mod *m, rm_buffers *bufs, flex_dtype dt, int ndim,
                                int allow_nan) {
    int i = m->num_buffers++;
    snprintf(m->buffers[i].name, sizeof m->buffers[i].name, "buf%d", i);
    m->buffers[i].dtype = dt;
    m->buffers[i].ndim = ndim;
    mod_buffer_view *v = &bufs->views[i];
    memset(v, 0, sizeof *v);
    v->dtype = dt;
    v->ndim = ndim;
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        v->sizes[d] = ndim == 1 ? rnd_range(r, 1, 300) : rnd_range(r, 1, 12);
        n *= v->sizes[d];
    }
    int gap = rnd_below(r, 4) == 0 ? 2 : 1;
    int transpose = ndim == 2 && rnd_below(r, 3) == 0;
    int64_t stride = gap;
    for (int d = ndim - 1; d >= 0; d--) {
        v->strides[d] = stride;
        stride *= v->sizes[d];
    }
    if (transpose) {
        v->strides[0] = gap;
        v->strides[1] = gap * v->sizes[0];
    }
    size_t esize = flex_dtype_size(dt);
    int64_t elems = n * gap;
    void *data = calloc((size_t)elems, esize);
    for (int64_t k = 0; k < elems; k++)
        rm_fill_element(r, dt, data, k, rnd_below(r, 8) == 0, allow_nan);
    v->data = data;
    bufs->data[i] = data;
    bufs->count = i + 1;
    return i;
}

/* ---- random IR ---- */

typedef struct rm_gen {
    rnd *r;
    ir_mod *m;
    const rm_buffers *bufs;
    int allow_score;
    int out_of_range_rate; /* 1 in N loads may index out of range; 0 = never */
    int pool[3][64];       /* earlier nodes by type, for sharing */
    int pool_count[3];
} rm_gen;

static inline int rm_remember(rm_gen *g, ir_type t, int node) {
    if (node < 0) return node;
    if (g->pool_count[t] < 64) g->pool[t][g->pool_count[t]++] = node;
    return node;
}

static int rm_expr(rm_gen *g, ir_type type, int depth);

static inline int rm_int_const(rm_gen *g) {
    static const int32_t wide[] = {INT32_MAX, INT32_MIN, INT32_MIN + 1, 1 << 20, -(1 << 24), 65536};
    if (rnd_below(g->r, 10) == 0) return ir_const_int(g->m, wide[rnd_below(g->r, 6)]);
    return ir_const_int(g->m, rnd_range(g->r, -9, 20));
}

static inline int rm_index_leaf(rm_gen *g) {
    static const ir_op leaves[] = {IR_Q, IR_KV, IR_Q, IR_KV, IR_B, IR_H};
    return ir_leaf(g->m, leaves[rnd_below(g->r, 6)]);
}

/* An index into dim d of buffer buf: usually reduced modulo the size. */
static inline int rm_index(rm_gen *g, int buf, int d, int depth) {
    int e = rnd_below(g->r, 2) ? rm_index_leaf(g) : rm_expr(g, IR_INT, depth);
    if (g->out_of_range_rate && rnd_below(g->r, g->out_of_range_rate) == 0) return e;
    int size = ir_const_int(g->m, (int32_t)g->bufs->views[buf].sizes[d]);
    if (rnd_below(g->r, 4) == 0) {
        /* clamp instead of modulo */
        int lo = ir_const_int(g->m, 0);
        int hi = ir_const_int(g->m, (int32_t)g->bufs->views[buf].sizes[d] - 1);
        return ir_binary(g->m, IR_MIN, IR_INT, ir_binary(g->m, IR_MAX, IR_INT, e, lo), hi);
    }
    return ir_binary(g->m, IR_MOD, IR_INT, e, size);
}

static inline int rm_load(rm_gen *g, ir_type type, int depth) {
    int cand[RM_MAX_BUFS], nc = 0;
    for (int i = 0; i < g->m->num_buffers; i++)
        if (ir_type_of_dtype(g->m->buffers[i].dtype) == type) cand[nc++] = i;
    if (nc == 0) return -1;
    int buf = cand[rnd_below(g->r, nc)];
    int32_t idx[4];
    for (int d = 0; d < g->m->buffers[buf].ndim; d++)
        idx[d] = rm_index(g, buf, d, depth - 1);
    return ir_load(g->m, buf, type, g->m->buffers[buf].ndim, idx);
}

static int rm_expr(rm_gen *g, ir_type type, int depth) {
    rnd *r = g->r;
    ir_mod *m = g->m;
    if (g->pool_count[type] > 0 && rnd_below(r, 6) == 0)
        return g->pool[type][rnd_below(r, g->pool_count[type])];
    if (depth <= 0 || rnd_below(r, 5) == 0) {
        /* leaves */
        if (type == IR_INT) {
            if (rnd_below(r, 3) == 0) return rm_int_const(g);
            return rm_index_leaf(g);
        }
        if (type == IR_BOOL) {
            if (rnd_below(r, 4) == 0) return ir_const_bool(m, rnd_below(r, 2));
            int a = ir_leaf(m, rnd_below(r, 2) ? IR_Q : IR_KV);
            int b = rnd_below(r, 2) ? ir_leaf(m, IR_KV) : rm_int_const(g);
            return ir_binary(m, (ir_op)(IR_EQ + rnd_below(r, 6)), IR_BOOL, a, b);
        }
        if (g->allow_score && rnd_below(r, 2)) return ir_leaf(m, IR_SCORE);
        if (rnd_below(r, 2)) return ir_const_float(m, rm_special_float(r));
        return ir_unary(m, IR_TO_FLOAT, IR_FLOAT, rm_index_leaf(g));
    }
    int d = depth - 1;
    int node = -1;
    if (rnd_below(r, 8) == 0) {
        node = rm_load(g, type, depth);
        if (node >= 0) return rm_remember(g, type, node);
    }
    if (rnd_below(r, 12) == 0) {
        int c = rm_expr(g, IR_BOOL, d);
        node = ir_select(m, type, c, rm_expr(g, type, d), rm_expr(g, type, d));
        return rm_remember(g, type, node);
    }
    if (type == IR_INT) {
        static const ir_op bin[] = {IR_ADD, IR_SUB, IR_MUL,      IR_FLOORDIV, IR_MOD,
                                    IR_MIN, IR_MAX, IR_AND,      IR_OR,       IR_XOR,
                                    IR_ADD, IR_SUB, IR_FLOORDIV, IR_MOD};
        int k = rnd_below(r, 20);
        if (k < 14) {
            node = ir_binary(m, bin[k], IR_INT, rm_expr(g, IR_INT, d), rm_expr(g, IR_INT, d));
        } else if (k == 14) {
            node = ir_unary(m, IR_NEG, IR_INT, rm_expr(g, IR_INT, d));
        } else if (k == 15) {
            node = ir_unary(m, IR_BITNOT, IR_INT, rm_expr(g, IR_INT, d));
        } else if (k == 16) {
            node = ir_unary(m, IR_ABS, IR_INT, rm_expr(g, IR_INT, d));
        } else if (k == 17) {
            node = ir_unary(m, IR_TO_INT, IR_INT, rm_expr(g, IR_FLOAT, d));
        } else if (k == 18) {
            node = ir_unary(m, IR_TO_INT, IR_INT, rm_expr(g, IR_BOOL, d));
        } else {
            node = ir_binary(m, IR_DIV, IR_INT, rm_expr(g, IR_INT, d), rm_expr(g, IR_INT, d));
        }
    } else if (type == IR_FLOAT) {
        static const ir_op un[] = {IR_NEG,         IR_ABS,     IR_EXP,   IR_EXP2, IR_LOG, IR_LOG2,
                                   IR_SQRT,        IR_RSQRT,   IR_SIN,   IR_COS,  IR_TAN, IR_TANH,
                                   IR_TANH_APPROX, IR_SIGMOID, IR_FLOOR, IR_CEIL};
        static const ir_op bin[] = {IR_ADD, IR_SUB, IR_MUL, IR_DIV, IR_FLOORDIV, IR_MOD,
                                    IR_POW, IR_MIN, IR_MAX, IR_ADD, IR_MUL,      IR_SUB};
        int k = rnd_below(r, 32);
        if (k < 16) {
            node = ir_unary(m, un[k], IR_FLOAT, rm_expr(g, IR_FLOAT, d));
        } else if (k < 28) {
            node = ir_binary(m, bin[k - 16], IR_FLOAT, rm_expr(g, IR_FLOAT, d),
                             rm_expr(g, IR_FLOAT, d));
        } else if (k < 31) {
            node = ir_unary(m, IR_TO_FLOAT, IR_FLOAT, rm_expr(g, IR_INT, d));
        } else {
            node = ir_unary(m, IR_TO_FLOAT, IR_FLOAT, rm_expr(g, IR_BOOL, d));
        }
    } else {
        int k = rnd_below(r, 16);
        if (k < 6) {
            node = ir_binary(m, (ir_op)(IR_EQ + k), IR_BOOL, rm_expr(g, IR_INT, d),
                             rm_expr(g, IR_INT, d));
        } else if (k < 9) {
            node = ir_binary(m, (ir_op)(IR_EQ + rnd_below(r, 6)), IR_BOOL, rm_expr(g, IR_FLOAT, d),
                             rm_expr(g, IR_FLOAT, d));
        } else if (k == 9) {
            node = ir_binary(m, (ir_op)(IR_EQ + rnd_below(r, 2)), IR_BOOL, rm_expr(g, IR_BOOL, d),
                             rm_expr(g, IR_BOOL, d));
        } else if (k == 10) {
            node = ir_unary(m, IR_NOT, IR_BOOL, rm_expr(g, IR_BOOL, d));
        } else if (k == 11) {
            node = ir_binary(m, rnd_below(r, 2) ? IR_MIN : IR_MAX, IR_BOOL, rm_expr(g, IR_BOOL, d),
                             rm_expr(g, IR_BOOL, d));
        } else {
            static const ir_op logic[] = {IR_AND, IR_OR, IR_XOR, IR_AND};
            node = ir_binary(m, logic[k - 12], IR_BOOL, rm_expr(g, IR_BOOL, d),
                             rm_expr(g, IR_BOOL, d));
        }
    }
    return rm_remember(g, type, node);
}

/*
 * A random mod of the given kind with random buffers; m is initialised here
 * (ir_free it) and bufs filled (rm_buffers_free). Returns 0, -1 on failure.
 */
static inline int rm_random_mod(rnd *r, flex_mod_kind kind, int depth, int out_of_range_rate,
                                ir_mod *m, rm_buffers *bufs) {
    static const flex_dtype dts[] = {FLEX_I32, FLEX_I64, FLEX_U8,  FLEX_BOOL,
                                     FLEX_F32, FLEX_F16, FLEX_BF16};
    ir_init(m, kind);
    memset(bufs, 0, sizeof *bufs);
    int nb = rnd_below(r, 4);
    for (int i = 0; i < nb; i++)
        rm_add_buffer(r, m, bufs, dts[rnd_below(r, 7)], rnd_range(r, 1, 3), 1);
    rm_gen g;
    memset(&g, 0, sizeof g);
    g.r = r;
    g.m = m;
    g.bufs = bufs;
    g.allow_score = kind == FLEX_MOD_SCORE;
    g.out_of_range_rate = out_of_range_rate;
    int root = rm_expr(&g, kind == FLEX_MOD_SCORE ? IR_FLOAT : IR_BOOL, depth);
    if (root < 0) return -1;
    m->root = root;
    return ir_compact(m);
}

/* Bitwise equality of evaluator results, with every NaN equal to every NaN. */
static inline int rm_same_float(float a, float b) {
    if (a != a && b != b) return 1;
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

#endif /* FLEXATTN_TESTS_MOD_RANDOM_H */
