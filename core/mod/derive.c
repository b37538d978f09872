/*
 * Reverse-mode differentiation of a score mod's IR.
 *
 * The nodes are in topological order, so one backward sweep from the root
 * sees every user of a node before the node itself: when the sweep reaches
 * node i its adjoint (the derivative of the result with respect to node i's
 * value, as a node of its own) is complete, and the node hands its share on
 * to its arguments with the chain rule. One sweep gives the derivative with
 * respect to the score and to every buffer read at once.
 *
 * An adjoint that is zero by structure (the node does not reach the result
 * through any differentiable path) is NO_ADJOINT and makes no node, so a
 * mask-like branch or an index computation costs nothing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mod/derive.h"

enum { NO_ADJOINT = -1 };

typedef struct derive_state {
    ir_mod *m;
    int failed; /* set by the first failed ir_add; later builders are no-ops */
} derive_state;

static int checked(derive_state *st, int index) {
    if (index < 0) {
        st->failed = 1;
        return 0;
    }
    return index;
}

static int is_float_const(const derive_state *st, int index, float *value) {
    const ir_node *n = &st->m->nodes[index];
    if (n->op != IR_CONST || n->type != IR_FLOAT) return 0;
    if (value) *value = n->imm.f;
    return 1;
}

static int is_const_node(const derive_state *st, int index) {
    return st->m->nodes[index].op == IR_CONST;
}

static int fconst(derive_state *st, float v) {
    if (st->failed) return 0;
    return checked(st, ir_const_float(st->m, v));
}

/* Builds op(args) of the given type, evaluating it when every argument is a
 * constant. Nodes are built through ir_add so equal ones are shared. */
static int build(derive_state *st, ir_op op, ir_type type, int nargs, const int *args) {
    if (st->failed) return 0;
    int all_const = 1;
    for (int i = 0; i < nargs; i++)
        all_const &= is_const_node(st, args[i]);
    if (all_const) {
        ir_node node;
        memset(&node, 0, sizeof node);
        node.op = (uint8_t)op;
        node.type = (uint8_t)type;
        node.nargs = (uint8_t)nargs;
        node.buffer = -1;
        node.imm.i = (int32_t)st->m->nodes[args[0]].type;
        ir_value vals[4];
        for (int i = 0; i < nargs; i++) {
            node.args[i] = args[i];
            vals[i] = st->m->nodes[args[i]].imm;
        }
        ir_value r = ir_apply(&node, vals);
        if (type == IR_FLOAT) return checked(st, ir_const_float(st->m, r.f));
        if (type == IR_BOOL) return checked(st, ir_const_bool(st->m, r.i != 0));
        return checked(st, ir_const_int(st->m, r.i));
    }
    if (nargs == 1) return checked(st, ir_unary(st->m, op, type, args[0]));
    if (nargs == 2) return checked(st, ir_binary(st->m, op, type, args[0], args[1]));
    return checked(st, ir_select(st->m, type, args[0], args[1], args[2]));
}

static int un(derive_state *st, ir_op op, int a) {
    return build(st, op, IR_FLOAT, 1, &a);
}

static int bin(derive_state *st, ir_op op, int a, int b) {
    int args[2] = {a, b};
    return build(st, op, IR_FLOAT, 2, args);
}

static int cmp(derive_state *st, ir_op op, int a, int b) {
    int args[2] = {a, b};
    return build(st, op, IR_BOOL, 2, args);
}

static int neg(derive_state *st, int a) {
    if (st->failed) return 0;
    const ir_node *n = &st->m->nodes[a];
    if (n->op == IR_NEG) return n->args[0];
    return un(st, IR_NEG, a);
}

static int add(derive_state *st, int a, int b) {
    float v;
    if (is_float_const(st, a, &v) && v == 0.0f) return b;
    if (is_float_const(st, b, &v) && v == 0.0f) return a;
    return bin(st, IR_ADD, a, b);
}

static int sub(derive_state *st, int a, int b) {
    float v;
    if (is_float_const(st, b, &v) && v == 0.0f) return a;
    return bin(st, IR_SUB, a, b);
}

/* x * 1 = x and x * -1 = -x hold for every float x; x * 0 does not (inf,
 * NaN), so zeros are never folded here: structural zeros are NO_ADJOINT. */
static int mul(derive_state *st, int a, int b) {
    float v;
    if (is_float_const(st, a, &v) && v == 1.0f) return b;
    if (is_float_const(st, b, &v) && v == 1.0f) return a;
    if (is_float_const(st, a, &v) && v == -1.0f) return neg(st, b);
    if (is_float_const(st, b, &v) && v == -1.0f) return neg(st, a);
    return bin(st, IR_MUL, a, b);
}

