/*
 * Mod text -> typed, folded IR (lexer.c, parser.c, fold.c).
 */
#ifndef FLEXATTN_MOD_PARSE_H
#define FLEXATTN_MOD_PARSE_H

#include <stddef.h>

#include "mod/ir.h"

/*
 * Parses and type-checks desc->text with desc's params and buffers, folds
 * constants and compacts. On success *out is initialised (ir_free it) and
 * FLEX_OK returned. On failure returns FLEX_ERR_MOD_SYNTAX, _TYPE or _NAME
 * (or FLEX_ERR_INVALID_ARGUMENT for a bad desc) and writes a message into
 * err: "line:col: error: <what>\n<the source line>\n<caret line>", with
 * "did you mean 'X'?" for unknown names. *out is then left freed.
 */
flex_status mod_parse(const flex_mod_desc *desc, ir_mod *out, char *err, size_t err_cap);

/* Constant folding and algebraic identities that hold for every input
 * (x + 0, x * 1, true && x, select on a constant, ...; never x * 0 on
 * floats). Keeps the DAG shared and compacts. 0, or -1 on out of memory. */
int ir_fold(ir_mod *m);

#endif /* FLEXATTN_MOD_PARSE_H */
