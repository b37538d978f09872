/*
 * The mod language front end: parsing, typing, canonical text and hash,
 * sharing of subexpressions, error messages, and the flex_mod API around
 * them (compile, bind, and/or, host views).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/parse.h"

static const flex_param test_params[] = {
    {"W", 0, 256}, {"P", 0, 64}, {"IW", 0, 16}, {"IH", 0, 16}, {"K", 0, 7}, {"cap", 1, 30.0},
};
#define NUM_TEST_PARAMS ((int)(sizeof test_params / sizeof test_params[0]))

static const flex_buffer_decl test_buffers[] = {
    {"doc", FLEX_I32, 1},  {"slopes", FLEX_F32, 1}, {"img_of", FLEX_I32, 1},
    {"lo", FLEX_I32, 1},   {"hi", FLEX_I32, 1},     {"intervals", FLEX_I32, 2},
    {"bias", FLEX_F16, 2}, {"keep", FLEX_BOOL, 1},  {"t0", FLEX_I64, 1},
};
#define NUM_TEST_BUFFERS ((int)(sizeof test_buffers / sizeof test_buffers[0]))

static flex_status compile(flex_mod_kind kind, const char *text, flex_mod **out) {
    flex_mod_desc d = {kind, text, test_params, NUM_TEST_PARAMS, test_buffers, NUM_TEST_BUFFERS};
    return flex_mod_compile(NULL, &d, out);
}

static flex_mod *compile_ok(flex_mod_kind kind, const char *text) {
    flex_mod *m = NULL;
    flex_status st = compile(kind, text, &m);
    ck_assert_msg(st == FLEX_OK, "'%s' failed: %s", text, flex_error_message(NULL));
    ck_assert_ptr_nonnull(m);
    return m;
}

static int count_op(const flex_mod *m, ir_op op) {
    int n = 0;
    for (int i = 0; i < m->ir.num_nodes; i++)
        n += m->ir.nodes[i].op == op;
    return n;
}

/* Parsing the canonical text again (same buffers, no params) gives the same
 * canonical text and hash. */
static void check_round_trip(const flex_mod *m) {
    flex_mod_desc d = {m->ir.kind, m->canonical, NULL, 0, test_buffers, NUM_TEST_BUFFERS};
    flex_mod *again = NULL;
    flex_status st = flex_mod_compile(NULL, &d, &again);
    ck_assert_msg(st == FLEX_OK, "canonical text '%s' does not parse: %s", m->canonical,
                  flex_error_message(NULL));
    ck_assert_str_eq(again->canonical, m->canonical);
    ck_assert_uint_eq(again->hash, m->hash);
    ck_assert_int_eq(again->ir.num_nodes, m->ir.num_nodes);
    flex_mod_destroy(again);
}

static void check_topological(const flex_mod *m) {
    ck_assert_int_ge(m->ir.root, 0);
    ck_assert_int_eq(m->ir.root, m->ir.num_nodes - 1);
    for (int i = 0; i < m->ir.num_nodes; i++)
        for (int a = 0; a < m->ir.nodes[i].nargs; a++)
            ck_assert_int_lt(m->ir.nodes[i].args[a], i);
}

/* ---- the seed examples ---- */

static const struct {
    flex_mod_kind kind;
    const char *text;
    const char *canonical;
} seeds[] = {
    {FLEX_MOD_MASK, "q >= kv", "q >= kv"},
    {FLEX_MOD_MASK, "q >= kv && q - kv <= W", "q >= kv && q - kv <= 256"},
    {FLEX_MOD_MASK, "kv <= P || q >= kv", "kv <= 64 || q >= kv"},
    {FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]", "q >= kv && doc[q] == doc[kv]"},
    {FLEX_MOD_MASK,
     "let qx = q / IW; let qy = q % IW; let kx = kv / IW; let ky = kv % IW;\n"
     "let cx = clamp(qx, K / 2, IH - 1 - K / 2); let cy = clamp(qy, K / 2, IW - 1 - K / 2);\n"
     "abs(cx - kx) <= K / 2 && abs(cy - ky) <= K / 2   # NATTEN\n",
     "abs(min(max(q // 16, 3), 12) - kv // 16) <= 3 && "
     "abs(min(max(q % 16, 3), 12) - kv % 16) <= 3"},
    {FLEX_MOD_SCORE, "score + slopes[h] * (kv - q)", "score + slopes[h] * float(kv - q)"},
    {FLEX_MOD_SCORE, "30.0 * tanh(score / 30.0)", "30.0 * tanh(score / 30.0)"},
    {FLEX_MOD_SCORE, "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)",
     "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)"},
    {FLEX_MOD_MASK, "let img = img_of[kv]; q >= lo[img] && q < hi[img]",
     "let t_0 = img_of[kv];\nq >= lo[t_0] && q < hi[t_0]"},
    {FLEX_MOD_MASK, "let iv = intervals[img_of[kv]]; q >= iv[0] && q < iv[1]",
     "let t_0 = img_of[kv];\nq >= intervals[t_0, 0] && q < intervals[t_0, 1]"},
    {FLEX_MOD_SCORE, "cap * tanh(score / cap)", "30.0 * tanh(score / 30.0)"},
    /* the notebook's other patterns, written token for token */
    {FLEX_MOD_SCORE, "score", "score"},
    {FLEX_MOD_SCORE, "where(q_idx >= kv_idx, score, -inf)", "where(q >= kv, score, -inf)"},
    {FLEX_MOD_SCORE,
     "let s1 = where(abs(kv - q) % 1 == 0, score * 0.5, score);\n"
     "where(abs(kv - q) % 2 == 0, s1 * 2.0, s1)",
     "let t_0 = score * 0.5;\nwhere(abs(kv - q) % 2 == 0, t_0 * 2.0, t_0)"},
    {FLEX_MOD_MASK,
     "let causal = q_idx >= kv_idx; let windowed = q_idx - kv_idx <= W;\n"
     "causal & windowed",
     "q >= kv && q - kv <= 256"},
    {FLEX_MOD_MASK, "let prefix = kv_idx <= P; let causal = q_idx >= kv_idx; prefix | causal",
     "kv <= 64 || q >= kv"},
    {FLEX_MOD_MASK,
     "let qx = q // IW; let qy = q % IW; let kx = kv // IW; let ky = kv % IW;\n"
     "abs(qx - kx) <= K & abs(qy - ky) <= K  # SASA",
     "abs(q // 16 - kv // 16) <= 7 && abs(q % 16 - kv % 16) <= 7"},
    {FLEX_MOD_SCORE, "score + exp2(-((h + 1) * 8.0 / IH)) * (q - kv)",
     "score + exp2(-(float(h + 1) * 8.0 / 16.0)) * float(q - kv)"},
    {FLEX_MOD_SCORE, "let s = score / 2; let t = tanh_approx(s); t * 2",
     "tanh_approx(score / 2.0) * 2.0"},
    {FLEX_MOD_MASK,
     "let qn = q - lo[doc[q]]; let kn = kv - lo[doc[kv]];\n"
     "qn >= kn & doc[q] == doc[kv]",
     "let t_0 = doc[q];\nlet t_1 = doc[kv];\nq - lo[t_0] >= kv - lo[t_1] && t_0 == t_1"},
    {FLEX_MOD_MASK,
     "let image_idx = img_of[kv_idx];\nlet interval = intervals[image_idx];\n"
     "(q_idx >= interval[0]) & (q_idx < interval[1])",
     "let t_0 = img_of[kv];\nq >= intervals[t_0, 0] && q < intervals[t_0, 1]"},
};

