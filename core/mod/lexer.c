/*
 * The mod language's lexer: text -> tokens with line:col.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mod/lexer.h"

const char *mod_token_kind_text(mod_token_kind kind) {
    switch (kind) {
    case TOK_EOF:
        return "end of input";
    case TOK_IDENT:
        return "a name";
    case TOK_INT:
        return "an integer";
    case TOK_FLOAT:
        return "a number";
    case TOK_LPAREN:
        return "'('";
    case TOK_RPAREN:
        return "')'";
    case TOK_LBRACKET:
        return "'['";
    case TOK_RBRACKET:
        return "']'";
    case TOK_COMMA:
        return "','";
    case TOK_SEMI:
        return "';'";
    case TOK_ASSIGN:
        return "'='";
    case TOK_QUESTION:
        return "'?'";
    case TOK_COLON:
        return "':'";
    case TOK_OROR:
        return "'||'";
    case TOK_OR:
        return "'|'";
    case TOK_ANDAND:
        return "'&&'";
    case TOK_AND:
        return "'&'";
    case TOK_CARET:
        return "'^'";
    case TOK_EQ:
        return "'=='";
    case TOK_NE:
        return "'!='";
    case TOK_LT:
        return "'<'";
    case TOK_LE:
        return "'<='";
    case TOK_GT:
        return "'>'";
    case TOK_GE:
        return "'>='";
    case TOK_PLUS:
        return "'+'";
    case TOK_MINUS:
        return "'-'";
    case TOK_STAR:
        return "'*'";
    case TOK_SLASH:
        return "'/'";
    case TOK_SLASHSLASH:
        return "'//'";
    case TOK_PERCENT:
        return "'%'";
    case TOK_BANG:
        return "'!'";
    case TOK_TILDE:
        return "'~'";
    case TOK_ERROR:
        return "an invalid character";
    }
    return "a token";
}

typedef struct lexer {
    const char *text;
    size_t pos;
    int line, col;
    mod_token_list *out;
    int cap;
} lexer;

static int push(lexer *lx, const mod_token *t) {
    mod_token_list *out = lx->out;
    if (out->count == lx->cap) {
        int cap = lx->cap ? lx->cap * 2 : 64;
        mod_token *grown = realloc(out->tokens, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        out->tokens = grown;
        lx->cap = cap;
    }
    out->tokens[out->count++] = *t;
    return 0;
}

static void advance(lexer *lx, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (lx->text[lx->pos] == '\n') {
            lx->line++;
            lx->col = 1;
        } else {
            lx->col++;
        }
        lx->pos++;
    }
}

static int is_ident_start(char c) {
    return isalpha((unsigned char)c) || c == '_';
}

static int is_ident_char(char c) {
    return isalnum((unsigned char)c) || c == '_';
}

/* Scans a number at lx->pos into t. Returns 0, or -1 with out->error set. */
static int lex_number(lexer *lx, mod_token *t) {
    const char *s = lx->text + lx->pos;
    size_t n = 0;
    int is_float = 0;
    while (isdigit((unsigned char)s[n]))
        n++;
    if (s[n] == '.') {
        is_float = 1;
        n++;
        while (isdigit((unsigned char)s[n]))
            n++;
    }
    if (s[n] == 'e' || s[n] == 'E') {
        size_t e = n + 1;
        if (s[e] == '+' || s[e] == '-') e++;
        if (!isdigit((unsigned char)s[e])) {
            t->length = e;
            snprintf(lx->out->error, sizeof lx->out->error,
                     "malformed number '%.*s': the exponent needs digits", (int)e, s);
            return -1;
        }
        while (isdigit((unsigned char)s[e]))
            e++;
        n = e;
        is_float = 1;
    }
    if (is_ident_char(s[n]) || s[n] == '.') {
        size_t end = n;
        while (is_ident_char(s[end]) || s[end] == '.')
            end++;
        t->length = end;
        snprintf(lx->out->error, sizeof lx->out->error, "malformed number '%.*s'",
                 (int)(end > 40 ? 40 : end), s);
        return -1;
    }
    t->length = n;
    if (is_float) {
        char buf[128];
        if (n >= sizeof buf) {
            snprintf(lx->out->error, sizeof lx->out->error, "number literal is too long");
            return -1;
        }
        memcpy(buf, s, n);
        buf[n] = '\0';
        errno = 0;
        float v = strtof(buf, NULL);
        if (isinf(v)) {
            snprintf(lx->out->error, sizeof lx->out->error,
                     "float literal '%.40s' is too large for a 32-bit float", buf);
            return -1;
        }
        t->kind = TOK_FLOAT;
        t->float_value = v;
    } else {
        int64_t v = 0;
        for (size_t i = 0; i < n; i++) {
            if (v <= 100000000000LL) v = v * 10 + (s[i] - '0');
        }
        t->kind = TOK_INT;
        t->int_value = v;
    }
    return 0;
}

