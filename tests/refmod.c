/*
 * The independent mod evaluator (see refmod.h). One file on purpose: a
 * tokenizer, a recursive-descent parser that builds a small tree, and a tree
 * walker over typed values carrying dual-number tangents. Written from
 * docs/mod-language.md; nothing here may include a header of core/mod/.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "refmod.h"

/* ---- values ---- */

enum { T_BOOL, T_INT, T_FLOAT, T_BUF };

typedef struct partial {
    int buf;
    int64_t el;
    double d;
} partial;

/* A typed value; floats carry their tangent (d/d score and the sparse
 * partials with respect to buffer elements). A T_BUF is a buffer indexed by
 * nidx of its indices so far (`let iv = intervals[img]`). */
typedef struct rval {
    int type;
    int32_t i;
    double f;
    double ds;
    int np;
    partial p[REFMOD_MAX_PARTIALS];
    int buf, nidx;
    int32_t idx[4];
} rval;

/* ---- tree ---- */

enum {
    K_INT,
    K_FLOAT,
    K_BOOL,
    K_VAR, /* op: 0 score, 1 b, 2 h, 3 q, 4 kv */
    K_LET, /* op: let index */
    K_BUFFER, /* op: buffer index */
    K_INDEX,  /* a: base; args: indices */
    K_UNARY,  /* op: '-', '!', '~' */
    K_BINARY, /* op: one of the OP_ codes */
    K_COND,   /* a ? b : c */
    K_CALL    /* op: function index; args */
};

enum {
    OP_OROR = 256,
    OP_ANDAND,
    OP_EQ,
    OP_NE,
    OP_LE,
    OP_GE,
    OP_FLOORDIV,
};

typedef struct rnode {
    int kind, op;
    int32_t ival;
    double fval;
    int a, b, c;
    int nargs;
    int args[4];
} rnode;

enum {
    F_ABS,
    F_MIN,
    F_MAX,
    F_CLAMP,
    F_WHERE,
    F_EXP,
    F_EXP2,
    F_LOG,
    F_LOG2,
    F_SQRT,
    F_RSQRT,
    F_SIN,
    F_COS,
    F_TAN,
    F_TANH,
    F_SIGMOID,
    F_TANH_APPROX,
    F_POW,
    F_FLOOR,
    F_CEIL,
    F_FLOAT,
    F_INT,
    F_COUNT
};

static const struct {
    const char *name;
    int nargs;
} functions[F_COUNT] = {
    [F_ABS] = {"abs", 1},         [F_MIN] = {"min", 2},     [F_MAX] = {"max", 2},
    [F_CLAMP] = {"clamp", 3},     [F_WHERE] = {"where", 3}, [F_EXP] = {"exp", 1},
    [F_EXP2] = {"exp2", 1},       [F_LOG] = {"log", 1},     [F_LOG2] = {"log2", 1},
    [F_SQRT] = {"sqrt", 1},       [F_RSQRT] = {"rsqrt", 1}, [F_SIN] = {"sin", 1},
    [F_COS] = {"cos", 1},         [F_TAN] = {"tan", 1},     [F_TANH] = {"tanh", 1},
    [F_SIGMOID] = {"sigmoid", 1}, [F_TANH_APPROX] = {"tanh_approx", 1},
    [F_POW] = {"pow", 2},         [F_FLOOR] = {"floor", 1}, [F_CEIL] = {"ceil", 1},
    [F_FLOAT] = {"float", 1},     [F_INT] = {"int", 1},
};

typedef struct let_binding {
    char name[64];
    int node;
} let_binding;

typedef struct bound_buffer {
    char name[64];
    flex_dtype dtype;
    int ndim;
    const refmod_buffer *data; /* NULL until bound */
} bound_buffer;

struct refmod {
    int combine; /* 0, '&' or '|' */
    refmod *left, *right;
    flex_mod_kind kind;
    rnode *nodes;
    int num_nodes, cap_nodes, root;
    let_binding *lets;
    int num_lets;
    flex_param *params; /* names point into param_names */
    char (*param_names)[64];
    int num_params;
    bound_buffer *buffers;
    int num_buffers;
    /* evaluation state */
    rval *let_values;
    unsigned char *let_done;
    refmod_precision precision;
    int want_grad;
    double approx_rel; /* tanh_approx = tanh * (1 + approx_rel) */
    double score;
    int32_t point[4];
    char *err;
    size_t err_cap;
};

/* ---- errors ---- */

