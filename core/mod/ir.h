/*
 * The typed IR of a mod: the one representation every consumer reads (the
 * interpreters, interval analysis, the code emitters, the derivative).
 *
 * A mod is a DAG stored as an array of nodes in topological order: every
 * argument index is smaller than the index of the node that uses it, so
 * any consumer evaluates a mod with one forward pass over `nodes`. Equal
 * subexpressions are one node (hash-consed by ir_add), so a consumer never
 * computes the same value twice. After compilation the array holds only
 * nodes reachable from `root` (ir_compact).
 */
#ifndef FLEXATTN_MOD_IR_H
#define FLEXATTN_MOD_IR_H

#include <math.h>
#include <stdint.h>
#include <stddef.h>

#include "flexattn.h"

typedef enum ir_type { IR_BOOL = 0, IR_INT = 1, IR_FLOAT = 2 } ir_type;

/*
 * Semantics (PyTorch's wherever C differs; `int` is 32-bit two's complement
 * and wraps on overflow, never undefined behaviour):
 *   IR_DIV       float / float (ints are converted by the parser first)
 *   IR_FLOORDIV  int: floor(a / b); float: floor(a / b). int x // 0 == 0.
 *   IR_MOD       result has the divisor's sign (Python / torch.remainder);
 *                int x % 0 == 0; float uses fmod then adjusts the sign.
 *   IR_AND/OR/XOR  logical on bools, bitwise on ints (both args same type)
 *   IR_NOT       bool only; IR_BITNOT int only
 *   IR_TO_INT    float -> int truncates toward zero; NaN -> 0; saturates to
 *                [INT32_MIN, INT32_MAX]. bool -> int is 0/1.
 *   IR_TO_FLOAT  int or bool -> float
 *   IR_SELECT    args: cond (bool), a, b (same type as the node)
 *   IR_MIN/MAX   same-typed args; for floats NaN propagates (torch.minimum)
 *   IR_POW, transcendental ops: float only (the parser converts ints)
 *   IR_FLOOR/IR_CEIL: float -> float
 *   IR_LOAD      buffer read; nargs = the buffer's ndim index args (int).
 *                Reads converted to the node type: int buffers (i32, i64
 *                truncated, u8) -> int, bool -> bool, f32/f16/bf16 -> float.
 *                An index outside [0, size) is an error on the CPU and
 *                clamped-and-flagged on GPUs.
 *   IR_TANH_APPROX  tanh with hardware approximation on GPUs (max abs error
 *                documented in docs/mod-language.md); exact on CPUs.
 */
typedef enum ir_op {
    /* leaves */
    IR_CONST = 0, /* value in node.imm */
    IR_SCORE,     /* float, score mods only */
    IR_B,
    IR_H,
    IR_Q,
    IR_KV,
    IR_LOAD, /* node.buffer = index into ir_mod.buffers */
    /* unary */
    IR_NEG,
    IR_NOT,
    IR_BITNOT,
    IR_ABS,
    IR_EXP,
    IR_EXP2,
    IR_LOG,
    IR_LOG2,
    IR_SQRT,
    IR_RSQRT,
    IR_SIN,
    IR_COS,
    IR_TAN,
    IR_TANH,
    IR_TANH_APPROX,
    IR_SIGMOID,
    IR_FLOOR,
    IR_CEIL,
    IR_TO_FLOAT,
    IR_TO_INT,
    /* binary */
    IR_ADD,
    IR_SUB,
    IR_MUL,
    IR_DIV,
    IR_FLOORDIV,
    IR_MOD,
    IR_POW,
    IR_MIN,
    IR_MAX,
    IR_EQ,
    IR_NE,
    IR_LT,
    IR_LE,
    IR_GT,
    IR_GE,
    IR_AND,
    IR_OR,
    IR_XOR,
    /* ternary */
    IR_SELECT,
    IR_OP_COUNT
} ir_op;

/* Static name of an op ("add", "select", ...), and its number of args
 * (IR_LOAD: -1, variable). */
const char *ir_op_name(ir_op op);
int ir_op_arity(ir_op op);

typedef union ir_value {
    int32_t i; /* IR_INT, and IR_BOOL as 0/1 */
    float f;   /* IR_FLOAT */
} ir_value;

