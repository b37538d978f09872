/*
 * The mod language's parser and type checker: tokens -> typed IR, built
 * directly through ir_add (so shared subexpressions are one node), then
 * folded and compacted. Every error points at the token it is about.
 */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/lexer.h"
#include "mod/parse.h"

#define MAX_NAME  64
#define MAX_DEPTH 200

/* A parsed expression: a scalar node, a buffer indexed with fewer indices
 * than its dims (a "view", usable only by indexing it further), or the name
 * of a function waiting for its call. */
typedef struct value {
    int node; /* scalar: IR node; -1 otherwise */
    ir_type type;
    int buffer; /* view: buffer index; -1 otherwise */
    int nidx;
    int32_t idx[4];
    int func;     /* uncalled function: index into functions[]; -1 otherwise */
    int tok, end; /* first and last token, for carets */
} value;

typedef struct binding {
    char name[MAX_NAME];
    value v;
    int tok;
} binding;

typedef struct parser {
    const flex_mod_desc *desc;
    const char *text;
    const mod_token *toks;
    int ntoks, pos;
    ir_mod *m;
    binding *lets;
    int nlets, cap_lets;
    char *err;
    size_t err_cap;
    flex_status status;
    int depth;
} parser;

/* ---- names ---- */

static const struct {
    const char *name;
    ir_op op;
} variables[] = {
    {"score", IR_SCORE}, {"b", IR_B},    {"h", IR_H},     {"q", IR_Q},       {"kv", IR_KV},
    {"batch", IR_B},     {"head", IR_H}, {"q_idx", IR_Q}, {"kv_idx", IR_KV},
};
#define NUM_VARIABLES ((int)(sizeof variables / sizeof variables[0]))

static const char *const keywords[] = {"let", "true", "false", "inf"};
#define NUM_KEYWORDS ((int)(sizeof keywords / sizeof keywords[0]))

typedef enum func_kind {
    FN_ABS,
    FN_MINMAX,
    FN_CLAMP,
    FN_WHERE,
    FN_FLOAT_UNARY, /* transcendental: float -> float */
    FN_POW,
    FN_ROUND, /* floor / ceil */
    FN_TO_FLOAT,
    FN_TO_INT
} func_kind;

static const struct {
    const char *name;
    func_kind kind;
    ir_op op;
    int nargs;
    const char *signature;
} functions[] = {
    {"abs", FN_ABS, IR_ABS, 1, "abs(x)"},
    {"min", FN_MINMAX, IR_MIN, 2, "min(a, b)"},
    {"max", FN_MINMAX, IR_MAX, 2, "max(a, b)"},
    {"clamp", FN_CLAMP, IR_MIN, 3, "clamp(x, lo, hi)"},
    {"where", FN_WHERE, IR_SELECT, 3, "where(cond, a, b)"},
    {"exp", FN_FLOAT_UNARY, IR_EXP, 1, "exp(x)"},
    {"exp2", FN_FLOAT_UNARY, IR_EXP2, 1, "exp2(x)"},
    {"log", FN_FLOAT_UNARY, IR_LOG, 1, "log(x)"},
    {"log2", FN_FLOAT_UNARY, IR_LOG2, 1, "log2(x)"},
    {"sqrt", FN_FLOAT_UNARY, IR_SQRT, 1, "sqrt(x)"},
    {"rsqrt", FN_FLOAT_UNARY, IR_RSQRT, 1, "rsqrt(x)"},
    {"pow", FN_POW, IR_POW, 2, "pow(x, y)"},
    {"sin", FN_FLOAT_UNARY, IR_SIN, 1, "sin(x)"},
    {"cos", FN_FLOAT_UNARY, IR_COS, 1, "cos(x)"},
    {"tan", FN_FLOAT_UNARY, IR_TAN, 1, "tan(x)"},
    {"tanh", FN_FLOAT_UNARY, IR_TANH, 1, "tanh(x)"},
    {"tanh_approx", FN_FLOAT_UNARY, IR_TANH_APPROX, 1, "tanh_approx(x)"},
    {"sigmoid", FN_FLOAT_UNARY, IR_SIGMOID, 1, "sigmoid(x)"},
    {"floor", FN_ROUND, IR_FLOOR, 1, "floor(x)"},
    {"ceil", FN_ROUND, IR_CEIL, 1, "ceil(x)"},
    {"float", FN_TO_FLOAT, IR_TO_FLOAT, 1, "float(x)"},
    {"int", FN_TO_INT, IR_TO_INT, 1, "int(x)"},
};
#define NUM_FUNCTIONS ((int)(sizeof functions / sizeof functions[0]))

static const char *type_name(ir_type t) {
    switch (t) {
    case IR_BOOL:
        return "bool";
    case IR_INT:
        return "int";
    case IR_FLOAT:
        return "float";
    }
    return "?";
}

static int find_variable(const char *name, size_t len) {
    for (int i = 0; i < NUM_VARIABLES; i++)
        if (strlen(variables[i].name) == len && strncmp(variables[i].name, name, len) == 0)
            return i;
    return -1;
}

static int find_function(const char *name, size_t len) {
    for (int i = 0; i < NUM_FUNCTIONS; i++)
        if (strlen(functions[i].name) == len && strncmp(functions[i].name, name, len) == 0)
            return i;
    return -1;
}

static int is_keyword(const char *name, size_t len) {
    for (int i = 0; i < NUM_KEYWORDS; i++)
        if (strlen(keywords[i]) == len && strncmp(keywords[i], name, len) == 0) return 1;
    return 0;
}

static int find_param(const flex_mod_desc *d, const char *name, size_t len) {
    for (int i = 0; i < d->num_params; i++)
        if (strlen(d->params[i].name) == len && strncmp(d->params[i].name, name, len) == 0)
            return i;
    return -1;
}

static int find_buffer(const ir_mod *m, const char *name, size_t len) {
    for (int i = 0; i < m->num_buffers; i++)
        if (strlen(m->buffers[i].name) == len && strncmp(m->buffers[i].name, name, len) == 0)
            return i;
    return -1;
}

static int find_let(const parser *p, const char *name, size_t len) {
    for (int i = 0; i < p->nlets; i++)
        if (strlen(p->lets[i].name) == len && strncmp(p->lets[i].name, name, len) == 0) return i;
    return -1;
}

