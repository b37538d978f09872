/*
 * Robustness of the mod front end against hostile text: a deterministic
 * mutation fuzzer over the seed patterns and every preset. Each mutant is
 * compiled as a mask mod and as a score mod with random params and buffer
 * declarations. Whatever the text, compiling must not crash, must return
 * FLEX_OK or a text/description error, an error must point into the text
 * with a caret, and an accepted mod must round-trip through its canonical
 * text and evaluate (with small bound buffers) without undefined behaviour.
 * The generator has a fixed seed, so a failure reproduces; the message
 * names the iteration and the text.
 */
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "mod/eval.h"
#include "mod/parse.h"

/* Check's ck_assert records every passing assertion through a pipe, which
 * would dominate the run time over 40 000 compilations: assert the hot
 * checks only when they fail. */
#define expect(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                    \
    } while (0)

#define FUZZ_INPUTS 20000
#define MAX_TEXT    24000

/* ---- a splitmix64 generator, so results do not depend on the C library ---- */

static uint64_t rng_state;

static uint64_t rng_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, n), n > 0 */
static size_t below(size_t n) {
    return (size_t)(rng_u64() % n);
}

static int chance(int percent) {
    return (int)below(100) < percent;
}

/* ---- growable text ---- */

typedef struct text {
    char *s;
    size_t len, cap;
} text;

static void text_reserve(text *t, size_t extra) {
    if (t->len + extra + 1 <= t->cap) return;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < t->len + extra + 1)
        cap *= 2;
    int fresh = t->s == NULL;
    t->s = realloc(t->s, cap);
    expect(t->s != NULL, "out of memory");
    if (fresh) t->s[0] = '\0';
    t->cap = cap;
}

static void text_set(text *t, const char *s, size_t n) {
    t->len = 0;
    text_reserve(t, n);
    memcpy(t->s, s, n);
    t->len = n;
    t->s[n] = '\0';
}

/* Replaces bytes [at, at + del) with ins[0..n). */
static void text_splice(text *t, size_t at, size_t del, const char *ins, size_t n) {
    if (at > t->len) at = t->len;
    if (del > t->len - at) del = t->len - at;
    text_reserve(t, n);
    memmove(t->s + at + n, t->s + at + del, t->len - at - del + 1);
    if (n) memcpy(t->s + at, ins, n);
    t->len = t->len - del + n;
}

/* ---- the corpus ---- */

/* The seed patterns, plus texts that reach every operator, function,
 * literal form and layout the language has. */
static const char *const seed_texts[] = {
    "q >= kv",
    "q >= kv && q - kv <= W",
    "kv <= P || q >= kv",
    "q >= kv && doc[q] == doc[kv]",
    "let qx = q // W; let qy = q % W; let kx = kv // W; let ky = kv % W;\n"
    "abs(qx - kx) <= WINDOW && abs(qy - ky) <= WINDOW",
    "let qx = q / IW; let qy = q % IW; let kx = kv / IW; let ky = kv % IW;\n"
    "let cx = clamp(qx, K / 2, IH - 1 - K / 2); let cy = clamp(qy, K / 2, IW - 1 - K / 2);\n"
    "abs(cx - kx) <= K / 2 && abs(cy - ky) <= K / 2   # NATTEN\n",
    "score + slopes[h] * (kv - q)",
    "score + exp2(-((h + 1) * 8.0 / H)) * (q - kv)",
    "30.0 * tanh(score / 30.0)",
    "cap * tanh_approx(score / cap)",
    "where(abs(kv - q) % 2 == 0, score * 2.0, score * 0.5)",
    "where(q_idx >= kv_idx, score, -inf)",
    "let qn = q - offsets[seq[q]]; let kn = kv - offsets[seq[kv]];\n"
    "qn >= kn && seq[q] == seq[kv]",
    "let img = img_of[kv]; let iv = intervals[img];\nq >= iv[0] && q < iv[1]",
    "let image_idx = img_of[kv_idx];\r\nlet interval = intervals[image_idx];\r\n"
    "(q_idx >= interval[0]) & (q_idx < interval[1]);",
    "q > kv ? score + bias[h, q - kv + 3] : score * float(~kv ^ q | 1 & b)",
    "keep[kv] && !(batch != head) || (q ^ kv) & 1 == 0",
    "\tlet d = q - kv;\n\tlet s = sqrt(float(d * d)) + rsqrt(2.) + log(1e-3) + log2(.5);\n"
    "\tscore * sigmoid(s) - pow(score, 2) + sin(score) * cos(score) / tan(1.5)",
    "max(min(score, 1e30), -3.4e38) + floor(score) - ceil(score) + exp(-score) + int(score) // 3",
    "let t0 = counts[q]; t0 % 4 != -2147483648 // -1 && t0 >= 2147483647 + 1",
    "float(true) + int(1.5) * (q % 0) + (kv // 0) + score % 0.0 # edge cases",
    "where(dense[b, h, q, kv], score, bias[h][kv] * 0.125)",
};
#define NUM_SEEDS ((int)(sizeof seed_texts / sizeof seed_texts[0]))

