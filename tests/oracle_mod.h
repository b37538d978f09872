/*
 * A compiled flex_mod as the oracles see it: its source text parsed again by
 * the independent evaluator (refmod.h), with host copies of its bound
 * buffers. Nothing of the mod's IR is evaluated; only its table of buffer
 * names and bindings is read, to find the data.
 */
#ifndef FLEXATTN_TESTS_ORACLE_MOD_H
#define FLEXATTN_TESTS_ORACLE_MOD_H

#include <stddef.h>

#include "flexattn.h"
#include "refmod.h"

/* Owns rm and the host copies of device buffers; bufs borrows from them or
 * from the bound host tensors. */
typedef struct oracle_mod {
    refmod *rm;
    int num_bufs;
    refmod_buffer bufs[16];
    void *copies[16];
} oracle_mod;

/* Parses mod's kept text (and, for an and/or, both operands') and binds its
 * buffers' data, copied to the host with ctx's backend where they live on a
 * device. mod may be NULL (om->rm stays NULL). Returns 0, or -1 with a
 * message in err; oracle_mod_close releases om either way. */
int oracle_mod_open(flex_context *ctx, const flex_mod *mod, oracle_mod *om, char *err,
                    size_t err_cap);

void oracle_mod_close(oracle_mod *om);

#endif /* FLEXATTN_TESTS_ORACLE_MOD_H */