static int fail(refmod *m, const char *fmt, ...) {
    if (m->err && m->err_cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->err, m->err_cap, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ---- tokenizer ---- */

enum { TK_EOF, TK_INT, TK_FLOAT, TK_NAME, TK_OP };

typedef struct parser {
    refmod *m;
    const char *text;
    size_t pos;
    int tok;
    size_t start, len; /* the current token's bytes */
    int op;            /* TK_OP: a char or an OP_ code */
    char *err;
    size_t err_cap;
    int failed;
} parser;

static int perr(parser *p, const char *fmt, ...) {
    if (!p->failed && p->err_cap) {
        int line = 1, col = 1;
        for (size_t i = 0; i < p->start && p->text[i]; i++) {
            if (p->text[i] == '\n')
                line++, col = 1;
            else
                col++;
        }
        int n = snprintf(p->err, p->err_cap, "%d:%d: ", line, col);
        if (n >= 0 && (size_t)n < p->err_cap) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(p->err + n, p->err_cap - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    p->failed = 1;
    return -1;
}

static int is_name_char(char c, int first) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           (!first && c >= '0' && c <= '9');
}

static void next(parser *p) {
    const char *t = p->text;
    for (;;) {
        while (t[p->pos] == ' ' || t[p->pos] == '\t' || t[p->pos] == '\n' || t[p->pos] == '\r' ||
               t[p->pos] == '\f' || t[p->pos] == '\v')
            p->pos++;
        if (t[p->pos] != '#') break;
        while (t[p->pos] && t[p->pos] != '\n')
            p->pos++;
    }
    p->start = p->pos;
    char c = t[p->pos];
    if (!c) {
        p->tok = TK_EOF;
        p->len = 0;
        return;
    }
    if ((c >= '0' && c <= '9') || (c == '.' && t[p->pos + 1] >= '0' && t[p->pos + 1] <= '9')) {
        size_t i = p->pos;
        int is_float = 0;
        while (t[i] >= '0' && t[i] <= '9')
            i++;
        if (t[i] == '.') {
            is_float = 1;
            i++;
            while (t[i] >= '0' && t[i] <= '9')
                i++;
        }
        if (t[i] == 'e' || t[i] == 'E') {
            size_t j = i + 1;
            if (t[j] == '+' || t[j] == '-') j++;
            if (t[j] >= '0' && t[j] <= '9') {
                is_float = 1;
                i = j;
                while (t[i] >= '0' && t[i] <= '9')
                    i++;
            }
        }
        p->tok = is_float ? TK_FLOAT : TK_INT;
        p->len = i - p->pos;
        p->pos = i;
        return;
    }
    if (is_name_char(c, 1)) {
        size_t i = p->pos;
        while (is_name_char(t[i], 0))
            i++;
        p->tok = TK_NAME;
        p->len = i - p->pos;
        p->pos = i;
        return;
    }
    static const struct {
        const char *s;
        int op;
    } two[] = {{"||", OP_OROR}, {"&&", OP_ANDAND}, {"==", OP_EQ},
               {"!=", OP_NE},   {"<=", OP_LE},     {">=", OP_GE},
               {"//", OP_FLOORDIV}};
    for (size_t k = 0; k < sizeof two / sizeof two[0]; k++)
        if (t[p->pos] == two[k].s[0] && t[p->pos + 1] == two[k].s[1]) {
            p->tok = TK_OP;
            p->op = two[k].op;
            p->len = 2;
            p->pos += 2;
            return;
        }
    if (strchr("|&^<>+-*/%!~?:()[],;=", c)) {
        p->tok = TK_OP;
        p->op = c;
        p->len = 1;
        p->pos++;
        return;
    }
    p->tok = TK_OP;
    p->op = -1;
    p->len = 1;
    p->pos++;
}

static int is_op(const parser *p, int op) {
    return p->tok == TK_OP && p->op == op;
}

static int is_word(const parser *p, const char *w) {
    return p->tok == TK_NAME && strlen(w) == p->len && !strncmp(p->text + p->start, w, p->len);
}

static int expect(parser *p, int op, const char *what) {
    if (!is_op(p, op)) return perr(p, "expected %s", what);
    next(p);
    return 0;
}

/* ---- tree building ---- */

static int add_node(parser *p, rnode n) {
    refmod *m = p->m;
    if (m->num_nodes == m->cap_nodes) {
        int cap = m->cap_nodes ? 2 * m->cap_nodes : 64;
        rnode *v = realloc(m->nodes, (size_t)cap * sizeof *v);
        if (!v) return perr(p, "out of memory");
        m->nodes = v;
        m->cap_nodes = cap;
    }
    m->nodes[m->num_nodes] = n;
    return m->num_nodes++;
}

static int node2(parser *p, int kind, int op, int a, int b) {
    if (a < 0 || b < 0) return -1;
    rnode n = {kind, op, 0, 0.0, a, b, -1, 0, {0}};
    return add_node(p, n);
}

static int parse_cond(parser *p);

/* The value of the int literal at the current token, read digit by digit so
 * that any run of leading zeros is still a small number; it stops growing
 * once past 2147483648, which is all a caller needs to know. */
static double int_literal_value(const parser *p) {
    double v = 0.0;
    for (size_t i = 0; i < p->len && v <= 2147483648.0; i++)
        v = v * 10.0 + (p->text[p->start + i] - '0');
    return v;
}

static int parse_primary(parser *p) {
    if (p->failed) return -1;
    if (p->tok == TK_INT) {
        double v = int_literal_value(p);
        if (v > 2147483647.0)
            return perr(p, "int literal %.*s beyond 2147483647", (int)(p->len > 40 ? 40 : p->len),
                        p->text + p->start);
        next(p);
        rnode n = {K_INT, 0, (int32_t)v, 0.0, -1, -1, -1, 0, {0}};
        return add_node(p, n);
    }
    if (p->tok == TK_FLOAT) {
        char buf[160]; /* longer than any literal the library's lexer takes */
        if (p->len >= sizeof buf) return perr(p, "float literal too long");
        memcpy(buf, p->text + p->start, p->len);
        buf[p->len] = '\0';
        double v = strtod(buf, NULL);
        float f = (float)v;
        if (isinf(f)) return perr(p, "float literal %s too large for a 32-bit float", buf);
        next(p);
        rnode n = {K_FLOAT, 0, 0, (double)f, -1, -1, -1, 0, {0}};
        return add_node(p, n);
    }
    if (is_op(p, '(')) {
        next(p);
        int e = parse_cond(p);
        if (expect(p, ')', "')'") < 0) return -1;
        return e;
    }
    if (p->tok != TK_NAME) return perr(p, "expected an expression");
    char name[64];
    if (p->len >= sizeof name) return perr(p, "name too long");
    memcpy(name, p->text + p->start, p->len);
    name[p->len] = '\0';
    next(p);
    rnode n = {K_INT, 0, 0, 0.0, -1, -1, -1, 0, {0}};
    if (!strcmp(name, "inf")) {
        n.kind = K_FLOAT;
        n.fval = INFINITY;
        return add_node(p, n);
    }
    if (!strcmp(name, "true") || !strcmp(name, "false")) {
        n.kind = K_BOOL;
        n.ival = name[0] == 't';
        return add_node(p, n);
    }
    if (is_op(p, '(')) { /* a call */
        int f = -1;
        for (int k = 0; k < F_COUNT; k++)
            if (!strcmp(functions[k].name, name)) f = k;
        if (f < 0) return perr(p, "unknown function '%s'", name);
        next(p);
        n.kind = K_CALL;
        n.op = f;
        if (!is_op(p, ')'))
            for (;;) {
                if (n.nargs == 4) return perr(p, "too many arguments to %s", name);
                int a = parse_cond(p);
                if (a < 0) return -1;
                n.args[n.nargs++] = a;
                if (!is_op(p, ',')) break;
                next(p);
            }
        if (expect(p, ')', "')'") < 0) return -1;
        if (n.nargs != functions[f].nargs)
            return perr(p, "%s takes %d arguments, not %d", name, functions[f].nargs, n.nargs);
        return add_node(p, n);
    }
    refmod *m = p->m;
    for (int k = 0; k < m->num_lets; k++)
        if (!strcmp(m->lets[k].name, name)) {
            n.kind = K_LET;
            n.op = k;
            return add_node(p, n);
        }
    static const struct {
        const char *name;
        int var;
    } vars[] = {{"score", 0}, {"b", 1},     {"batch", 1}, {"h", 2},      {"head", 2},
                {"q", 3},     {"q_idx", 3}, {"kv", 4},    {"kv_idx", 4}};
    for (size_t k = 0; k < sizeof vars / sizeof vars[0]; k++)
        if (!strcmp(vars[k].name, name)) {
            if (vars[k].var == 0 && m->kind != FLEX_MOD_SCORE)
                return perr(p, "'score' is only in score mods");
            n.kind = K_VAR;
            n.op = vars[k].var;
            return add_node(p, n);
        }
    for (int k = 0; k < m->num_params; k++)
        if (!strcmp(m->param_names[k], name)) {
            if (m->params[k].is_float) {
                n.kind = K_FLOAT;
                n.fval = (double)(float)m->params[k].value;
            } else {
                n.kind = K_INT;
                n.ival = (int32_t)m->params[k].value;
            }
            return add_node(p, n);
        }
    for (int k = 0; k < m->num_buffers; k++)
        if (!strcmp(m->buffers[k].name, name)) {
            n.kind = K_BUFFER;
            n.op = k;
            return add_node(p, n);
        }
    return perr(p, "unknown name '%s'", name);
}

static int parse_postfix(parser *p) {
    int e = parse_primary(p);
    while (e >= 0 && is_op(p, '[')) {
        rnode n = {K_INDEX, 0, 0, 0.0, e, -1, -1, 0, {0}};
        next(p);
        for (;;) {
            if (n.nargs == 4) return perr(p, "more than 4 indices");
            int a = parse_cond(p);
            if (a < 0) return -1;
            n.args[n.nargs++] = a;
            if (!is_op(p, ',')) break;
            next(p);
        }
        if (expect(p, ']', "']'") < 0) return -1;
        e = add_node(p, n);
    }
    return e;
}

static int parse_unary(parser *p) {
    if (is_op(p, '-') || is_op(p, '!') || is_op(p, '~')) {
        int op = p->op;
        next(p);
        /* -2147483648 is the one int literal beyond 2147483647. */
        if (op == '-' && p->tok == TK_INT && int_literal_value(p) == 2147483648.0) {
            next(p);
            if (is_op(p, '[')) return perr(p, "cannot index a literal");
            rnode n = {K_INT, 0, INT32_MIN, 0.0, -1, -1, -1, 0, {0}};
            return add_node(p, n);
        }
        int a = parse_unary(p);
        if (a < 0) return -1;
        rnode n = {K_UNARY, op, 0, 0.0, a, -1, -1, 0, {0}};
        return add_node(p, n);
    }
    return parse_postfix(p);
}

static int parse_mul(parser *p) {
    int e = parse_unary(p);
    while (e >= 0 && (is_op(p, '*') || is_op(p, '/') || is_op(p, '%') || is_op(p, OP_FLOORDIV))) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_unary(p));
    }
    return e;
}

static int parse_add(parser *p) {
    int e = parse_mul(p);
    while (e >= 0 && (is_op(p, '+') || is_op(p, '-'))) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_mul(p));
    }
    return e;
}