static int fdiv(derive_state *st, int a, int b) {
    float v;
    if (is_float_const(st, b, &v) && v == 1.0f) return a;
    return bin(st, IR_DIV, a, b);
}

static int sel(derive_state *st, int c, int a, int b) {
    if (st->failed) return 0;
    if (a == b) return a;
    const ir_node *cn = &st->m->nodes[c];
    if (cn->op == IR_CONST) return cn->imm.i ? a : b;
    int args[3] = {c, a, b};
    return build(st, IR_SELECT, IR_FLOAT, 3, args);
}

/* Whether a derivative with respect to node `target` is worth building:
 * ints and bools have none, and a constant's is never read. */
static int wants(const derive_state *st, int target) {
    return st->m->nodes[target].type == IR_FLOAT && !is_const_node(st, target);
}

static void accumulate_term(derive_state *st, int *adj, int target, int term) {
    if (term == NO_ADJOINT || st->failed) return;
    adj[target] = adj[target] == NO_ADJOINT ? term : add(st, adj[target], term);
}

/* adj[target] += term; the term is only built when the target wants it. */
#define accumulate(st, adj, target, term)                                                          \
    do {                                                                                           \
        if (wants((st), (target))) accumulate_term((st), (adj), (target), (term));                 \
    } while (0)

/* select(c, adjoint, 0) or select(c, 0, adjoint). */
static int masked(derive_state *st, int cond, int adjoint, int when_true) {
    if (adjoint == NO_ADJOINT) return NO_ADJOINT;
    int zero = fconst(st, 0.0f);
    return when_true ? sel(st, cond, adjoint, zero) : sel(st, cond, zero, adjoint);
}

/* Hands node i's adjoint A on to its arguments. `self` is node i (the
 * forward value), reused where the derivative is a function of it. */
