/*
 * The tolerance rule every backend comparison uses (docs/testing.md).
 *
 * Two conditions, both against the fp64 oracle:
 *  1. size: max|got - oracle| <= k * max|naive - oracle|
 *     + floor * max(max|oracle|, 1) (+ slack), where naive is the naive same-precision reference
 *     (oracle_forward_naive / oracle_backward_naive);
 *  2. no systematic error: for outputs and gradients the relative bias
 *     sum(got * oracle) / sum(oracle^2) - 1, for LSE the mean signed error
 *     mean(got - oracle), stays within
 *     bias_floor + 4 * k * (the bias's standard deviation were the errors
 *     those of the naive reference), so a small constant scale or offset
 *     fails even where it hides under the rounding step.
 * Special values must match exactly: where the oracle has NaN the backend
 * must have NaN, an infinity the same infinity, a finite value a finite
 * value.
 */
#ifndef FLEXATTN_TESTS_TOLERANCE_H
#define FLEXATTN_TESTS_TOLERANCE_H

#include <stddef.h>

#include "flexattn.h"

typedef enum tol_quantity { TOL_OUTPUT = 0, TOL_LSE = 1, TOL_GRADIENT = 2 } tol_quantity;

/* The constants of the rule for one dtype and quantity. */
typedef struct tol_rule {
    double k;          /* allowed multiple of the naive reference's error */
    double floor;      /* times max(max|oracle|, 1): the absolute floor */
    double bias_floor; /* of the bias (relative; absolute for LSE) */
} tol_rule;

tol_rule tol_rule_for(flex_dtype dt, tol_quantity q);

typedef struct tol_report {
    double err;       /* max |got - oracle| over finite oracle entries */
    double err_naive; /* max |naive - oracle| */
    double bound;     /* what err must not exceed */
    double bias;      /* relative bias, or mean signed error for LSE */
    double bias_bound;
    int pass;
    char why[200]; /* the first broken condition, in words */
} tol_report;

/*
 * Applies the rule to n values. slack is added to the size bound and to the
 * bias bound (absolute units; for outputs and gradients divided by the RMS
 * of the oracle), for a known, documented backend error such as
 * tanh_approx's; pass 0 otherwise. Returns r->pass.
 */
int tol_compare(flex_dtype dt, tol_quantity q, const double *oracle, const double *naive,
                const double *got, size_t n, double slack, tol_report *r);

const char *tol_quantity_name(tol_quantity q);

/* The larger of err / bound and |bias| / bias_bound: the part of the rule's
 * room a comparison used (above 1 fails; +inf for mismatched special
 * values). */
double tol_margin(const tol_report *r);

#endif /* FLEXATTN_TESTS_TOLERANCE_H */
