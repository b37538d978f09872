/*
 * Interval analysis is sound: on random boxes of random masks (and of the
 * seed masks), a TRUE verdict means every point attends, FALSE means none
 * does, and a box with an out-of-range read is never decided. It is also
 * useful: the easy cases (blocks below or above the causal diagonal, blocks
 * inside one document) are decided.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/eval.h"
#include "mod/parse.h"
#include "mod_random.h"

typedef struct box_stats {
    int decided, unknown, errors;
} box_stats;

/* Evaluates every point of box and checks the verdict against it. */
static mod_tri check_box(const ir_mod *m, const mod_buffer_view *views,
                         const mod_range_tables *tables, const mod_box *box, void *scratch,
                         ir_value *point_scratch, box_stats *st, const char *what) {
    mod_tri v = mod_interval_mask(m, tables, box, scratch);
    ck_assert(v == MOD_TRI_TRUE || v == MOD_TRI_FALSE || v == MOD_TRI_UNKNOWN);
    int seen_true = 0, seen_false = 0, seen_error = 0;
    for (int64_t b = box->lo[0]; b <= box->hi[0]; b++)
        for (int64_t h = box->lo[1]; h <= box->hi[1]; h++)
            for (int64_t q = box->lo[2]; q <= box->hi[2]; q++)
                for (int64_t kv = box->lo[3]; kv <= box->hi[3]; kv++) {
                    ir_value res;
                    mod_bounds_error err;
                    memset(&err, 0, sizeof err);
                    if (mod_eval_point(m, views, 0.0f, (int32_t)b, (int32_t)h, (int32_t)q,
                                       (int32_t)kv, point_scratch, &res, &err) != 0) {
                        seen_error = 1;
                        continue;
                    }
                    if (res.i)
                        seen_true = 1;
                    else
                        seen_false = 1;
                    /* plain tests first: an assertion per point would dominate the run */
                    if (v == MOD_TRI_TRUE && !res.i)
                        ck_abort_msg("%s: TRUE verdict but b=%lld h=%lld q=%lld kv=%lld "
                                     "is false",
                                     what, (long long)b, (long long)h, (long long)q, (long long)kv);
                    if (v == MOD_TRI_FALSE && res.i)
                        ck_abort_msg("%s: FALSE verdict but b=%lld h=%lld q=%lld "
                                     "kv=%lld is true",
                                     what, (long long)b, (long long)h, (long long)q, (long long)kv);
                }
    if (seen_error)
        ck_assert_msg(v == MOD_TRI_UNKNOWN, "%s: box with an out-of-range read was decided", what);
    (void)seen_true;
    (void)seen_false;
    if (st) {
        if (seen_error) st->errors++;
        if (v == MOD_TRI_UNKNOWN)
            st->unknown++;
        else
            st->decided++;
    }
    return v;
}

static int extent(rnd *r) {
    int k = rnd_below(r, 10);
    if (k < 3) return 1;
    if (k < 8) return rnd_range(r, 1, 16);
    return rnd_range(r, 1, 64);
}

static mod_box random_box(rnd *r) {
    mod_box box;
    for (int d = 0; d < 2; d++) {
        box.lo[d] = rnd_range(r, 0, 4);
        box.hi[d] = box.lo[d] + (rnd_below(r, 3) == 0 ? 1 : 0);
    }
    int q_ext = extent(r), kv_ext = extent(r);
    if (q_ext * kv_ext > 1024) kv_ext = 1024 / q_ext; /* keep exhaustive checks cheap */
    if (rnd_below(r, 40) == 0) {
        /* near the ends of int32, where index arithmetic wraps */
        box.lo[2] = rnd_below(r, 2) ? INT32_MAX - q_ext + 1 : INT32_MIN;
        box.lo[3] = rnd_below(r, 2) ? INT32_MAX - kv_ext + 1 : rnd_range(r, -20, 20);
    } else {
        box.lo[2] = rnd_range(r, -30, 330);
        box.lo[3] = rnd_range(r, -30, 330);
    }
    box.hi[2] = box.lo[2] + q_ext - 1;
    box.hi[3] = box.lo[3] + kv_ext - 1;
    return box;
}

