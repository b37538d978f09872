/*
 * .npy reading and writing (see npy.h). The header is a Python dict literal;
 * the parser accepts exactly the keys 'descr', 'fortran_order' and 'shape'
 * in any order, with single or double quotes and free whitespace.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* Copies the quoted string at v (either quote) into out; -1 when v holds
 * no closed string that fits. */
static int quoted(const char *v, char *out, size_t cap) {
    if (*v != '\'' && *v != '"') return -1;
    char q = *v++;
    size_t n = 0;
    while (*v && *v != q && n + 1 < cap)
        out[n++] = *v++;
    out[n] = '\0';
    return *v == q ? 0 : -1;
}

static const struct {
    const char *descr;
    flex_dtype dtype;
} descr_table[] = {
    {"<f4", FLEX_F32},  {"<f2", FLEX_F16},  {"<V2", FLEX_BF16}, {"|V2", FLEX_BF16},
    {"<u2", FLEX_BF16}, {"<i4", FLEX_I32},  {"<i8", FLEX_I64},  {"|u1", FLEX_U8},
    {"<u1", FLEX_U8},   {"|b1", FLEX_BOOL},
};

static int parse_descr(const char *d, flex_dtype *dt) {
    for (size_t i = 0; i < sizeof descr_table / sizeof descr_table[0]; i++)
        if (strcmp(d, descr_table[i].descr) == 0) {
            *dt = descr_table[i].dtype;
            return 0;
        }
    return -1;
}

/* The message for a descr this reader does not take: the descr alone, what
 * it is when it is a common one, and what to save instead. */
