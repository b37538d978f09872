/*
 * Tile interpreter: evaluates a mod over a rows x cols tile of (q, kv)
 * points, one IR node at a time over whole arrays, so the dispatch cost of
 * the interpreter is paid once per node and tile instead of once per element
 * and the per-op loops vectorise.
 *
 * Shape classes. Within one call b and h are fixed, so a node's value varies
 * only along the axes its dependencies name (ir_dependencies):
 *   SCALAR  depends on neither q nor kv        -> 1 value
 *   COLUMN  depends on q only                  -> rows values (one per row)
 *   ROW     depends on kv only                 -> cols values (one per column)
 *   FULL    depends on both, or on score       -> rows * cols values
 * Operands are broadcast when classes meet, so `doc[q] == doc[kv]` costs
 * rows + cols buffer reads and one full-tile compare.
 *
 * Storage. Each class has a pool of slots; a node gets a slot when computed
 * and gives it back after its last use (liveness computed once in
 * mod_tile_create), so scratch grows with the number of simultaneously live
 * values, not with the size of the mod. Every value is 4 bytes: float for
 * IR_FLOAT, int32_t for IR_INT and for IR_BOOL (0 or 1). A full-tile slot is
 * laid out row-major with the call's cols as its row stride.
 *
 * Semantics are ir_apply's bit for bit: the per-op loops below use the same
 * formulas, and ops without a loop here call ir_apply element by element.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "mod/eval.h"

enum { CLS_SCALAR = 0, CLS_COLUMN = 1, CLS_ROW = 2, CLS_FULL = 3 };

/* One operand as a loop sees it: element k of the current run is
 * ptr[k * stride] (stride 0 = the same value for the whole run). */
typedef void (*tile_kernel)(const ir_node *node, void *restrict out, const void *const *in,
                            const int *stride, int n);

struct mod_tile {
    int num_nodes, root;
    int max_rows, max_cols;
    ir_node *nodes;      /* private copy of the mod's nodes */
    uint8_t *cls;        /* shape class per node */
    int32_t *slot;       /* slot in the class's pool (unused for scalars) */
    tile_kernel *kernel; /* per node; NULL for leaves and loads */
    ir_value *scalars;   /* values of scalar-class nodes */
    int32_t *arg_types;  /* type of args[0] per node (for casts) */
    unsigned char *pool[4];
    size_t slot_bytes[4];
    int64_t *offsets;     /* max_cols element offsets for gathers */
    ir_value *point_args; /* ir_apply argument scratch */
};

/* ---- per-element formulas (must agree with ir_apply) ---- */

static inline int32_t wrap_add(int32_t x, int32_t y) {
    return (int32_t)((uint32_t)x + (uint32_t)y);
}

static inline int32_t wrap_sub(int32_t x, int32_t y) {
    return (int32_t)((uint32_t)x - (uint32_t)y);
}

static inline int32_t wrap_mul(int32_t x, int32_t y) {
    return (int32_t)((uint32_t)x * (uint32_t)y);
}

static inline int32_t wrap_neg(int32_t x) {
    return (int32_t)(0u - (uint32_t)x);
}

static inline int32_t int_floordiv(int32_t x, int32_t y) {
    if (y == 0) return 0;
    if (y == -1) return wrap_neg(x); /* INT32_MIN // -1 wraps to INT32_MIN */
    int32_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) q -= 1;
    return q;
}

static inline int32_t int_mod(int32_t x, int32_t y) {
    if (y == 0 || y == -1) return 0;
    int32_t r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return r;
}

/* ---- kernels: generated loops over runs of n elements ---- */

/* Two operands: specialised on which of them vary along the run, so the
 * common cases are simple unit-stride loops the compiler vectorises. */