/* Tokens the token mutations insert. */
static const char *const dictionary[] = {
    "q",         "kv",         "b",     "h",     "score", "q_idx", "kv_idx", "batch", "head",
    "let",       "true",       "false", "inf",   "W",     "P",     "cap",    "doc",   "slopes",
    "intervals", "bias",       "abs",   "min",   "max",   "clamp", "where",  "exp",   "exp2",
    "log",       "log2",       "sqrt",  "rsqrt", "sin",   "cos",   "tan",    "tanh",  "tanh_approx",
    "sigmoid",   "pow",        "floor", "ceil",  "float", "int",   "(",      ")",     "[",
    "]",         ",",          ";",     "=",     "?",     ":",     "||",     "|",     "&&",
    "&",         "^",          "==",    "!=",    "<",     "<=",    ">",      ">=",    "+",
    "-",         "*",          "/",     "//",    "%",     "!",     "~",      "#",     "\n",
    " ",         "0",          "1",     "2",     "-1",    "0.5",   "1e9",    "t_0",   "t0",
    "let x =",   "let x = q;", "x",     ".",     "$",     "@",     "\"",     "'",     "\\",
    "{",         "}",
};
#define NUM_DICTIONARY ((int)(sizeof dictionary / sizeof dictionary[0]))

static const char *const numbers[] = {
    "2147483647",   "2147483648",
    "-2147483648",  "-2147483649",
    "4294967296",   "99999999999999999999999999999999",
    "1e38",         "3.4028235e38",
    "3.4028236e38", "3.5e38",
    "1e39",         "1e-38",
    "1e-45",        "1e-46",
    "1e-400",       "1e999999999",
    "1e-999999999", "0.0",
    "-0.0",         "00000000000000000000000001",
    "1.2.3",        "1e",
    "1e+",          "1e-",
    ".e5",          "0x10",
    "1_000",        "5.",
    ".5",           "1E+3",
    "0e0",          "123456789012345678901234567890.5",
};
#define NUM_NUMBERS ((int)(sizeof numbers / sizeof numbers[0]))

static const char *const utf8_pieces[] = {
    "\xc3\xa9",         /* e acute */
    "\xcf\x80",         /* pi */
    "\xe2\x88\x9e",     /* infinity sign */
    "\xe2\x89\xa4",     /* less-or-equal sign */
    "\xf0\x9d\x91\x9e", /* mathematical italic q */
    "\xef\xbb\xbf",     /* byte order mark */
    "\xc2\xa0",         /* no-break space */
    "\xc3",             /* truncated sequence */
    "\xff\xfe",         /* never valid */
    "\xc0\xaf",         /* overlong */
    "\xed\xa0\x80",     /* surrogate */
    "\xf4\x90\x80\x80", /* beyond U+10FFFF */
};
#define NUM_UTF8 ((int)(sizeof utf8_pieces / sizeof utf8_pieces[0]))

static const char alphabet[] = "qkvbhscore_W0123456789.eE+-*/%<>=!&|^~?:,;()[] \t\n\r#";

/* Rough token boundaries: identifiers, numbers, two-character operators,
 * single characters. Good enough to mutate at token granularity. */
typedef struct span {
    size_t at, len;
} span;

static int is_name_char(char c, int first) {
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (!first && c >= '0' && c <= '9');
}

