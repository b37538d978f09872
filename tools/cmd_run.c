/*
 * `flexattn run`: runs attention with a preset or mod text on random (or
 * loaded) inputs, times it and prints the seed benchmark's table, the block
 * mask picture and, with --check, the error against the fp64 oracle.
 *
 * The steps are separate functions over one `run_state` (setup, inputs,
 * forward timing, check, save) so that further passes (backward) slot in
 * beside the forward ones.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli.h"
#include "cli_args.h"
#include "cli_backward.h"
#include "check_decode.h"
#include "internal.h"
#include "npy.h"
#include "oracle.h"
#include "clock.h"

static void usage(FILE *f) {
    fprintf(f, "usage: flexattn run PRESET|--text MOD [options]\n"
               "\n"
               "Runs attention with a preset (mask or score) or mod text on random inputs\n"
               "(or on .npy files, --load), and prints the median forward time and TFLOP/s.\n"
               "\n"
               "options:\n"
               "  --text MOD          mod text: a score mod when it uses the variable\n"
               "                      `score` (comments do not count), else a mask mod\n"
               "  --mask PRESET       add a mask preset (with a score preset or text)\n"
               "  --mask-text MOD     add mask mod text\n"
               "  -B N, -H N          batch and query heads (default 1, 8)\n"
               "  --hkv N             key/value heads (default H; H must be a multiple)\n"
               "  --len N             q and kv length (default 2048)\n"
               "  --q-len N, --kv-len N\n"
               "  -D N, --dv N        head dims of q/k and of v (default 64, Dv = D)\n"
               "  --dtype T           f32, f16 or bf16 (default f32)\n"
               "  --backend SPEC      auto, cpu, cuda, ... (default FLEXATTN_BACKEND)\n"
               "  --block N           block-mask block size (default 128)\n"
               "  --q-block N, --kv-block N  block sizes of q and kv separately\n"
               "  --param NAME=VAL    set a param (repeatable)\n"
               "  --docs N            documents for doc/seq/off buffers (default 4)\n"
               "  --buffer NAME=FILE  data of buffer NAME from a .npy file (repeatable); mod\n"
               "                      text may read it under that name, a preset's buffer\n"
               "                      of that name takes it instead of generated data (a\n"
               "                      note on stderr names each buffer that gets generated\n"
               "                      data: doc, seq, off, slopes, img_of, intervals)\n"
               "  --doc-lengths a,b   explicit document lengths (sum = the longer length)\n"
               "  --warmup N          untimed runs first (default 2)\n"
               "  --iters N           timed runs (default 10)\n"
               "  --check             compare with the fp64 oracle (rows subsampled when long)\n"
               "  --backward          also time the backward (dq, dk, dv; BW FLOPs = 2.5 x FW);\n"
               "                      with --check, compare its gradients with the fp64 oracle\n"
               "                      when the problem is small enough for it\n"
               "  --deterministic     with --backward: the backward's deterministic mode\n"
               "                      (bit-identical gradients every run; on GPUs dq from a\n"
               "                      pass of its own, and no gradients of buffers)\n"
               "  --load DIR|Q,K,V    read q, k, v from .npy files: DIR/q.npy, DIR/k.npy,\n"
               "                      DIR/v.npy (or the three files named), 4-D C order:\n"
               "                      q (B, Hq, Lq, D), k (B, Hkv, Lkv, D), v (B, Hkv, Lkv,\n"
               "                      Dv); the shapes are the files' (-B, -H, --hkv, --len,\n"
               "                      --q-len, --kv-len, -D, --dv are refused beside it);\n"
               "                      <f4, <f2, bf16 as <V2 (ml_dtypes), |V2 or <u2; --dtype\n"
               "                      converts them. With DIR, DIR/<buffer>.npy gives the\n"
               "                      data of any buffer the mods read that --buffer does not\n"
               "  --save DIR          write DIR/out.npy (the run's dtype) and DIR/lse.npy (f32);\n"
               "                      with --backward also dq, dk, dv, the dout they answer\n"
               "                      (dout.npy) and d<buffer>.npy (f32) for each float\n"
               "                      buffer the score mod reads; bf16 is written as <V2:\n"
               "                      np.load(f).view(ml_dtypes.bfloat16) reads it\n"
               "  --json              print one JSON object instead of the table\n"
               "\n"
               "decode (any of these makes the run a decode step: --q-len query rows per\n"
               "batch against a cache of --kv-len keys; the time is reported with the\n"
               "effective K+V bandwidth; the block mask is built by the call, in\n"
               "absolute positions; --load, --save and --backward are refused beside them):\n"
               "  --q-offset N        absolute position of query row 0 in every batch\n"
               "                      (default: each batch's kv length minus --q-len)\n"
               "  --kv-lengths a,b    keys attended per batch (one value: all; default --kv-len)\n"
               "  --page-size N       a paged cache: pages of N rows and a page table\n"
               "  --shuffle-pages     pages in a pseudo-random order (default: in order)\n"
               "  --kv-splits N       the kv_splits hint (0: the backend's policy)\n");
}

typedef struct run_opts {
    const char *preset, *text, *mask_preset, *mask_text, *backend, *load, *save;
    int64_t B, H, Hkv, len, q_len, kv_len, D, Dv, block, q_block, kv_block, docs, warmup, iters;
    int64_t *doc_lengths; /* --doc-lengths, malloc'd */
    int num_doc_lengths;
    cli_file_buffers files; /* --buffer */
    flex_dtype dtype;
    int check, json, backward, deterministic, len_given, dtype_given;
    /* decode: q_offset -1 = per batch, kv length - Lq */
    int64_t q_offset, page_size, kv_splits;
    int64_t *kv_lengths; /* --kv-lengths, malloc'd */
    int num_kv_lengths, shuffle_pages, decode;
    const char *shape_option; /* the first of -B, -H, --len, ... given, or NULL */
    cli_params params;
} run_opts;

typedef struct run_state {
    run_opts o;
    flex_context *ctx;
    flex_mod *score, *mask_mod;
    flex_block_mask *mask;
    cli_buffers bufs;
    int64_t B, Hq, Hkv, Lq, Lkv, D, Dv;
    flex_dtype dtype;
    void *host[3]; /* q, k, v on the host (contiguous BHSD) */
    void *dev[5];  /* q, k, v, out, lse on the device */
    flex_tensor t[5];
    double fw_ms, fw_flops, density;
    double bw_ms; /* 0 when the backward was not run */
} run_state;

enum { T_Q = 0, T_K, T_V, T_OUT, T_LSE };

