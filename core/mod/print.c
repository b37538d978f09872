/*
 * Canonical text of a mod and its hash.
 *
 * The text depends only on the DAG's structure (never on node numbering):
 * nodes used more than once become lets, named t0, t1, ... in the order a
 * depth-first walk from the root finishes them; every implicit promotion of
 * the source is written out (float(q)); parentheses only where precedence
 * needs them. Parsing the text again with the same buffer declarations gives
 * the same IR, hence the same text.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/ir.h"

typedef struct text_builder {
    char *data;
    size_t len, cap;
    int failed;
} text_builder;

static void append(text_builder *tb, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void append(text_builder *tb, const char *fmt, ...) {
    if (tb->failed) return;
    va_list ap;
    va_start(ap, fmt);
    char small[128];
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        tb->failed = 1;
        return;
    }
    if (tb->len + (size_t)n + 1 > tb->cap) {
        size_t cap = tb->cap ? tb->cap : 256;
        while (cap < tb->len + (size_t)n + 1)
            cap *= 2;
        char *grown = realloc(tb->data, cap);
        if (!grown) {
            tb->failed = 1;
            return;
        }
        tb->data = grown;
        tb->cap = cap;
    }
    if ((size_t)n < sizeof small) {
        memcpy(tb->data + tb->len, small, (size_t)n + 1);
    } else {
        va_start(ap, fmt);
        vsnprintf(tb->data + tb->len, (size_t)n + 1, fmt, ap);
        va_end(ap);
    }
    tb->len += (size_t)n;
}

/* Precedence levels as the parser reads them; higher binds tighter. */
enum {
    PREC_OR = 1,
    PREC_AND = 2,
    PREC_XOR = 3,
    PREC_EQUALITY = 4,
    PREC_RELATIONAL = 5,
    PREC_ADDITIVE = 6,
    PREC_MULTIPLICATIVE = 7,
    PREC_UNARY = 8,
    PREC_PRIMARY = 9
};

typedef struct printer {
    const ir_mod *m;
    text_builder tb;
    int *uses;
    int *let_id; /* -1: printed inline */
    int *depth;  /* parser nesting its inline text needs (see inline_depth) */
    int next_let;
    char let_prefix[8];
} printer;

static void emit(printer *pr, int node, int min_prec);

static void emit_float(printer *pr, float f) {
    if (f != f) {
        append(&pr->tb, "(0.0 / 0.0)");
        return;
    }
    if (isinf(f)) {
        append(&pr->tb, f < 0 ? "-inf" : "inf");
        return;
    }
    char buf[48];
    snprintf(buf, sizeof buf, "%.9g", (double)f);
    /* Make sure it reads back as a float, not an int. */
    if (!strpbrk(buf, ".e")) strcat(buf, ".0");
    append(&pr->tb, "%s", buf);
}

static int const_prec(const ir_node *n) {
    if (n->type == IR_FLOAT) {
        if (n->imm.f != n->imm.f) return PREC_PRIMARY;
        return signbit(n->imm.f) ? PREC_UNARY : PREC_PRIMARY;
    }
    if (n->type == IR_INT && n->imm.i < 0) return PREC_UNARY;
    return PREC_PRIMARY;
}

static const char *call_name(ir_op op) {
    switch (op) {
    case IR_ABS:
        return "abs";
    case IR_EXP:
        return "exp";
    case IR_EXP2:
        return "exp2";
    case IR_LOG:
        return "log";
    case IR_LOG2:
        return "log2";
    case IR_SQRT:
        return "sqrt";
    case IR_RSQRT:
        return "rsqrt";
    case IR_SIN:
        return "sin";
    case IR_COS:
        return "cos";
    case IR_TAN:
        return "tan";
    case IR_TANH:
        return "tanh";
    case IR_TANH_APPROX:
        return "tanh_approx";
    case IR_SIGMOID:
        return "sigmoid";
    case IR_FLOOR:
        return "floor";
    case IR_CEIL:
        return "ceil";
    case IR_TO_FLOAT:
        return "float";
    case IR_TO_INT:
        return "int";
    case IR_POW:
        return "pow";
    case IR_MIN:
        return "min";
    case IR_MAX:
        return "max";
    case IR_SELECT:
        return "where";
    default:
        return NULL;
    }
}

