/*
 * Argument helpers shared by the `flexattn` subcommands (see cli_args.h).
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_args.h"
#include "internal.h"
#include "mod/lexer.h"

int cli_option(int argc, char **argv, int *i, const char *name, const char **value) {
    const char *arg = argv[*i];
    size_t n = strlen(name);
    if (strncmp(arg, name, n) != 0) return 0;
    if (arg[n] == '=') {
        *value = arg + n + 1;
        *i += 1;
        return 1;
    }
    if (arg[n] != '\0') return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "flexattn: option %s needs a value\n", name);
        return -1;
    }
    *value = argv[*i + 1];
    *i += 2;
    return 1;
}

int cli_flag(const char *arg, const char *name) {
    return strcmp(arg, name) == 0;
}

int cli_parse_int(const char *s, const char *what, int64_t min, int64_t max, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || errno == ERANGE) goto bad;
    int64_t scale = 1;
    if (*end == 'k' || *end == 'K')
        scale = 1024, end++;
    else if (*end == 'm' || *end == 'M')
        scale = 1024 * 1024, end++;
    if (*end != '\0') goto bad;
    if (v > INT64_MAX / scale || v < INT64_MIN / scale) goto bad;
    v *= scale;
    if (v < min || v > max) {
        fprintf(stderr, "flexattn: %s is %lld; it must be from %lld to %lld\n", what, v,
                (long long)min, (long long)max);
        return -1;
    }
    *out = v;
    return 0;
bad:
    fprintf(stderr, "flexattn: %s: '%s' is not an integer (suffixes k and M allowed)\n", what, s);
    return -1;
}

int cli_parse_double(const char *s, const char *what, double *out) {
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s || *end != '\0') {
        fprintf(stderr, "flexattn: %s: '%s' is not a number\n", what, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_int_list(const char *s, const char *what, int64_t min, int64_t **out, int *count) {
    int cap = 1;
    for (const char *p = s; *p; p++)
        cap += *p == ',';
    int64_t *v = malloc(sizeof *v * (size_t)cap);
    if (!v) {
        fprintf(stderr, "flexattn: out of memory\n");
        return -1;
    }
    int n = 0;
    const char *p = s;
    while (1) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[64];
        if (len == 0 || len >= sizeof item) {
            fprintf(stderr, "flexattn: %s: '%s' is not a comma-separated list of integers\n", what,
                    s);
            free(v);
            return -1;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        if (cli_parse_int(item, what, min, INT32_MAX, &v[n]) != 0) {
            free(v);
            return -1;
        }
        n++;
        if (!comma) break;
        p = comma + 1;
    }
    *out = v;
    *count = n;
    return 0;
}

int cli_parse_param(const char *s, flex_param *p, char *name_buf, size_t name_cap) {
    const char *eq = strchr(s, '=');
    size_t len = eq ? (size_t)(eq - s) : 0;
    if (!eq || len == 0 || len >= name_cap || eq[1] == '\0') {
        fprintf(stderr, "flexattn: --param takes NAME=VALUE (e.g. W=512), not '%s'\n", s);
        return -1;
    }
    memcpy(name_buf, s, len);
    name_buf[len] = '\0';
    for (size_t k = 0; k < len; k++) {
        if (!(isalnum((unsigned char)name_buf[k]) || name_buf[k] == '_') ||
            (k == 0 && isdigit((unsigned char)name_buf[k]))) {
            fprintf(stderr, "flexattn: --param: '%s' is not a valid name\n", name_buf);
            return -1;
        }
    }
    const char *val = eq + 1;
    double v;
    if (cli_parse_double(val, "--param", &v) != 0) return -1;
    int is_float = strpbrk(val, ".eEnN") != NULL; /* '.', exponent, inf, nan */
    if (!is_float && (v != floor(v) || v > INT32_MAX || v < INT32_MIN)) is_float = 1;
    p->name = name_buf;
    p->is_float = is_float;
    p->value = v;
    return 0;
}

int cli_params_add(cli_params *ps, const char *s) {
    flex_param p;
    char name[64];
    if (cli_parse_param(s, &p, name, sizeof name) != 0) return -1;
    int slot = ps->count;
    for (int k = 0; k < ps->count; k++)
        if (strcmp(ps->names[k], name) == 0) slot = k;
    if (slot == CLI_MAX_PARAMS) {
        fprintf(stderr, "flexattn: at most %d --param options\n", CLI_MAX_PARAMS);
        return -1;
    }
    memcpy(ps->names[slot], name, sizeof name);
    ps->params[slot] = p;
    ps->params[slot].name = ps->names[slot];
    if (slot == ps->count) ps->count++;
    /* Names live in ps: re-point every entry (the array may have moved). */
    for (int k = 0; k < ps->count; k++)
        ps->params[k].name = ps->names[k];
    return 0;
}

