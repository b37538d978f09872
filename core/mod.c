/*
 * The flex_mod public API: compile, bind buffers, combine, and the host
 * views the evaluators read.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/parse.h"

/* Binding generations are unique across all mods, so a cache keyed by a mod
 * pointer and its generation can never confuse a freed mod with a new one
 * allocated at the same address. */
static atomic_uint_fast64_t last_generation;

static uint64_t new_generation(void) {
    return (uint64_t)atomic_fetch_add(&last_generation, 1) + 1;
}

/* Fills canonical text and hash of a mod whose IR is final. */
static flex_status finish_mod(flex_context *ctx, flex_mod *mod) {
    mod->canonical = ir_canonical_text(&mod->ir);
    if (!mod->canonical)
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory printing the mod");
    mod->hash = ir_hash(&mod->ir, mod->canonical);
    return FLEX_OK;
}

flex_status flex_mod_compile(flex_context *ctx, const flex_mod_desc *desc, flex_mod **out) {
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "out (the flex_mod ** result) is NULL");
    *out = NULL;
    if (!desc) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "desc (the mod description) is NULL");
    if (!desc->text) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "desc->text is NULL");
    flex_mod *mod = calloc(1, sizeof *mod);
    if (!mod) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory creating a mod");
    char err[1024];
    flex_status st = mod_parse(desc, &mod->ir, err, sizeof err);
    if (st != FLEX_OK) {
        free(mod);
        return flex_fail(ctx, st, "%s", err);
    }
    st = finish_mod(ctx, mod);
    if (st == FLEX_OK && !(mod->source = flex_mod_source_from_desc(desc)))
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory keeping the mod's text");
    if (st != FLEX_OK) {
        flex_mod_destroy(mod);
        return st;
    }
    mod->binding_generation = new_generation();
    *out = mod;
    return FLEX_OK;
}

void flex_mod_destroy(flex_mod *mod) {
    if (!mod) return;
    ir_free(&mod->ir);
    free(mod->canonical);
    flex_mod_source_free(mod->source);
    free(mod);
}

static int find_buffer(const ir_mod *m, const char *name) {
    for (int i = 0; i < m->num_buffers; i++)
        if (strcmp(m->buffers[i].name, name) == 0) return i;
    return -1;
}

/* Plain edit distance, for "did you mean" on buffer names. */
static int distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 1000;
    int row[64];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

flex_status flex_mod_bind_buffer(flex_context *ctx, flex_mod *mod, const char *name,
                                 const flex_tensor *data) {
    if (!mod) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "mod is NULL");
    if (!name) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "name (the buffer name) is NULL");
    if (!data) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "data (the buffer view) is NULL");
    const ir_mod *m = &mod->ir;
    int i = find_buffer(m, name);
    if (i < 0) {
        if (m->num_buffers == 0)
            return flex_fail(ctx, FLEX_ERR_MOD_NAME,
                             "the mod has no buffer '%.64s' (it declares no buffers)", name);
        int best = 0, best_d = 1000;
        for (int k = 0; k < m->num_buffers; k++) {
            int d = distance(name, m->buffers[k].name);
            if (d < best_d) {
                best_d = d;
                best = k;
            }
        }
        if (best_d <= 2)
            return flex_fail(ctx, FLEX_ERR_MOD_NAME,
                             "the mod has no buffer '%.64s'; did you mean '%s'?", name,
                             m->buffers[best].name);
        return flex_fail(ctx, FLEX_ERR_MOD_NAME,
                         "the mod has no buffer '%.64s' (its first buffer is '%s')", name,
                         m->buffers[0].name);
    }
    const ir_buffer *decl = &m->buffers[i];
    if (!data->data)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER,
                         "the data pointer bound to buffer '%s' is NULL", name);
    if (data->dtype != decl->dtype)
        return flex_fail(ctx, FLEX_ERR_DTYPE,
                         "buffer '%s' is declared %s but the bound tensor is %s", name,
                         flex_dtype_name(decl->dtype), flex_dtype_name(data->dtype));
    if (data->ndim != decl->ndim)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "buffer '%s' is declared with %d dimension%s but the bound tensor has %d",
                         name, decl->ndim, decl->ndim == 1 ? "" : "s", data->ndim);
    for (int d = 0; d < data->ndim; d++) {
        if (data->sizes[d] < 1)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "buffer '%s' has size %lld in dimension %d; sizes must be >= 1", name,
                             (long long)data->sizes[d], d);
        if (data->strides[d] < 0)
            return flex_fail(ctx, FLEX_ERR_SHAPE,
                             "buffer '%s' has stride %lld in dimension %d; strides must be >= 0",
                             name, (long long)data->strides[d], d);
    }
    uint64_t bytes;
    int too_far = flex_tensor_byte_extent(data, &bytes);
    if (too_far >= 0)
        return flex_fail(ctx, FLEX_ERR_OVERFLOW,
                         "buffer '%s' has stride %lld with size %lld in dimension %d, which "
                         "reaches beyond the address space",
                         name, (long long)data->strides[too_far], (long long)data->sizes[too_far],
                         too_far);
    if (data->device != FLEX_DEVICE_CPU) {
        if (!ctx)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "buffer '%s' is on device type %d, but without a context only host "
                             "(FLEX_DEVICE_CPU) data can be bound",
                             name, (int)data->device);
        if (data->device != ctx->backend->device_type)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "buffer '%s' is on device type %d, which is neither the host nor "
                             "the '%s' context's device",
                             name, (int)data->device, ctx->backend->name);
        if (data->device_index != ctx->device_index)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "buffer '%s' is on device %d but the context uses device %d", name,
                             data->device_index, ctx->device_index);
    }
    mod->views[i] = *data;
    mod->bound[i] = 1;
    mod->binding_generation = new_generation();
    return FLEX_OK;
}