START_TEST(test_seed_examples) {
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        flex_mod *m = compile_ok(seeds[i].kind, seeds[i].text);
        ck_assert_str_eq(m->canonical, seeds[i].canonical);
        ck_assert_int_eq(flex_mod_get_kind(m), seeds[i].kind);
        ck_assert_str_eq(flex_mod_canonical_text(m), m->canonical);
        ck_assert_uint_eq(flex_mod_hash(m), ir_hash(&m->ir, m->canonical));
        check_topological(m);
        check_round_trip(m);
        flex_mod_destroy(m);
    }
}
END_TEST

/* ---- every operator and function ---- */

static const struct {
    flex_mod_kind kind;
    const char *text;
    ir_op op; /* an op the IR must contain */
} ops[] = {
    {FLEX_MOD_SCORE, "score + float(q)", IR_ADD},
    {FLEX_MOD_SCORE, "score - 1.5", IR_SUB},
    {FLEX_MOD_SCORE, "score * 1.5", IR_MUL},
    {FLEX_MOD_SCORE, "score / 3.0", IR_DIV},
    {FLEX_MOD_SCORE, "score / q", IR_DIV},
    {FLEX_MOD_MASK, "q / 3 == kv", IR_FLOORDIV},
    {FLEX_MOD_MASK, "q // 3 == kv", IR_FLOORDIV},
    {FLEX_MOD_SCORE, "score // 2.0", IR_FLOORDIV},
    {FLEX_MOD_MASK, "q % 3 == 0", IR_MOD},
    {FLEX_MOD_SCORE, "score % 2.5", IR_MOD},
    {FLEX_MOD_SCORE, "-score", IR_NEG},
    {FLEX_MOD_MASK, "-q < kv", IR_NEG},
    {FLEX_MOD_MASK, "!(q < kv)", IR_NOT},
    {FLEX_MOD_MASK, "~(q < kv)", IR_NOT},
    {FLEX_MOD_MASK, "~q < kv", IR_BITNOT},
    {FLEX_MOD_MASK, "q == kv", IR_EQ},
    {FLEX_MOD_MASK, "q != kv", IR_NE},
    {FLEX_MOD_MASK, "q < kv", IR_LT},
    {FLEX_MOD_MASK, "q <= kv", IR_LE},
    {FLEX_MOD_MASK, "q > kv", IR_GT},
    {FLEX_MOD_MASK, "q >= kv", IR_GE},
    {FLEX_MOD_MASK, "q < kv && h == 0", IR_AND},
    {FLEX_MOD_MASK, "q < kv & h == 0", IR_AND},
    {FLEX_MOD_MASK, "(q & kv) == 0", IR_AND},
    {FLEX_MOD_MASK, "q < kv || h == 0", IR_OR},
    {FLEX_MOD_MASK, "q < kv | h == 0", IR_OR},
    {FLEX_MOD_MASK, "(q | kv) == 0", IR_OR},
    {FLEX_MOD_MASK, "q < kv ^ h == 0", IR_XOR},
    {FLEX_MOD_MASK, "(q ^ kv) == 0", IR_XOR},
    {FLEX_MOD_MASK, "q < kv ? h == 0 : b == 1", IR_SELECT},
    {FLEX_MOD_SCORE, "abs(score)", IR_ABS},
    {FLEX_MOD_MASK, "abs(q - kv) < 4", IR_ABS},
    {FLEX_MOD_MASK, "min(q, kv) == 0", IR_MIN},
    {FLEX_MOD_MASK, "max(q, kv) == 0", IR_MAX},
    {FLEX_MOD_SCORE, "min(score, 1.0)", IR_MIN},
    {FLEX_MOD_SCORE, "clamp(score, -1.0, 1)", IR_MIN},
    {FLEX_MOD_SCORE, "where(q >= kv, score, -inf)", IR_SELECT},
    {FLEX_MOD_SCORE, "exp(score)", IR_EXP},
    {FLEX_MOD_SCORE, "exp2(score)", IR_EXP2},
    {FLEX_MOD_SCORE, "log(score)", IR_LOG},
    {FLEX_MOD_SCORE, "log2(score)", IR_LOG2},
    {FLEX_MOD_SCORE, "sqrt(score)", IR_SQRT},
    {FLEX_MOD_SCORE, "rsqrt(score)", IR_RSQRT},
    {FLEX_MOD_SCORE, "pow(score, 2)", IR_POW},
    {FLEX_MOD_SCORE, "sin(score)", IR_SIN},
    {FLEX_MOD_SCORE, "cos(score)", IR_COS},
    {FLEX_MOD_SCORE, "tan(score)", IR_TAN},
    {FLEX_MOD_SCORE, "tanh(score)", IR_TANH},
    {FLEX_MOD_SCORE, "tanh_approx(score)", IR_TANH_APPROX},
    {FLEX_MOD_SCORE, "sigmoid(score)", IR_SIGMOID},
    {FLEX_MOD_SCORE, "floor(score)", IR_FLOOR},
    {FLEX_MOD_SCORE, "ceil(score)", IR_CEIL},
    {FLEX_MOD_SCORE, "float(q)", IR_TO_FLOAT},
    {FLEX_MOD_MASK, "int(sqrt(float(q))) == kv", IR_TO_INT},
    {FLEX_MOD_MASK, "int(q < kv) == 1", IR_TO_INT},
    {FLEX_MOD_MASK, "keep[kv]", IR_LOAD},
    {FLEX_MOD_SCORE, "score + bias[h][q - kv + 8]", IR_LOAD},
    {FLEX_MOD_SCORE, "score + bias[h, q - kv + 8]", IR_LOAD},
    {FLEX_MOD_MASK, "t0[q] == 1", IR_LOAD},
    {FLEX_MOD_MASK, "batch == 0 && head == 1 && q_idx >= kv_idx", IR_B},
    {FLEX_MOD_SCORE, "score * 2;", IR_MUL},
    {FLEX_MOD_SCORE, "score * .5e1 + 1e-3 + 2.", IR_MUL},
    {FLEX_MOD_MASK, "q - kv > -2147483648", IR_GT},
    {FLEX_MOD_MASK, "true ? q >= kv : false", IR_GE},
    {FLEX_MOD_MASK, "h == 0 ? q > kv : h == 1 ? q < kv : q == kv", IR_SELECT},
};

