/*
 * The fp64 oracle of the attention backward: dense, in double precision,
 * sharing nothing with the backends, not even the mod front end: the score
 * mod's value and derivatives come from refmod.c's dual numbers over the
 * mod's text.
 */
#ifndef FLEXATTN_TESTS_ORACLE_BACKWARD_H
#define FLEXATTN_TESTS_ORACLE_BACKWARD_H

#include <stddef.h>

#include "oracle.h"

/* The gradient of one float buffer of the score mod: grad has as many
 * doubles as the bound buffer has elements, row-major over its sizes, and
 * is added to (not overwritten). */
typedef struct oracle_buffer_grad {
    const char *name;
    double *grad;
} oracle_buffer_grad;

/*
 * Gradients of the loss sum(dout * out), out = attention(p), with respect to
 * q, k, v and the named buffers. p->rows must be NULL (every row). dout is a
 * host tensor (B, Hq, Lq, Dv) of f32, f16 or bf16, any strides. Writes
 * dq[((b * Hq + h) * Lq + i) * D + d], dk[((b * Hkv + hk) * Lkv + j) * D + d]
 * and dv[((b * Hkv + hk) * Lkv + j) * Dv + c] (each may be NULL). The
 * softmax is the oracle's own (it does not read a backend's lse). An element
 * whose gradient with respect to its modified score is exactly 0 contributes
 * nothing, even where the mod's derivative is not finite. A row whose
 * output is NaN (oracle.h) makes its dq row and the dk and dv rows of every
 * key it attends NaN. Returns 0, or -1 with a message in err. Borrows
 * everything.
 */
int oracle_backward(const oracle_problem *p, const flex_tensor *dout, double *dq, double *dk,
                    double *dv, const oracle_buffer_grad *buffer_grads, int num_buffer_grads,
                    char *err, size_t err_cap);

/* The same in the dtype of p->q, the naive way (see oracle_forward_naive):
 * sums in float; S, P, dP, dS and the gradients stored in the dtype. */
int oracle_backward_naive(const oracle_problem *p, const flex_tensor *dout, double *dq,
                          double *dk, double *dv, const oracle_buffer_grad *buffer_grads,
                          int num_buffer_grads, char *err, size_t err_cap);

#endif /* FLEXATTN_TESTS_ORACLE_BACKWARD_H */