static int is_rel(const parser *p) {
    return is_op(p, '<') || is_op(p, '>') || is_op(p, OP_LE) || is_op(p, OP_GE);
}

static int parse_rel(parser *p) {
    int e = parse_add(p);
    if (e >= 0 && is_rel(p)) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_add(p));
        if (e >= 0 && is_rel(p)) return perr(p, "comparisons do not chain");
    }
    return e;
}

static int parse_eq(parser *p) {
    int e = parse_rel(p);
    if (e >= 0 && (is_op(p, OP_EQ) || is_op(p, OP_NE))) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_rel(p));
        if (e >= 0 && (is_op(p, OP_EQ) || is_op(p, OP_NE)))
            return perr(p, "comparisons do not chain");
    }
    return e;
}

static int parse_xor(parser *p) {
    int e = parse_eq(p);
    while (e >= 0 && is_op(p, '^')) {
        next(p);
        e = node2(p, K_BINARY, '^', e, parse_eq(p));
    }
    return e;
}

static int parse_and(parser *p) {
    int e = parse_xor(p);
    while (e >= 0 && (is_op(p, '&') || is_op(p, OP_ANDAND))) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_xor(p));
    }
    return e;
}

static int parse_or(parser *p) {
    int e = parse_and(p);
    while (e >= 0 && (is_op(p, '|') || is_op(p, OP_OROR))) {
        int op = p->op;
        next(p);
        e = node2(p, K_BINARY, op, e, parse_and(p));
    }
    return e;
}