flex_mod_kind flex_mod_get_kind(const flex_mod *mod) {
    return mod ? mod->ir.kind : FLEX_MOD_MASK;
}

const char *flex_mod_canonical_text(const flex_mod *mod) {
    return mod && mod->canonical ? mod->canonical : "";
}

uint64_t flex_mod_hash(const flex_mod *mod) {
    return mod ? mod->hash : 0;
}

/* ---- host views ---- */

static void buffers_read(const ir_mod *m, int *used) {
    for (int i = 0; i < IR_MAX_BUFFERS; i++)
        used[i] = 0;
    for (int i = 0; i < m->num_nodes; i++)
        if (m->nodes[i].op == IR_LOAD) used[m->nodes[i].buffer] = 1;
}

void flex_mod_release_host_views(void **host_copies) {
    if (!host_copies) return;
    for (int i = 0; i < IR_MAX_BUFFERS; i++) {
        free(host_copies[i]);
        host_copies[i] = NULL;
    }
}

flex_status flex_mod_host_views(flex_context *ctx, const flex_mod *mod, mod_buffer_view *views,
                                void **host_copies) {
    if (!mod || !views || !host_copies)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "flex_mod_host_views: NULL argument");
    for (int i = 0; i < IR_MAX_BUFFERS; i++)
        host_copies[i] = NULL;
    const ir_mod *m = &mod->ir;
    int used[IR_MAX_BUFFERS];
    buffers_read(m, used);
    for (int i = 0; i < m->num_buffers; i++) {
        mod_buffer_view *v = &views[i];
        memset(v, 0, sizeof *v);
        v->dtype = m->buffers[i].dtype;
        v->ndim = m->buffers[i].ndim;
        if (!mod->bound[i]) {
            if (!used[i]) continue; /* declared but never read: nothing to bind */
            flex_mod_release_host_views(host_copies);
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND,
                             "buffer '%s' has no data bound; call flex_mod_bind_buffer first",
                             m->buffers[i].name);
        }
        const flex_tensor *t = &mod->views[i];
        for (int d = 0; d < t->ndim; d++) {
            v->sizes[d] = t->sizes[d];
            v->strides[d] = t->strides[d];
        }
        if (t->device == FLEX_DEVICE_CPU) {
            v->data = t->data;
            continue;
        }
        if (!ctx || ctx->backend->device_type != t->device ||
            ctx->device_index != t->device_index) {
            flex_mod_release_host_views(host_copies);
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "buffer '%s' is bound to device memory this context cannot read "
                             "(another backend or device)",
                             m->buffers[i].name);
        }
        /* Copy the contiguous extent covering every element the strides reach. */
        int64_t extent = 1;
        for (int d = 0; d < t->ndim; d++)
            extent += (t->sizes[d] - 1) * t->strides[d];
        size_t bytes = (size_t)extent * flex_dtype_size(t->dtype);
        void *copy = malloc(bytes ? bytes : 1);
        if (!copy) {
            flex_mod_release_host_views(host_copies);
            return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                             "out of host memory copying buffer '%s' (%zu bytes)",
                             m->buffers[i].name, bytes);
        }
        host_copies[i] = copy;
        flex_status st = flex_backend_download(ctx, copy, t->data, bytes);
        if (st != FLEX_OK) {
            flex_mod_release_host_views(host_copies);
            return st;
        }
        v->data = copy;
    }
    return FLEX_OK;
}

flex_status flex_fail_bounds(flex_context *ctx, const flex_mod *mod, const mod_bounds_error *err) {
    char msg[512];
    mod_bounds_error_format(mod ? &mod->ir : NULL, err, msg, sizeof msg);
    return flex_fail(ctx, FLEX_ERR_BUFFER_BOUNDS, "%s", msg);
}

/* ---- and / or ---- */

