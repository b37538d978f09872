/*
 * The fp64 oracle and the naive same-precision reference (see oracle.h).
 * Deliberately simple: passes per query row over every key, no blocking, no
 * shortcuts from the block mask, mods evaluated by refmod.c from their text.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "oracle.h"
#include "oracle_mod.h"

double oracle_load(const flex_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    int64_t off = i0 * t->strides[0] + i1 * t->strides[1] + i2 * t->strides[2] + i3 * t->strides[3];
    switch (t->dtype) {
    case FLEX_F16:
        return flex_f16_to_float(((const uint16_t *)t->data)[off]);
    case FLEX_BF16:
        return flex_bf16_to_float(((const uint16_t *)t->data)[off]);
    default:
        return ((const float *)t->data)[off];
    }
}

double oracle_round(flex_dtype dt, double x) {
    if (dt == FLEX_F32) return (double)(float)x;
    if (!isfinite(x) || x == 0.0) return x;
    /* Round to nearest even with 11 (f16) or 8 (bf16) significant bits;
     * f16 has subnormals below 2^-14 and overflows from 65520 on. */
    int bits = dt == FLEX_F16 ? 11 : 8;
    int e;
    frexp(x, &e); /* |x| in [2^(e-1), 2^e) */
    if (dt == FLEX_F16 && e - 1 < -14) e = -13;
    double ulp = ldexp(1.0, e - bits);
    double r = nearbyint(x / ulp) * ulp;
    if (dt == FLEX_F16 && fabs(r) >= 65520.0) return r > 0 ? INFINITY : -INFINITY;
    if (dt == FLEX_BF16) return (double)(float)r; /* bf16 shares float's range */
    return r;
}

/* How one oracle pass rounds: the fp64 oracle never; the naive reference
 * keeps sums in float and stores S, P, O (and the gradients) in the
 * inputs' dtype, as a framework composing matmul and softmax would. */
typedef struct arith {
    int naive;
    flex_dtype dt;
} arith;

static double acc(const arith *a, double x) {
    return a->naive ? (double)(float)x : x;
}

static double store(const arith *a, double x) {
    return a->naive ? oracle_round(a->dt, x) : x;
}

static int forward(const oracle_problem *p, const arith *ar, double *out, double *lse, char *err,
                   size_t err_cap) {
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], Dv = p->v.sizes[3];
    int64_t group = Hkv > 0 ? Hq / Hkv : 1;
    int64_t R = p->rows ? p->num_rows : Lq;
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    if (ar->naive) scale = (double)(float)scale;
    refmod_precision prec = ar->naive ? REFMOD_F32 : REFMOD_F64;
    if (err_cap) err[0] = '\0';

    oracle_mod smod, mmod;
    int rc = 0;
    memset(&mmod, 0, sizeof mmod);
    if (oracle_mod_open(p->ctx, p->score_mod, &smod, err, err_cap) != 0 ||
        oracle_mod_open(p->ctx, p->mask_mod, &mmod, err, err_cap) != 0) {
        oracle_mod_close(&smod);
        oracle_mod_close(&mmod);
        return -1;
    }
    double *s = malloc((size_t)(Lkv > 0 ? Lkv : 1) * sizeof(double));
    unsigned char *keep = malloc((size_t)(Lkv > 0 ? Lkv : 1));
    /* K and V of one (b, kv head) and the current query row, widened once. */
    double *kd = malloc((size_t)(Lkv * D > 0 ? Lkv * D : 1) * sizeof(double));
    double *vd = malloc((size_t)(Lkv * Dv > 0 ? Lkv * Dv : 1) * sizeof(double));
    double *qd = malloc((size_t)(D > 0 ? D : 1) * sizeof(double));
    int64_t loaded_b = -1, loaded_hk = -1;
    if (!s || !keep || !kd || !vd || !qd) {
        snprintf(err, err_cap, "oracle: out of memory");
        rc = -1;
        goto done;
    }

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t r = 0; r < R; r++) {
                int64_t i = p->rows ? p->rows[r] : r;
                int64_t hk = h / group;
                if (b != loaded_b || hk != loaded_hk) {
                    for (int64_t j = 0; j < Lkv; j++) {
                        for (int64_t d = 0; d < D; d++)
                            kd[j * D + d] = oracle_load(&p->k, b, hk, j, d);
                        for (int64_t c = 0; c < Dv; c++)
                            vd[j * Dv + c] = oracle_load(&p->v, b, hk, j, c);
                    }
                    loaded_b = b;
                    loaded_hk = hk;
                }
                for (int64_t d = 0; d < D; d++)
                    qd[d] = oracle_load(&p->q, b, h, i, d);
                double m = -INFINITY;
                for (int64_t j = 0; j < Lkv; j++) {
                    refmod_result res;
                    keep[j] = 1;
                    if (mmod.rm) {
                        if (refmod_eval(mmod.rm, prec, 0, 0.0, (int32_t)b, (int32_t)h, (int32_t)i,
                                        (int32_t)j, &res, err, err_cap) != 0) {
                            rc = -1;
                            goto done;
                        }
                        keep[j] = res.value != 0.0;
                    }
                    if (!keep[j]) continue;
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot = acc(ar, dot + qd[d] * kd[j * D + d]);
                    s[j] = store(ar, store(ar, dot) * scale);
                    if (smod.rm) {
                        if (refmod_eval(smod.rm, prec, 0, s[j], (int32_t)b, (int32_t)h, (int32_t)i,
                                        (int32_t)j, &res, err, err_cap) != 0) {
                            rc = -1;
                            goto done;
                        }
                        s[j] = store(ar, res.value);
                    }
                    /* A NaN or +inf score makes the row NaN, as in PyTorch
                     * (exp(inf - inf) is NaN). */
                    if (s[j] == -INFINITY)
                        keep[j] = 0;
                    else if (s[j] > m || isnan(s[j]))
                        m = s[j];
                    if (isnan(m)) break;
                }
                double *o = out + ((b * Hq + h) * R + r) * Dv;
                double *lse_at = lse ? lse + (b * Hq + h) * R + r : NULL;
                if (isnan(m) || m == INFINITY) {
                    for (int64_t c = 0; c < Dv; c++)
                        o[c] = NAN;
                    if (lse_at) *lse_at = NAN;
                    continue;
                }
                for (int64_t c = 0; c < Dv; c++)
                    o[c] = 0.0;
                double l = 0.0;
                for (int64_t j = 0; j < Lkv; j++)
                    if (keep[j]) l = acc(ar, l + acc(ar, exp(s[j] - m)));
                if (l > 0.0)
                    for (int64_t j = 0; j < Lkv; j++) {
                        if (!keep[j]) continue;
                        /* P = exp(s - m) / l, stored once by the naive reference. */
                        double w = store(ar, exp(s[j] - m) / l);
                        for (int64_t c = 0; c < Dv; c++)
                            o[c] = acc(ar, o[c] + w * vd[j * Dv + c]);
                    }
                for (int64_t c = 0; c < Dv; c++)
                    o[c] = store(ar, o[c]);
                if (lse_at) *lse_at = l > 0.0 ? acc(ar, m + log(l)) : -INFINITY;
            }