START_TEST(random_masks_are_sound) {
    rnd r;
    box_stats st = {0, 0, 0};
    int boxes = 0;
    for (int iter = 0; iter < 400; iter++) {
        rnd_seed(&r, 90000 + (uint64_t)iter);
        ir_mod m;
        rm_buffers bufs;
        ck_assert_int_eq(
            rm_random_mod(&r, FLEX_MOD_MASK, rnd_range(&r, 1, 6), iter % 4 == 0 ? 5 : 0, &m, &bufs),
            0);
        mod_range_tables *tables = mod_range_tables_build(&m, bufs.views);
        ck_assert_ptr_nonnull(tables);
        void *scratch = malloc(mod_interval_scratch_size(&m) + 1);
        ir_value *point = malloc((size_t)m.num_nodes * sizeof *point);
        char what[64];
        snprintf(what, sizeof what, "random mask %d", iter);
        for (int k = 0; k < 26; k++) {
            mod_box box = random_box(&r);
            check_box(&m, bufs.views, tables, &box, scratch, point, &st, what);
            boxes++;
        }
        free(scratch);
        free(point);
        mod_range_tables_free(tables);
        rm_buffers_free(&bufs);
        ir_free(&m);
    }
    ck_assert_int_ge(boxes, 10000);
    /* the analysis decides a good share of random boxes and the generator
     * produces out-of-range reads */
    ck_assert_int_gt(st.decided, boxes / 4);
    ck_assert_int_gt(st.errors, 50);
}
END_TEST

/* A select's int branch that its condition compares is taken only on the
 * condition's side: where(n < 8, n, m) is n below 8. A read proved in
 * range with that is in range at every point of the box (checked point by
 * point), and T5's bucket, side + where(n < 8, n, clamp(...)), is proved
 * inside a table of 32. */
START_TEST(select_branches_follow_their_condition) {
    static const char *const forms[] = {
        "score + t[where(q - kv < C, q - kv, 0) + O]",
        "score + t[where(C > kv - q, kv - q, 1) + O]",
        "score + t[where(q - kv >= C, 2, q - kv) + O]",
        "score + t[where(C <= abs(q - kv), 0, abs(q - kv)) + O]",
        "score + t[where(q <= kv + C, q, kv) + O]",
    };
    static float data[64];
    flex_buffer_decl decl = {"t", FLEX_F32, 1};
    rnd r;
    rnd_seed(&r, 4242);
    int proved = 0, refused = 0;
    for (int iter = 0; iter < 600; iter++) {
        const int form = iter % 5, c = rnd_range(&r, -6, 12), o = rnd_range(&r, 0, 30);
        const int size = rnd_range(&r, 8, 64);
        flex_param params[2] = {{"C", 0, c}, {"O", 0, o}};
        flex_mod_desc desc = {FLEX_MOD_SCORE, forms[form], params, 2, &decl, 1};
        ir_mod m;
        char err[256];
        ck_assert_msg(mod_parse(&desc, &m, err, sizeof err) == FLEX_OK, "%s", err);
        const int64_t sizes[1][4] = {{size, 0, 0, 0}};
        const int64_t q0 = rnd_range(&r, 0, 40), k0 = rnd_range(&r, 0, 40);
        const mod_box box = {{0, 0, q0, k0}, {0, 0, q0 + 23, k0 + 23}};
        unsigned char *in = malloc((size_t)m.num_nodes);
        ck_assert_int_eq(mod_interval_loads_in_range(&m, &box, sizes, in), 0);
        int load = -1;
        for (int n = 0; n < m.num_nodes; n++)
            if (m.nodes[n].op == IR_LOAD) load = n;
        ck_assert_int_ge(load, 0);
        mod_buffer_view view = {data, FLEX_F32, 1, {size, 0, 0, 0}, {1, 0, 0, 0}};
        ir_value *scratch = malloc((size_t)m.num_nodes * sizeof *scratch);
        int any_out = 0;
        for (int64_t q = box.lo[2]; q <= box.hi[2]; q++)
            for (int64_t kv = box.lo[3]; kv <= box.hi[3]; kv++) {
                ir_value res;
                mod_bounds_error e = {0};
                any_out |= mod_eval_point(&m, &view, 0.5f, 0, 0, (int32_t)q, (int32_t)kv, scratch,
                                          &res, &e) != 0;
            }
        ck_assert_msg(!(in[load] && any_out), "%s (C %d, O %d, size %d): proved, yet a read leaves",
                      forms[form], c, o, size);
        proved += in[load];
        refused += !in[load];
        free(scratch);
        free(in);
        ir_free(&m);
    }
    ck_assert_int_gt(proved, 100);  /* the narrowing proves reads ... */
    ck_assert_int_gt(refused, 100); /* ... and the cases are not all easy */
    /* and as tightly as the relation allows: |q - kv| below 5 fits 5 */
    static const char *const tight[] = {"score + t[where(abs(q - kv) < 5, abs(q - kv), 0)]",
                                        "score + t[where(5 <= abs(q - kv), 0, abs(q - kv))]",
                                        "score + t[where(abs(q - kv) > 4, 1, abs(q - kv))]",
                                        "score + t[where(4 >= abs(q - kv), abs(q - kv), 2)]"};
    for (size_t i = 0; i < sizeof tight / sizeof tight[0]; i++)
        for (int size = 4; size <= 5; size++) {
            flex_mod_desc desc = {FLEX_MOD_SCORE, tight[i], NULL, 0, &decl, 1};
            ir_mod m;
            char err[256];
            ck_assert_msg(mod_parse(&desc, &m, err, sizeof err) == FLEX_OK, "%s", err);
            const int64_t sizes[1][4] = {{size, 0, 0, 0}};
            const mod_box box = {{0, 0, 0, 0}, {0, 0, 99, 99}};
            unsigned char *in = malloc((size_t)m.num_nodes);
            ck_assert_int_eq(mod_interval_loads_in_range(&m, &box, sizes, in), 0);
            for (int n = 0; n < m.num_nodes; n++)
                if (m.nodes[n].op == IR_LOAD)
                    ck_assert_msg(in[n] == (size == 5), "%s: table of %d", tight[i], size);
            free(in);
            ir_free(&m);
        }
    /* T5 */
    flex_buffer_decl tab = {"tab", FLEX_F32, 2};
    flex_mod_desc desc = {FLEX_MOD_SCORE,
                          "let rel = kv - q; let n = abs(rel); "
                          "let large = clamp(8 + int(log(float(n) / 8.0 + 0.000001) / 2.7725887 * "
                          "8.0), 0, 15); score + tab[h][where(rel > 0, 16, 0) + where(n < 8, n, "
                          "large)]",
                          NULL,
                          0,
                          &tab,
                          1};
    ir_mod m;
    char err[256];
    ck_assert_msg(mod_parse(&desc, &m, err, sizeof err) == FLEX_OK, "%s", err);
    const mod_box all = {{0, 0, 0, 0}, {3, 15, 8191, 8191}};
    unsigned char *in = malloc((size_t)m.num_nodes);
    for (int size = 31; size <= 32; size++) {
        const int64_t sizes[1][4] = {{16, size, 0, 0}};
        ck_assert_int_eq(mod_interval_loads_in_range(&m, &all, sizes, in), 0);
        int load = -1;
        for (int n = 0; n < m.num_nodes; n++)
            if (m.nodes[n].op == IR_LOAD) load = n;
        ck_assert_int_eq(in[load], size == 32);
    }
    free(in);
    ir_free(&m);
}
END_TEST