int cli_context_create(const char *who, const char *spec, flex_context **ctx) {
    if (flex_context_create(spec, ctx) != FLEX_OK) {
        fprintf(stderr, "%s: %s\n", who, flex_error_message(NULL));
        return -1;
    }
    return 0;
}

/* ---- generated buffers ---- */

void cli_alibi_slopes(int64_t n, float *slopes) {
    int64_t m = 1;
    while (m * 2 <= n)
        m *= 2;
    /* m slopes of the largest power of two <= n, then every other slope of
     * 2m for the rest (the ALiBi paper's rule for other head counts). */
    for (int64_t i = 0; i < m; i++)
        slopes[i] = (float)exp2(-8.0 * (double)(i + 1) / (double)m);
    for (int64_t i = 0; i < n - m; i++)
        slopes[m + i] = (float)exp2(-8.0 * (double)(2 * i + 1) / (double)(2 * m));
}

typedef struct known_buffer {
    const char *name;
    flex_dtype dtype;
    int ndim;
} known_buffer;

static const known_buffer known[] = {
    {"doc", FLEX_I32, 1},    {"seq", FLEX_I32, 1},    {"off", FLEX_I32, 1},
    {"slopes", FLEX_F32, 1}, {"img_of", FLEX_I32, 1}, {"intervals", FLEX_I32, 2},
};
#define NUM_KNOWN ((int)(sizeof known / sizeof known[0]))

/* ---- what mod text reads, by the mod language's own lexer ---- */

/* Calls found(name, len, arg) for each identifier of text that `want`
 * selects: followed by '[' (a buffer read) or any. Comments and the
 * insides of other names never match. Returns 0, or -1 on out of memory. */
static int scan_identifiers(const char *text, int buffers_only,
                            void (*found)(const char *name, size_t len, void *arg), void *arg) {
    mod_token_list toks;
    if (mod_lex(text, &toks) != 0) return -1;
    for (int i = 0; i < toks.count; i++) {
        const mod_token *t = &toks.tokens[i];
        if (t->kind != TOK_IDENT) continue;
        if (buffers_only && !(i + 1 < toks.count && toks.tokens[i + 1].kind == TOK_LBRACKET))
            continue;
        found(text + t->offset, t->length, arg);
    }
    mod_token_list_free(&toks);
    return 0;
}

typedef struct name_query {
    const char *name;
    int hit;
} name_query;

static void match_name(const char *name, size_t len, void *arg) {
    name_query *q = arg;
    if (strlen(q->name) == len && !strncmp(name, q->name, len)) q->hit = 1;
}

int cli_text_reads_score(const char *text) {
    name_query q = {"score", 0};
    return scan_identifiers(text, 0, match_name, &q) == 0 && q.hit;
}

/* Whether text reads buffer `name` (the name followed by '['). */
static int text_reads(const char *text, const char *name) {
    name_query q = {name, 0};
    return scan_identifiers(text, 1, match_name, &q) == 0 && q.hit;
}

typedef struct name_list {
    char (*names)[64];
    int count, cap;
} name_list;

static void add_name(const char *name, size_t len, void *arg) {
    name_list *l = arg;
    if (len >= sizeof l->names[0]) return;
    for (int k = 0; k < l->count; k++)
        if (strlen(l->names[k]) == len && !strncmp(l->names[k], name, len)) return;
    if (l->count == l->cap) return;
    memcpy(l->names[l->count], name, len);
    l->names[l->count++][len] = '\0';
}

int cli_text_buffer_names(const char *text, char (*names)[64], int cap) {
    name_list l = {names, 0, cap};
    if (scan_identifiers(text, 1, add_name, &l) != 0) return 0;
    return l.count;
}

int cli_declare_known_buffers(const char *text, flex_buffer_decl *decls) {
    int n = 0;
    for (int k = 0; k < NUM_KNOWN; k++)
        if (text_reads(text, known[k].name))
            decls[n++] = (flex_buffer_decl){known[k].name, known[k].dtype, known[k].ndim};
    return n;
}

