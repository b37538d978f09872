/*
 * .npy reading and writing (see npy.h). The header is a Python dict literal;
 * the parser accepts exactly the keys 'descr', 'fortran_order' and 'shape'
 * in any order, with single or double quotes and free whitespace.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "npy.h"

static flex_status io_fail(char *err, size_t cap, const char *path, const char *what) {
    if (cap) snprintf(err, cap, "%s: %s", path, what);
    return FLEX_ERR_IO;
}

static const char *skip_space(const char *s) {
    while (*s && isspace((unsigned char)*s))
        s++;
    return s;
}

/* Finds key 'name' (quoted either way) and returns the text after its ':'. */
static const char *find_key(const char *hdr, const char *name) {
    size_t n = strlen(name);
    for (const char *s = hdr; *s; s++) {
        if ((*s == '\'' || *s == '"') && strncmp(s + 1, name, n) == 0 && s[n + 1] == *s) {
            const char *t = skip_space(s + n + 2);
            if (*t == ':') return skip_space(t + 1);
        }
    }
    return NULL;
}

static int parse_descr(const char *v, flex_dtype *dt) {
    if (*v != '\'' && *v != '"') return -1;
    char q = *v++;
    char d[16];
    size_t n = 0;
    while (*v && *v != q && n + 1 < sizeof d)
        d[n++] = *v++;
    d[n] = '\0';
    if (*v != q) return -1;
    static const struct {
        const char *descr;
        flex_dtype dtype;
    } table[] = {
        {"<f4", FLEX_F32},  {"<f2", FLEX_F16},  {"<u2", FLEX_BF16}, {"|V2", FLEX_BF16},
        {"<V2", FLEX_BF16}, {"<i4", FLEX_I32},  {"<i8", FLEX_I64},  {"|u1", FLEX_U8},
        {"<u1", FLEX_U8},   {"|b1", FLEX_BOOL},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(d, table[i].descr) == 0) {
            *dt = table[i].dtype;
            return 0;
        }
    return -1;
}

static int parse_shape(const char *v, int *ndim, int64_t *shape) {
    if (*v != '(') return -1;
    v++;
    *ndim = 0;
    for (;;) {
        v = skip_space(v);
        if (*v == ')') return 0;
        if (!isdigit((unsigned char)*v)) return -1;
        if (*ndim >= NPY_MAX_DIMS) return -1;
        errno = 0;
        char *end;
        long long x = strtoll(v, &end, 10);
        if (errno || x < 0) return -1;
        shape[(*ndim)++] = x;
        v = skip_space(end);
        if (*v == ',')
            v++;
        else if (*v != ')')
            return -1;
    }
}

void npy_free(npy_array *a) {
    if (!a) return;
    free(a->data);
    memset(a, 0, sizeof *a);
}