/* Tables give the exact min and max over any 1-dim interval and over rows
 * of a 2-dim (possibly transposed) view. */
START_TEST(range_tables_are_exact) {
    rnd r;
    rnd_seed(&r, 31337);
    static const flex_dtype dts[] = {FLEX_I32, FLEX_I64, FLEX_U8, FLEX_F32, FLEX_F16, FLEX_BF16};
    for (int iter = 0; iter < 60; iter++) {
        flex_dtype dt = dts[iter % 6];
        int is_float = dt == FLEX_F32 || dt == FLEX_F16 || dt == FLEX_BF16;
        ir_mod m;
        ir_init(&m, FLEX_MOD_MASK);
        rm_buffers bufs;
        memset(&bufs, 0, sizeof bufs);
        int ndim = iter % 3 == 2 ? 2 : 1;
        rm_add_buffer(&r, &m, &bufs, dt, ndim, 0);
        mod_buffer_view *v = &bufs.views[0];
        if (ndim == 1) {
            /* a long buffer so the hierarchy has many levels */
            free(bufs.data[0]);
            v->sizes[0] = rnd_range(&r, 1, 4000);
            v->strides[0] = rnd_range(&r, 1, 2);
            size_t n = (size_t)(v->sizes[0] * v->strides[0]);
            bufs.data[0] = calloc(n, flex_dtype_size(dt));
            v->data = bufs.data[0];
            for (size_t k = 0; k < n; k++)
                rm_fill_element(&r, dt, bufs.data[0], (int64_t)k, 1, 0);
        }
        /* tables are built for buffers the mod reads */
        int32_t read_args[2] = {ir_leaf(&m, IR_H), ir_leaf(&m, IR_Q)};
        m.root = ir_load(&m, 0, is_float ? IR_FLOAT : IR_INT, ndim,
                         ndim == 2 ? read_args : read_args + 1);
        mod_range_tables *tables = mod_range_tables_build(&m, bufs.views);
        ck_assert_ptr_nonnull(tables);
        for (int k = 0; k < 40; k++) {
            /* an interval of q; in 2 dims the row is h */
            int64_t size = v->sizes[ndim - 1];
            int64_t lo = rnd_below(&r, (int)size);
            int64_t hi =
                lo + rnd_below(&r, (int)(k % 2 ? size - lo : (size - lo < 64 ? size - lo : 64)));
            int64_t row = ndim == 2 ? rnd_below(&r, (int)v->sizes[0]) : 0;
            double mn = INFINITY, mx = -INFINITY;
            for (int64_t i = lo; i <= hi; i++) {
                int32_t idx[2] = {(int32_t)row, (int32_t)i};
                mod_bounds_error err;
                memset(&err, 0, sizeof err);
                ir_value val;
                if (mod_buffer_read(v, 0, ndim == 2 ? idx : idx + 1, &val, &err) != 0)
                    ck_abort_msg("in-range read failed");
                double x = is_float ? (double)val.f : (double)val.i;
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
            }
            /* mask: lo_bound <= buf[...q] <= hi_bound */
            ir_mod mm;
            ir_init(&mm, FLEX_MOD_MASK);
            mm.buffers[0] = m.buffers[0];
            mm.num_buffers = 1;
            int32_t args[2] = {ir_leaf(&mm, IR_H), ir_leaf(&mm, IR_Q)};
            int load =
                ir_load(&mm, 0, is_float ? IR_FLOAT : IR_INT, ndim, ndim == 2 ? args : args + 1);
            for (int variant = 0; variant < 3; variant++) {
                double lb = mn, ub = mx;
                /* the minimum (maximum) is attained: a narrower bound is not TRUE */
                if (variant == 1) {
                    if (isinf(mn) || (!is_float && mn >= INT32_MAX)) continue;
                    lb = is_float ? (double)nextafterf((float)mn, INFINITY) : mn + 1;
                }
                if (variant == 2) {
                    if (isinf(mx) || (!is_float && mx <= INT32_MIN)) continue;
                    ub = is_float ? (double)nextafterf((float)mx, -INFINITY) : mx - 1;
                }
                int clo =
                    is_float ? ir_const_float(&mm, (float)lb) : ir_const_int(&mm, (int32_t)lb);
                int chi =
                    is_float ? ir_const_float(&mm, (float)ub) : ir_const_int(&mm, (int32_t)ub);
                int c1 = ir_binary(&mm, IR_LE, IR_BOOL, clo, load);
                int c2 = ir_binary(&mm, IR_LE, IR_BOOL, load, chi);
                mm.root = ir_binary(&mm, IR_AND, IR_BOOL, c1, c2);
                mod_box box = {{0, row, lo, 0}, {0, row, hi, 0}};
                uint64_t scratch_mem[64 * 4];
                ck_assert(mod_interval_scratch_size(&mm) <= sizeof scratch_mem);
                mod_tri t = mod_interval_mask(&mm, tables, &box, scratch_mem);
                if (variant == 0)
                    ck_assert_msg(t == MOD_TRI_TRUE, "dtype %d [%lld, %lld]: exact range not TRUE",
                                  (int)dt, (long long)lo, (long long)hi);
                else
                    ck_assert_msg(t != MOD_TRI_TRUE,
                                  "dtype %d ndim %d row %lld [%lld, %lld] variant %d: a narrower "
                                  "range [%g, %g] was decided (verdict %d)",
                                  (int)dt, ndim, (long long)row, (long long)lo, (long long)hi,
                                  variant, lb, ub, (int)t);
            }
            ir_free(&mm);
        }
        mod_range_tables_free(tables);
        rm_buffers_free(&bufs);
        ir_free(&m);
    }
}
END_TEST