static int parse_dtype(const char *s, flex_dtype *dt) {
    if (!strcmp(s, "f32") || !strcmp(s, "float32"))
        *dt = FLEX_F32;
    else if (!strcmp(s, "f16") || !strcmp(s, "float16"))
        *dt = FLEX_F16;
    else if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16"))
        *dt = FLEX_BF16;
    else {
        fprintf(stderr, "flexattn run: --dtype must be f32, f16 or bf16, not '%s'\n", s);
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, run_opts *o) {
    memset(o, 0, sizeof *o);
    o->B = 1, o->H = 8, o->Hkv = -1, o->len = 2048, o->q_len = -1, o->kv_len = -1;
    o->D = 64, o->Dv = -1, o->warmup = 2, o->iters = 10, o->dtype = FLEX_F32;
    o->q_block = -1, o->kv_block = -1, o->q_offset = -1;
    for (int i = 1; i < argc;) {
        const char *v = NULL, *arg = argv[i];
        int r;
        if (cli_flag(arg, "-h") || cli_flag(arg, "--help")) {
            usage(stdout);
            exit(CLI_EXIT_OK);
        }
        if (cli_flag(arg, "--check")) {
            o->check = 1, i++;
            continue;
        }
        if (cli_flag(arg, "--json")) {
            o->json = 1, i++;
            continue;
        }
        if (cli_flag(arg, "--backward")) {
            o->backward = 1, i++;
            continue;
        }
        if (cli_flag(arg, "--deterministic")) {
            o->deterministic = 1, i++;
            continue;
        }
        if (cli_flag(arg, "--shuffle-pages")) {
            o->shuffle_pages = o->decode = 1, i++;
            continue;
        }
#define OPT(name) ((r = cli_option(argc, argv, &i, name, &v)) != 0)
#define INT(name, lo, hi, dst)                                                                     \
    if (OPT(name)) {                                                                               \
        if (r < 0 || cli_parse_int(v, name, lo, hi, dst)) return -1;                               \
        continue;                                                                                  \
    }
#define STR(name, dst)                                                                             \
    if (OPT(name)) {                                                                               \
        if (r < 0) return -1;                                                                      \
        dst = v;                                                                                   \
        continue;                                                                                  \
    }
        /* Shape options are remembered: --load takes the shapes from its files. */
        static const char *const shape_options[] = {"-B",      "-H",       "--hkv", "--len",
                                                    "--q-len", "--kv-len", "-D",    "--dv"};
        for (size_t k = 0; k < sizeof shape_options / sizeof shape_options[0]; k++) {
            size_t n = strlen(shape_options[k]);
            if (!o->shape_option && !strncmp(arg, shape_options[k], n) &&
                (arg[n] == '\0' || arg[n] == '='))
                o->shape_option = shape_options[k];
        }
        STR("--text", o->text)
        STR("--mask", o->mask_preset)
        STR("--mask-text", o->mask_text)
        STR("--backend", o->backend)
        STR("--load", o->load)
        STR("--save", o->save)
        INT("-B", 1, INT32_MAX, &o->B)
        INT("-H", 1, INT32_MAX, &o->H)
        INT("--hkv", 1, INT32_MAX, &o->Hkv)
        if (OPT("--len")) {
            if (r < 0 || cli_parse_int(v, "--len", 1, INT32_MAX, &o->len)) return -1;
            o->len_given = 1;
            continue;
        }
        INT("--q-len", 1, INT32_MAX, &o->q_len)
        INT("--kv-len", 1, INT32_MAX, &o->kv_len)
        INT("-D", 1, 4096, &o->D)
        INT("--dv", 1, 4096, &o->Dv)
        INT("--block", 0, 1024, &o->block)
        INT("--q-block", 0, 1024, &o->q_block)
        INT("--kv-block", 0, 1024, &o->kv_block)
        INT("--docs", 1, INT32_MAX, &o->docs)
        INT("--warmup", 0, 1000000, &o->warmup)
        INT("--iters", 1, 1000000, &o->iters)
        /* The decode options: each makes the run a decode step. */
#define DECODE_INT(name, lo, dst)                                                                  \
    if (OPT(name)) {                                                                               \
        if (r < 0 || cli_parse_int(v, name, lo, INT32_MAX, dst)) return -1;                        \
        o->decode = 1;                                                                             \
        continue;                                                                                  \
    }
        DECODE_INT("--q-offset", 0, &o->q_offset)
        DECODE_INT("--page-size", 1, &o->page_size)
        DECODE_INT("--kv-splits", 0, &o->kv_splits)
#undef DECODE_INT
        if (OPT("--kv-lengths")) {
            free(o->kv_lengths);
            o->kv_lengths = NULL;
            if (r < 0 ||
                cli_parse_int_list(v, "--kv-lengths", 0, &o->kv_lengths, &o->num_kv_lengths))
                return -1;
            o->decode = 1;
            continue;
        }
        if (OPT("--dtype")) {
            if (r < 0 || parse_dtype(v, &o->dtype)) return -1;
            o->dtype_given = 1;
            continue;
        }
        if (OPT("--param")) {
            if (r < 0 || cli_params_add(&o->params, v)) return -1;
            continue;
        }
        if (OPT("--buffer")) {
            if (r < 0 || cli_file_buffers_add(&o->files, v)) return -1;
            continue;
        }
        if (OPT("--doc-lengths")) {
            free(o->doc_lengths);
            o->doc_lengths = NULL;
            if (r < 0 ||
                cli_parse_int_list(v, "--doc-lengths", 0, &o->doc_lengths, &o->num_doc_lengths))
                return -1;
            continue;
        }
#undef OPT
#undef INT
#undef STR
        if (arg[0] == '-' && arg[1] != '\0') {
            fprintf(stderr, "flexattn run: unknown option '%s' (see flexattn run --help)\n", arg);
            return -1;
        }
        if (o->preset) {
            fprintf(stderr, "flexattn run: one preset only ('%s' and '%s' given)\n", o->preset,
                    arg);
            return -1;
        }
        o->preset = arg;
        i++;
    }
    if (!o->preset == !o->text) {
        fprintf(stderr, "flexattn run: give a preset name or --text (see flexattn run --help)\n");
        return -1;
    }
    if (o->mask_preset && o->mask_text) {
        fprintf(stderr, "flexattn run: --mask and --mask-text exclude each other\n");
        return -1;
    }
    if (o->deterministic && !o->backward) {
        fprintf(stderr, "flexattn run: --deterministic is an option of the backward; add "
                        "--backward\n");
        return -1;
    }
    if (o->decode && (o->load || o->save || o->backward)) {
        fprintf(stderr, "flexattn run: --load, --save and --backward are not available with the "
                        "decode options\n");
        return -1;
    }
    if (o->load && o->shape_option) {
        fprintf(stderr,
                "flexattn run: %s cannot be used with --load: the shapes come from the files "
                "(q is (B, Hq, Lq, D), k (B, Hkv, Lkv, D), v (B, Hkv, Lkv, Dv))\n",
                o->shape_option);
        return -1;
    }
    return 0;
}

/* ---- mods ---- */

/* The --param values a preset declares (others belong to the other mod). */
static int params_for_preset(const flex_preset *p, const cli_params *all, flex_param *out) {
    int n = 0;
    for (int i = 0; i < all->count; i++)
        for (int k = 0; k < p->num_params; k++)
            if (!strcmp(p->params[k].name, all->params[i].name)) out[n++] = all->params[i];
    return n;
}

/* After a compile error in text: what each buffer the text reads is (its
 * dtype and dims come from its file or from the generated data), since the
 * parser's message knows only the declaration. */
static void explain_buffers(const run_state *s, const char *text, const char *error) {
    if (!text) return;
    int wants_bool = strstr(error, "compare the int with 0") || strstr(error, "must return bool");
    flex_buffer_decl decls[CLI_MAX_BUFFERS];
    int n = cli_declare_buffers(text, &s->o.files, decls);
    for (int d = 0; d < n; d++) {
        const cli_file_buffers *fb = &s->o.files;
        int k = 0;
        while (k < fb->count && strcmp(fb->names[k], decls[d].name) != 0)
            k++;
        char quoted[70];
        snprintf(quoted, sizeof quoted, "'%s'", decls[d].name);
        int is_int =
            decls[d].dtype == FLEX_U8 || decls[d].dtype == FLEX_I32 || decls[d].dtype == FLEX_I64;
        if (!strstr(error, quoted) && !(is_int && wants_bool)) continue;
        char shape[128] = "";
        if (k < fb->count) {
            size_t at = 0;
            for (int i = 0; i < fb->arrays[k].ndim && at < sizeof shape; i++)
                at += (size_t)snprintf(shape + at, sizeof shape - at, "%s%lld", i ? ", " : "(",
                                       (long long)fb->arrays[k].shape[i]);
            if (at < sizeof shape) snprintf(shape + at, sizeof shape - at, ")");
        }
        fprintf(stderr, "flexattn run: note: buffer '%s' is %s with %d dim%s%s%s%s%s\n",
                decls[d].name, flex_dtype_name(decls[d].dtype), decls[d].ndim,
                decls[d].ndim == 1 ? "" : "s", k < fb->count ? ", shape " : " (generated data)",
                shape, k < fb->count ? ", from " : "", k < fb->count ? fb->paths[k] : "");
        if (is_int && wants_bool)
            fprintf(stderr,
                    "flexattn run: note: '%s' reads as an int; where a bool is wanted (a flag "
                    "with || or &&) write %s[...] != 0, or save the file as bool (|b1)\n",
                    decls[d].name, decls[d].name);
    }
}

static flex_status compile_one(run_state *s, const char *preset, const char *text,
                               flex_mod_kind want_kind, flex_mod **out) {
    if (preset) {
        const flex_preset *p = flex_preset_find(preset);
        if (!p) {
            fprintf(stderr, "flexattn run: unknown preset '%s' (flexattn mask --list lists them)\n",
                    preset);
            return FLEX_ERR_MOD_NAME;
        }
        flex_param ps[CLI_MAX_PARAMS];
        int n = params_for_preset(p, &s->o.params, ps);
        return flex_preset_compile(s->ctx, preset, ps, n, out);
    }
    flex_buffer_decl decls[CLI_MAX_BUFFERS];
    int nd = cli_declare_buffers(text, &s->o.files, decls);
    flex_mod_desc desc = {want_kind, text, s->o.params.params, s->o.params.count, decls, nd};
    return flex_mod_compile(s->ctx, &desc, out);
}

/* Adds DIR/<name>.npy (--load DIR) to the file buffers for every buffer
 * the mods read that no --buffer gives and whose file exists: the names
 * the texts index and the buffers the presets declare. */
static int load_dir_buffers(run_state *s) {
    run_opts *o = &s->o;
    if (!o->load || strchr(o->load, ',')) return 0;
    char names[2 * CLI_MAX_BUFFERS][64];
    int n = 0;
    const char *texts[2] = {o->text, o->mask_text};
    for (int t = 0; t < 2; t++)
        if (texts[t]) n += cli_text_buffer_names(texts[t], names + n, CLI_MAX_BUFFERS);
    const char *presets[2] = {o->preset, o->mask_preset};
    for (int t = 0; t < 2; t++) {
        const flex_preset *p = presets[t] ? flex_preset_find(presets[t]) : NULL;
        for (int b = 0; p && b < p->num_buffers && n < 2 * CLI_MAX_BUFFERS; b++)
            snprintf(names[n++], sizeof names[0], "%s", p->buffers[b].name);
    }
    for (int k = 0; k < n; k++) {
        char path[4096];
        struct stat sb;
        if (cli_file_buffers_has(&o->files, names[k]) ||
            snprintf(path, sizeof path, "%s/%s.npy", o->load, names[k]) >= (int)sizeof path ||
            stat(path, &sb) != 0)
            continue;
        if (cli_file_buffers_load(&o->files, names[k], path)) return -1;
    }
    return 0;
}

/* Binds the buffers given by files (--buffer, DIR/<name>.npy), and
 * generated data for the other buffers. */
static int bind_buffers(run_state *s, flex_mod *m) {
    if (cli_bind_file_buffers(s->ctx, m, &s->o.files)) return -1;
    /* Decode queries sit at positions up to the cache's length. */
    int64_t q_len = s->o.decode && s->Lkv > s->Lq ? s->Lkv : s->Lq;
    cli_buffer_spec spec = {.q_len = q_len,
                            .kv_len = s->Lkv,
                            .heads = s->Hq,
                            .num_docs = (int)s->o.docs,
                            .doc_lengths = s->o.doc_lengths,
                            .num_doc_lengths = s->o.num_doc_lengths,
                            .provided = s->o.files.name_list,
                            .num_provided = s->o.files.count,
                            .announce = "flexattn run"};
    return cli_bind_generated_buffers(s->ctx, m, &spec, &s->bufs);
}

/* The block mask of the run: broadcast over batch and heads (as the seed's
 * create_block_mask(mask_mod, 1, 1, S, S)) unless the mask mod reads b or h,
 * whose mask then differs per batch or head. */
static flex_status build_mask(run_state *s) {
    const ir_mod *ir = &s->mask_mod->ir;
    uint8_t *deps = malloc((size_t)(ir->num_nodes > 0 ? ir->num_nodes : 1));
    if (!deps) {
        fprintf(stderr, "flexattn run: out of memory\n");
        return FLEX_ERR_OUT_OF_MEMORY;
    }
    ir_dependencies(ir, deps);
    int root_deps = ir->num_nodes > 0 ? deps[ir->root] : 0;
    free(deps);
    int64_t mb = (root_deps & IR_DEP_B) ? s->B : 1, mh = (root_deps & IR_DEP_H) ? s->Hq : 1;
    int64_t qb = s->o.q_block >= 0 ? s->o.q_block : s->o.block;
    int64_t kb = s->o.kv_block >= 0 ? s->o.kv_block : s->o.block;
    flex_status st = flex_block_mask_create(s->ctx, s->mask_mod, mb, mh, s->Lq, s->Lkv, (int)qb,
                                            (int)kb, &s->mask);
    if (st != FLEX_OK) fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
    return st;
}

/* ---- inputs ---- */

static uint64_t rng = 0x243f6a8885a308d3ull;

static float rand_normalish(void) {
    double sum = 0.0;
    for (int i = 0; i < 4; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        sum += (double)(rng >> 11) / 9007199254740992.0;
    }
    return (float)((sum - 2.0) * 1.7);
}

static void *random_host(flex_dtype dt, size_t n) {
    void *p = malloc(n * flex_dtype_size(dt) + 1);
    if (!p) return NULL;
    for (size_t i = 0; i < n; i++) {
        float v = rand_normalish();
        flex_store_from_float(p, dt, (int64_t)i, v);
    }
    return p;
}

/* Converts a loaded float array to dtype `to` in place (f32, f16, bf16). */
static int convert_array(npy_array *a, flex_dtype to) {
    if (a->dtype == to) return 0;
    size_t n = a->bytes / flex_dtype_size(a->dtype);
    void *dst = malloc(n * flex_dtype_size(to) + 1);
    if (!dst) return -1;
    for (size_t i = 0; i < n; i++)
        flex_store_from_float(dst, to, (int64_t)i,
                              flex_load_as_float(a->data, a->dtype, (int64_t)i));
    free(a->data);
    a->data = dst;
    a->dtype = to;
    a->bytes = n * flex_dtype_size(to);
    return 0;
}

/* Says why the shapes of q (B, Hq, Lq, D), k (B, Hkv, Lkv, D) and v (B,
 * Hkv, Lkv, Dv) do not fit together, naming the file out of place; 0 when
 * they fit. */
static int check_shapes(const npy_array a[3], char paths[3][4096]) {
    const int64_t *q = a[0].shape, *k = a[1].shape, *v = a[2].shape;
    static const char *const dim_names[4] = {"batch", "heads", "length", "head dim"};
    for (int i = 0; i < 3; i++)
        for (int d = 0; d < 4; d++)
            if (a[i].shape[d] < 1) {
                fprintf(stderr, "flexattn run: %s: %s is 0; q, k and v must not be empty\n",
                        paths[i], dim_names[d]);
                return -1;
            }
    if (k[0] != q[0] || v[0] != q[0]) {
        int i = k[0] != q[0] ? 1 : 2;
        fprintf(stderr, "flexattn run: %s: batch %lld, %s has %lld\n", paths[i],
                (long long)a[i].shape[0], paths[0], (long long)q[0]);
        return -1;
    }
    if (k[3] != q[3]) {
        fprintf(stderr, "flexattn run: %s: head dim %lld, %s has %lld\n", paths[1], (long long)k[3],
                paths[0], (long long)q[3]);
        return -1;
    }
    if (v[1] != k[1]) {
        fprintf(stderr, "flexattn run: %s: %lld kv heads, %s has %lld\n", paths[2], (long long)v[1],
                paths[1], (long long)k[1]);
        return -1;
    }
    if (v[2] != k[2]) {
        fprintf(stderr, "flexattn run: %s: length %lld, %s has %lld\n", paths[2], (long long)v[2],
                paths[1], (long long)k[2]);
        return -1;
    }
    if (q[1] % k[1] != 0) {
        fprintf(stderr,
                "flexattn run: %s: %lld heads, not a multiple of the %lld kv heads of %s "
                "(grouped-query attention needs Hq = n * Hkv)\n",
                paths[0], (long long)q[1], (long long)k[1], paths[1]);
        return -1;
    }
    return 0;
}

/* Reads q, k and v from --load (DIR or three files). The shapes are the
 * files'; the dtype is theirs too, or --dtype's when given (float files are
 * converted). */
static int load_inputs(run_state *s) {
    char paths[3][4096];
    static const char *names[3] = {"q", "k", "v"};
    if (strchr(s->o.load, ',')) {
        const char *p = s->o.load;
        for (int i = 0; i < 3; i++) {
            const char *c = strchr(p, ',');
            size_t n = c ? (size_t)(c - p) : strlen(p);
            if ((i < 2 && !c) || (i == 2 && c) || n >= sizeof paths[i]) {
                fprintf(stderr, "flexattn run: --load takes DIR or q.npy,k.npy,v.npy\n");
                return -1;
            }
            memcpy(paths[i], p, n);
            paths[i][n] = '\0';
            p = c ? c + 1 : p + n;
        }
    } else {
        for (int i = 0; i < 3; i++)
            if (snprintf(paths[i], sizeof paths[i], "%s/%s.npy", s->o.load, names[i]) >=
                (int)sizeof paths[i]) {
                fprintf(stderr, "flexattn run: --load: the folder name is too long\n");
                return -1;
            }
    }
    npy_array a[3];
    memset(a, 0, sizeof a);
    int rc = -1;
    for (int i = 0; i < 3; i++) {
        char err[512];
        if (npy_read(paths[i], &a[i], err, sizeof err) != FLEX_OK) {
            fprintf(stderr, "flexattn run: %s\n", err);
            goto out;
        }
        if (a[i].ndim != 4) {
            fprintf(stderr, "flexattn run: %s has %d dims; %s is 4-D (B, %s, %s, %s) in C order\n",
                    paths[i], a[i].ndim, names[i], i == 0 ? "Hq" : "Hkv", i == 0 ? "Lq" : "Lkv",
                    i == 2 ? "Dv" : "D");
            goto out;
        }
        if (a[i].dtype != FLEX_F32 && a[i].dtype != FLEX_F16 && a[i].dtype != FLEX_BF16) {
            fprintf(stderr, "flexattn run: %s holds %s; q, k and v are f32, f16 or bf16\n",
                    paths[i], flex_dtype_name(a[i].dtype));
            goto out;
        }
        if (!s->o.dtype_given && a[i].dtype != a[0].dtype) {
            fprintf(stderr,
                    "flexattn run: %s holds %s, %s holds %s; give --dtype to convert them to "
                    "one\n",
                    paths[i], flex_dtype_name(a[i].dtype), paths[0], flex_dtype_name(a[0].dtype));
            goto out;
        }
    }
    if (check_shapes(a, paths)) goto out;
    s->dtype = s->o.dtype_given ? s->o.dtype : a[0].dtype;
    for (int i = 0; i < 3; i++)
        if (convert_array(&a[i], s->dtype)) {
            fprintf(stderr, "flexattn run: out of host memory for the inputs\n");
            goto out;
        }
    s->B = a[0].shape[0], s->Hq = a[0].shape[1], s->Lq = a[0].shape[2], s->D = a[0].shape[3];
    s->Hkv = a[1].shape[1], s->Lkv = a[1].shape[2], s->Dv = a[2].shape[3];
    for (int i = 0; i < 3; i++) {
        s->host[i] = a[i].data;
        a[i].data = NULL;
    }
    rc = 0;
out:
    for (int i = 0; i < 3; i++)
        npy_free(&a[i]);
    return rc;
}

static int make_inputs(run_state *s) {
    run_opts *o = &s->o;
    if (o->load) {
        if (load_inputs(s)) return -1;
    } else {
        s->dtype = o->dtype;
        s->B = o->B, s->Hq = o->H, s->Hkv = o->Hkv > 0 ? o->Hkv : o->H;
        /* With --doc-lengths and no length given, the documents set it. */
        int64_t len = o->len;
        if (o->doc_lengths && !o->len_given) {
            len = 0;
            for (int d = 0; d < o->num_doc_lengths; d++)
                len += o->doc_lengths[d];
            if (len < 1) {
                fprintf(stderr, "flexattn run: the documents add up to 0 tokens\n");
                return -1;
            }
        }
        s->Lq = o->q_len > 0 ? o->q_len : len;
        s->Lkv = o->kv_len > 0 ? o->kv_len : len;
        s->D = o->D, s->Dv = o->Dv > 0 ? o->Dv : o->D;
        size_t nq = (size_t)(s->B * s->Hq * s->Lq * s->D);
        size_t nk = (size_t)(s->B * s->Hkv * s->Lkv * s->D);
        size_t nv = (size_t)(s->B * s->Hkv * s->Lkv * s->Dv);
        s->host[0] = random_host(s->dtype, nq);
        s->host[1] = random_host(s->dtype, nk);
        s->host[2] = random_host(s->dtype, nv);
        if (!s->host[0] || !s->host[1] || !s->host[2]) {
            fprintf(stderr, "flexattn run: out of host memory for the inputs\n");
            return -1;
        }
    }
    return 0;
}

static int upload_inputs(run_state *s) {
    flex_device_type dev = s->ctx->backend->device_type;
    int64_t dims[5][4] = {{s->B, s->Hq, s->Lq, s->D},
                          {s->B, s->Hkv, s->Lkv, s->D},
                          {s->B, s->Hkv, s->Lkv, s->Dv},
                          {s->B, s->Hq, s->Lq, s->Dv},
                          {s->B, s->Hq, s->Lq, 1}};
    for (int i = 0; i < 5; i++) {
        flex_dtype dt = i == T_LSE ? FLEX_F32 : s->dtype;
        size_t bytes =
            (size_t)(dims[i][0] * dims[i][1] * dims[i][2] * dims[i][3]) * flex_dtype_size(dt);
        if (flex_malloc(s->ctx, bytes ? bytes : 1, &s->dev[i]) != FLEX_OK ||
            (i < 3 && flex_copy_to_device(s->ctx, s->dev[i], s->host[i], bytes) != FLEX_OK)) {
            fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
            return -1;
        }
        s->t[i] =
            flex_tensor_bhsd(s->dev[i], dt, dims[i][0], dims[i][1], dims[i][2], dims[i][3], dev);
        s->t[i].device_index = flex_context_device_index(s->ctx);
    }
    return 0;
}

/* ---- forward ---- */

static int time_forward(run_state *s) {
    int64_t n = s->o.iters;
    double *ms = malloc((size_t)n * sizeof(double));
    if (!ms) return -1;
    for (int64_t i = 0; i < s->o.warmup + n; i++) {
        double t0 = flex_now_ms();
        flex_status st = flex_attention(s->ctx, &s->t[T_Q], &s->t[T_K], &s->t[T_V], s->score,
                                        s->mask, NULL, &s->t[T_OUT], &s->t[T_LSE]);
        if (st == FLEX_OK) st = flex_synchronize(s->ctx);
        if (st != FLEX_OK) {
            fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
            free(ms);
            return -1;
        }
        if (i >= s->o.warmup) ms[i - s->o.warmup] = flex_now_ms() - t0;
    }
    qsort(ms, (size_t)n, sizeof *ms, flex_compare_doubles);
    s->fw_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
    free(ms);
    s->density = s->mask ? 1.0 - flex_block_mask_sparsity(s->mask) / 100.0 : 1.0;
    s->fw_flops = 2.0 * (double)s->B * s->Hq * (double)s->Lq * (double)s->Lkv *
                  (double)(s->D + s->Dv) * s->density;
    return 0;
}

/* ---- check ---- */

static int check_forward(run_state *s, double *rel_out, double *lse_out, int64_t *rows_out) {
    int64_t R = s->Lq <= 256 ? s->Lq : 64;
    int64_t *rows = malloc((size_t)R * sizeof(int64_t));
    size_t out_elems = (size_t)(s->B * s->Hq * s->Lq * s->Dv);
    void *out = malloc(out_elems * flex_dtype_size(s->dtype) + 1);
    float *lse = malloc((size_t)(s->B * s->Hq * s->Lq) * sizeof(float) + 1);
    double *ref = malloc((size_t)(s->B * s->Hq * R * s->Dv) * sizeof(double) + 1);
    double *got = malloc((size_t)(s->B * s->Hq * R * s->Dv) * sizeof(double) + 1);
    double *ref_lse = malloc((size_t)(s->B * s->Hq * R) * sizeof(double) + 1);
    double *got_lse = malloc((size_t)(s->B * s->Hq * R) * sizeof(double) + 1);
    int rc = -1;
    if (!rows || !out || !lse || !ref || !got || !ref_lse || !got_lse) {
        fprintf(stderr, "flexattn run: out of memory for --check\n");
        goto done;
    }
    for (int64_t r = 0; r < R; r++)
        rows[r] = R == s->Lq ? r : r * (s->Lq - 1) / (R - 1);
    if (flex_copy_to_host(s->ctx, out, s->dev[T_OUT], out_elems * flex_dtype_size(s->dtype)) ||
        flex_copy_to_host(s->ctx, lse, s->dev[T_LSE],
                          (size_t)(s->B * s->Hq * s->Lq) * sizeof(float))) {
        fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
        goto done;
    }
    oracle_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = s->ctx;
    p.q = flex_tensor_bhsd(s->host[0], s->dtype, s->B, s->Hq, s->Lq, s->D, FLEX_DEVICE_CPU);
    p.k = flex_tensor_bhsd(s->host[1], s->dtype, s->B, s->Hkv, s->Lkv, s->D, FLEX_DEVICE_CPU);
    p.v = flex_tensor_bhsd(s->host[2], s->dtype, s->B, s->Hkv, s->Lkv, s->Dv, FLEX_DEVICE_CPU);
    p.score_mod = s->score;
    p.mask_mod = s->mask_mod;
    p.rows = rows;
    p.num_rows = R;
    char err[512];
    if (oracle_forward(&p, ref, ref_lse, err, sizeof err) != 0) {
        fprintf(stderr, "flexattn run: oracle: %s\n", err);
        goto done;
    }
    flex_tensor ot = flex_tensor_bhsd(out, s->dtype, s->B, s->Hq, s->Lq, s->Dv, FLEX_DEVICE_CPU);
    for (int64_t b = 0, n = 0; b < s->B; b++)
        for (int64_t h = 0; h < s->Hq; h++)
            for (int64_t r = 0; r < R; r++, n++) {
                for (int64_t c = 0; c < s->Dv; c++)
                    got[n * s->Dv + c] = oracle_load(&ot, b, h, rows[r], c);
                got_lse[n] = lse[(b * s->Hq + h) * s->Lq + rows[r]];
            }
    size_t n = (size_t)(s->B * s->Hq * R);
    *rel_out = oracle_rel_error(ref, got, n * (size_t)s->Dv);
    *lse_out = oracle_lse_error(ref_lse, got_lse, n);
    *rows_out = R;
    rc = 0;
done:
    free(rows);
    free(out);
    free(lse);
    free(ref);
    free(got);
    free(ref_lse);
    free(got_lse);
    return rc;
}

/* ---- backward ---- */

/* Largest B * Hq * Lq * Lkv * (D + Dv) the fp64 backward oracle is asked to
 * check (it has no row subsampling: dK and dV need every row). */
#define BACKWARD_CHECK_LIMIT 4e8

/* Creates the --save folder when it is not there. */
static int make_save_dir(const char *dir) {
    struct stat sb;
    if (mkdir(dir, 0777) != 0 && (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))) {
        fprintf(stderr, "flexattn run: --save %s: cannot create the folder\n", dir);
        return -1;
    }
    return 0;
}