START_TEST(test_operators_and_functions) {
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        flex_mod *m = compile_ok(ops[i].kind, ops[i].text);
        ck_assert_msg(count_op(m, ops[i].op) > 0, "'%s' has no %s node (canonical '%s')",
                      ops[i].text, ir_op_name(ops[i].op), m->canonical);
        check_topological(m);
        check_round_trip(m);
        flex_mod_destroy(m);
    }
}
END_TEST

START_TEST(test_types_and_promotion) {
    /* int / int is floor division, a float operand makes it float division */
    flex_mod *m = compile_ok(FLEX_MOD_SCORE, "score + q / 2");
    ck_assert_int_eq(count_op(m, IR_FLOORDIV), 1);
    ck_assert_int_eq(count_op(m, IR_DIV), 0);
    flex_mod_destroy(m);
    m = compile_ok(FLEX_MOD_SCORE, "score + q / 2.0");
    ck_assert_int_eq(count_op(m, IR_DIV), 1);
    ck_assert_int_eq(count_op(m, IR_TO_FLOAT), 1);
    flex_mod_destroy(m);
    /* a score mod returning int is promoted to float */
    m = compile_ok(FLEX_MOD_SCORE, "q - kv");
    ck_assert_int_eq(m->ir.nodes[m->ir.root].op, IR_TO_FLOAT);
    ck_assert_int_eq(m->ir.nodes[m->ir.root].type, IR_FLOAT);
    flex_mod_destroy(m);
    /* bool & int is bitwise on ints */
    m = compile_ok(FLEX_MOD_MASK, "((q < kv) & 3) == 1");
    ck_assert_int_eq(count_op(m, IR_TO_INT), 1);
    flex_mod_destroy(m);
    /* the precedence of & is that of &&: a torch-style mask reads as meant */
    flex_mod *a = compile_ok(FLEX_MOD_MASK, "q >= kv & doc[q] == doc[kv]");
    flex_mod *b = compile_ok(FLEX_MOD_MASK, "(q >= kv) && (doc[q] == doc[kv])");
    ck_assert_str_eq(a->canonical, b->canonical);
    flex_mod_destroy(a);
    flex_mod_destroy(b);
    /* floor and ceil of an int are the int */
    m = compile_ok(FLEX_MOD_MASK, "floor(q) == ceil(kv)");
    ck_assert_str_eq(m->canonical, "q == kv");
    flex_mod_destroy(m);
    /* the types the IR records */
    m = compile_ok(FLEX_MOD_SCORE, "score + bias[h, q] + float(doc[q] + keep[kv])");
    for (int i = 0; i < m->ir.num_nodes; i++) {
        const ir_node *n = &m->ir.nodes[i];
        if (n->op == IR_LOAD)
            ck_assert_int_eq(n->type, ir_type_of_dtype(m->ir.buffers[n->buffer].dtype));
        for (int k = 0; k < n->nargs; k++) {
            const ir_node *arg = &m->ir.nodes[n->args[k]];
            if (n->op == IR_ADD) ck_assert_int_eq(arg->type, n->type);
        }
    }
    flex_mod_destroy(m);
}
END_TEST

START_TEST(test_sharing) {
    /* equal subexpressions are one node */
    flex_mod *m = compile_ok(FLEX_MOD_MASK, "doc[q] + doc[q] > doc[kv] + doc[q]");
    ck_assert_int_eq(count_op(m, IR_LOAD), 2);
    ck_assert_ptr_nonnull(strstr(m->canonical, "let t_0 = doc[q];"));
    check_round_trip(m);
    flex_mod_destroy(m);
    m = compile_ok(FLEX_MOD_MASK, "(q - kv) * (q - kv) < 100 && (q - kv) >= 0");
    ck_assert_int_eq(count_op(m, IR_SUB), 1);
    ck_assert_str_eq(m->canonical, "let t_0 = q - kv;\nt_0 * t_0 < 100 && t_0 >= 0");
    check_round_trip(m);
    flex_mod_destroy(m);
    /* lets are names, not copies */
    m = compile_ok(FLEX_MOD_MASK, "let d = q - kv; let e = q - kv; d * e < 10");
    ck_assert_int_eq(count_op(m, IR_SUB), 1);
    flex_mod_destroy(m);
    /* an unused let costs nothing */
    m = compile_ok(FLEX_MOD_MASK, "let unused = doc[q] * 7; q >= kv");
    ck_assert_int_eq(m->ir.num_nodes, 3);
    flex_mod_destroy(m);
}
END_TEST

START_TEST(test_equal_mods_equal_text) {
    static const char *const variants[] = {
        "q >= kv && q - kv <= W",
        "q>=kv&&q-kv<=256",
        "# sliding window\nlet d = q - kv;\n(q >= kv) && (d <= W);",
        "q_idx >= kv_idx && q_idx - kv_idx <= 256 # same thing",
        "q >= kv & q - kv <= 256",
    };
    flex_mod *first = compile_ok(FLEX_MOD_MASK, variants[0]);
    for (size_t i = 1; i < sizeof variants / sizeof variants[0]; i++) {
        flex_mod *m = compile_ok(FLEX_MOD_MASK, variants[i]);
        ck_assert_str_eq(m->canonical, first->canonical);
        ck_assert_uint_eq(m->hash, first->hash);
        flex_mod_destroy(m);
    }
    /* kind and buffer declarations take part in the hash */
    flex_mod_desc d = {FLEX_MOD_MASK, variants[0], test_params, NUM_TEST_PARAMS, NULL, 0};
    flex_mod *nobufs = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &nobufs), FLEX_OK);
    ck_assert_str_eq(nobufs->canonical, first->canonical);
    ck_assert_uint_ne(nobufs->hash, first->hash);
    flex_mod_destroy(nobufs);
    /* a different param value is a different mod */
    flex_param w = {"W", 0, 128};
    flex_mod_desc d2 = {FLEX_MOD_MASK, variants[0], &w, 1, test_buffers, NUM_TEST_BUFFERS};
    flex_mod *other = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &d2, &other), FLEX_OK);
    ck_assert_uint_ne(other->hash, first->hash);
    flex_mod_destroy(other);
    flex_mod_destroy(first);
}
END_TEST

START_TEST(test_canonical_floats) {
    static const char *const texts[] = {
        "score * 0.1",
        "score + 1e-30",
        "score * 3.4e38",
        "score - 1.17549435e-38 * 1e-7",
        "where(score > 0.0, score, -inf)",
        "score * -0.0",
        "score + 16777217.0",
        "score + 1.0 / 3.0",
        "score + (0.0 / 0.0)",
        "score * 2147483647",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        flex_mod *m = compile_ok(FLEX_MOD_SCORE, texts[i]);
        check_round_trip(m);
        /* and the constants survive the trip bit for bit */
        flex_mod_desc d = {FLEX_MOD_SCORE, m->canonical, NULL, 0, test_buffers, NUM_TEST_BUFFERS};
        flex_mod *again = NULL;
        ck_assert_int_eq(flex_mod_compile(NULL, &d, &again), FLEX_OK);
        ck_assert_int_eq(again->ir.num_nodes, m->ir.num_nodes);
        for (int k = 0; k < m->ir.num_nodes; k++) {
            const ir_node *x = &m->ir.nodes[k], *y = &again->ir.nodes[k];
            ck_assert_int_eq(x->op, y->op);
            if (x->op == IR_CONST && x->imm.f == x->imm.f)
                ck_assert_msg(memcmp(&x->imm, &y->imm, sizeof x->imm) == 0,
                              "constant of '%s' changed on the trip", texts[i]);
        }
        flex_mod_destroy(again);
        flex_mod_destroy(m);
    }
}
END_TEST

