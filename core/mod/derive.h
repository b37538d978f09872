/*
 * Derivative of a score mod's IR (core/mod/derive.c), for the backward pass.
 *
 * mod_derive adds to the mod's own IR the nodes of d(result)/d(score) and of
 * d(result)/d(value read) for every float buffer read the result depends on
 * differentiably. The new nodes share the forward's nodes through ir_add's
 * hash-consing (a derivative such as `1 - t * t` for tanh reuses the forward's
 * `t`), so an evaluator that computes every output in one pass over the
 * nodes computes each shared value once.
 */
#ifndef FLEXATTN_MOD_DERIVE_H
#define FLEXATTN_MOD_DERIVE_H

#include "mod/ir.h"

/* Most float buffer reads mod_derive reports; a mod with more distinct float
 * reads that the result depends on is refused (MOD_DERIVE_TOO_MANY_LOADS). */
#define MOD_DERIVE_MAX_LOADS 64

/* Return codes of mod_derive besides 0. */
enum {
    MOD_DERIVE_NO_MEMORY = -1,     /* out of memory or IR_MAX_NODES reached */
    MOD_DERIVE_NOT_SCORE = -2,     /* the mod's result is not a float */
    MOD_DERIVE_TOO_MANY_LOADS = -3 /* more than MOD_DERIVE_MAX_LOADS float reads */
};

/* The local derivative of the mod's result with respect to one buffer read. */
typedef struct mod_derivative_load {
    int load;   /* node index of the IR_LOAD (a float buffer) */
    int buffer; /* index into ir_mod.buffers */
    int node;   /* node index of d(result)/d(the value this load reads) */
} mod_derivative_load;

typedef struct mod_derivative {
    int value;  /* node of the mod's result (the root; unchanged by mod_derive) */
    int dscore; /* node of d(result)/d(score); a constant 0 node when independent */
    int num_loads;
    mod_derivative_load loads[MOD_DERIVE_MAX_LOADS];
} mod_derivative;

/*
 * Appends the derivative nodes of m's result to m and fills *out with their
 * indices. m->root stays the forward result and no node is removed or
 * renumbered, so indices taken before the call stay valid (the derivative
 * must not be followed by ir_fold or ir_compact, which keep only what the
 * root reaches). The new expressions are folded as they are built: constant
 * operands are evaluated with ir_apply and identities (x * 1, x + 0, select
 * on a constant) are applied; a derivative that is zero by structure makes
 * no nodes at all.
 *
 * Rules at non-smooth points follow PyTorch's autograd: select/where passes
 * the gradient to the chosen branch only; comparisons, floor, ceil, int(),
 * float(int) and integer ops have derivative 0; abs has sign(x) (0 at 0);
 * min/max give the gradient to the chosen argument and split it evenly on a
 * tie (torch.minimum/maximum), so clamp, written as min(max(..)), gets half
 * the gradient exactly at a bound where torch.clamp gives all of it; float
 * % differentiates like torch.remainder (1 and -floor(a / b)); pow follows
 * torch.pow (0 where the exponent is 0, and for the exponent 0 where the
 * base is 0 and the exponent non-negative); tanh_approx differentiates as
 * 1 - tanh_approx(x)^2.
 *
 * Returns 0, or one of the MOD_DERIVE_* codes (m then holds some unused new
 * nodes but is otherwise unchanged).
 */
int mod_derive(ir_mod *m, mod_derivative *out);

#endif /* FLEXATTN_MOD_DERIVE_H */