/*
 * Every op on extreme operands: operands are buffer reads fa[q], fa[kv]
 * (floats: infinities, NaN, signed zeros, subnormals, overflow thresholds)
 * or ia[q], ia[kv] (ints near the ends of int32), so a small box spans a
 * few arbitrary values. The op's result is compared with a constant taken
 * from the op's own value at a point of the box (or one ulp / one away from
 * it), which probes the end points of the computed range.
 */
enum { OPS_LEN = 96 };

static float extreme_float(rnd *r) {
    static const float v[] = {0.0f,           -0.0f,    1.0f,      -1.0f,      INFINITY,
                              -INFINITY,      NAN,      1e-45f,    -1e-45f,    3.4028235e38f,
                              -3.4028235e38f, 1e30f,    0.5f,      -0.5f,      3.0f,
                              100.0f,         -100.0f,  88.72284f, -87.33655f, 2147483648.0f,
                              -2147483904.0f, 0.999999f};
    int k = rnd_below(r, 30);
    if (k < (int)(sizeof v / sizeof v[0])) return v[k];
    return (rnd_unit(r) - 0.5f) * 10.0f;
}

static int32_t extreme_int(rnd *r) {
    static const int32_t v[] = {
        INT32_MIN, INT32_MAX, INT32_MIN + 1, INT32_MAX - 1, 0,    1, -1, 2, -2,
        7,         -7,        65536,         -65536,        46341};
    int k = rnd_below(r, 24);
    if (k < (int)(sizeof v / sizeof v[0])) return v[k];
    return rnd_below(r, 2) ? rnd_range(r, -20, 20) : (int32_t)(uint32_t)rnd_next(r);
}