/* ---- errors ---- */

static const struct {
    flex_mod_kind kind;
    const char *text;
    flex_status status;
    int line, col;
    const char *message; /* a substring */
    const char *caret;   /* the last line */
} bad[] = {
    {FLEX_MOD_MASK, "q >= kvv", FLEX_ERR_MOD_NAME, 1, 6, "unknown name 'kvv'; did you mean 'kv'?",
     "     ^~~"},
    {FLEX_MOD_MASK, "q >= kv &&\n  doc[q] == doc[kv] +", FLEX_ERR_MOD_SYNTAX, 2, 22,
     "expected an expression, found end of input", "                     ^"},
    {FLEX_MOD_MASK, "(q >= kv", FLEX_ERR_MOD_SYNTAX, 1, 9,
     "expected ')' to close the '(' at 1:1, found end of input", "        ^"},
    {FLEX_MOD_MASK, "q >= kv)", FLEX_ERR_MOD_SYNTAX, 1, 8, "unmatched ')'", "       ^"},
    {FLEX_MOD_MASK, "q >= kv &&\n  doc[q] = doc[kv]", FLEX_ERR_MOD_SYNTAX, 2, 10,
     "unexpected '='; use '=='", "         ^"},
    {FLEX_MOD_SCORE, "score ** 2", FLEX_ERR_MOD_SYNTAX, 1, 7, "'**' is not an operator",
     "      ^~"},
    {FLEX_MOD_MASK, "q >= kv and q < 5", FLEX_ERR_MOD_SYNTAX, 1, 9, "unexpected 'and'; write '&&'",
     "        ^~~"},
    {FLEX_MOD_MASK, "not q < 5", FLEX_ERR_MOD_NAME, 1, 1, "write '!'", "^~~"},
    {FLEX_MOD_SCORE, "score.exp()", FLEX_ERR_MOD_SYNTAX, 1, 6, "there are no methods", "     ^"},
    {FLEX_MOD_MASK, "doc[\"q\"] > 0", FLEX_ERR_MOD_SYNTAX, 1, 5, "no strings", "    ^"},
    {FLEX_MOD_MASK, "max(q, kv,) > 0", FLEX_ERR_MOD_SYNTAX, 1, 11, "no trailing commas",
     "          ^"},
    {FLEX_MOD_MASK, "q >= kv; q < 5", FLEX_ERR_MOD_SYNTAX, 1, 10, "the result, which comes last",
     "         ^"},
    {FLEX_MOD_MASK, "h[0] == 1", FLEX_ERR_MOD_TYPE, 1, 2,
     "only buffers can be indexed; this is an int value", " ^"},
    {FLEX_MOD_MASK, "score > 0", FLEX_ERR_MOD_NAME, 1, 1, "'score' is only available in score mods",
     "^~~~~"},
    {FLEX_MOD_MASK, "q + kv", FLEX_ERR_MOD_TYPE, 1, 1, "a mask mod must return bool", "^~~~~~"},
    {FLEX_MOD_SCORE, "q > kv", FLEX_ERR_MOD_TYPE, 1, 1, "a score mod must return a float",
     "^~~~~~"},
    {FLEX_MOD_MASK, "q @ kv", FLEX_ERR_MOD_SYNTAX, 1, 3, "unexpected character '@'", "  ^"},
    {FLEX_MOD_MASK, "3000000000 > q", FLEX_ERR_MOD_SYNTAX, 1, 1, "does not fit in a 32-bit int",
     "^~~~~~~~~~"},
    {FLEX_MOD_MASK, "let q = 3; q > 0", FLEX_ERR_MOD_NAME, 1, 5, "'q' is a variable", "    ^"},
    {FLEX_MOD_MASK, "let doc = 3; q > 0", FLEX_ERR_MOD_NAME, 1, 5, "'doc' is a buffer", "    ^~~"},
    {FLEX_MOD_MASK, "let W = 3; q > 0", FLEX_ERR_MOD_NAME, 1, 5, "'W' is a param", "    ^"},
    {FLEX_MOD_MASK, "let exp = 3; q > 0", FLEX_ERR_MOD_NAME, 1, 5, "'exp' is a function",
     "    ^~~"},
    {FLEX_MOD_MASK, "let a = 1; let a = 2; q > a", FLEX_ERR_MOD_NAME, 1, 16,
     "'a' is already bound by the let at 1:5", "               ^"},
    {FLEX_MOD_MASK, "let true = 1; q > 0", FLEX_ERR_MOD_SYNTAX, 1, 5, "reserved word", "    ^~~~"},
    {FLEX_MOD_MASK, "let 3 = q; q > 0", FLEX_ERR_MOD_SYNTAX, 1, 5,
     "expected a name after 'let', found '3'", "    ^"},
    {FLEX_MOD_MASK, "let d q - kv; d > 0", FLEX_ERR_MOD_SYNTAX, 1, 7,
     "expected '=' after 'let d', found 'q'", "      ^"},
    {FLEX_MOD_MASK, "let d = q - kv d > 0", FLEX_ERR_MOD_SYNTAX, 1, 16,
     "expected ';' to end the binding of 'd', found 'd'", "               ^"},
    {FLEX_MOD_MASK, "let d = q - kv;", FLEX_ERR_MOD_SYNTAX, 1, 16,
     "expected the result expression after the let bindings", "               ^"},
    {FLEX_MOD_MASK, "", FLEX_ERR_MOD_SYNTAX, 1, 1, "the mod is empty", "^"},
    {FLEX_MOD_MASK, "   # only a comment\n", FLEX_ERR_MOD_SYNTAX, 1, 1, "the mod is empty", "^"},
    {FLEX_MOD_MASK, "q >= kv kv", FLEX_ERR_MOD_SYNTAX, 1, 9,
     "expected an operator or end of input after the expression, found 'kv'", "        ^~"},
    {FLEX_MOD_MASK, "q = kv", FLEX_ERR_MOD_SYNTAX, 1, 3, "use '==' to compare", "  ^"},
    {FLEX_MOD_MASK, "0 <= q < 10", FLEX_ERR_MOD_SYNTAX, 1, 8, "comparisons cannot be chained",
     "       ^"},
    {FLEX_MOD_MASK, "q >= kv && 1", FLEX_ERR_MOD_TYPE, 1, 9,
     "operator '&&' needs bool operands, got bool and int", "        ^~"},
    {FLEX_MOD_MASK, "q || kv", FLEX_ERR_MOD_TYPE, 1, 3,
     "operator '||' needs bool operands, got int and int (use '|'", "  ^~"},
    /* an int flag beside a bool: '|' would not help (its int result is no
     * mask), comparing with 0 does */
    {FLEX_MOD_MASK, "doc[q] || q >= kv", FLEX_ERR_MOD_TYPE, 1, 8,
     "got int and bool (compare the int with 0: 'doc[q] != 0')", "       ^~"},
    {FLEX_MOD_MASK, "q >= kv && (q % 2)", FLEX_ERR_MOD_TYPE, 1, 9,
     "got bool and int (compare the int with 0: '(q % 2) != 0')", "        ^~"},
    {FLEX_MOD_SCORE, "score & 1", FLEX_ERR_MOD_TYPE, 1, 7,
     "operator '&' needs bool or int operands, got float and int", "      ^"},
    {FLEX_MOD_MASK, "-(q < kv)", FLEX_ERR_MOD_TYPE, 1, 1, "operator '-' cannot negate a bool", "^"},
    {FLEX_MOD_MASK, "!q", FLEX_ERR_MOD_TYPE, 1, 1, "operator '!' needs a bool operand, got int",
     "^"},
    {FLEX_MOD_SCORE, "~score", FLEX_ERR_MOD_TYPE, 1, 1,
     "operator '~' needs a bool or int operand, got float", "^"},
    {FLEX_MOD_MASK, "min(q, kv, 1) > 0", FLEX_ERR_MOD_TYPE, 1, 1,
     "function 'min' takes 2 arguments (min(a, b)), got 3", "^~~~~~~~~~~~~"},
    {FLEX_MOD_SCORE, "clamp(score, 1.0)", FLEX_ERR_MOD_TYPE, 1, 1,
     "function 'clamp' takes 3 arguments", "^~~~~~~~~~~~~~~~~"},
    {FLEX_MOD_SCORE, "exp()", FLEX_ERR_MOD_TYPE, 1, 1, "function 'exp' takes 1 argument", "^~~~~"},
    {FLEX_MOD_SCORE, "exp + score", FLEX_ERR_MOD_TYPE, 1, 1, "function 'exp' must be called",
     "^~~"},
    {FLEX_MOD_SCORE, "score(1)", FLEX_ERR_MOD_TYPE, 1, 1, "only functions can be called", "^~~~~"},
    {FLEX_MOD_MASK, "doc > 0", FLEX_ERR_MOD_TYPE, 1, 1,
     "buffer 'doc' has 1 dimension and must be indexed", "^~~"},
    {FLEX_MOD_MASK, "intervals[q] > 0", FLEX_ERR_MOD_TYPE, 1, 1,
     "buffer 'intervals' has 2 dimensions but is indexed with 1 index", "^~~~~~~~~~~~"},
    {FLEX_MOD_MASK, "doc[q, kv] > 0", FLEX_ERR_MOD_TYPE, 1, 8,
     "buffer 'doc' has 1 dimension, so it takes 1 index; this is index 2", "       ^~"},
    {FLEX_MOD_MASK, "doc[q][kv] > 0", FLEX_ERR_MOD_TYPE, 1, 7,
     "buffer 'doc' has 1 dimension, so it takes 1 index; this is index 2", "      ^"},
    {FLEX_MOD_MASK, "let x = doc[q]; x[kv] > 0", FLEX_ERR_MOD_TYPE, 1, 18,
     "only buffers can be indexed", "                 ^"},
    {FLEX_MOD_SCORE, "score + slopes[1.5]", FLEX_ERR_MOD_TYPE, 1, 16,
     "index 1 of buffer 'slopes' must be an int, got float", "               ^~~"},
    {FLEX_MOD_MASK, "doc[q > 0", FLEX_ERR_MOD_SYNTAX, 1, 10, "expected ',' or ']'", "         ^"},
    {FLEX_MOD_MASK, "max(q, kv > 0", FLEX_ERR_MOD_SYNTAX, 1, 14,
     "expected ',' or ')' in the call of 'max'", "             ^"},
    {FLEX_MOD_MASK, "q > kv ? true", FLEX_ERR_MOD_SYNTAX, 1, 14,
     "expected ':' to go with the '?' at 1:8", "             ^"},
    {FLEX_MOD_MASK, "q ? true : false", FLEX_ERR_MOD_TYPE, 1, 1,
     "the condition of '?:' must be bool, got int", "^"},
    {FLEX_MOD_SCORE, "where(q, score, 0.0)", FLEX_ERR_MOD_TYPE, 1, 7,
     "the condition of 'where' must be bool, got int", "      ^"},
    {FLEX_MOD_SCORE, "score * 1e39", FLEX_ERR_MOD_SYNTAX, 1, 9, "too large for a 32-bit float",
     "        ^~~~"},
    {FLEX_MOD_SCORE, "score * 1e", FLEX_ERR_MOD_SYNTAX, 1, 9, "malformed number", "        ^~"},
    {FLEX_MOD_SCORE, "score * 3q", FLEX_ERR_MOD_SYNTAX, 1, 9, "malformed number '3q'",
     "        ^~"},
    {FLEX_MOD_MASK, "q >= let", FLEX_ERR_MOD_SYNTAX, 1, 6, "'let' can only start a binding",
     "     ^~~"},
    {FLEX_MOD_MASK, "\tq >= kvv", FLEX_ERR_MOD_NAME, 1, 7, "did you mean 'kv'?", "\t     ^~~"},
    {FLEX_MOD_MASK, "q >= kv &&\n\n   zzz_unknown[q]", FLEX_ERR_MOD_NAME, 3, 4,
     "unknown name 'zzz_unknown'", "   ^~~~~~~~~~~"},
};

