/*
 * Several outputs of a mod over one tile in a single pass over the nodes.
 *
 * Within one call b and h are fixed, so a node that depends on neither q, kv
 * nor score is one value for the whole tile (a "uniform" node, computed
 * once); every other needed node gets an array of the tile's points. Only
 * nodes that some output needs are computed. Arithmetic that dominates score
 * mods and their derivatives (float + - * /, negation, select, comparisons)
 * has its own loops; every other op goes through ir_apply point by point, so
 * the semantics are ir_apply's by construction.
 */
#include <stdlib.h>
#include <string.h>

#include "mod/tile_multi.h"

struct mod_multi {
    const ir_mod *m;
    int max_elems;
    int num_outputs;
    int *outputs;
    uint8_t *needed;  /* per node */
    uint8_t *uniform; /* per node: one value for the whole tile */
    ir_value **vals;  /* per needed node: max_elems values, or 1 when uniform */
    ir_value *storage;
};

mod_multi *mod_multi_create(const ir_mod *m, const int *outputs, int num_outputs, int max_elems) {
    mod_multi *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    const int n = m->num_nodes;
    t->m = m;
    t->max_elems = max_elems > 0 ? max_elems : 1;
    t->num_outputs = num_outputs;
    t->outputs = malloc(((size_t)num_outputs + 1) * sizeof *t->outputs);
    t->needed = calloc((size_t)n + 1, 1);
    t->uniform = calloc((size_t)n + 1, 1);
    t->vals = calloc((size_t)n + 1, sizeof *t->vals);
    uint8_t *deps = malloc((size_t)n + 1);
    if (!t->outputs || !t->needed || !t->uniform || !t->vals || !deps) {
        free(deps);
        mod_multi_destroy(t);
        return NULL;
    }
    for (int i = 0; i < num_outputs; i++) {
        t->outputs[i] = outputs[i];
        t->needed[outputs[i]] = 1;
    }
    for (int i = n - 1; i >= 0; i--) {
        if (!t->needed[i]) continue;
        for (int a = 0; a < m->nodes[i].nargs; a++)
            t->needed[m->nodes[i].args[a]] = 1;
    }
    ir_dependencies(m, deps);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (!t->needed[i]) continue;
        t->uniform[i] = !(deps[i] & (IR_DEP_Q | IR_DEP_KV | IR_DEP_SCORE));
        /* outputs are always whole arrays so that callers index them plainly */
        for (int o = 0; o < num_outputs; o++)
            if (outputs[o] == i) t->uniform[i] = 0;
        total += t->uniform[i] ? 1 : (size_t)t->max_elems;
    }
    free(deps);
    t->storage = malloc((total ? total : 1) * sizeof *t->storage);
    if (!t->storage) {
        mod_multi_destroy(t);
        return NULL;
    }
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (!t->needed[i]) continue;
        t->vals[i] = t->storage + at;
        at += t->uniform[i] ? 1 : (size_t)t->max_elems;
    }
    return t;
}

void mod_multi_destroy(mod_multi *t) {
    if (!t) return;
    free(t->outputs);
    free(t->needed);
    free(t->uniform);
    free(t->vals);
    free(t->storage);
    free(t);
}

const ir_value *mod_multi_output(const mod_multi *t, int i) {
    return t->vals[t->outputs[i]];
}

/* Binary float loops for the three stride combinations that occur (a
 * uniform operand has stride 0). */