done:
    free(s);
    free(keep);
    free(kd);
    free(vd);
    free(qd);
    oracle_mod_close(&smod);
    oracle_mod_close(&mmod);
    return rc;
}

int oracle_forward(const oracle_problem *p, double *out, double *lse, char *err, size_t err_cap) {
    arith ar = {0, FLEX_F32};
    return forward(p, &ar, out, lse, err, err_cap);
}

int oracle_forward_naive(const oracle_problem *p, double *out, double *lse, char *err,
                         size_t err_cap) {
    arith ar = {1, p->q.dtype};
    return forward(p, &ar, out, lse, err, err_cap);
}

int oracle_approx_score_error(const oracle_problem *p, double *error, char *err, size_t err_cap) {
    *error = 0.0;
    if (!p->score_mod) return 0;
    oracle_mod smod, mmod;
    memset(&mmod, 0, sizeof mmod);
    int rc = -1;
    if (oracle_mod_open(p->ctx, p->score_mod, &smod, err, err_cap) != 0 ||
        oracle_mod_open(p->ctx, p->mask_mod, &mmod, err, err_cap) != 0)
        goto done;
    rc = 0;
    if (!refmod_uses_approx(smod.rm)) goto done;
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], group = Hkv > 0 ? Hq / Hkv : 1;
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++)
                for (int64_t j = 0; j < Lkv; j++) {
                    refmod_result res;
                    if (mmod.rm) {
                        if (refmod_eval(mmod.rm, REFMOD_F64, 0, 0.0, (int32_t)b, (int32_t)h,
                                        (int32_t)i, (int32_t)j, &res, err, err_cap) != 0) {
                            rc = -1;
                            goto done;
                        }
                        if (res.value == 0.0) continue;
                    }
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += oracle_load(&p->q, b, h, i, d) * oracle_load(&p->k, b, h / group, j, d);
                    /* the exact score, then both extremes of the error */
                    double rel[3] = {0.0, 0x1p-11, -0x1p-11}, value[3];
                    for (int e = 0; e < 3; e++) {
                        refmod_set_approx_error(smod.rm, rel[e]);
                        if (refmod_eval(smod.rm, REFMOD_F64, 0, dot * scale, (int32_t)b,
                                        (int32_t)h, (int32_t)i, (int32_t)j, &res, err,
                                        err_cap) != 0) {
                            rc = -1;
                            goto done;
                        }
                        value[e] = res.value;
                    }
                    for (int e = 1; e < 3; e++) {
                        double change = fabs(value[e] - value[0]);
                        if (isfinite(change) && change > *error) *error = change;
                    }
                }
done:
    oracle_mod_close(&smod);
    oracle_mod_close(&mmod);
    return rc;
}

double oracle_rel_error(const double *ref, const double *got, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        double d = got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    if (den == 0.0) return sqrt(num);
    return sqrt(num / den);
}

double oracle_lse_error(const double *ref, const double *got, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        int ref_empty = ref[i] == -INFINITY, got_empty = got[i] == -INFINITY;
        if (ref_empty || got_empty) {
            if (ref_empty != got_empty) return INFINITY;
            continue;
        }
        if (!isfinite(got[i])) return INFINITY;
        double scale = fabs(ref[i]) > 1.0 ? fabs(ref[i]) : 1.0;
        double e = fabs(got[i] - ref[i]) / scale;
        if (e > worst) worst = e;
    }
    return worst;
}
