/*
 * The fp64 oracle: naive dense attention in double precision that every
 * backend is compared with. It shares nothing with the backends, not even
 * the mod front end: for every (b, h, i, j) it evaluates the mask mod and the
 * score mod at that one element with the independent evaluator of refmod.h,
 * from the text the mod was compiled from, and does the softmax in double.
 *
 * Beside it, the naive same-precision reference: the same computation as a
 * framework composing matmul, softmax and matmul in the inputs' dtype would
 * do it. Its error against the oracle is the yardstick of the tolerance rule
 * (tolerance.h, docs/testing.md).
 */
#ifndef FLEXATTN_TESTS_ORACLE_H
#define FLEXATTN_TESTS_ORACLE_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"

typedef struct oracle_problem {
    /* Context whose backend holds any device buffers bound to the mods (the
     * oracle copies them to the host); NULL when every buffer is host
     * memory. */
    flex_context *ctx;
    /* Host tensors, any strides, f32 / f16 / bf16: q (B, Hq, Lq, D),
     * k (B, Hkv, Lkv, D), v (B, Hkv, Lkv, Dv); Hq a multiple of Hkv. */
    flex_tensor q, k, v;
    const flex_mod *score_mod; /* NULL: the score unchanged */
    const flex_mod *mask_mod;  /* NULL: every key attended */
    double scale;              /* 0: 1 / sqrt(D) */
    /* Query rows to compute (NULL: all Lq rows, in order). */
    const int64_t *rows;
    int64_t num_rows;
} oracle_problem;

/*
 * out[((b * Hq + h) * R + r) * Dv + c] and lse[(b * Hq + h) * R + r] (lse may
 * be NULL), with R = num_rows (or Lq) and r indexing p->rows. A row with no
 * attended key gives out 0 and lse -inf; a row with a NaN or +inf among its
 * attended scores gives out and lse NaN (as PyTorch). Returns 0, or -1 with
 * a message in err (a buffer read out of range, an unbound buffer, a mod the
 * reference evaluator rejects, no memory). Borrows p.
 */
int oracle_forward(const oracle_problem *p, double *out, double *lse, char *err, size_t err_cap);

/*
 * The naive reference in the dtype of p->q, written like oracle_forward:
 * inputs as stored, every dot product and sum accumulated in float, and the
 * scores S (after the scale and after the score mod, which runs in float),
 * the probabilities P and the output O rounded to the dtype; lse in float.
 * For f32 this is plain float arithmetic.
 */
int oracle_forward_naive(const oracle_problem *p, double *out, double *lse, char *err,
                         size_t err_cap);

/*
 * *error = the largest change of any attended score when every tanh_approx
 * of the score mod is off by its documented extreme (2^-11 relative, either
 * way); 0 when the score mod has no tanh_approx. Backends may use the
 * approximation (docs/mod-language.md), so this much score error is theirs
 * to have. Returns 0, or -1 with a message in err.
 */
int oracle_approx_score_error(const oracle_problem *p, double *error, char *err, size_t err_cap);

/* x rounded to the nearest value of dt (f32, f16 or bf16), ties to even. */
double oracle_round(flex_dtype dt, double x);

/* Element (i0, i1, i2, i3) of a host tensor of f32, f16 or bf16, as double. */
double oracle_load(const flex_tensor *t, int64_t i0, int64_t i1, int64_t i2, int64_t i3);

/* ||got - ref|| / ||ref|| over n values (ref all zero: ||got||); NaN or an
 * infinity in got gives +inf. */
double oracle_rel_error(const double *ref, const double *got, size_t n);

/* Largest |got - ref| / max(1, |ref|) over n LSE values; the -inf entries of
 * ref must be -inf in got and vice versa (else +inf is returned). */
double oracle_lse_error(const double *ref, const double *got, size_t n);

#endif /* FLEXATTN_TESTS_ORACLE_H */