START_TEST(ops_on_extreme_values_are_sound) {
    static const ir_op float_unary[] = {
        IR_NEG, IR_ABS, IR_EXP,  IR_EXP2,        IR_LOG,     IR_LOG2,  IR_SQRT, IR_RSQRT, IR_SIN,
        IR_COS, IR_TAN, IR_TANH, IR_TANH_APPROX, IR_SIGMOID, IR_FLOOR, IR_CEIL, IR_TO_INT};
    static const ir_op float_binary[] = {IR_ADD, IR_SUB, IR_MUL, IR_DIV, IR_FLOORDIV,
                                         IR_MOD, IR_POW, IR_MIN, IR_MAX};
    static const ir_op int_unary[] = {IR_NEG, IR_ABS, IR_BITNOT, IR_TO_FLOAT};
    static const ir_op int_binary[] = {IR_ADD, IR_SUB, IR_MUL, IR_DIV, IR_FLOORDIV, IR_MOD,
                                       IR_MIN, IR_MAX, IR_AND, IR_OR,  IR_XOR};
    rnd r;
    rnd_seed(&r, 2718);
    float fa[OPS_LEN];
    int32_t ia[OPS_LEN];
    for (int i = 0; i < OPS_LEN; i++) {
        fa[i] = extreme_float(&r);
        ia[i] = extreme_int(&r);
    }
    /* a NaN-free half, so some boxes have no NaN at all */
    for (int i = 0; i < OPS_LEN / 2; i++)
        if (fa[i] != fa[i]) fa[i] = 2.0f;
    mod_buffer_view views[2];
    memset(views, 0, sizeof views);
    views[0].data = fa;
    views[0].dtype = FLEX_F32;
    views[1].data = ia;
    views[1].dtype = FLEX_I32;
    for (int i = 0; i < 2; i++) {
        views[i].ndim = 1;
        views[i].sizes[0] = OPS_LEN;
        views[i].strides[0] = 1;
    }
    int nfu = (int)(sizeof float_unary / sizeof float_unary[0]);
    int nfb = (int)(sizeof float_binary / sizeof float_binary[0]);
    int niu = (int)(sizeof int_unary / sizeof int_unary[0]);
    int nib = (int)(sizeof int_binary / sizeof int_binary[0]);
    int decided = 0, total = 0;
    for (int k = 0; k < nfu + nfb + niu + nib; k++) {
        ir_mod m;
        ir_init(&m, FLEX_MOD_MASK);
        snprintf(m.buffers[0].name, sizeof m.buffers[0].name, "fa");
        m.buffers[0].dtype = FLEX_F32;
        m.buffers[0].ndim = 1;
        snprintf(m.buffers[1].name, sizeof m.buffers[1].name, "ia");
        m.buffers[1].dtype = FLEX_I32;
        m.buffers[1].ndim = 1;
        m.num_buffers = 2;
        int32_t q = ir_leaf(&m, IR_Q), kv = ir_leaf(&m, IR_KV);
        int fq = ir_load(&m, 0, IR_FLOAT, 1, &q), fk = ir_load(&m, 0, IR_FLOAT, 1, &kv);
        int iq = ir_load(&m, 1, IR_INT, 1, &q), ik = ir_load(&m, 1, IR_INT, 1, &kv);
        int inner;
        if (k < nfu) {
            ir_op op = float_unary[k];
            inner = ir_unary(&m, op, op == IR_TO_INT ? IR_INT : IR_FLOAT, fq);
        } else if (k < nfu + nfb) {
            inner = ir_binary(&m, float_binary[k - nfu], IR_FLOAT, fq, fk);
        } else if (k < nfu + nfb + niu) {
            ir_op op = int_unary[k - nfu - nfb];
            inner = ir_unary(&m, op, op == IR_TO_FLOAT ? IR_FLOAT : IR_INT, iq);
        } else {
            inner = ir_binary(&m, int_binary[k - nfu - nfb - niu], IR_INT, iq, ik);
        }
        ir_type inner_type = (ir_type)m.nodes[inner].type;
        for (int rep = 0; rep < 150; rep++) {
            mod_box box = {{0, 0, 0, 0}, {0, 0, 0, 0}};
            box.lo[2] = rnd_below(&r, OPS_LEN);
            box.lo[3] = rnd_below(&r, OPS_LEN);
            box.hi[2] = box.lo[2] + rnd_below(&r, 4);
            box.hi[3] = box.lo[3] + rnd_below(&r, 4);
            if (box.hi[2] >= OPS_LEN) box.hi[2] = OPS_LEN - 1;
            if (box.hi[3] >= OPS_LEN) box.hi[3] = OPS_LEN - 1;
            /* the op's value at a random point of the box */
            ir_mod probe;
            ck_assert_int_eq(ir_copy(&probe, &m), 0);
            probe.root = inner;
            ir_value *point = malloc((size_t)probe.num_nodes * sizeof *point);
            ir_value at;
            mod_bounds_error err;
            memset(&err, 0, sizeof err);
            ck_assert_int_eq(mod_eval_point(&probe, views, 0.0f, 0, 0,
                                            (int32_t)(box.lo[2] + rnd_below(&r, 4) %
                                                                      (box.hi[2] - box.lo[2] + 1)),
                                            (int32_t)box.lo[3], point, &at, &err),
                             0);
            ir_free(&probe);
            free(point);
            int c;
            int nudge = rnd_range(&r, -1, 1);
            if (inner_type == IR_FLOAT) {
                float f = at.f;
                if (f != f) f = extreme_float(&r);
                if (nudge) f = nextafterf(f, nudge > 0 ? INFINITY : -INFINITY);
                c = ir_const_float(&m, f);
            } else {
                int64_t v = (int64_t)at.i + nudge;
                if (v > INT32_MAX || v < INT32_MIN) v = at.i;
                c = ir_const_int(&m, (int32_t)v);
            }
            ir_mod test;
            ck_assert_int_eq(ir_copy(&test, &m), 0);
            test.root = ir_binary(&test, (ir_op)(IR_EQ + rnd_below(&r, 6)), IR_BOOL, inner, c);
            mod_range_tables *tables = mod_range_tables_build(&test, views);
            void *scratch = malloc(mod_interval_scratch_size(&test));
            ir_value *pts = malloc((size_t)test.num_nodes * sizeof *pts);
            box_stats st = {0, 0, 0};
            char what[64];
            snprintf(what, sizeof what, "op case %d (%s)", k, ir_op_name((ir_op)m.nodes[inner].op));
            check_box(&test, views, tables, &box, scratch, pts, &st, what);
            decided += st.decided;
            total++;
            free(scratch);
            free(pts);
            mod_range_tables_free(tables);
            ir_free(&test);
        }
        ir_free(&m);
    }
    ck_assert_int_gt(decided, total / 6);
}
END_TEST

