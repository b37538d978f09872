#!/usr/bin/env python3
"""The polynomial coefficients of core/mod/sincos.h.

    python3 scripts/fit_sincos.py

sin r = r + r^3 P(r^2) and cos r = 1 + r^2 Q(r^2) on |r| <= 0.792 (pi/4 and
the margin by which a rounded-up quadrant overshoots it), P with 3 and Q
with 4 coefficients, minimising the largest relative error of sin and cos:
a least-squares fit on 200,001 points, reweighted by Lawson's rule (each
point's weight times its error) toward the minimax fit, in double
precision, then rounded to float. Q's constant term comes out as -1/2
exactly. Prints the floats as C hex literals and the fit's relative error
before rounding; tests/test_sincos.c measures the rounded coefficients in
the reduction's float arithmetic. Needs numpy."""

import numpy as np

R = 0.792
ITERATIONS = 200


def lawson(s, target, terms, weight):
    """Coefficients c of sum c_k s^k near target, the largest weighted
    error minimised."""
    basis = np.stack([s ** k for k in range(terms)], 1)
    w = np.ones_like(s)
    for _ in range(ITERATIONS):
        root = np.sqrt(w) * weight
        c, *_ = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)
        err = np.abs((basis @ c - target) * weight)
        w = w * err
        w /= w.sum()
    return c, float(np.max(np.abs((basis @ c - target) * weight)))


def as_c(values):
    return ", ".join(float(np.float32(v)).hex().replace("0000000p", "p") + "f" for v in values)


def main():
    s = np.linspace(1e-6, R * R, 200001)
    r = np.sqrt(s)
    # sin: relative error r^3 (P - (sin r - r) / r^3) / sin r
    p, e_sin = lawson(s, (np.sin(r) - r) / r ** 3, 3, r ** 3 / np.sin(r))
    # cos: relative error r^2 (Q - (cos r - 1) / r^2) / cos r
    q, e_cos = lawson(s, (np.cos(r) - 1) / s, 4, s / np.cos(r))
    print(f"sin r = r + r^3 P(r^2), P (constant term first): {as_c(p)}  (error {e_sin:.2e})")
    print(f"cos r = 1 + r^2 Q(r^2), Q (constant term first): {as_c(q)}  (error {e_cos:.2e})")


if __name__ == "__main__":
    main()
