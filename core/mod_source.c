/*
 * Keeping a mod's source text (see mod_source.h).
 */
#include <stdlib.h>
#include <string.h>

#include "mod_source.h"

static char *copy_text(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *c = malloc(n);
    if (c) memcpy(c, s, n);
    return c;
}

void flex_mod_source_free(flex_mod_source *s) {
    if (!s) return;
    free(s->text);
    for (int i = 0; i < s->num_params; i++)
        free((char *)s->params[i].name);
    for (int i = 0; i < s->num_buffers; i++)
        free((char *)s->buffers[i].name);
    free(s->params);
    free(s->buffers);
    flex_mod_source_free(s->left);
    flex_mod_source_free(s->right);
    free(s);
}

/* Fills s's text, params and buffers from the given arrays; 0 or -1. */
static int fill(flex_mod_source *s, const char *text, const flex_param *params, int num_params,
                const flex_buffer_decl *buffers, int num_buffers) {
    s->text = copy_text(text);
    if (!s->text) return -1;
    if (num_params > 0 && params) {
        s->params = calloc((size_t)num_params, sizeof *s->params);
        if (!s->params) return -1;
        s->num_params = num_params;
        for (int i = 0; i < num_params; i++) {
            s->params[i] = params[i];
            s->params[i].name = copy_text(params[i].name);
            if (params[i].name && !s->params[i].name) return -1;
        }
    }
    if (num_buffers > 0 && buffers) {
        s->buffers = calloc((size_t)num_buffers, sizeof *s->buffers);
        if (!s->buffers) return -1;
        s->num_buffers = num_buffers;
        for (int i = 0; i < num_buffers; i++) {
            s->buffers[i] = buffers[i];
            s->buffers[i].name = copy_text(buffers[i].name);
            if (buffers[i].name && !s->buffers[i].name) return -1;
        }
    }
    return 0;
}

flex_mod_source *flex_mod_source_from_desc(const flex_mod_desc *desc) {
    flex_mod_source *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->kind = desc->kind;
    if (fill(s, desc->text, desc->params, desc->num_params, desc->buffers, desc->num_buffers) !=
        0) {
        flex_mod_source_free(s);
        return NULL;
    }
    return s;
}

flex_mod_source *flex_mod_source_copy(const flex_mod_source *src) {
    if (!src) return NULL;
    flex_mod_source *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->kind = src->kind;
    s->combine = src->combine;
    int ok = src->combine ? (s->left = flex_mod_source_copy(src->left)) != NULL &&
                                (s->right = flex_mod_source_copy(src->right)) != NULL
                          : fill(s, src->text, src->params, src->num_params, src->buffers,
                                 src->num_buffers) == 0;
    if (!ok) {
        flex_mod_source_free(s);
        return NULL;
    }
    return s;
}

flex_mod_source *flex_mod_source_combine(int op, const flex_mod_source *a,
                                         const flex_mod_source *b) {
    if (!a || !b) return NULL;
    flex_mod_source *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->kind = FLEX_MOD_MASK;
    s->combine = op;
    s->left = flex_mod_source_copy(a);
    s->right = flex_mod_source_copy(b);
    if (!s->left || !s->right) {
        flex_mod_source_free(s);
        return NULL;
    }
    return s;
}
