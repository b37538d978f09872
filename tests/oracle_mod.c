/*
 * From a flex_mod to the independent evaluator (see oracle_mod.h).
 */
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "oracle_mod.h"

_Static_assert(IR_MAX_BUFFERS <= 16, "oracle_mod holds at most 16 buffers");

/* The refmod of one kept source, recursively for and/or. */
static refmod *parse_source(const flex_mod_source *s, char *err, size_t err_cap) {
    if (s->combine) {
        refmod *a = parse_source(s->left, err, err_cap);
        refmod *b = a ? parse_source(s->right, err, err_cap) : NULL;
        if (!a || !b) {
            refmod_free(a);
            return NULL;
        }
        refmod *m = refmod_combine(s->combine, a, b);
        if (!m) snprintf(err, err_cap, "out of memory");
        return m;
    }
    refmod *m = NULL;
    if (refmod_parse(s->text, s->kind, s->params, s->num_params, s->buffers, s->num_buffers, &m,
                     err, err_cap) != 0)
        return NULL;
    return m;
}

int oracle_mod_open(flex_context *ctx, const flex_mod *mod, oracle_mod *om, char *err,
                    size_t err_cap) {
    memset(om, 0, sizeof *om);
    if (!mod) return 0;
    if (!mod->source) return snprintf(err, err_cap, "the mod kept no source text"), -1;
    char why[512] = "";
    om->rm = parse_source(mod->source, why, sizeof why);
    if (!om->rm) return snprintf(err, err_cap, "reference parser: %s", why), -1;
    mod_buffer_view views[IR_MAX_BUFFERS];
    if (flex_mod_host_views(ctx, mod, views, om->copies) != FLEX_OK)
        return snprintf(err, err_cap, "mod buffers: %s", flex_error_message(ctx)), -1;
    for (int i = 0; i < mod->ir.num_buffers; i++) {
        if (!views[i].data) continue; /* declared, unbound and never read */
        refmod_buffer *b = &om->bufs[om->num_bufs++];
        b->name = mod->ir.buffers[i].name;
        b->data = views[i].data;
        b->dtype = views[i].dtype;
        b->ndim = views[i].ndim;
        memcpy(b->sizes, views[i].sizes, sizeof b->sizes);
        memcpy(b->strides, views[i].strides, sizeof b->strides);
    }
    return refmod_bind(om->rm, om->bufs, om->num_bufs, err, err_cap);
}

void oracle_mod_close(oracle_mod *om) {
    refmod_free(om->rm);
    flex_mod_release_host_views(om->copies);
    memset(om, 0, sizeof *om);
}
