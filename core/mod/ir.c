/*
 * The IR: building with hash-consing, compaction, dependencies, and
 * ir_apply, the one definition of what every op computes.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mod/ir.h"

static const struct {
    const char *name;
    int arity;
} op_table[IR_OP_COUNT] = {
    [IR_CONST] = {"const", 0},
    [IR_SCORE] = {"score", 0},
    [IR_B] = {"b", 0},
    [IR_H] = {"h", 0},
    [IR_Q] = {"q", 0},
    [IR_KV] = {"kv", 0},
    [IR_LOAD] = {"load", -1},
    [IR_NEG] = {"neg", 1},
    [IR_NOT] = {"not", 1},
    [IR_BITNOT] = {"bitnot", 1},
    [IR_ABS] = {"abs", 1},
    [IR_EXP] = {"exp", 1},
    [IR_EXP2] = {"exp2", 1},
    [IR_LOG] = {"log", 1},
    [IR_LOG2] = {"log2", 1},
    [IR_SQRT] = {"sqrt", 1},
    [IR_RSQRT] = {"rsqrt", 1},
    [IR_SIN] = {"sin", 1},
    [IR_COS] = {"cos", 1},
    [IR_TAN] = {"tan", 1},
    [IR_TANH] = {"tanh", 1},
    [IR_TANH_APPROX] = {"tanh_approx", 1},
    [IR_SIGMOID] = {"sigmoid", 1},
    [IR_FLOOR] = {"floor", 1},
    [IR_CEIL] = {"ceil", 1},
    [IR_TO_FLOAT] = {"to_float", 1},
    [IR_TO_INT] = {"to_int", 1},
    [IR_ADD] = {"add", 2},
    [IR_SUB] = {"sub", 2},
    [IR_MUL] = {"mul", 2},
    [IR_DIV] = {"div", 2},
    [IR_FLOORDIV] = {"floordiv", 2},
    [IR_MOD] = {"mod", 2},
    [IR_POW] = {"pow", 2},
    [IR_MIN] = {"min", 2},
    [IR_MAX] = {"max", 2},
    [IR_EQ] = {"eq", 2},
    [IR_NE] = {"ne", 2},
    [IR_LT] = {"lt", 2},
    [IR_LE] = {"le", 2},
    [IR_GT] = {"gt", 2},
    [IR_GE] = {"ge", 2},
    [IR_AND] = {"and", 2},
    [IR_OR] = {"or", 2},
    [IR_XOR] = {"xor", 2},
    [IR_SELECT] = {"select", 3},
};

const char *ir_op_name(ir_op op) {
    if ((unsigned)op >= IR_OP_COUNT) return "unknown-op";
    return op_table[op].name;
}

int ir_op_arity(ir_op op) {
    if ((unsigned)op >= IR_OP_COUNT) return 0;
    return op_table[op].arity;
}

void ir_init(ir_mod *m, flex_mod_kind kind) {
    memset(m, 0, sizeof *m);
    m->kind = kind;
    m->root = -1;
}

void ir_free(ir_mod *m) {
    if (!m) return;
    free(m->nodes);
    free(m->cons);
    m->nodes = NULL;
    m->cons = NULL;
    m->num_nodes = m->cap_nodes = m->cons_cap = 0;
}

int ir_copy(ir_mod *dst, const ir_mod *src) {
    *dst = *src;
    dst->nodes = NULL;
    dst->cons = NULL;
    dst->cap_nodes = dst->cons_cap = 0;
    if (src->num_nodes > 0) {
        dst->nodes = malloc((size_t)src->num_nodes * sizeof *dst->nodes);
        if (!dst->nodes) return -1;
        memcpy(dst->nodes, src->nodes, (size_t)src->num_nodes * sizeof *dst->nodes);
        dst->cap_nodes = src->num_nodes;
    }
    if (src->cons_cap > 0) {
        dst->cons = malloc((size_t)src->cons_cap * sizeof *dst->cons);
        if (!dst->cons) {
            free(dst->nodes);
            dst->nodes = NULL;
            return -1;
        }
        memcpy(dst->cons, src->cons, (size_t)src->cons_cap * sizeof *dst->cons);
        dst->cons_cap = src->cons_cap;
    }
    return 0;
}

/* ---- hash-consing ---- */

static uint32_t node_hash(const ir_node *n) {
    /* FNV-1a over the fields that define a node's identity. */
    uint32_t h = 2166136261u;
#define MIX(v)                                                                                     \
    do {                                                                                           \
        h ^= (uint32_t)(v);                                                                        \
        h *= 16777619u;                                                                            \
    } while (0)
    MIX(n->op);
    MIX(n->type);
    MIX(n->nargs);
    MIX((uint8_t)n->buffer);
    for (int i = 0; i < n->nargs; i++)
        MIX(n->args[i]);
    uint32_t bits;
    memcpy(&bits, &n->imm, sizeof bits);
    MIX(bits);
#undef MIX
    return h;
}

