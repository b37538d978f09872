/*
 * The part of a score mod that sees the query and key indices only through
 * their difference kv - q: relative-position biases (T5's buckets, a table
 * indexed by q - kv, ALiBi). Within one kernel tile every score on a
 * diagonal of the tile has the same value there, so a GPU kernel computes
 * that part once per diagonal (16 rows x N keys have N + 15 diagonals)
 * into a small table and each score reads its diagonal's entry, where
 * evaluating it per score repeats the work up to 64 times a thread.
 *
 * The split: a node is *diagonal* when it depends on nothing but b, h,
 * constants, buffer reads with diagonal indices, and the differences kv - q
 * or q - kv themselves (IR_SUB of the two index leaves), and depends on at
 * least one such difference. The split's *values* are the diagonal nodes
 * that a non-diagonal node (or the result) uses: the table holds them, and
 * the rest of the mod reads them from it.
 */
#ifndef FLEXATTN_MOD_DIAGONAL_H
#define FLEXATTN_MOD_DIAGONAL_H

#include <stdint.h>

#include "mod/ir.h"

#define MOD_DIAGONAL_MAX_VALUES 2

/* What a node is in the split (mod_diagonal_split.role). */
enum {
    MOD_DIAG_NONE = 0,  /* evaluated per score */
    MOD_DIAG_INNER = 1, /* diagonal, used only by other diagonal nodes */
    MOD_DIAG_VALUE = 2, /* diagonal, read from the table */
    MOD_DIAG_KV_Q = 3,  /* the difference kv - q itself */
    MOD_DIAG_Q_KV = 4,  /* the difference q - kv */
    MOD_DIAG_FIXED = 5  /* depends on b, h and constants only (no difference) */
};

typedef struct mod_diagonal_split {
    int num_values;                          /* 0: no split worth making */
    int32_t values[MOD_DIAGONAL_MAX_VALUES]; /* the value nodes, in node order */
    /* 1: some read of the table's part is not proved in range, so the table
     * carries the bounds bits of each diagonal's reads as one more row */
    int checked;
    int rows;   /* the table's rows: num_values + checked */
    int weight; /* the per-score work the table saves (see mod_diagonal_split_find) */
} mod_diagonal_split;

/*
 * Finds the split of score mod m. role: num_nodes entries, filled with the
 * MOD_DIAG_* of every node (may be NULL). in_range: the mod's buffer reads
 * proved inside their buffers (flex_gpu_ir_reads_in_range's flags; NULL:
 * none). A table entry is computed for diagonals that may belong to no kept
 * score, so the fill cannot raise the bounds bits of an unproved read of
 * the table's part: they go into the table as one more row (checked), and
 * each score takes its entry's bits as it takes those of its own reads.
 *
 * The split is made (num_values > 0) when it has at most
 * MOD_DIAGONAL_MAX_VALUES values and saves per score at least
 * MOD_DIAGONAL_MIN_WEIGHT: the diagonal nodes' weights (a transcendental
 * function, division or modulo 4, a buffer read 2, any other operation 1;
 * the differences, constants and b/h-only nodes 0) less one table read per
 * row. ALiBi's slope times float(kv - q) saves 1 and is left alone; T5's
 * bucketed bias saves about 20.
 *
 * Returns 0, or -1 when out of memory (nothing split). Pure.
 */
#define MOD_DIAGONAL_MIN_WEIGHT 2
int mod_diagonal_split_find(const ir_mod *m, const unsigned char *in_range,
                            mod_diagonal_split *split, unsigned char *role);

/* live[i] (num_nodes entries) = whether the split's fill (fill 1: its
 * values, from b, h and the difference) or the mod that reads the table
 * (fill 0: the root, the values read) needs node i. role as
 * mod_diagonal_split_find fills it. Pure. */
void mod_diagonal_live(const ir_mod *m, const unsigned char *role, const mod_diagonal_split *split,
                       int fill, unsigned char *live);

#endif /* FLEXATTN_MOD_DIAGONAL_H */