/* ---- seed masks ---- */

enum { SEQ = 256, NUM_IMAGES = 6 };

typedef struct seed_env {
    int32_t doc[SEQ];
    int32_t img_of[SEQ];
    int32_t img_lo[NUM_IMAGES], img_hi[NUM_IMAGES];
    flex_buffer_decl decls[4];
} seed_env;

static void seed_env_init(seed_env *e, rnd *r) {
    int doc = 0;
    for (int i = 0; i < SEQ; i++) {
        if (i > 0 && rnd_below(r, 40) == 0) doc++;
        e->doc[i] = doc;
        e->img_of[i] = (i * NUM_IMAGES) / SEQ; /* sorted, like interleaved images */
    }
    for (int k = 0; k < NUM_IMAGES; k++) {
        e->img_lo[k] = rnd_range(r, 0, SEQ - 1);
        e->img_hi[k] = e->img_lo[k] + rnd_range(r, 0, 120);
    }
    flex_buffer_decl d[4] = {
        {"doc", FLEX_I32, 1}, {"img_of", FLEX_I32, 1}, {"lo", FLEX_I32, 1}, {"hi", FLEX_I32, 1}};
    memcpy(e->decls, d, sizeof d);
}

static void seed_env_views(seed_env *e, const ir_mod *m, mod_buffer_view *views) {
    for (int i = 0; i < m->num_buffers; i++) {
        mod_buffer_view *v = &views[i];
        memset(v, 0, sizeof *v);
        v->dtype = FLEX_I32;
        v->ndim = 1;
        v->strides[0] = 1;
        const char *n = m->buffers[i].name;
        if (!strcmp(n, "doc")) {
            v->data = e->doc;
            v->sizes[0] = SEQ;
        } else if (!strcmp(n, "img_of")) {
            v->data = e->img_of;
            v->sizes[0] = SEQ;
        } else if (!strcmp(n, "lo")) {
            v->data = e->img_lo;
            v->sizes[0] = NUM_IMAGES;
        } else {
            v->data = e->img_hi;
            v->sizes[0] = NUM_IMAGES;
        }
    }
}