/* Edit distance with adjacent transpositions (optimal string alignment). */
static int edit_distance(const char *a, size_t la, const char *b, size_t lb) {
    if (la > 63 || lb > 63) return 1000;
    int d[64][64];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int cost = a[i - 1] == b[j - 1] ? 0 : 1;
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

static void consider(const char *cand, const char *name, size_t len, const char **best,
                     int *best_d) {
    int d = edit_distance(name, len, cand, strlen(cand));
    if (d > 0 && strlen(cand) == len) {
        /* A difference of case only is the closest of all. */
        size_t i = 0;
        while (i < len && tolower((unsigned char)cand[i]) == tolower((unsigned char)name[i]))
            i++;
        if (i == len) d = 0;
    }
    if (d < *best_d) {
        *best_d = d;
        *best = cand;
    }
}

/* The closest name in scope to name, or NULL when nothing is close. */
static const char *suggest(const parser *p, const char *name, size_t len) {
    const char *best = NULL;
    int best_d = 1000;
    for (int i = 0; i < p->nlets; i++)
        consider(p->lets[i].name, name, len, &best, &best_d);
    for (int i = 0; i < p->desc->num_params; i++)
        consider(p->desc->params[i].name, name, len, &best, &best_d);
    for (int i = 0; i < p->m->num_buffers; i++)
        consider(p->m->buffers[i].name, name, len, &best, &best_d);
    for (int i = 0; i < NUM_VARIABLES; i++) {
        if (variables[i].op == IR_SCORE && p->m->kind != FLEX_MOD_SCORE) continue;
        consider(variables[i].name, name, len, &best, &best_d);
    }
    for (int i = 0; i < NUM_FUNCTIONS; i++)
        consider(functions[i].name, name, len, &best, &best_d);
    consider("true", name, len, &best, &best_d);
    consider("false", name, len, &best, &best_d);
    consider("inf", name, len, &best, &best_d);
    /* Close enough to be a typo: at most 2 edits, fewer than the name's length. */
    int limit = len <= 3 ? 1 : 2;
    if (best && (best_d == 0 || (best_d <= limit && (size_t)best_d < len))) return best;
    return NULL;
}

/* ---- errors ---- */

static void error_at(char *err, size_t cap, const char *text, size_t start, size_t end,
                     const char *message) {
    if (!err || cap == 0) return;
    size_t line_start = start;
    while (line_start > 0 && text[line_start - 1] != '\n')
        line_start--;
    size_t line_end = start;
    while (text[line_end] && text[line_end] != '\n')
        line_end++;
    int line = 1;
    for (size_t i = 0; i < line_start; i++)
        if (text[i] == '\n') line++;
    int col = (int)(start - line_start) + 1;
    if (end > line_end) end = line_end;
    if (end <= start) end = start + 1;
    size_t line_len = line_end - line_start;
    if (line_len > 0 && text[line_end - 1] == '\r') line_len--;
    /* A long line is quoted as a window around the error, so the message
     * always fits and keeps its caret line. The window starts on a UTF-8
     * character boundary. */
    enum { QUOTE_MAX = 160, QUOTE_BEFORE = 60 };
    size_t quote_start = line_start, quote_len = line_len;
    if (line_len > QUOTE_MAX) {
        size_t line_stop = line_start + line_len;
        quote_start = start > line_start + QUOTE_BEFORE ? start - QUOTE_BEFORE : line_start;
        if (quote_start + QUOTE_MAX > line_stop) quote_start = line_stop - QUOTE_MAX;
        while (quote_start > line_start && ((unsigned char)text[quote_start] & 0xC0) == 0x80)
            quote_start--;
        quote_len = line_stop - quote_start;
        if (quote_len > QUOTE_MAX + 4) quote_len = QUOTE_MAX + 4;
    }
    if (end > quote_start + quote_len) end = quote_start + quote_len;
    if (end <= start) end = start + 1;
    /* The caret line copies tabs so the caret lines up under any indentation. */
    char caret[QUOTE_MAX + 16];
    size_t n = 0;
    for (size_t i = quote_start; i < start; i++)
        caret[n++] = text[i] == '\t' ? '\t' : ' ';
    caret[n++] = '^';
    for (size_t i = start + 1; i < end; i++)
        caret[n++] = '~';
    caret[n] = '\0';
    snprintf(err, cap, "%d:%d: error: %s\n%.*s\n%s", line, col, message, (int)quote_len,
             text + quote_start, caret);
}

/* Records the first error (status, message pointing at tokens tok..end).
 * Returns -1 so callers can `return fail(...)`. */
static int fail_range(parser *p, flex_status status, int tok, int end, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

static int fail_range(parser *p, flex_status status, int tok, int end, const char *fmt, ...) {
    if (p->status != FLEX_OK) return -1;
    p->status = status;
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    const mod_token *a = &p->toks[tok];
    const mod_token *b = &p->toks[end < tok ? tok : end];
    size_t start = a->offset;
    size_t stop = b->offset + b->length;
    if (b->line != a->line) stop = a->offset + a->length;
    error_at(p->err, p->err_cap, p->text, start, stop, message);
    return -1;
}

#define fail(p, status, tok, ...) fail_range(p, status, tok, tok, __VA_ARGS__)

static int fail_ir(parser *p, int tok) {
    if (p->m->num_nodes >= IR_MAX_NODES)
        return fail(p, FLEX_ERR_INVALID_ARGUMENT, tok,
                    "the mod is too large (more than %d IR nodes)", IR_MAX_NODES);
    return fail(p, FLEX_ERR_OUT_OF_MEMORY, tok, "out of memory while compiling the mod");
}

/* How a token reads in a message: its text, or "end of input". */
static void token_text(const parser *p, int tok, char *buf, size_t cap) {
    const mod_token *t = &p->toks[tok];
    if (t->kind == TOK_EOF) {
        snprintf(buf, cap, "end of input");
        return;
    }
    size_t len = t->length > 40 ? 40 : t->length;
    snprintf(buf, cap, "'%.*s'", (int)len, p->text + t->offset);
}

static int fail_expected(parser *p, const char *what) {
    char found[64];
    token_text(p, p->pos, found, sizeof found);
    return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos, "expected %s, found %s", what, found);
}

/* ---- tokens ---- */

static const mod_token *peek(const parser *p) {
    return &p->toks[p->pos];
}

static int accept(parser *p, mod_token_kind kind) {
    if (p->toks[p->pos].kind != kind) return 0;
    if (p->toks[p->pos].kind != TOK_EOF) p->pos++;
    return 1;
}

static int ident_is(const parser *p, int tok, const char *word) {
    const mod_token *t = &p->toks[tok];
    return t->kind == TOK_IDENT && t->length == strlen(word) &&
           strncmp(p->text + t->offset, word, t->length) == 0;
}

/* ---- values and conversions ---- */

static value scalar(int node, ir_type type, int tok, int end) {
    value v;
    memset(&v, 0, sizeof v);
    v.node = node;
    v.type = type;
    v.buffer = -1;
    v.func = -1;
    v.tok = tok;
    v.end = end;
    return v;
}

static int need_scalar(parser *p, const value *v) {
    if (v->func >= 0)
        return fail_range(p, FLEX_ERR_MOD_TYPE, v->tok, v->end, "function '%s' must be called: %s",
                          functions[v->func].name, functions[v->func].signature);
    if (v->buffer >= 0) {
        const ir_buffer *buf = &p->m->buffers[v->buffer];
        if (v->nidx == 0)
            return fail_range(p, FLEX_ERR_MOD_TYPE, v->tok, v->end,
                              "buffer '%s' has %d dimension%s and must be indexed, e.g. %s[q]%s",
                              buf->name, buf->ndim, buf->ndim == 1 ? "" : "s", buf->name,
                              buf->ndim > 1 ? "[...]" : "");
        return fail_range(p, FLEX_ERR_MOD_TYPE, v->tok, v->end,
                          "buffer '%s' has %d dimensions but is indexed with %d index%s here; "
                          "give all %d indices",
                          buf->name, buf->ndim, v->nidx, v->nidx == 1 ? "" : "es", buf->ndim);
    }
    return 0;
}

/* Converts node (of type from) to type to; promotions only go up. */
static int convert(parser *p, int node, ir_type from, ir_type to, int tok) {
    if (from == to) return node;
    int r = -1;
    if (to == IR_INT)
        r = ir_unary(p->m, IR_TO_INT, IR_INT, node);
    else if (to == IR_FLOAT)
        r = ir_unary(p->m, IR_TO_FLOAT, IR_FLOAT, node);
    if (r < 0) return fail_ir(p, tok);
    return r;
}

static ir_type max_type(ir_type a, ir_type b) {
    return a > b ? a : b;
}

static int make_binary(parser *p, ir_op op, ir_type type, int a, int b, int tok) {
    int r = ir_binary(p->m, op, type, a, b);
    if (r < 0) return fail_ir(p, tok);
    return r;
}

/* ---- expressions ---- */

static int parse_ternary(parser *p, value *out);

/* The operator token's own spelling, for messages. */
static void op_text(const parser *p, int tok, char *buf, size_t cap) {
    const mod_token *t = &p->toks[tok];
    snprintf(buf, cap, "%.*s", (int)t->length, p->text + t->offset);
}

/* Applies binary operator token optok to l and r (both already parsed). */
static int apply_binary(parser *p, int optok, const value *l, const value *r, value *out) {
    if (need_scalar(p, l) < 0 || need_scalar(p, r) < 0) return -1;
    mod_token_kind k = p->toks[optok].kind;
    char opname[8];
    op_text(p, optok, opname, sizeof opname);
    ir_type lt = l->type, rt = r->type;
    int a = l->node, b = r->node;
    int node = -1;
    ir_type type = IR_BOOL;

    switch (k) {
    case TOK_OROR:
    case TOK_ANDAND:
        if (lt != IR_BOOL || rt != IR_BOOL) {
            /* An int beside a bool is a flag to test: '|' would give an int,
             * which no mask returns, so the advice is the comparison. */
            const value *flag = lt == IR_INT && rt == IR_BOOL   ? l
                                : rt == IR_INT && lt == IR_BOOL ? r
                                                                : NULL;
            if (flag) {
                const mod_token *first = &p->toks[flag->tok], *last = &p->toks[flag->end];
                int len = (int)(last->offset + last->length - first->offset);
                return fail(p, FLEX_ERR_MOD_TYPE, optok,
                            "operator '%s' needs bool operands, got %s and %s (compare the int "
                            "with 0: '%.*s != 0')",
                            opname, type_name(lt), type_name(rt), len > 40 ? 40 : len,
                            p->text + first->offset);
            }
            return fail(p, FLEX_ERR_MOD_TYPE, optok,
                        "operator '%s' needs bool operands, got %s and %s%s", opname, type_name(lt),
                        type_name(rt),
                        k == TOK_ANDAND ? " (use '&' for bitwise and of ints)"
                                        : " (use '|' for bitwise or of ints)");
        }
        node = make_binary(p, k == TOK_OROR ? IR_OR : IR_AND, IR_BOOL, a, b, optok);
        break;
    case TOK_OR:
    case TOK_AND:
    case TOK_CARET: {
        ir_op op = k == TOK_OR ? IR_OR : k == TOK_AND ? IR_AND : IR_XOR;
        if (lt == IR_FLOAT || rt == IR_FLOAT)
            return fail(p, FLEX_ERR_MOD_TYPE, optok,
                        "operator '%s' needs bool or int operands, got %s and %s", opname,
                        type_name(lt), type_name(rt));
        type = max_type(lt, rt);
        a = convert(p, a, lt, type, optok);
        b = convert(p, b, rt, type, optok);
        if (a < 0 || b < 0) return -1;
        node = make_binary(p, op, type, a, b, optok);
        break;
    }
    case TOK_EQ:
    case TOK_NE:
    case TOK_LT:
    case TOK_LE:
    case TOK_GT:
    case TOK_GE: {
        static const ir_op ops[] = {[TOK_EQ] = IR_EQ, [TOK_NE] = IR_NE, [TOK_LT] = IR_LT,
                                    [TOK_LE] = IR_LE, [TOK_GT] = IR_GT, [TOK_GE] = IR_GE};
        ir_type common = max_type(lt, rt);
        a = convert(p, a, lt, common, optok);
        b = convert(p, b, rt, common, optok);
        if (a < 0 || b < 0) return -1;
        node = make_binary(p, ops[k], IR_BOOL, a, b, optok);
        type = IR_BOOL;
        break;
    }
    case TOK_PLUS:
    case TOK_MINUS:
    case TOK_STAR:
    case TOK_SLASH:
    case TOK_SLASHSLASH:
    case TOK_PERCENT: {
        /* bools take part in arithmetic as 0 / 1 ints */
        type = max_type(IR_INT, max_type(lt, rt));
        a = convert(p, a, lt, type, optok);
        b = convert(p, b, rt, type, optok);
        if (a < 0 || b < 0) return -1;
        ir_op op = k == TOK_PLUS         ? IR_ADD
                   : k == TOK_MINUS      ? IR_SUB
                   : k == TOK_STAR       ? IR_MUL
                   : k == TOK_PERCENT    ? IR_MOD
                   : k == TOK_SLASHSLASH ? IR_FLOORDIV
                                         : (type == IR_FLOAT ? IR_DIV : IR_FLOORDIV);
        node = make_binary(p, op, type, a, b, optok);
        break;
    }
    default:
        return fail(p, FLEX_ERR_INTERNAL, optok, "internal error: unknown operator");
    }
    if (node < 0) return -1;
    *out = scalar(node, type, l->tok, r->end);
    return 0;
}

static int parse_call(parser *p, int fn, int name_tok, value *out) {
    /* p->pos is just past '(' */
    value args[4];
    int nargs = 0;
    if (peek(p)->kind != TOK_RPAREN) {
        for (;;) {
            value v;
            if (parse_ternary(p, &v) < 0) return -1;
            if (nargs < 4) args[nargs] = v;
            nargs++;
            if (accept(p, TOK_COMMA)) continue;
            if (peek(p)->kind == TOK_RPAREN) break;
            char what[96];
            snprintf(what, sizeof what, "',' or ')' in the call of '%s'", functions[fn].name);
            return fail_expected(p, what);
        }
    }
    int close_tok = p->pos;
    p->pos++; /* ')' */
    if (nargs != functions[fn].nargs)
        return fail_range(p, FLEX_ERR_MOD_TYPE, name_tok, close_tok,
                          "function '%s' takes %d argument%s (%s), got %d", functions[fn].name,
                          functions[fn].nargs, functions[fn].nargs == 1 ? "" : "s",
                          functions[fn].signature, nargs);
    for (int i = 0; i < nargs; i++)
        if (need_scalar(p, &args[i]) < 0) return -1;

    ir_mod *m = p->m;
    int node = -1;
    ir_type type = IR_FLOAT;
    switch (functions[fn].kind) {
    case FN_ABS:
        type = max_type(IR_INT, args[0].type);
        node = convert(p, args[0].node, args[0].type, type, name_tok);
        if (node < 0) return -1;
        node = ir_unary(m, IR_ABS, type, node);
        break;
    case FN_MINMAX:
    case FN_CLAMP: {
        type = IR_INT;
        for (int i = 0; i < nargs; i++)
            type = max_type(type, args[i].type);
        int conv[3];
        for (int i = 0; i < nargs; i++) {
            conv[i] = convert(p, args[i].node, args[i].type, type, name_tok);
            if (conv[i] < 0) return -1;
        }
        if (functions[fn].kind == FN_MINMAX) {
            node = ir_binary(m, functions[fn].op, type, conv[0], conv[1]);
        } else {
            int lo = ir_binary(m, IR_MAX, type, conv[0], conv[1]);
            node = lo < 0 ? -1 : ir_binary(m, IR_MIN, type, lo, conv[2]);
        }
        break;
    }
    case FN_WHERE: {
        if (args[0].type != IR_BOOL)
            return fail_range(p, FLEX_ERR_MOD_TYPE, args[0].tok, args[0].end,
                              "the condition of 'where' must be bool, got %s",
                              type_name(args[0].type));
        type = max_type(args[1].type, args[2].type);
        int x = convert(p, args[1].node, args[1].type, type, name_tok);
        int y = convert(p, args[2].node, args[2].type, type, name_tok);
        if (x < 0 || y < 0) return -1;
        node = ir_select(m, type, args[0].node, x, y);
        break;
    }
    case FN_FLOAT_UNARY: {
        int x = convert(p, args[0].node, args[0].type, IR_FLOAT, name_tok);
        if (x < 0) return -1;
        node = ir_unary(m, functions[fn].op, IR_FLOAT, x);
        break;
    }
    case FN_POW: {
        int x = convert(p, args[0].node, args[0].type, IR_FLOAT, name_tok);
        int y = convert(p, args[1].node, args[1].type, IR_FLOAT, name_tok);
        if (x < 0 || y < 0) return -1;
        node = ir_binary(m, IR_POW, IR_FLOAT, x, y);
        break;
    }
    case FN_ROUND:
        if (args[0].type == IR_FLOAT) {
            node = ir_unary(m, functions[fn].op, IR_FLOAT, args[0].node);
        } else {
            /* exact already: floor and ceil of an int are the int */
            type = IR_INT;
            node = convert(p, args[0].node, args[0].type, IR_INT, name_tok);
            if (node < 0) return -1;
        }
        break;
    case FN_TO_FLOAT:
        node = convert(p, args[0].node, args[0].type, IR_FLOAT, name_tok);
        if (node < 0) return -1;
        break;
    case FN_TO_INT:
        type = IR_INT;
        if (args[0].type == IR_INT)
            node = args[0].node;
        else
            node = ir_unary(m, IR_TO_INT, IR_INT, args[0].node);
        break;
    }
    if (node < 0) return fail_ir(p, name_tok);
    *out = scalar(node, type, name_tok, close_tok);
    return 0;
}

static int parse_primary(parser *p, value *out) {
    int tok = p->pos;
    const mod_token *t = peek(p);
    ir_mod *m = p->m;
    switch (t->kind) {
    case TOK_INT: {
        if (t->int_value > INT32_MAX)
            return fail(p, FLEX_ERR_MOD_SYNTAX, tok,
                        "integer literal '%.*s' does not fit in a 32-bit int (the largest is "
                        "2147483647); add '.0' to make it a float",
                        (int)(t->length > 40 ? 40 : t->length), p->text + t->offset);
        int node = ir_const_int(m, (int32_t)t->int_value);
        if (node < 0) return fail_ir(p, tok);
        p->pos++;
        *out = scalar(node, IR_INT, tok, tok);
        return 0;
    }
    case TOK_FLOAT: {
        int node = ir_const_float(m, t->float_value);
        if (node < 0) return fail_ir(p, tok);
        p->pos++;
        *out = scalar(node, IR_FLOAT, tok, tok);
        return 0;
    }
    case TOK_LPAREN: {
        p->pos++;
        value inner;
        if (parse_ternary(p, &inner) < 0) return -1;
        if (peek(p)->kind != TOK_RPAREN) {
            char found[64];
            token_text(p, p->pos, found, sizeof found);
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                        "expected ')' to close the '(' at %d:%d, found %s", t->line, t->col, found);
        }
        inner.tok = tok;
        inner.end = p->pos;
        p->pos++;
        *out = inner;
        return 0;
    }
    case TOK_IDENT:
        break;
    case TOK_ASSIGN:
        return fail(p, FLEX_ERR_MOD_SYNTAX, tok,
                    "unexpected '='; use '==' to compare (bindings are 'let name = value;')");
    case TOK_STAR:
        if (tok > 0 && p->toks[tok - 1].kind == TOK_STAR &&
            p->toks[tok - 1].offset + 1 == t->offset)
            return fail_range(p, FLEX_ERR_MOD_SYNTAX, tok - 1, tok,
                              "'**' is not an operator; write pow(x, y)");
        return fail_expected(p, "an expression");
    case TOK_RPAREN:
        if (tok > 0 && p->toks[tok - 1].kind == TOK_COMMA)
            return fail(p, FLEX_ERR_MOD_SYNTAX, tok,
                        "expected an expression after ',', found ')' (no trailing commas)");
        return fail_expected(p, "an expression");
    default:
        return fail_expected(p, "an expression");
    }

    const char *name = p->text + t->offset;
    size_t len = t->length;
    p->pos++;
    int i;
    if ((i = find_let(p, name, len)) >= 0) {
        *out = p->lets[i].v;
        out->tok = out->end = tok;
        return 0;
    }
    if ((i = find_param(p->desc, name, len)) >= 0) {
        const flex_param *par = &p->desc->params[i];
        int node = par->is_float ? ir_const_float(m, (float)par->value)
                                 : ir_const_int(m, (int32_t)par->value);
        if (node < 0) return fail_ir(p, tok);
        *out = scalar(node, par->is_float ? IR_FLOAT : IR_INT, tok, tok);
        return 0;
    }
    if ((i = find_buffer(m, name, len)) >= 0) {
        *out = scalar(-1, ir_type_of_dtype(m->buffers[i].dtype), tok, tok);
        out->buffer = i;
        return 0;
    }
    if ((i = find_variable(name, len)) >= 0) {
        if (variables[i].op == IR_SCORE && m->kind != FLEX_MOD_SCORE)
            return fail(p, FLEX_ERR_MOD_NAME, tok,
                        "'score' is only available in score mods; this is a mask mod, a "
                        "function of b, h, q and kv");
        int node = ir_leaf(m, variables[i].op);
        if (node < 0) return fail_ir(p, tok);
        *out = scalar(node, variables[i].op == IR_SCORE ? IR_FLOAT : IR_INT, tok, tok);
        return 0;
    }
    if (ident_is(p, tok, "true") || ident_is(p, tok, "false")) {
        int node = ir_const_bool(m, ident_is(p, tok, "true"));
        if (node < 0) return fail_ir(p, tok);
        *out = scalar(node, IR_BOOL, tok, tok);
        return 0;
    }
    if (ident_is(p, tok, "inf")) {
        int node = ir_const_float(m, INFINITY);
        if (node < 0) return fail_ir(p, tok);
        *out = scalar(node, IR_FLOAT, tok, tok);
        return 0;
    }
    if ((i = find_function(name, len)) >= 0) {
        *out = scalar(-1, IR_FLOAT, tok, tok);
        out->func = i;
        return 0;
    }
    if (ident_is(p, tok, "let"))
        return fail(p, FLEX_ERR_MOD_SYNTAX, tok,
                    "'let' can only start a binding, before the result expression");
    if (ident_is(p, tok, "not"))
        return fail(p, FLEX_ERR_MOD_NAME, tok, "unknown name 'not'; write '!' for logical not");
    const char *hint = suggest(p, name, len);
    if (hint)
        return fail(p, FLEX_ERR_MOD_NAME, tok, "unknown name '%.*s'; did you mean '%s'?",
                    (int)(len > 60 ? 60 : len), name, hint);
    return fail(p, FLEX_ERR_MOD_NAME, tok, "unknown name '%.*s'", (int)(len > 60 ? 60 : len), name);
}