#define BINARY_KERNEL(NAME, TA, TO, EXPR)                                                          \
    static void NAME(const ir_node *node, void *restrict out_, const void *const *in,              \
                     const int *stride, int n) {                                                   \
        (void)node;                                                                                \
        TO *restrict o = out_;                                                                     \
        const TA *restrict pa = in[0];                                                             \
        const TA *restrict pb = in[1];                                                             \
        if (stride[0] && stride[1]) {                                                              \
            for (int k = 0; k < n; k++) {                                                          \
                TA x = pa[k], y = pb[k];                                                           \
                o[k] = (EXPR);                                                                     \
            }                                                                                      \
        } else if (stride[0]) {                                                                    \
            const TA y = pb[0];                                                                    \
            for (int k = 0; k < n; k++) {                                                          \
                TA x = pa[k];                                                                      \
                o[k] = (EXPR);                                                                     \
            }                                                                                      \
        } else if (stride[1]) {                                                                    \
            const TA x = pa[0];                                                                    \
            for (int k = 0; k < n; k++) {                                                          \
                TA y = pb[k];                                                                      \
                o[k] = (EXPR);                                                                     \
            }                                                                                      \
        } else {                                                                                   \
            const TA x = pa[0], y = pb[0];                                                         \
            const TO r = (EXPR);                                                                   \
            for (int k = 0; k < n; k++)                                                            \
                o[k] = r;                                                                          \
        }                                                                                          \
    }

#define UNARY_KERNEL(NAME, TA, TO, EXPR)                                                           \
    static void NAME(const ir_node *node, void *restrict out_, const void *const *in,              \
                     const int *stride, int n) {                                                   \
        (void)node;                                                                                \
        TO *restrict o = out_;                                                                     \
        const TA *restrict pa = in[0];                                                             \
        if (stride[0]) {                                                                           \
            for (int k = 0; k < n; k++) {                                                          \
                TA x = pa[k];                                                                      \
                o[k] = (EXPR);                                                                     \
            }                                                                                      \
        } else {                                                                                   \
            const TA x = pa[0];                                                                    \
            const TO r = (EXPR);                                                                   \
            for (int k = 0; k < n; k++)                                                            \
                o[k] = r;                                                                          \
        }                                                                                          \
    }

BINARY_KERNEL(k_add_i, int32_t, int32_t, wrap_add(x, y))
BINARY_KERNEL(k_sub_i, int32_t, int32_t, wrap_sub(x, y))
BINARY_KERNEL(k_mul_i, int32_t, int32_t, wrap_mul(x, y))
BINARY_KERNEL(k_floordiv_any_i, int32_t, int32_t, int_floordiv(x, y))
BINARY_KERNEL(k_mod_any_i, int32_t, int32_t, int_mod(x, y))

/* Index arithmetic often divides by one power of two (block sizes, image
 * widths, `% 2`): then x % y is x & (y - 1) and x // y is (x - x % y) / y,
 * an exact division done as a shift, which vectorises where a division
 * instruction per element would not. (x - x % y never overflows: it is the
 * largest multiple of y not above x, and INT32_MIN is a multiple of y.) */
static inline int is_pow2_divisor(const int *stride, const void *const *in) {
    if (stride[1]) return 0;
    int32_t y = ((const int32_t *)in[1])[0];
    return y > 0 && (y & (y - 1)) == 0;
}

static inline int log2_of_pow2(int32_t y) {
    int k = 0;
    while ((1 << k) != y)
        k++;
    return k;
}

static void k_mod_i(const ir_node *node, void *restrict out_, const void *const *in,
                    const int *stride, int n) {
    if (!stride[0] || !is_pow2_divisor(stride, in)) {
        k_mod_any_i(node, out_, in, stride, n);
        return;
    }
    int32_t *restrict o = out_;
    const int32_t *restrict a = in[0];
    const uint32_t mask = (uint32_t)((const int32_t *)in[1])[0] - 1u;
    for (int k = 0; k < n; k++)
        o[k] = (int32_t)((uint32_t)a[k] & mask);
}