START_TEST(test_bad_inputs) {
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        flex_mod *m = (flex_mod *)&m; /* must be reset to NULL */
        flex_status st = compile(bad[i].kind, bad[i].text, &m);
        const char *msg = flex_error_message(NULL);
        ck_assert_msg(st == bad[i].status, "'%s': status %s, expected %s; message: %s", bad[i].text,
                      flex_status_name(st), flex_status_name(bad[i].status), msg);
        ck_assert_ptr_null(m);
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%d:%d: error: ", bad[i].line, bad[i].col);
        ck_assert_msg(strncmp(msg, prefix, strlen(prefix)) == 0,
                      "'%s': message '%s' should start '%s'", bad[i].text, msg, prefix);
        ck_assert_msg(strstr(msg, bad[i].message) != NULL, "'%s': message '%s' lacks '%s'",
                      bad[i].text, msg, bad[i].message);
        const char *last = strrchr(msg, '\n');
        ck_assert_ptr_nonnull(last);
        ck_assert_msg(strcmp(last + 1, bad[i].caret) == 0, "'%s': caret line '%s', expected '%s'",
                      bad[i].text, last + 1, bad[i].caret);
        /* the line before the caret is the source line */
        const char *line_start = msg;
        const char *first_nl = strchr(msg, '\n');
        ck_assert_ptr_nonnull(first_nl);
        line_start = first_nl + 1;
        size_t src_len = (size_t)(last - line_start);
        int line = 1;
        const char *src = bad[i].text;
        while (line < bad[i].line) {
            src = strchr(src, '\n') + 1;
            line++;
        }
        ck_assert_msg(strncmp(line_start, src, src_len) == 0, "'%s': source line not quoted",
                      bad[i].text);
    }
}
END_TEST

