/*
 * The fp64 backward oracle (see oracle_backward.h). One query row at a time:
 * scores, mask and mod over every key, the softmax, then the gradients by
 * their textbook formulas. No blocking, no use of the block mask.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/derive.h"
#include "oracle_backward.h"

/* One float buffer read whose gradient is wanted. */
typedef struct wanted_load {
    int grad;  /* index into the caller's buffer_grads */
    int deriv; /* node of d(mod)/d(value read) */
    int load;  /* the IR_LOAD node (its args are the indices) */
    int64_t dense_strides[4];
} wanted_load;

int oracle_backward(const oracle_problem *p, const flex_tensor *dout, double *dq, double *dk,
                    double *dv, const oracle_buffer_grad *buffer_grads, int num_buffer_grads,
                    char *err, size_t err_cap) {
    int64_t B = p->q.sizes[0], Hq = p->q.sizes[1], Lq = p->q.sizes[2], D = p->q.sizes[3];
    int64_t Hkv = p->k.sizes[1], Lkv = p->k.sizes[2], Dv = p->v.sizes[3];
    int64_t group = Hkv > 0 ? Hq / Hkv : 1;
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    if (err_cap) err[0] = '\0';
    if (p->rows) {
        snprintf(err, err_cap, "oracle_backward: rows must be NULL");
        return -1;
    }
    if (dq) memset(dq, 0, (size_t)(B * Hq * Lq * D) * sizeof(double));
    if (dk) memset(dk, 0, (size_t)(B * Hkv * Lkv * D) * sizeof(double));
    if (dv) memset(dv, 0, (size_t)(B * Hkv * Lkv * Dv) * sizeof(double));

    int rc = 0;
    ir_mod dir;
    int have_dir = 0;
    mod_derivative der;
    wanted_load wanted[MOD_DERIVE_MAX_LOADS];
    int num_wanted = 0;
    mod_buffer_view sviews[IR_MAX_BUFFERS], mviews[IR_MAX_BUFFERS];
    void *scopies[IR_MAX_BUFFERS] = {0}, *mcopies[IR_MAX_BUFFERS] = {0};
    double *s = NULL, *g = NULL, *P = NULL, *dsp = NULL, *scratch = NULL, *dl = NULL;
    int64_t *flat = NULL;
    unsigned char *keep = NULL;

    if (num_buffer_grads > 0 && !p->score_mod) {
        snprintf(err, err_cap, "oracle_backward: buffer gradients need a score mod");
        return -1;
    }
    if (p->score_mod) {
        if (ir_copy(&dir, &p->score_mod->ir) != 0) {
            snprintf(err, err_cap, "oracle_backward: out of memory");
            return -1;
        }
        have_dir = 1;
        if (mod_derive(&dir, &der) != 0) {
            snprintf(err, err_cap, "oracle_backward: the score mod cannot be differentiated");
            rc = -1;
            goto done;
        }
        for (int k = 0; k < num_buffer_grads; k++) {
            int buffer = -1;
            for (int j = 0; j < dir.num_buffers; j++)
                if (!strcmp(dir.buffers[j].name, buffer_grads[k].name)) buffer = j;
            if (buffer < 0) {
                snprintf(err, err_cap, "oracle_backward: no buffer '%s'", buffer_grads[k].name);
                rc = -1;
                goto done;
            }
            const flex_tensor *view = &p->score_mod->views[buffer];
            for (int l = 0; l < der.num_loads; l++) {
                if (der.loads[l].buffer != buffer) continue;
                wanted_load *w = &wanted[num_wanted++];
                w->grad = k;
                w->deriv = der.loads[l].node;
                w->load = der.loads[l].load;
                int64_t st = 1;
                for (int d = view->ndim - 1; d >= 0; d--) {
                    w->dense_strides[d] = st;
                    st *= view->sizes[d];
                }
            }
        }
        if (flex_mod_host_views(p->ctx, p->score_mod, sviews, scopies) != FLEX_OK) {
            snprintf(err, err_cap, "score mod buffers: %s", flex_error_message(p->ctx));
            rc = -1;
            goto done;
        }
    }
    if (p->mask_mod && flex_mod_host_views(p->ctx, p->mask_mod, mviews, mcopies) != FLEX_OK) {
        snprintf(err, err_cap, "mask mod buffers: %s", flex_error_message(p->ctx));
        rc = -1;
        goto done;
    }

    int nodes = 1;
    if (have_dir && dir.num_nodes > nodes) nodes = dir.num_nodes;
    if (p->mask_mod && p->mask_mod->ir.num_nodes > nodes) nodes = p->mask_mod->ir.num_nodes;
    size_t n = (size_t)(Lkv > 0 ? Lkv : 1);
    s = malloc(n * sizeof *s);
    g = malloc(n * sizeof *g);
    P = malloc(n * sizeof *P);
    dsp = malloc(n * sizeof *dsp);
    keep = malloc(n);
    scratch = malloc((size_t)nodes * sizeof *scratch);
    dl = malloc((n * (size_t)num_wanted + 1) * sizeof *dl);
    flat = malloc((n * (size_t)num_wanted + 1) * sizeof *flat);
    if (!s || !g || !P || !dsp || !keep || !scratch || !dl || !flat) {
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
                    mod_bounds_error e;
                    memset(&e, 0, sizeof e);
                    double res;
                    keep[j] = 1;
                    if (p->mask_mod) {
                        if (mod_eval_point_f64(&p->mask_mod->ir, mviews, 0.0, (int32_t)b,
                                               (int32_t)h, (int32_t)i, (int32_t)j, scratch, &res,
                                               &e) != 0) {
                            mod_bounds_error_format(&p->mask_mod->ir, &e, err, err_cap);
                            rc = -1;
                            goto done;
                        }
                        keep[j] = res != 0.0;
                    }
                    if (!keep[j]) continue;
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += oracle_load(&p->q, b, h, i, d) * oracle_load(&p->k, b, hk, j, d);
                    s[j] = dot * scale;
                    g[j] = 1.0;
                    if (have_dir) {
                        /* The interpreter computes every node, so one pass gives
                         * the value and all the derivative nodes. */
                        if (mod_eval_point_f64(&dir, sviews, s[j], (int32_t)b, (int32_t)h,
                                               (int32_t)i, (int32_t)j, scratch, &res, &e) != 0) {
                            mod_bounds_error_format(&dir, &e, err, err_cap);
                            rc = -1;
                            goto done;
                        }
                        s[j] = scratch[der.value];
                        g[j] = scratch[der.dscore];
                        for (int w = 0; w < num_wanted; w++) {
                            const ir_node *load = &dir.nodes[wanted[w].load];
                            int64_t f = 0;
                            for (int d = 0; d < load->nargs; d++)
                                f += (int64_t)scratch[load->args[d]] * wanted[w].dense_strides[d];
                            dl[(size_t)w * n + (size_t)j] = scratch[wanted[w].deriv];
                            flat[(size_t)w * n + (size_t)j] = f;
                        }
                    }
                    if (s[j] == -INFINITY)
                        keep[j] = 0;
                    else if (s[j] > m || isnan(s[j]))
                        m = s[j];
                }
                double l = 0.0;
                for (int64_t j = 0; j < Lkv; j++) {
                    P[j] = keep[j] ? exp(s[j] - m) : 0.0;
                    l += P[j];
                }
                if (!(l > 0.0)) continue; /* an empty row has no gradient */
                double delta = 0.0;
                for (int64_t j = 0; j < Lkv; j++) {
                    P[j] /= l;
                    double dp = 0.0;
                    if (P[j] != 0.0)
                        for (int64_t c = 0; c < Dv; c++)
                            dp += oracle_load(dout, b, h, i, c) * oracle_load(&p->v, b, hk, j, c);
                    dsp[j] = dp; /* dP for now */
                    delta += P[j] * dp;
                }
                for (int64_t j = 0; j < Lkv; j++) {
                    if (P[j] == 0.0) continue;
                    if (dv)
                        for (int64_t c = 0; c < Dv; c++)
                            dv[((b * Hkv + hk) * Lkv + j) * Dv + c] +=
                                P[j] * oracle_load(dout, b, h, i, c);
                    double dS_mod = P[j] * (dsp[j] - delta);
                    if (dS_mod == 0.0) continue;
                    for (int w = 0; w < num_wanted; w++)
                        buffer_grads[wanted[w].grad].grad[flat[(size_t)w * n + (size_t)j]] +=
                            dS_mod * dl[(size_t)w * n + (size_t)j];
                    double dS = dS_mod * g[j] * scale;
                    if (dq)
                        for (int64_t d = 0; d < D; d++)
                            dq[((b * Hq + h) * Lq + i) * D + d] +=
                                dS * oracle_load(&p->k, b, hk, j, d);
                    if (dk)
                        for (int64_t d = 0; d < D; d++)
                            dk[((b * Hkv + hk) * Lkv + j) * D + d] +=
                                dS * oracle_load(&p->q, b, h, i, d);
                }
            }

done:
    free(s);
    free(g);
    free(P);
    free(dsp);
    free(keep);
    free(scratch);
    free(dl);
    free(flat);
    if (have_dir) ir_free(&dir);
    flex_mod_release_host_views(scopies);
    flex_mod_release_host_views(mcopies);
    return rc;
}
