/*
 * The backward pass in the `flexattn` subcommands (`run --backward`, the
 * backward cases of `check`): device buffers for dout and the gradients,
 * timing, and the comparison with the fp64 backward oracle.
 */
#ifndef FLEXATTN_CLI_BACKWARD_H
#define FLEXATTN_CLI_BACKWARD_H

#include <stddef.h>

#include "flexattn.h"

/* What one backward run needs; everything is borrowed. */
typedef struct cli_backward_problem {
    flex_context *ctx;
    flex_tensor q, k, v;                /* on the context's device, (B, H, S, D) */
    flex_tensor host_q, host_k, host_v; /* the same values on the host, for the oracle */
    const flex_mod *score_mod;          /* may be NULL */
    const flex_mod *mask_mod;           /* may be NULL; the mod of mask */
    const flex_block_mask *mask;        /* may be NULL */
    int deterministic;                  /* opts->deterministic of every backward call */
} cli_backward_problem;

enum { CLI_BW_OUT = 0, CLI_BW_LSE, CLI_BW_DOUT, CLI_BW_DQ, CLI_BW_DK, CLI_BW_DV, CLI_BW_COUNT };

/* Device memory of one backward run: out, lse, dout, dq, dk, dv (BHSD). */
typedef struct cli_backward_state {
    cli_backward_problem p;
    void *dev[CLI_BW_COUNT];
    flex_tensor t[CLI_BW_COUNT];
    size_t bytes[CLI_BW_COUNT];
    void *host_dout; /* dout's values on the host */
} cli_backward_state;

/*
 * Allocates the device buffers, fills dout with fixed pseudo-random values
 * and runs the forward once for out and lse. Returns 0, or -1 with a
 * message in why. cli_backward_free releases everything either way.
 */
int cli_backward_prepare(cli_backward_state *st, const cli_backward_problem *p, char *why,
                         size_t cap);

/*
 * Median time in ms of `iters` flex_attention_backward calls (after
 * `warmup` untimed ones), synchronized. Returns 0; -1 with a message in why;
 * or -2 when the backend has no backward pass (FLEX_ERR_UNSUPPORTED).
 */
int cli_backward_time(cli_backward_state *st, int warmup, int iters, double *ms, char *why,
                      size_t cap);

/*
 * Runs the backward once (gradients poisoned with NaN first) and compares dq,
 * dk and dv with oracle_backward: *rel is the largest of the three relative
 * errors (for display). Returns 1 when all three pass the tolerance rule
 * (tolerance.h, against oracle_backward_naive), 0 when not (why says which),
 * -1 on an error, -2 when the backend has no backward pass.
 */
int cli_backward_check(cli_backward_state *st, double *rel, char *why, size_t cap);

/*
 * Runs the backward once more, adding the gradients of the given float
 * buffers of the score mod into grads (borrowed; the caller zeroes them),
 * and leaves dq, dk and dv in st->dev. Returns 0, or -1 with a message in
 * why.
 */
int cli_backward_run_with_buffer_grads(cli_backward_state *st, const flex_buffer_grad *grads,
                                       int num_grads, char *why, size_t cap);

void cli_backward_free(cli_backward_state *st);

/* FLOPs of the backward as the benchmarks count them: 2.5 times the
 * forward's. */
static inline double cli_backward_flops(double forward_flops) {
    return 2.5 * forward_flops;
}

#endif /* FLEXATTN_CLI_BACKWARD_H */