/* Infix spelling and precedence of a binary op at a node type. */
static const char *infix(const ir_node *n, int *prec) {
    int is_bool = n->type == IR_BOOL;
    switch ((ir_op)n->op) {
    case IR_OR:
        *prec = PREC_OR;
        return is_bool ? "||" : "|";
    case IR_AND:
        *prec = PREC_AND;
        return is_bool ? "&&" : "&";
    case IR_XOR:
        *prec = PREC_XOR;
        return "^";
    case IR_EQ:
        *prec = PREC_EQUALITY;
        return "==";
    case IR_NE:
        *prec = PREC_EQUALITY;
        return "!=";
    case IR_LT:
        *prec = PREC_RELATIONAL;
        return "<";
    case IR_LE:
        *prec = PREC_RELATIONAL;
        return "<=";
    case IR_GT:
        *prec = PREC_RELATIONAL;
        return ">";
    case IR_GE:
        *prec = PREC_RELATIONAL;
        return ">=";
    case IR_ADD:
        *prec = PREC_ADDITIVE;
        return "+";
    case IR_SUB:
        *prec = PREC_ADDITIVE;
        return "-";
    case IR_MUL:
        *prec = PREC_MULTIPLICATIVE;
        return "*";
    case IR_DIV:
        *prec = PREC_MULTIPLICATIVE;
        return n->type == IR_FLOAT ? "/" : "//";
    case IR_FLOORDIV:
        *prec = PREC_MULTIPLICATIVE;
        return "//";
    case IR_MOD:
        *prec = PREC_MULTIPLICATIVE;
        return "%";
    default:
        return NULL;
    }
}

static int node_prec(const printer *pr, int node) {
    const ir_node *n = &pr->m->nodes[node];
    if (pr->let_id[node] >= 0) return PREC_PRIMARY;
    if (n->op == IR_CONST) return const_prec(n);
    if (n->op == IR_NEG || n->op == IR_NOT || n->op == IR_BITNOT) return PREC_UNARY;
    int prec;
    if (infix(n, &prec)) return prec;
    return PREC_PRIMARY;
}

/* Prints node's own expression (not its let name). */
static void emit_expr(printer *pr, int node) {
    const ir_node *n = &pr->m->nodes[node];
    text_builder *tb = &pr->tb;
    switch ((ir_op)n->op) {
    case IR_CONST:
        if (n->type == IR_FLOAT)
            emit_float(pr, n->imm.f);
        else if (n->type == IR_BOOL)
            append(tb, n->imm.i ? "true" : "false");
        else
            append(tb, "%d", (int)n->imm.i);
        return;
    case IR_SCORE:
        append(tb, "score");
        return;
    case IR_B:
        append(tb, "b");
        return;
    case IR_H:
        append(tb, "h");
        return;
    case IR_Q:
        append(tb, "q");
        return;
    case IR_KV:
        append(tb, "kv");
        return;
    case IR_LOAD:
        append(tb, "%s[", pr->m->buffers[n->buffer].name);
        for (int i = 0; i < n->nargs; i++) {
            if (i) append(tb, ", ");
            emit(pr, n->args[i], 0);
        }
        append(tb, "]");
        return;
    case IR_NEG:
    case IR_NOT:
    case IR_BITNOT:
        append(tb, n->op == IR_NEG ? "-" : n->op == IR_NOT ? "!" : "~");
        emit(pr, n->args[0], PREC_PRIMARY);
        return;
    default:
        break;
    }
    int prec;
    const char *op = infix(n, &prec);
    if (op) {
        /* Left-associative; comparisons do not chain, so both sides of one
         * bind tighter than it. */
        int comparison = prec == PREC_EQUALITY || prec == PREC_RELATIONAL;
        emit(pr, n->args[0], comparison ? prec + 1 : prec);
        append(tb, " %s ", op);
        emit(pr, n->args[1], prec + 1);
        return;
    }
    const char *name = call_name((ir_op)n->op);
    append(tb, "%s(", name ? name : ir_op_name((ir_op)n->op));
    for (int i = 0; i < n->nargs; i++) {
        if (i) append(tb, ", ");
        emit(pr, n->args[i], 0);
    }
    append(tb, ")");
}

static void emit(printer *pr, int node, int min_prec) {
    if (pr->let_id[node] >= 0) {
        append(&pr->tb, "%s%d", pr->let_prefix, pr->let_id[node]);
        return;
    }
    int paren = node_prec(pr, node) < min_prec;
    if (paren) append(&pr->tb, "(");
    emit_expr(pr, node);
    if (paren) append(&pr->tb, ")");
}

static int is_trivial(const ir_node *n) {
    return n->nargs == 0; /* constants and variables read as well as a let name */
}

/*
 * The parser refuses text nested too deeply (one level per unary operator,
 * one per parenthesis, call or index and one for the expression inside it),
 * and lets can build a mod whose inline text would nest far deeper than its
 * source did. So a node whose inline text would nest deeper than this
 * becomes a let, which keeps every canonical text parseable. Ordinary mods
 * never come near it, so their text is unaffected.
 */
#define LET_DEPTH 64

/* Nesting of a node printed as an operand: a let name is one level, a
 * parenthesised expression two more than its inline text. */
static int operand_depth(const printer *pr, int node, int min_prec) {
    if (pr->let_id[node] >= 0) return 1;
    if (node_prec(pr, node) < min_prec) return 2 + pr->depth[node];
    return pr->depth[node];
}

/* Nesting of node's inline text, from the depths of its (already decided)
 * args. */