static void k_floordiv_i(const ir_node *node, void *restrict out_, const void *const *in,
                         const int *stride, int n) {
#if (-8 >> 1) == -4 /* arithmetic shift of negative values */
    if (stride[0] && is_pow2_divisor(stride, in)) {
        int32_t *restrict o = out_;
        const int32_t *restrict a = in[0];
        const int32_t y = ((const int32_t *)in[1])[0];
        const uint32_t mask = (uint32_t)y - 1u;
        const int shift = log2_of_pow2(y);
        for (int k = 0; k < n; k++) {
            int32_t r = (int32_t)((uint32_t)a[k] & mask);
            o[k] = (a[k] - r) >> shift;
        }
        return;
    }
#endif
    k_floordiv_any_i(node, out_, in, stride, n);
}
BINARY_KERNEL(k_min_i, int32_t, int32_t, x < y ? x : y)
BINARY_KERNEL(k_max_i, int32_t, int32_t, x > y ? x : y)
BINARY_KERNEL(k_and_i, int32_t, int32_t, x &y)
BINARY_KERNEL(k_or_i, int32_t, int32_t, x | y)
BINARY_KERNEL(k_xor_i, int32_t, int32_t, x ^ y)
BINARY_KERNEL(k_eq_i, int32_t, int32_t, x == y)
BINARY_KERNEL(k_ne_i, int32_t, int32_t, x != y)
BINARY_KERNEL(k_lt_i, int32_t, int32_t, x < y)
BINARY_KERNEL(k_le_i, int32_t, int32_t, x <= y)
BINARY_KERNEL(k_gt_i, int32_t, int32_t, x > y)
BINARY_KERNEL(k_ge_i, int32_t, int32_t, x >= y)

BINARY_KERNEL(k_add_f, float, float, x + y)
BINARY_KERNEL(k_sub_f, float, float, x - y)
BINARY_KERNEL(k_mul_f, float, float, x *y)
BINARY_KERNEL(k_div_f, float, float, x / y)
BINARY_KERNEL(k_min_f, float, float, ir_fmin(x, y))
BINARY_KERNEL(k_max_f, float, float, ir_fmax(x, y))
BINARY_KERNEL(k_eq_f, float, int32_t, x == y)
BINARY_KERNEL(k_ne_f, float, int32_t, x != y)
BINARY_KERNEL(k_lt_f, float, int32_t, x < y)
BINARY_KERNEL(k_le_f, float, int32_t, x <= y)
BINARY_KERNEL(k_gt_f, float, int32_t, x > y)
BINARY_KERNEL(k_ge_f, float, int32_t, x >= y)

UNARY_KERNEL(k_neg_i, int32_t, int32_t, wrap_neg(x))
UNARY_KERNEL(k_abs_i, int32_t, int32_t, x < 0 ? wrap_neg(x) : x)
UNARY_KERNEL(k_not_b, int32_t, int32_t, x ^ 1)
UNARY_KERNEL(k_bitnot_i, int32_t, int32_t, ~x)
UNARY_KERNEL(k_copy_i, int32_t, int32_t, x)
UNARY_KERNEL(k_int_to_float, int32_t, float, (float)x)
UNARY_KERNEL(k_copy_f, float, float, x)
UNARY_KERNEL(k_neg_f, float, float, -x)
UNARY_KERNEL(k_abs_f, float, float, fabsf(x))
UNARY_KERNEL(k_floor_f, float, float, floorf(x))
UNARY_KERNEL(k_ceil_f, float, float, ceilf(x))
UNARY_KERNEL(k_exp_f, float, float, expf(x))
UNARY_KERNEL(k_tanh_f, float, float, tanhf(x))

/* Fallback for everything else: ir_apply per element, so these ops agree
 * with the scalar interpreter by construction. */
static void k_generic(const ir_node *node, void *restrict out_, const void *const *in,
                      const int *stride, int n) {
    ir_value *restrict o = out_;
    const ir_value *a[3];
    for (int i = 0; i < node->nargs && i < 3; i++)
        a[i] = in[i];
    for (int k = 0; k < n; k++) {
        ir_value args[3];
        for (int i = 0; i < node->nargs && i < 3; i++)
            args[i] = a[i][k * stride[i]];
        o[k] = ir_apply(node, args);
    }
}

/* Select: both branches are already evaluated (like torch.where); a buffer
 * read out of range in the branch not taken is still an error. */