/* An index beyond a buffer's dims (the n-th), at tokens tok..end. */
static int fail_extra_index(parser *p, const ir_buffer *buf, int tok, int end, int n) {
    return fail_range(p, FLEX_ERR_MOD_TYPE, tok, end,
                      "buffer '%s' has %d dimension%s, so it takes %d ind%s; this is index %d",
                      buf->name, buf->ndim, buf->ndim == 1 ? "" : "s", buf->ndim,
                      buf->ndim == 1 ? "ex" : "ices", n);
}

static int parse_index(parser *p, int open_tok, value *v) {
    /* p->pos is just past '[' */
    if (v->buffer < 0) {
        if (v->func >= 0)
            return fail(p, FLEX_ERR_MOD_TYPE, open_tok, "function '%s' cannot be indexed",
                        functions[v->func].name);
        return fail(p, FLEX_ERR_MOD_TYPE, open_tok,
                    "only buffers can be indexed; this is %s %s value",
                    v->type == IR_INT ? "an" : "a", type_name(v->type));
    }
    const ir_buffer *buf = &p->m->buffers[v->buffer];
    for (;;) {
        value idx;
        if (parse_ternary(p, &idx) < 0) return -1;
        if (need_scalar(p, &idx) < 0) return -1;
        if (v->nidx >= buf->ndim) return fail_extra_index(p, buf, idx.tok, idx.end, v->nidx + 1);
        if (idx.type == IR_FLOAT)
            return fail_range(p, FLEX_ERR_MOD_TYPE, idx.tok, idx.end,
                              "index %d of buffer '%s' must be an int, got float (use int(...))",
                              v->nidx + 1, buf->name);
        int node = convert(p, idx.node, idx.type, IR_INT, idx.tok);
        if (node < 0) return -1;
        v->idx[v->nidx++] = node;
        if (accept(p, TOK_COMMA)) continue;
        if (peek(p)->kind == TOK_RBRACKET) break;
        return fail_expected(p, "',' or ']' after a buffer index");
    }
    v->end = p->pos;
    p->pos++; /* ']' */
    if (v->nidx == buf->ndim) {
        int node = ir_load(p->m, v->buffer, ir_type_of_dtype(buf->dtype), v->nidx, v->idx);
        if (node < 0) return fail_ir(p, open_tok);
        value loaded = scalar(node, ir_type_of_dtype(buf->dtype), v->tok, v->end);
        *v = loaded;
    }
    return 0;
}

