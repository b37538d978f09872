/*
 * Tokens of the mod language, each with its place in the source so errors
 * can point at it.
 */
#ifndef FLEXATTN_MOD_LEXER_H
#define FLEXATTN_MOD_LEXER_H

#include <stddef.h>
#include <stdint.h>

typedef enum mod_token_kind {
    TOK_EOF = 0,
    TOK_IDENT,
    TOK_INT,   /* value in int_value (0 .. 2^31, range checked by the parser) */
    TOK_FLOAT, /* value in float_value */
    TOK_LPAREN,
    TOK_RPAREN,
    TOK_LBRACKET,
    TOK_RBRACKET,
    TOK_COMMA,
    TOK_SEMI,
    TOK_ASSIGN, /* = */
    TOK_QUESTION,
    TOK_COLON,
    TOK_OROR,
    TOK_OR,
    TOK_ANDAND,
    TOK_AND,
    TOK_CARET,
    TOK_EQ,
    TOK_NE,
    TOK_LT,
    TOK_LE,
    TOK_GT,
    TOK_GE,
    TOK_PLUS,
    TOK_MINUS,
    TOK_STAR,
    TOK_SLASH,
    TOK_SLASHSLASH,
    TOK_PERCENT,
    TOK_BANG,
    TOK_TILDE,
    TOK_ERROR /* a character that starts no token; message in the lexer */
} mod_token_kind;

typedef struct mod_token {
    mod_token_kind kind;
    size_t offset, length; /* bytes into the source */
    int line, col;         /* 1-based */
    int64_t int_value;
    float float_value;
} mod_token;

typedef struct mod_token_list {
    mod_token *tokens; /* malloc'd; the last one is TOK_EOF or TOK_ERROR */
    int count;
    char error[128]; /* why lexing stopped at a TOK_ERROR */
} mod_token_list;

/* Splits text into tokens. Returns 0, or -1 on out of memory. Lexical
 * errors end the list with a TOK_ERROR token and a message. */
int mod_lex(const char *text, mod_token_list *out);
void mod_token_list_free(mod_token_list *list);

/* The token kind in words for messages ("'&&'", "end of input"). */
const char *mod_token_kind_text(mod_token_kind kind);

#endif /* FLEXATTN_MOD_LEXER_H */
