/*
 * An independent evaluator of the mod language, for the oracles.
 *
 * It works directly over a mod's text, with its own tokenizer, recursive-
 * descent parser and tree walker, written from docs/mod-language.md alone: it
 * shares no code with core/mod/ (lexer, parser, IR, folding, interpreters,
 * derivative). A mistake in the library's front end therefore shows up as a
 * difference from this evaluator instead of being copied into the reference.
 *
 * Values follow the language: 32-bit wrapping ints, floor division, Python's
 * `%`, bools, and floats that are 32-bit where the language fixes a value
 * (literals, params, buffer elements, int-to-float conversion). Float
 * operations run in double (REFMOD_F64, the fp64 oracle) or are rounded to
 * float after every operation (REFMOD_F32, a naive same-precision
 * reference). Gradients come from forward-mode dual numbers: d/d score and
 * d/d each float buffer element the result reads.
 */
#ifndef FLEXATTN_TESTS_REFMOD_H
#define FLEXATTN_TESTS_REFMOD_H

#include <stddef.h>
#include <stdint.h>

#include "flexattn.h"

/* Most buffer elements whose partial derivatives one evaluation tracks. */
#define REFMOD_MAX_PARTIALS 16

typedef enum refmod_precision { REFMOD_F64 = 0, REFMOD_F32 = 1 } refmod_precision;

/* A parsed mod (or an and/or of two). Owns its tree and its evaluation
 * scratch: one refmod must not be evaluated by two threads at once. */
typedef struct refmod refmod;

/* Host data of one buffer, matched to the mod's declarations by name. */
typedef struct refmod_buffer {
    const char *name;
    const void *data;
    flex_dtype dtype;
    int ndim;
    int64_t sizes[4];
    int64_t strides[4]; /* in elements */
} refmod_buffer;

/* The partial derivative of the result with respect to one element of a
 * float buffer: element is its row-major index over the buffer's sizes. */
typedef struct refmod_partial {
    const char *buffer;
    int64_t element;
    double d;
} refmod_partial;

typedef struct refmod_result {
    double value; /* a bool is 0 or 1 */
    double dscore;
    int num_partials;
    refmod_partial partials[REFMOD_MAX_PARTIALS];
} refmod_result;

/*
 * Parses text as a mod of the given kind with the given params and buffer
 * declarations. Returns 0, or -1 with a message in err (a syntax error or a
 * name that is not in scope). Borrows nothing after it returns.
 */
int refmod_parse(const char *text, flex_mod_kind kind, const flex_param *params, int num_params,
                 const flex_buffer_decl *buffers, int num_buffers, refmod **out, char *err,
                 size_t err_cap);

/* a && b (op '&') or a || b (op '|') of two mask mods; takes ownership of
 * both, also on failure. NULL when memory runs out. */
refmod *refmod_combine(int op, refmod *a, refmod *b);

void refmod_free(refmod *m);

/* Binds data to the buffers of m (of both parts of a combination) by name.
 * Borrows bufs until the next bind. A declared buffer without data stays
 * unbound, and an evaluation that reads it fails. Returns 0, or -1 with a
 * message in err when the dtype or ndim of the data differ. */
int refmod_bind(refmod *m, const refmod_buffer *bufs, int num_bufs, char *err, size_t err_cap);

/*
 * Evaluates m at one point. With want_grad, res->dscore and res->partials
 * are filled too. Returns 0, or -1 with a message in err: a buffer read out
 * of range (naming buffer, index, size and point), a type error, too many
 * partials.
 */
int refmod_eval(refmod *m, refmod_precision precision, int want_grad, double score, int32_t b,
                int32_t h, int32_t q, int32_t kv, refmod_result *res, char *err, size_t err_cap);

/* Whether m calls tanh_approx, whose error on a backend is documented (up
 * to 2^-11 relative) rather than zero. */
int refmod_uses_approx(const refmod *m);

/* From now on tanh_approx(x) evaluates to tanh(x) * (1 + rel): the extreme
 * of the documented error, to bound its effect. 0 (the default): tanh. */
void refmod_set_approx_error(refmod *m, double rel);

#endif /* FLEXATTN_TESTS_REFMOD_H */
