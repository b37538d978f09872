/*
 * Constant folding and algebraic identities that hold for every input.
 *
 * The mod is rebuilt node by node in topological order: each node's args are
 * first replaced by their simplified versions, then the node itself is
 * folded (all args constant: evaluated with ir_apply, so a folded value is
 * exactly what the run-time evaluators would compute) or simplified by an
 * identity. Float identities are limited to those exact for every float,
 * signed zeros and NaN included: x * 1, x / 1, x - 0, x + (-0); never x * 0
 * and never reassociation.
 */
#include <stdlib.h>
#include <string.h>

#include "fpenv.h"

#include "mod/parse.h"

static int is_const(const ir_mod *m, int n) {
    return m->nodes[n].op == IR_CONST;
}

static int is_int_const(const ir_mod *m, int n, int32_t v) {
    const ir_node *x = &m->nodes[n];
    return x->op == IR_CONST && x->type != IR_FLOAT && x->imm.i == v;
}

/* Float constant with exactly these bits (so +0 and -0 differ). */
static int is_float_const(const ir_mod *m, int n, float v) {
    const ir_node *x = &m->nodes[n];
    return x->op == IR_CONST && x->type == IR_FLOAT && memcmp(&x->imm.f, &v, sizeof v) == 0;
}

static int is_one(const ir_mod *m, int n) {
    return m->nodes[n].type == IR_FLOAT ? is_float_const(m, n, 1.0f) : is_int_const(m, n, 1);
}

static int add_const(ir_mod *m, ir_type type, ir_value v) {
    if (type == IR_FLOAT) return ir_const_float(m, v.f);
    if (type == IR_BOOL) return ir_const_bool(m, v.i);
    return ir_const_int(m, v.i);
}

static int simplify_not(ir_mod *m, int x) {
    if (x < 0) return -1;
    if (m->nodes[x].op == IR_NOT) return m->nodes[x].args[0];
    if (is_const(m, x)) return ir_const_bool(m, !m->nodes[x].imm.i);
    return ir_unary(m, IR_NOT, IR_BOOL, x);
}

/* Returns the index in m of the simplified form of n (whose args are
 * already indices in m), adding nodes as needed; -1 on failure. */