static void propagate(derive_state *st, int *adj, int self) {
    const ir_node node = st->m->nodes[self]; /* copy: ir_add may move the array */
    const int A = adj[self];
    const int a = node.nargs > 0 ? node.args[0] : 0;
    const int b = node.nargs > 1 ? node.args[1] : 0;
    const float ln2 = 0.693147180559945309f;
    if (node.type != IR_FLOAT) return;
    switch ((ir_op)node.op) {
    case IR_NEG:
        accumulate(st, adj, a, neg(st, A));
        break;
    case IR_ABS: {
        int zero = fconst(st, 0.0f);
        int sign = sel(st, cmp(st, IR_GT, a, zero), fconst(st, 1.0f),
                       sel(st, cmp(st, IR_LT, a, zero), fconst(st, -1.0f), zero));
        accumulate(st, adj, a, mul(st, A, sign));
        break;
    }
    case IR_EXP:
        accumulate(st, adj, a, mul(st, A, self));
        break;
    case IR_EXP2:
        accumulate(st, adj, a, mul(st, A, mul(st, self, fconst(st, ln2))));
        break;
    case IR_LOG:
        accumulate(st, adj, a, fdiv(st, A, a));
        break;
    case IR_LOG2:
        accumulate(st, adj, a, fdiv(st, A, mul(st, a, fconst(st, ln2))));
        break;
    case IR_SQRT:
        accumulate(st, adj, a, fdiv(st, A, mul(st, fconst(st, 2.0f), self)));
        break;
    case IR_RSQRT: {
        int cube = mul(st, mul(st, self, self), self);
        accumulate(st, adj, a, mul(st, A, mul(st, fconst(st, -0.5f), cube)));
        break;
    }
    case IR_SIN:
        accumulate(st, adj, a, mul(st, A, un(st, IR_COS, a)));
        break;
    case IR_COS:
        accumulate(st, adj, a, neg(st, mul(st, A, un(st, IR_SIN, a))));
        break;
    case IR_TAN:
        accumulate(st, adj, a, mul(st, A, add(st, fconst(st, 1.0f), mul(st, self, self))));
        break;
    case IR_TANH:
    case IR_TANH_APPROX:
        accumulate(st, adj, a, mul(st, A, sub(st, fconst(st, 1.0f), mul(st, self, self))));
        break;
    case IR_SIGMOID:
        accumulate(st, adj, a, mul(st, A, mul(st, self, sub(st, fconst(st, 1.0f), self))));
        break;
    case IR_ADD:
        accumulate(st, adj, a, A);
        accumulate(st, adj, b, A);
        break;
    case IR_SUB:
        accumulate(st, adj, a, A);
        accumulate(st, adj, b, neg(st, A));
        break;
    case IR_MUL:
        accumulate(st, adj, a, mul(st, A, b));
        accumulate(st, adj, b, mul(st, A, a));
        break;
    case IR_DIV:
        accumulate(st, adj, a, fdiv(st, A, b));
        accumulate(st, adj, b, neg(st, fdiv(st, mul(st, A, a), mul(st, b, b))));
        break;
    case IR_MOD: /* torch.remainder: d/da = 1, d/db = -floor(a / b) */
        accumulate(st, adj, a, A);
        accumulate(st, adj, b, neg(st, mul(st, A, bin(st, IR_FLOORDIV, a, b))));
        break;
    case IR_POW: {
        int zero = fconst(st, 0.0f);
        if (wants(st, a)) {
            /* d/da = b * a^(b-1), defined as 0 where b == 0 */
            int da = mul(st, b, bin(st, IR_POW, a, sub(st, b, fconst(st, 1.0f))));
            accumulate(st, adj, a, mul(st, A, sel(st, cmp(st, IR_EQ, b, zero), zero, da)));
        }
        if (wants(st, b)) {
            /* d/db = a^b * log(a), defined as 0 where a == 0 and b >= 0 */
            int args[2] = {cmp(st, IR_EQ, a, zero), cmp(st, IR_GE, b, zero)};
            int both = build(st, IR_AND, IR_BOOL, 2, args);
            int db = mul(st, self, un(st, IR_LOG, a));
            accumulate(st, adj, b, mul(st, A, sel(st, both, zero, db)));
        }
        break;
    }
    case IR_MIN:
    case IR_MAX: {
        /* The chosen argument gets the gradient; a tie splits it evenly;
         * when a NaN is involved (every comparison false) both get it. */
        ir_op a_loses = node.op == IR_MAX ? IR_LT : IR_GT;
        ir_op b_loses = node.op == IR_MAX ? IR_GT : IR_LT;
        int zero = fconst(st, 0.0f);
        int tie = cmp(st, IR_EQ, a, b);
        int half = mul(st, A, fconst(st, 0.5f));
        accumulate(st, adj, a, sel(st, tie, half, sel(st, cmp(st, a_loses, a, b), zero, A)));
        accumulate(st, adj, b, sel(st, tie, half, sel(st, cmp(st, b_loses, a, b), zero, A)));
        break;
    }
    case IR_SELECT: {
        int c = node.args[0];
        accumulate(st, adj, node.args[1], masked(st, c, A, 1));
        accumulate(st, adj, node.args[2], masked(st, c, A, 0));
        break;
    }
    default:
        /* Leaves, loads, floor, ceil, float(int), floor division and every
         * int or bool op: no derivative flows through. */
        break;
    }
}

int mod_derive(ir_mod *m, mod_derivative *out) {
    memset(out, 0, sizeof *out);
    if (m->num_nodes <= 0 || m->root < 0 || m->nodes[m->root].type != IR_FLOAT)
        return MOD_DERIVE_NOT_SCORE;
    const int n = m->num_nodes;
    const int root = m->root;
    int *adj = malloc((size_t)n * sizeof *adj);
    if (!adj) return MOD_DERIVE_NO_MEMORY;
    for (int i = 0; i < n; i++)
        adj[i] = NO_ADJOINT;

    derive_state st = {.m = m, .failed = 0};
    adj[root] = fconst(&st, 1.0f);
    for (int i = root; i >= 0 && !st.failed; i--)
        if (adj[i] != NO_ADJOINT) propagate(&st, adj, i);

    int rc = 0;
    out->value = root;
    out->dscore = -1;
    for (int i = 0; i < n && !st.failed; i++) {
        const ir_node *node = &m->nodes[i];
        if (adj[i] == NO_ADJOINT) continue;
        if (node->op == IR_SCORE) out->dscore = adj[i];
        if (node->op == IR_LOAD && node->type == IR_FLOAT) {
            if (out->num_loads == MOD_DERIVE_MAX_LOADS) {
                rc = MOD_DERIVE_TOO_MANY_LOADS;
                break;
            }
            mod_derivative_load *l = &out->loads[out->num_loads++];
            l->load = i;
            l->buffer = node->buffer;
            l->node = adj[i];
        }
    }
    if (out->dscore < 0) out->dscore = fconst(&st, 0.0f);
    free(adj);
    if (st.failed) return MOD_DERIVE_NO_MEMORY;
    return rc;
}