static int node_equal(const ir_node *a, const ir_node *b) {
    if (a->op != b->op || a->type != b->type || a->nargs != b->nargs || a->buffer != b->buffer)
        return 0;
    for (int i = 0; i < a->nargs; i++)
        if (a->args[i] != b->args[i]) return 0;
    /* Constants compare by bits: 0.0 and -0.0 stay distinct. */
    return memcmp(&a->imm, &b->imm, sizeof a->imm) == 0;
}

static int cons_insert(int32_t *table, int cap, const ir_node *nodes, int index) {
    uint32_t mask = (uint32_t)cap - 1;
    uint32_t slot = node_hash(&nodes[index]) & mask;
    while (table[slot] >= 0)
        slot = (slot + 1) & mask;
    table[slot] = index;
    return 0;
}

static int cons_rebuild(ir_mod *m, int cap) {
    int32_t *table = malloc((size_t)cap * sizeof *table);
    if (!table) return -1;
    for (int i = 0; i < cap; i++)
        table[i] = -1;
    for (int i = 0; i < m->num_nodes; i++)
        cons_insert(table, cap, m->nodes, i);
    free(m->cons);
    m->cons = table;
    m->cons_cap = cap;
    return 0;
}

int ir_add(ir_mod *m, const ir_node *node) {
    ir_node n = *node;
    if (n.nargs > 4) return -1;
    for (int i = 0; i < n.nargs; i++)
        if (n.args[i] < 0 || n.args[i] >= m->num_nodes) return -1;
    for (int i = n.nargs; i < 4; i++)
        n.args[i] = 0;
    if (n.op != IR_LOAD) n.buffer = -1;
    if (n.op != IR_CONST) {
        /* Record the operand type (see ir_node.imm). */
        n.imm.i = n.nargs > 0 ? (int32_t)m->nodes[n.args[0]].type : 0;
    } else if (n.type != IR_FLOAT) {
        if (n.type == IR_BOOL) n.imm.i = n.imm.i != 0;
    }

    if (m->cons_cap == 0 && cons_rebuild(m, 64) < 0) return -1;
    uint32_t mask = (uint32_t)m->cons_cap - 1;
    uint32_t slot = node_hash(&n) & mask;
    while (m->cons[slot] >= 0) {
        if (node_equal(&m->nodes[m->cons[slot]], &n)) return m->cons[slot];
        slot = (slot + 1) & mask;
    }

    if (m->num_nodes >= IR_MAX_NODES) return -1;
    if (m->num_nodes == m->cap_nodes) {
        int cap = m->cap_nodes ? m->cap_nodes * 2 : 32;
        ir_node *grown = realloc(m->nodes, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        m->nodes = grown;
        m->cap_nodes = cap;
    }
    int index = m->num_nodes++;
    m->nodes[index] = n;
    if ((m->num_nodes) * 2 > m->cons_cap) {
        if (cons_rebuild(m, m->cons_cap * 2) < 0) {
            m->num_nodes--;
            return -1;
        }
    } else {
        m->cons[slot] = index;
    }
    return index;
}

static ir_node blank_node(ir_op op, ir_type type) {
    ir_node n;
    memset(&n, 0, sizeof n);
    n.op = (uint8_t)op;
    n.type = (uint8_t)type;
    n.buffer = -1;
    return n;
}

int ir_const_int(ir_mod *m, int32_t v) {
    ir_node n = blank_node(IR_CONST, IR_INT);
    n.imm.i = v;
    return ir_add(m, &n);
}

int ir_const_float(ir_mod *m, float v) {
    ir_node n = blank_node(IR_CONST, IR_FLOAT);
    n.imm.f = v;
    return ir_add(m, &n);
}

int ir_const_bool(ir_mod *m, int v) {
    ir_node n = blank_node(IR_CONST, IR_BOOL);
    n.imm.i = v != 0;
    return ir_add(m, &n);
}

int ir_leaf(ir_mod *m, ir_op op) {
    ir_node n = blank_node(op, op == IR_SCORE ? IR_FLOAT : IR_INT);
    return ir_add(m, &n);
}

int ir_unary(ir_mod *m, ir_op op, ir_type type, int a) {
    if (a < 0) return -1;
    ir_node n = blank_node(op, type);
    n.nargs = 1;
    n.args[0] = a;
    return ir_add(m, &n);
}

int ir_binary(ir_mod *m, ir_op op, ir_type type, int a, int b) {
    if (a < 0 || b < 0) return -1;
    ir_node n = blank_node(op, type);
    n.nargs = 2;
    n.args[0] = a;
    n.args[1] = b;
    return ir_add(m, &n);
}

int ir_select(ir_mod *m, ir_type type, int c, int a, int b) {
    if (c < 0 || a < 0 || b < 0) return -1;
    ir_node n = blank_node(IR_SELECT, type);
    n.nargs = 3;
    n.args[0] = c;
    n.args[1] = a;
    n.args[2] = b;
    return ir_add(m, &n);
}

int ir_load(ir_mod *m, int buffer, ir_type type, int nargs, const int32_t *args) {
    if (buffer < 0 || buffer >= m->num_buffers || nargs < 1 || nargs > 4) return -1;
    ir_node n = blank_node(IR_LOAD, type);
    n.buffer = (int8_t)buffer;
    n.nargs = (uint8_t)nargs;
    for (int i = 0; i < nargs; i++) {
        if (args[i] < 0) return -1;
        n.args[i] = args[i];
    }
    return ir_add(m, &n);
}

int ir_compact(ir_mod *m) {
    if (m->root < 0 || m->num_nodes == 0) return 0;
    int n = m->num_nodes;
    int32_t *map = malloc((size_t)n * sizeof *map);
    if (!map) return -1;
    for (int i = 0; i < n; i++)
        map[i] = -1;
    map[m->root] = 0; /* reachable mark */
    for (int i = n - 1; i >= 0; i--) {
        if (map[i] < 0) continue;
        for (int a = 0; a < m->nodes[i].nargs; a++)
            map[m->nodes[i].args[a]] = 0;
    }
    int count = 0;
    for (int i = 0; i < n; i++) {
        if (map[i] < 0) continue;
        ir_node node = m->nodes[i];
        for (int a = 0; a < node.nargs; a++)
            node.args[a] = map[node.args[a]];
        map[i] = count;
        m->nodes[count++] = node;
    }
    m->root = map[m->root];
    m->num_nodes = count;
    free(map);
    int cap = 64;
    while (cap < count * 2)
        cap *= 2;
    return cons_rebuild(m, cap);
}

void ir_dependencies(const ir_mod *m, uint8_t *deps) {
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *n = &m->nodes[i];
        uint8_t d = 0;
        switch (n->op) {
        case IR_SCORE:
            d = IR_DEP_SCORE;
            break;
        case IR_B:
            d = IR_DEP_B;
            break;
        case IR_H:
            d = IR_DEP_H;
            break;
        case IR_Q:
            d = IR_DEP_Q;
            break;
        case IR_KV:
            d = IR_DEP_KV;
            break;
        default:
            break;
        }
        for (int a = 0; a < n->nargs; a++)
            d |= deps[n->args[a]];
        deps[i] = d;
    }
}