flex_status npy_read(const char *path, npy_array *out, char *err, size_t err_cap) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return io_fail(err, err_cap, path, strerror(errno));
    unsigned char pre[10];
    flex_status st = FLEX_OK;
    char *hdr = NULL;
    if (fread(pre, 1, 8, f) != 8 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = io_fail(err, err_cap, path, "not a .npy file (bad magic)");
        goto done;
    }
    size_t hlen;
    if (pre[6] == 1) {
        if (fread(pre + 8, 1, 2, f) != 2) goto truncated;
        hlen = (size_t)pre[8] | ((size_t)pre[9] << 8);
    } else if (pre[6] == 2 || pre[6] == 3) {
        unsigned char l4[4];
        if (fread(l4, 1, 4, f) != 4) goto truncated;
        hlen = (size_t)l4[0] | ((size_t)l4[1] << 8) | ((size_t)l4[2] << 16) | ((size_t)l4[3] << 24);
        if (hlen > (1u << 20)) {
            st = io_fail(err, err_cap, path, "header longer than 1 MiB");
            goto done;
        }
    } else {
        st = io_fail(err, err_cap, path, "unsupported .npy format version");
        goto done;
    }
    hdr = malloc(hlen + 1);
    if (!hdr) {
        st = io_fail(err, err_cap, path, "out of memory");
        goto done;
    }
    if (fread(hdr, 1, hlen, f) != hlen) goto truncated;
    hdr[hlen] = '\0';
    const char *descr = find_key(hdr, "descr"), *fo = find_key(hdr, "fortran_order"),
               *shape = find_key(hdr, "shape");
    if (!descr || !fo || !shape) {
        st = io_fail(err, err_cap, path, "header lacks descr, fortran_order or shape");
        goto done;
    }
    if (parse_descr(descr, &out->dtype) != 0) {
        char msg[96];
        snprintf(msg, sizeof msg, "unsupported dtype %.20s (want <f4, <f2, <u2/|V2 for bf16, ...)",
                 descr);
        st = io_fail(err, err_cap, path, msg);
        goto done;
    }
    if (strncmp(fo, "False", 5) != 0) {
        st = io_fail(err, err_cap, path, "Fortran-order arrays are not supported (save C order)");
        goto done;
    }
    if (parse_shape(shape, &out->ndim, out->shape) != 0) {
        st = io_fail(err, err_cap, path, "malformed or too long shape");
        goto done;
    }
    size_t count = 1;
    for (int i = 0; i < out->ndim; i++) {
        if (out->shape[i] != 0 && count > SIZE_MAX / 16 / (size_t)out->shape[i]) {
            st = io_fail(err, err_cap, path, "shape too large");
            goto done;
        }
        count *= (size_t)out->shape[i];
    }
    out->bytes = count * flex_dtype_size(out->dtype);
    /* The header's shape is checked against what the file holds before
     * anything that large is allocated (a few bytes may claim terabytes). */
    long here = ftell(f);
    if (here >= 0 && fseek(f, 0, SEEK_END) == 0) {
        long end = ftell(f);
        if (end < here || (unsigned long)(end - here) < out->bytes) goto truncated;
        if (fseek(f, here, SEEK_SET) != 0) goto truncated;
    }
    out->data = malloc(out->bytes ? out->bytes : 1);
    if (!out->data) {
        st = io_fail(err, err_cap, path, "out of memory for the data");
        goto done;
    }
    if (fread(out->data, 1, out->bytes, f) != out->bytes) goto truncated;
    goto done;
truncated:
    st = io_fail(err, err_cap, path, "file is truncated");
done:
    free(hdr);
    fclose(f);
    if (st != FLEX_OK) npy_free(out);
    return st;
}

static const char *descr_of(flex_dtype dt) {
    switch (dt) {
    case FLEX_F32:
        return "<f4";
    case FLEX_F16:
        return "<f2";
    case FLEX_BF16:
        return "<u2";
    case FLEX_I32:
        return "<i4";
    case FLEX_I64:
        return "<i8";
    case FLEX_U8:
        return "|u1";
    case FLEX_BOOL:
        return "|b1";
    }
    return NULL;
}

flex_status npy_write(const char *path, flex_dtype dtype, int ndim, const int64_t *shape,
                      const void *data, char *err, size_t err_cap) {
    const char *descr = descr_of(dtype);
    if (!descr || ndim < 0 || ndim > NPY_MAX_DIMS)
        return io_fail(err, err_cap, path, "cannot write this dtype or rank");
    char dict[256];
    int n =
        snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        n += snprintf(dict + n, sizeof dict - (size_t)n, "%lld%s", (long long)shape[i],
                      ndim == 1 ? "," : (i + 1 < ndim ? ", " : ""));
        count *= (size_t)shape[i];
    }
    n += snprintf(dict + n, sizeof dict - (size_t)n, "), }");
    /* Pad with spaces so magic + length + header is a multiple of 64, ending in '\n'. */
    size_t total = 10 + (size_t)n + 1;
    size_t pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) return io_fail(err, err_cap, path, strerror(errno));
    unsigned hlen = (unsigned)((size_t)n + pad + 1);
    unsigned char pre[10] = {0x93,
                             'N',
                             'U',
                             'M',
                             'P',
                             'Y',
                             1,
                             0,
                             (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    size_t bytes = count * flex_dtype_size(dtype);
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)n, f) == (size_t)n;
    for (size_t i = 0; ok && i < pad; i++)
        ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF;
    ok = ok && (bytes == 0 || fwrite(data, 1, bytes, f) == bytes);
    if (fclose(f) != 0) ok = 0;
    if (!ok) return io_fail(err, err_cap, path, "write failed");
    return FLEX_OK;
}
