/*
 * The ASCII picture of a block mask, in the style of PyTorch's BlockMask
 * printout: "██" full, "░░" partial, "  " empty, one text line per row of
 * blocks. Long masks are shrunk to a grid of cells; a cell shows the
 * densest class of the blocks it covers, so a shrunk picture never hides
 * work the kernel does.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blockmask.h"

static const char *const glyphs[3] = {"  ", "\xe2\x96\x91\xe2\x96\x91", /* ░░ */
                                      "\xe2\x96\x88\xe2\x96\x88"};      /* ██ */

/* An snprintf-like appender that keeps counting past the capacity. */
typedef struct text_out {
    char *buf;
    size_t cap, len;
} text_out;

static void put(text_out *t, const char *s, size_t n) {
    if (t->len < t->cap) {
        size_t room = t->cap - t->len;
        memcpy(t->buf + t->len, s, n < room ? n : room);
    }
    t->len += n;
}

static void putf(text_out *t, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void putf(text_out *t, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) put(t, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

size_t flex_block_mask_format(const flex_block_mask *mask, int64_t b, int64_t h, int max_cells,
                              char *buf, size_t cap) {
    text_out t = {buf, cap > 0 ? cap - 1 : 0, 0};
    if (!mask) {
        put(&t, "BlockMask(NULL)\n", 16);
        goto finish;
    }
    if (max_cells <= 0) max_cells = 64;
    int64_t nq = mask->num_q_blocks, nk = mask->num_kv_blocks;
    int64_t rows = nq < max_cells ? nq : max_cells, cols = nk < max_cells ? nk : max_cells;
    putf(&t,
         "BlockMask(shape=(%lld, %lld, %lld, %lld), block=(%d, %d), blocks=%lld x %lld, "
         "sparsity=%.2f%%, full=%lld, partial=%lld)\n",
         (long long)mask->B, (long long)mask->H, (long long)mask->q_len, (long long)mask->kv_len,
         mask->q_block, mask->kv_block, (long long)nq, (long long)nk,
         flex_block_mask_sparsity(mask), (long long)mask->num_full, (long long)mask->num_partial);
    if (b < 0 || b >= mask->B || h < 0 || h >= mask->H) {
        putf(&t, "(b=%lld, h=%lld) is outside the mask's %lld x %lld\n", (long long)b, (long long)h,
             (long long)mask->B, (long long)mask->H);
        goto finish;
    }
    putf(&t, "(b=%lld, h=%lld)", (long long)b, (long long)h);
    if (rows < nq || cols < nk)
        putf(&t, " shrunk to %lld x %lld cells of up to %lld x %lld blocks", (long long)rows,
             (long long)cols, (long long)((nq + rows - 1) / rows),
             (long long)((nk + cols - 1) / cols));
    put(&t, "\n", 1);

    uint8_t *cells = calloc((size_t)cols, 1);
    int64_t *col_cell = malloc(sizeof(int64_t) * (size_t)nk);
    if (!cells || !col_cell) {
        free(cells);
        free(col_cell);
        put(&t, "(out of memory)\n", 16);
        goto finish;
    }
    for (int64_t j = 0; j < nk; j++)
        col_cell[j] = j * cols / nk;
    int64_t slot = b * mask->H + h;
    int64_t i = 0;
    for (int64_t r = 0; r < rows; r++) {
        memset(cells, FLEX_BLOCK_EMPTY, (size_t)cols);
        /* Blocks i with i * rows / nq == r belong to this line. */
        for (; i < nq && i * rows / nq == r; i++) {
            int64_t row = slot * nq + i;
            const flex_block_lists *lists[2] = {&mask->kv_partial, &mask->kv_full};
            const uint8_t classes[2] = {FLEX_BLOCK_PARTIAL, FLEX_BLOCK_FULL};
            for (int l = 0; l < 2; l++) {
                const flex_block_lists *li = lists[l];
                for (int32_t k = li->offsets[row]; k < li->offsets[row + 1]; k++) {
                    uint8_t *c = &cells[col_cell[li->indices[k]]];
                    if (*c < classes[l]) *c = classes[l];
                }
            }
        }
        int64_t last = cols;
        while (last > 0 && cells[last - 1] == FLEX_BLOCK_EMPTY)
            last--;
        for (int64_t c = 0; c < last; c++)
            put(&t, glyphs[cells[c]], strlen(glyphs[cells[c]]));
        put(&t, "\n", 1);
    }
    free(cells);
    free(col_cell);
finish:
    if (cap > 0) buf[t.len < t.cap ? t.len : t.cap] = '\0';
    return t.len;
}
