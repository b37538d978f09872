/*
 * IR -> CUDA C device functions. One `const` local per IR node, in the IR's
 * topological order, so the DAG's sharing carries over to the generated code
 * and the compiler sees plain straight-line code it can schedule freely.
 *
 * Exactness: float + - * / are written as __fadd_rn and friends, which the
 * CUDA compiler never contracts into FMAs, so a mod computes what the host
 * interpreter computes in f32 (transcendentals aside: those follow the
 * device math library, within its documented ulp bounds).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "embedded.h"
#include "mod/diagonal.h"
#include "mod/emit.h"
#include "mod/eval.h"
#include "mod/sincos.h"

/* core/mod/sincos.h, embedded at build time (core/mod/meson.build). */
extern const struct flex_embedded_file flex_mod_text_files[];

typedef struct strbuf {
    char *data;
    size_t len, cap;
    int failed;
} strbuf;

static void sb_printf(strbuf *sb, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void sb_printf(strbuf *sb, const char *fmt, ...) {
    if (sb->failed) return;
    va_list ap;
    va_start(ap, fmt);
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (n < 0) {
        sb->failed = 1;
        va_end(ap);
        return;
    }
    if (sb->len + (size_t)n + 1 > sb->cap) {
        size_t cap = sb->cap ? sb->cap : 4096;
        while (cap < sb->len + (size_t)n + 1)
            cap *= 2;
        char *p = realloc(sb->data, cap);
        if (!p) {
            sb->failed = 1;
            va_end(ap);
            return;
        }
        sb->data = p;
        sb->cap = cap;
    }
    vsnprintf(sb->data + sb->len, (size_t)n + 1, fmt, ap);
    sb->len += (size_t)n;
    va_end(ap);
}

/* Helpers every emitted mod may call; their semantics mirror ir_apply. */
static const char helper_text[] =
    "#ifndef FLEX_MOD_HELPERS\n"
    "#define FLEX_MOD_HELPERS\n"
    "#define FLEX_I32_MIN (-2147483647 - 1)\n"
    "static FLEX_DEVICE_INLINE int flex_iadd(int a, int b) { return (int)((unsigned)a + "
    "(unsigned)b); }\n"
    "static FLEX_DEVICE_INLINE int flex_isub(int a, int b) { return (int)((unsigned)a - "
    "(unsigned)b); }\n"
    "static FLEX_DEVICE_INLINE int flex_imul(int a, int b) { return (int)((unsigned)a * "
    "(unsigned)b); }\n"
    "static FLEX_DEVICE_INLINE int flex_ineg(int a) { return (int)(0u - (unsigned)a); }\n"
    "static FLEX_DEVICE_INLINE int flex_iabs(int a) { return a < 0 ? flex_ineg(a) : a; }\n"
    "static FLEX_DEVICE_INLINE int flex_ifloordiv(int a, int b) {\n"
    "    if (b == 0) return 0;\n"
    "    if (b == -1) return flex_ineg(a);\n"
    "    int q = a / b;\n"
    "    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;\n"
    "    return q;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE int flex_imod(int a, int b) {\n"
    "    if (b == 0 || b == -1) return 0;\n"
    "    int r = a % b;\n"
    "    if (r != 0 && ((r < 0) != (b < 0))) r += b;\n"
    "    return r;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE float flex_ffloordiv(float a, float b) { return floorf(__fdiv_rn(a, "
    "b)); }\n"
    "/* int -> float without the conversion unit (a quarter-rate pipe) and\n"
    " * without a branch (a branch per score keeps the compiler from\n"
    " * interleaving the scores of a tile): i = hi * 2^16 + lo with both halves\n"
    " * below 2^22, each exact as 1.5 * 2^23 + x in a float's mantissa; the\n"
    " * product by 2^16 is exact and the fused sum rounds once, as (float)i. */\n"
    "static FLEX_DEVICE_INLINE float flex_i2f(int i) {\n"
    "    const float hi = __fsub_rn(__int_as_float((int)(0x4b400000u + (unsigned)(i >> 16))),\n"
    "                               12582912.0f);\n"
    "    const float lo = __fsub_rn(__int_as_float((int)(0x4b400000u + ((unsigned)i & 0xffffu))),\n"
    "                               12582912.0f);\n"
    "    return __fmaf_rn(hi, 65536.0f, lo);\n"
    "}\n"
    "/* int -> float for values the emitter proved within [-2^22, 2^22] while\n"
    " * every index is below the FLEX_EMIT_SHORT_* bounds (the host defines\n"
    " * FLEX_SHORT_INDICES when they hold): 1.5 * 2^23 + i is exact in a\n"
    " * float's mantissa, so two operations suffice. */\n"
    "#ifndef FLEX_SHORT_INDICES\n"
    "#define FLEX_SHORT_INDICES 0\n"
    "#endif\n"
    "static FLEX_DEVICE_INLINE float flex_i2f_short(int i) {\n"
    "#if FLEX_SHORT_INDICES\n"
    "    return __fsub_rn(__int_as_float((int)(0x4b400000u + (unsigned)i)), 12582912.0f);\n"
    "#else\n"
    "    return flex_i2f(i);\n"
    "#endif\n"
    "}\n"
    "/* a / c for a constant c with rc = 1/c correctly rounded (|c| in [2^-20,\n"
    " * 2^20]): one product and Markstein's fused correction give the correctly\n"
    " * rounded quotient while |a| is in [2^-60, 2^60]. Other finite a are\n"
    " * scaled into that range by a power of two and back (exact, up to the\n"
    " * rounding of a subnormal quotient); 0 and inf are a * rc. No branch (see\n"
    " * flex_i2f) and no reciprocal on the SFU. */\n"
    "static FLEX_DEVICE_INLINE float flex_fdiv_const(float a, float c, float rc) {\n"
    "    const float aa = fabsf(a);\n"
    "    const bool big = aa > 0x1p60f, small = aa < 0x1p-60f;\n"
    "    const float a2 = __fmul_rn(a, big ? 0x1p-68f : small ? 0x1p90f : 1.0f);\n"
    "    const float q = __fmul_rn(a2, rc);\n"
    "    const float r = __fmul_rn(__fmaf_rn(__fmaf_rn(-q, c, a2), rc, q),\n"
    "                              big ? 0x1p68f : small ? 0x1p-90f : 1.0f);\n"
    "    return (aa == 0.0f || aa == FLEX_INF) ? __fmul_rn(a, rc) : r;\n"
    "}\n"
    "/* a / c for a constant c in [1, 2^20], rc = 1/c correctly rounded, in\n"
    " * four operations: for c >= 1 the product a * rc cannot overflow, and the\n"
    " * remainder a - q c is exact, so the corrected quotient correctly rounded,\n"
    " * wherever |a / c| >= 2^-103 (q's ulp times c's is then a multiple of the\n"
    " * smallest subnormal); below that it may be one ulp off. The remainder is\n"
    " * -(q c - a) so that zeros keep their sign; for infinite a it is NaN,\n"
    " * which the max turns into -FLT_MAX, and the sum is q = +-inf. A negative\n"
    " * c is emitted as -(a / |c|). */\n"
    "static FLEX_DEVICE_INLINE float flex_fdiv_const_ge1(float a, float c, float rc) {\n"
    "    const float q = __fmul_rn(a, rc);\n"
    "    const float e = fmaxf(-__fmaf_rn(q, c, -a), -0x1.fffffep127f);\n"
    "    return __fmaf_rn(e, rc, q);\n"
    "}\n"
    "static FLEX_DEVICE_INLINE float flex_fmod(float a, float b) {\n"
    "    float r = fmodf(a, b);\n"
    "    if (r != 0.0f && ((r < 0.0f) != (b < 0.0f))) r = __fadd_rn(r, b);\n"
    "    return r;\n"
    "}\n"
    "/* min and max of floats: a NaN operand gives NaN, and -0 is below +0\n"
    " * (IEEE 754-2019 minimum and maximum). int(x): truncated, NaN gives 0,\n"
    " * saturated at the int range. On NVIDIA GPUs each is one instruction\n"
    " * with exactly these rules (min.NaN / max.NaN from sm_80, cvt.rzi);\n"
    " * compared and branched, they were four or five a score. FLEX_PURE says\n"
    " * that the assembly reads and writes no memory: without it the compiler\n"
    " * reads a buffer again after each, for every score of a tile. */\n"
    "#define FLEX_PURE __attribute__((const))\n"
    "#if !defined(FLEX_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800\n"
    "static FLEX_DEVICE_INLINE FLEX_PURE float flex_fmin(float a, float b) {\n"
    "    float d;\n"
    "    asm(\"min.NaN.f32 %0, %1, %2;\" : \"=f\"(d) : \"f\"(a), \"f\"(b));\n"
    "    return d;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE FLEX_PURE float flex_fmax(float a, float b) {\n"
    "    float d;\n"
    "    asm(\"max.NaN.f32 %0, %1, %2;\" : \"=f\"(d) : \"f\"(a), \"f\"(b));\n"
    "    return d;\n"
    "}\n"
    "#else\n"
    "/* equal operands have equal bits but for zeros, where OR keeps a sign\n"
    "   (min) and AND drops one (max) */\n"
    "static FLEX_DEVICE_INLINE float flex_fmin(float a, float b) {\n"
    "    if (a != a || b != b) return __fadd_rn(a, b);\n"
    "    if (a == b) return __int_as_float(__float_as_int(a) | __float_as_int(b));\n"
    "    return a < b ? a : b;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE float flex_fmax(float a, float b) {\n"
    "    if (a != a || b != b) return __fadd_rn(a, b);\n"
    "    if (a == b) return __int_as_float(__float_as_int(a) & __float_as_int(b));\n"
    "    return a > b ? a : b;\n"
    "}\n"
    "#endif\n"
    "#if !defined(FLEX_HIP)\n"
    "static FLEX_DEVICE_INLINE FLEX_PURE int flex_f2i(float a) {\n"
    "    int i;\n"
    "    asm(\"cvt.rzi.s32.f32 %0, %1;\" : \"=r\"(i) : \"f\"(a));\n"
    "    return i;\n"
    "}\n"
    "#else\n"
    "static FLEX_DEVICE_INLINE int flex_f2i(float a) {\n"
    "    if (a != a) return 0;\n"
    "    if (a >= 2147483648.0f) return 2147483647;\n"
    "    if (a <= -2147483648.0f) return FLEX_I32_MIN;\n"
    "    return (int)a;\n"
    "}\n"
    "#endif\n"
    "static FLEX_DEVICE_INLINE float flex_sigmoid(float a) {\n"
    "    if (a >= 0.0f) return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-a)));\n"
    "    const float e = expf(a);\n"
    "    return __fdiv_rn(e, __fadd_rn(1.0f, e));\n"
    "}\n"
    "static FLEX_DEVICE_INLINE float flex_rsqrt(float a) { return __fdiv_rn(1.0f, sqrtf(a)); }\n"
    "/* sin and cos: core/mod/sincos.h's inline path near zero, the library's\n"
    "   exact functions, called, beyond it; tan called. Inlined, the library's\n"
    "   far-argument path is copied at every score of the unrolled tile. */\n"
    "static FLEX_DEVICE_OUT_OF_LINE float flex_sinf_far(float a) { return sinf(a); }\n"
    "static FLEX_DEVICE_OUT_OF_LINE float flex_cosf_far(float a) { return cosf(a); }\n"
    "static FLEX_DEVICE_INLINE float flex_sinf(float a) {\n"
    "    float v = flex_sincos_near(a, 0);\n"
    "    if (!(fabsf(a) <= FLEX_SINCOS_NEAR)) v = flex_sinf_far(a);\n"
    "    return v;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE float flex_cosf(float a) {\n"
    "    float v = flex_sincos_near(a, 1);\n"
    "    if (!(fabsf(a) <= FLEX_SINCOS_NEAR)) v = flex_cosf_far(a);\n"
    "    return v;\n"
    "}\n"
    "static FLEX_DEVICE_OUT_OF_LINE float flex_tanf(float a) { return tanf(a); }\n"
    "/* Element offset of idx in buffer `slot`; an index outside [0, size) is\n"
    "   clamped into range and bit `slot` of the thread's oob mask is set (the\n"
    "   kernel ORs the mask into the device flag once, at its end, so mods stay\n"
    "   free of stores and their loads can be shared and hoisted). */\n"
    "static FLEX_DEVICE_INLINE long long flex_buffer_offset(const flex_buffer &buf,\n"
    "        unsigned &oob, int slot, int ndim, int i0, int i1, int i2, int i3) {\n"
    "    int idx[4] = {i0, i1, i2, i3};\n"
    "    long long off = 0;\n"
    "    bool bad = false;\n"
    "#pragma unroll\n"
    "    for (int d = 0; d < 4; d++) {\n"
    "        if (d < ndim) {\n"
    "            int i = idx[d];\n"
    "            int size = buf.sizes[d];\n"
    "            if ((unsigned)i >= (unsigned)size) {\n"
    "                bad = true;\n"
    "                i = i < 0 ? 0 : size - 1;\n"
    "                if (i < 0) i = 0;\n"
    "            }\n"
    "            off += (long long)i * buf.strides[d];\n"
    "        }\n"
    "    }\n"
    "    if (bad) oob |= 1u << slot;\n"
    "    return off;\n"
    "}\n"
    "static FLEX_DEVICE_INLINE bool flex_buffer_empty(const flex_buffer &buf, int ndim) {\n"
    "    bool e = false;\n"
    "#pragma unroll\n"
    "    for (int d = 0; d < 4; d++) if (d < ndim && buf.sizes[d] <= 0) e = true;\n"
    "    return e;\n"
    "}\n"
    "#endif\n";

static const char *ctype(int t) {
    return t == IR_BOOL ? "bool" : t == IR_INT ? "int" : "float";
}

/* Whether node i's only users are tanh_approx: then a division by a
 * constant may be the product with the reciprocal, whose error of at most
 * one ulp more (2^-23 relative) is far below tanh_approx's own (about
 * 2^-10.7 absolute). */
static int only_feeds_tanh_approx(const ir_mod *m, int i) {
    if (m->root == i) return 0;
    int users = 0;
    for (int j = i + 1; j < m->num_nodes; j++)
        for (int k = 0; k < m->nodes[j].nargs; k++)
            if (m->nodes[j].args[k] == i) {
                if (m->nodes[j].op != IR_TANH_APPROX) return 0;
                users++;
            }
    return users > 0;
}

/* An int floor division (remainder: the remainder) of v<a[0]> by v<a[1]>:
 * where the operands are proved a >= 0 and b >= 1 (sign), C's unsigned
 * operation (a shift or a mask for a power of two), which then agrees;
 * otherwise the sign-correcting helper. */
static void emit_int_division(strbuf *sb, const unsigned char *sign, const int32_t *a,
                              int remainder) {
    if (sign && sign[a[0]] >= MOD_SIGN_NONNEGATIVE && sign[a[1]] == MOD_SIGN_POSITIVE)
        sb_printf(sb, remainder ? "(int)((unsigned)v%d %% (unsigned)v%d)"
                                : "(int)((unsigned)v%d / (unsigned)v%d)",
                  a[0], a[1]);
    else
        sb_printf(sb, remainder ? "flex_imod(v%d, v%d)" : "flex_ifloordiv(v%d, v%d)", a[0], a[1]);
}

/* Emits the right-hand side of node i (args already emitted as v<arg>).
 * short_int[i]: node i is an int proved within [-2^22, 2^22] under the
 * short-index bounds; near[i]: node i is a float proved within
 * FLEX_SINCOS_NEAR of zero, NaN aside, for any indices and score; sign[i]:
 * an int's proved sign (MOD_SIGN_*) for any indices (each NULL: nothing
 * proved). */
static void emit_node(strbuf *sb, const ir_mod *m, int i, int slot_base,
                      const unsigned char *short_int, const unsigned char *near,
                      const unsigned char *sign, const unsigned char *in_range) {
    const ir_node *n = &m->nodes[i];
    const int32_t *a = n->args;
    const int t = n->type;
    const int isf = (t == IR_FLOAT);
    /* For comparisons and min/max the operand type decides, not the result. */
    const int argf = n->nargs > 0 && m->nodes[a[0]].type == IR_FLOAT;
    switch ((ir_op)n->op) {
    case IR_CONST:
        if (t == IR_FLOAT) {
            uint32_t bits;
            memcpy(&bits, &n->imm.f, sizeof bits);
            sb_printf(sb, "__int_as_float(0x%08x) /* %.9g */", (unsigned)bits, (double)n->imm.f);
        } else if (t == IR_BOOL) {
            sb_printf(sb, "%s", n->imm.i ? "true" : "false");
        } else if (n->imm.i == INT32_MIN) {
            sb_printf(sb, "FLEX_I32_MIN");
        } else {
            sb_printf(sb, "%d", (int)n->imm.i);
        }
        return;
    case IR_SCORE:
        sb_printf(sb, "score");
        return;
    case IR_B:
        sb_printf(sb, "b");
        return;
    case IR_H:
        sb_printf(sb, "h");
        return;
    case IR_Q:
        sb_printf(sb, "q");
        return;
    case IR_KV:
        sb_printf(sb, "kv");
        return;
    case IR_LOAD: {
        const ir_buffer *buf = &m->buffers[(int)n->buffer];
        int slot = slot_base + n->buffer;
        int idx[4] = {0, 0, 0, 0};
        for (int d = 0; d < n->nargs && d < 4; d++)
            idx[d] = 1;
        /* flex_load_<dtype>(bufs, slot, ndim, indices) is defined below. */
        const char *fn = "i32";
        switch (buf->dtype) {
        case FLEX_I32:
            fn = "i32";
            break;
        case FLEX_I64:
            fn = "i64";
            break;
        case FLEX_U8:
            fn = "u8";
            break;
        case FLEX_BOOL:
            fn = "bool";
            break;
        case FLEX_F32:
            fn = "f32";
            break;
        case FLEX_F16:
            fn = "f16";
            break;
        case FLEX_BF16:
            fn = "bf16";
            break;
        }
        /* A read the host proved inside its buffer for every index the
         * kernel passes needs no bounds check (flex_load_<dtype>_in). */
        if (in_range && in_range[i])
            sb_printf(sb, "flex_load_%s_in(bufs.buf[%d]", fn, slot);
        else
            sb_printf(sb, "flex_load_%s(bufs.buf[%d], oob, %d, %d", fn, slot, slot, buf->ndim);
        for (int d = 0; d < 4; d++) {
            if (d < n->nargs && idx[d])
                sb_printf(sb, ", v%d", (int)a[d]);
            else
                sb_printf(sb, ", 0");
        }
        sb_printf(sb, ")");
        return;
    }
    case IR_NEG:
        sb_printf(sb, isf ? "(-v%d)" : "flex_ineg(v%d)", a[0]);
        return;
    case IR_NOT:
        sb_printf(sb, "(!v%d)", a[0]);
        return;
    case IR_BITNOT:
        sb_printf(sb, "(~v%d)", a[0]);
        return;
    case IR_ABS:
        sb_printf(sb, isf ? "fabsf(v%d)" : "flex_iabs(v%d)", a[0]);
        return;
    case IR_EXP:
        sb_printf(sb, "expf(v%d)", a[0]);
        return;
    case IR_EXP2:
        sb_printf(sb, "exp2f(v%d)", a[0]);
        return;
    case IR_LOG:
        sb_printf(sb, "logf(v%d)", a[0]);
        return;
    case IR_LOG2:
        sb_printf(sb, "log2f(v%d)", a[0]);
        return;
    case IR_SQRT:
        sb_printf(sb, "sqrtf(v%d)", a[0]);
        return;
    case IR_RSQRT:
        sb_printf(sb, "flex_rsqrt(v%d)", a[0]);
        return;
    case IR_SIN: /* without the far branch where the argument is proved near */
        sb_printf(sb, near && near[a[0]] ? "flex_sincos_near(v%d, 0)" : "flex_sinf(v%d)", a[0]);
        return;
    case IR_COS:
        sb_printf(sb, near && near[a[0]] ? "flex_sincos_near(v%d, 1)" : "flex_cosf(v%d)", a[0]);
        return;
    case IR_TAN:
        sb_printf(sb, "flex_tanf(v%d)", a[0]);
        return;
    case IR_TANH:
        sb_printf(sb, "tanhf(v%d)", a[0]);
        return;
    case IR_TANH_APPROX:
        sb_printf(sb, "flex_tanh_approx(v%d)", a[0]);
        return;
    case IR_SIGMOID:
        sb_printf(sb, "flex_sigmoid(v%d)", a[0]);
        return;
    case IR_FLOOR:
        sb_printf(sb, isf ? "floorf(v%d)" : "v%d", a[0]);
        return;
    case IR_CEIL:
        sb_printf(sb, isf ? "ceilf(v%d)" : "v%d", a[0]);
        return;
    case IR_TO_FLOAT:
        if (m->nodes[a[0]].type == IR_BOOL)
            sb_printf(sb, "(v%d ? 1.0f : 0.0f)", a[0]);
        else if (m->nodes[a[0]].type == IR_INT)
            sb_printf(sb, short_int && short_int[a[0]] ? "flex_i2f_short(v%d)" : "flex_i2f(v%d)",
                      a[0]);
        else
            sb_printf(sb, "v%d", a[0]);
        return;
    case IR_TO_INT:
        if (m->nodes[a[0]].type == IR_FLOAT)
            sb_printf(sb, "flex_f2i(v%d)", a[0]);
        else if (m->nodes[a[0]].type == IR_BOOL)
            sb_printf(sb, "(v%d ? 1 : 0)", a[0]);
        else
            sb_printf(sb, "v%d", a[0]);
        return;
    case IR_ADD:
        sb_printf(sb, isf ? "__fadd_rn(v%d, v%d)" : "flex_iadd(v%d, v%d)", a[0], a[1]);
        return;
    case IR_SUB:
        sb_printf(sb, isf ? "__fsub_rn(v%d, v%d)" : "flex_isub(v%d, v%d)", a[0], a[1]);
        return;
    case IR_MUL:
        sb_printf(sb, isf ? "__fmul_rn(v%d, v%d)" : "flex_imul(v%d, v%d)", a[0], a[1]);
        return;
    case IR_DIV: {
        const ir_node *d = &m->nodes[a[1]];
        if (isf && d->op == IR_CONST && d->type == IR_FLOAT) {
            const float c = d->imm.f, ac = fabsf(c);
            if (ac >= 0x1p-20f && ac <= 0x1p20f) {
                volatile float one = 1.0f; /* correctly rounded f32 reciprocal */
                const float rc = one / c;
                uint32_t rbits;
                memcpy(&rbits, &rc, sizeof rbits);
                if (only_feeds_tanh_approx(m, i)) {
                    sb_printf(sb, "__fmul_rn(v%d, __int_as_float(0x%08x))", a[0], (unsigned)rbits);
                } else if (ac >= 1.0f) {
                    uint32_t cbits;
                    memcpy(&cbits, &ac, sizeof cbits);
                    sb_printf(sb,
                              "%sflex_fdiv_const_ge1(v%d, __int_as_float(0x%08x), "
                              "__int_as_float(0x%08x))",
                              c < 0.0f ? "-" : "", a[0], (unsigned)cbits,
                              (unsigned)(rbits & 0x7fffffffu));
                } else {
                    sb_printf(sb, "flex_fdiv_const(v%d, v%d, __int_as_float(0x%08x))", a[0], a[1],
                              (unsigned)rbits);
                }
                return;
            }
        }
        if (isf)
            sb_printf(sb, "__fdiv_rn(v%d, v%d)", a[0], a[1]);
        else
            emit_int_division(sb, sign, a, 0);
        return;
    }
    case IR_FLOORDIV:
        if (isf)
            sb_printf(sb, "flex_ffloordiv(v%d, v%d)", a[0], a[1]);
        else
            emit_int_division(sb, sign, a, 0);
        return;
    case IR_MOD:
        if (isf)
            sb_printf(sb, "flex_fmod(v%d, v%d)", a[0], a[1]);
        else
            emit_int_division(sb, sign, a, 1);
        return;
    case IR_POW:
        sb_printf(sb, "powf(v%d, v%d)", a[0], a[1]);
        return;
    case IR_MIN:
        if (isf)
            sb_printf(sb, "flex_fmin(v%d, v%d)", a[0], a[1]);
        else
            sb_printf(sb, "(v%d < v%d ? v%d : v%d)", a[0], a[1], a[0], a[1]);
        return;
    case IR_MAX:
        if (isf)
            sb_printf(sb, "flex_fmax(v%d, v%d)", a[0], a[1]);
        else
            sb_printf(sb, "(v%d > v%d ? v%d : v%d)", a[0], a[1], a[0], a[1]);
        return;
    case IR_EQ:
        sb_printf(sb, "(v%d == v%d)", a[0], a[1]);
        return;
    case IR_NE:
        sb_printf(sb, "(v%d != v%d)", a[0], a[1]);
        return;
    case IR_LT:
        sb_printf(sb, "(v%d < v%d)", a[0], a[1]);
        return;
    case IR_LE:
        sb_printf(sb, "(v%d <= v%d)", a[0], a[1]);
        return;
    case IR_GT:
        sb_printf(sb, "(v%d > v%d)", a[0], a[1]);
        return;
    case IR_GE:
        sb_printf(sb, "(v%d >= v%d)", a[0], a[1]);
        return;
    case IR_AND:
        sb_printf(sb, t == IR_BOOL ? "(v%d && v%d)" : "(v%d & v%d)", a[0], a[1]);
        return;
    case IR_OR:
        sb_printf(sb, t == IR_BOOL ? "(v%d || v%d)" : "(v%d | v%d)", a[0], a[1]);
        return;
    case IR_XOR:
        sb_printf(sb, t == IR_BOOL ? "(v%d != v%d)" : "(v%d ^ v%d)", a[0], a[1]);
        return;
    case IR_SELECT:
        sb_printf(sb, "(v%d ? v%d : v%d)", a[0], a[1], a[2]);
        return;
    case IR_OP_COUNT:
        break;
    }
    (void)argf;
    sb->failed = 1;
}

/* The typed loads, one per dtype, built on flex_buffer_offset. They have
 * no branch and read through plain pointers: the compiler then shares the
 * reads of equal indices among the scores of a tile (slopes[h] once, doc[kv]
 * once per column); a branch per read or __ldg's asm form keeps every copy.
 * An empty buffer reads a zero word of the module instead (and flags).
 * The _in forms read without a check, for reads the host proved inside
 * their buffer for every index the kernel passes (flex_emit_mods_in_range). */
static const char load_text[] =
    "#ifndef FLEX_MOD_LOADS\n"
    "#define FLEX_MOD_LOADS\n"
    "__device__ const unsigned long long flex_empty_buffer_word = 0ull;\n"
    "#define FLEX_LOAD_PTR(T) \\\n"
    "    const bool empty = flex_buffer_empty(buf, ndim); \\\n"
    "    const long long off = flex_buffer_offset(buf, oob, slot, ndim, i0, i1, i2, i3); \\\n"
    "    oob |= empty ? 1u << slot : 0u; \\\n"
    "    const T *ptr = empty ? (const T *)&flex_empty_buffer_word : (const T *)buf.data + off;\n"
    "#define FLEX_LOAD_ARGS const flex_buffer &buf, unsigned &oob, int slot, int ndim, \\\n"
    "    int i0, int i1, int i2, int i3\n"
    "#define FLEX_LOAD_IN_ARGS const flex_buffer &buf, int i0, int i1, int i2, int i3\n"
    "#define FLEX_LOAD_IN_PTR(T) \\\n"
    "    const T *ptr = (const T *)buf.data + ((long long)i0 * buf.strides[0] + \\\n"
    "        (long long)i1 * buf.strides[1] + (long long)i2 * buf.strides[2] + \\\n"
    "        (long long)i3 * buf.strides[3]);\n"
    "#define FLEX_DEFINE_LOAD(NAME, RT, T, VALUE) \\\n"
    "    static FLEX_DEVICE_INLINE RT flex_load_##NAME(FLEX_LOAD_ARGS) { \\\n"
    "        FLEX_LOAD_PTR(T) return VALUE; \\\n"
    "    } \\\n"
    "    static FLEX_DEVICE_INLINE RT flex_load_##NAME##_in(FLEX_LOAD_IN_ARGS) { \\\n"
    "        FLEX_LOAD_IN_PTR(T) return VALUE; \\\n"
    "    }\n"
    "FLEX_DEFINE_LOAD(i32, int, int, *ptr)\n"
    "FLEX_DEFINE_LOAD(i64, int, long long, (int)(unsigned)(unsigned long long)*ptr)\n"
    "FLEX_DEFINE_LOAD(u8, int, unsigned char, (int)*ptr)\n"
    "FLEX_DEFINE_LOAD(bool, bool, unsigned char, *ptr != 0)\n"
    "FLEX_DEFINE_LOAD(f32, float, float, *ptr)\n"
    "FLEX_DEFINE_LOAD(f16, float, unsigned short, flex_half_bits_to_float(*ptr))\n"
    "FLEX_DEFINE_LOAD(bf16, float, unsigned short, __int_as_float((int)((unsigned)*ptr << 16)))\n"
    "#endif\n";

int flex_emit_num_slots(const ir_mod *mask, const ir_mod *score) {
    return (mask ? mask->num_buffers : 0) + (score ? score->num_buffers : 0);
}

/* What emit_body writes of a mod with a diagonal split (mod/diagonal.h):
 * every node as it is (BODY_PLAIN); the split's values read from the
 * score's table entry `diag` instead (BODY_DIAG_MAIN); or only the
 * diagonal and fixed nodes, with the differences taken from `d` = kv - q
 * (BODY_DIAG_FILL). */
typedef enum body_mode { BODY_PLAIN, BODY_DIAG_MAIN, BODY_DIAG_FILL } body_mode;
typedef struct body_split {
    body_mode mode;
    const unsigned char *role; /* MOD_DIAG_* per node */
    const mod_diagonal_split *split;
    const unsigned char *live; /* the nodes the function's results need */
} body_split;

/* A split value of each type read from the table entry `diag` (value k is
 * FLEX_DIAG_STRIDE floats after value k - 1; ints and bools as the bits of
 * an int)... */
static const char *const diagonal_read[] = {
    [IR_BOOL] = "(__float_as_int(diag[%d * FLEX_DIAG_STRIDE]) != 0)",
    [IR_INT] = "__float_as_int(diag[%d * FLEX_DIAG_STRIDE])",
    [IR_FLOAT] = "diag[%d * FLEX_DIAG_STRIDE]",
};
/* ... and the fill's store of value k, node v. */
static const char *const diagonal_store[] = {
    [IR_BOOL] = "    at[%d * FLEX_DIAG_STRIDE] = __int_as_float(v%d ? 1 : 0);\n",
    [IR_INT] = "    at[%d * FLEX_DIAG_STRIDE] = __int_as_float(v%d);\n",
    [IR_FLOAT] = "    at[%d * FLEX_DIAG_STRIDE] = v%d;\n",
};

/* The read of split value node i. */
static void emit_diagonal_read(strbuf *sb, const ir_mod *m, const mod_diagonal_split *split,
                               int i) {
    int k = 0;
    while (k < split->num_values - 1 && split->values[k] != i)
        k++;
    sb_printf(sb, diagonal_read[m->nodes[i].type], k);
}

/* What the interval analysis proved of a mod's nodes, for emit_node:
 * short_int[i], an int within [-2^22, 2^22] while the indices are within
 * the short bounds (buffer values count as any int); near[i], a float near
 * enough to zero for sin and cos to need no branch to the far path, for any
 * indices (sincos.h), so the scores' chains interleave; sign[i], an int
 * never negative or always positive, for any indices (unsigned division).
 * NULL: nothing proved. Found once per mod, for every function emitted from
 * it. */
typedef struct body_facts {
    unsigned char *short_int, *near, *sign;
} body_facts;

static void facts_find(const ir_mod *m, body_facts *f) {
    const mod_box box = {{0, 0, 0, 0},
                         {FLEX_EMIT_SHORT_HEADS - 1, FLEX_EMIT_SHORT_HEADS - 1,
                          FLEX_EMIT_SHORT_LEN - 1, FLEX_EMIT_SHORT_LEN - 1}};
    const mod_box any_index = {{0, 0, 0, 0}, {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX}};
    f->short_int = f->near = f->sign = NULL;
    if (!m) return;
    f->short_int = malloc((size_t)m->num_nodes);
    if (f->short_int && mod_interval_ints_within(m, &box, 1 << 22, f->short_int) != 0) {
        free(f->short_int);
        f->short_int = NULL;
    }
    f->near = malloc((size_t)m->num_nodes);
    f->sign = malloc((size_t)m->num_nodes);
    if (!f->near || !f->sign ||
        mod_interval_near_floats_and_signs(m, &any_index, FLEX_SINCOS_NEAR, f->near, f->sign) != 0) {
        free(f->near);
        free(f->sign);
        f->near = f->sign = NULL;
    }
}

static void facts_free(body_facts *f) {
    free(f->short_int);
    free(f->near);
    free(f->sign);
}

/* One `const` local per node of m, in topological order (the compiler drops
 * the ones no result uses); ds NULL or BODY_PLAIN: every node as it is. */
static void emit_body(strbuf *sb, const ir_mod *m, int slot_base, const unsigned char *in_range,
                      const body_facts *facts, const body_split *ds) {
    const body_mode mode = ds ? ds->mode : BODY_PLAIN;
    for (int i = 0; i < m->num_nodes; i++) {
        const int role = mode == BODY_PLAIN ? MOD_DIAG_NONE : ds->role[i];
        if (mode != BODY_PLAIN && !ds->live[i]) continue;
        sb_printf(sb, "    const %s v%d = ", ctype(m->nodes[i].type), i);
        if (mode == BODY_DIAG_FILL && role == MOD_DIAG_KV_Q)
            sb_printf(sb, "d");
        else if (mode == BODY_DIAG_FILL && role == MOD_DIAG_Q_KV)
            sb_printf(sb, "flex_isub(0, d)");
        else if (mode == BODY_DIAG_MAIN && role == MOD_DIAG_VALUE)
            emit_diagonal_read(sb, m, ds->split, i);
        else
            emit_node(sb, m, i, slot_base, facts->short_int, facts->near, facts->sign, in_range);
        sb_printf(sb, ";\n");
    }
}

/* The return statement of a mask (bool) or score (float) function whose
 * body emit_body wrote, and the closing brace. */
static void emit_return(strbuf *sb, const ir_mod *m, int is_mask) {
    const int rt = m->nodes[m->root].type;
    if (is_mask) {
        if (rt == IR_BOOL)
            sb_printf(sb, "    return v%d;\n}\n", m->root);
        else
            sb_printf(sb, "    return v%d != 0;\n}\n", m->root);
    } else {
        if (rt == IR_FLOAT)
            sb_printf(sb, "    return v%d;\n}\n", m->root);
        else if (rt == IR_INT)
            sb_printf(sb, "    return (float)v%d;\n}\n", m->root);
        else
            sb_printf(sb, "    return v%d ? 1.0f : 0.0f;\n}\n", m->root);
    }
}

static void emit_function(strbuf *sb, const ir_mod *m, int slot_base, int is_mask,
                          const unsigned char *in_range, const body_facts *facts) {
    if (is_mask)
        sb_printf(sb, "static FLEX_DEVICE_INLINE bool flex_mask_mod(int b, int h, int q, int kv, "
                      "const flex_buffers &bufs, unsigned &oob) {\n");
    else
        sb_printf(sb, "static FLEX_DEVICE_INLINE float flex_score_mod(float score, int b, int h, "
                      "int q, int kv, const flex_buffers &bufs, unsigned &oob) {\n");
    if (!m) {
        sb_printf(sb, "    (void)b; (void)h; (void)q; (void)kv; (void)bufs; (void)oob;\n");
        sb_printf(sb, is_mask ? "    return true;\n}\n" : "    return score;\n}\n");
        return;
    }
    sb_printf(sb, "    (void)b; (void)h; (void)q; (void)kv; (void)bufs; (void)oob;\n");
    emit_body(sb, m, slot_base, in_range, facts, NULL);
    emit_return(sb, m, is_mask);
}

/* The two functions of a score mod's diagonal split (flex_emit_mods_diagonal). */
static void emit_diagonal_functions(strbuf *sb, const ir_mod *m, int slot_base,
                                    const unsigned char *in_range, const body_facts *facts,
                                    const unsigned char *role, const mod_diagonal_split *split) {
    unsigned char *live = malloc((size_t)m->num_nodes);
    if (!live) {
        sb->failed = 1;
        return;
    }
    sb_printf(sb, "#define FLEX_DIAG_STRIDE (FLEX_BLOCK_N + 16)\n");
    sb_printf(sb, "static FLEX_DEVICE_INLINE void flex_score_diag_fill(int b, int h, int d, "
                  "const flex_buffers &bufs, float *at) {\n");
    sb_printf(sb, "    unsigned oob = 0;\n    (void)b; (void)h; (void)d; (void)bufs; (void)oob;\n");
    mod_diagonal_live(m, role, split, 1, live);
    const body_split fill = {BODY_DIAG_FILL, role, split, live};
    emit_body(sb, m, slot_base, in_range, facts, &fill);
    for (int k = 0; k < split->num_values; k++)
        sb_printf(sb, diagonal_store[m->nodes[split->values[k]].type], k, split->values[k]);
    if (split->checked) /* the bounds bits of the diagonal's reads */
        sb_printf(sb, "    at[%d * FLEX_DIAG_STRIDE] = __int_as_float((int)oob);\n",
                  split->num_values);
    sb_printf(sb, "}\n");
    sb_printf(sb, "static FLEX_DEVICE_INLINE float flex_score_mod_diag(float score, int b, int h, "
                  "int q, int kv, const flex_buffers &bufs, unsigned &oob, const float *diag) {\n");
    sb_printf(sb, "    (void)b; (void)h; (void)q; (void)kv; (void)bufs; (void)oob; (void)diag;\n");
    mod_diagonal_live(m, role, split, 0, live);
    const body_split main_part = {BODY_DIAG_MAIN, role, split, live};
    emit_body(sb, m, slot_base, in_range, facts, &main_part);
    if (split->checked)
        sb_printf(sb, "    oob |= (unsigned)__float_as_int(diag[%d * FLEX_DIAG_STRIDE]);\n",
                  split->num_values);
    emit_return(sb, m, 0);
    free(live);
}

/* 1 when some buffer read of m has an index that depends on the score. */
static int index_uses_score(const ir_mod *m) {
    if (!m || m->num_nodes <= 0) return 0;
    unsigned char *dep = calloc((size_t)m->num_nodes, 1);
    if (!dep) return 1; /* the cautious answer */
    int uses = 0;
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *n = &m->nodes[i];
        int d = n->op == IR_SCORE;
        for (int k = 0; k < n->nargs; k++)
            d |= dep[n->args[k]];
        dep[i] = (unsigned char)d;
        if (n->op == IR_LOAD && d) uses = 1;
    }
    free(dep);
    return uses;
}