#define FLOAT_BINARY(EXPR)                                                                         \
    do {                                                                                           \
        if (sa && sb) {                                                                            \
            for (int k = 0; k < n; k++) {                                                          \
                float x = A[k].f, y = B[k].f;                                                      \
                out[k].f = (EXPR);                                                                 \
            }                                                                                      \
        } else if (sa) {                                                                           \
            const float y = B[0].f;                                                                \
            for (int k = 0; k < n; k++) {                                                          \
                float x = A[k].f;                                                                  \
                out[k].f = (EXPR);                                                                 \
            }                                                                                      \
        } else {                                                                                   \
            const float x = A[0].f;                                                                \
            for (int k = 0; k < n; k++) {                                                          \
                float y = B[k].f;                                                                  \
                out[k].f = (EXPR);                                                                 \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* Ints wrap like ir_apply: the arithmetic is done in uint32_t. */
#define INT_BINARY(OP)                                                                             \
    do {                                                                                           \
        for (int k = 0; k < n; k++)                                                                \
            out[k].i = (int32_t)((uint32_t)A[k * sa].i OP(uint32_t) B[k * sb].i);                  \
    } while (0)

#define FLOAT_COMPARE(OP)                                                                          \
    do {                                                                                           \
        for (int k = 0; k < n; k++)                                                                \
            out[k].i = A[k * sa].f OP B[k * sb].f;                                                 \
    } while (0)

#define INT_COMPARE(OP)                                                                            \
    do {                                                                                           \
        for (int k = 0; k < n; k++)                                                                \
            out[k].i = A[k * sa].i OP B[k * sb].i;                                                 \
    } while (0)

/* Computes a non-uniform, non-leaf node over n points. Returns 1 when a
 * dedicated loop handled it. */
static int fast_op(const ir_mod *m, const ir_node *node, ir_value *out, ir_value *const *args,
                   const int *strides, int n) {
    const ir_value *A = node->nargs > 0 ? args[0] : NULL;
    const ir_value *B = node->nargs > 1 ? args[1] : NULL;
    const int sa = node->nargs > 0 ? strides[0] : 0;
    const int sb = node->nargs > 1 ? strides[1] : 0;
    const int float_args = node->nargs > 0 && m->nodes[node->args[0]].type == IR_FLOAT;
    switch ((ir_op)node->op) {
    case IR_ADD:
        if (node->type == IR_INT)
            INT_BINARY(+);
        else if (node->type == IR_FLOAT)
            FLOAT_BINARY(x + y);
        else
            return 0;
        return 1;
    case IR_SUB:
        if (node->type == IR_INT)
            INT_BINARY(-);
        else if (node->type == IR_FLOAT)
            FLOAT_BINARY(x - y);
        else
            return 0;
        return 1;
    case IR_MUL:
        if (node->type == IR_INT)
            INT_BINARY(*);
        else if (node->type == IR_FLOAT)
            FLOAT_BINARY(x * y);
        else
            return 0;
        return 1;
    case IR_TO_FLOAT:
        if (float_args) {
            for (int k = 0; k < n; k++)
                out[k] = A[k * sa];
        } else {
            for (int k = 0; k < n; k++)
                out[k].f = (float)A[k * sa].i;
        }
        return 1;
    case IR_DIV:
        if (node->type != IR_FLOAT) return 0;
        FLOAT_BINARY(x / y);
        return 1;
    case IR_NEG:
        if (node->type != IR_FLOAT) return 0;
        for (int k = 0; k < n; k++)
            out[k].f = -A[k * sa].f;
        return 1;
    case IR_SELECT: {
        const ir_value *C = args[0], *X = args[1], *Y = args[2];
        const int sc = strides[0], sx = strides[1], sy = strides[2];
        for (int k = 0; k < n; k++)
            out[k] = C[k * sc].i ? X[k * sx] : Y[k * sy];
        return 1;
    }
    case IR_EQ:
        if (float_args)
            FLOAT_COMPARE(==);
        else
            INT_COMPARE(==);
        return 1;
    case IR_NE:
        if (float_args)
            FLOAT_COMPARE(!=);
        else
            INT_COMPARE(!=);
        return 1;
    case IR_LT:
        if (float_args)
            FLOAT_COMPARE(<);
        else
            INT_COMPARE(<);
        return 1;
    case IR_LE:
        if (float_args)
            FLOAT_COMPARE(<=);
        else
            INT_COMPARE(<=);
        return 1;
    case IR_GT:
        if (float_args)
            FLOAT_COMPARE(>);
        else
            INT_COMPARE(>);
        return 1;
    case IR_GE:
        if (float_args)
            FLOAT_COMPARE(>=);
        else
            INT_COMPARE(>=);
        return 1;
    default:
        return 0;
    }
}

static void fill_bounds_point(mod_bounds_error *err, int32_t b, int32_t h, int32_t q, int32_t kv) {
    err->b = b;
    err->h = h;
    err->q = q;
    err->kv = kv;
}

int mod_multi_eval(mod_multi *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                   int rows, int32_t kv0, int cols, const float *score, int ld,
                   mod_bounds_error *err) {
    const ir_mod *m = t->m;
    const int n = rows * cols;
    for (int i = 0; i < m->num_nodes; i++) {
        if (!t->needed[i]) continue;
        const ir_node *node = &m->nodes[i];
        ir_value *out = t->vals[i];
        const int count = t->uniform[i] ? 1 : n;
        switch ((ir_op)node->op) {
        case IR_CONST:
            for (int k = 0; k < count; k++)
                out[k] = node->imm;
            continue;
        case IR_B:
            for (int k = 0; k < count; k++)
                out[k].i = b;
            continue;
        case IR_H:
            for (int k = 0; k < count; k++)
                out[k].i = h;
            continue;
        case IR_Q:
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    out[r * cols + c].i = q0 + r;
            continue;
        case IR_KV:
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    out[r * cols + c].i = kv0 + c;
            continue;
        case IR_SCORE:
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    out[r * cols + c].f = score[(size_t)r * ld + c];
            continue;
        default:
            break;
        }

        ir_value *args[4] = {NULL, NULL, NULL, NULL};
        int strides[4] = {0, 0, 0, 0};
        int all_uniform = 1;
        for (int a = 0; a < node->nargs; a++) {
            args[a] = t->vals[node->args[a]];
            strides[a] = t->uniform[node->args[a]] ? 0 : 1;
            all_uniform &= !strides[a];
        }
        /* A uniform node whose result must be a full array (an output). */
        const int broadcast = all_uniform && count > 1;
        const int points = all_uniform ? 1 : count;

        if (node->op == IR_LOAD) {
            int32_t idx[4];
            for (int k = 0; k < points; k++) {
                for (int a = 0; a < node->nargs; a++)
                    idx[a] = args[a][k * strides[a]].i;
                if (mod_buffer_read(&bufs[node->buffer], node->buffer, idx, &out[k], err) != 0) {
                    int r = all_uniform ? 0 : k / cols, c = all_uniform ? 0 : k % cols;
                    fill_bounds_point(err, b, h, q0 + r, kv0 + c);
                    return -1;
                }
            }
        } else if (all_uniform || !fast_op(m, node, out, args, strides, points)) {
            ir_value in[4];
            for (int k = 0; k < points; k++) {
                for (int a = 0; a < node->nargs; a++)
                    in[a] = args[a][k * strides[a]];
                out[k] = ir_apply(node, in);
            }
        }
        if (broadcast)
            for (int k = 1; k < count; k++)
                out[k] = out[0];
    }
    return 0;
}