START_TEST(test_suggestions) {
    static const struct {
        flex_mod_kind kind;
        const char *text, *suggestion;
    } cases[] = {
        {FLEX_MOD_SCORE, "scroe * 2.0", "'score'"},
        {FLEX_MOD_MASK, "dco[q] == 0", "'doc'"},
        {FLEX_MOD_SCORE, "sqr(score)", "'sqrt'"},
        {FLEX_MOD_MASK, "Q >= kv", "'q'"},
        {FLEX_MOD_MASK, "q - kv <= WW", "'W'"},
        {FLEX_MOD_MASK, "let window = 3; q - kv <= windw", "'window'"},
        {FLEX_MOD_MASK, "q_id >= kv", "'q_idx'"},
        {FLEX_MOD_MASK, "q >= kv && ture", "'true'"},
        {FLEX_MOD_SCORE, "score + slope[h]", "'slopes'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        flex_mod *m = NULL;
        ck_assert_int_eq(compile(cases[i].kind, cases[i].text, &m), FLEX_ERR_MOD_NAME);
        char want[64];
        snprintf(want, sizeof want, "did you mean %s?", cases[i].suggestion);
        ck_assert_msg(strstr(flex_error_message(NULL), want) != NULL, "'%s': '%s' lacks %s",
                      cases[i].text, flex_error_message(NULL), want);
    }
    /* nothing close: no suggestion; score is never suggested in a mask mod */
    flex_mod *m = NULL;
    ck_assert_int_eq(compile(FLEX_MOD_MASK, "completely_unrelated > 0", &m), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_null(strstr(flex_error_message(NULL), "did you mean"));
    ck_assert_int_eq(compile(FLEX_MOD_MASK, "scor > 0", &m), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_null(strstr(flex_error_message(NULL), "'score'"));
}
END_TEST

START_TEST(test_bad_descriptions) {
    flex_mod *m = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, NULL, &m), FLEX_ERR_NULL_POINTER);
    flex_mod_desc d = {FLEX_MOD_MASK, NULL, NULL, 0, NULL, 0};
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_ERR_NULL_POINTER);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "text"));
    d.text = "q >= kv";
    ck_assert_int_eq(flex_mod_compile(NULL, &d, NULL), FLEX_ERR_NULL_POINTER);
    d.kind = (flex_mod_kind)7;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_ERR_INVALID_ARGUMENT);
    d.kind = FLEX_MOD_MASK;
    d.num_params = -1;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "num_params"));
    d.num_params = 1;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &m), FLEX_ERR_NULL_POINTER);

    static const struct {
        flex_param param;
        const char *words;
    } params[] = {
        {{"W", 0, 2.5}, "'W'"},
        {{"W", 0, 3e9}, "'W'"},
        {{"q", 0, 1}, "variable"},
        {{"exp", 1, 1}, "function"},
        {{"inf", 1, 1}, "reserved"},
        {{"9x", 0, 1}, "valid name"},
        {{"big", 1, 1e300}, "32-bit float"},
    };
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        flex_mod_desc pd = {FLEX_MOD_MASK, "q >= kv", &params[i].param, 1, NULL, 0};
        ck_assert_int_eq(flex_mod_compile(NULL, &pd, &m), FLEX_ERR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(flex_error_message(NULL), params[i].words) != NULL, "%s",
                      flex_error_message(NULL));
    }
    flex_param null_name = {NULL, 0, 1};
    flex_mod_desc pd = {FLEX_MOD_MASK, "q >= kv", &null_name, 1, NULL, 0};
    ck_assert_int_eq(flex_mod_compile(NULL, &pd, &m), FLEX_ERR_NULL_POINTER);

    flex_param w = {"doc", 0, 1};
    flex_buffer_decl clash = {"doc", FLEX_I32, 1};
    flex_mod_desc cd = {FLEX_MOD_MASK, "q >= kv", &w, 1, &clash, 1};
    ck_assert_int_eq(flex_mod_compile(NULL, &cd, &m), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "doc"));
    flex_buffer_decl twice[2] = {{"doc", FLEX_I32, 1}, {"doc", FLEX_I32, 1}};
    flex_mod_desc td = {FLEX_MOD_MASK, "q >= kv", NULL, 0, twice, 2};
    ck_assert_int_eq(flex_mod_compile(NULL, &td, &m), FLEX_ERR_INVALID_ARGUMENT);
    flex_buffer_decl five = {"x", FLEX_I32, 5};
    flex_mod_desc fd = {FLEX_MOD_MASK, "q >= kv", NULL, 0, &five, 1};
    ck_assert_int_eq(flex_mod_compile(NULL, &fd, &m), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "ndim"));
    flex_buffer_decl b_name = {"kv", FLEX_I32, 1};
    flex_mod_desc bd = {FLEX_MOD_MASK, "q >= 0", NULL, 0, &b_name, 1};
    ck_assert_int_eq(flex_mod_compile(NULL, &bd, &m), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(m);
}
END_TEST

START_TEST(test_limits) {
    /* deep nesting is an error, not a crash */
    size_t n = 5000;
    char *text = malloc(2 * n + 16);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        text[k++] = '(';
    text[k++] = 'q';
    for (size_t i = 0; i < n; i++)
        text[k++] = ')';
    strcpy(text + k, " >= kv");
    flex_mod *m = NULL;
    ck_assert_int_eq(compile(FLEX_MOD_MASK, text, &m), FLEX_ERR_MOD_SYNTAX);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "nested too deeply"));
    free(text);
    /* so is a mod with too many nodes */
    size_t cap = 20 * 6000;
    text = malloc(cap);
    k = 0;
    k += (size_t)snprintf(text + k, cap - k, "q");
    for (int i = 0; i < 6000; i++)
        k += (size_t)snprintf(text + k, cap - k, " + doc[%d]", i);
    snprintf(text + k, cap - k, " > kv");
    ck_assert_int_eq(compile(FLEX_MOD_MASK, text, &m), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "too large"));
    free(text);
    /* a long but legal mod works and round-trips */
    text = malloc(cap);
    k = 0;
    k += (size_t)snprintf(text + k, cap - k, "q");
    for (int i = 0; i < 500; i++)
        k += (size_t)snprintf(text + k, cap - k, " + doc[q + %d]", i);
    snprintf(text + k, cap - k, " > kv");
    m = compile_ok(FLEX_MOD_MASK, text);
    check_round_trip(m);
    flex_mod_destroy(m);
    free(text);
}
END_TEST

/* ---- the flex_mod API ---- */