int mod_lex(const char *text, mod_token_list *out) {
    memset(out, 0, sizeof *out);
    lexer lx = {text, 0, 1, 1, out, 0};
    for (;;) {
        /* whitespace and comments */
        for (;;) {
            char c = text[lx.pos];
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
                advance(&lx, 1);
            } else if (c == '#') {
                while (text[lx.pos] && text[lx.pos] != '\n')
                    advance(&lx, 1);
            } else {
                break;
            }
        }
        mod_token t;
        memset(&t, 0, sizeof t);
        t.offset = lx.pos;
        t.line = lx.line;
        t.col = lx.col;
        const char *s = text + lx.pos;
        char c = s[0];
        if (c == '\0') {
            t.kind = TOK_EOF;
            if (push(&lx, &t) < 0) goto oom;
            return 0;
        }
        if (is_ident_start(c)) {
            size_t n = 1;
            while (is_ident_char(s[n]))
                n++;
            t.kind = TOK_IDENT;
            t.length = n;
        } else if (isdigit((unsigned char)c) || (c == '.' && isdigit((unsigned char)s[1]))) {
            if (lex_number(&lx, &t) < 0) {
                t.kind = TOK_ERROR;
                if (push(&lx, &t) < 0) goto oom;
                return 0;
            }
        } else {
            static const struct {
                const char *text;
                mod_token_kind kind;
            } punct[] = {
                {"||", TOK_OROR},  {"&&", TOK_ANDAND},  {"==", TOK_EQ},         {"!=", TOK_NE},
                {"<=", TOK_LE},    {">=", TOK_GE},      {"//", TOK_SLASHSLASH}, {"(", TOK_LPAREN},
                {")", TOK_RPAREN}, {"[", TOK_LBRACKET}, {"]", TOK_RBRACKET},    {",", TOK_COMMA},
                {";", TOK_SEMI},   {"=", TOK_ASSIGN},   {"?", TOK_QUESTION},    {":", TOK_COLON},
                {"|", TOK_OR},     {"&", TOK_AND},      {"^", TOK_CARET},       {"<", TOK_LT},
                {">", TOK_GT},     {"+", TOK_PLUS},     {"-", TOK_MINUS},       {"*", TOK_STAR},
                {"/", TOK_SLASH},  {"%", TOK_PERCENT},  {"!", TOK_BANG},        {"~", TOK_TILDE},
            };
            t.kind = TOK_ERROR;
            for (size_t i = 0; i < sizeof punct / sizeof punct[0]; i++) {
                size_t n = strlen(punct[i].text);
                if (strncmp(s, punct[i].text, n) == 0) {
                    t.kind = punct[i].kind;
                    t.length = n;
                    break;
                }
            }
            if (t.kind == TOK_ERROR) {
                /* One UTF-8 character, so the caret underlines all of it. */
                size_t n = 1;
                while ((s[n] & 0xc0) == 0x80)
                    n++;
                t.length = n;
                if (c == '.' && is_ident_start(s[1]))
                    snprintf(out->error, sizeof out->error,
                             "unexpected '.'; there are no methods: write exp(x), abs(x), ...");
                else if (c == '"' || c == '\'')
                    snprintf(out->error, sizeof out->error,
                             "unexpected quote; mod text has no strings (names are written bare)");
                else if ((unsigned char)c >= 0x20 && (unsigned char)c < 0x7f)
                    snprintf(out->error, sizeof out->error, "unexpected character '%c'", c);
                else
                    snprintf(out->error, sizeof out->error,
                             "unexpected character (byte 0x%02x); mod text is ASCII",
                             (unsigned char)c);
                if (push(&lx, &t) < 0) goto oom;
                return 0;
            }
        }
        if (push(&lx, &t) < 0) goto oom;
        advance(&lx, t.length);
    }
oom:
    free(out->tokens);
    out->tokens = NULL;
    out->count = 0;
    return -1;
}

void mod_token_list_free(mod_token_list *list) {
    free(list->tokens);
    list->tokens = NULL;
    list->count = 0;
}