static int parse_postfix(parser *p, value *out) {
    if (parse_primary(p, out) < 0) return -1;
    int read_of = -1; /* the buffer whose element out is, right after its read */
    for (;;) {
        int tok = p->pos;
        if (peek(p)->kind == TOK_LBRACKET) {
            if (read_of >= 0)
                return fail_extra_index(p, &p->m->buffers[read_of], tok, tok,
                                        p->m->buffers[read_of].ndim + 1);
            int buffer = out->buffer;
            p->pos++;
            if (parse_index(p, tok, out) < 0) return -1;
            if (buffer >= 0 && out->buffer < 0) read_of = buffer;
        } else if (peek(p)->kind == TOK_LPAREN) {
            if (out->func < 0)
                return fail_range(p, FLEX_ERR_MOD_TYPE, out->tok, out->end,
                                  "only functions can be called; this is not a function");
            p->pos++;
            int start = out->tok;
            if (parse_call(p, out->func, start, out) < 0) return -1;
            read_of = -1;
        } else {
            break;
        }
    }
    return 0;
}

static int parse_unary(parser *p, value *out) {
    int tok = p->pos;
    mod_token_kind k = peek(p)->kind;
    if (k != TOK_MINUS && k != TOK_BANG && k != TOK_TILDE) return parse_postfix(p, out);
    if (++p->depth > MAX_DEPTH)
        return fail(p, FLEX_ERR_MOD_SYNTAX, tok, "expression nested too deeply");
    p->pos++;
    /* -2147483648 is an int literal although 2147483648 alone is not. */
    if (k == TOK_MINUS && peek(p)->kind == TOK_INT && peek(p)->int_value == 2147483648LL) {
        int node = ir_const_int(p->m, INT32_MIN);
        if (node < 0) return fail_ir(p, tok);
        *out = scalar(node, IR_INT, tok, p->pos);
        p->pos++;
        p->depth--;
        return 0;
    }
    value v;
    if (parse_unary(p, &v) < 0) return -1;
    p->depth--;
    if (need_scalar(p, &v) < 0) return -1;
    int node = -1;
    ir_type type = v.type;
    if (k == TOK_MINUS) {
        if (v.type == IR_BOOL)
            return fail(p, FLEX_ERR_MOD_TYPE, tok,
                        "operator '-' cannot negate a bool (use '!' for logical not)");
        node = ir_unary(p->m, IR_NEG, v.type, v.node);
    } else if (k == TOK_BANG) {
        if (v.type != IR_BOOL)
            return fail(p, FLEX_ERR_MOD_TYPE, tok, "operator '!' needs a bool operand, got %s%s",
                        type_name(v.type),
                        v.type == IR_INT ? " (use '~' for bitwise not, or '== 0')" : "");
        node = ir_unary(p->m, IR_NOT, IR_BOOL, v.node);
    } else {
        if (v.type == IR_FLOAT)
            return fail(p, FLEX_ERR_MOD_TYPE, tok,
                        "operator '~' needs a bool or int operand, got float");
        node = ir_unary(p->m, v.type == IR_BOOL ? IR_NOT : IR_BITNOT, v.type, v.node);
    }
    if (node < 0) return fail_ir(p, tok);
    *out = scalar(node, type, tok, v.end);
    return 0;
}