/* Document offsets for n tokens: explicit lengths, or `docs` equal-ish
 * documents. malloc'd (count + 1 entries in *num). */
static int32_t *doc_offsets(const cli_buffer_spec *spec, int64_t n, int *num) {
    int docs =
        spec->doc_lengths ? spec->num_doc_lengths : (spec->num_docs > 0 ? spec->num_docs : 4);
    if (!spec->doc_lengths && docs > n) docs = (int)n;
    int32_t *off = malloc(sizeof(int32_t) * (size_t)(docs + 1));
    if (!off) return NULL;
    off[0] = 0;
    int64_t pos = 0;
    for (int d = 0; d < docs; d++) {
        pos = spec->doc_lengths ? pos + spec->doc_lengths[d] : (int64_t)(d + 1) * n / docs;
        off[d + 1] = (int32_t)pos;
    }
    *num = docs + 1;
    return off;
}

static int bind(flex_context *ctx, flex_mod *mod, const char *name, void *data, flex_dtype dtype,
                int ndim, const int64_t *sizes, cli_buffers *bufs) {
    bufs->data[bufs->count++] = data;
    flex_tensor t = flex_tensor_contiguous(data, dtype, ndim, sizes, FLEX_DEVICE_CPU);
    if (flex_mod_bind_buffer(ctx, mod, name, &t) != FLEX_OK) {
        fprintf(stderr, "flexattn: binding buffer %s: %s\n", name, flex_error_message(ctx));
        return -1;
    }
    return 0;
}

/* The note for a buffer that gets generated data: what it holds and how. */
static void announce(const cli_buffer_spec *spec, const char *name, int64_t n) {
    if (!spec->announce) return;
    char how[160];
    int docs =
        spec->doc_lengths ? spec->num_doc_lengths : (spec->num_docs > 0 ? spec->num_docs : 4);
    const char *docs_how =
        spec->doc_lengths ? "of the --doc-lengths" : "of equal length (--docs N)";
    if (!strcmp(name, "doc") || !strcmp(name, "seq"))
        snprintf(how, sizeof how, "i32[%lld], the document of each token, %d documents %s",
                 (long long)n, docs, docs_how);
    else if (!strcmp(name, "off"))
        snprintf(how, sizeof how, "i32[%d], the offsets of %d documents %s", docs + 1, docs,
                 docs_how);
    else if (!strcmp(name, "slopes"))
        snprintf(how, sizeof how, "f32[%lld], the ALiBi slopes of %lld heads",
                 (long long)(spec->heads > 0 ? spec->heads : 1),
                 (long long)(spec->heads > 0 ? spec->heads : 1));
    else if (!strcmp(name, "img_of"))
        snprintf(how, sizeof how, "i32[%lld], the image of each kv token, 3 images of equal length",
                 (long long)spec->kv_len);
    else
        snprintf(how, sizeof how,
                 "i32[3][2], the seed's Flamingo intervals [[0,7],[1,7],[7,12]] scaled to %lld "
                 "queries",
                 (long long)spec->q_len);
    fprintf(stderr,
            "%s: note: no data given for buffer '%s': generated %s; give data with --buffer "
            "%s=FILE.npy\n",
            spec->announce, name, how, name);
}