typedef struct ir_node {
    uint8_t op;    /* ir_op */
    uint8_t type;  /* ir_type of the result */
    uint8_t nargs; /* number of used entries in args */
    int8_t buffer; /* IR_LOAD: buffer index; else -1 */
    int32_t args[4];
    /* IR_CONST: the value. Every other node: imm.i is the ir_type of
     * args[0] (ir_add sets it), which comparisons and IR_TO_INT read to
     * know their operand type. */
    ir_value imm;
} ir_node;

/* The type of a node's operands (comparisons, IR_TO_INT, ...). */
static inline ir_type ir_operand_type(const ir_node *node) {
    return (ir_type)node->imm.i;
}

/* The language's float min and max (docs/mod-language.md), for the scalar
 * evaluator and the CPU tile kernels alike: IEEE 754-2019 minimum and
 * maximum, a NaN operand gives NaN (as a + b) and -0 is below +0. */
static inline float ir_fmin(float a, float b) {
    if (a != a || b != b) return a + b;
    if (a == b) return signbit(a) ? a : b;
    return a < b ? a : b;
}
static inline float ir_fmax(float a, float b) {
    if (a != a || b != b) return a + b;
    if (a == b) return signbit(a) ? b : a;
    return a > b ? a : b;
}

#define IR_MAX_BUFFERS 16
#define IR_MAX_NODES   4096

typedef struct ir_buffer {
    char name[64];
    flex_dtype dtype;
    int ndim;
} ir_buffer;

typedef struct ir_mod {
    flex_mod_kind kind;
    ir_node *nodes;
    int num_nodes, cap_nodes;
    int root;
    ir_buffer buffers[IR_MAX_BUFFERS];
    int num_buffers;
    /* hash-cons table (open addressing over node indices, -1 = empty) */
    int32_t *cons;
    int cons_cap;
} ir_mod;

/* ---- building (core/mod/ir.c) ---- */

void ir_init(ir_mod *m, flex_mod_kind kind);
void ir_free(ir_mod *m);
/* Deep copy; dst must be uninitialised. Returns 0, or -1 on out of memory. */
int ir_copy(ir_mod *dst, const ir_mod *src);

/* Adds a node, or returns the index of an equal existing node. Does no
 * folding or type checking: callers pass a well-typed node. -1 on out of
 * memory or when IR_MAX_NODES would be exceeded. */
int ir_add(ir_mod *m, const ir_node *node);
/* Shorthands over ir_add. */
int ir_const_int(ir_mod *m, int32_t v);
int ir_const_float(ir_mod *m, float v);
int ir_const_bool(ir_mod *m, int v);
int ir_leaf(ir_mod *m, ir_op op); /* IR_SCORE, IR_B, IR_H, IR_Q, IR_KV */
int ir_unary(ir_mod *m, ir_op op, ir_type type, int a);
int ir_binary(ir_mod *m, ir_op op, ir_type type, int a, int b);
int ir_select(ir_mod *m, ir_type type, int c, int a, int b);
int ir_load(ir_mod *m, int buffer, ir_type type, int nargs, const int32_t *args);

/* Keeps only nodes reachable from root, renumbered, order preserved;
 * rebuilds the cons table. Returns 0 or -1 on out of memory. */
int ir_compact(ir_mod *m);

/* Which of b, h, q, kv, score a node's value depends on (bit set). */
enum { IR_DEP_B = 1, IR_DEP_H = 2, IR_DEP_Q = 4, IR_DEP_KV = 8, IR_DEP_SCORE = 16 };
/* deps[i] for every node; deps must hold num_nodes entries. */
void ir_dependencies(const ir_mod *m, uint8_t *deps);

/* The type of an IR buffer read of a buffer dtype. */
ir_type ir_type_of_dtype(flex_dtype dtype);

/* ---- scalar semantics shared by every CPU evaluator (core/mod/ir.c) ---- */

/* Applies op to already evaluated args (the node's own type decides int vs
 * float behaviour). For IR_CONST returns imm; leaves and IR_LOAD are not
 * handled here. This single function defines the semantics the other
 * evaluators (tile interpreter, interval analysis, emitters) must agree
 * with. */
ir_value ir_apply(const ir_node *node, const ir_value *args);

/* ---- text (core/mod/print.c) ---- */

/* Canonical text of the mod: deterministic, re-parseable, lets named t0, t1,
 * ... for nodes used more than once. Returns a malloc'd string (caller
 * frees) or NULL on out of memory. */
char *ir_canonical_text(const ir_mod *m);

/* FNV-1a 64 over kind, canonical text and buffer declarations. */
uint64_t ir_hash(const ir_mod *m, const char *canonical_text);

#endif /* FLEXATTN_MOD_IR_H */