/* Binary levels, loosest first (after the ternary). */
static const mod_token_kind level_ops[][6] = {
    {TOK_OROR, TOK_OR},
    {TOK_ANDAND, TOK_AND},
    {TOK_CARET},
    {TOK_EQ, TOK_NE},
    {TOK_LT, TOK_LE, TOK_GT, TOK_GE},
    {TOK_PLUS, TOK_MINUS},
    {TOK_STAR, TOK_SLASH, TOK_SLASHSLASH, TOK_PERCENT},
};
#define NUM_LEVELS       ((int)(sizeof level_ops / sizeof level_ops[0]))
#define LEVEL_EQUALITY   3
#define LEVEL_RELATIONAL 4

static int at_level(const parser *p, int level) {
    mod_token_kind k = peek(p)->kind;
    for (int i = 0; i < 6 && level_ops[level][i] != TOK_EOF; i++)
        if (level_ops[level][i] == k) return 1;
    return 0;
}

static int parse_level(parser *p, int level, value *out) {
    if (level == NUM_LEVELS) return parse_unary(p, out);
    if (parse_level(p, level + 1, out) < 0) return -1;
    int chained = 0;
    while (at_level(p, level)) {
        int optok = p->pos;
        if (chained && (level == LEVEL_RELATIONAL || level == LEVEL_EQUALITY))
            return fail(p, FLEX_ERR_MOD_SYNTAX, optok,
                        "comparisons cannot be chained; write 'a < b && b < c' instead");
        p->pos++;
        value rhs;
        if (parse_level(p, level + 1, &rhs) < 0) return -1;
        value combined;
        if (apply_binary(p, optok, out, &rhs, &combined) < 0) return -1;
        *out = combined;
        chained = 1;
    }
    return 0;
}