static int is_number_char(char c) {
    return (c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E';
}

static int tokenize(const text *t, span *spans, int max) {
    int n = 0;
    size_t i = 0;
    while (i < t->len && n < max) {
        size_t start = i;
        char c = t->s[i];
        if (is_name_char(c, 1)) {
            while (i < t->len && is_name_char(t->s[i], 0))
                i++;
        } else if ((c >= '0' && c <= '9') || c == '.') {
            while (i < t->len && is_number_char(t->s[i]))
                i++;
        } else if (i + 1 < t->len && strchr("|&=!<>/", c) && strchr("|&=/", t->s[i + 1])) {
            i += 2;
        } else {
            i++;
        }
        spans[n].at = start;
        spans[n].len = i - start;
        n++;
    }
    return n;
}

static void insert_str(text *t, size_t at, const char *s) {
    text_splice(t, at, 0, s, strlen(s));
}

/* A random text of the corpus: a seed, a preset, or an earlier accepted
 * mutant. */
#define MAX_KEPT 64
static char *kept[MAX_KEPT];
static int num_kept;

static const char *corpus_pick(void) {
    int presets = flex_preset_count();
    size_t n = (size_t)NUM_SEEDS + (size_t)presets + (size_t)num_kept;
    size_t i = below(n);
    if (i < (size_t)NUM_SEEDS) return seed_texts[i];
    i -= (size_t)NUM_SEEDS;
    if (i < (size_t)presets) return flex_preset_at((int)i)->text;
    return kept[i - (size_t)presets];
}

static void keep_text(const char *s) {
    if (strlen(s) > 2000) return;
    int slot = num_kept < MAX_KEPT ? num_kept++ : (int)below(MAX_KEPT);
    free(kept[slot]);
    kept[slot] = strdup(s);
    expect(kept[slot] != NULL, "out of memory");
}

static void mutate(text *t) {
    static span spans[8192];
    size_t at = t->len ? below(t->len + 1) : 0;
    char buf[64];
    switch (below(16)) {
    case 0: /* delete characters */
        text_splice(t, at, 1 + below(8), "", 0);
        break;
    case 1: /* insert a character */
        buf[0] = alphabet[below(sizeof alphabet - 1)];
        text_splice(t, at, 0, buf, 1);
        break;
    case 2: /* replace a character */
        buf[0] = alphabet[below(sizeof alphabet - 1)];
        text_splice(t, at, 1, buf, 1);
        break;
    case 3: { /* duplicate a range */
        size_t n = 1 + below(32);
        if (n > t->len - at) n = t->len - at;
        char *copy = malloc(n + 1);
        memcpy(copy, t->s + at, n);
        text_splice(t, at, 0, copy, n);
        free(copy);
        break;
    }
    case 4:
    case 5:
    case 6:
    case 7: { /* token edits */
        int n = tokenize(t, spans, 8192);
        if (n == 0) {
            insert_str(t, 0, dictionary[below(NUM_DICTIONARY)]);
            break;
        }
        span s = spans[below((size_t)n)];
        int kind = (int)below(4);
        if (kind == 0) {
            text_splice(t, s.at, s.len, "", 0);
        } else if (kind == 1) {
            insert_str(t, chance(50) ? s.at : s.at + s.len, dictionary[below(NUM_DICTIONARY)]);
        } else if (kind == 2) {
            const char *d = dictionary[below(NUM_DICTIONARY)];
            text_splice(t, s.at, s.len, d, strlen(d));
        } else {
            char *copy = malloc(s.len + 2);
            memcpy(copy, t->s + s.at, s.len);
            copy[s.len] = ' ';
            text_splice(t, s.at, 0, copy, s.len + 1);
            free(copy);
        }
        break;
    }
    case 8: { /* splice: a prefix of this text and a suffix of another */
        const char *other = corpus_pick();
        size_t olen = strlen(other);
        size_t from = olen ? below(olen + 1) : 0;
        text_splice(t, at, t->len - at, other + from, olen - from);
        break;
    }
    case 9: { /* random bytes, never NUL */
        size_t n = 1 + below(16);
        for (size_t i = 0; i < n; i++)
            buf[i] = (char)(1 + below(255));
        text_splice(t, at, below(3), buf, n);
        break;
    }
    case 10: /* UTF-8, valid and not */
        insert_str(t, at, utf8_pieces[below(NUM_UTF8)]);
        break;
    case 11: { /* a very long identifier, or a long name-like run */
        size_t n = chance(50) ? 60 + below(10) : 30 + below(6000);
        char *id = malloc(n + 1);
        for (size_t i = 0; i < n; i++)
            id[i] = i && chance(10) ? '0' + (char)below(10) : 'a' + (char)below(26);
        id[n] = '\0';
        if (chance(50)) {
            int k = tokenize(t, spans, 8192);
            if (k) {
                span s = spans[below((size_t)k)];
                text_splice(t, s.at, s.len, id, n);
                free(id);
                break;
            }
        }
        text_splice(t, at, 0, id, n);
        free(id);
        break;
    }
    case 12: { /* deep nesting near the parser's limit, around a token */
        int depth = 180 + (int)below(50);
        static const char *const opens[] = {"(", "-", "!", "~", "abs(", "float(", "doc["};
        static const char *const closes[] = {")", "", "", "", ")", ")", "]"};
        int form = (int)below(7);
        int k = tokenize(t, spans, 8192);
        size_t lo = 0, hi = t->len;
        if (k) {
            span s = spans[below((size_t)k)];
            lo = s.at;
            hi = s.at + s.len;
        }
        size_t olen = strlen(opens[form]), clen = strlen(closes[form]);
        text pre = {0}, post = {0};
        for (int i = 0; i < depth; i++) {
            text_splice(&pre, pre.len, 0, opens[form], olen);
            text_splice(&post, post.len, 0, closes[form], clen);
        }
        text_splice(t, hi, 0, post.s ? post.s : "", post.len);
        text_splice(t, lo, 0, pre.s, pre.len);
        free(pre.s);
        free(post.s);
        break;
    }
    case 13: /* numbers at and beyond every limit */
        insert_str(t, at, numbers[below(NUM_NUMBERS)]);
        if (chance(50)) insert_str(t, at, " ");
        break;
    case 14: { /* a long flat chain, near the node limit */
        size_t n = 100 + below(chance(5) ? 5000 : 400);
        static const char *const links[] = {" + q", " * 2", " - doc[q]", " && q > kv", " + 1.5"};
        const char *link = links[below(5)];
        text chain = {0};
        for (size_t i = 0; i < n; i++)
            insert_str(&chain, chain.len, link);
        text_splice(t, at, 0, chain.s, chain.len);
        free(chain.s);
        break;
    }
    default: { /* structure-free text */
        size_t n = below(80);
        t->len = 0;
        for (size_t i = 0; i < n; i++) {
            buf[0] = chance(80) ? alphabet[below(sizeof alphabet - 1)] : (char)(1 + below(255));
            text_splice(t, t->len, 0, buf, 1);
        }
        break;
    }
    }
    if (t->len > MAX_TEXT) text_splice(t, MAX_TEXT, t->len - MAX_TEXT, "", 0);
}

/* ---- random descriptions ---- */

static const char *const param_pool[] = {"W", "P", "IW", "IH", "K", "H", "cap", "WINDOW"};
#define NUM_PARAM_POOL ((int)(sizeof param_pool / sizeof param_pool[0]))

static const char *const buffer_pool[] = {"doc", "slopes",  "img_of", "intervals", "bias", "keep",
                                          "seq", "offsets", "counts", "dense",     "lo",   "hi"};
#define NUM_BUFFER_POOL ((int)(sizeof buffer_pool / sizeof buffer_pool[0]))

typedef struct desc_space {
    flex_param params[32];
    flex_buffer_decl buffers[IR_MAX_BUFFERS];
    int num_params, num_buffers;
} desc_space;

static double random_param_value(int is_float) {
    switch (below(12)) {
    case 0:
        return is_float ? NAN : 2.5;
    case 1:
        return is_float ? INFINITY : 3e9;
    case 2:
        return is_float ? 1e300 : -2147483648.0;
    case 3:
        return 2147483647.0;
    case 4:
        return -(double)below(100);
    default:
        return is_float ? (double)below(1000) / 7.0 : (double)below(300);
    }
}

static void random_desc(desc_space *d, const flex_preset *preset) {
    d->num_params = d->num_buffers = 0;
    if (preset && chance(60)) {
        for (int i = 0; i < preset->num_params && d->num_params < 32; i++) {
            d->params[d->num_params] = preset->params[i];
            if (chance(20))
                d->params[d->num_params].value =
                    random_param_value(d->params[d->num_params].is_float);
            d->num_params++;
        }
        for (int i = 0; i < preset->num_buffers && d->num_buffers < IR_MAX_BUFFERS; i++)
            d->buffers[d->num_buffers++] = preset->buffers[i];
        return;
    }
    for (int i = 0; i < NUM_PARAM_POOL; i++) {
        if (!chance(90)) continue;
        int is_float = strcmp(param_pool[i], "cap") == 0 ? !chance(10) : chance(15);
        d->params[d->num_params++] =
            (flex_param){param_pool[i], is_float,
                         chance(95) ? (is_float ? 30.0 : (double)(1 + below(64)))
                                    : random_param_value(is_float)};
    }
    for (int i = 0; i < NUM_BUFFER_POOL; i++) {
        if (!chance(90)) continue;
        flex_dtype dtype = chance(60) ? FLEX_I32 : (flex_dtype)below(7);
        int ndim = 1;
        if (strcmp(buffer_pool[i], "intervals") == 0 || strcmp(buffer_pool[i], "bias") == 0)
            ndim = 2;
        if (strcmp(buffer_pool[i], "dense") == 0) ndim = 4;
        if (chance(15)) ndim = 1 + (int)below(4);
        d->buffers[d->num_buffers++] = (flex_buffer_decl){buffer_pool[i], dtype, ndim};
    }
}

/* ---- checks ---- */

/* The text with non-printing bytes escaped, for failure messages. */
static const char *escaped(const char *s) {
    static char out[600];
    size_t n = 0;
    for (; *s && n < sizeof out - 8; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 32 && c < 127 && c != '\\')
            out[n++] = (char)c;
        else
            n += (size_t)snprintf(out + n, sizeof out - n, "\\x%02x", c);
    }
    if (*s) n += (size_t)snprintf(out + n, sizeof out - n, "...");
    out[n] = '\0';
    return out;
}