static int any_set(const ir_mod *m, const unsigned char *flags) {
    for (int i = 0; m && flags && i < m->num_nodes; i++)
        if (flags[i]) return 1;
    return 0;
}

char *flex_emit_mods(const ir_mod *mask, const ir_mod *score) {
    return flex_emit_mods_in_range(mask, score, NULL, NULL);
}

char *flex_emit_mods_in_range(const ir_mod *mask, const ir_mod *score,
                              const unsigned char *mask_in_range,
                              const unsigned char *score_in_range) {
    return flex_emit_mods_diagonal(mask, score, mask_in_range, score_in_range, 0);
}

char *flex_emit_mods_diagonal(const ir_mod *mask, const ir_mod *score,
                              const unsigned char *mask_in_range,
                              const unsigned char *score_in_range, int diagonal_rows) {
    int slots = flex_emit_num_slots(mask, score);
    if (slots > FLEX_EMIT_MAX_SLOTS) return NULL;
    strbuf sb = {0};
    sb_printf(&sb, "/* mods emitted from the IR */\n");
    sb_printf(&sb, "#define FLEX_NUM_BUFFERS %d\n", slots);
    sb_printf(&sb, "#define FLEX_HAS_MASK_MOD %d\n", mask ? 1 : 0);
    sb_printf(&sb, "#define FLEX_HAS_SCORE_MOD %d\n", score ? 1 : 0);
    sb_printf(&sb, "#define FLEX_SCORE_INDEX_USES_SCORE %d\n", index_uses_score(score));
    sb_printf(&sb, "#define FLEX_MASK_READS_IN_RANGE %d\n", any_set(mask, mask_in_range));
    sb_printf(&sb, "%s", flex_embedded_text(flex_mod_text_files, "sincos.h"));
    sb_printf(&sb, "%s", helper_text);
    /* The kernels' struct flex_buffers is flex_gpu_params.h's, the layout
     * by which the host appends the buffers to a parameter block. */
    sb_printf(&sb, "typedef flex_gpu_buffers<%d> flex_buffers;\n", slots > 0 ? slots : 1);
    sb_printf(&sb, "%s", load_text);
    body_facts mask_facts, score_facts;
    facts_find(mask, &mask_facts);
    facts_find(score, &score_facts);
    emit_function(&sb, mask, 0, 1, mask_in_range, &mask_facts);
    emit_function(&sb, score, mask ? mask->num_buffers : 0, 0, score_in_range, &score_facts);
    mod_diagonal_split split = {0};
    unsigned char *role = NULL;
    if (diagonal_rows > 0) { /* the split the caller sized its tables for, or none */
        role = score ? malloc((size_t)score->num_nodes) : NULL;
        if (!role || mod_diagonal_split_find(score, score_in_range, &split, role) != 0 ||
            split.rows != diagonal_rows)
            sb.failed = 1;
    }
    sb_printf(&sb, "#define FLEX_DIAG_VALUES %d\n#define FLEX_DIAG_ROWS %d\n", split.num_values,
              split.rows);
    if (split.num_values > 0)
        emit_diagonal_functions(&sb, score, mask ? mask->num_buffers : 0, score_in_range,
                                &score_facts, role, &split);
    free(role);
    facts_free(&mask_facts);
    facts_free(&score_facts);
    if (sb.failed) {
        free(sb.data);
        return NULL;
    }
    return sb.data;
}

