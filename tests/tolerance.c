/*
 * The tolerance rule (see tolerance.h; the constants are explained in
 * docs/testing.md).
 */
#include <math.h>
#include <stdio.h>

#include "tolerance.h"

tol_rule tol_rule_for(flex_dtype dt, tol_quantity q) {
    /* rows: f32, f16, bf16; columns: output, LSE, gradient */
    static const tol_rule rules[3][3] = {
        {{3.0, 2e-6, 2e-6}, {3.0, 2e-6, 2e-6}, {3.0, 2e-6, 2e-6}},
        {{2.0, 2e-4, 1e-4}, {2.0, 2e-4, 1e-4}, {3.0, 2e-4, 1e-4}},
        {{2.0, 1e-3, 2e-4}, {2.0, 1e-3, 2e-4}, {3.0, 1e-3, 2e-4}},
    };
    int row = dt == FLEX_F16 ? 1 : dt == FLEX_BF16 ? 2 : 0;
    return rules[row][q];
}

const char *tol_quantity_name(tol_quantity q) {
    return q == TOL_OUTPUT ? "output" : q == TOL_LSE ? "lse" : "gradient";
}

double tol_margin(const tol_report *r) {
    if (!r->pass && r->bound == 0.0 && r->bias_bound == 0.0) return INFINITY;
    double a = r->bound > 0.0 ? r->err / r->bound : r->err > 0.0 ? INFINITY : 0.0;
    double b = r->bias_bound > 0.0 ? fabs(r->bias) / r->bias_bound : 0.0;
    return a > b ? a : b;
}

int tol_compare(flex_dtype dt, tol_quantity q, const double *oracle, const double *naive,
                const double *got, size_t n, double slack, tol_report *r) {
    tol_rule rule = tol_rule_for(dt, q);
    r->err = r->err_naive = r->bias = 0.0;
    r->bound = r->bias_bound = 0.0;
    r->pass = 0;
    r->why[0] = '\0';
    double max_ref = 0.0, sum_gr = 0.0, sum_rr = 0.0, sum_d = 0.0, var_naive = 0.0;
    size_t finite = 0;
    for (size_t i = 0; i < n; i++) {
        double o = oracle[i], g = got[i];
        int same = isnan(o) ? isnan(g) : isinf(o) ? g == o : isfinite(g);
        if (!same) {
            snprintf(r->why, sizeof r->why, "%s entry %zu is %g where the oracle has %g",
                     tol_quantity_name(q), i, g, o);
            return 0;
        }
        if (!isfinite(o)) continue;
        double en = isfinite(naive[i]) ? naive[i] - o : 0.0;
        finite++;
        if (fabs(o) > max_ref) max_ref = fabs(o);
        if (fabs(g - o) > r->err) r->err = fabs(g - o);
        if (fabs(en) > r->err_naive) r->err_naive = fabs(en);
        if (q == TOL_LSE) {
            sum_d += g - o;
            var_naive += en * en;
        } else {
            sum_gr += g * o;
            sum_rr += o * o;
            var_naive += en * en * o * o;
        }
    }
    /* The floor scales with the values, but not below 1: a reference that is
     * 0 everywhere (the gradient of a one-key row) leaves a backend its
     * rounding. */
    r->bound = rule.k * r->err_naive + rule.floor * fmax(max_ref, 1.0) + slack;
    if (finite == 0) {
        r->pass = 1;
        return 1;
    }
    if (q == TOL_LSE) {
        r->bias = sum_d / (double)finite;
        r->bias_bound = rule.bias_floor + 4.0 * rule.k * sqrt(var_naive) / (double)finite + slack;
    } else if (sum_rr > 0.0) {
        r->bias = sum_gr / sum_rr - 1.0;
        r->bias_bound = rule.bias_floor + 4.0 * rule.k * sqrt(var_naive) / sum_rr +
                        slack / sqrt(sum_rr / (double)finite);
    } else {
        r->bias_bound = rule.bias_floor;
    }
    if (!(r->err <= r->bound)) {
        snprintf(r->why, sizeof r->why, "%s error %.3g above %.3g (%g x naive %.3g + floor)",
                 tol_quantity_name(q), r->err, r->bound, rule.k, r->err_naive);
        return 0;
    }
    if (!(fabs(r->bias) <= r->bias_bound)) {
        snprintf(r->why, sizeof r->why, "%s %s %.3g beyond %.3g", tol_quantity_name(q),
                 q == TOL_LSE ? "mean error" : "relative bias", r->bias, r->bias_bound);
        return 0;
    }
    r->pass = 1;
    return 1;
}
