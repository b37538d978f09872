/*
 * The text a mod was compiled from, kept beside its IR so that the test
 * oracle can evaluate the mod with an evaluator of its own that shares no
 * code with the lexer, parser, folding or IR interpreters. The library
 * itself never reads it.
 */
#ifndef FLEXATTN_MOD_SOURCE_H
#define FLEXATTN_MOD_SOURCE_H

#include "flexattn.h"

/*
 * Either one compiled text (text != NULL) with its params and buffer
 * declarations, or the combination (combine '&' or '|') of two sources, as
 * flex_mod_and / flex_mod_or build it. Everything, names included, is owned
 * by the source and freed by flex_mod_source_free.
 */
typedef struct flex_mod_source {
    flex_mod_kind kind;
    char *text;
    flex_param *params;
    int num_params;
    flex_buffer_decl *buffers;
    int num_buffers;
    int combine; /* 0 for a text, '&' or '|' for a combination */
    struct flex_mod_source *left, *right;
} flex_mod_source;

/* A copy of desc's text, params and buffer declarations; NULL when memory
 * runs out. */
flex_mod_source *flex_mod_source_from_desc(const flex_mod_desc *desc);

/* A deep copy of a combined with b by op ('&' or '|'); NULL when memory
 * runs out or either is NULL. */
flex_mod_source *flex_mod_source_combine(int op, const flex_mod_source *a,
                                         const flex_mod_source *b);

flex_mod_source *flex_mod_source_copy(const flex_mod_source *s);
void flex_mod_source_free(flex_mod_source *s);

#endif /* FLEXATTN_MOD_SOURCE_H */
