/*
 * Argument helpers shared by the `flexattn` subcommands: option matching,
 * numbers and sizes, --param NAME=VALUE, and generated data for the
 * buffers presets read (document ids, sequence offsets, ALiBi slopes, the
 * Flamingo example).
 *
 * Conventions: parse functions return 0 on success and -1 on a bad value,
 * after printing a message that names the option to stderr. Subcommands
 * exit with status 2 on a usage error and 1 when the library reports one.
 */
#ifndef FLEXATTN_CLI_ARGS_H
#define FLEXATTN_CLI_ARGS_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"
#include "npy.h"

enum { CLI_EXIT_OK = 0, CLI_EXIT_FAILURE = 1, CLI_EXIT_USAGE = 2 };

/*
 * Matches argv[*i] against option `name` ("--q-len" or "-B"). Accepts
 * "--name VALUE" and "--name=VALUE". On a match sets *value (pointing into
 * argv), advances *i past the value and returns 1; returns 0 when argv[*i]
 * is another option, and -1 (after a message) when the value is missing.
 */
int cli_option(int argc, char **argv, int *i, const char *name, const char **value);

/* A flag without value ("--verbose"): 1 when argv[i] is it, else 0. */
int cli_flag(const char *arg, const char *name);

/* Integer with an optional binary suffix: "4096", "32k" (32768), "1M".
 * `what` names the option in messages; the value must lie in [min, max]. */
int cli_parse_int(const char *s, const char *what, int64_t min, int64_t max, int64_t *out);

/* A float ("0.125", "1e-3", "inf"). */
int cli_parse_double(const char *s, const char *what, double *out);

/* Comma-separated integers ("3,5,8") each >= min, into a malloc'd array
 * (*out, caller frees) of *count entries. */
int cli_parse_int_list(const char *s, const char *what, int64_t min, int64_t **out, int *count);

/*
 * "NAME=VALUE" into a flex_param: is_float is 1 when VALUE is written as a
 * float (has '.', 'e' or is inf/nan), else 0. The name is copied into
 * name_buf (name_cap bytes), which p->name then points to.
 */
int cli_parse_param(const char *s, flex_param *p, char *name_buf, size_t name_cap);

/* Up to CLI_MAX_PARAMS repeated --param options. */
#define CLI_MAX_PARAMS 16
typedef struct cli_params {
    flex_param params[CLI_MAX_PARAMS];
    char names[CLI_MAX_PARAMS][64];
    int count;
} cli_params;

/* Adds one "NAME=VALUE" (a later value for the same name replaces it). */
int cli_params_add(cli_params *ps, const char *s);

/* Creates the context for a --backend value (NULL: FLEXATTN_BACKEND, else
 * auto). On failure prints the library's reason, naming `who` (e.g.
 * "flexattn run"), and returns -1. */
int cli_context_create(const char *who, const char *spec, flex_context **ctx);

/* ---- generated buffers ---- */

/* How to fill the buffers a preset (or mod text) reads. */
typedef struct cli_buffer_spec {
    int64_t q_len, kv_len;      /* sequence lengths of the run */
    int64_t heads;              /* H, for slopes (>= 1) */
    int num_docs;               /* documents of equal-ish length; 0 = 4 */
    const int64_t *doc_lengths; /* explicit lengths (sum = max(q_len, kv_len)), or NULL */
    int num_doc_lengths;
    /* Buffers the caller binds itself (from files): left alone here. */
    const char *const *provided;
    int num_provided;
    /* When set ("flexattn run"), a note on stderr names each buffer that
     * gets generated data and how it was made; NULL: silent. */
    const char *announce;
} cli_buffer_spec;

#define CLI_MAX_BUFFERS 16

/* The data behind generated buffers; owned by the caller until
 * cli_buffers_free, and bound to a mod that must not outlive it. */
typedef struct cli_buffers {
    void *data[CLI_MAX_BUFFERS];
    int count;
} cli_buffers;

