/*
 * Interval analysis of mask mods: a sound three-valued verdict of a mask
 * over a box of (b, h, q, kv) indices, and the per-buffer min/max tables
 * that let buffer reads take part in it.
 *
 * Every node gets an abstract value that covers every concrete value the
 * node takes at any point of the box:
 *   int    an inclusive range in int64. When an op may leave int32 (where
 *          the concrete semantics wrap) the range widens to all of int32.
 *   float  an inclusive range of the non-NaN values plus a may-be-NaN flag.
 *          When the non-NaN values are hard to bound the range is
 *          [-inf, inf]. Basic arithmetic needs no outward rounding: IEEE
 *          round-to-nearest is monotone, so the op applied to the end points
 *          bounds the op applied anywhere in between. libm functions are not
 *          guaranteed monotone to the last bit, so their end points are
 *          moved outward by a few ulps.
 *   bool   a mod_tri bit set (may be false, may be true).
 * Correlation between operands is not tracked (q - kv is treated as two
 * independent ranges), which makes verdicts unknown more often, never wrong.
 * Both branches of a select are analysed (they are both evaluated in the
 * concrete semantics too, like torch.where).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "mod/eval.h"

/* ---- buffer range tables ---- */

/*
 * The buffer's elements in logical row-major order (level 0), plus min and
 * max over aligned spans of 16, 32, 64, ... elements (the last span of a
 * level may be shorter). Upper levels shrink by half, so together they hold
 * n / 8 entries per array and build in O(n); spans start at 16 because
 * scanning up to 16 elements at each end of a query is as cheap as walking
 * small levels. Int buffers (i32, i64, u8, bool) keep the value they read as
 * (int32 after truncation, 0/1 for bool). Float buffers keep floats; NaN is
 * left out of every min and max (comparisons with NaN are false, so the
 * scans skip it) and one flag per buffer says whether any element is NaN.
 */
#define SPAN_SHIFT 4
#define SPAN       (1 << SPAN_SHIFT)
#define MAX_LEVELS 48

typedef struct range_table {
    int present;
    int is_float;
    int has_nan;
    int ndim;
    int64_t sizes[4];
    int64_t count;
    int32_t *ivals; /* level 0 */
    float *fvals;
    int num_levels; /* level j holds spans of SPAN << j */
    int64_t level_start[MAX_LEVELS];
    int64_t level_len[MAX_LEVELS];
    int32_t *imin, *imax;
    float *fmin, *fmax;
} range_table;

struct mod_range_tables {
    int num_buffers;
    range_table table[IR_MAX_BUFFERS];
};

static int is_float_dtype(flex_dtype d) {
    return d == FLEX_F32 || d == FLEX_F16 || d == FLEX_BF16;
}

static int32_t read_int_at(const void *data, flex_dtype d, int64_t off) {
    switch (d) {
    case FLEX_I32:
        return ((const int32_t *)data)[off];
    case FLEX_I64:
        return (int32_t)(uint32_t)(uint64_t)((const int64_t *)data)[off];
    case FLEX_U8:
        return ((const uint8_t *)data)[off];
    case FLEX_BOOL:
        return ((const uint8_t *)data)[off] != 0;
    default:
        return 0;
    }
}

static float read_float_at(const void *data, flex_dtype d, int64_t off) {
    switch (d) {
    case FLEX_F32:
        return ((const float *)data)[off];
    case FLEX_F16:
        return flex_f16_to_float(((const uint16_t *)data)[off]);
    case FLEX_BF16:
        return flex_bf16_to_float(((const uint16_t *)data)[off]);
    default:
        return 0.0f;
    }
}

static void table_free(range_table *t) {
    free(t->ivals);
    free(t->fvals);
    free(t->imin);
    free(t->imax);
    free(t->fmin);
    free(t->fmax);
    memset(t, 0, sizeof *t);
}

/* Upper levels for one element type: level 0 of the hierarchy from the
 * values, then pairwise. */