static int inline_depth(const printer *pr, int node) {
    const ir_node *n = &pr->m->nodes[node];
    if (n->op == IR_CONST) return 3; /* at most "-1.5" or "(0.0 / 0.0)" */
    if (n->nargs == 0) return 1;
    if (n->op == IR_NEG || n->op == IR_NOT || n->op == IR_BITNOT)
        return 1 + operand_depth(pr, n->args[0], PREC_PRIMARY);
    int prec;
    if (infix(n, &prec)) {
        int comparison = prec == PREC_EQUALITY || prec == PREC_RELATIONAL;
        int l = operand_depth(pr, n->args[0], comparison ? prec + 1 : prec);
        int r = operand_depth(pr, n->args[1], prec + 1);
        return l > r ? l : r;
    }
    int deepest = 0; /* a call or buffer read: each arg is a full expression */
    for (int i = 0; i < n->nargs; i++) {
        int d = operand_depth(pr, n->args[i], 0);
        if (d > deepest) deepest = d;
    }
    return 2 + deepest;
}

/* Post-order walk naming and printing the lets. */
static void emit_lets(printer *pr, int node, char *visited) {
    if (visited[node]) return;
    visited[node] = 1;
    const ir_node *n = &pr->m->nodes[node];
    for (int i = 0; i < n->nargs; i++)
        emit_lets(pr, n->args[i], visited);
    pr->depth[node] = inline_depth(pr, node);
    if ((pr->uses[node] >= 2 && !is_trivial(n)) || pr->depth[node] > LET_DEPTH) {
        append(&pr->tb, "let %s%d = ", pr->let_prefix, pr->next_let);
        emit_expr(pr, node);
        append(&pr->tb, ";\n");
        pr->let_id[node] = pr->next_let++;
    }
}

char *ir_canonical_text(const ir_mod *m) {
    if (m->root < 0 || m->root >= m->num_nodes) return NULL;
    printer pr;
    memset(&pr, 0, sizeof pr);
    pr.m = m;
    int n = m->num_nodes;
    pr.uses = calloc((size_t)n, sizeof *pr.uses);
    pr.let_id = malloc((size_t)n * sizeof *pr.let_id);
    pr.depth = calloc((size_t)n, sizeof *pr.depth);
    char *reach = calloc((size_t)n, 1);
    char *visited = calloc((size_t)n, 1);
    if (!pr.uses || !pr.let_id || !pr.depth || !reach || !visited) goto fail;
    for (int i = 0; i < n; i++)
        pr.let_id[i] = -1;
    reach[m->root] = 1;
    for (int i = n - 1; i >= 0; i--) {
        if (!reach[i]) continue;
        for (int a = 0; a < m->nodes[i].nargs; a++) {
            reach[m->nodes[i].args[a]] = 1;
            pr.uses[m->nodes[i].args[a]]++;
        }
    }
    /* Let names must not collide with a buffer name: pick a prefix that no
     * buffer name starts with followed by digits only. */
    static const char *const prefixes[] = {"t", "t_", "tmp", "tmp_", "let_t", "_t"};
    for (size_t k = 0; k < sizeof prefixes / sizeof prefixes[0]; k++) {
        int clash = 0;
        size_t plen = strlen(prefixes[k]);
        for (int bi = 0; bi < m->num_buffers && !clash; bi++) {
            const char *bn = m->buffers[bi].name;
            if (strncmp(bn, prefixes[k], plen) != 0 || !bn[plen]) continue;
            clash = strspn(bn + plen, "0123456789") == strlen(bn + plen);
        }
        if (!clash) {
            snprintf(pr.let_prefix, sizeof pr.let_prefix, "%s", prefixes[k]);
            break;
        }
    }
    if (!pr.let_prefix[0]) snprintf(pr.let_prefix, sizeof pr.let_prefix, "__t");
    emit_lets(&pr, m->root, visited);
    emit(&pr, m->root, 0);
    if (pr.tb.failed || !pr.tb.data) goto fail;
    free(pr.uses);
    free(pr.let_id);
    free(pr.depth);
    free(reach);
    free(visited);
    return pr.tb.data;
fail:
    free(pr.tb.data);
    free(pr.uses);
    free(pr.let_id);
    free(pr.depth);
    free(reach);
    free(visited);
    return NULL;
}

uint64_t ir_hash(const ir_mod *m, const char *canonical_text) {
    uint64_t h = 14695981039346656037ull;
#define MIX_BYTE(x)                                                                                \
    do {                                                                                           \
        h ^= (uint8_t)(x);                                                                         \
        h *= 1099511628211ull;                                                                     \
    } while (0)
    MIX_BYTE(m->kind);
    for (const char *c = canonical_text ? canonical_text : ""; *c; c++)
        MIX_BYTE(*c);
    MIX_BYTE(0);
    for (int i = 0; i < m->num_buffers; i++) {
        for (const char *c = m->buffers[i].name; *c; c++)
            MIX_BYTE(*c);
        MIX_BYTE(0);
        MIX_BYTE(m->buffers[i].dtype);
        MIX_BYTE(m->buffers[i].ndim);
    }
#undef MIX_BYTE
    return h;
}