static int same_view(const flex_tensor *a, const flex_tensor *b) {
    if (a->data != b->data || a->dtype != b->dtype || a->ndim != b->ndim ||
        a->device != b->device || a->device_index != b->device_index)
        return 0;
    for (int d = 0; d < a->ndim; d++)
        if (a->sizes[d] != b->sizes[d] || a->strides[d] != b->strides[d]) return 0;
    return 1;
}

static flex_status combine(flex_context *ctx, const flex_mod *a, const flex_mod *b, ir_op op,
                           flex_mod **out) {
    const char *what = op == IR_AND ? "flex_mod_and" : "flex_mod_or";
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: out is NULL", what);
    *out = NULL;
    if (!a || !b)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: mod %s is NULL", what, a ? "b" : "a");
    if (a->ir.kind != FLEX_MOD_MASK || b->ir.kind != FLEX_MOD_MASK)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s combines mask mods only, but mod %s is a score mod", what,
                         a->ir.kind != FLEX_MOD_MASK ? "a" : "b");
    flex_mod *mod = calloc(1, sizeof *mod);
    if (!mod) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory in %s", what);
    if (ir_copy(&mod->ir, &a->ir) < 0) {
        free(mod);
        return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory in %s", what);
    }
    for (int i = 0; i < a->ir.num_buffers; i++) {
        mod->bound[i] = a->bound[i];
        mod->views[i] = a->views[i];
    }
    ir_mod *m = &mod->ir;
    flex_status st = FLEX_OK;
    /* b's buffers, matched to a's by name. */
    int bufmap[IR_MAX_BUFFERS];
    for (int i = 0; i < b->ir.num_buffers && st == FLEX_OK; i++) {
        const ir_buffer *bb = &b->ir.buffers[i];
        int j = find_buffer(m, bb->name);
        if (j >= 0) {
            if (m->buffers[j].dtype != bb->dtype || m->buffers[j].ndim != bb->ndim) {
                st = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                               "%s: buffer '%s' is declared %s with %d dims in mod a but %s with "
                               "%d dims in mod b",
                               what, bb->name, flex_dtype_name(m->buffers[j].dtype),
                               m->buffers[j].ndim, flex_dtype_name(bb->dtype), bb->ndim);
            } else if (mod->bound[j] && b->bound[i] && !same_view(&mod->views[j], &b->views[i])) {
                st = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                               "%s: buffer '%s' is bound to different data in mod a and mod b",
                               what, bb->name);
            } else if (!mod->bound[j] && b->bound[i]) {
                mod->bound[j] = 1;
                mod->views[j] = b->views[i];
            }
        } else if (m->num_buffers == IR_MAX_BUFFERS) {
            st = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                           "%s: the combined mod would have more than %d buffers", what,
                           IR_MAX_BUFFERS);
        } else {
            j = m->num_buffers++;
            m->buffers[j] = *bb;
            mod->bound[j] = b->bound[i];
            mod->views[j] = b->views[i];
        }
        bufmap[i] = j;
    }
    /* b's nodes, renumbered into the copy of a. */
    int32_t *map = NULL;
    if (st == FLEX_OK && b->ir.num_nodes > 0) {
        map = malloc((size_t)b->ir.num_nodes * sizeof *map);
        if (!map) st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory in %s", what);
    }
    for (int i = 0; st == FLEX_OK && i < b->ir.num_nodes; i++) {
        ir_node n = b->ir.nodes[i];
        for (int k = 0; k < n.nargs; k++)
            n.args[k] = map[n.args[k]];
        if (n.op == IR_LOAD) n.buffer = (int8_t)bufmap[n.buffer];
        map[i] = ir_add(m, &n);
        if (map[i] < 0)
            st = flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                           "%s: the combined mod is too large (more than %d IR nodes) or memory "
                           "ran out",
                           what, IR_MAX_NODES);
    }
    if (st == FLEX_OK) {
        int root = ir_binary(m, op, IR_BOOL, a->ir.root, map[b->ir.root]);
        if (root < 0)
            st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory in %s", what);
        else
            m->root = root;
    }
    free(map);
    if (st == FLEX_OK && ir_fold(m) < 0)
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory in %s", what);
    if (st == FLEX_OK) st = finish_mod(ctx, mod);
    if (st == FLEX_OK &&
        !(mod->source = flex_mod_source_combine(op == IR_AND ? '&' : '|', a->source, b->source)))
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory keeping the mod's text");
    if (st != FLEX_OK) {
        flex_mod_destroy(mod);
        return st;
    }
    mod->binding_generation = new_generation();
    *out = mod;
    return FLEX_OK;
}

flex_status flex_mod_and(flex_context *ctx, const flex_mod *a, const flex_mod *b, flex_mod **out) {
    return combine(ctx, a, b, IR_AND, out);
}

flex_status flex_mod_or(flex_context *ctx, const flex_mod *a, const flex_mod *b, flex_mod **out) {
    return combine(ctx, a, b, IR_OR, out);
}