/* Copies `bytes` of device memory to the host and writes them to
 * DIR/name.npy. Returns 0, or -1 after a message. */
static int save_device_array(run_state *s, const char *name, const void *dev, flex_dtype dtype,
                             int ndim, const int64_t *shape, size_t bytes) {
    char path[4096], err[512];
    void *host = malloc(bytes + 1);
    int rc = -1;
    if (!host) {
        fprintf(stderr, "flexattn run: out of host memory for %s\n", name);
        return -1;
    }
    if (flex_copy_to_host(s->ctx, host, dev, bytes) != FLEX_OK)
        fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
    else if (snprintf(path, sizeof path, "%s/%s.npy", s->o.save, name) >= (int)sizeof path)
        fprintf(stderr, "flexattn run: --save: the folder name is too long\n");
    else if (npy_write(path, dtype, ndim, shape, host, err, sizeof err) != FLEX_OK)
        fprintf(stderr, "flexattn run: %s\n", err);
    else
        rc = 0;
    free(host);
    return rc;
}

/*
 * --save with --backward: runs the backward once more with the gradients
 * of the float buffers the score mod reads, and writes DIR/dout.npy (the
 * fixed pseudo-random dout it used), dq.npy, dk.npy, dv.npy and
 * d<buffer>.npy (f32, shaped like the buffer).
 */