static int parse_cond(parser *p) {
    int c = parse_or(p);
    if (c < 0 || !is_op(p, '?')) return c;
    next(p);
    int a = parse_cond(p);
    if (a < 0 || expect(p, ':', "':'") < 0) return -1;
    int b = parse_cond(p);
    if (b < 0) return -1;
    rnode n = {K_COND, 0, 0, 0.0, c, a, b, 0, {0}};
    return add_node(p, n);
}

static int parse_program(parser *p) {
    refmod *m = p->m;
    while (is_word(p, "let")) {
        next(p);
        if (p->tok != TK_NAME || p->len >= 64) return perr(p, "expected a name after 'let'");
        let_binding lb;
        memcpy(lb.name, p->text + p->start, p->len);
        lb.name[p->len] = '\0';
        next(p);
        if (expect(p, '=', "'='") < 0) return -1;
        lb.node = parse_cond(p);
        if (lb.node < 0 || expect(p, ';', "';'") < 0) return -1;
        let_binding *v = realloc(m->lets, (size_t)(m->num_lets + 1) * sizeof *v);
        if (!v) return perr(p, "out of memory");
        m->lets = v;
        m->lets[m->num_lets++] = lb;
    }
    int root = parse_cond(p);
    if (root < 0) return -1;
    if (is_op(p, ';')) next(p);
    if (p->tok != TK_EOF) return perr(p, "unexpected text after the mod");
    return root;
}