static int parse_ternary(parser *p, value *out) {
    if (++p->depth > MAX_DEPTH)
        return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos, "expression nested too deeply");
    if (parse_level(p, 0, out) < 0) return -1;
    if (peek(p)->kind == TOK_QUESTION) {
        int qtok = p->pos;
        p->pos++;
        value a, b;
        if (parse_ternary(p, &a) < 0) return -1;
        if (peek(p)->kind != TOK_COLON) {
            char found[64];
            token_text(p, p->pos, found, sizeof found);
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                        "expected ':' to go with the '?' at %d:%d, found %s", p->toks[qtok].line,
                        p->toks[qtok].col, found);
        }
        p->pos++;
        if (parse_ternary(p, &b) < 0) return -1;
        if (need_scalar(p, out) < 0 || need_scalar(p, &a) < 0 || need_scalar(p, &b) < 0) return -1;
        if (out->type != IR_BOOL)
            return fail_range(p, FLEX_ERR_MOD_TYPE, out->tok, out->end,
                              "the condition of '?:' must be bool, got %s", type_name(out->type));
        ir_type type = max_type(a.type, b.type);
        int x = convert(p, a.node, a.type, type, qtok);
        int y = convert(p, b.node, b.type, type, qtok);
        if (x < 0 || y < 0) return -1;
        int node = ir_select(p->m, type, out->node, x, y);
        if (node < 0) return fail_ir(p, qtok);
        *out = scalar(node, type, out->tok, b.end);
    }
    p->depth--;
    return 0;
}

/* ---- statements ---- */