static int save_gradients(run_state *s, cli_backward_state *st) {
    flex_buffer_grad grads[IR_MAX_BUFFERS];
    void *grad_dev[IR_MAX_BUFFERS];
    size_t grad_bytes[IR_MAX_BUFFERS];
    int n = 0, rc = -1;
    const flex_mod *m = s->score;
    for (int b = 0; m && b < m->ir.num_buffers; b++) {
        flex_dtype dt = m->ir.buffers[b].dtype;
        if (dt != FLEX_F32 && dt != FLEX_F16 && dt != FLEX_BF16) continue;
        const flex_tensor *view = &m->views[b];
        size_t elems = 1;
        for (int d = 0; d < view->ndim; d++)
            elems *= (size_t)view->sizes[d];
        grad_bytes[n] = elems * sizeof(float);
        float *zeros = calloc(elems + 1, sizeof(float));
        if (!zeros || flex_malloc(s->ctx, grad_bytes[n] + 1, &grad_dev[n]) != FLEX_OK) {
            free(zeros);
            fprintf(stderr, "flexattn run: no memory for the gradient of '%s'\n",
                    m->ir.buffers[b].name);
            goto done;
        }
        flex_status cs = flex_copy_to_device(s->ctx, grad_dev[n], zeros, grad_bytes[n]);
        free(zeros);
        grads[n].name = m->ir.buffers[b].name;
        grads[n].grad = flex_tensor_contiguous(grad_dev[n], FLEX_F32, view->ndim, view->sizes,
                                               flex_context_device_type(s->ctx));
        grads[n].grad.device_index = flex_context_device_index(s->ctx);
        n++;
        if (cs != FLEX_OK) {
            fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
            goto done;
        }
    }
    char why[512];
    if (cli_backward_run_with_buffer_grads(st, grads, n, why, sizeof why)) {
        fprintf(stderr, "flexattn run: %s\n", why);
        goto done;
    }
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        const flex_tensor *t = &st->t[CLI_BW_DQ + i];
        if (save_device_array(s, names[i], st->dev[CLI_BW_DQ + i], t->dtype, 4, t->sizes,
                              st->bytes[CLI_BW_DQ + i]))
            goto done;
    }
    char path[4096], err[512];
    snprintf(path, sizeof path, "%s/dout.npy", s->o.save);
    if (npy_write(path, s->dtype, 4, st->t[CLI_BW_DOUT].sizes, st->host_dout, err, sizeof err)) {
        fprintf(stderr, "flexattn run: %s\n", err);
        goto done;
    }
    for (int g = 0; g < n; g++) {
        char name[80];
        snprintf(name, sizeof name, "d%s", grads[g].name);
        if (save_device_array(s, name, grad_dev[g], FLEX_F32, grads[g].grad.ndim,
                              grads[g].grad.sizes, grad_bytes[g]))
            goto done;
    }
    rc = 0;