/*
 * Generates and binds every buffer of mod by its name:
 *   doc            i32[n]      document id per token (n = max(q_len, kv_len))
 *   seq            i32[n]      sequence id per token (same as doc)
 *   off            i32[D + 1]  offsets of the D documents
 *   slopes         f32[H]      the standard ALiBi slopes of H heads
 *   img_of         i32[kv_len] image of each image token (3 images, as the
 *                              seed's Flamingo example)
 *   intervals      i32[3][2]   [start, end) of the text tokens that see each
 *                              image, the seed's [[0,7],[1,7],[7,12]] scaled
 *                              to q_len
 * Buffers named in spec->provided are skipped. The user may not know that
 * a buffer they gave no data gets such data: with spec->announce each one
 * is named on stderr with how it was generated. Another name, or a
 * declaration these do not fit, is an error naming the buffer (returns -1
 * after a message). Returns 0 when every other buffer is bound.
 */
int cli_bind_generated_buffers(flex_context *ctx, flex_mod *mod, const cli_buffer_spec *spec,
                               cli_buffers *bufs);
void cli_buffers_free(cli_buffers *bufs);

/*
 * Buffer declarations for user mod text: every known buffer name above
 * that the text reads (the name followed by '[') is declared with its
 * dtype and dims. Fills decls (room for 8), returns the count.
 */
int cli_declare_known_buffers(const char *text, flex_buffer_decl *decls);

/* ---- buffers from files (--buffer NAME=FILE.npy, DIR/NAME.npy) ---- */

/* Data for buffers a mod reads, read from NumPy files; any name, any
 * dtype and 1 to 4 dims, as the file says. Owns the arrays and paths. */
typedef struct cli_file_buffers {
    int count;
    char names[CLI_MAX_BUFFERS][64];
    const char *name_list[CLI_MAX_BUFFERS]; /* names[i], for cli_buffer_spec.provided */
    npy_array arrays[CLI_MAX_BUFFERS];
    char *paths[CLI_MAX_BUFFERS]; /* the file of each, malloc'd, for messages */
} cli_file_buffers;

/* Reads the file of one "NAME=FILE.npy" (a later NAME replaces an earlier
 * one). Returns 0, or -1 after a message naming the option or the file. */
int cli_file_buffers_add(cli_file_buffers *fb, const char *arg);
/* Reads buffer `name` from `path` (as --buffer name=path). */
int cli_file_buffers_load(cli_file_buffers *fb, const char *name, const char *path);
/* 1 when a file gives buffer `name`. */
int cli_file_buffers_has(const cli_file_buffers *fb, const char *name);
void cli_file_buffers_free(cli_file_buffers *fb);

/* ---- what mod text reads (through the mod language's lexer, so comments
 * and longer names never count) ---- */

/* 1 when text uses the variable `score` (a score mod), else 0. */
int cli_text_reads_score(const char *text);

/* The distinct names text indexes (`name[`), up to cap, into names;
 * returns the count. */
int cli_text_buffer_names(const char *text, char (*names)[64], int cap);

/*
 * Buffer declarations for user mod text: each file buffer the text reads
 * (its name followed by '['), with the file's dtype and dims, then each
 * known buffer (below) it reads that no file gives. Fills decls (room for
 * CLI_MAX_BUFFERS), returns the count.
 */
int cli_declare_buffers(const char *text, const cli_file_buffers *fb, flex_buffer_decl *decls);

/* Binds every file buffer mod declares. The mod borrows the data: fb must
 * outlive it. An i64 file for a buffer declared i32 (a preset's) is
 * narrowed in place when its values fit. Returns 0, or -1 after a message
 * (dtype or dims differ). */
int cli_bind_file_buffers(flex_context *ctx, flex_mod *mod, cli_file_buffers *fb);

/* The standard ALiBi slopes of n heads (2^(-8 i / n) for a power of two n,
 * interleaved from the next power of two otherwise), into slopes[0..n). */
void cli_alibi_slopes(int64_t n, float *slopes);

#endif /* FLEXATTN_CLI_ARGS_H */