char *flex_emit_ir_function(const ir_mod *m, const char *name, const int *outputs, int num_outputs,
                            int slot_base, const unsigned char *in_range) {
    if (!m || !name || num_outputs < 1 || (num_outputs > 0 && !outputs)) return NULL;
    for (int k = 0; k < num_outputs; k++)
        if (outputs[k] < 0 || outputs[k] >= m->num_nodes) return NULL;
    strbuf sb = {0};
    sb_printf(&sb,
              "static FLEX_DEVICE_INLINE void %s(float score, int b, int h, int q, int kv, "
              "const flex_buffers &bufs, unsigned &oob",
              name);
    for (int k = 0; k < num_outputs; k++)
        sb_printf(&sb, ", %s &out%d", ctype(m->nodes[outputs[k]].type), k);
    sb_printf(&sb, ") {\n    (void)score; (void)b; (void)h; (void)q; (void)kv; (void)bufs; "
                   "(void)oob;\n");
    body_facts facts;
    facts_find(m, &facts);
    emit_body(&sb, m, slot_base, in_range, &facts, NULL);
    facts_free(&facts);
    for (int k = 0; k < num_outputs; k++)
        sb_printf(&sb, "    out%d = v%d;\n", k, outputs[k]);
    sb_printf(&sb, "}\n");
    if (sb.failed) {
        free(sb.data);
        return NULL;
    }
    return sb.data;
}