#define SELECT_KERNEL(NAME, T)                                                                     \
    static void NAME(const ir_node *node, void *restrict out_, const void *const *in,              \
                     const int *stride, int n) {                                                   \
        (void)node;                                                                                \
        T *restrict o = out_;                                                                      \
        const int32_t *restrict c = in[0];                                                         \
        const T *restrict a = in[1];                                                               \
        const T *restrict b = in[2];                                                               \
        if (stride[0] && stride[1] && stride[2]) {                                                 \
            for (int k = 0; k < n; k++)                                                            \
                o[k] = c[k] ? a[k] : b[k];                                                         \
        } else if (!stride[0]) {                                                                   \
            const T *src = c[0] ? a : b;                                                           \
            if (c[0] ? stride[1] : stride[2]) {                                                    \
                for (int k = 0; k < n; k++)                                                        \
                    o[k] = src[k];                                                                 \
            } else {                                                                               \
                for (int k = 0; k < n; k++)                                                        \
                    o[k] = src[0];                                                                 \
            }                                                                                      \
        } else {                                                                                   \
            int sa = stride[1], sb = stride[2];                                                    \
            for (int k = 0; k < n; k++)                                                            \
                o[k] = c[k] ? a[k * sa] : b[k * sb];                                               \
        }                                                                                          \
    }

SELECT_KERNEL(k_select_i, int32_t)
SELECT_KERNEL(k_select_f, float)

static tile_kernel kernel_for(const ir_node *node, ir_type arg_type) {
    int is_float = node->type == IR_FLOAT;
    int args_float = arg_type == IR_FLOAT;
    switch ((ir_op)node->op) {
    case IR_ADD:
        return is_float ? k_add_f : k_add_i;
    case IR_SUB:
        return is_float ? k_sub_f : k_sub_i;
    case IR_MUL:
        return is_float ? k_mul_f : k_mul_i;
    case IR_DIV:
        return is_float ? k_div_f : k_floordiv_i; /* int meaning: floor division */
    case IR_FLOORDIV:
        return is_float ? k_generic : k_floordiv_i;
    case IR_MOD:
        return is_float ? k_generic : k_mod_i;
    case IR_MIN:
        return is_float ? k_min_f : k_min_i; /* on 0/1 bools: and */
    case IR_MAX:
        return is_float ? k_max_f : k_max_i; /* on 0/1 bools: or */
    case IR_AND:
        return k_and_i; /* 0/1 bools: logical == bitwise */
    case IR_OR:
        return k_or_i;
    case IR_XOR:
        return k_xor_i;
    case IR_EQ:
        return args_float ? k_eq_f : k_eq_i;
    case IR_NE:
        return args_float ? k_ne_f : k_ne_i;
    case IR_LT:
        return args_float ? k_lt_f : k_lt_i;
    case IR_LE:
        return args_float ? k_le_f : k_le_i;
    case IR_GT:
        return args_float ? k_gt_f : k_gt_i;
    case IR_GE:
        return args_float ? k_ge_f : k_ge_i;
    case IR_NEG:
        return is_float ? k_neg_f : k_neg_i;
    case IR_ABS:
        return is_float ? k_abs_f : k_abs_i;
    case IR_NOT:
        return k_not_b;
    case IR_BITNOT:
        return k_bitnot_i;
    case IR_FLOOR:
        return is_float ? k_floor_f : k_copy_i;
    case IR_CEIL:
        return is_float ? k_ceil_f : k_copy_i;
    case IR_EXP:
        return k_exp_f;
    case IR_TANH:
        return k_tanh_f;
    case IR_TO_FLOAT:
        return args_float ? k_copy_f : k_int_to_float; /* bools are 0/1 ints */
    case IR_TO_INT:
        return args_float ? k_generic : k_copy_i;
    case IR_SELECT:
        return is_float ? k_select_f : k_select_i;
    default:
        return k_generic;
    }
}

/* ---- buffer reads ---- */

static inline ir_value read_element(const mod_buffer_view *v, int64_t off) {
    ir_value r;
    switch (v->dtype) {
    case FLEX_F32:
        r.f = ((const float *)v->data)[off];
        break;
    case FLEX_F16:
        r.f = flex_f16_to_float(((const uint16_t *)v->data)[off]);
        break;
    case FLEX_BF16:
        r.f = flex_bf16_to_float(((const uint16_t *)v->data)[off]);
        break;
    case FLEX_I32:
        r.i = ((const int32_t *)v->data)[off];
        break;
    case FLEX_I64:
        r.i = (int32_t)(uint32_t)(uint64_t)((const int64_t *)v->data)[off];
        break;
    case FLEX_U8:
        r.i = ((const uint8_t *)v->data)[off];
        break;
    case FLEX_BOOL:
        r.i = ((const uint8_t *)v->data)[off] != 0;
        break;
    default:
        r.i = 0;
        break;
    }
    return r;
}