#define BUILD_LEVELS(T, VALS, MIN, MAX, T_LOWEST, T_HIGHEST)                                       \
    do {                                                                                           \
        const T *vals = (VALS);                                                                    \
        T *mins = (MIN), *maxs = (MAX);                                                            \
        for (int64_t j = 0; j < t->level_len[0]; j++) {                                            \
            int64_t end = (j + 1) * SPAN < n ? (j + 1) * SPAN : n;                                 \
            T a = T_HIGHEST, b = T_LOWEST;                                                         \
            for (int64_t k = j * SPAN; k < end; k++) {                                             \
                a = vals[k] < a ? vals[k] : a;                                                     \
                b = vals[k] > b ? vals[k] : b;                                                     \
            }                                                                                      \
            mins[j] = a;                                                                           \
            maxs[j] = b;                                                                           \
        }                                                                                          \
        for (int l = 1; l < t->num_levels; l++) {                                                  \
            const T *lmin = mins + t->level_start[l - 1], *lmax = maxs + t->level_start[l - 1];    \
            T *omin = mins + t->level_start[l], *omax = maxs + t->level_start[l];                  \
            int64_t below = t->level_len[l - 1];                                                   \
            for (int64_t j = 0; j < t->level_len[l]; j++) {                                        \
                int64_t x = 2 * j, y = 2 * j + 1 < below ? 2 * j + 1 : 2 * j;                      \
                omin[j] = lmin[x] < lmin[y] ? lmin[x] : lmin[y];                                   \
                omax[j] = lmax[x] > lmax[y] ? lmax[x] : lmax[y];                                   \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* Fills level 0 from the view in logical order, then the upper levels. */
static int table_build(range_table *t, const mod_buffer_view *v) {
    int64_t n = 1;
    for (int d = 0; d < v->ndim; d++) {
        if (v->sizes[d] < 0) return -1;
        n *= v->sizes[d];
    }
    t->ndim = v->ndim;
    for (int d = 0; d < 4; d++)
        t->sizes[d] = d < v->ndim ? v->sizes[d] : 1;
    t->count = n;
    t->is_float = is_float_dtype(v->dtype);
    int64_t total = 0;
    int levels = 0;
    for (int64_t len = (n + SPAN - 1) / SPAN; n > 2 * SPAN && levels < MAX_LEVELS;
         len = (len + 1) / 2) {
        t->level_start[levels] = total;
        t->level_len[levels] = len;
        total += len;
        levels++;
        if (len <= 1) break;
    }
    t->num_levels = levels;
    size_t bytes = (size_t)(total > 0 ? total : 1) * 4;
    size_t value_bytes = (size_t)(n > 0 ? n : 1) * 4;
    if (t->is_float) {
        t->fvals = malloc(value_bytes);
        t->fmin = malloc(bytes);
        t->fmax = malloc(bytes);
        if (!t->fvals || !t->fmin || !t->fmax) return -1;
    } else {
        t->ivals = malloc(value_bytes);
        t->imin = malloc(bytes);
        t->imax = malloc(bytes);
        if (!t->ivals || !t->imin || !t->imax) return -1;
    }
    if (n == 0) {
        t->present = 1;
        return 0;
    }

    /* level 0: walk the logical indices; the innermost dim is a plain
     * strided run */
    int64_t idx[4] = {0, 0, 0, 0};
    int inner = v->ndim - 1;
    int64_t inner_len = v->sizes[inner], inner_stride = v->strides[inner];
    int has_nan = 0;
    for (int64_t pos = 0; pos < n; pos += inner_len) {
        int64_t base = 0;
        for (int d = 0; d < inner; d++)
            base += idx[d] * v->strides[d];
        if (t->is_float) {
            float *dst = t->fvals + pos;
            for (int64_t k = 0; k < inner_len; k++) {
                float x = read_float_at(v->data, v->dtype, base + k * inner_stride);
                has_nan |= x != x;
                dst[k] = x;
            }
        } else if (v->dtype == FLEX_I32 && inner_stride == 1) {
            memcpy(t->ivals + pos, (const int32_t *)v->data + base,
                   (size_t)inner_len * sizeof(int32_t));
        } else {
            int32_t *dst = t->ivals + pos;
            for (int64_t k = 0; k < inner_len; k++)
                dst[k] = read_int_at(v->data, v->dtype, base + k * inner_stride);
        }
        for (int d = inner - 1; d >= 0; d--) {
            if (++idx[d] < v->sizes[d]) break;
            idx[d] = 0;
        }
    }
    t->has_nan = has_nan;
    if (levels > 0) {
        if (t->is_float)
            BUILD_LEVELS(float, t->fvals, t->fmin, t->fmax, -INFINITY, INFINITY);
        else
            BUILD_LEVELS(int32_t, t->ivals, t->imin, t->imax, INT32_MIN, INT32_MAX);
    }
    t->present = 1;
    return 0;
}

/*
 * Builds tables for every buffer that m reads, from host views (bufs
 * indexed like m->buffers). A buffer whose view is missing (bufs NULL or
 * data NULL) or does not match its declaration gets no table: reads of it
 * make verdicts unknown. The views are read during the call only. The
 * result is owned by the caller (mod_range_tables_free); NULL on out of
 * memory.
 */
mod_range_tables *mod_range_tables_build(const ir_mod *m, const mod_buffer_view *bufs) {
    mod_range_tables *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    if (!m) return r;
    r->num_buffers = m->num_buffers;
    /* only buffers the mod reads: a declared but unused buffer costs nothing */
    int read[IR_MAX_BUFFERS] = {0};
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].op == IR_LOAD && m->nodes[i].buffer >= 0 &&
            m->nodes[i].buffer < IR_MAX_BUFFERS)
            read[m->nodes[i].buffer] = 1;
    for (int i = 0; i < m->num_buffers && i < IR_MAX_BUFFERS; i++) {
        if (!bufs) break;
        if (!read[i]) continue;
        const mod_buffer_view *v = &bufs[i];
        if (!v->data || v->ndim != m->buffers[i].ndim || v->ndim < 1 || v->ndim > 4) continue;
        if (table_build(&r->table[i], v) != 0) {
            mod_range_tables_free(r);
            return NULL;
        }
    }
    return r;
}

void mod_range_tables_free(mod_range_tables *t) {
    if (!t) return;
    for (int i = 0; i < IR_MAX_BUFFERS; i++)
        table_free(&t->table[i]);
    free(t);
}

/* Min and max over logical elements [lo, hi] (0 <= lo <= hi < count),
 * folded into *mn and *mx: the unaligned ends are scanned, the aligned
 * middle takes at most two spans per level. O(log n). */
#define TABLE_QUERY(T, VALS, MIN, MAX)                                                             \
    do {                                                                                           \
        const T *vals = (VALS);                                                                    \
        T a = *mn, b = *mx;                                                                        \
        int64_t scan_end = hi;                                                                     \
        int64_t span_lo = 0, span_hi = -1;                                                         \
        if (t->num_levels > 0 && hi - lo >= 3 * SPAN) {                                            \
            int64_t alo = (lo + SPAN - 1) & ~(int64_t)(SPAN - 1);                                  \
            int64_t aend = (hi + 1) & ~(int64_t)(SPAN - 1);                                        \
            for (int64_t k = aend; k <= hi; k++) {                                                 \
                a = vals[k] < a ? vals[k] : a;                                                     \
                b = vals[k] > b ? vals[k] : b;                                                     \
            }                                                                                      \
            scan_end = alo - 1;                                                                    \
            span_lo = alo >> SPAN_SHIFT;                                                           \
            span_hi = (aend >> SPAN_SHIFT) - 1;                                                    \
        }                                                                                          \
        for (int64_t k = lo; k <= scan_end; k++) {                                                 \
            a = vals[k] < a ? vals[k] : a;                                                         \
            b = vals[k] > b ? vals[k] : b;                                                         \
        }                                                                                          \
        for (int l = 0; span_lo <= span_hi; l++) {                                                 \
            const T *lmin = (MIN) + t->level_start[l], *lmax = (MAX) + t->level_start[l];          \
            if (span_lo & 1) {                                                                     \
                a = lmin[span_lo] < a ? lmin[span_lo] : a;                                         \
                b = lmax[span_lo] > b ? lmax[span_lo] : b;                                         \
                span_lo++;                                                                         \
            }                                                                                      \
            if (!(span_hi & 1)) {                                                                  \
                a = lmin[span_hi] < a ? lmin[span_hi] : a;                                         \
                b = lmax[span_hi] > b ? lmax[span_hi] : b;                                         \
                span_hi--;                                                                         \
            }                                                                                      \
            if (span_lo > span_hi) break;                                                          \
            span_lo >>= 1;                                                                         \
            span_hi >>= 1;                                                                         \
        }                                                                                          \
        *mn = a;                                                                                   \
        *mx = b;                                                                                   \
    } while (0)

static void table_query_int(const range_table *t, int64_t lo, int64_t hi, int32_t *mn,
                            int32_t *mx) {
    TABLE_QUERY(int32_t, t->ivals, t->imin, t->imax);
}

static void table_query_float(const range_table *t, int64_t lo, int64_t hi, float *mn, float *mx) {
    TABLE_QUERY(float, t->fvals, t->fmin, t->fmax);
}

/* ---- abstract values ---- */

typedef struct ival {
    int64_t lo, hi; /* IR_INT */
    float flo, fhi; /* IR_FLOAT: non-NaN values */
    uint8_t tri;    /* IR_BOOL */
    uint8_t nan;    /* IR_FLOAT: may be NaN */
} ival;

size_t mod_interval_scratch_size(const ir_mod *m) {
    return m ? (size_t)m->num_nodes * sizeof(ival) : 0;
}

static inline void set_int(ival *r, int64_t lo, int64_t hi) {
    if (lo < INT32_MIN || hi > INT32_MAX) {
        lo = INT32_MIN; /* may wrap: any int32 */
        hi = INT32_MAX;
    }
    r->lo = lo;
    r->hi = hi;
}

static inline void set_float_full(ival *r, int nan) {
    r->flo = -INFINITY;
    r->fhi = INFINITY;
    r->nan = (uint8_t)nan;
}

static inline void set_float(ival *r, float lo, float hi, int nan) {
    if (lo != lo || hi != hi) {
        set_float_full(r, 1);
        return;
    }
    r->flo = lo;
    r->fhi = hi;
    r->nan = (uint8_t)(nan != 0);
}

/* n ulps toward -inf / +inf */
static inline float down(float x, int n) {
    for (int i = 0; i < n; i++)
        x = nextafterf(x, -INFINITY);
    return x;
}

static inline float up(float x, int n) {
    for (int i = 0; i < n; i++)
        x = nextafterf(x, INFINITY);
    return x;
}

/* Ulps by which libm results are moved outward. Verdicts decide blocks that
 * a GPU then never evaluates, so they must also hold for device math
 * libraries, whose single-precision functions are a few ulps from exact
 * (not for fast-math intrinsics, which kernels must not use for mods). */
#define LIBM_ULPS 8
/* Absolute slack for tanh_approx, which GPUs evaluate with a hardware
 * approximation: comfortably above the documented error bound. */
#define TANH_APPROX_SLACK (1.0f / 256.0f)

static inline int contains_zero(const ival *a) {
    return a->flo <= 0.0f && a->fhi >= 0.0f;
}

static inline int has_inf(const ival *a) {
    return isinf(a->flo) || isinf(a->fhi);
}

static inline float fmin2(float a, float b) {
    return a < b ? a : b;
}

static inline float fmax2(float a, float b) {
    return a > b ? a : b;
}

static inline int64_t floor_div64(int64_t x, int64_t y) {
    int64_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) q--;
    return q;
}