static int simplify(ir_mod *m, const ir_node *n) {
    ir_op op = (ir_op)n->op;
    ir_type type = (ir_type)n->type;
    int a = n->nargs > 0 ? n->args[0] : -1;
    int b = n->nargs > 1 ? n->args[1] : -1;
    int c = n->nargs > 2 ? n->args[2] : -1;

    if (op == IR_CONST || op == IR_LOAD || n->nargs == 0) return ir_add(m, n);

    int all_const = 1;
    for (int i = 0; i < n->nargs; i++)
        all_const &= is_const(m, n->args[i]);
    if (all_const) {
        ir_value args[4];
        for (int i = 0; i < n->nargs; i++)
            args[i] = m->nodes[n->args[i]].imm;
        ir_node probe = *n;
        probe.imm.i = (int32_t)m->nodes[a].type; /* operand type, as ir_add records it */
        return add_const(m, type, ir_apply(&probe, args));
    }

    ir_type at = a >= 0 ? (ir_type)m->nodes[a].type : IR_INT;
    int exact_ints = at != IR_FLOAT; /* int and bool operands */

    switch (op) {
    case IR_NEG:
    case IR_NOT:
    case IR_BITNOT:
        /* --x, !!x, ~~x */
        if (m->nodes[a].op == op) return m->nodes[a].args[0];
        break;
    case IR_ABS:
        if (m->nodes[a].op == IR_ABS) return a;
        break;
    case IR_ADD:
        if (type == IR_FLOAT) {
            if (is_float_const(m, b, -0.0f)) return a;
            if (is_float_const(m, a, -0.0f)) return b;
        } else {
            if (is_int_const(m, b, 0)) return a;
            if (is_int_const(m, a, 0)) return b;
        }
        break;
    case IR_SUB:
        if (type == IR_FLOAT) {
            if (is_float_const(m, b, 0.0f)) return a;
        } else {
            if (is_int_const(m, b, 0)) return a;
            if (a == b) return ir_const_int(m, 0);
        }
        break;
    case IR_MUL:
        if (is_one(m, b)) return a;
        if (is_one(m, a)) return b;
        if (type != IR_FLOAT && (is_int_const(m, a, 0) || is_int_const(m, b, 0)))
            return ir_const_int(m, 0);
        break;
    case IR_DIV:
        if (type == IR_FLOAT && is_one(m, b)) return a;
        break;
    case IR_FLOORDIV:
        if (type != IR_FLOAT && is_int_const(m, b, 1)) return a;
        break;
    case IR_MOD:
        if (type != IR_FLOAT && (is_int_const(m, b, 1) || is_int_const(m, b, -1)))
            return ir_const_int(m, 0);
        break;
    case IR_MIN:
    case IR_MAX:
        if (a == b) return a;
        break;
    case IR_EQ:
    case IR_LE:
    case IR_GE:
        if (a == b && exact_ints) return ir_const_bool(m, 1);
        break;
    case IR_NE:
    case IR_LT:
    case IR_GT:
        if (a == b && exact_ints) return ir_const_bool(m, 0);
        break;
    case IR_AND:
        if (a == b) return a;
        if (type == IR_BOOL) {
            if (is_int_const(m, a, 1)) return b;
            if (is_int_const(m, b, 1)) return a;
            if (is_int_const(m, a, 0) || is_int_const(m, b, 0)) return ir_const_bool(m, 0);
        } else {
            if (is_int_const(m, a, -1)) return b;
            if (is_int_const(m, b, -1)) return a;
            if (is_int_const(m, a, 0) || is_int_const(m, b, 0)) return ir_const_int(m, 0);
        }
        break;
    case IR_OR:
        if (a == b) return a;
        if (type == IR_BOOL) {
            if (is_int_const(m, a, 0)) return b;
            if (is_int_const(m, b, 0)) return a;
            if (is_int_const(m, a, 1) || is_int_const(m, b, 1)) return ir_const_bool(m, 1);
        } else {
            if (is_int_const(m, a, 0)) return b;
            if (is_int_const(m, b, 0)) return a;
            if (is_int_const(m, a, -1) || is_int_const(m, b, -1)) return ir_const_int(m, -1);
        }
        break;
    case IR_XOR:
        if (a == b) return type == IR_BOOL ? ir_const_bool(m, 0) : ir_const_int(m, 0);
        if (is_int_const(m, a, 0)) return b;
        if (is_int_const(m, b, 0)) return a;
        if (type == IR_BOOL) {
            if (is_int_const(m, a, 1)) return simplify_not(m, b);
            if (is_int_const(m, b, 1)) return simplify_not(m, a);
        }
        break;
    case IR_SELECT:
        if (is_const(m, a)) return m->nodes[a].imm.i ? b : c;
        if (b == c) return b;
        if (type == IR_BOOL) {
            if (is_int_const(m, b, 1) && is_int_const(m, c, 0)) return a;
            if (is_int_const(m, b, 0) && is_int_const(m, c, 1)) return simplify_not(m, a);
        }
        /* where(!c, x, y) == where(c, y, x) */
        if (m->nodes[a].op == IR_NOT) return ir_select(m, type, m->nodes[a].args[0], c, b);
        break;
    default:
        break;
    }
    return ir_add(m, n);
}

static int fold(ir_mod *m) {
    if (m->root < 0 || m->num_nodes == 0) return 0;
    ir_mod out;
    ir_init(&out, m->kind);
    memcpy(out.buffers, m->buffers, sizeof out.buffers);
    out.num_buffers = m->num_buffers;
    int32_t *map = malloc((size_t)m->num_nodes * sizeof *map);
    if (!map) return -1;
    for (int i = 0; i < m->num_nodes; i++) {
        ir_node n = m->nodes[i];
        for (int a = 0; a < n.nargs; a++)
            n.args[a] = map[n.args[a]];
        int r = simplify(&out, &n);
        if (r < 0) {
            free(map);
            ir_free(&out);
            return -1;
        }
        map[i] = r;
    }
    out.root = map[m->root];
    free(map);
    if (ir_compact(&out) < 0) {
        ir_free(&out);
        return -1;
    }
    ir_free(m);
    *m = out;
    return 0;
}

/* Folding evaluates float constants as the kernels evaluate the mod: with
 * subnormals, whatever the caller's thread flushes (core/fpenv.h). */
int ir_fold(ir_mod *m) {
    unsigned fp = flex_fp_mods_begin();
    int rc = fold(m);
    flex_fp_restore(fp);
    return rc;
}