done:
    for (int g = 0; g < n; g++)
        flex_free(s->ctx, grad_dev[g]);
    return rc;
}

/* Times the backward; with check, compares it with the oracle (*checked
 * set when it did); with --save, writes the gradients. Returns 0, or -1
 * after a message. */
static int time_backward(run_state *s, int check, double *rel, int *pass, int *checked) {
    cli_backward_problem p;
    memset(&p, 0, sizeof p);
    p.ctx = s->ctx;
    p.q = s->t[T_Q], p.k = s->t[T_K], p.v = s->t[T_V];
    p.host_q = flex_tensor_bhsd(s->host[0], s->dtype, s->B, s->Hq, s->Lq, s->D, FLEX_DEVICE_CPU);
    p.host_k = flex_tensor_bhsd(s->host[1], s->dtype, s->B, s->Hkv, s->Lkv, s->D, FLEX_DEVICE_CPU);
    p.host_v = flex_tensor_bhsd(s->host[2], s->dtype, s->B, s->Hkv, s->Lkv, s->Dv, FLEX_DEVICE_CPU);
    p.score_mod = s->score;
    p.mask_mod = s->mask_mod;
    p.mask = s->mask;
    p.deterministic = s->o.deterministic;
    cli_backward_state st;
    char why[512] = "";
    int rc = cli_backward_prepare(&st, &p, why, sizeof why);
    if (rc == 0)
        rc = cli_backward_time(&st, (int)s->o.warmup, (int)s->o.iters, &s->bw_ms, why, sizeof why);
    *checked = 0;
    double work = (double)s->B * s->Hq * (double)s->Lq * (double)s->Lkv * (double)(s->D + s->Dv);
    if (rc == 0 && check && work <= BACKWARD_CHECK_LIMIT) {
        int r = cli_backward_check(&st, rel, why, sizeof why);
        if (r < 0)
            rc = -1;
        else
            *pass = r, *checked = 1;
    }
    if (rc) fprintf(stderr, "flexattn run: %s\n", why);
    if (rc == 0 && s->o.save && (make_save_dir(s->o.save) || save_gradients(s, &st))) rc = -1;
    cli_backward_free(&st);
    return rc ? -1 : 0;
}

