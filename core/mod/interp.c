/*
 * The scalar interpreter: one point at a time, in f32 (ir_apply's
 * semantics) and in f64 (the oracle's).
 */
#include <math.h>
#include <stdint.h>

#include "mod/eval.h"

static int read_load(const ir_mod *m, const ir_node *n, const mod_buffer_view *bufs,
                     const int32_t *idx, ir_value *out, mod_bounds_error *err, int32_t b, int32_t h,
                     int32_t q, int32_t kv) {
    int had_error = err ? err->set : 1;
    if (mod_buffer_read(&bufs[n->buffer], n->buffer, idx, out, err) == 0) return 0;
    if (err && !had_error) {
        err->b = b;
        err->h = h;
        err->q = q;
        err->kv = kv;
    }
    (void)m;
    return -1;
}

int mod_eval_point(const ir_mod *m, const mod_buffer_view *bufs, float score, int32_t b, int32_t h,
                   int32_t q, int32_t kv, ir_value *scratch, ir_value *result,
                   mod_bounds_error *err) {
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *n = &m->nodes[i];
        ir_value v;
        switch ((ir_op)n->op) {
        case IR_SCORE:
            v.f = score;
            break;
        case IR_B:
            v.i = b;
            break;
        case IR_H:
            v.i = h;
            break;
        case IR_Q:
            v.i = q;
            break;
        case IR_KV:
            v.i = kv;
            break;
        case IR_LOAD: {
            int32_t idx[4];
            for (int a = 0; a < n->nargs; a++)
                idx[a] = scratch[n->args[a]].i;
            if (read_load(m, n, bufs, idx, &v, err, b, h, q, kv) < 0) return -1;
            break;
        }
        default: {
            ir_value args[4];
            for (int a = 0; a < n->nargs; a++)
                args[a] = scratch[n->args[a]];
            v = ir_apply(n, args);
            break;
        }
        }
        scratch[i] = v;
    }
    if (result) *result = scratch[m->root];
    return 0;
}

static double sigmoid_f64(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static int32_t to_int_f64(double d) {
    if (d != d) return 0;
    if (d >= 2147483647.0) return INT32_MAX;
    if (d <= -2147483648.0) return INT32_MIN;
    return (int32_t)d;
}

static double apply_float_f64(const ir_node *n, const double *x) {
    double a = n->nargs > 0 ? x[0] : 0.0, c = n->nargs > 1 ? x[1] : 0.0;
    switch ((ir_op)n->op) {
    case IR_NEG:
        return -a;
    case IR_ABS:
        return fabs(a);
    case IR_EXP:
        return exp(a);
    case IR_EXP2:
        return exp2(a);
    case IR_LOG:
        return log(a);
    case IR_LOG2:
        return log2(a);
    case IR_SQRT:
        return sqrt(a);
    case IR_RSQRT:
        return 1.0 / sqrt(a);
    case IR_SIN:
        return sin(a);
    case IR_COS:
        return cos(a);
    case IR_TAN:
        return tan(a);
    case IR_TANH:
    case IR_TANH_APPROX:
        return tanh(a);
    case IR_SIGMOID:
        return sigmoid_f64(a);
    case IR_FLOOR:
        return floor(a);
    case IR_CEIL:
        return ceil(a);
    case IR_TO_FLOAT:
        return a; /* ints and bools are exact doubles already */
    case IR_ADD:
        return a + c;
    case IR_SUB:
        return a - c;
    case IR_MUL:
        return a * c;
    case IR_DIV:
        return a / c;
    case IR_FLOORDIV:
        return floor(a / c);
    case IR_MOD: {
        double r = fmod(a, c);
        if (r != 0.0 && ((r < 0.0) != (c < 0.0))) r += c;
        return r;
    }
    case IR_POW:
        return pow(a, c);
    case IR_MIN: /* NaN propagates; of two zeros, -0 is the smaller */
        if (a != a || c != c) return a + c;
        if (a == c) return signbit(a) ? a : c;
        return a < c ? a : c;
    case IR_MAX:
        if (a != a || c != c) return a + c;
        if (a == c) return signbit(a) ? c : a;
        return a > c ? a : c;
    case IR_SELECT:
        return x[0] != 0.0 ? x[1] : x[2];
    default:
        return 0.0;
    }
}

static double apply_f64(const ir_node *n, const double *x) {
    switch ((ir_op)n->op) {
    case IR_EQ:
        return x[0] == x[1];
    case IR_NE:
        return x[0] != x[1];
    case IR_LT:
        return x[0] < x[1];
    case IR_LE:
        return x[0] <= x[1];
    case IR_GT:
        return x[0] > x[1];
    case IR_GE:
        return x[0] >= x[1];
    default:
        break;
    }
    if (n->type == IR_FLOAT) return apply_float_f64(n, x);
    if (n->op == IR_TO_INT && ir_operand_type(n) == IR_FLOAT) return to_int_f64(x[0]);
    if (n->op == IR_SELECT) return x[0] != 0.0 ? x[1] : x[2];
    /* Int and bool ops: exactly the f32 interpreter's int semantics. */
    ir_value args[4];
    for (int a = 0; a < n->nargs; a++)
        args[a].i = (int32_t)x[a];
    return (double)ir_apply(n, args).i;
}

int mod_eval_point_f64(const ir_mod *m, const mod_buffer_view *bufs, double score, int32_t b,
                       int32_t h, int32_t q, int32_t kv, double *scratch, double *result,
                       mod_bounds_error *err) {
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *n = &m->nodes[i];
        double v;
        switch ((ir_op)n->op) {
        case IR_CONST:
            v = n->type == IR_FLOAT ? (double)n->imm.f : (double)n->imm.i;
            break;
        case IR_SCORE:
            v = score;
            break;
        case IR_B:
            v = b;
            break;
        case IR_H:
            v = h;
            break;
        case IR_Q:
            v = q;
            break;
        case IR_KV:
            v = kv;
            break;
        case IR_LOAD: {
            int32_t idx[4];
            for (int a = 0; a < n->nargs; a++)
                idx[a] = (int32_t)scratch[n->args[a]];
            ir_value r;
            if (read_load(m, n, bufs, idx, &r, err, b, h, q, kv) < 0) return -1;
            v = n->type == IR_FLOAT ? (double)r.f : (double)r.i;
            break;
        }
        default: {
            double args[4];
            for (int a = 0; a < n->nargs; a++)
                args[a] = scratch[n->args[a]];
            v = apply_f64(n, args);
            break;
        }
        }
        scratch[i] = v;
    }
    if (result) *result = scratch[m->root];
    return 0;
}