/* Reads n elements at offs[] into out, one dtype switch per run. */
static void gather(const mod_buffer_view *v, const int64_t *restrict offs, ir_value *restrict out,
                   int n) {
    switch (v->dtype) {
    case FLEX_F32: {
        const float *d = v->data;
        for (int k = 0; k < n; k++)
            out[k].f = d[offs[k]];
        break;
    }
    case FLEX_I32: {
        const int32_t *d = v->data;
        for (int k = 0; k < n; k++)
            out[k].i = d[offs[k]];
        break;
    }
    default:
        for (int k = 0; k < n; k++)
            out[k] = read_element(v, offs[k]);
        break;
    }
}

/* ---- creation ---- */

static int class_of_deps(uint8_t deps) {
    if (deps & IR_DEP_SCORE) return CLS_FULL;
    return ((deps & IR_DEP_Q) ? CLS_COLUMN : 0) | ((deps & IR_DEP_KV) ? CLS_ROW : 0);
}

void mod_tile_destroy(mod_tile *t) {
    if (!t) return;
    free(t->nodes);
    free(t->cls);
    free(t->slot);
    free(t->kernel);
    free(t->scalars);
    free(t->arg_types);
    for (int c = 0; c < 4; c++)
        free(t->pool[c]);
    free(t->offsets);
    free(t->point_args);
    free(t);
}

/*
 * Copies what it needs from m (m may be freed afterwards). The tile is
 * owned by the caller until mod_tile_destroy and is not thread-safe: use one
 * per thread. NULL on out of memory or bad sizes.
 */
mod_tile *mod_tile_create(const ir_mod *m, int max_rows, int max_cols) {
    if (!m || m->num_nodes <= 0 || max_rows <= 0 || max_cols <= 0) return NULL;
    mod_tile *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    int n = m->num_nodes;
    t->num_nodes = n;
    t->root = m->root;
    t->max_rows = max_rows;
    t->max_cols = max_cols;
    t->nodes = malloc((size_t)n * sizeof *t->nodes);
    t->cls = malloc((size_t)n);
    t->slot = malloc((size_t)n * sizeof *t->slot);
    t->kernel = calloc((size_t)n, sizeof *t->kernel);
    t->scalars = calloc((size_t)n, sizeof *t->scalars);
    t->arg_types = calloc((size_t)n, sizeof *t->arg_types);
    t->offsets = malloc((size_t)max_cols * sizeof *t->offsets);
    t->point_args = malloc(4 * sizeof *t->point_args);
    int32_t *last_use = malloc((size_t)n * sizeof *last_use);
    uint8_t *deps = malloc((size_t)n);
    if (!t->nodes || !t->cls || !t->slot || !t->kernel || !t->scalars || !t->arg_types ||
        !t->offsets || !t->point_args || !last_use || !deps) {
        free(last_use);
        free(deps);
        mod_tile_destroy(t);
        return NULL;
    }
    memcpy(t->nodes, m->nodes, (size_t)n * sizeof *t->nodes);
    ir_dependencies(m, deps);

    for (int i = 0; i < n; i++)
        last_use[i] = i;
    for (int i = 0; i < n; i++) {
        const ir_node *nd = &t->nodes[i];
        t->cls[i] = (uint8_t)class_of_deps(deps[i]);
        for (int a = 0; a < nd->nargs; a++)
            last_use[nd->args[a]] = i;
        if (nd->nargs > 0) t->arg_types[i] = t->nodes[nd->args[0]].type;
        if (nd->op == IR_SELECT) t->arg_types[i] = t->nodes[nd->args[1]].type;
        if (nd->nargs > 0 && nd->op != IR_LOAD)
            t->kernel[i] = kernel_for(nd, (ir_type)t->arg_types[i]);
    }
    last_use[t->root] = n; /* the result outlives the pass */

    /* Linear-scan slot assignment per class: a node's slot is taken before
     * its args' slots are released, so outputs never alias inputs. */
    int peak[4] = {0};
    int free_top[4] = {0};
    int32_t *stacks[4]; /* per class: released slots */
    int32_t *stack_mem = malloc((size_t)4 * (size_t)n * sizeof *stack_mem);
    if (!stack_mem) {
        free(last_use);
        free(deps);
        mod_tile_destroy(t);
        return NULL;
    }
    for (int c = 0; c < 4; c++)
        stacks[c] = stack_mem + (size_t)c * (size_t)n;
    for (int i = 0; i < n; i++) {
        int c = t->cls[i];
        t->slot[i] = -1;
        if (c != CLS_SCALAR) {
            if (free_top[c] > 0) {
                t->slot[i] = stacks[c][--free_top[c]];
            } else {
                t->slot[i] = peak[c]++;
            }
        }
        const ir_node *nd = &t->nodes[i];
        for (int a = 0; a < nd->nargs; a++) {
            int arg = nd->args[a];
            int dup = 0;
            for (int p = 0; p < a; p++)
                dup |= nd->args[p] == arg;
            if (dup || last_use[arg] != i) continue;
            int ac = t->cls[arg];
            if (ac != CLS_SCALAR) {
                stacks[ac][free_top[ac]++] = t->slot[arg];
            }
        }
        /* a node nobody reads (only the root after compaction) keeps its
         * slot if it is the root, else gives it back at once */
        if (c != CLS_SCALAR && last_use[i] == i) stacks[c][free_top[c]++] = t->slot[i];
    }
    free(stack_mem);
    free(last_use);
    free(deps);

    t->slot_bytes[CLS_SCALAR] = 0;
    t->slot_bytes[CLS_COLUMN] = (size_t)max_rows * 4;
    t->slot_bytes[CLS_ROW] = (size_t)max_cols * 4;
    t->slot_bytes[CLS_FULL] = (size_t)max_rows * (size_t)max_cols * 4;
    for (int c = 1; c < 4; c++) {
        if (peak[c] == 0) continue;
        t->pool[c] = malloc((size_t)peak[c] * t->slot_bytes[c]);
        if (!t->pool[c]) {
            mod_tile_destroy(t);
            return NULL;
        }
    }
    return t;
}