static int save_outputs(run_state *s) {
    if (make_save_dir(s->o.save)) return -1;
    size_t out_bytes = (size_t)(s->B * s->Hq * s->Lq * s->Dv) * flex_dtype_size(s->dtype);
    size_t lse_bytes = (size_t)(s->B * s->Hq * s->Lq) * sizeof(float);
    void *out = malloc(out_bytes + 1), *lse = malloc(lse_bytes + 1);
    int rc = -1;
    char path[4096], err[512];
    if (!out || !lse) goto done;
    if (flex_copy_to_host(s->ctx, out, s->dev[T_OUT], out_bytes) ||
        flex_copy_to_host(s->ctx, lse, s->dev[T_LSE], lse_bytes)) {
        fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
        goto done;
    }
    int64_t oshape[4] = {s->B, s->Hq, s->Lq, s->Dv}, lshape[3] = {s->B, s->Hq, s->Lq};
    snprintf(path, sizeof path, "%s/out.npy", s->o.save);
    if (npy_write(path, s->dtype, 4, oshape, out, err, sizeof err) != FLEX_OK) goto io;
    snprintf(path, sizeof path, "%s/lse.npy", s->o.save);
    if (npy_write(path, FLEX_F32, 3, lshape, lse, err, sizeof err) != FLEX_OK) goto io;
    rc = 0;
    goto done;
io:
    fprintf(stderr, "flexattn run: %s\n", err);
done:
    free(out);
    free(lse);
    return rc;
}

/* ---- output ---- */

static void print_table(const run_state *s) {
    if (s->bw_ms > 0) {
        const char *sep = "+---------------+----------------+-------------------+----------------+"
                          "-------------------+";
        printf("%s\n| Operation     |   FW Time (ms) |   FW FLOPS (TF/s) |   BW Time (ms) |"
               "   BW FLOPS (TF/s) |\n",
               sep);
        printf("+===============+================+===================+================+"
               "===================+\n");
        printf("| flexattention | %14.4f | %17.2f | %14.4f | %17.2f |\n%s\n", s->fw_ms,
               s->fw_flops / (s->fw_ms * 1e-3) / 1e12, s->bw_ms,
               cli_backward_flops(s->fw_flops) / (s->bw_ms * 1e-3) / 1e12, sep);
        return;
    }
    const char *sep = "+---------------+----------------+-------------------+";
    printf("%s\n| Operation     |   FW Time (ms) |   FW FLOPS (TF/s) |\n", sep);
    printf("+===============+================+===================+\n");
    printf("| flexattention | %14.4f | %17.2f |\n%s\n", s->fw_ms,
           s->fw_flops / (s->fw_ms * 1e-3) / 1e12, sep);
}

static void print_mask(const run_state *s) {
    printf("\nBlock Mask:\n");
    if (!s->mask) {
        printf("None\n");
        return;
    }
    size_t need = flex_block_mask_format(s->mask, 0, 0, 32, NULL, 0);
    char *pic = malloc(need + 1);
    if (!pic) return;
    flex_block_mask_format(s->mask, 0, 0, 32, pic, need + 1);
    fputs(pic, stdout);
    free(pic);
    printf("sparsity %.2f%%\n", flex_block_mask_sparsity(s->mask));
}

