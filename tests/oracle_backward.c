/*
 * The fp64 backward oracle and its naive same-precision twin (see
 * oracle_backward.h). One query row at a time: scores, mask and mod over
 * every key, the softmax, then the gradients by their textbook formulas. No
 * blocking, no use of the block mask. The score mod's derivatives (with
 * respect to the score and to every float buffer element it reads) come
 * from refmod.c's dual numbers, not from the library's derive.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "oracle_backward.h"
#include "oracle_mod.h"

/* As in oracle.c: the naive reference sums in float and stores S, P, dP, dS
 * and the gradients in the inputs' dtype. */
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

/* The partials of one (i, j) element: which caller gradient, which element. */
typedef struct element_partial {
    int grad;
    int64_t element;
    double d;
} element_partial;

static int find_grad(const oracle_buffer_grad *grads, int n, const char *name) {
    for (int k = 0; k < n; k++)
        if (!strcmp(grads[k].name, name)) return k;
    return -1;
}

static int backward(const oracle_problem *p, const arith *ar, const flex_tensor *dout, double *dq,
                    double *dk, double *dv, const oracle_buffer_grad *buffer_grads,
                    int num_buffer_grads, char *err, size_t err_cap) {
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], Dv = p->v.sizes[3];
    int64_t group = Hkv > 0 ? Hq / Hkv : 1;
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    if (ar->naive) scale = (double)(float)scale;
    refmod_precision prec = ar->naive ? REFMOD_F32 : REFMOD_F64;
    if (err_cap) err[0] = '\0';
    if (p->rows) {
        snprintf(err, err_cap, "oracle_backward: rows must be NULL");
        return -1;
    }
    if (num_buffer_grads > 0 && !p->score_mod) {
        snprintf(err, err_cap, "oracle_backward: buffer gradients need a score mod");
        return -1;
    }
    for (int k = 0; k < num_buffer_grads; k++) {
        int found = 0;
        for (int j = 0; j < p->score_mod->ir.num_buffers; j++)
            found |= !strcmp(p->score_mod->ir.buffers[j].name, buffer_grads[k].name);
        if (!found) {
            snprintf(err, err_cap, "oracle_backward: no buffer '%s'", buffer_grads[k].name);
            return -1;
        }
    }
    if (dq) memset(dq, 0, (size_t)(B * Hq * Lq * D) * sizeof(double));
    if (dk) memset(dk, 0, (size_t)(B * Hkv * Lkv * D) * sizeof(double));
    if (dv) memset(dv, 0, (size_t)(B * Hkv * Lkv * Dv) * sizeof(double));

    oracle_mod smod, mmod;
    memset(&mmod, 0, sizeof mmod);
    if (oracle_mod_open(p->ctx, p->score_mod, &smod, err, err_cap) != 0 ||
        oracle_mod_open(p->ctx, p->mask_mod, &mmod, err, err_cap) != 0) {
        oracle_mod_close(&smod);
        oracle_mod_close(&mmod);
        return -1;
    }
    int rc = 0;
    size_t n = (size_t)(Lkv > 0 ? Lkv : 1);
    double *s = malloc(n * sizeof *s), *g = malloc(n * sizeof *g), *P = malloc(n * sizeof *P);
    double *dsp = malloc(n * sizeof *dsp);
    unsigned char *keep = malloc(n);
    int *num_partials = calloc(n, sizeof *num_partials);
    element_partial *partials = malloc(n * REFMOD_MAX_PARTIALS * sizeof *partials);
    if (!s || !g || !P || !dsp || !keep || !num_partials || !partials) {
        snprintf(err, err_cap, "oracle_backward: out of memory");
        rc = -1;
        goto done;
    }

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t i = 0; i < Lq; i++) {
                int64_t hk = h / group;
                double m = -INFINITY;
                for (int64_t j = 0; j < Lkv; j++) {
                    refmod_result res;
                    keep[j] = 1;
                    num_partials[j] = 0;
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
                        dot = acc(ar, dot + oracle_load(&p->q, b, h, i, d) *
                                                oracle_load(&p->k, b, hk, j, d));
                    s[j] = store(ar, store(ar, dot) * scale);
                    g[j] = 1.0;
                    if (smod.rm) {
                        if (refmod_eval(smod.rm, prec, 1, s[j], (int32_t)b, (int32_t)h, (int32_t)i,
                                        (int32_t)j, &res, err, err_cap) != 0) {
                            rc = -1;
                            goto done;
                        }
                        s[j] = store(ar, res.value);
                        g[j] = res.dscore;
                        for (int k = 0; k < res.num_partials; k++) {
                            int grad = find_grad(buffer_grads, num_buffer_grads,
                                                 res.partials[k].buffer);
                            if (grad < 0) continue;
                            partials[j * REFMOD_MAX_PARTIALS + num_partials[j]++] =
                                (element_partial){grad, res.partials[k].element,
                                                  res.partials[k].d};
                        }
                    }
                    if (s[j] == -INFINITY)
                        keep[j] = 0;
                    else if (s[j] > m || isnan(s[j]))
                        m = s[j];
                }
                if (isnan(m) || m == INFINITY) {
                    /* A NaN row: its gradient and that of every key it
                     * attends are NaN, as PyTorch's autograd gives them. */
                    for (int64_t d = 0; dq && d < D; d++)
                        dq[((b * Hq + h) * Lq + i) * D + d] = NAN;
                    for (int64_t j = 0; j < Lkv; j++) {
                        if (!keep[j]) continue;
                        for (int64_t d = 0; dk && d < D; d++)
                            dk[((b * Hkv + hk) * Lkv + j) * D + d] = NAN;
                        for (int64_t c = 0; dv && c < Dv; c++)
                            dv[((b * Hkv + hk) * Lkv + j) * Dv + c] = NAN;
                    }
                    continue;
                }
                double l = 0.0;
                for (int64_t j = 0; j < Lkv; j++)
                    if (keep[j]) l = acc(ar, l + acc(ar, exp(s[j] - m)));
                if (!(l > 0.0)) continue; /* an empty row has no gradient */
                double delta = 0.0;
                for (int64_t j = 0; j < Lkv; j++) {
                    P[j] = keep[j] ? store(ar, exp(s[j] - m) / l) : 0.0;
                    double dp = 0.0;
                    if (P[j] != 0.0)
                        for (int64_t c = 0; c < Dv; c++)
                            dp = acc(ar, dp + oracle_load(dout, b, h, i, c) *
                                                  oracle_load(&p->v, b, hk, j, c));
                    dsp[j] = store(ar, dp); /* dP for now */
                    delta = acc(ar, delta + P[j] * dsp[j]);
                }
                for (int64_t j = 0; j < Lkv; j++) {
                    if (P[j] == 0.0) continue;
                    if (dv)
                        for (int64_t c = 0; c < Dv; c++) {
                            double *at = &dv[((b * Hkv + hk) * Lkv + j) * Dv + c];
                            *at = acc(ar, *at + P[j] * oracle_load(dout, b, h, i, c));
                        }
                    double dS_mod = store(ar, P[j] * (dsp[j] - delta));
                    if (dS_mod == 0.0) continue;
                    for (int k = 0; k < num_partials[j]; k++) {
                        const element_partial *ep = &partials[j * REFMOD_MAX_PARTIALS + k];
                        double *at = &buffer_grads[ep->grad].grad[ep->element];
                        *at = acc(ar, *at + dS_mod * ep->d);
                    }
                    double dS = store(ar, store(ar, dS_mod * g[j]) * scale);
                    if (dq)
                        for (int64_t d = 0; d < D; d++) {
                            double *at = &dq[((b * Hq + h) * Lq + i) * D + d];
                            *at = acc(ar, *at + dS * oracle_load(&p->k, b, hk, j, d));
                        }
                    if (dk)
                        for (int64_t d = 0; d < D; d++) {
                            double *at = &dk[((b * Hkv + hk) * Lkv + j) * D + d];
                            *at = acc(ar, *at + dS * oracle_load(&p->q, b, h, i, d));
                        }
                }
            }
    if (ar->naive) { /* the gradients as stored in the dtype */
        size_t counts[3] = {(size_t)(B * Hq * Lq * D), (size_t)(B * Hkv * Lkv * D),
                            (size_t)(B * Hkv * Lkv * Dv)};
        double *grads[3] = {dq, dk, dv};
        for (int t = 0; t < 3; t++)
            for (size_t e = 0; grads[t] && e < counts[t]; e++)
                grads[t][e] = store(ar, grads[t][e]);
        for (int k = 0; k < num_buffer_grads; k++) {
            const refmod_buffer *rb = NULL;
            for (int j = 0; j < smod.num_bufs; j++)
                if (!strcmp(smod.bufs[j].name, buffer_grads[k].name)) rb = &smod.bufs[j];
            size_t count = 1;
            for (int d = 0; rb && d < rb->ndim; d++)
                count *= (size_t)rb->sizes[d];
            for (size_t e = 0; rb && e < count; e++)
                buffer_grads[k].grad[e] = store(ar, buffer_grads[k].grad[e]);
        }
    }

done:
    free(s);
    free(g);
    free(P);
    free(dsp);
    free(keep);
    free(num_partials);
    free(partials);
    oracle_mod_close(&smod);
    oracle_mod_close(&mmod);
    return rc;
}

int oracle_backward(const oracle_problem *p, const flex_tensor *dout, double *dq, double *dk,
                    double *dv, const oracle_buffer_grad *buffer_grads, int num_buffer_grads,
                    char *err, size_t err_cap) {
    arith ar = {0, FLEX_F32};
    return backward(p, &ar, dout, dq, dk, dv, buffer_grads, num_buffer_grads, err, err_cap);
}

int oracle_backward_naive(const oracle_problem *p, const flex_tensor *dout, double *dq,
                          double *dk, double *dv, const oracle_buffer_grad *buffer_grads,
                          int num_buffer_grads, char *err, size_t err_cap) {
    arith ar = {1, p->q.dtype};
    return backward(p, &ar, dout, dq, dk, dv, buffer_grads, num_buffer_grads, err, err_cap);
}