static int parse_seed(const char *text, seed_env *e, ir_mod *m) {
    static const flex_param params[] = {
        {"W", 0, 20}, {"P", 0, 37}, {"IW", 0, 16}, {"IH", 0, 16}, {"K", 0, 5}, {"WIN", 0, 2},
    };
    flex_mod_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.kind = FLEX_MOD_MASK;
    desc.text = text;
    desc.params = params;
    desc.num_params = (int)(sizeof params / sizeof params[0]);
    desc.buffers = e->decls;
    desc.num_buffers = 4;
    char msg[512];
    flex_status st = mod_parse(&desc, m, msg, sizeof msg);
    ck_assert_msg(st == FLEX_OK, "%s: %s", text, msg);
    return 0;
}

static const char *const seed_texts[] = {
    "q >= kv",
    "q >= kv && q - kv <= W",
    "kv <= P || q >= kv",
    "q >= kv && doc[q] == doc[kv]",
    "let qx = q / IW; let qy = q % IW; let kx = kv / IW; let ky = kv % IW;\n"
    "let cx = clamp(qx, K / 2, IH - 1 - K / 2); let cy = clamp(qy, K / 2, IW - 1 - K / 2);\n"
    "abs(cx - kx) <= K / 2 && abs(cy - ky) <= K / 2",
    "abs(q / IW - kv / IW) <= WIN && abs(q % IW - kv % IW) <= WIN",
    "let img = img_of[kv]; q >= lo[img] && q < hi[img]",
    "doc[q] == doc[kv]",
};

/* Random and block-aligned boxes over every seed mask. */
START_TEST(seed_masks_are_sound) {
    rnd r;
    rnd_seed(&r, 5150);
    seed_env env;
    seed_env_init(&env, &r);
    for (size_t s = 0; s < sizeof seed_texts / sizeof seed_texts[0]; s++) {
        ir_mod m;
        parse_seed(seed_texts[s], &env, &m);
        mod_buffer_view views[IR_MAX_BUFFERS];
        seed_env_views(&env, &m, views);
        mod_range_tables *tables = mod_range_tables_build(&m, views);
        void *scratch = malloc(mod_interval_scratch_size(&m) + 1);
        ir_value *point = malloc((size_t)m.num_nodes * sizeof *point);
        box_stats st = {0, 0, 0};
        for (int k = 0; k < 300; k++) {
            mod_box box;
            box.lo[0] = box.hi[0] = 0;
            box.lo[1] = box.hi[1] = 0;
            if (k % 2 == 0) {
                int bs = 1 << rnd_range(&r, 2, 6);
                box.lo[2] = (int64_t)rnd_below(&r, SEQ / bs) * bs;
                box.lo[3] = (int64_t)rnd_below(&r, SEQ / bs) * bs;
                box.hi[2] = box.lo[2] + bs - 1;
                box.hi[3] = box.lo[3] + bs - 1;
            } else {
                box.lo[2] = rnd_range(&r, -4, SEQ - 1);
                box.lo[3] = rnd_range(&r, -4, SEQ - 1);
                box.hi[2] = box.lo[2] + rnd_range(&r, 0, 40);
                box.hi[3] = box.lo[3] + rnd_range(&r, 0, 40);
                if (box.hi[2] >= SEQ + 4) box.hi[2] = SEQ + 3;
                if (box.hi[3] >= SEQ + 4) box.hi[3] = SEQ + 3;
            }
            check_box(&m, views, tables, &box, scratch, point, &st, seed_texts[s]);
        }
        ck_assert_msg(st.decided > 30, "%s: only %d of 300 boxes decided", seed_texts[s],
                      st.decided);
        free(scratch);
        free(point);
        mod_range_tables_free(tables);
        ir_free(&m);
    }
}
END_TEST