/* ---- decode ---- */

/*
 * A decode step (the decode options): --q-len rows per batch at their
 * offsets against the cache (tools/check_decode.c builds it, contiguous or
 * paged, on the context's device), timed; with --check compared with the
 * fp64 oracle by the tolerance rule. The bandwidth counts the K and V rows
 * the batches attend, read once. Returns a CLI exit status.
 */
static int run_decode(run_state *s) {
    const run_opts *o = &s->o;
    int B = (int)s->B;
    if (o->num_kv_lengths != 0 && o->num_kv_lengths != 1 && o->num_kv_lengths != B) {
        fprintf(stderr, "flexattn run: --kv-lengths has %d values; 1 or B = %d expected\n",
                o->num_kv_lengths, B);
        return CLI_EXIT_USAGE;
    }
    int32_t *lengths = malloc((size_t)B * sizeof(int32_t)), *offsets = malloc((size_t)B * 4);
    if (!lengths || !offsets) {
        free(lengths), free(offsets);
        return CLI_EXIT_FAILURE;
    }
    double kv_rows = 0.0;
    for (int b = 0; b < B; b++) {
        int64_t len = o->num_kv_lengths ? o->kv_lengths[o->num_kv_lengths == 1 ? 0 : b] : s->Lkv;
        if (len > s->Lkv) {
            fprintf(stderr, "flexattn run: --kv-lengths %lld is longer than --kv-len %lld\n",
                    (long long)len, (long long)s->Lkv);
            free(lengths), free(offsets);
            return CLI_EXIT_USAGE;
        }
        lengths[b] = (int32_t)len;
        int64_t off = o->q_offset >= 0 ? o->q_offset : (len >= s->Lq ? len - s->Lq : 0);
        offsets[b] = (int32_t)off;
        kv_rows += (double)len;
    }
    check_decode_case c = {.B = B,
                           .Hq = (int)s->Hq,
                           .Hkv = (int)s->Hkv,
                           .Lq = (int)s->Lq,
                           .D = (int)s->D,
                           .Dv = (int)s->Dv,
                           .cap = (int)s->Lkv,
                           .dtype = s->dtype,
                           .page_size = (int)o->page_size,
                           .shuffle_pages = o->shuffle_pages,
                           .kv_splits = (int)o->kv_splits,
                           .q_offsets = offsets,
                           .kv_lengths = lengths};
    check_decode_data d;
    char why[512] = "";
    int rc = CLI_EXIT_FAILURE;
    double *ms = malloc((size_t)o->iters * sizeof(double));
    if (!ms || check_decode_make(s->ctx, &c, 0x243f6a8885a308d3ull, &d, why, sizeof why)) {
        fprintf(stderr, "flexattn run: %s\n", ms ? why : "out of memory");
        free(ms), free(lengths), free(offsets);
        return CLI_EXIT_FAILURE;
    }
    for (int64_t i = 0; i < o->warmup + o->iters; i++) {
        double t0 = flex_now_ms();
        if (check_decode_forward(&d, s->score, s->mask_mod, NULL) != FLEX_OK) {
            fprintf(stderr, "flexattn run: %s\n", flex_error_message(s->ctx));
            goto done;
        }
        if (i >= o->warmup) ms[i - o->warmup] = flex_now_ms() - t0;
    }
    qsort(ms, (size_t)o->iters, sizeof *ms, flex_compare_doubles);
    int64_t n = o->iters;
    double median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
    double bytes =
        kv_rows * (double)s->Hkv * (double)(s->D + s->Dv) * (double)flex_dtype_size(s->dtype);
    double tbps = bytes / (median * 1e-3) / 1e12;
    double rel = 0.0, lse_err = 0.0;
    int pass = 1;
    if (o->check) {
        pass = check_decode_compare(&d, &c, s->score, s->mask_mod, &rel, &lse_err, why, sizeof why);
        if (pass < 0) {
            fprintf(stderr, "flexattn run: %s\n", why);
            goto done;
        }
    }
    const char *name = o->preset ? o->preset : "text";
    if (o->json) {
        printf("{\"op\": \"decode\", \"name\": \"%s\", \"backend\": \"%s\", \"device\": "
               "\"%s\", \"dtype\": \"%s\", \"B\": %d, \"H\": %lld, \"Hkv\": %lld, \"q_len\": "
               "%lld, \"kv_len\": %lld, \"D\": %lld, \"Dv\": %lld, \"page_size\": %lld, "
               "\"kv_splits\": %lld, \"fw_ms\": %.6f, \"kv_tbps\": %.6f",
               name, flex_context_backend(s->ctx), flex_context_device_name(s->ctx),
               flex_dtype_name(s->dtype), B, (long long)s->Hq, (long long)s->Hkv, (long long)s->Lq,
               (long long)s->Lkv, (long long)s->D, (long long)s->Dv, (long long)o->page_size,
               (long long)o->kv_splits, median, tbps);
        if (o->check)
            printf(", \"out_margin\": %.3f, \"lse_margin\": %.3f, \"pass\": %s", rel, lse_err,
                   pass ? "true" : "false");
        printf("}\n");
    } else {
        printf("Decode step for %s (%s, %s, %s, B=%d H=%lld Hkv=%lld q_len=%lld cache=%lld "
               "D=%lld Dv=%lld, %s):\n",
               o->preset ? o->preset : o->text, flex_context_backend(s->ctx),
               flex_context_device_name(s->ctx), flex_dtype_name(s->dtype), B, (long long)s->Hq,
               (long long)s->Hkv, (long long)s->Lq, (long long)s->Lkv, (long long)s->D,
               (long long)s->Dv,
               o->page_size ? (o->shuffle_pages ? "shuffled pages" : "pages in order")
                            : "contiguous cache");
        printf("  kv lengths:");
        for (int b = 0; b < B && b < 8; b++)
            printf(" %d", (int)lengths[b]);
        printf("%s\n  q offsets: ", B > 8 ? " ..." : "");
        for (int b = 0; b < B && b < 8; b++)
            printf(" %d", (int)offsets[b]);
        printf("%s\n  time %.4f ms (median of %lld), K+V read %.4f TB/s\n", B > 8 ? " ..." : "",
               median, (long long)n, tbps);
        if (o->check)
            printf("check: %s  out %.2f, lse %.2f of the tolerance bound (all rows vs the fp64 "
                   "oracle)%s%s\n",
                   pass ? "PASS" : "FAIL", rel, lse_err, pass ? "" : ": ", pass ? "" : why);
    }
    rc = pass ? CLI_EXIT_OK : CLI_EXIT_FAILURE;
done:
    check_decode_free(&d);
    free(ms), free(lengths), free(offsets);
    return rc;
}

static void run_free(run_state *s) {
    free(s->o.doc_lengths);
    free(s->o.kv_lengths);
    cli_file_buffers_free(&s->o.files);
    for (int i = 0; i < 5; i++)
        if (s->dev[i]) flex_free(s->ctx, s->dev[i]);
    for (int i = 0; i < 3; i++)
        free(s->host[i]);
    flex_block_mask_destroy(s->mask);
    flex_mod_destroy(s->mask_mod);
    flex_mod_destroy(s->score);
    cli_buffers_free(&s->bufs);
    flex_context_destroy(s->ctx);
}