/* ---- evaluation ---- */

static inline void *value_ptr(mod_tile *t, int node) {
    int c = t->cls[node];
    if (c == CLS_SCALAR) return &t->scalars[node];
    return t->pool[c] + (size_t)t->slot[node] * t->slot_bytes[c];
}

static void report_bounds(mod_bounds_error *err, int buffer, int dim, int64_t index, int64_t size,
                          int32_t b, int32_t h, int32_t q, int32_t kv) {
    if (!err || err->set) return;
    err->set = 1;
    err->buffer = buffer;
    err->dim = dim;
    err->index = index;
    err->size = size;
    err->b = b;
    err->h = h;
    err->q = q;
    err->kv = kv;
}

/*
 * A buffer read over the node's class shape. Index operand d of the element
 * in row i, column j is idx[d][i * row_step[d] + j * col_step[d]]. Indices
 * are checked before any element is read; the first offending element in
 * row-major order (and its first offending dim) is reported.
 */
static int eval_load(mod_tile *t, int node, const mod_buffer_view *bufs, int32_t b, int32_t h,
                     int32_t q0, int rows, int32_t kv0, int cols, mod_bounds_error *err) {
    const ir_node *nd = &t->nodes[node];
    const mod_buffer_view *v = &bufs[nd->buffer];
    int c = t->cls[node];
    int nrows = (c & CLS_COLUMN) ? rows : 1;
    int ncols = (c & CLS_ROW) ? cols : 1;
    const int32_t *idx[4];
    int row_step[4], col_step[4];
    int ndim = nd->nargs;
    for (int d = 0; d < ndim; d++) {
        int a = nd->args[d];
        int ac = t->cls[a];
        idx[d] = value_ptr(t, a);
        row_step[d] = ac == CLS_FULL ? cols : (ac == CLS_COLUMN ? 1 : 0);
        col_step[d] = (ac & CLS_ROW) ? 1 : 0;
    }
    ir_value *out = value_ptr(t, node);
    int64_t *restrict offs = t->offsets;
    for (int i = 0; i < nrows; i++) {
        int bad = 0;
        for (int j = 0; j < ncols; j++)
            offs[j] = 0;
        for (int d = 0; d < ndim; d++) {
            const int32_t *p = idx[d] + (size_t)i * (size_t)row_step[d];
            int cs = col_step[d];
            int64_t size = v->sizes[d], stride = v->strides[d];
            for (int j = 0; j < ncols; j++) {
                int64_t x = p[j * cs];
                bad |= (x < 0) | (x >= size);
                offs[j] += x * stride;
            }
        }
        if (bad) {
            for (int j = 0; j < ncols; j++) {
                for (int d = 0; d < ndim; d++) {
                    int64_t x = idx[d][(size_t)i * (size_t)row_step[d] + (size_t)(j * col_step[d])];
                    if (x < 0 || x >= v->sizes[d]) {
                        report_bounds(err, nd->buffer, d, x, v->sizes[d], b, h,
                                      wrap_add(q0, (c & CLS_COLUMN) ? i : 0),
                                      wrap_add(kv0, (c & CLS_ROW) ? j : 0));
                        return -1;
                    }
                }
            }
        }
        gather(v, offs, out + (size_t)i * (size_t)ncols, ncols);
    }
    return 0;
}