static void unsupported_descr(const char *d, char *msg, size_t cap) {
    static const struct {
        const char *descr, *what;
    } common[] = {{"<f8", "float64"},     {"<i2", "int16"},        {"<u4", "uint32"},
                  {"<u8", "uint64"},      {"|i1", "int8"},         {"<c8", "complex64"},
                  {"<c16", "complex128"}, {"|O", "Python objects"}};
    const char *what = NULL;
    for (size_t i = 0; i < sizeof common / sizeof common[0]; i++)
        if (!strcmp(d, common[i].descr)) what = common[i].what;
    if (d[0] == '>')
        snprintf(msg, cap,
                 "dtype '%s' is big-endian; save little-endian data "
                 "(a.astype(a.dtype.newbyteorder('<')))",
                 d);
    else
        snprintf(msg, cap,
                 "unsupported dtype '%s'%s%s%s; flexattn reads <f4 (float32), <f2 (float16), "
                 "bfloat16 as <V2 (ml_dtypes), |V2 or <u2, <i4, <i8, |u1 and |b1",
                 d, what ? " (" : "", what ? what : "", what ? ")" : "");
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

/* Opens path for reading without blocking on a FIFO, and only when it is a
 * regular file: a FIFO, a device or a folder is refused before any read. */
static FILE *open_regular(const char *path, off_t *size, char *err, size_t cap) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        io_fail(err, cap, path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        io_fail(err, cap, path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(sb.st_mode)) {
        io_fail(err, cap, path,
                S_ISFIFO(sb.st_mode)  ? "is a FIFO, not a regular file"
                : S_ISDIR(sb.st_mode) ? "is a folder, not a .npy file"
                                      : "is a device or socket, not a regular file");
        close(fd);
        return NULL;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        io_fail(err, cap, path, strerror(errno));
        close(fd);
        return NULL;
    }
    *size = sb.st_size;
    return f;
}

flex_status npy_read(const char *path, npy_array *out, char *err, size_t err_cap) {
    memset(out, 0, sizeof *out);
    off_t file_size = 0;
    FILE *f = open_regular(path, &file_size, err, err_cap);
    if (!f) return FLEX_ERR_IO;
    unsigned char pre[10];
    flex_status st = FLEX_OK;
    char *hdr = NULL;
    char msg[256];
    if (fread(pre, 1, 8, f) != 8 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = io_fail(err, err_cap, path, "not a .npy file (bad magic)");
        goto done;
    }
    size_t hlen, prefix;
    if (pre[6] == 1) {
        if (fread(pre + 8, 1, 2, f) != 2) goto truncated;
        hlen = (size_t)pre[8] | ((size_t)pre[9] << 8);
        prefix = 10;
    } else if (pre[6] == 2 || pre[6] == 3) {
        unsigned char l4[4];
        if (fread(l4, 1, 4, f) != 4) goto truncated;
        hlen = (size_t)l4[0] | ((size_t)l4[1] << 8) | ((size_t)l4[2] << 16) | ((size_t)l4[3] << 24);
        prefix = 12;
    } else {
        snprintf(msg, sizeof msg, "unsupported .npy format version %d.%d", pre[6], pre[7]);
        st = io_fail(err, err_cap, path, msg);
        goto done;
    }
    /* The header is read only when the file holds it all (and it is short). */
    if (hlen > NPY_MAX_HEADER || (off_t)(prefix + hlen) > file_size) {
        snprintf(msg, sizeof msg, "header length %zu is longer than %s", hlen,
                 hlen > NPY_MAX_HEADER ? "1 MiB" : "the file");
        st = io_fail(err, err_cap, path, msg);
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
    char d[32];
    if (quoted(descr, d, sizeof d) != 0) {
        st = io_fail(err, err_cap, path,
                     *descr == '[' ? "structured dtypes are not supported (save a plain array)"
                                   : "malformed descr in the header");
        goto done;
    }
    if (parse_descr(d, &out->dtype) != 0) {
        unsupported_descr(d, msg, sizeof msg);
        st = io_fail(err, err_cap, path, msg);
        goto done;
    }
    if (strncmp(fo, "False", 5) != 0) {
        st = io_fail(err, err_cap, path, "Fortran-order arrays are not supported (save C order)");
        goto done;
    }
    if (parse_shape(shape, &out->ndim, out->shape) != 0) {
        st = io_fail(err, err_cap, path, "malformed shape, or more than 8 dims");
        goto done;
    }
    /* Checked against the cap and the file before anything is allocated. */
    uint64_t bytes = flex_dtype_size(out->dtype);
    for (int i = 0; i < out->ndim; i++) {
        if (out->shape[i] != 0 && bytes > NPY_MAX_BYTES / (uint64_t)out->shape[i]) {
            snprintf(msg, sizeof msg, "the shape claims more than %llu GiB of data",
                     (unsigned long long)(NPY_MAX_BYTES >> 30));
            st = io_fail(err, err_cap, path, msg);
            goto done;
        }
        bytes *= (uint64_t)out->shape[i];
    }
    uint64_t have = (uint64_t)(file_size - (off_t)(prefix + hlen));
    if (bytes != have) {
        snprintf(msg, sizeof msg, "the header claims %llu bytes of data, the file holds %llu (%s)",
                 (unsigned long long)bytes, (unsigned long long)have,
                 bytes > have ? "truncated" : "trailing bytes");
        st = io_fail(err, err_cap, path, msg);
        goto done;
    }
    out->bytes = (size_t)bytes;
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
        return "<V2";
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

/* Creates or empties path for writing, only when it is (or becomes) a
 * regular file: a FIFO or a device in its place is refused, not waited on. */
static FILE *create_regular(const char *path, char *err, size_t cap) {
    int fd = open(path, O_WRONLY | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0666);
    if (fd < 0) {
        io_fail(err, cap, path, errno == ENXIO ? "is a FIFO, not a regular file" : strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || ftruncate(fd, 0) != 0) {
        io_fail(err, cap, path, "is not a regular file that can be written");
        close(fd);
        return NULL;
    }
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        io_fail(err, cap, path, strerror(errno));
        close(fd);
    }
    return f;
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
    FILE *f = create_regular(path, err, err_cap);
    if (!f) return FLEX_ERR_IO;
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