static inline int32_t saturating_trunc(float x) {
    if (x != x) return 0;
    if (x >= 2147483648.0f) return INT32_MAX;
    if (x <= -2147483648.0f) return INT32_MIN;
    return (int32_t)x;
}

static inline uint8_t tri_of_bool(int v) {
    return v ? MOD_TRI_TRUE : MOD_TRI_FALSE;
}

static inline uint8_t tri_make(int may_true, int may_false) {
    return (uint8_t)((may_true ? MOD_TRI_TRUE : 0) | (may_false ? MOD_TRI_FALSE : 0));
}

/* tri with the true and false bits exchanged (logical not) */
static inline uint8_t tri_not(uint8_t t) {
    return (uint8_t)(((t & MOD_TRI_TRUE) ? MOD_TRI_FALSE : 0) |
                     ((t & MOD_TRI_FALSE) ? MOD_TRI_TRUE : 0));
}

/* An int view of an int or bool value (bools are 0/1). */
static inline void int_range(const ival *a, ir_type type, int64_t *lo, int64_t *hi) {
    if (type == IR_BOOL) {
        *lo = a->tri == MOD_TRI_TRUE ? 1 : 0;
        *hi = (a->tri & MOD_TRI_TRUE) ? 1 : 0;
    } else {
        *lo = a->lo;
        *hi = a->hi;
    }
}

/* A float view of an int or bool value (int -> float rounding is monotone). */
static inline void float_range(const ival *a, ir_type type, float *lo, float *hi, int *nan) {
    if (type == IR_FLOAT) {
        *lo = a->flo;
        *hi = a->fhi;
        *nan = a->nan;
    } else {
        int64_t l, h;
        int_range(a, type, &l, &h);
        *lo = (float)l;
        *hi = (float)h;
        *nan = 0;
    }
}

static int bits_for(int64_t x) /* smallest k with x < 2^k, for x >= 0 */
{
    int k = 0;
    while (k < 62 && ((int64_t)1 << k) <= x)
        k++;
    return k;
}

/* ---- per-op transfer functions ---- */