/* Line number `line` (1-based) of s, without its '\n' or a trailing '\r'. */
static int find_line(const char *s, long line, const char **start, size_t *len) {
    long at = 1;
    const char *p = s;
    while (at < line) {
        p = strchr(p, '\n');
        if (!p) return -1;
        p++;
        at++;
    }
    const char *end = strchr(p, '\n');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n > 0 && p[n - 1] == '\r') n--;
    *start = p;
    *len = n;
    return 0;
}

/* "L:C: error: what\n<line or a window of it>\n<caret line>" with L and C
 * inside the text and the caret under column C. */
static void check_error_message(long iter, const char *src, const char *msg) {
    char *end;
    long line = strtol(msg, &end, 10);
    expect(end != msg && *end == ':', "#%ld: no 'L:' prefix in '%s' for '%s'", iter, escaped(msg),
           escaped(src));
    const char *p = end + 1;
    long col = strtol(p, &end, 10);
    expect(end != p && strncmp(end, ": error: ", 9) == 0, "#%ld: no 'L:C: error: ' prefix in '%s'",
           iter, escaped(msg));
    const char *line_start;
    size_t line_len;
    expect(line >= 1 && find_line(src, line, &line_start, &line_len) == 0,
           "#%ld: line %ld is not in the text '%s'", iter, line, escaped(src));
    expect(col >= 1 && (size_t)col <= line_len + 1,
           "#%ld: column %ld is outside line %ld (length %zu) of '%s'", iter, col, line, line_len,
           escaped(src));
    const char *quoted = strchr(end, '\n');
    expect(quoted != NULL, "#%ld: no source line in '%s'", iter, escaped(msg));
    quoted++;
    const char *caret = strchr(quoted, '\n');
    expect(caret != NULL, "#%ld: no caret line in '%s'", iter, escaped(msg));
    size_t quoted_len = (size_t)(caret - quoted);
    caret++;
    size_t caret_at = strspn(caret, " \t");
    expect(caret[caret_at] == '^', "#%ld: malformed caret line in '%s'", iter, escaped(msg));
    size_t tail = strspn(caret + caret_at + 1, "~");
    expect(caret[caret_at + 1 + tail] == '\0', "#%ld: junk after the caret in '%s'", iter,
           escaped(msg));
    /* The quoted text is line L, or a window of it, placed so the caret sits
     * under column C. */
    expect((size_t)(col - 1) >= caret_at, "#%ld: caret right of column %ld in '%s'", iter, col,
           escaped(msg));
    size_t window = (size_t)(col - 1) - caret_at;
    expect(window + quoted_len <= line_len && memcmp(line_start + window, quoted, quoted_len) == 0,
           "#%ld: quoted line does not match line %ld in '%s' for '%s'", iter, line, escaped(msg),
           escaped(src));
    for (size_t i = 0; i < caret_at; i++)
        expect(caret[i] == (quoted[i] == '\t' ? '\t' : ' '),
               "#%ld: caret indentation does not follow the line in '%s'", iter, escaped(msg));
}