static int eval_tile(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                     int rows, int32_t kv0, int cols, const float *score_in, int ld_in,
                     mod_bounds_error *err) {
    for (int i = 0; i < t->num_nodes; i++) {
        const ir_node *nd = &t->nodes[i];
        int c = t->cls[i];
        void *out = value_ptr(t, i);
        switch ((ir_op)nd->op) {
        case IR_CONST:
            t->scalars[i] = nd->imm;
            continue;
        case IR_B:
            t->scalars[i].i = b;
            continue;
        case IR_H:
            t->scalars[i].i = h;
            continue;
        case IR_Q: {
            int32_t *o = out;
            for (int r = 0; r < rows; r++)
                o[r] = wrap_add(q0, r);
            continue;
        }
        case IR_KV: {
            int32_t *o = out;
            for (int k = 0; k < cols; k++)
                o[k] = wrap_add(kv0, k);
            continue;
        }
        case IR_SCORE: {
            float *o = out;
            if (!score_in) { /* a mask mod has no score: defined as 0 */
                memset(o, 0, (size_t)rows * (size_t)cols * sizeof *o);
                continue;
            }
            for (int r = 0; r < rows; r++)
                memcpy(o + (size_t)r * (size_t)cols, score_in + (size_t)r * (size_t)ld_in,
                       (size_t)cols * sizeof *o);
            continue;
        }
        case IR_LOAD:
            if (eval_load(t, i, bufs, b, h, q0, rows, kv0, cols, err) != 0) return -1;
            continue;
        default:
            break;
        }
        if (c == CLS_SCALAR) {
            ir_value *args = t->point_args;
            for (int a = 0; a < nd->nargs; a++)
                args[a] = t->scalars[nd->args[a]];
            t->scalars[i] = ir_apply(nd, args);
            continue;
        }
        const void *in[4];
        int stride[4];
        int flat = 1; /* every operand is scalar or of the node's own class */
        for (int a = 0; a < nd->nargs; a++) {
            int ac = t->cls[nd->args[a]];
            in[a] = value_ptr(t, nd->args[a]);
            stride[a] = ac == CLS_SCALAR ? 0 : 1;
            if (ac != CLS_SCALAR && ac != c) flat = 0;
        }
        if (c != CLS_FULL || flat) {
            int n = c == CLS_FULL ? rows * cols : (c == CLS_COLUMN ? rows : cols);
            t->kernel[i](nd, out, in, stride, n);
            continue;
        }
        /* A full-tile node with column- or row-class operands: one run per
         * row; a column operand is constant along a row, a row operand is
         * the same vector on every row. */
        const void *row_in[4];
        for (int r = 0; r < rows; r++) {
            for (int a = 0; a < nd->nargs; a++) {
                int ac = t->cls[nd->args[a]];
                const unsigned char *base = in[a];
                if (ac == CLS_FULL)
                    row_in[a] = base + (size_t)r * (size_t)cols * 4;
                else if (ac == CLS_COLUMN)
                    row_in[a] = base + (size_t)r * 4;
                else
                    row_in[a] = base;
                stride[a] = (ac & CLS_ROW) ? 1 : 0;
            }
            t->kernel[i](nd, (unsigned char *)out + (size_t)r * (size_t)cols * 4, row_in, stride,
                         cols);
        }
    }
    return 0;
}