static void compare(const ir_node *nd, const ival *a, const ival *b, ir_type at, ival *r) {
    int may_true, may_false;
    ir_op op = (ir_op)nd->op;
    if (at == IR_FLOAT) {
        float alo = a->flo, ahi = a->fhi, blo = b->flo, bhi = b->fhi;
        int nan = a->nan || b->nan;
        switch (op) {
        case IR_EQ:
        case IR_NE:
            may_true = alo <= bhi && blo <= ahi;
            may_false = nan || !(alo == ahi && blo == bhi && alo == blo);
            r->tri = tri_make(may_true, may_false);
            if (op == IR_NE) r->tri = tri_not(r->tri); /* NaN != x is true */
            return;
        case IR_LT:
            may_true = alo < bhi;
            may_false = nan || ahi >= blo;
            break;
        case IR_LE:
            may_true = alo <= bhi;
            may_false = nan || ahi > blo;
            break;
        case IR_GT:
            may_true = ahi > blo;
            may_false = nan || alo <= bhi;
            break;
        default: /* IR_GE */
            may_true = ahi >= blo;
            may_false = nan || alo < bhi;
            break;
        }
        r->tri = tri_make(may_true, may_false);
        return;
    }
    int64_t alo, ahi, blo, bhi;
    int_range(a, at, &alo, &ahi);
    int_range(b, at, &blo, &bhi);
    switch (op) {
    case IR_EQ:
    case IR_NE:
        may_true = alo <= bhi && blo <= ahi;
        may_false = !(alo == ahi && blo == bhi && alo == blo);
        r->tri = tri_make(may_true, may_false);
        if (op == IR_NE) r->tri = tri_not(r->tri);
        return;
    case IR_LT:
        may_true = alo < bhi;
        may_false = ahi >= blo;
        break;
    case IR_LE:
        may_true = alo <= bhi;
        may_false = ahi > blo;
        break;
    case IR_GT:
        may_true = ahi > blo;
        may_false = alo <= bhi;
        break;
    default: /* IR_GE */
        may_true = ahi >= blo;
        may_false = alo < bhi;
        break;
    }
    r->tri = tri_make(may_true, may_false);
}