static void check_structure(long iter, const flex_mod *mod, flex_mod_kind kind) {
    const ir_mod *m = &mod->ir;
    expect(m->num_nodes >= 1 && m->num_nodes <= IR_MAX_NODES && m->root == m->num_nodes - 1,
           "#%ld: bad root", iter);
    expect(m->kind == kind, "#%ld: the mod has the wrong kind", iter);
    expect(m->nodes[m->root].type == (kind == FLEX_MOD_MASK ? IR_BOOL : IR_FLOAT),
           "#%ld: the result has the wrong type", iter);
    for (int i = 0; i < m->num_nodes; i++) {
        const ir_node *n = &m->nodes[i];
        expect(n->op < IR_OP_COUNT && n->type <= IR_FLOAT, "#%ld: node %d is malformed", iter, i);
        for (int a = 0; a < n->nargs; a++)
            expect(n->args[a] >= 0 && n->args[a] < i, "#%ld: node %d is out of order", iter, i);
        if (n->op == IR_LOAD)
            expect(n->buffer >= 0 && n->buffer < m->num_buffers &&
                       n->nargs == m->buffers[n->buffer].ndim,
                   "#%ld: load %d is malformed", iter, i);
        if (n->op == IR_SCORE) expect(kind == FLEX_MOD_SCORE, "#%ld: a mask mod reads score", iter);
    }
}