int cmd_run(int argc, char **argv) {
    run_state s;
    memset(&s, 0, sizeof s);
    if (parse_args(argc, argv, &s.o)) {
        free(s.o.doc_lengths);
        free(s.o.kv_lengths);
        cli_file_buffers_free(&s.o.files);
        return CLI_EXIT_USAGE;
    }
    int rc = CLI_EXIT_FAILURE;
    if (flex_context_create(s.o.backend, &s.ctx) != FLEX_OK) {
        fprintf(stderr, "flexattn run: %s\n", flex_error_message(NULL));
        return CLI_EXIT_FAILURE;
    }
    if (make_inputs(&s)) {
        rc = s.o.load ? CLI_EXIT_USAGE : CLI_EXIT_FAILURE;
        goto done;
    }

    if (load_dir_buffers(&s)) {
        rc = CLI_EXIT_USAGE;
        goto done;
    }

    /* The main mod: a preset of either kind, or text: a score mod when it
     * uses the variable `score`, else a mask mod, or a score mod after all
     * when only that compiles (a float expression without `score`). */
    flex_mod *main_mod = NULL;
    flex_mod_kind kind = FLEX_MOD_MASK;
    if (s.o.preset) {
        const flex_preset *p = flex_preset_find(s.o.preset);
        if (p) kind = p->kind;
    } else if (cli_text_reads_score(s.o.text)) {
        kind = FLEX_MOD_SCORE;
    }
    if (compile_one(&s, s.o.preset, s.o.text, kind, &main_mod) != FLEX_OK) {
        if (s.o.preset && !flex_preset_find(s.o.preset)) {
            rc = CLI_EXIT_USAGE;
            goto done;
        }
        char first_error[2048];
        snprintf(first_error, sizeof first_error, "%s", flex_error_message(s.ctx));
        if (!(s.o.text && kind == FLEX_MOD_MASK &&
              compile_one(&s, NULL, s.o.text, FLEX_MOD_SCORE, &main_mod) == FLEX_OK)) {
            fprintf(stderr, "flexattn run: %s\n", first_error);
            explain_buffers(&s, s.o.text, first_error);
            rc = CLI_EXIT_USAGE;
            goto done;
        }
        kind = FLEX_MOD_SCORE;
    }
    if (kind == FLEX_MOD_SCORE)
        s.score = main_mod;
    else
        s.mask_mod = main_mod;
    if (s.o.mask_preset || s.o.mask_text) {
        if (s.mask_mod) {
            fprintf(stderr,
                    "flexattn run: '%s' is already a mask; --mask adds a mask to a score "
                    "mod\n",
                    s.o.preset ? s.o.preset : "the text");
            rc = CLI_EXIT_USAGE;
            goto done;
        }
        if (compile_one(&s, s.o.mask_preset, s.o.mask_text, FLEX_MOD_MASK, &s.mask_mod) !=
            FLEX_OK) {
            if (s.o.mask_text || flex_preset_find(s.o.mask_preset))
                fprintf(stderr, "flexattn run: %s\n", flex_error_message(s.ctx));
            explain_buffers(&s, s.o.mask_text, flex_error_message(s.ctx));
            rc = CLI_EXIT_USAGE;
            goto done;
        }
        if (flex_mod_get_kind(s.mask_mod) != FLEX_MOD_MASK) {
            fprintf(stderr, "flexattn run: --mask %s is a score mod\n", s.o.mask_preset);
            rc = CLI_EXIT_USAGE;
            goto done;
        }
    }
    if ((s.score && bind_buffers(&s, s.score)) || (s.mask_mod && bind_buffers(&s, s.mask_mod))) {
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    if (s.o.decode) {
        rc = run_decode(&s);
        goto done;
    }
    if (s.mask_mod && build_mask(&s) != FLEX_OK) goto done;
    if (upload_inputs(&s) || time_forward(&s)) goto done;

    double rel = 0.0, lse_err = 0.0, bw_rel = 0.0;
    int64_t rows = 0;
    int pass = 1, bw_pass = 1, bw_checked = 0;
    if (s.o.check) {
        if (check_forward(&s, &rel, &lse_err, &rows)) goto done;
        double tol = s.dtype == FLEX_F32 ? 1e-4 : 1e-2;
        pass = rel < tol && lse_err < 1e-3;
    }
    if (s.o.backward && time_backward(&s, s.o.check, &bw_rel, &bw_pass, &bw_checked)) goto done;
    pass = pass && bw_pass;
    if (s.o.save && save_outputs(&s)) goto done;

    const char *name = s.o.preset ? s.o.preset : "text";
    if (s.o.json) {
        printf("{\"op\": \"forward\", \"name\": \"%s\", \"backend\": \"%s\", \"device\": \"%s\", "
               "\"dtype\": \"%s\", \"B\": %lld, \"H\": %lld, \"Hkv\": %lld, \"q_len\": %lld, "
               "\"kv_len\": %lld, \"D\": %lld, \"Dv\": %lld, \"density\": %.6f, "
               "\"fw_ms\": %.6f, \"fw_tflops\": %.6f",
               name, flex_context_backend(s.ctx), flex_context_device_name(s.ctx),
               flex_dtype_name(s.dtype), (long long)s.B, (long long)s.Hq, (long long)s.Hkv,
               (long long)s.Lq, (long long)s.Lkv, (long long)s.D, (long long)s.Dv, s.density,
               s.fw_ms, s.fw_flops / (s.fw_ms * 1e-3) / 1e12);
        if (s.bw_ms > 0)
            printf(", \"bw_ms\": %.6f, \"bw_tflops\": %.6f", s.bw_ms,
                   cli_backward_flops(s.fw_flops) / (s.bw_ms * 1e-3) / 1e12);
        if (bw_checked) printf(", \"bw_rel_err\": %.3e", bw_rel);
        if (s.o.check)
            printf(", \"rel_err\": %.3e, \"lse_err\": %.3e, \"pass\": %s", rel, lse_err,
                   pass ? "true" : "false");
        printf("}\n");
    } else {
        printf("Results for %s (%s, %s, %s, B=%lld H=%lld Hkv=%lld q_len=%lld kv_len=%lld D=%lld "
               "Dv=%lld):\n",
               s.o.preset ? s.o.preset : s.o.text, flex_context_backend(s.ctx),
               flex_context_device_name(s.ctx), flex_dtype_name(s.dtype), (long long)s.B,
               (long long)s.Hq, (long long)s.Hkv, (long long)s.Lq, (long long)s.Lkv, (long long)s.D,
               (long long)s.Dv);
        print_table(&s);
        print_mask(&s);
        if (s.o.check)
            printf("\ncheck: %s  relative error %.3e, lse error %.3e (%lld of %lld rows vs the "
                   "fp64 oracle)\n",
                   pass ? "PASS" : "FAIL", rel, lse_err, (long long)rows, (long long)s.Lq);
        if (s.o.check && s.o.backward) {
            if (bw_checked)
                printf("backward check: %s  largest relative error of dq, dk, dv %.3e (all rows "
                       "vs the fp64 oracle)\n",
                       bw_pass ? "PASS" : "FAIL", bw_rel);
            else if (s.o.load)
                printf("backward check: skipped (the loaded problem is too large for the fp64 "
                       "oracle: B*H*Lq*Lkv*(D+Dv) is %.3g, the limit %.3g)\n",
                       (double)s.B * s.Hq * (double)s.Lq * (double)s.Lkv * (double)(s.D + s.Dv),
                       BACKWARD_CHECK_LIMIT);
            else
                printf("backward check: skipped (too large for the fp64 oracle; try --len 256)\n");
        }
    }
    rc = pass ? CLI_EXIT_OK : CLI_EXIT_FAILURE;
done:
    run_free(&s);
    return rc;
}