START_TEST(test_bind_buffer) {
    flex_mod *m = compile_ok(FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]");
    int32_t data[8] = {0};
    int64_t size = 8;
    flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, 1, &size, FLEX_DEVICE_CPU);
    uint64_t gen = m->binding_generation;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &t), FLEX_OK);
    ck_assert_uint_gt(m->binding_generation, gen);
    gen = m->binding_generation;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &t), FLEX_OK);
    ck_assert_uint_gt(m->binding_generation, gen);

    /* generations are unique across mods */
    flex_mod *other = compile_ok(FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]");
    ck_assert_uint_ne(other->binding_generation, m->binding_generation);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, other, "doc", &t), FLEX_OK);
    ck_assert_uint_ne(other->binding_generation, m->binding_generation);
    flex_mod_destroy(other);

    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "dox", &t), FLEX_ERR_MOD_NAME);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "did you mean 'doc'?"));
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, NULL, &t), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", NULL), FLEX_ERR_NULL_POINTER);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, NULL, "doc", &t), FLEX_ERR_NULL_POINTER);

    flex_tensor wrong = t;
    wrong.dtype = FLEX_I64;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &wrong), FLEX_ERR_DTYPE);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "i32"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "i64"));
    wrong = t;
    wrong.ndim = 2;
    wrong.sizes[1] = 1;
    wrong.strides[1] = 1;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &wrong), FLEX_ERR_SHAPE);
    wrong = t;
    wrong.sizes[0] = 0;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &wrong), FLEX_ERR_SHAPE);
    wrong = t;
    wrong.device = FLEX_DEVICE_CUDA;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &wrong), FLEX_ERR_INVALID_ARGUMENT);
    wrong = t;
    wrong.data = NULL;
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &wrong), FLEX_ERR_NULL_POINTER);
    flex_mod_destroy(m);
}
END_TEST

START_TEST(test_host_views) {
    flex_mod *m = compile_ok(FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]");
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    ck_assert_int_eq(flex_mod_host_views(NULL, m, views, copies), FLEX_ERR_BUFFER_UNBOUND);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "'doc'"));
    int32_t data[6] = {0, 0, 1, 1, 2, 2};
    int64_t size = 6;
    flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, 1, &size, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, m, "doc", &t), FLEX_OK);
    /* buffers the mod never reads need no data */
    ck_assert_int_eq(flex_mod_host_views(NULL, m, views, copies), FLEX_OK);
    ck_assert_ptr_eq(views[0].data, data);
    ck_assert_int_eq(views[0].sizes[0], 6);
    ck_assert_int_eq(views[0].strides[0], 1);
    ck_assert_int_eq(views[0].dtype, FLEX_I32);
    for (int i = 0; i < IR_MAX_BUFFERS; i++)
        ck_assert_ptr_null(copies[i]);
    flex_mod_release_host_views(copies);

    /* the views evaluate */
    ir_value scratch[64], r;
    mod_bounds_error err = {0};
    ck_assert_int_eq(mod_eval_point(&m->ir, views, 0, 0, 0, 3, 2, scratch, &r, &err), 0);
    ck_assert_int_eq(r.i, 1);
    ck_assert_int_eq(mod_eval_point(&m->ir, views, 0, 0, 0, 3, 1, scratch, &r, &err), 0);
    ck_assert_int_eq(r.i, 0);
    ck_assert_int_eq(mod_eval_point(&m->ir, views, 0, 0, 0, 7, 1, scratch, &r, &err), -1);
    ck_assert_int_eq(err.set, 1);
    ck_assert_int_eq(err.index, 7);
    ck_assert_int_eq(flex_fail_bounds(NULL, m, &err), FLEX_ERR_BUFFER_BOUNDS);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "'doc'"));
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "q=7"));
    flex_mod_destroy(m);
}
END_TEST

/* A stand-in device backend: its "device memory" is host memory, and it
 * counts the downloads host views make. */
static int fake_downloads;
static size_t fake_download_bytes;

static flex_status fake_download(flex_context *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    fake_downloads++;
    fake_download_bytes = bytes;
    memcpy(dst, src, bytes);
    return FLEX_OK;
}

START_TEST(test_device_buffers) {
    flex_backend_iface fake;
    memset(&fake, 0, sizeof fake);
    fake.abi_version = FLEX_BACKEND_ABI_VERSION;
    fake.name = "fake-gpu";
    fake.device_type = FLEX_DEVICE_CUDA;
    fake.download = fake_download;
    flex_context ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.backend = &fake;

    flex_mod *m = compile_ok(FLEX_MOD_SCORE, "score + float(intervals[q, kv])");
    /* a 3 x 2 view with row stride 5 over 15 "device" elements */
    int32_t device[15];
    for (int i = 0; i < 15; i++)
        device[i] = 100 + i;
    flex_tensor t;
    memset(&t, 0, sizeof t);
    t.data = device;
    t.dtype = FLEX_I32;
    t.ndim = 2;
    t.sizes[0] = 3;
    t.sizes[1] = 2;
    t.strides[0] = 5;
    t.strides[1] = 1;
    t.device = FLEX_DEVICE_CUDA;
    ck_assert_int_eq(flex_mod_bind_buffer(&ctx, m, "intervals", &t), FLEX_OK);
    t.device = FLEX_DEVICE_HIP;
    ck_assert_int_eq(flex_mod_bind_buffer(&ctx, m, "intervals", &t), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&ctx), "fake-gpu"));
    t.device = FLEX_DEVICE_CUDA;
    t.device_index = 1;
    ck_assert_int_eq(flex_mod_bind_buffer(&ctx, m, "intervals", &t), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(flex_error_message(&ctx), "device 1"));
    t.device_index = 0;

    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    fake_downloads = 0;
    ck_assert_int_eq(flex_mod_host_views(&ctx, m, views, copies), FLEX_OK);
    ck_assert_int_eq(fake_downloads, 1);
    ck_assert_uint_eq(fake_download_bytes, (2 * 5 + 1 + 1) * sizeof(int32_t));
    ck_assert_ptr_nonnull(copies[5]);
    ck_assert_ptr_eq(views[5].data, copies[5]);
    ck_assert_ptr_ne(views[5].data, device);
    ir_value scratch[32], r;
    mod_bounds_error err = {0};
    ck_assert_int_eq(mod_eval_point(&m->ir, views, 0.5f, 0, 0, 2, 1, scratch, &r, &err), 0);
    ck_assert(r.f == 0.5f + 111.0f);
    flex_mod_release_host_views(copies);
    for (int i = 0; i < IR_MAX_BUFFERS; i++)
        ck_assert_ptr_null(copies[i]);
    /* a view of another device cannot be read through this context */
    ck_assert_int_eq(flex_mod_host_views(NULL, m, views, copies), FLEX_ERR_INVALID_ARGUMENT);
    flex_mod_destroy(m);
    flex_clear_error(&ctx);
}
END_TEST