static void check_round_trip(long iter, const flex_mod *mod, const flex_mod_desc *d) {
    flex_mod_desc again = {d->kind, mod->canonical, NULL, 0, d->buffers, d->num_buffers};
    flex_mod *m2 = NULL;
    flex_status st = flex_mod_compile(NULL, &again, &m2);
    expect(st == FLEX_OK, "#%ld: canonical text '%.300s' of '%s' does not parse: %.300s", iter,
           mod->canonical, escaped(d->text), flex_error_message(NULL));
    expect(strcmp(m2->canonical, mod->canonical) == 0,
           "#%ld: canonical text changes on re-parse: '%.300s' -> '%.300s'", iter, mod->canonical,
           m2->canonical);
    expect(m2->hash == mod->hash, "#%ld: hash changes on re-parse of '%.300s'", iter,
           mod->canonical);
    flex_mod_destroy(m2);
}

/* Small buffers with random contents: indices from the data land both in
 * and out of range, floats include NaN and infinities. */
typedef struct bound_buffers {
    mod_buffer_view views[IR_MAX_BUFFERS];
    unsigned char data[IR_MAX_BUFFERS][256 * 8];
} bound_buffers;

static void random_buffers(const ir_mod *m, bound_buffers *bb) {
    for (int i = 0; i < m->num_buffers; i++) {
        mod_buffer_view *v = &bb->views[i];
        v->dtype = m->buffers[i].dtype;
        v->ndim = m->buffers[i].ndim;
        int64_t count = 1;
        for (int d = v->ndim - 1; d >= 0; d--) {
            v->sizes[d] = 1 + (int64_t)below(4);
            v->strides[d] = count;
            count *= v->sizes[d];
        }
        unsigned char *p = bb->data[i];
        for (int64_t e = 0; e < count; e++) {
            switch (v->dtype) {
            case FLEX_I32: {
                int32_t x = chance(90) ? (int32_t)below(6) - 1 : (int32_t)rng_u64();
                memcpy(p + e * 4, &x, 4);
                break;
            }
            case FLEX_I64: {
                int64_t x = chance(80) ? (int64_t)below(6) - 1 : (int64_t)rng_u64();
                memcpy(p + e * 8, &x, 8);
                break;
            }
            case FLEX_U8:
            case FLEX_BOOL:
                p[e] = chance(80) ? (unsigned char)below(4) : (unsigned char)rng_u64();
                break;
            case FLEX_F32: {
                static const float specials[] = {0.0f,     -0.0f,     1.0f, -2.5f, 1e30f,
                                                 INFINITY, -INFINITY, NAN,  1e-40f};
                float x = specials[below(9)];
                memcpy(p + e * 4, &x, 4);
                break;
            }
            default: { /* f16, bf16: any bit pattern is some value */
                uint16_t x = (uint16_t)rng_u64();
                memcpy(p + e * 2, &x, 2);
                break;
            }
            }
        }
        v->data = p;
    }
}