/* Element (r, k) of the root, broadcasting its class. */
static inline ir_value root_at(mod_tile *t, int r, int k, int cols) {
    const ir_value *v = value_ptr(t, t->root);
    switch (t->cls[t->root]) {
    case CLS_SCALAR:
        return v[0];
    case CLS_COLUMN:
        return v[r];
    case CLS_ROW:
        return v[k];
    default:
        return v[(size_t)r * (size_t)cols + (size_t)k];
    }
}

/* Runs one sub-tile that fits the scratch, then writes the result. */
static int run_piece(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                     int rows, int32_t kv0, int cols, float *score, uint8_t *mask, int ld,
                     mod_bounds_error *err) {
    if (eval_tile(t, bufs, b, h, q0, rows, kv0, cols, score, ld, err) != 0) return -1;
    int full = t->cls[t->root] == CLS_FULL;
    for (int r = 0; r < rows; r++) {
        if (score) {
            float *dst = score + (size_t)r * (size_t)ld;
            if (full) {
                const float *src = (const float *)value_ptr(t, t->root) + (size_t)r * (size_t)cols;
                memcpy(dst, src, (size_t)cols * sizeof *dst);
            } else {
                for (int k = 0; k < cols; k++)
                    dst[k] = root_at(t, r, k, cols).f;
            }
        } else {
            uint8_t *dst = mask + (size_t)r * (size_t)ld;
            if (full) {
                const int32_t *src =
                    (const int32_t *)value_ptr(t, t->root) + (size_t)r * (size_t)cols;
                for (int k = 0; k < cols; k++)
                    dst[k] = (uint8_t)(src[k] != 0);
            } else {
                for (int k = 0; k < cols; k++)
                    dst[k] = (uint8_t)(root_at(t, r, k, cols).i != 0);
            }
        }
    }
    return 0;
}

/* Tiles larger than the scratch are done in pieces of at most
 * max_rows x max_cols. */
static int run_tiles(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                     int rows, int32_t kv0, int cols, float *score, uint8_t *mask, int ld,
                     mod_bounds_error *err) {
    if (!t || rows < 0 || cols < 0) return -1;
    for (int r0 = 0; r0 < rows; r0 += t->max_rows) {
        int nr = rows - r0 < t->max_rows ? rows - r0 : t->max_rows;
        for (int c0 = 0; c0 < cols; c0 += t->max_cols) {
            int nc = cols - c0 < t->max_cols ? cols - c0 : t->max_cols;
            size_t at = (size_t)r0 * (size_t)ld + (size_t)c0;
            if (run_piece(t, bufs, b, h, wrap_add(q0, r0), nr, wrap_add(kv0, c0), nc,
                          score ? score + at : NULL, mask ? mask + at : NULL, ld, err) != 0)
                return -1;
        }
    }
    return 0;
}

/*
 * bufs (indexed like the mod's buffers) and score are borrowed for the call;
 * ld >= cols. Tiles larger than the scratch work too (in pieces). On -1 the
 * tile may be partly written and err names the first out-of-range read.
 * Both branches of a select are evaluated, like torch.where: a read out of
 * range in the branch not taken is still an error.
 */
int mod_tile_score(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                   int rows, int32_t kv0, int cols, float *score, int ld, mod_bounds_error *err) {
    if (!score) return -1;
    return run_tiles(t, bufs, b, h, q0, rows, kv0, cols, score, NULL, ld, err);
}

/* As mod_tile_score, writing 1 (attend) or 0 per element of mask. */
int mod_tile_mask(mod_tile *t, const mod_buffer_view *bufs, int32_t b, int32_t h, int32_t q0,
                  int rows, int32_t kv0, int cols, uint8_t *mask, int ld, mod_bounds_error *err) {
    if (!mask) return -1;
    return run_tiles(t, bufs, b, h, q0, rows, kv0, cols, NULL, mask, ld, err);
}