int cli_bind_generated_buffers(flex_context *ctx, flex_mod *mod, const cli_buffer_spec *spec,
                               cli_buffers *bufs) {
    const ir_mod *ir = &mod->ir;
    int64_t n = spec->q_len > spec->kv_len ? spec->q_len : spec->kv_len;
    if (spec->doc_lengths) {
        int64_t sum = 0;
        for (int d = 0; d < spec->num_doc_lengths; d++)
            sum += spec->doc_lengths[d];
        if (sum != n) {
            fprintf(stderr,
                    "flexattn: --doc-lengths add up to %lld tokens but the sequences have %lld\n",
                    (long long)sum, (long long)n);
            return -1;
        }
    }
    for (int b = 0; b < ir->num_buffers; b++) {
        const ir_buffer *decl = &ir->buffers[b];
        int provided = 0;
        for (int p = 0; p < spec->num_provided; p++)
            if (!strcmp(spec->provided[p], decl->name)) provided = 1;
        if (provided) continue;
        int k = 0;
        while (k < NUM_KNOWN && strcmp(known[k].name, decl->name) != 0)
            k++;
        if (k == NUM_KNOWN || known[k].dtype != decl->dtype || known[k].ndim != decl->ndim) {
            fprintf(stderr,
                    "flexattn: buffer '%s' (%s, %d dims) has no generated data; known buffers "
                    "are doc, seq, off (i32[n]), slopes (f32[H]), img_of (i32[kv_len]) and "
                    "intervals (i32[3][2]); give other data with --buffer NAME=FILE.npy\n",
                    decl->name, flex_dtype_name(decl->dtype), decl->ndim);
            return -1;
        }
        if (bufs->count >= CLI_MAX_BUFFERS) return -1;
        const char *name = decl->name;
        announce(spec, name, n);
        if (!strcmp(name, "doc") || !strcmp(name, "seq") || !strcmp(name, "off")) {
            int num = 0;
            int32_t *off = doc_offsets(spec, n, &num);
            if (!off) goto oom;
            if (!strcmp(name, "off")) {
                int64_t size = num;
                if (bind(ctx, mod, name, off, FLEX_I32, 1, &size, bufs)) return -1;
                continue;
            }
            int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
            if (!ids) {
                free(off);
                goto oom;
            }
            flex_status st = flex_sequence_ids_from_offsets(off, num, ids, n);
            free(off);
            if (st != FLEX_OK) {
                fprintf(stderr, "flexattn: document ids: %s\n", flex_error_message(NULL));
                free(ids);
                return -1;
            }
            if (bind(ctx, mod, name, ids, FLEX_I32, 1, &n, bufs)) return -1;
        } else if (!strcmp(name, "slopes")) {
            int64_t heads = spec->heads > 0 ? spec->heads : 1;
            float *slopes = malloc(sizeof(float) * (size_t)heads);
            if (!slopes) goto oom;
            cli_alibi_slopes(heads, slopes);
            if (bind(ctx, mod, name, slopes, FLEX_F32, 1, &heads, bufs)) return -1;
        } else if (!strcmp(name, "img_of")) {
            int32_t *img = malloc(sizeof(int32_t) * (size_t)spec->kv_len);
            if (!img) goto oom;
            int64_t per = (spec->kv_len + 2) / 3;
            for (int64_t t = 0; t < spec->kv_len; t++)
                img[t] = (int32_t)(t / per);
            int64_t size = spec->kv_len;
            if (bind(ctx, mod, name, img, FLEX_I32, 1, &size, bufs)) return -1;
        } else { /* intervals */
            int32_t *iv = malloc(sizeof(int32_t) * 6);
            if (!iv) goto oom;
            int64_t q = spec->q_len;
            iv[0] = 0;
            iv[1] = (int32_t)(7 * q / 12);
            iv[2] = (int32_t)(q / 12);
            iv[3] = (int32_t)(7 * q / 12);
            iv[4] = (int32_t)(7 * q / 12);
            iv[5] = (int32_t)q;
            int64_t sizes[2] = {3, 2};
            if (bind(ctx, mod, name, iv, FLEX_I32, 2, sizes, bufs)) return -1;
        }
    }
    return 0;
oom:
    fprintf(stderr, "flexattn: out of memory for buffer data\n");
    return -1;
}

void cli_buffers_free(cli_buffers *bufs) {
    for (int k = 0; k < bufs->count; k++)
        free(bufs->data[k]);
    bufs->count = 0;
}

/* ---- buffers from files ---- */

int cli_file_buffers_load(cli_file_buffers *fb, const char *name, const char *path) {
    size_t n = strlen(name);
    if (n == 0 || n >= sizeof fb->names[0]) {
        fprintf(stderr, "flexattn: '%s' is not a buffer name (1 to 63 characters)\n", name);
        return -1;
    }
    int slot = 0;
    while (slot < fb->count && strcmp(fb->names[slot], name) != 0)
        slot++;
    if (slot == CLI_MAX_BUFFERS) {
        fprintf(stderr, "flexattn: at most %d buffers from files\n", CLI_MAX_BUFFERS);
        return -1;
    }
    npy_array a;
    char err[512];
    if (npy_read(path, &a, err, sizeof err) != FLEX_OK) {
        fprintf(stderr, "flexattn: buffer %s: %s\n", name, err);
        return -1;
    }
    if (a.ndim < 1 || a.ndim > 4) {
        fprintf(stderr, "flexattn: buffer %s: %s has %d dims; buffers have 1 to 4\n", name, path,
                a.ndim);
        npy_free(&a);
        return -1;
    }
    char *path_copy = malloc(strlen(path) + 1);
    if (!path_copy) {
        npy_free(&a);
        fprintf(stderr, "flexattn: out of memory\n");
        return -1;
    }
    strcpy(path_copy, path);
    if (slot < fb->count) {
        npy_free(&fb->arrays[slot]);
        free(fb->paths[slot]);
    }
    memcpy(fb->names[slot], name, n + 1);
    fb->arrays[slot] = a;
    fb->paths[slot] = path_copy;
    if (slot == fb->count) fb->count++;
    for (int k = 0; k < fb->count; k++)
        fb->name_list[k] = fb->names[k];
    return 0;
}

