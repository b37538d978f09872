/*
 * The diagonal split of a score mod (mod/diagonal.h).
 */
#include <stdlib.h>
#include <string.h>

#include "mod/diagonal.h"

/* The work of one node per score, as mod_diagonal_split_find counts it. */
static int node_weight(const ir_node *n) {
    switch ((ir_op)n->op) {
    case IR_CONST:
    case IR_SCORE:
    case IR_B:
    case IR_H:
    case IR_Q:
    case IR_KV:
        return 0;
    case IR_LOAD:
        return 2;
    case IR_EXP:
    case IR_EXP2:
    case IR_LOG:
    case IR_LOG2:
    case IR_SQRT:
    case IR_RSQRT:
    case IR_SIN:
    case IR_COS:
    case IR_TAN:
    case IR_TANH:
    case IR_TANH_APPROX:
    case IR_SIGMOID:
    case IR_POW:
    case IR_DIV:
    case IR_FLOORDIV:
    case IR_MOD:
        return 4;
    default:
        return 1;
    }
}

/* MOD_DIAG_KV_Q or MOD_DIAG_Q_KV where node i is an int difference of the
 * two index leaves, else 0. */
static int difference_kind(const ir_mod *m, int i) {
    const ir_node *n = &m->nodes[i];
    if (n->op != IR_SUB || n->nargs != 2 || n->type != IR_INT) return 0;
    const int a = m->nodes[n->args[0]].op, b = m->nodes[n->args[1]].op;
    if (a == IR_KV && b == IR_Q) return MOD_DIAG_KV_Q;
    if (a == IR_Q && b == IR_KV) return MOD_DIAG_Q_KV;
    return 0;
}

void mod_diagonal_live(const ir_mod *m, const unsigned char *role, const mod_diagonal_split *split,
                       int fill, unsigned char *live) {
    memset(live, 0, (size_t)m->num_nodes);
    if (fill)
        for (int k = 0; k < split->num_values; k++)
            live[split->values[k]] = 1;
    else
        live[m->root] = 1;
    for (int i = m->num_nodes - 1; i >= 0; i--) {
        if (!live[i]) continue;
        const int r = role[i];
        if (fill && (r == MOD_DIAG_KV_Q || r == MOD_DIAG_Q_KV)) continue; /* d, not q and kv */
        if (!fill && r == MOD_DIAG_VALUE) continue;                       /* read from the table */
        for (int k = 0; k < m->nodes[i].nargs; k++)
            live[m->nodes[i].args[k]] = 1;
    }
}

int mod_diagonal_split_find(const ir_mod *m, const unsigned char *in_range,
                            mod_diagonal_split *split, unsigned char *role) {
    memset(split, 0, sizeof *split);
    const int n = m->num_nodes;
    unsigned char *r = role ? role : malloc((size_t)(n > 0 ? n : 1));
    unsigned char *used_outside = calloc((size_t)(n > 0 ? n : 1), 1);
    if (!r || !used_outside) {
        if (!role) free(r);
        free(used_outside);
        return -1;
    }
    /* Forward: which nodes are diagonal, which fixed. */
    for (int i = 0; i < n; i++) {
        const ir_node *node = &m->nodes[i];
        const int diff = difference_kind(m, i);
        if (diff) {
            r[i] = (unsigned char)diff;
            continue;
        }
        switch ((ir_op)node->op) {
        case IR_CONST:
        case IR_B:
        case IR_H:
            r[i] = MOD_DIAG_FIXED;
            continue;
        case IR_SCORE:
        case IR_Q:
        case IR_KV:
            r[i] = MOD_DIAG_NONE;
            continue;
        default:
            break;
        }
        int all = 1, any_diff = 0;
        for (int k = 0; k < node->nargs; k++) {
            const int a = r[node->args[k]];
            all &= a != MOD_DIAG_NONE;
            any_diff |= a != MOD_DIAG_FIXED && a != MOD_DIAG_NONE;
        }
        r[i] = !all ? MOD_DIAG_NONE : any_diff ? MOD_DIAG_INNER : MOD_DIAG_FIXED;
    }
    /* The values: diagonal nodes (not the differences themselves, which
     * cost nothing) that a per-score node or the result uses. */
    for (int i = 0; i < n; i++) {
        const ir_node *node = &m->nodes[i];
        if (r[i] != MOD_DIAG_NONE) continue;
        for (int k = 0; k < node->nargs; k++)
            used_outside[node->args[k]] = 1;
    }
    if (m->root >= 0 && m->root < n) used_outside[m->root] = 1;
    int count = 0;
    for (int i = 0; i < n; i++)
        if (r[i] == MOD_DIAG_INNER && used_outside[i]) {
            if (count < MOD_DIAGONAL_MAX_VALUES) split->values[count] = i;
            count++;
            r[i] = MOD_DIAG_VALUE;
        }
    const int ok = count > 0 && count <= MOD_DIAGONAL_MAX_VALUES;
    /* The nodes the table computes: their weights add up, and an unproved
     * read among them puts the bounds bits in the table. */
    int weight = 0, checked = 0;
    if (ok) {
        unsigned char *fill = used_outside; /* reused */
        split->num_values = count;
        mod_diagonal_live(m, r, split, 1, fill);
        for (int i = 0; i < n; i++) {
            if (!fill[i]) continue;
            if (r[i] == MOD_DIAG_INNER || r[i] == MOD_DIAG_VALUE)
                weight += node_weight(&m->nodes[i]);
            if (m->nodes[i].op == IR_LOAD && !(in_range && in_range[i])) checked = 1;
        }
    }
    weight -= count + checked; /* a score's reads of its entry */
    if (ok && weight >= MOD_DIAGONAL_MIN_WEIGHT) { /* num_values set above */
        split->checked = checked;
        split->rows = count + checked;
        split->weight = weight;
    } else {
        memset(split, 0, sizeof *split);
        for (int i = 0; i < n; i++)
            if (r[i] == MOD_DIAG_VALUE) r[i] = MOD_DIAG_INNER;
    }
    free(used_outside);
    if (!role) free(r);
    return 0;
}