static void int_floordiv(const ival *a, const ival *b, ival *r) {
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    if (b->lo <= 0 && b->hi >= 0) lo = hi = 0; /* x // 0 == 0 */
    int64_t parts[2][2] = {{b->lo > 1 ? b->lo : 1, b->hi}, {b->lo, b->hi < -1 ? b->hi : -1}};
    for (int p = 0; p < 2; p++) {
        if (parts[p][0] > parts[p][1]) continue;
        /* floor(x / y) is monotone in each argument where y keeps its sign,
         * so the corners bound it */
        for (int i = 0; i < 4; i++) {
            int64_t x = (i & 1) ? a->hi : a->lo, y = parts[p][i >> 1];
            int64_t v = floor_div64(x, y);
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    }
    set_int(r, lo, hi);
}

static void int_mod(const ival *a, const ival *b, ival *r) {
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    if (b->lo <= 0 && b->hi >= 0) lo = hi = 0; /* x % 0 == 0 */
    /* positive divisors: result in [0, y - 1] */
    int64_t p1 = b->lo > 1 ? b->lo : 1, p2 = b->hi;
    if (p1 <= p2) {
        int64_t l, h;
        if (p1 == p2 && floor_div64(a->lo, p1) == floor_div64(a->hi, p1)) {
            int64_t k = floor_div64(a->lo, p1); /* one period: x - k*y, monotone */
            l = a->lo - k * p1;
            h = a->hi - k * p1;
        } else if (a->lo >= 0 && a->hi < p1) {
            l = a->lo;
            h = a->hi;
        } else {
            l = 0;
            h = p2 - 1;
            if (a->lo >= 0 && a->hi < h) h = a->hi;
        }
        lo = l < lo ? l : lo;
        hi = h > hi ? h : hi;
    }
    /* negative divisors: result in [y + 1, 0] */
    int64_t n1 = b->lo, n2 = b->hi < -1 ? b->hi : -1;
    if (n1 <= n2) {
        int64_t l, h;
        if (n1 == n2 && floor_div64(a->lo, n1) == floor_div64(a->hi, n1)) {
            int64_t k = floor_div64(a->lo, n1);
            l = a->lo - k * n1;
            h = a->hi - k * n1;
        } else if (a->hi <= 0 && a->lo > n2) {
            l = a->lo;
            h = a->hi;
        } else {
            l = n1 + 1;
            h = 0;
            if (a->hi <= 0 && a->lo > l) l = a->lo;
        }
        lo = l < lo ? l : lo;
        hi = h > hi ? h : hi;
    }
    set_int(r, lo, hi);
}

static void int_bitwise(ir_op op, const ival *a, const ival *b, ival *r) {
    if (a->lo == a->hi && b->lo == b->hi) {
        int32_t x = (int32_t)a->lo, y = (int32_t)b->lo;
        int32_t v = op == IR_AND ? (x & y) : op == IR_OR ? (x | y) : (x ^ y);
        set_int(r, v, v);
        return;
    }
    if (op == IR_AND) {
        /* a non-negative operand bounds the result from above and below */
        if (a->lo >= 0 && b->lo >= 0) {
            set_int(r, 0, a->hi < b->hi ? a->hi : b->hi);
        } else if (a->lo >= 0) {
            set_int(r, 0, a->hi);
        } else if (b->lo >= 0) {
            set_int(r, 0, b->hi);
        } else {
            set_int(r, INT32_MIN, INT32_MAX);
        }
        return;
    }
    if (a->lo >= 0 && b->lo >= 0) {
        int64_t m = a->hi > b->hi ? a->hi : b->hi;
        int64_t top = ((int64_t)1 << bits_for(m)) - 1;
        int64_t lo = op == IR_OR ? (a->lo > b->lo ? a->lo : b->lo) : 0;
        set_int(r, lo, top);
        return;
    }
    set_int(r, INT32_MIN, INT32_MAX);
}

static void float_arith(ir_op op, const ival *a, const ival *b, ival *r) {
    float alo = a->flo, ahi = a->fhi, blo = b->flo, bhi = b->fhi;
    int nan = a->nan || b->nan;
    switch (op) {
    case IR_ADD:
        if ((ahi == INFINITY && blo == -INFINITY) || (alo == -INFINITY && bhi == INFINITY)) {
            set_float_full(r, 1);
            return;
        }
        set_float(r, alo + blo, ahi + bhi, nan);
        return;
    case IR_SUB:
        if ((ahi == INFINITY && bhi == INFINITY) || (alo == -INFINITY && blo == -INFINITY)) {
            set_float_full(r, 1);
            return;
        }
        set_float(r, alo - bhi, ahi - blo, nan);
        return;
    case IR_MUL: {
        if ((contains_zero(a) && has_inf(b)) || (contains_zero(b) && has_inf(a))) {
            set_float_full(r, 1);
            return;
        }
        float c0 = alo * blo, c1 = alo * bhi, c2 = ahi * blo, c3 = ahi * bhi;
        set_float(r, fmin2(fmin2(c0, c1), fmin2(c2, c3)), fmax2(fmax2(c0, c1), fmax2(c2, c3)), nan);
        return;
    }
    case IR_DIV:
    case IR_FLOORDIV: {
        if (contains_zero(b) || (has_inf(a) && has_inf(b))) {
            set_float_full(r, 1);
            return;
        }
        float c0 = alo / blo, c1 = alo / bhi, c2 = ahi / blo, c3 = ahi / bhi;
        float lo = fmin2(fmin2(c0, c1), fmin2(c2, c3));
        float hi = fmax2(fmax2(c0, c1), fmax2(c2, c3));
        if (op == IR_FLOORDIV) {
            lo = floorf(lo);
            hi = floorf(hi);
        }
        set_float(r, lo, hi, nan);
        return;
    }
    case IR_MOD: {
        /* fmod(x, y) then moved to the divisor's sign: |result| <= |y| */
        nan = nan || has_inf(a) || contains_zero(b);
        if (blo > 0.0f && alo >= 0.0f && ahi < blo) {
            set_float(r, alo, ahi, nan);
        } else if (blo > 0.0f) {
            set_float(r, 0.0f, bhi, nan);
        } else if (bhi < 0.0f) {
            set_float(r, blo, 0.0f, nan);
        } else {
            set_float(r, fmin2(blo, 0.0f), fmax2(bhi, 0.0f), nan);
        }
        return;
    }
    case IR_POW: {
        /* x^y = exp(y ln x) for x > 0: y ln x is bilinear in (y, ln x), so
         * the corners bound it; anything else is left unbounded */
        if (alo > 0.0f && !has_inf(a) && !has_inf(b)) {
            float c0 = powf(alo, blo), c1 = powf(alo, bhi), c2 = powf(ahi, blo),
                  c3 = powf(ahi, bhi);
            float lo = fmin2(fmin2(c0, c1), fmin2(c2, c3));
            float hi = fmax2(fmax2(c0, c1), fmax2(c2, c3));
            set_float(r, fmax2(down(lo, LIBM_ULPS), 0.0f), up(hi, LIBM_ULPS), nan);
            return;
        }
        set_float_full(r, 1);
        return;
    }
    case IR_MIN:
        set_float(r, fmin2(alo, blo), fmin2(ahi, bhi), nan);
        return;
    case IR_MAX:
        set_float(r, fmax2(alo, blo), fmax2(ahi, bhi), nan);
        return;
    default:
        set_float_full(r, 1);
        return;
    }
}

/* Monotone non-decreasing libm function applied to the end points, moved
 * outward, clamped to the function's range. */
static void float_monotone(float (*f)(float), const ival *a, float range_lo, float range_hi,
                           ival *r) {
    float lo = down(f(a->flo), LIBM_ULPS), hi = up(f(a->fhi), LIBM_ULPS);
    set_float(r, fmax2(lo, range_lo), fmin2(hi, range_hi), a->nan);
}

/* The interval of int node `arg`, a branch of a select whose condition is
 * node `cond`, on the branch's side of the condition (taken: where it
 * holds; else where it fails): where the condition compares that very node
 * with another int, by <, <=, > or >=, the branch's values lie on that side
 * of the other's interval (where(n < 8, n, m) takes n only below 8). *empty
 * is set when no value of the node is on that side. Otherwise the node's
 * own interval. */
static ival narrowed_branch(const ir_node *nodes, const ival *v, int cond, int arg, int taken,
                            int *empty) {
    ival r = v[arg];
    const ir_node *c = &nodes[cond];
    int op = c->op;
    if ((op != IR_LT && op != IR_LE && op != IR_GT && op != IR_GE) || c->nargs != 2 ||
        nodes[c->args[0]].type != IR_INT)
        return r;
    int other;
    if (c->args[0] == arg) {
        other = c->args[1];
    } else if (c->args[1] == arg) { /* other OP arg: arg's side is the mirror */
        other = c->args[0];
        op = op == IR_LT ? IR_GT : op == IR_LE ? IR_GE : op == IR_GT ? IR_LT : IR_LE;
    } else {
        return r;
    }
    if (!taken) /* the condition fails: the opposite relation holds */
        op = op == IR_LT ? IR_GE : op == IR_LE ? IR_GT : op == IR_GT ? IR_LE : IR_LT;
    const ival *o = &v[other];
    if (op == IR_LT && o->hi - 1 < r.hi) r.hi = o->hi - 1;
    if (op == IR_LE && o->hi < r.hi) r.hi = o->hi;
    if (op == IR_GT && o->lo + 1 > r.lo) r.lo = o->lo + 1;
    if (op == IR_GE && o->lo > r.lo) r.lo = o->lo;
    if (r.lo > r.hi) {
        *empty = 1;
        r = v[arg];
    }
    return r;
}

/* The scalar semantics' formula (two forms so that exp never overflows). */
static float sigmoid_ref(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

static float rsqrt_ref(float x) {
    return 1.0f / sqrtf(x);
}

static void float_unary(ir_op op, const ival *a, ival *r) {
    float lo = a->flo, hi = a->fhi;
    switch (op) {
    case IR_NEG:
        set_float(r, -hi, -lo, a->nan);
        return;
    case IR_ABS:
        if (lo >= 0.0f)
            set_float(r, lo, hi, a->nan);
        else if (hi <= 0.0f)
            set_float(r, -hi, -lo, a->nan);
        else
            set_float(r, 0.0f, fmax2(-lo, hi), a->nan);
        return;
    case IR_FLOOR:
        set_float(r, floorf(lo), floorf(hi), a->nan);
        return;
    case IR_CEIL:
        set_float(r, ceilf(lo), ceilf(hi), a->nan);
        return;
    case IR_EXP:
        float_monotone(expf, a, 0.0f, INFINITY, r);
        return;
    case IR_EXP2:
        float_monotone(exp2f, a, 0.0f, INFINITY, r);
        return;
    case IR_TANH:
        float_monotone(tanhf, a, -1.0f, 1.0f, r);
        return;
    case IR_TANH_APPROX:
        float_monotone(tanhf, a, -1.0f, 1.0f, r);
        if (r->flo > -INFINITY) r->flo -= TANH_APPROX_SLACK;
        if (r->fhi < INFINITY) r->fhi += TANH_APPROX_SLACK;
        return;
    case IR_SIGMOID:
        float_monotone(sigmoid_ref, a, 0.0f, 1.0f, r);
        return;
    case IR_LOG:
    case IR_LOG2:
    case IR_SQRT: {
        if (hi < 0.0f) {
            set_float_full(r, 1);
            return;
        }
        float (*f)(float) = op == IR_LOG ? logf : op == IR_LOG2 ? log2f : sqrtf;
        float l = lo > 0.0f ? lo : 0.0f;
        set_float(r, down(f(l), LIBM_ULPS), up(f(hi), LIBM_ULPS), a->nan || lo < 0.0f);
        return;
    }
    case IR_RSQRT:
        if (lo > 0.0f) {
            set_float(r, fmax2(down(rsqrt_ref(hi), LIBM_ULPS), 0.0f), up(rsqrt_ref(lo), LIBM_ULPS),
                      a->nan);
        } else {
            set_float_full(r, 1);
        }
        return;
    case IR_SIN:
    case IR_COS:
        set_float(r, -1.0f, 1.0f, a->nan || has_inf(a));
        return;
    default: /* IR_TAN and anything unforeseen */
        set_float_full(r, 1);
        return;
    }
}

/* Range of a buffer over a box of indices (each within the buffer). */
static void load_range(const range_table *t, const int64_t *ilo, const int64_t *ihi, ival *r,
                       ir_type type) {
    int nd = t->ndim;
    int64_t rows = 1;
    for (int d = 0; d < nd - 1; d++)
        rows *= ihi[d] - ilo[d] + 1;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    float fmn = INFINITY, fmx = -INFINITY;
    /* up to a few rows: one exact query per row of the last dim; beyond
     * that, the linear span from the first to the last element */
    if (rows <= 32) {
        int64_t idx[4];
        for (int d = 0; d < nd; d++)
            idx[d] = ilo[d];
        for (;;) {
            int64_t off = 0;
            for (int d = 0; d < nd - 1; d++)
                off = off * t->sizes[d] + idx[d];
            off *= t->sizes[nd - 1];
            int64_t lo = off + ilo[nd - 1], hi = off + ihi[nd - 1];
            if (t->is_float)
                table_query_float(t, lo, hi, &fmn, &fmx);
            else
                table_query_int(t, lo, hi, &mn, &mx);
            int d = nd - 2;
            for (; d >= 0; d--) {
                if (++idx[d] <= ihi[d]) break;
                idx[d] = ilo[d];
            }
            if (d < 0) break;
        }
    } else {
        int64_t lo = 0, hi = 0;
        for (int d = 0; d < nd; d++) {
            lo = lo * t->sizes[d] + ilo[d];
            hi = hi * t->sizes[d] + ihi[d];
        }
        if (t->is_float)
            table_query_float(t, lo, hi, &fmn, &fmx);
        else
            table_query_int(t, lo, hi, &mn, &mx);
    }
    if (t->is_float) {
        if (fmn > fmx)
            set_float_full(r, 1); /* only NaN elements */
        else
            set_float(r, fmn, fmx, t->has_nan);
        if (type != IR_FLOAT) set_float_full(r, 1);
    } else if (type == IR_BOOL) {
        r->tri = tri_make(mx >= 1, mn <= 0);
    } else {
        set_int(r, mn, mx);
    }
}

/*
 * Abstract values of every node of m over box into v (m->num_nodes entries).
 * score is the range the score takes (NULL: any float, NaN included). A
 * buffer read the tables cannot bound (no table, or an index that may be
 * out of range) fails the analysis (returns 0) with LOADS_STRICT, is taken as
 * any value of its type with LOADS_ANY, and with LOADS_FINITE as any value,
 * a float one finite (a bound that only ever serves to give up on a proof,
 * never to make one). 1 on success.
 */
enum { LOADS_ANY = 0, LOADS_STRICT = 1, LOADS_FINITE = 2 };

static int analyse_nodes(const ir_mod *m, const mod_range_tables *tables, const mod_box *box,
                         const ival *score, ival *v, int strict_loads) {
    const ir_node *nodes = m->nodes;
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *nd = &nodes[i];
        ival *r = &v[i];
        const ival *a = nd->nargs > 0 ? &v[nd->args[0]] : NULL;
        const ival *b = nd->nargs > 1 ? &v[nd->args[1]] : NULL;
        ir_type type = (ir_type)nd->type;
        ir_op op = (ir_op)nd->op;
        switch (op) {
        case IR_CONST:
            if (type == IR_FLOAT)
                set_float(r, nd->imm.f, nd->imm.f, 0);
            else if (type == IR_BOOL)
                r->tri = tri_of_bool(nd->imm.i);
            else
                r->lo = r->hi = nd->imm.i;
            continue;
        case IR_B:
        case IR_H:
        case IR_Q:
        case IR_KV: {
            int k = op - IR_B;
            set_int(r, box->lo[k], box->hi[k]);
            continue;
        }
        case IR_SCORE:
            if (score)
                *r = *score;
            else
                set_float_full(r, 1);
            continue;
        case IR_LOAD: {
            const range_table *t = tables && nd->buffer >= 0 && nd->buffer < IR_MAX_BUFFERS
                                       ? &tables->table[nd->buffer]
                                       : NULL;
            int bounded = t && t->present && t->ndim == nd->nargs && t->count > 0;
            int64_t ilo[4], ihi[4];
            for (int d = 0; bounded && d < nd->nargs; d++) {
                const ival *x = &v[nd->args[d]];
                if (x->lo < 0 || x->hi >= t->sizes[d]) bounded = 0; /* may be out of range */
                ilo[d] = x->lo;
                ihi[d] = x->hi;
            }
            if (bounded)
                load_range(t, ilo, ihi, r, type);
            else if (strict_loads == LOADS_STRICT)
                return 0;
            else if (type == IR_FLOAT && strict_loads == LOADS_FINITE)
                set_float(r, -FLT_MAX, FLT_MAX, 0);
            else if (type == IR_FLOAT)
                set_float_full(r, 1);
            else if (type == IR_BOOL)
                r->tri = MOD_TRI_UNKNOWN;
            else
                set_int(r, INT32_MIN, INT32_MAX);
            continue;
        }
        case IR_SELECT: {
            const ival *x = &v[nd->args[1]], *y = &v[nd->args[2]];
            uint8_t c = a->tri;
            ival xn, yn;
            if (type == IR_INT) { /* each branch under its side of the condition */
                int x_empty = 0, y_empty = 0;
                xn = narrowed_branch(nodes, v, nd->args[0], nd->args[1], 1, &x_empty);
                yn = narrowed_branch(nodes, v, nd->args[0], nd->args[2], 0, &y_empty);
                x = &xn, y = &yn;
                if (x_empty && !y_empty) c = MOD_TRI_FALSE;
                if (y_empty && !x_empty) c = MOD_TRI_TRUE;
            }
            if (c == MOD_TRI_TRUE) {
                *r = *x;
            } else if (c == MOD_TRI_FALSE) {
                *r = *y;
            } else if (type == IR_FLOAT) {
                set_float(r, fmin2(x->flo, y->flo), fmax2(x->fhi, y->fhi), x->nan || y->nan);
            } else if (type == IR_BOOL) {
                r->tri = x->tri | y->tri;
            } else {
                set_int(r, x->lo < y->lo ? x->lo : y->lo, x->hi > y->hi ? x->hi : y->hi);
            }
            continue;
        }
        case IR_EQ:
        case IR_NE:
        case IR_LT:
        case IR_LE:
        case IR_GT:
        case IR_GE:
            compare(nd, a, b, (ir_type)nodes[nd->args[0]].type, r);
            continue;
        case IR_NOT:
            r->tri = tri_not(a->tri);
            continue;
        case IR_TO_FLOAT: {
            float lo, hi;
            int nan;
            float_range(a, (ir_type)nodes[nd->args[0]].type, &lo, &hi, &nan);
            set_float(r, lo, hi, nan);
            continue;
        }
        case IR_TO_INT: {
            ir_type at = (ir_type)nodes[nd->args[0]].type;
            if (at == IR_FLOAT) {
                int64_t lo = saturating_trunc(a->flo), hi = saturating_trunc(a->fhi);
                if (a->nan) {
                    lo = lo < 0 ? lo : 0; /* NaN -> 0 */
                    hi = hi > 0 ? hi : 0;
                }
                set_int(r, lo, hi);
            } else {
                int64_t lo, hi;
                int_range(a, at, &lo, &hi);
                set_int(r, lo, hi);
            }
            continue;
        }
        default:
            break;
        }
        if (type == IR_BOOL) {
            /* logical ops and min/max on bools */
            uint8_t x = a->tri, y = b ? b->tri : 0;
            int xt = (x & MOD_TRI_TRUE) != 0, xf = (x & MOD_TRI_FALSE) != 0;
            int yt = (y & MOD_TRI_TRUE) != 0, yf = (y & MOD_TRI_FALSE) != 0;
            switch (op) {
            case IR_AND:
            case IR_MIN:
                r->tri = tri_make(xt && yt, xf || yf);
                break;
            case IR_OR:
            case IR_MAX:
                r->tri = tri_make(xt || yt, xf && yf);
                break;
            case IR_XOR:
                r->tri = tri_make((xt && yf) || (xf && yt), (xt && yt) || (xf && yf));
                break;
            default:
                r->tri = MOD_TRI_UNKNOWN;
                break;
            }
            continue;
        }
        if (type == IR_INT) {
            switch (op) {
            case IR_NEG:
                set_int(r, -a->hi, -a->lo);
                break;
            case IR_BITNOT:
                set_int(r, -a->hi - 1, -a->lo - 1);
                break;
            case IR_ABS:
                if (a->lo >= 0)
                    set_int(r, a->lo, a->hi);
                else if (a->hi <= 0)
                    set_int(r, -a->hi, -a->lo);
                else
                    set_int(r, 0, -a->lo > a->hi ? -a->lo : a->hi);
                break;
            case IR_ADD:
                set_int(r, a->lo + b->lo, a->hi + b->hi);
                break;
            case IR_SUB:
                set_int(r, a->lo - b->hi, a->hi - b->lo);
                break;
            case IR_MUL: {
                int64_t c0 = a->lo * b->lo, c1 = a->lo * b->hi, c2 = a->hi * b->lo,
                        c3 = a->hi * b->hi;
                int64_t lo = c0 < c1 ? c0 : c1, hi = c0 > c1 ? c0 : c1;
                lo = c2 < lo ? c2 : lo;
                lo = c3 < lo ? c3 : lo;
                hi = c2 > hi ? c2 : hi;
                hi = c3 > hi ? c3 : hi;
                set_int(r, lo, hi);
                break;
            }
            case IR_DIV: /* int meaning: floor division */
            case IR_FLOORDIV:
                int_floordiv(a, b, r);
                break;
            case IR_FLOOR:
            case IR_CEIL:
                *r = *a;
                break; /* identity on ints */
            case IR_MOD:
                int_mod(a, b, r);
                break;
            case IR_MIN:
                set_int(r, a->lo < b->lo ? a->lo : b->lo, a->hi < b->hi ? a->hi : b->hi);
                break;
            case IR_MAX:
                set_int(r, a->lo > b->lo ? a->lo : b->lo, a->hi > b->hi ? a->hi : b->hi);
                break;
            case IR_AND:
            case IR_OR:
            case IR_XOR:
                int_bitwise(op, a, b, r);
                break;
            default:
                set_int(r, INT32_MIN, INT32_MAX);
                break;
            }
            continue;
        }
        /* IR_FLOAT */
        if (nd->nargs == 1)
            float_unary(op, a, r);
        else
            float_arith(op, a, b, r);
    }
    return 1;
}

/* 1 when box holds no point: nothing to claim about it. */
static int box_empty(const mod_box *box) {
    for (int d = 0; d < 4; d++)
        if (box->lo[d] > box->hi[d]) return 1;
    return 0;
}

/*
 * The verdict for box. tables may be NULL when m reads no buffer. scratch
 * must hold mod_interval_scratch_size(m) bytes aligned for int64_t; it is
 * borrowed for the call. Reentrant: concurrent calls need their own scratch.
 */
mod_tri mod_interval_mask(const ir_mod *m, const mod_range_tables *tables, const mod_box *box,
                          void *scratch) {
    if (!m || !box || !scratch || m->num_nodes <= 0 || box_empty(box)) return MOD_TRI_UNKNOWN;
    ival *v = scratch;
    if (!analyse_nodes(m, tables, box, NULL, v, LOADS_STRICT)) return MOD_TRI_UNKNOWN;
    const ir_node *root = &m->nodes[m->root];
    if (root->type != IR_BOOL) return MOD_TRI_UNKNOWN;
    uint8_t t = v[m->root].tri;
    return t == MOD_TRI_TRUE ? MOD_TRI_TRUE : t == MOD_TRI_FALSE ? MOD_TRI_FALSE : MOD_TRI_UNKNOWN;
}

mod_tri mod_interval_score_kept(const ir_mod *m, const mod_range_tables *tables,
                                const mod_box *box, void *scratch) {
    if (!m || !box || !scratch || m->num_nodes <= 0 || box_empty(box)) return MOD_TRI_UNKNOWN;
    if (m->nodes[m->root].type != IR_FLOAT) return MOD_TRI_UNKNOWN;
    ival *v = scratch;
    /* Masked: with the score any float (NaN and the infinities included),
     * the result is -inf and never NaN at every point. */
    if (!analyse_nodes(m, tables, box, NULL, v, LOADS_STRICT)) return MOD_TRI_UNKNOWN;
    const ival *res = &v[m->root];
    if (!res->nan && res->fhi == -INFINITY) return MOD_TRI_FALSE;
    /* Kept: score 0 is a witness that no point is masked whatever the
     * score, when the result for it stays above -inf (NaN is not -inf). */
    ival zero;
    memset(&zero, 0, sizeof zero);
    set_float(&zero, 0.0f, 0.0f, 0);
    if (!analyse_nodes(m, tables, box, &zero, v, LOADS_STRICT)) return MOD_TRI_UNKNOWN;
    return v[m->root].flo > -INFINITY ? MOD_TRI_TRUE : MOD_TRI_UNKNOWN;
}

int mod_interval_score_never_masked(const ir_mod *m, const mod_box *box) {
    if (!m || !box || m->num_nodes <= 0 || box_empty(box)) return 0;
    if (m->nodes[m->root].type != IR_FLOAT) return 0;
    ival *v = malloc(mod_interval_scratch_size(m));
    if (!v) return 0;
    ival zero;
    memset(&zero, 0, sizeof zero);
    set_float(&zero, 0.0f, 0.0f, 0);
    analyse_nodes(m, NULL, box, &zero, v, LOADS_FINITE);
    int kept = v[m->root].flo > -INFINITY;
    free(v);
    return kept;
}

/* The ranges of every node of m over box for code generation, buffer
 * reads taken as any int32 (malloc'd; NULL for an empty box or no memory). */
static ival *ranges_for_codegen(const ir_mod *m, const mod_box *box) {
    if (!m || !box || m->num_nodes <= 0 || box_empty(box)) return NULL;
    ival *v = malloc(mod_interval_scratch_size(m));
    if (v) analyse_nodes(m, NULL, box, NULL, v, LOADS_ANY);
    return v;
}

int mod_interval_loads_in_range(const ir_mod *m, const mod_box *box, const int64_t (*sizes)[4],
                                unsigned char *in_range) {
    ival *v = sizes ? ranges_for_codegen(m, box) : NULL;
    if (!v) return -1;
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *nd = &m->nodes[i];
        int ok = nd->op == IR_LOAD && nd->buffer >= 0 && nd->buffer < m->num_buffers &&
                 nd->nargs == m->buffers[(int)nd->buffer].ndim;
        for (int d = 0; ok && d < nd->nargs; d++) {
            const ival *x = &v[nd->args[d]];
            ok = x->lo >= 0 && x->hi < sizes[(int)nd->buffer][d];
        }
        in_range[i] = (unsigned char)ok;
    }
    free(v);
    return 0;
}

int mod_interval_near_floats_and_signs(const ir_mod *m, const mod_box *box, float limit,
                                       unsigned char *near, unsigned char *sign) {
    ival *v = ranges_for_codegen(m, box);
    if (!v) return -1;
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_type t = m->nodes[i].type;
        near[i] = t == IR_FLOAT && v[i].flo >= -limit && v[i].fhi <= limit;
        sign[i] = t != IR_INT      ? MOD_SIGN_ANY
                  : v[i].lo >= 1   ? MOD_SIGN_POSITIVE
                  : v[i].lo >= 0   ? MOD_SIGN_NONNEGATIVE
                                   : MOD_SIGN_ANY;
    }
    free(v);
    return 0;
}

int mod_interval_ints_within(const ir_mod *m, const mod_box *box, int64_t limit,
                             unsigned char *within) {
    ival *v = ranges_for_codegen(m, box);
    if (!v) return -1;
    for (int i = 0; i < m->num_nodes; i++)
        within[i] = m->nodes[i].type == IR_INT && v[i].lo >= -limit && v[i].hi <= limit;
    free(v);
    return 0;
}