ir_type ir_type_of_dtype(flex_dtype dtype) {
    switch (dtype) {
    case FLEX_I32:
    case FLEX_I64:
    case FLEX_U8:
        return IR_INT;
    case FLEX_BOOL:
        return IR_BOOL;
    case FLEX_F32:
    case FLEX_F16:
    case FLEX_BF16:
        return IR_FLOAT;
    }
    return IR_FLOAT;
}

/* ---- scalar semantics ---- */

/* Integer arithmetic goes through uint32 so overflow wraps instead of being
 * undefined. */
static int32_t wrap(uint32_t u) {
    int32_t v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static int32_t int_floordiv(int32_t a, int32_t b) {
    if (b == 0) return 0;
    if (b == -1) return wrap(0u - (uint32_t)a); /* INT32_MIN // -1 wraps */
    int32_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q--;
    return q;
}

static int32_t int_mod(int32_t a, int32_t b) {
    if (b == 0 || b == -1) return 0;
    int32_t r = a % b;
    if (r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
}

static float float_mod(float a, float b) {
    float r = fmodf(a, b);
    if (r != 0.0f && ((r < 0.0f) != (b < 0.0f))) r += b;
    return r;
}

static float float_sigmoid(float x) {
    /* Two forms so that neither overflows exp. */
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

static int32_t float_to_int(float f) {
    if (f != f) return 0;
    if (f >= 2147483648.0f) return INT32_MAX;
    if (f <= -2147483648.0f) return INT32_MIN;
    return (int32_t)f;
}

static ir_value int_result(int32_t v) {
    ir_value r;
    r.i = v;
    return r;
}

static ir_value float_result(float v) {
    ir_value r;
    r.f = v;
    return r;
}

static ir_value apply_int(const ir_node *node, const ir_value *args) {
    int32_t a = node->nargs > 0 ? args[0].i : 0;
    int32_t b = node->nargs > 1 ? args[1].i : 0;
    uint32_t ua = (uint32_t)a, ub = (uint32_t)b;
    switch ((ir_op)node->op) {
    case IR_NEG:
        return int_result(wrap(0u - ua));
    case IR_BITNOT:
        return int_result(wrap(~ua));
    case IR_NOT:
        return int_result(!a);
    case IR_ABS:
        return int_result(a < 0 ? wrap(0u - ua) : a);
    case IR_FLOOR:
    case IR_CEIL:
        return int_result(a);
    case IR_TO_INT:
        if (ir_operand_type(node) == IR_FLOAT) return int_result(float_to_int(args[0].f));
        return int_result(a);
    case IR_ADD:
        return int_result(wrap(ua + ub));
    case IR_SUB:
        return int_result(wrap(ua - ub));
    case IR_MUL:
        return int_result(wrap(ua * ub));
    case IR_DIV: /* not produced by the parser for ints; floor division is the int meaning */
    case IR_FLOORDIV:
        return int_result(int_floordiv(a, b));
    case IR_MOD:
        return int_result(int_mod(a, b));
    case IR_MIN:
        return int_result(a < b ? a : b);
    case IR_MAX:
        return int_result(a > b ? a : b);
    case IR_AND:
        return int_result(wrap(ua & ub));
    case IR_OR:
        return int_result(wrap(ua | ub));
    case IR_XOR:
        return int_result(wrap(ua ^ ub));
    case IR_SELECT:
        return args[0].i ? args[1] : args[2];
    default:
        return int_result(0);
    }
}

static ir_value apply_compare(const ir_node *node, const ir_value *args) {
    int r;
    if (ir_operand_type(node) == IR_FLOAT) {
        float a = args[0].f, b = args[1].f;
        switch ((ir_op)node->op) {
        case IR_EQ:
            r = a == b;
            break;
        case IR_NE:
            r = a != b;
            break;
        case IR_LT:
            r = a < b;
            break;
        case IR_LE:
            r = a <= b;
            break;
        case IR_GT:
            r = a > b;
            break;
        default:
            r = a >= b;
            break;
        }
    } else {
        int32_t a = args[0].i, b = args[1].i;
        switch ((ir_op)node->op) {
        case IR_EQ:
            r = a == b;
            break;
        case IR_NE:
            r = a != b;
            break;
        case IR_LT:
            r = a < b;
            break;
        case IR_LE:
            r = a <= b;
            break;
        case IR_GT:
            r = a > b;
            break;
        default:
            r = a >= b;
            break;
        }
    }
    return int_result(r);
}

static ir_value apply_float(const ir_node *node, const ir_value *args) {
    float a = node->nargs > 0 ? args[0].f : 0.0f;
    float b = node->nargs > 1 ? args[1].f : 0.0f;
    switch ((ir_op)node->op) {
    case IR_NEG:
        return float_result(-a);
    case IR_ABS:
        return float_result(fabsf(a));
    case IR_EXP:
        return float_result(expf(a));
    case IR_EXP2:
        return float_result(exp2f(a));
    case IR_LOG:
        return float_result(logf(a));
    case IR_LOG2:
        return float_result(log2f(a));
    case IR_SQRT:
        return float_result(sqrtf(a));
    case IR_RSQRT:
        return float_result(1.0f / sqrtf(a));
    case IR_SIN:
        return float_result(sinf(a));
    case IR_COS:
        return float_result(cosf(a));
    case IR_TAN:
        return float_result(tanf(a));
    case IR_TANH:
    case IR_TANH_APPROX:
        return float_result(tanhf(a));
    case IR_SIGMOID:
        return float_result(float_sigmoid(a));
    case IR_FLOOR:
        return float_result(floorf(a));
    case IR_CEIL:
        return float_result(ceilf(a));
    case IR_TO_FLOAT:
        if (ir_operand_type(node) == IR_FLOAT) return args[0];
        return float_result((float)args[0].i);
    case IR_ADD:
        return float_result(a + b);
    case IR_SUB:
        return float_result(a - b);
    case IR_MUL:
        return float_result(a * b);
    case IR_DIV:
        return float_result(a / b);
    case IR_FLOORDIV:
        return float_result(floorf(a / b));
    case IR_MOD:
        return float_result(float_mod(a, b));
    case IR_POW:
        return float_result(powf(a, b));
    case IR_MIN:
        return float_result(ir_fmin(a, b));
    case IR_MAX:
        return float_result(ir_fmax(a, b));
    case IR_SELECT:
        return args[0].i ? args[1] : args[2];
    default:
        return float_result(0.0f);
    }
}

ir_value ir_apply(const ir_node *node, const ir_value *args) {
    switch ((ir_op)node->op) {
    case IR_CONST:
        return node->imm;
    case IR_EQ:
    case IR_NE:
    case IR_LT:
    case IR_LE:
    case IR_GT:
    case IR_GE:
        return apply_compare(node, args);
    default:
        break;
    }
    if (node->type == IR_FLOAT) return apply_float(node, args);
    ir_value r = apply_int(node, args);
    if (node->type == IR_BOOL) r.i = r.i != 0;
    return r;
}