START_TEST(test_and_or) {
    flex_mod *causal = compile_ok(FLEX_MOD_MASK, "q >= kv");
    flex_mod *doc = compile_ok(FLEX_MOD_MASK, "doc[q] == doc[kv]");
    flex_mod *both = NULL, *either = NULL;
    ck_assert_int_eq(flex_mod_and(NULL, causal, doc, &both), FLEX_OK);
    ck_assert_int_eq(flex_mod_or(NULL, causal, doc, &either), FLEX_OK);
    flex_mod *direct = compile_ok(FLEX_MOD_MASK, "q >= kv && doc[q] == doc[kv]");
    ck_assert_str_eq(both->canonical, direct->canonical);
    ck_assert_uint_eq(both->hash, direct->hash);
    ck_assert_str_eq(either->canonical, "q >= kv || doc[q] == doc[kv]");
    check_round_trip(both);
    check_topological(both);
    flex_mod_destroy(direct);
    flex_mod_destroy(either);

    /* shared nodes stay shared; a && a folds to a */
    flex_mod *self = NULL;
    ck_assert_int_eq(flex_mod_and(NULL, doc, doc, &self), FLEX_OK);
    ck_assert_str_eq(self->canonical, doc->canonical);
    ck_assert_int_eq(count_op(self, IR_LOAD), 2);
    flex_mod_destroy(self);

    /* bindings are carried over */
    int32_t data[4] = {0, 0, 1, 1};
    int64_t size = 4;
    flex_tensor t = flex_tensor_contiguous(data, FLEX_I32, 1, &size, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, doc, "doc", &t), FLEX_OK);
    flex_mod *bound = NULL;
    ck_assert_int_eq(flex_mod_and(NULL, causal, doc, &bound), FLEX_OK);
    mod_buffer_view views[IR_MAX_BUFFERS];
    void *copies[IR_MAX_BUFFERS];
    ck_assert_int_eq(flex_mod_host_views(NULL, bound, views, copies), FLEX_OK);
    int di = -1;
    for (int i = 0; i < bound->ir.num_buffers; i++)
        if (strcmp(bound->ir.buffers[i].name, "doc") == 0) di = i;
    ck_assert_int_ge(di, 0);
    ck_assert_ptr_eq(views[di].data, data);
    flex_mod_release_host_views(copies);

    /* the same buffer bound to other data in the two mods is refused */
    flex_mod *doc2 = compile_ok(FLEX_MOD_MASK, "doc[q] != 0");
    int32_t other[4] = {0};
    flex_tensor t2 = flex_tensor_contiguous(other, FLEX_I32, 1, &size, FLEX_DEVICE_CPU);
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, doc2, "doc", &t2), FLEX_OK);
    flex_mod *clash = NULL;
    ck_assert_int_eq(flex_mod_and(NULL, doc, doc2, &clash), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(clash);
    ck_assert_ptr_nonnull(strstr(flex_error_message(NULL), "'doc'"));
    ck_assert_int_eq(flex_mod_bind_buffer(NULL, doc2, "doc", &t), FLEX_OK);
    ck_assert_int_eq(flex_mod_or(NULL, doc, doc2, &clash), FLEX_OK);
    flex_mod_destroy(clash);

    /* buffers of the same name must have the same declaration */
    flex_buffer_decl other_doc = {"doc", FLEX_I64, 1};
    flex_mod_desc d = {FLEX_MOD_MASK, "doc[kv] > 0", NULL, 0, &other_doc, 1};
    flex_mod *doc64 = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &d, &doc64), FLEX_OK);
    ck_assert_int_eq(flex_mod_and(NULL, doc, doc64, &clash), FLEX_ERR_INVALID_ARGUMENT);
    flex_mod_destroy(doc64);

    /* buffers only one side has are added */
    flex_buffer_decl extra = {"window", FLEX_I32, 1};
    flex_mod_desc ed = {FLEX_MOD_MASK, "q - kv <= window[h]", NULL, 0, &extra, 1};
    flex_mod *win = NULL;
    ck_assert_int_eq(flex_mod_compile(NULL, &ed, &win), FLEX_OK);
    flex_mod *combined = NULL;
    ck_assert_int_eq(flex_mod_and(NULL, causal, win, &combined), FLEX_OK);
    ck_assert_int_eq(combined->ir.num_buffers, NUM_TEST_BUFFERS + 1);
    ck_assert_str_eq(combined->canonical, "q >= kv && q - kv <= window[h]");
    flex_mod_destroy(combined);
    flex_mod_destroy(win);

    /* score mods do not combine */
    flex_mod *score = compile_ok(FLEX_MOD_SCORE, "score * 2.0");
    ck_assert_int_eq(flex_mod_and(NULL, causal, score, &clash), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_mod_or(NULL, score, causal, &clash), FLEX_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(flex_mod_or(NULL, NULL, causal, &clash), FLEX_ERR_NULL_POINTER);
    flex_mod_destroy(score);

    flex_mod_destroy(doc2);
    flex_mod_destroy(bound);
    flex_mod_destroy(both);
    flex_mod_destroy(causal);
    flex_mod_destroy(doc);
}
END_TEST

START_TEST(test_parse_direct) {
    /* mod_parse itself: the IR is folded and compact, errors leave it freed */
    flex_mod_desc d = {FLEX_MOD_MASK, "q >= kv && (1 + 2 == 3)", NULL, 0, NULL, 0};
    ir_mod m;
    char err[256];
    ck_assert_int_eq(mod_parse(&d, &m, err, sizeof err), FLEX_OK);
    ck_assert_int_eq(m.num_nodes, 3);
    ck_assert_int_eq(m.nodes[m.root].op, IR_GE);
    ir_free(&m);
    d.text = "q >= ";
    ck_assert_int_eq(mod_parse(&d, &m, err, sizeof err), FLEX_ERR_MOD_SYNTAX);
    ck_assert_ptr_null(m.nodes);
    ck_assert_ptr_nonnull(strstr(err, "1:5: error:"));
    /* a tiny error buffer truncates but never overflows */
    char tiny[8];
    ck_assert_int_eq(mod_parse(&d, &m, tiny, sizeof tiny), FLEX_ERR_MOD_SYNTAX);
    ck_assert_int_eq(strlen(tiny), 7);
}
END_TEST

static Suite *mod_parse_suite(void) {
    Suite *s = suite_create("mod_parse");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, test_seed_examples);
    tcase_add_test(tc, test_operators_and_functions);
    tcase_add_test(tc, test_types_and_promotion);
    tcase_add_test(tc, test_sharing);
    tcase_add_test(tc, test_equal_mods_equal_text);
    tcase_add_test(tc, test_canonical_floats);
    tcase_add_test(tc, test_bad_inputs);
    tcase_add_test(tc, test_suggestions);
    tcase_add_test(tc, test_bad_descriptions);
    tcase_add_test(tc, test_limits);
    tcase_add_test(tc, test_parse_direct);
    suite_add_tcase(s, tc);
    TCase *api = tcase_create("api");
    tcase_add_test(api, test_bind_buffer);
    tcase_add_test(api, test_host_views);
    tcase_add_test(api, test_device_buffers);
    tcase_add_test(api, test_and_or);
    suite_add_tcase(s, api);
    return s;
}

int main(void) {
    SRunner *sr = srunner_create(mod_parse_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