int cli_file_buffers_add(cli_file_buffers *fb, const char *arg) {
    const char *eq = strchr(arg, '=');
    size_t n = eq ? (size_t)(eq - arg) : 0;
    char name[64];
    if (!eq || n == 0 || n >= sizeof name || eq[1] == '\0') {
        fprintf(stderr, "flexattn: --buffer takes NAME=FILE.npy, not '%s'\n", arg);
        return -1;
    }
    memcpy(name, arg, n);
    name[n] = '\0';
    return cli_file_buffers_load(fb, name, eq + 1);
}

int cli_file_buffers_has(const cli_file_buffers *fb, const char *name) {
    for (int k = 0; k < fb->count; k++)
        if (!strcmp(fb->names[k], name)) return 1;
    return 0;
}

void cli_file_buffers_free(cli_file_buffers *fb) {
    for (int k = 0; k < fb->count; k++) {
        npy_free(&fb->arrays[k]);
        free(fb->paths[k]);
    }
    fb->count = 0;
}

int cli_declare_buffers(const char *text, const cli_file_buffers *fb, flex_buffer_decl *decls) {
    int n = 0;
    for (int k = 0; fb && k < fb->count && n < CLI_MAX_BUFFERS; k++)
        if (text_reads(text, fb->names[k]))
            decls[n++] = (flex_buffer_decl){fb->names[k], fb->arrays[k].dtype, fb->arrays[k].ndim};
    flex_buffer_decl known_decls[NUM_KNOWN];
    int nk = cli_declare_known_buffers(text, known_decls);
    for (int k = 0; k < nk && n < CLI_MAX_BUFFERS; k++) {
        int given = 0;
        for (int f = 0; fb && f < fb->count; f++)
            if (!strcmp(fb->names[f], known_decls[k].name)) given = 1;
        if (!given) decls[n++] = known_decls[k];
    }
    return n;
}

/* An int64 file for a buffer declared i32 (a preset's doc, NumPy's default
 * integer): narrowed when every value fits, as torch's .int(). */
static int narrow_i64(npy_array *a, const char *name, const char *path) {
    size_t n = a->bytes / sizeof(int64_t);
    const int64_t *src = a->data;
    int32_t *dst = malloc(n * sizeof *dst + 1);
    if (!dst) {
        fprintf(stderr, "flexattn: out of memory\n");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
            fprintf(stderr,
                    "flexattn: buffer %s from %s: element %zu is %lld, outside the i32 the "
                    "mod declares\n",
                    name, path, i, (long long)src[i]);
            free(dst);
            return -1;
        }
        dst[i] = (int32_t)src[i];
    }
    free(a->data);
    a->data = dst;
    a->dtype = FLEX_I32;
    a->bytes = n * sizeof *dst;
    return 0;
}

int cli_bind_file_buffers(flex_context *ctx, flex_mod *mod, cli_file_buffers *fb) {
    const ir_mod *ir = &mod->ir;
    for (int b = 0; b < ir->num_buffers; b++)
        for (int k = 0; k < fb->count; k++) {
            if (strcmp(fb->names[k], ir->buffers[b].name) != 0) continue;
            npy_array *a = &fb->arrays[k];
            if (ir->buffers[b].dtype == FLEX_I32 && a->dtype == FLEX_I64 &&
                narrow_i64(a, fb->names[k], fb->paths[k]))
                return -1;
            flex_tensor t =
                flex_tensor_contiguous(a->data, a->dtype, a->ndim, a->shape, FLEX_DEVICE_CPU);
            if (flex_mod_bind_buffer(ctx, mod, fb->names[k], &t) != FLEX_OK) {
                fprintf(stderr, "flexattn: buffer %s from %s: %s\n", fb->names[k], fb->paths[k],
                        flex_error_message(ctx));
                return -1;
            }
        }
    return 0;
}