static int32_t random_index(void) {
    static const int32_t edges[] = {-1, -2147483647 - 1, 2147483647, 1000000, -3};
    return chance(90) ? (int32_t)below(5) : edges[below(5)];
}

static void check_evaluation(long iter, const flex_mod *mod) {
    const ir_mod *m = &mod->ir;
    static bound_buffers bb;
    random_buffers(m, &bb);
    ir_value *scratch = malloc(sizeof *scratch * (size_t)m->num_nodes);
    double *scratch64 = malloc(sizeof *scratch64 * (size_t)m->num_nodes);
    expect(scratch && scratch64, "out of memory");
    static const float scores[] = {0.0f, 1.5f, -7.25f, INFINITY, -INFINITY, NAN, 3e38f, -1e-40f};
    for (int point = 0; point < 4; point++) {
        int32_t b = random_index(), h = random_index(), q = random_index(), kv = random_index();
        float score = scores[below(8)];
        ir_value result;
        mod_bounds_error err = {0};
        int rc = mod_eval_point(m, bb.views, score, b, h, q, kv, scratch, &result, &err);
        if (rc != 0) {
            expect(rc == -1 && err.set, "#%ld: failed evaluation without a bounds error", iter);
            expect(err.buffer >= 0 && err.buffer < m->num_buffers && err.dim >= 0 &&
                       err.dim < m->buffers[err.buffer].ndim,
                   "#%ld: the bounds error names no buffer dimension", iter);
            expect(err.index < 0 || err.index >= err.size,
                   "#%ld: bounds error for an index inside the buffer", iter);
            char msg[512];
            mod_bounds_error_format(m, &err, msg, sizeof msg);
            expect(strstr(msg, m->buffers[err.buffer].name) != NULL,
                   "#%ld: bounds message '%s' does not name the buffer", iter, msg);
        } else if (m->kind == FLEX_MOD_MASK) {
            expect(result.i == 0 || result.i == 1, "#%ld: mask result %d is not a bool", iter,
                   result.i);
        }
        double r64;
        mod_bounds_error err64 = {0};
        if (mod_eval_point_f64(m, bb.views, score, b, h, q, kv, scratch64, &r64, &err64) == 0 &&
            m->kind == FLEX_MOD_MASK)
            expect(r64 == 0.0 || r64 == 1.0, "#%ld: f64 mask result is not a bool", iter);
    }
    free(scratch);
    free(scratch64);
}

static int compile_and_check(long iter, const char *src, flex_mod_kind kind, const desc_space *ds) {
    flex_mod_desc d = {kind, src, ds->params, ds->num_params, ds->buffers, ds->num_buffers};
    flex_mod *mod = NULL;
    flex_status st = flex_mod_compile(NULL, &d, &mod);
    if (st != FLEX_OK) {
        expect(st == FLEX_ERR_MOD_SYNTAX || st == FLEX_ERR_MOD_TYPE || st == FLEX_ERR_MOD_NAME ||
                   st == FLEX_ERR_INVALID_ARGUMENT,
               "#%ld: status %s for '%s': %.300s", iter, flex_status_name(st), escaped(src),
               flex_error_message(NULL));
        expect(mod == NULL, "#%ld: a failed compile returned a mod", iter);
        const char *msg = flex_error_message(NULL);
        expect(msg != NULL, "#%ld: no error message", iter);
        /* Description errors name the param or buffer; text errors (and a
         * text too large to compile) point into the text. */
        if (st != FLEX_ERR_INVALID_ARGUMENT || (msg[0] >= '0' && msg[0] <= '9'))
            check_error_message(iter, src, msg);
        return 0;
    }
    expect(mod != NULL, "#%ld: no mod", iter);
    expect(mod->canonical != NULL, "#%ld: no canonical text", iter);
    check_structure(iter, mod, kind);
    check_round_trip(iter, mod, &d);
    check_evaluation(iter, mod);
    flex_mod_destroy(mod);
    return 1;
}