static int parse_let(parser *p) {
    p->pos++; /* 'let' */
    int name_tok = p->pos;
    const mod_token *t = peek(p);
    if (t->kind != TOK_IDENT) return fail_expected(p, "a name after 'let'");
    const char *name = p->text + t->offset;
    size_t len = t->length;
    int n = (int)(len > 60 ? 60 : len);
    if (is_keyword(name, len))
        return fail(p, FLEX_ERR_MOD_SYNTAX, name_tok, "'%.*s' is a reserved word, not a name", n,
                    name);
    if (len >= MAX_NAME)
        return fail(p, FLEX_ERR_MOD_SYNTAX, name_tok, "name is longer than %d characters",
                    MAX_NAME - 1);
    int i;
    if ((i = find_let(p, name, len)) >= 0)
        return fail(p, FLEX_ERR_MOD_NAME, name_tok, "'%.*s' is already bound by the let at %d:%d",
                    n, name, p->toks[p->lets[i].tok].line, p->toks[p->lets[i].tok].col);
    const char *what = NULL;
    if (find_variable(name, len) >= 0)
        what = "a variable";
    else if (find_param(p->desc, name, len) >= 0)
        what = "a param";
    else if (find_buffer(p->m, name, len) >= 0)
        what = "a buffer";
    else if (find_function(name, len) >= 0)
        what = "a function";
    if (what)
        return fail(p, FLEX_ERR_MOD_NAME, name_tok,
                    "'%.*s' is %s; a let cannot shadow it, pick another name", n, name, what);
    p->pos++;
    if (peek(p)->kind != TOK_ASSIGN) {
        char expect[96];
        snprintf(expect, sizeof expect, "'=' after 'let %.*s'", n, name);
        return fail_expected(p, expect);
    }
    p->pos++;
    value v;
    if (parse_ternary(p, &v) < 0) return -1;
    if (v.func >= 0 && need_scalar(p, &v) < 0) return -1;
    if (peek(p)->kind != TOK_SEMI) {
        char expect[112];
        snprintf(expect, sizeof expect, "';' to end the binding of '%.*s'", n, name);
        return fail_expected(p, expect);
    }
    p->pos++;
    if (p->nlets == p->cap_lets) {
        int cap = p->cap_lets ? p->cap_lets * 2 : 8;
        binding *grown = realloc(p->lets, (size_t)cap * sizeof *grown);
        if (!grown) return fail(p, FLEX_ERR_OUT_OF_MEMORY, name_tok, "out of memory");
        p->lets = grown;
        p->cap_lets = cap;
    }
    binding *bnd = &p->lets[p->nlets++];
    memcpy(bnd->name, name, len);
    bnd->name[len] = '\0';
    bnd->v = v;
    bnd->tok = name_tok;
    return 0;
}

static int parse_program(parser *p) {
    while (ident_is(p, p->pos, "let"))
        if (parse_let(p) < 0) return -1;
    if (peek(p)->kind == TOK_EOF) {
        if (p->nlets > 0)
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                        "expected the result expression after the let bindings, found end of "
                        "input");
        return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos, "the mod is empty: expected an expression");
    }
    value result;
    if (parse_ternary(p, &result) < 0) return -1;
    accept(p, TOK_SEMI);
    if (peek(p)->kind != TOK_EOF) {
        char found[64];
        token_text(p, p->pos, found, sizeof found);
        if (peek(p)->kind == TOK_ASSIGN)
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                        "unexpected '='; use '==' to compare (bindings are 'let name = value;')");
        if (ident_is(p, p->pos, "and") || ident_is(p, p->pos, "or"))
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos, "unexpected %s; write '%s'", found,
                        ident_is(p, p->pos, "and") ? "&&" : "||");
        if (peek(p)->kind == TOK_RPAREN)
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos, "unmatched ')'");
        if (p->toks[p->pos - 1].kind == TOK_SEMI)
            return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                        "unexpected %s after the result expression; only 'let name = value;' "
                        "bindings come before the result, which comes last",
                        found);
        return fail(p, FLEX_ERR_MOD_SYNTAX, p->pos,
                    "expected an operator or end of input after the expression, found %s", found);
    }
    if (need_scalar(p, &result) < 0) return -1;
    int root = result.node;
    if (p->m->kind == FLEX_MOD_MASK) {
        if (result.type != IR_BOOL)
            return fail_range(p, FLEX_ERR_MOD_TYPE, result.tok, result.end,
                              "a mask mod must return bool (true = attend), but this is %s",
                              type_name(result.type));
    } else {
        if (result.type == IR_BOOL)
            return fail_range(p, FLEX_ERR_MOD_TYPE, result.tok, result.end,
                              "a score mod must return a float score, but this is bool "
                              "(use where(cond, score, -inf) to mask)");
        root = convert(p, root, result.type, IR_FLOAT, result.tok);
        if (root < 0) return -1;
    }
    p->m->root = root;
    return 0;
}

/* ---- the descriptor ---- */

static int valid_identifier(const char *s) {
    if (!s || !*s) return 0;
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_')) return 0;
    for (const char *c = s; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '_'))
            return 0;
    return strlen(s) < MAX_NAME;
}

