/*
 * Files of the source tree embedded into the library at build time
 * (tools/embed.c writes the tables): kernel templates and the text the mod
 * emitter puts before the mods. The texts are static and NUL-terminated.
 */
#ifndef FLEXATTN_EMBEDDED_H
#define FLEXATTN_EMBEDDED_H

#include <stddef.h>
#include <string.h>

struct flex_embedded_file {
    const char *name;
    const char *text;
    size_t size;
};

/* The text of `name` in a table that ends with a NULL name, or NULL. */
static inline const char *flex_embedded_text(const struct flex_embedded_file *files,
                                             const char *name) {
    for (const struct flex_embedded_file *f = files; f->name; f++)
        if (strcmp(f->name, name) == 0) return f->text;
    return NULL;
}

#endif /* FLEXATTN_EMBEDDED_H */