/* The cases a block-mask builder relies on are decided exactly. */
START_TEST(easy_cases_are_decided) {
    rnd r;
    rnd_seed(&r, 8086);
    seed_env env;
    seed_env_init(&env, &r);
    ir_mod causal, doc, window;
    parse_seed("q >= kv", &env, &causal);
    parse_seed("q >= kv && doc[q] == doc[kv]", &env, &doc);
    parse_seed("q >= kv && q - kv <= W", &env, &window);
    mod_buffer_view views[IR_MAX_BUFFERS];
    seed_env_views(&env, &doc, views);
    mod_range_tables *tables = mod_range_tables_build(&doc, views);
    uint64_t scratch[512];
    ck_assert(mod_interval_scratch_size(&doc) <= sizeof scratch);
    int inside_doc = 0, across_docs = 0;
    /* expected verdicts (0 = any); plain comparisons in the loop, one
     * assertion per box would dominate the run */
    for (int bs = 1; bs <= 64; bs *= 2) {
        for (int64_t qb = 0; qb < SEQ / bs; qb++) {
            for (int64_t kb = 0; kb < SEQ / bs; kb++) {
                mod_box box = {{0, 0, qb * bs, kb * bs},
                               {0, 0, qb * bs + bs - 1, kb * bs + bs - 1}};
                int below = box.lo[2] >= box.hi[3], above = box.hi[2] < box.lo[3];
                mod_tri want_c = below ? MOD_TRI_TRUE : above ? MOD_TRI_FALSE : MOD_TRI_UNKNOWN;
                mod_tri want_w = 0;
                if (below && box.hi[2] - box.lo[3] <= 20) want_w = MOD_TRI_TRUE;
                if (above || box.lo[2] - box.hi[3] > 20) want_w = MOD_TRI_FALSE;
                int32_t qd0 = env.doc[box.lo[2]], qd1 = env.doc[box.hi[2]];
                int32_t kd0 = env.doc[box.lo[3]], kd1 = env.doc[box.hi[3]];
                mod_tri want_d = 0;
                if (above) {
                    want_d = MOD_TRI_FALSE;
                } else if (qd1 < kd0 || kd1 < qd0) {
                    want_d = MOD_TRI_FALSE; /* disjoint documents */
                    across_docs++;
                } else if (qd0 == qd1 && kd0 == kd1 && qd0 == kd0 && below) {
                    want_d = MOD_TRI_TRUE; /* one document, below the diagonal */
                    inside_doc++;
                }
                mod_tri c = mod_interval_mask(&causal, NULL, &box, scratch);
                mod_tri w = mod_interval_mask(&window, NULL, &box, scratch);
                mod_tri d = mod_interval_mask(&doc, tables, &box, scratch);
                if (c != want_c || (want_w && w != want_w) || (want_d && d != want_d))
                    ck_abort_msg("box q [%lld, %lld] kv [%lld, %lld]: causal %d (want %d), "
                                 "window %d (want %d), document %d (want %d)",
                                 (long long)box.lo[2], (long long)box.hi[2], (long long)box.lo[3],
                                 (long long)box.hi[3], c, want_c, w, want_w, d, want_d);
            }
        }
    }
    ck_assert_int_gt(inside_doc, 100);
    ck_assert_int_gt(across_docs, 100);
    /* out-of-range boxes are never decided */
    mod_box past_end = {{0, 0, SEQ - 4, 0}, {0, 0, SEQ + 3, 2}};
    ck_assert_int_eq(mod_interval_mask(&doc, tables, &past_end, scratch), MOD_TRI_UNKNOWN);
    mod_box before_start = {{0, 0, 10, -1}, {0, 0, 12, 3}};
    ck_assert_int_eq(mod_interval_mask(&doc, tables, &before_start, scratch), MOD_TRI_UNKNOWN);
    /* missing tables: reads make the verdict unknown rather than wrong */
    mod_box inside = {{0, 0, 8, 0}, {0, 0, 9, 1}};
    ck_assert_int_eq(mod_interval_mask(&doc, NULL, &inside, scratch), MOD_TRI_UNKNOWN);
    mod_range_tables_free(tables);
    ir_free(&causal);
    ir_free(&doc);
    ir_free(&window);
}
END_TEST

static Suite *interval_suite(void) {
    Suite *s = suite_create("interval");
    /* one case per test, so CK_RUN_CASE can pick one */
    const struct {
        const char *name;
        const TTest *test;
    } tests[] = {
        {"random_masks_are_sound", random_masks_are_sound},
        {"range_tables_are_exact", range_tables_are_exact},
        {"ops_on_extreme_values_are_sound", ops_on_extreme_values_are_sound},
        {"seed_masks_are_sound", seed_masks_are_sound},
        {"easy_cases_are_decided", easy_cases_are_decided},
        {"select_branches_follow_their_condition", select_branches_follow_their_condition},
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
    SRunner *sr = srunner_create(interval_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
