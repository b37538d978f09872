/*
 * The fp64 oracle (see oracle.h). Deliberately simple: two passes per query
 * row over every key, no blocking, no shortcuts from the block mask.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "oracle.h"

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

static void bounds_message(const flex_mod *mod, const mod_bounds_error *e, char *err, size_t cap) {
    mod_bounds_error_format(&mod->ir, e, err, cap);
}

int oracle_forward(const oracle_problem *p, double *out, double *lse, char *err, size_t err_cap) {
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], Dv = p->v.sizes[3];
    int64_t group = Hkv > 0 ? Hq / Hkv : 1;
    int64_t R = p->rows ? p->num_rows : Lq;
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    if (err_cap) err[0] = '\0';

    mod_buffer_view sviews[IR_MAX_BUFFERS], mviews[IR_MAX_BUFFERS];
    void *scopies[IR_MAX_BUFFERS] = {0}, *mcopies[IR_MAX_BUFFERS] = {0};
    if (p->score_mod && flex_mod_host_views(p->ctx, p->score_mod, sviews, scopies) != FLEX_OK) {
        snprintf(err, err_cap, "score mod buffers: %s", flex_error_message(p->ctx));
        return -1;
    }
    if (p->mask_mod && flex_mod_host_views(p->ctx, p->mask_mod, mviews, mcopies) != FLEX_OK) {
        snprintf(err, err_cap, "mask mod buffers: %s", flex_error_message(p->ctx));
        flex_mod_release_host_views(scopies);
        return -1;
    }
    int nodes = 1;
    if (p->score_mod && p->score_mod->ir.num_nodes > nodes) nodes = p->score_mod->ir.num_nodes;
    if (p->mask_mod && p->mask_mod->ir.num_nodes > nodes) nodes = p->mask_mod->ir.num_nodes;
    double *s = malloc((size_t)(Lkv > 0 ? Lkv : 1) * sizeof(double));
    unsigned char *keep = malloc((size_t)(Lkv > 0 ? Lkv : 1));
    double *scratch = malloc((size_t)nodes * sizeof(double));
    /* K and V of one (b, kv head) and the current query row, widened once. */
    double *kd = malloc((size_t)(Lkv * D > 0 ? Lkv * D : 1) * sizeof(double));
    double *vd = malloc((size_t)(Lkv * Dv > 0 ? Lkv * Dv : 1) * sizeof(double));
    double *qd = malloc((size_t)(D > 0 ? D : 1) * sizeof(double));
    int64_t loaded_b = -1, loaded_hk = -1;
    int rc = 0;
    if (!s || !keep || !scratch || !kd || !vd || !qd) {
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
                    mod_bounds_error e;
                    memset(&e, 0, sizeof e);
                    double res;
                    keep[j] = 1;
                    if (p->mask_mod) {
                        if (mod_eval_point_f64(&p->mask_mod->ir, mviews, 0.0, (int32_t)b,
                                               (int32_t)h, (int32_t)i, (int32_t)j, scratch, &res,
                                               &e) != 0) {
                            bounds_message(p->mask_mod, &e, err, err_cap);
                            rc = -1;
                            goto done;
                        }
                        keep[j] = res != 0.0;
                    }
                    if (!keep[j]) continue;
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += qd[d] * kd[j * D + d];
                    s[j] = dot * scale;
                    if (p->score_mod) {
                        if (mod_eval_point_f64(&p->score_mod->ir, sviews, s[j], (int32_t)b,
                                               (int32_t)h, (int32_t)i, (int32_t)j, scratch, &res,
                                               &e) != 0) {
                            bounds_message(p->score_mod, &e, err, err_cap);
                            rc = -1;
                            goto done;
                        }
                        s[j] = res;
                    }
                    if (s[j] == -INFINITY)
                        keep[j] = 0;
                    else if (s[j] > m || isnan(s[j]))
                        m = s[j];
                }
                double *o = out + ((b * Hq + h) * R + r) * Dv;
                for (int64_t c = 0; c < Dv; c++)
                    o[c] = 0.0;
                double l = 0.0;
                for (int64_t j = 0; j < Lkv; j++) {
                    if (!keep[j]) continue;
                    double w = exp(s[j] - m);
                    l += w;
                    for (int64_t c = 0; c < Dv; c++)
                        o[c] += w * vd[j * Dv + c];
                }
                if (l > 0.0)
                    for (int64_t c = 0; c < Dv; c++)
                        o[c] /= l;
                if (lse) lse[(b * Hq + h) * R + r] = l > 0.0 ? m + log(l) : -INFINITY;
            }
done:
    free(s);
    free(keep);
    free(scratch);
    free(kd);
    free(vd);
    free(qd);
    flex_mod_release_host_views(scopies);
    flex_mod_release_host_views(mcopies);
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