START_TEST(test_fuzz_mod_text) {
    rng_state = 0x5EEDF00Du;
    text t = {0};
    desc_space ds;
    int accepted[2] = {0, 0};
    for (long iter = 0; iter < FUZZ_INPUTS; iter++) {
        /* Start from a seed, a preset or a kept mutant; keep a preset's own
         * declarations around some of the time so its text can compile. */
        const flex_preset *preset = NULL;
        const char *base;
        if (chance(30)) {
            preset = flex_preset_at((int)below((size_t)flex_preset_count()));
            base = preset->text;
        } else {
            base = corpus_pick();
        }
        text_set(&t, base, strlen(base));
        int edits = iter < 200 ? (int)(iter % 2) : chance(50) ? 1 : 2 + (int)below(3);
        for (int e = 0; e < edits; e++)
            mutate(&t);
        random_desc(&ds, preset);
        int ok = 0;
        for (int kind = 0; kind < 2; kind++) {
            int good = compile_and_check(iter, t.s, (flex_mod_kind)kind, &ds);
            accepted[kind] += good;
            ok |= good;
        }
        if (ok && chance(25)) keep_text(t.s);
    }
    /* A run where nothing (or everything) compiles would test little. */
    expect(accepted[0] > FUZZ_INPUTS / 50 && accepted[1] > FUZZ_INPUTS / 50,
           "too few accepted mutants (mask %d, score %d)", accepted[0], accepted[1]);
    expect(accepted[0] < FUZZ_INPUTS * 9 / 10 && accepted[1] < FUZZ_INPUTS * 9 / 10,
           "too few rejected mutants (mask %d, score %d)", accepted[0], accepted[1]);
    free(t.s);
    for (int i = 0; i < num_kept; i++)
        free(kept[i]);
    num_kept = 0;
}
END_TEST

/* Every seed and preset compiles unmutated with its own declarations, so the
 * fuzzer starts from valid text. */
START_TEST(test_corpus_compiles) {
    for (int i = 0; i < flex_preset_count(); i++) {
        const flex_preset *p = flex_preset_at(i);
        flex_mod_desc d = {p->kind, p->text, p->params, p->num_params, p->buffers, p->num_buffers};
        flex_mod *m = NULL;
        expect(flex_mod_compile(NULL, &d, &m) == FLEX_OK, "preset %s: %s", p->name,
               flex_error_message(NULL));
        flex_mod_destroy(m);
    }
}
END_TEST

/* Inputs the fuzzer first found, kept as fixed cases. */
START_TEST(test_found_cases) {
    static const flex_buffer_decl flags = {"flags", FLEX_BOOL, 1};
    desc_space ds = {.buffers = {flags}, .num_buffers = 1};
    /* Lets nest a mod far deeper than its text, and a bool index gains an
     * int(...) in the canonical text: the text must still parse back. */
    text t = {0};
    insert_str(&t, 0, "let x0 = q;\n");
    for (int i = 1; i <= 400; i++) {
        char line[64];
        snprintf(line, sizeof line, "let x%d = %s(x%d);\n", i, i % 2 ? "abs" : "-", i - 1);
        insert_str(&t, t.len, line);
    }
    insert_str(&t, t.len, "x400 + flags[flags[flags[flags[q]]]] >= kv");
    ck_assert_int_eq(compile_and_check(-1, t.s, FLEX_MOD_MASK, &ds), 1);
    text_set(&t, "", 0);
    for (int i = 0; i < 90; i++)
        insert_str(&t, t.len, "flags[");
    insert_str(&t, t.len, "q");
    for (int i = 0; i < 90; i++)
        insert_str(&t, t.len, "]");
    insert_str(&t, t.len, " || q < kv");
    ck_assert_int_eq(compile_and_check(-2, t.s, FLEX_MOD_MASK, &ds), 1);
    /* An error on a very long line keeps its caret line. */
    text_set(&t, "q >= kv", 7);
    for (int i = 0; i < 2000; i++)
        insert_str(&t, t.len, " && q > kv");
    insert_str(&t, t.len, " && q >>> kv");
    for (int i = 0; i < 2000; i++)
        insert_str(&t, t.len, " && q > kv");
    ck_assert_int_eq(compile_and_check(-3, t.s, FLEX_MOD_MASK, &ds), 0);
    ck_assert_int_eq(compile_and_check(-4, t.s + 1000, FLEX_MOD_SCORE, &ds), 0);
    free(t.s);
}
END_TEST

int main(void) {
    Suite *s = suite_create("mod_fuzz");
    TCase *tc = tcase_create("fuzz");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_corpus_compiles);
    tcase_add_test(tc, test_found_cases);
    tcase_add_test(tc, test_fuzz_mod_text);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