static flex_status desc_error(char *err, size_t cap, flex_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static flex_status desc_error(char *err, size_t cap, flex_status status, const char *fmt, ...) {
    if (err && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return status;
}

/* What kind of name `name` already is among the language's own names and
 * the first `np` params / `nb` buffers, or NULL. */
static const char *taken_as(const flex_mod_desc *d, const char *name, int np, int nb) {
    size_t len = strlen(name);
    if (find_variable(name, len) >= 0) return "a variable of the language";
    if (find_function(name, len) >= 0) return "a function of the language";
    if (is_keyword(name, len)) return "a reserved word";
    for (int i = 0; i < np; i++)
        if (strcmp(d->params[i].name, name) == 0) return "another param";
    for (int i = 0; i < nb; i++)
        if (strcmp(d->buffers[i].name, name) == 0) return "another buffer";
    return NULL;
}

static flex_status check_desc(const flex_mod_desc *d, char *err, size_t cap) {
    const flex_status bad = FLEX_ERR_INVALID_ARGUMENT;
    if (d->kind != FLEX_MOD_MASK && d->kind != FLEX_MOD_SCORE)
        return desc_error(err, cap, bad, "mod kind %d is neither FLEX_MOD_MASK nor FLEX_MOD_SCORE",
                          (int)d->kind);
    if (d->num_params < 0)
        return desc_error(err, cap, bad, "num_params is %d; it must be >= 0", d->num_params);
    if (d->num_buffers < 0 || d->num_buffers > IR_MAX_BUFFERS)
        return desc_error(err, cap, bad, "num_buffers is %d; it must be 0 to %d", d->num_buffers,
                          IR_MAX_BUFFERS);
    if (d->num_params > 0 && !d->params)
        return desc_error(err, cap, FLEX_ERR_NULL_POINTER, "params is NULL but num_params is %d",
                          d->num_params);
    if (d->num_buffers > 0 && !d->buffers)
        return desc_error(err, cap, FLEX_ERR_NULL_POINTER, "buffers is NULL but num_buffers is %d",
                          d->num_buffers);
    for (int i = 0; i < d->num_params; i++) {
        const flex_param *par = &d->params[i];
        if (!par->name)
            return desc_error(err, cap, FLEX_ERR_NULL_POINTER, "params[%d].name is NULL", i);
        if (!valid_identifier(par->name))
            return desc_error(err, cap, bad,
                              "param name '%.60s' is not a valid name (letters, digits and '_', "
                              "not starting with a digit, at most %d characters)",
                              par->name, MAX_NAME - 1);
        const char *taken = taken_as(d, par->name, i, 0);
        if (taken)
            return desc_error(err, cap, bad, "param '%s' has the name of %s", par->name, taken);
        if (par->is_float) {
            if (isfinite(par->value) && isinf((float)par->value))
                return desc_error(err, cap, bad,
                                  "float param '%s' = %g does not fit in a 32-bit float", par->name,
                                  par->value);
        } else {
            double v = par->value;
            if (!isfinite(v) || floor(v) != v || v < (double)INT32_MIN || v > (double)INT32_MAX)
                return desc_error(err, cap, bad,
                                  "int param '%s' = %g must be a whole number that fits in a "
                                  "32-bit int (set is_float for a float param)",
                                  par->name, v);
        }
    }
    for (int i = 0; i < d->num_buffers; i++) {
        const flex_buffer_decl *buf = &d->buffers[i];
        if (!buf->name)
            return desc_error(err, cap, FLEX_ERR_NULL_POINTER, "buffers[%d].name is NULL", i);
        if (!valid_identifier(buf->name))
            return desc_error(err, cap, bad,
                              "buffer name '%.60s' is not a valid name (letters, digits and "
                              "'_', not starting with a digit, at most %d characters)",
                              buf->name, MAX_NAME - 1);
        const char *taken = taken_as(d, buf->name, d->num_params, i);
        if (taken)
            return desc_error(err, cap, bad, "buffer '%s' has the name of %s", buf->name,
                              strcmp(taken, "another param") == 0 ? "a param" : taken);
        if (buf->ndim < 1 || buf->ndim > 4)
            return desc_error(err, cap, bad, "buffer '%s' has ndim %d; it must be 1 to 4",
                              buf->name, buf->ndim);
        if ((unsigned)buf->dtype > FLEX_BOOL)
            return desc_error(err, cap, FLEX_ERR_DTYPE, "buffer '%s' has unknown dtype %d",
                              buf->name, (int)buf->dtype);
    }
    return FLEX_OK;
}

flex_status mod_parse(const flex_mod_desc *desc, ir_mod *out, char *err, size_t err_cap) {
    if (err && err_cap) err[0] = '\0';
    ir_init(out, FLEX_MOD_MASK);
    if (!desc)
        return desc_error(err, err_cap, FLEX_ERR_NULL_POINTER, "the mod description is NULL");
    if (!desc->text) return desc_error(err, err_cap, FLEX_ERR_NULL_POINTER, "the mod text is NULL");
    flex_status st = check_desc(desc, err, err_cap);
    if (st != FLEX_OK) return st;

    ir_init(out, desc->kind);
    for (int i = 0; i < desc->num_buffers; i++) {
        ir_buffer *b = &out->buffers[i];
        snprintf(b->name, sizeof b->name, "%s", desc->buffers[i].name);
        b->dtype = desc->buffers[i].dtype;
        b->ndim = desc->buffers[i].ndim;
    }
    out->num_buffers = desc->num_buffers;

    mod_token_list list;
    if (mod_lex(desc->text, &list) < 0)
        return desc_error(err, err_cap, FLEX_ERR_OUT_OF_MEMORY,
                          "out of memory while reading the mod text");
    /* The end of input sits just after the last token, so a caret for a
     * missing piece points where it should go. */
    mod_token *last = &list.tokens[list.count - 1];
    if (last->kind == TOK_EOF && list.count > 1) {
        const mod_token *prev = &list.tokens[list.count - 2];
        last->offset = prev->offset + prev->length;
        last->line = prev->line;
        last->col = prev->col + (int)prev->length;
    } else if (last->kind == TOK_EOF) {
        last->offset = 0;
        last->line = last->col = 1;
    }

    parser p;
    memset(&p, 0, sizeof p);
    p.desc = desc;
    p.text = desc->text;
    p.toks = list.tokens;
    p.ntoks = list.count;
    p.m = out;
    p.err = err;
    p.err_cap = err_cap;
    p.status = FLEX_OK;

    /* A '=' anywhere but in 'let name =' is almost always a '==' typo; say
     * so before the parser trips over what follows it. */
    int stray_assign = -1;
    for (int i = 0; i < list.count && stray_assign < 0; i++) {
        if (list.tokens[i].kind != TOK_ASSIGN) continue;
        if ((i >= 1 && ident_is(&p, i - 1, "let")) || (i >= 2 && ident_is(&p, i - 2, "let")))
            continue; /* the let parser explains a malformed binding better */
        stray_assign = i;
    }
    if (last->kind == TOK_ERROR) {
        /* Tokens before the bad character still parse up to it, but the
         * lexical error is what the user needs to see. */
        fail(&p, FLEX_ERR_MOD_SYNTAX, list.count - 1, "%s", list.error);
    } else if (stray_assign >= 0) {
        fail(&p, FLEX_ERR_MOD_SYNTAX, stray_assign,
             "unexpected '='; use '==' to compare (bindings are 'let name = value;')");
    } else {
        parse_program(&p);
    }
    free(p.lets);
    mod_token_list_free(&list);
    if (p.status == FLEX_OK) {
        if (ir_fold(out) < 0) {
            p.status = desc_error(err, err_cap, FLEX_ERR_OUT_OF_MEMORY,
                                  "out of memory while folding the mod");
        }
    }
    if (p.status != FLEX_OK) {
        ir_free(out);
        return p.status;
    }
    return FLEX_OK;
}