int refmod_parse(const char *text, flex_mod_kind kind, const flex_param *params, int num_params,
                 const flex_buffer_decl *buffers, int num_buffers, refmod **out, char *err,
                 size_t err_cap) {
    *out = NULL;
    if (err_cap) err[0] = '\0';
    refmod *m = calloc(1, sizeof *m);
    if (!m) return snprintf(err, err_cap, "out of memory"), -1;
    m->kind = kind;
    if (num_params > 0) {
        m->params = calloc((size_t)num_params, sizeof *m->params);
        m->param_names = calloc((size_t)num_params, sizeof *m->param_names);
    }
    if (num_buffers > 0) m->buffers = calloc((size_t)num_buffers, sizeof *m->buffers);
    if ((num_params > 0 && (!m->params || !m->param_names)) || (num_buffers > 0 && !m->buffers)) {
        refmod_free(m);
        return snprintf(err, err_cap, "out of memory"), -1;
    }
    for (int i = 0; i < num_params; i++) {
        m->params[i] = params[i];
        snprintf(m->param_names[i], sizeof m->param_names[i], "%s", params[i].name);
    }
    m->num_params = num_params;
    for (int i = 0; i < num_buffers; i++) {
        snprintf(m->buffers[i].name, sizeof m->buffers[i].name, "%s", buffers[i].name);
        m->buffers[i].dtype = buffers[i].dtype;
        m->buffers[i].ndim = buffers[i].ndim;
    }
    m->num_buffers = num_buffers;
    parser p = {m, text, 0, TK_EOF, 0, 0, 0, err, err_cap, 0};
    next(&p);
    m->root = parse_program(&p);
    if (m->root >= 0 && m->num_lets > 0) {
        m->let_values = calloc((size_t)m->num_lets, sizeof *m->let_values);
        m->let_done = calloc((size_t)m->num_lets, 1);
        if (!m->let_values || !m->let_done) m->root = perr(&p, "out of memory");
    }
    if (m->root < 0) {
        refmod_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

refmod *refmod_combine(int op, refmod *a, refmod *b) {
    refmod *m = a && b ? calloc(1, sizeof *m) : NULL;
    if (!m) {
        refmod_free(a);
        refmod_free(b);
        return NULL;
    }
    m->combine = op;
    m->kind = FLEX_MOD_MASK;
    m->left = a;
    m->right = b;
    return m;
}

void refmod_free(refmod *m) {
    if (!m) return;
    refmod_free(m->left);
    refmod_free(m->right);
    free(m->nodes);
    free(m->lets);
    free(m->params);
    free(m->param_names);
    free(m->buffers);
    free(m->let_values);
    free(m->let_done);
    free(m);
}

int refmod_bind(refmod *m, const refmod_buffer *bufs, int num_bufs, char *err, size_t err_cap) {
    if (m->combine)
        return refmod_bind(m->left, bufs, num_bufs, err, err_cap) == 0 &&
                       refmod_bind(m->right, bufs, num_bufs, err, err_cap) == 0
                   ? 0
                   : -1;
    for (int i = 0; i < m->num_buffers; i++) {
        bound_buffer *bb = &m->buffers[i];
        bb->data = NULL;
        for (int k = 0; k < num_bufs; k++)
            if (!strcmp(bufs[k].name, bb->name)) bb->data = &bufs[k];
        if (!bb->data) continue; /* an evaluation that reads it fails */
        if (bb->data->dtype != bb->dtype || bb->data->ndim != bb->ndim)
            return snprintf(err, err_cap, "buffer '%s': data of another dtype or ndim", bb->name),
                   -1;
    }
    return 0;
}

/* ---- evaluation ---- */

static double round_f32(double x) {
    return (double)(float)x;
}

/* A float result of an operation in the evaluator's precision. */
static double fres(const refmod *m, double x) {
    return m->precision == REFMOD_F32 ? round_f32(x) : x;
}

static void set_int(rval *v, int type, int32_t i) {
    v->type = type;
    v->i = i;
    v->f = 0.0;
    v->ds = 0.0;
    v->np = 0;
}

static void set_float(rval *v, double f) {
    v->type = T_FLOAT;
    v->i = 0;
    v->f = f;
    v->ds = 0.0;
    v->np = 0;
}

/* d * c, where a zero derivative stays zero even next to an infinity (the
 * term does not depend on what is being differentiated). */
static double dterm(double d, double c) {
    return d == 0.0 ? 0.0 : d * c;
}

/* out's tangent = ca * a's tangent + cb * b's tangent (b may be NULL). */
static int tangent(refmod *m, rval *out, const rval *a, double ca, const rval *b, double cb) {
    if (!m->want_grad) return 0;
    partial merged[REFMOD_MAX_PARTIALS];
    int n = 0;
    double ds = dterm(a->ds, ca) + (b ? dterm(b->ds, cb) : 0.0);
    const rval *src[2] = {a, b};
    double coef[2] = {ca, cb};
    for (int s = 0; s < 2; s++) {
        if (!src[s] || src[s]->type != T_FLOAT) continue;
        for (int k = 0; k < src[s]->np; k++) {
            const partial *pp = &src[s]->p[k];
            double d = dterm(pp->d, coef[s]);
            int at = -1;
            for (int j = 0; j < n; j++)
                if (merged[j].buf == pp->buf && merged[j].el == pp->el) at = j;
            if (at >= 0) {
                merged[at].d += d;
                continue;
            }
            if (n == REFMOD_MAX_PARTIALS)
                return fail(m, "more than %d buffer elements in one derivative",
                            REFMOD_MAX_PARTIALS);
            merged[n++] = (partial){pp->buf, pp->el, d};
        }
    }
    out->ds = ds;
    out->np = n;
    memcpy(out->p, merged, (size_t)n * sizeof *merged);
    return 0;
}

/* bool -> int where a number is needed. */
static void as_number(rval *v) {
    if (v->type == T_BOOL) v->type = T_INT;
}

/* int or bool -> float: the 32-bit float nearest the int. */
static void as_float(rval *v) {
    if (v->type == T_FLOAT) return;
    set_float(v, round_f32((double)v->i));
}

static int32_t wrap(int64_t x) {
    return (int32_t)(uint32_t)(uint64_t)x;
}

static int32_t int_floordiv(int32_t a, int32_t b) {
    if (b == 0) return 0;
    if (a == INT32_MIN && b == -1) return INT32_MIN;
    int32_t q = a / b;
    if (a % b != 0 && ((a < 0) != (b < 0))) q--;
    return q;
}

static int32_t int_remainder(int32_t a, int32_t b) {
    if (b == 0 || b == -1) return 0;
    int32_t r = a % b;
    if (r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
}

static double float_remainder(double a, double b) {
    double r = fmod(a, b);
    if (r != 0.0 && ((r < 0.0) != (b < 0.0))) r += b;
    return r;
}

static double load_element(const refmod_buffer *d, int64_t off) {
    const unsigned char *base = d->data;
    switch (d->dtype) {
    case FLEX_F32: {
        float f;
        memcpy(&f, base + off * 4, 4);
        return f;
    }
    case FLEX_BF16: {
        uint16_t h;
        memcpy(&h, base + off * 2, 2);
        uint32_t bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    case FLEX_F16: {
        uint16_t h;
        memcpy(&h, base + off * 2, 2);
        int sign = h >> 15, e = (h >> 10) & 31, frac = h & 1023;
        double v = e == 0    ? ldexp(frac, -24)
                   : e == 31 ? (frac ? NAN : INFINITY)
                             : ldexp(1024 + frac, e - 25);
        return sign ? -v : v;
    }
    case FLEX_I32: {
        int32_t i;
        memcpy(&i, base + off * 4, 4);
        return i;
    }
    case FLEX_I64: {
        int64_t i;
        memcpy(&i, base + off * 8, 8);
        return (int32_t)(uint32_t)(uint64_t)i;
    }
    case FLEX_U8:
        return base[off];
    case FLEX_BOOL:
        return base[off] != 0;
    default:
        return NAN;
    }
}

static int eval(refmod *m, int node, rval *out);

/* Reads the element a fully indexed buffer value names. */
static int read_buffer(refmod *m, const rval *ref, rval *out) {
    const bound_buffer *bb = &m->buffers[ref->buf];
    const refmod_buffer *d = bb->data;
    if (!d) return fail(m, "buffer '%s' is not bound", bb->name);
    int64_t off = 0, flat = 0;
    for (int k = 0; k < bb->ndim; k++) {
        int64_t i = ref->idx[k];
        if (i < 0 || i >= d->sizes[k])
            return fail(m,
                        "buffer '%s' read out of range: index %lld of dim %d (size %lld) at "
                        "(b, h, q, kv) = (%d, %d, %d, %d)",
                        bb->name, (long long)i, k, (long long)d->sizes[k], m->point[0],
                        m->point[1], m->point[2], m->point[3]);
        off += i * d->strides[k];
        flat = flat * d->sizes[k] + i;
    }
    double v = load_element(d, off);
    switch (bb->dtype) {
    case FLEX_F32:
    case FLEX_F16:
    case FLEX_BF16:
        set_float(out, v);
        if (m->want_grad) {
            out->np = 1;
            out->p[0] = (partial){ref->buf, flat, 1.0};
        }
        return 0;
    case FLEX_BOOL:
        set_int(out, T_BOOL, (int32_t)v);
        return 0;
    default:
        set_int(out, T_INT, (int32_t)v);
        return 0;
    }
}

static int eval_index(refmod *m, const rnode *n, rval *out) {
    rval base;
    if (eval(m, n->a, &base) < 0) return -1;
    if (base.type != T_BUF) return fail(m, "only a buffer can be indexed");
    int ndim = m->buffers[base.buf].ndim;
    for (int k = 0; k < n->nargs; k++) {
        rval i;
        if (eval(m, n->args[k], &i) < 0) return -1;
        if (i.type == T_FLOAT || i.type == T_BUF)
            return fail(m, "index of buffer '%s' is not an int", m->buffers[base.buf].name);
        if (base.nidx == ndim)
            return fail(m, "buffer '%s' has %d dims", m->buffers[base.buf].name, ndim);
        base.idx[base.nidx++] = i.i;
    }
    if (base.nidx < ndim) {
        *out = base;
        return 0;
    }
    return read_buffer(m, &base, out);
}

static int check_value(refmod *m, const rval *v) {
    if (v->type == T_BUF)
        return fail(m, "buffer '%s' used with %d of its %d indices", m->buffers[v->buf].name,
                    v->nidx, m->buffers[v->buf].ndim);
    return 0;
}

static int eval_unary(refmod *m, const rnode *n, rval *out) {
    rval a;
    if (eval(m, n->a, &a) < 0 || check_value(m, &a) < 0) return -1;
    switch (n->op) {
    case '-':
        if (a.type == T_BOOL) return fail(m, "unary '-' on a bool");
        if (a.type == T_INT) return set_int(out, T_INT, wrap(-(int64_t)a.i)), 0;
        set_float(out, -a.f);
        return tangent(m, out, &a, -1.0, NULL, 0.0);
    case '!':
        if (a.type != T_BOOL) return fail(m, "'!' needs a bool");
        return set_int(out, T_BOOL, !a.i), 0;
    default: /* '~' */
        if (a.type == T_BOOL) return set_int(out, T_BOOL, !a.i), 0;
        if (a.type == T_INT) return set_int(out, T_INT, ~a.i), 0;
        return fail(m, "'~' on a float");
    }
}

static int compare(int op, double a, double b) {
    switch (op) {
    case '<':
        return a < b;
    case '>':
        return a > b;
    case OP_LE:
        return a <= b;
    case OP_GE:
        return a >= b;
    case OP_EQ:
        return a == b;
    default:
        return a != b;
    }
}

static int arith_float(refmod *m, int op, rval *a, rval *b, rval *out) {
    as_float(a);
    as_float(b);
    double x = a->f, y = b->f;
    switch (op) {
    case '+':
        set_float(out, fres(m, x + y));
        return tangent(m, out, a, 1.0, b, 1.0);
    case '-':
        set_float(out, fres(m, x - y));
        return tangent(m, out, a, 1.0, b, -1.0);
    case '*':
        set_float(out, fres(m, x * y));
        return tangent(m, out, a, y, b, x);
    case '/':
        set_float(out, fres(m, x / y));
        return tangent(m, out, a, 1.0 / y, b, -x / (y * y));
    case OP_FLOORDIV:
        set_float(out, fres(m, floor(fres(m, x / y))));
        return 0;
    default: /* '%': d/da 1, d/db -floor(a / b) */
        set_float(out, fres(m, float_remainder(x, y)));
        return tangent(m, out, a, 1.0, b, -floor(x / y));
    }
}

static int eval_binary(refmod *m, const rnode *n, rval *out) {
    rval a, b;
    if (eval(m, n->a, &a) < 0 || check_value(m, &a) < 0) return -1;
    if (eval(m, n->b, &b) < 0 || check_value(m, &b) < 0) return -1;
    int op = n->op;
    switch (op) {
    case OP_ANDAND:
    case OP_OROR:
        if (a.type != T_BOOL || b.type != T_BOOL)
            return fail(m, "'%s' needs bool operands", op == OP_ANDAND ? "&&" : "||");
        return set_int(out, T_BOOL, op == OP_ANDAND ? (a.i && b.i) : (a.i || b.i)), 0;
    case '&':
    case '|':
    case '^':
        if (a.type == T_FLOAT || b.type == T_FLOAT) return fail(m, "'%c' on a float", op);
        if (a.type == T_BOOL && b.type == T_BOOL) {
            int r = op == '&' ? (a.i && b.i) : op == '|' ? (a.i || b.i) : (a.i != b.i);
            return set_int(out, T_BOOL, r), 0;
        }
        return set_int(out, T_INT, op == '&' ? (a.i & b.i) : op == '|' ? (a.i | b.i) : (a.i ^ b.i)),
               0;
    case '<':
    case '>':
    case OP_LE:
    case OP_GE:
    case OP_EQ:
    case OP_NE:
        if (a.type == T_FLOAT || b.type == T_FLOAT) {
            as_float(&a);
            as_float(&b);
            return set_int(out, T_BOOL, compare(op, a.f, b.f)), 0;
        }
        return set_int(out, T_BOOL, compare(op, a.i, b.i)), 0;
    default:
        break;
    }
    as_number(&a);
    as_number(&b);
    if (a.type == T_FLOAT || b.type == T_FLOAT) return arith_float(m, op, &a, &b, out);
    int64_t x = a.i, y = b.i;
    switch (op) {
    case '+':
        return set_int(out, T_INT, wrap(x + y)), 0;
    case '-':
        return set_int(out, T_INT, wrap(x - y)), 0;
    case '*':
        return set_int(out, T_INT, wrap((int64_t)((uint64_t)x * (uint64_t)y))), 0;
    case '/':
    case OP_FLOORDIV:
        return set_int(out, T_INT, int_floordiv(a.i, b.i)), 0;
    default:
        return set_int(out, T_INT, int_remainder(a.i, b.i)), 0;
    }
}

/* Brings a and b to their common type (bool < int < float); bools stay
 * bools only when both are, unless numeric forces ints. */
static void common_type(rval *a, rval *b, int numeric) {
    if (a->type == T_FLOAT || b->type == T_FLOAT) {
        as_float(a);
        as_float(b);
    } else if (numeric || a->type != b->type) {
        as_number(a);
        as_number(b);
    }
}

static int select_value(refmod *m, const rval *c, rval *a, rval *b, rval *out) {
    if (c->type != T_BOOL) return fail(m, "a condition must be a bool");
    common_type(a, b, 0);
    *out = c->i ? *a : *b;
    return 0;
}

/* min or max with PyTorch's rules: NaN propagates, a tie splits the
 * gradient evenly. */
static int min_max(refmod *m, int is_max, rval *a, rval *b, rval *out) {
    common_type(a, b, 1);
    if (a->type == T_INT) {
        int32_t r = is_max ? (a->i > b->i ? a->i : b->i) : (a->i < b->i ? a->i : b->i);
        return set_int(out, T_INT, r), 0;
    }
    double x = a->f, y = b->f;
    if (isnan(x) || isnan(y)) {
        set_float(out, NAN);
        return tangent(m, out, a, isnan(x) ? 1.0 : 0.0, b, isnan(x) ? 0.0 : 1.0);
    }
    if (x == y) { /* of two zeros, -0 is the smaller (docs/mod-language.md) */
        set_float(out, (signbit(x) != 0) == is_max ? y : x);
        return tangent(m, out, a, 0.5, b, 0.5);
    }
    int take_a = is_max ? x > y : x < y;
    set_float(out, take_a ? x : y);
    return tangent(m, out, a, take_a ? 1.0 : 0.0, b, take_a ? 0.0 : 1.0);
}

static double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static int eval_call(refmod *m, const rnode *n, rval *out) {
    rval v[4];
    for (int k = 0; k < n->nargs; k++)
        if (eval(m, n->args[k], &v[k]) < 0 || check_value(m, &v[k]) < 0) return -1;
    rval *a = &v[0];
    switch (n->op) {
    case F_WHERE:
        return select_value(m, &v[0], &v[1], &v[2], out);
    case F_MIN:
    case F_MAX:
        return min_max(m, n->op == F_MAX, &v[0], &v[1], out);
    case F_CLAMP: {
        rval lo;
        /* min(max(x, lo), hi), in the common type of all three */
        if (v[0].type == T_FLOAT || v[1].type == T_FLOAT || v[2].type == T_FLOAT)
            as_float(&v[0]), as_float(&v[1]), as_float(&v[2]);
        if (min_max(m, 1, &v[0], &v[1], &lo) < 0) return -1;
        return min_max(m, 0, &lo, &v[2], out);
    }
    case F_ABS:
        as_number(a);
        if (a->type == T_INT) return set_int(out, T_INT, a->i < 0 ? wrap(-(int64_t)a->i) : a->i), 0;
        set_float(out, fabs(a->f));
        return tangent(m, out, a, a->f > 0.0 ? 1.0 : a->f < 0.0 ? -1.0 : 0.0, NULL, 0.0);
    case F_FLOOR:
    case F_CEIL:
        as_number(a);
        if (a->type == T_INT) return *out = *a, 0;
        set_float(out, n->op == F_FLOOR ? floor(a->f) : ceil(a->f));
        return 0;
    case F_FLOAT:
        as_float(a);
        *out = *a;
        return 0;
    case F_INT: {
        if (a->type != T_FLOAT) return set_int(out, T_INT, a->i), 0;
        double x = a->f;
        int32_t r = isnan(x)                 ? 0
                    : x >= 2147483647.0      ? INT32_MAX
                    : x <= -2147483648.0     ? INT32_MIN
                                             : (int32_t)x;
        return set_int(out, T_INT, r), 0;
    }
    case F_POW: {
        as_float(&v[0]);
        as_float(&v[1]);
        double x = v[0].f, y = v[1].f, r = pow(x, y);
        set_float(out, fres(m, r));
        double dx = y == 0.0 ? 0.0 : y * pow(x, y - 1.0);
        double dy = v[1].ds == 0.0 && v[1].np == 0 ? 0.0 : r * log(x);
        return tangent(m, out, &v[0], dx, &v[1], dy);
    }
    default:
        break;
    }
    as_float(a);
    double x = a->f, r, d;
    switch (n->op) {
    case F_EXP:
        r = exp(x), d = r;
        break;
    case F_EXP2:
        r = exp2(x), d = r * log(2.0);
        break;
    case F_LOG:
        r = log(x), d = 1.0 / x;
        break;
    case F_LOG2:
        r = log2(x), d = 1.0 / (x * log(2.0));
        break;
    case F_SQRT:
        r = sqrt(x), d = 0.5 / r;
        break;
    case F_RSQRT:
        r = 1.0 / sqrt(x), d = -0.5 * r / x;
        break;
    case F_SIN:
        r = sin(x), d = cos(x);
        break;
    case F_COS:
        r = cos(x), d = -sin(x);
        break;
    case F_TAN:
        r = tan(x), d = 1.0 + r * r;
        break;
    case F_SIGMOID:
        r = sigmoid(x), d = r * (1.0 - r);
        break;
    case F_TANH_APPROX: /* the exact tanh, unless asked for the error's extreme */
        r = tanh(x) * (1.0 + m->approx_rel), d = 1.0 - r * r;
        break;
    default:
        r = tanh(x), d = 1.0 - r * r;
        break;
    }
    set_float(out, fres(m, r));
    return tangent(m, out, a, d, NULL, 0.0);
}

static int eval(refmod *m, int node, rval *out) {
    const rnode *n = &m->nodes[node];
    switch (n->kind) {
    case K_INT:
        return set_int(out, T_INT, n->ival), 0;
    case K_BOOL:
        return set_int(out, T_BOOL, n->ival), 0;
    case K_FLOAT:
        return set_float(out, n->fval), 0;
    case K_VAR:
        if (n->op == 0) {
            set_float(out, m->score);
            out->ds = 1.0;
            return 0;
        }
        return set_int(out, T_INT, m->point[n->op - 1]), 0;
    case K_LET:
        /* Lets are names, not copies: evaluated once, where first used. */
        if (!m->let_done[n->op]) {
            if (eval(m, m->lets[n->op].node, &m->let_values[n->op]) < 0) return -1;
            m->let_done[n->op] = 1;
        }
        *out = m->let_values[n->op];
        return 0;
    case K_BUFFER:
        memset(out, 0, sizeof *out);
        out->type = T_BUF;
        out->buf = n->op;
        if (m->buffers[n->op].ndim == 0) return read_buffer(m, out, out);
        return 0;
    case K_INDEX:
        return eval_index(m, n, out);
    case K_UNARY:
        return eval_unary(m, n, out);
    case K_BINARY:
        return eval_binary(m, n, out);
    case K_COND: {
        rval c, a, b; /* both branches, as torch.where */
        if (eval(m, n->a, &c) < 0 || eval(m, n->b, &a) < 0 || eval(m, n->c, &b) < 0) return -1;
        if (check_value(m, &a) < 0 || check_value(m, &b) < 0) return -1;
        return select_value(m, &c, &a, &b, out);
    }
    default:
        return eval_call(m, n, out);
    }
}

static int eval_top(refmod *m, refmod_precision precision, int want_grad, double score,
                    const int32_t *point, rval *out, char *err, size_t err_cap) {
    if (m->combine) {
        rval a, b;
        if (eval_top(m->left, precision, 0, 0.0, point, &a, err, err_cap) < 0 ||
            eval_top(m->right, precision, 0, 0.0, point, &b, err, err_cap) < 0)
            return -1;
        set_int(out, T_BOOL, m->combine == '&' ? (a.i && b.i) : (a.i || b.i));
        return 0;
    }
    m->precision = precision;
    m->want_grad = want_grad;
    m->score = precision == REFMOD_F32 ? round_f32(score) : score;
    memcpy(m->point, point, sizeof m->point);
    m->err = err;
    m->err_cap = err_cap;
    if (m->num_lets) memset(m->let_done, 0, (size_t)m->num_lets);
    if (eval(m, m->root, out) < 0 || check_value(m, out) < 0) return -1;
    if (m->kind == FLEX_MOD_MASK && out->type != T_BOOL)
        return fail(m, "a mask mod must return a bool");
    if (m->kind == FLEX_MOD_SCORE) {
        if (out->type == T_BOOL) return fail(m, "a score mod must not return a bool");
        as_float(out);
    }
    return 0;
}

int refmod_eval(refmod *m, refmod_precision precision, int want_grad, double score, int32_t b,
                int32_t h, int32_t q, int32_t kv, refmod_result *res, char *err, size_t err_cap) {
    int32_t point[4] = {b, h, q, kv};
    rval out;
    if (eval_top(m, precision, want_grad, score, point, &out, err, err_cap) < 0) return -1;
    res->value = out.type == T_FLOAT ? out.f : (double)out.i;
    res->dscore = out.type == T_FLOAT ? out.ds : 0.0;
    res->num_partials = 0;
    if (want_grad && out.type == T_FLOAT)
        for (int k = 0; k < out.np; k++)
            res->partials[res->num_partials++] =
                (refmod_partial){m->buffers[out.p[k].buf].name, out.p[k].el, out.p[k].d};
    return 0;
}

int refmod_uses_approx(const refmod *m) {
    if (m->combine) return refmod_uses_approx(m->left) || refmod_uses_approx(m->right);
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].kind == K_CALL && m->nodes[i].op == F_TANH_APPROX) return 1;
    return 0;
}

void refmod_set_approx_error(refmod *m, double rel) {
    if (m->combine) {
        refmod_set_approx_error(m->left, rel);
        refmod_set_approx_error(m->right, rel);
    }
    m->approx_rel = rel;
}
