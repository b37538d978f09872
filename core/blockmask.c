/*
 * Block masks: building one from a mask mod, from explicit classes, and by
 * composing two; the dense export, the shape and the sparsity.
 *
 * Building from a mod never looks at all q_len x kv_len elements. For each
 * (b, h) that can differ, a recursive subdivision of the grid of blocks asks
 * interval analysis about whole rectangles of blocks: a rectangle proven
 * true is full, one proven false is empty and costs nothing more, and only
 * single blocks analysis cannot decide are evaluated exactly, by the
 * backend (default: the host evaluator in blockmask_eval.c). For affine
 * masks the work is proportional to the boundary of the mask, not its area.
 *
 * The subdivision visits rectangles depth first, lower half first. Two
 * rectangles that share a row of blocks were split apart along kv, so the
 * one visited first has the lower kv blocks; likewise for columns. The
 * decided rectangles, in visiting order, therefore already give every row
 * and every column its blocks in ascending order, and the CSR lists in both
 * directions are written as straight runs with no sorting and no dense grid.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fpenv.h"
#include "blockmask.h"
#include "clock.h"

flex_status flex_block_size_check(flex_context *ctx, const char *what, int block, int *out) {
    if (block == 0) block = 128;
    if (block < 16 || block > 1024 || (block & (block - 1)) != 0)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s is %d; allowed are the powers of two 16, 32, 64, 128, 256, 512 and "
                         "1024, or 0 for 128",
                         what, block);
    *out = block;
    return FLEX_OK;
}

/* ---- the mask object and its lists ---- */

/*
 * The four lists of a mask live in two allocations: kv_full.offsets holds
 * every offsets array and kv_full.indices every indices array; the other
 * lists point into them. One large block instead of several keeps repeated
 * builds of same-sized masks on memory the allocator already has, instead
 * of fresh pages the kernel must fault in and clear.
 */
static void lists_free_all(flex_block_mask *m) {
    free(m->kv_full.offsets);
    free(m->kv_full.indices);
    m->kv_full.offsets = m->kv_partial.offsets = m->q_full.offsets = m->q_partial.offsets = NULL;
    m->kv_full.indices = m->kv_partial.indices = m->q_full.indices = m->q_partial.indices = NULL;
}

/* Zeroed offsets of the four lists (rows and cols of m). */
static int lists_alloc_offsets(flex_block_mask *m) {
    int64_t rows = m->B * m->H * m->num_q_blocks, cols = m->B * m->H * m->num_kv_blocks;
    int32_t *o = calloc((size_t)(2 * (rows + 1) + 2 * (cols + 1)), sizeof(int32_t));
    if (!o) return -1;
    m->kv_full.offsets = o;
    m->kv_partial.offsets = o + (rows + 1);
    m->q_full.offsets = o + 2 * (rows + 1);
    m->q_partial.offsets = o + 2 * (rows + 1) + (cols + 1);
    return 0;
}

/* Indices of the four lists: nfull full and npart partial blocks. */
static int lists_alloc_indices(flex_block_mask *m, int64_t nfull, int64_t npart) {
    int64_t total = 2 * nfull + 2 * npart;
    int32_t *x = malloc(sizeof(int32_t) * (size_t)(total > 0 ? total : 1));
    if (!x) return -1;
    m->kv_full.indices = x;
    m->q_full.indices = x + nfull;
    m->kv_partial.indices = x + 2 * nfull;
    m->q_partial.indices = x + 2 * nfull + npart;
    return 0;
}

void flex_block_mask_destroy(flex_block_mask *mask) {
    if (!mask) return;
    if (mask->device_copy && mask->device_copy_free)
        mask->device_copy_free(mask->ctx, mask->device_copy);
    lists_free_all(mask);
    if (mask->owned_mod) flex_mod_destroy(mask->owned_mod);
    free(mask);
}

/* Checks everything a mask's geometry needs and fills the size fields of a
 * new, zeroed mask. */
/* Serials start at 1: 0 means "no mask" in cache keys. */
static _Atomic uint64_t last_mask_serial;

static flex_status mask_new(flex_context *ctx, int64_t B, int64_t H, int64_t q_len, int64_t kv_len,
                            int q_block, int kv_block, flex_block_mask **out) {
    if (B < 0 || H < 0)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s is %lld; it must be >= 0 (0 or 1 broadcast the mask)",
                         B < 0 ? "B" : "H", (long long)(B < 0 ? B : H));
    if (q_len < 1 || kv_len < 1)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT, "%s is %lld; it must be at least 1",
                         q_len < 1 ? "q_len" : "kv_len", (long long)(q_len < 1 ? q_len : kv_len));
    if (q_len > INT32_MAX || kv_len > INT32_MAX)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "%s is %lld; positions are 32-bit ints, so at most %d",
                         q_len > INT32_MAX ? "q_len" : "kv_len",
                         (long long)(q_len > INT32_MAX ? q_len : kv_len), INT32_MAX);
    int qb, kb;
    flex_status st = flex_block_size_check(ctx, "q_block", q_block, &qb);
    if (st != FLEX_OK) return st;
    st = flex_block_size_check(ctx, "kv_block", kv_block, &kb);
    if (st != FLEX_OK) return st;
    int64_t Bm = B > 1 ? B : 1, Hm = H > 1 ? H : 1;
    int64_t nq = flex_blocks_for(q_len, qb), nk = flex_blocks_for(kv_len, kb);
    /* The lists use int32 offsets: every block of every (b, h) must be
     * countable in one. */
    if (Bm > INT32_MAX / Hm || Bm * Hm > INT32_MAX / nq || Bm * Hm * nq > INT32_MAX / nk)
        return flex_fail(ctx, FLEX_ERR_UNSUPPORTED,
                         "the mask has %lld x %lld x %lld x %lld blocks (B x H x q-blocks x "
                         "kv-blocks), more than the %d that 32-bit block offsets can count; use "
                         "larger blocks or broadcast B/H",
                         (long long)Bm, (long long)Hm, (long long)nq, (long long)nk, INT32_MAX);
    flex_block_mask *m = calloc(1, sizeof *m);
    if (!m) return flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for a block mask");
    m->ctx = ctx;
    m->B = Bm;
    m->H = Hm;
    m->q_len = q_len;
    m->kv_len = kv_len;
    m->q_block = qb;
    m->kv_block = kb;
    m->num_q_blocks = nq;
    m->num_kv_blocks = nk;
    m->serial = ++last_mask_serial;
    *out = m;
    return FLEX_OK;
}

/* Turns per-row counts already stored at offsets[r + 1] into offsets. */
static int64_t counts_to_offsets(int32_t *offsets, int64_t rows) {
    int64_t sum = 0;
    offsets[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        sum += offsets[r + 1];
        offsets[r + 1] = (int32_t)sum;
    }
    return sum;
}

/*
 * Fills every list of m from a dense class grid laid out as in
 * flex_block_mask_from_classes (B*H*nq*nk bytes of m's stored sizes).
 */
static flex_status lists_from_dense(flex_context *ctx, flex_block_mask *m, const uint8_t *classes) {
    int64_t bh = m->B * m->H, nq = m->num_q_blocks, nk = m->num_kv_blocks;
    int64_t rows = bh * nq, cols = bh * nk;
    int64_t nfull = 0, npart = 0;
    int32_t *row_full = calloc((size_t)rows + 1, sizeof(int32_t));
    int32_t *row_part = calloc((size_t)rows + 1, sizeof(int32_t));
    int32_t *col_full = calloc((size_t)cols + 1, sizeof(int32_t));
    int32_t *col_part = calloc((size_t)cols + 1, sizeof(int32_t));
    flex_status st = FLEX_OK;
    if (!row_full || !row_part || !col_full || !col_part) goto oom;
    for (int64_t s = 0; s < bh; s++) {
        for (int64_t i = 0; i < nq; i++) {
            const uint8_t *row = classes + (s * nq + i) * nk;
            for (int64_t j = 0; j < nk; j++) {
                if (row[j] == FLEX_BLOCK_FULL) {
                    row_full[s * nq + i + 1]++;
                    col_full[s * nk + j + 1]++;
                } else if (row[j] == FLEX_BLOCK_PARTIAL) {
                    row_part[s * nq + i + 1]++;
                    col_part[s * nk + j + 1]++;
                }
            }
        }
    }
    nfull = counts_to_offsets(row_full, rows);
    npart = counts_to_offsets(row_part, rows);
    counts_to_offsets(col_full, cols);
    counts_to_offsets(col_part, cols);
    if (lists_alloc_offsets(m) || lists_alloc_indices(m, nfull, npart)) goto oom;
    memcpy(m->kv_full.offsets, row_full, sizeof(int32_t) * (size_t)(rows + 1));
    memcpy(m->kv_partial.offsets, row_part, sizeof(int32_t) * (size_t)(rows + 1));
    memcpy(m->q_full.offsets, col_full, sizeof(int32_t) * (size_t)(cols + 1));
    memcpy(m->q_partial.offsets, col_part, sizeof(int32_t) * (size_t)(cols + 1));
    /* The count arrays become write cursors. Rows ascend in i and j, so
     * every list comes out sorted. */
    for (int64_t s = 0; s < bh; s++) {
        for (int64_t i = 0; i < nq; i++) {
            const uint8_t *row = classes + (s * nq + i) * nk;
            int64_t r = s * nq + i;
            for (int64_t j = 0; j < nk; j++) {
                int64_t c = s * nk + j;
                if (row[j] == FLEX_BLOCK_FULL) {
                    m->kv_full.indices[row_full[r]++] = (int32_t)j;
                    m->q_full.indices[col_full[c]++] = (int32_t)i;
                } else if (row[j] == FLEX_BLOCK_PARTIAL) {
                    m->kv_partial.indices[row_part[r]++] = (int32_t)j;
                    m->q_partial.indices[col_part[c]++] = (int32_t)i;
                }
            }
        }
    }
    m->num_full = nfull;
    m->num_partial = npart;
    goto done;
oom:
    st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "out of memory for the block lists of a mask");
done:
    free(row_full);
    free(row_part);
    free(col_full);
    free(col_part);
    return st;
}

/* ---- building from a mod: the subdivision ---- */

/* A decided rectangle of blocks [i0, i1) x [j0, j1). `ref` is -1 for a
 * rectangle proven full, else the index (within its job) of the single
 * undecided block it stands for. */
typedef struct grid_rect {
    int32_t i0, i1, j0, j1;
    int32_t ref;
} grid_rect;

/* The subdivision of one (b, h) grid. */
typedef struct grid_job {
    int32_t b, h;
    grid_rect *rects;
    int64_t num_rects, cap_rects;
    flex_block_ref *undecided;
    int64_t num_undecided, cap_undecided;
    int64_t undecided_base; /* where this job's blocks start in the shared list */
    int failed;             /* out of memory */
    /* once classes are known: the runs of every row and column, and the
     * per-row and per-column counts */
    int64_t *row_run_off, *col_run_off;
    struct grid_run *row_runs, *col_runs;
    int32_t *row_full, *row_part, *col_full, *col_part;
} grid_job;

/* Blocks [lo, hi) of one row (kv blocks) or column (q blocks), all of one
 * class. */
typedef struct grid_run {
    int32_t lo, hi;
    int32_t cls;
} grid_run;

typedef struct grid_walk {
    const ir_mod *ir;
    const mod_range_tables *tables;
    void *scratch;
    int64_t q_len, kv_len;
    int q_block, kv_block;
    grid_job *job;
} grid_walk;

static void push_rect(grid_job *job, int32_t i0, int32_t i1, int32_t j0, int32_t j1, int32_t ref) {
    if (job->num_rects == job->cap_rects) {
        int64_t cap = job->cap_rects ? job->cap_rects * 2 : 256;
        grid_rect *r = realloc(job->rects, sizeof *r * (size_t)cap);
        if (!r) {
            job->failed = 1;
            return;
        }
        job->rects = r;
        job->cap_rects = cap;
    }
    job->rects[job->num_rects++] = (grid_rect){i0, i1, j0, j1, ref};
}

static void push_undecided(grid_job *job, int32_t i, int32_t j) {
    if (job->num_undecided == job->cap_undecided) {
        int64_t cap = job->cap_undecided ? job->cap_undecided * 2 : 256;
        flex_block_ref *u = realloc(job->undecided, sizeof *u * (size_t)cap);
        if (!u) {
            job->failed = 1;
            return;
        }
        job->undecided = u;
        job->cap_undecided = cap;
    }
    int32_t ref = (int32_t)job->num_undecided;
    job->undecided[job->num_undecided++] = (flex_block_ref){job->b, job->h, i, j};
    push_rect(job, i, i + 1, j, j + 1, ref);
}

static void walk(grid_walk *g, int32_t i0, int32_t i1, int32_t j0, int32_t j1) {
    grid_job *job = g->job;
    if (job->failed) return;
    int64_t q_hi = (int64_t)i1 * g->q_block, k_hi = (int64_t)j1 * g->kv_block;
    mod_box box = {{job->b, job->h, (int64_t)i0 * g->q_block, (int64_t)j0 * g->kv_block},
                   {job->b, job->h, (q_hi < g->q_len ? q_hi : g->q_len) - 1,
                    (k_hi < g->kv_len ? k_hi : g->kv_len) - 1}};
    mod_tri tri = mod_interval_mask(g->ir, g->tables, &box, g->scratch);
    if (tri == MOD_TRI_FALSE) return;
    if (tri == MOD_TRI_TRUE) {
        push_rect(job, i0, i1, j0, j1, -1);
        return;
    }
    int32_t rows = i1 - i0, cols = j1 - j0;
    if (rows == 1 && cols == 1) {
        push_undecided(job, i0, j0);
        return;
    }
    /* Split into quadrants when the rectangle is roughly square in
     * elements (four questions instead of the six two rounds of halving
     * ask), else halve the longer side. Children go lower half first, left
     * before right: the ordering the list writers rely on. */
    int64_t h_elems = (int64_t)rows * g->q_block, w_elems = (int64_t)cols * g->kv_block;
    if (rows > 1 && cols > 1 && h_elems <= 2 * w_elems && w_elems <= 2 * h_elems) {
        int32_t im = i0 + rows / 2, jm = j0 + cols / 2;
        walk(g, i0, im, j0, jm);
        walk(g, i0, im, jm, j1);
        walk(g, im, i1, j0, jm);
        walk(g, im, i1, jm, j1);
    } else if (cols == 1 || (rows > 1 && h_elems >= w_elems)) {
        int32_t mid = i0 + rows / 2;
        walk(g, i0, mid, j0, j1);
        walk(g, mid, i1, j0, j1);
    } else {
        int32_t mid = j0 + cols / 2;
        walk(g, i0, i1, j0, mid);
        walk(g, i0, i1, mid, j1);
    }
}

static void job_free(grid_job *job) {
    free(job->rects);
    free(job->undecided);
    free(job->row_run_off);
    free(job->col_run_off);
    free(job->row_runs);
    free(job->col_runs);
    free(job->row_full);
    free(job->row_part);
    free(job->col_full);
    free(job->col_part);
}

/* The class of a rect once the undecided blocks are resolved. */
static inline int rect_class(const grid_job *job, const grid_rect *r, const uint8_t *resolved) {
    return r->ref < 0 ? FLEX_BLOCK_FULL : resolved[job->undecided_base + r->ref];
}

/* dst[0..n) = first, first + 1, ... (a loop the compiler vectorises: dst
 * cannot alias anything else read here). */
static inline void fill_run(int32_t *restrict dst, int32_t first, int32_t n) {
    for (int32_t k = 0; k < n; k++)
        dst[k] = first + k;
}

/*
 * Spreads the decided rectangles of one job over the rows and the columns
 * they cover: every row gets its runs [lo, hi) of non-empty kv blocks, in
 * ascending order (the visiting order guarantees it), and every column its
 * runs of q blocks. From the runs come the per-row and per-column counts,
 * and later the lists are written row after row as one sequential stream.
 */
static int job_runs(grid_job *job, int64_t nq, int64_t nk, const uint8_t *resolved) {
    job->row_run_off = calloc((size_t)nq + 1, sizeof(int64_t));
    job->col_run_off = calloc((size_t)nk + 1, sizeof(int64_t));
    job->row_full = calloc((size_t)nq + 1, sizeof(int32_t));
    job->row_part = calloc((size_t)nq + 1, sizeof(int32_t));
    job->col_full = calloc((size_t)nk + 1, sizeof(int32_t));
    job->col_part = calloc((size_t)nk + 1, sizeof(int32_t));
    if (!job->row_run_off || !job->col_run_off || !job->row_full || !job->row_part ||
        !job->col_full || !job->col_part)
        return -1;
    int64_t *ro = job->row_run_off, *co = job->col_run_off;
    /* Runs per row and column through difference arrays: O(1) a rect. */
    for (int64_t k = 0; k < job->num_rects; k++) {
        const grid_rect *r = &job->rects[k];
        if (rect_class(job, r, resolved) == FLEX_BLOCK_EMPTY) continue;
        ro[r->i0 + 1]++;
        if (r->i1 < nq) ro[r->i1 + 1]--;
        co[r->j0 + 1]++;
        if (r->j1 < nk) co[r->j1 + 1]--;
    }
    for (int64_t i = 1; i <= nq; i++)
        ro[i] += ro[i - 1]; /* runs in row i - 1 */
    for (int64_t j = 1; j <= nk; j++)
        co[j] += co[j - 1];
    for (int64_t i = 1; i <= nq; i++)
        ro[i] += ro[i - 1]; /* offsets */
    for (int64_t j = 1; j <= nk; j++)
        co[j] += co[j - 1];
    job->row_runs = malloc(sizeof(grid_run) * (size_t)(ro[nq] > 0 ? ro[nq] : 1));
    job->col_runs = malloc(sizeof(grid_run) * (size_t)(co[nk] > 0 ? co[nk] : 1));
    int64_t *rcur = malloc(sizeof(int64_t) * (size_t)nq);
    int64_t *ccur = malloc(sizeof(int64_t) * (size_t)nk);
    if (!job->row_runs || !job->col_runs || !rcur || !ccur) {
        free(rcur);
        free(ccur);
        return -1;
    }
    memcpy(rcur, ro, sizeof(int64_t) * (size_t)nq);
    memcpy(ccur, co, sizeof(int64_t) * (size_t)nk);
    for (int64_t k = 0; k < job->num_rects; k++) {
        const grid_rect *r = &job->rects[k];
        int c = rect_class(job, r, resolved);
        if (c == FLEX_BLOCK_EMPTY) continue;
        const int32_t i0 = r->i0, i1 = r->i1, j0 = r->j0, j1 = r->j1;
        for (int32_t i = i0; i < i1; i++)
            job->row_runs[rcur[i]++] = (grid_run){j0, j1, c};
        for (int32_t j = j0; j < j1; j++)
            job->col_runs[ccur[j]++] = (grid_run){i0, i1, c};
        if (c == FLEX_BLOCK_FULL) {
            int32_t w = j1 - j0, h = i1 - i0;
            for (int32_t i = i0; i < i1; i++)
                job->row_full[i] += w;
            for (int32_t j = j0; j < j1; j++)
                job->col_full[j] += h;
        } else {
            job->row_part[i0]++; /* partial rects are single blocks */
            job->col_part[j0]++;
        }
    }
    free(rcur);
    free(ccur);
    return 0;
}

/* Writes the runs of `count` lines into a full and a partial list whose
 * line offsets start at line `first`. */
static void write_lines(const int64_t *run_off, const grid_run *runs, int64_t count,
                        flex_block_lists *full, flex_block_lists *part, int64_t first) {
    for (int64_t x = 0; x < count; x++) {
        int32_t *f = full->indices + full->offsets[first + x];
        int32_t *p = part->indices + part->offsets[first + x];
        for (int64_t k = run_off[x]; k < run_off[x + 1]; k++) {
            const grid_run *r = &runs[k];
            if (r->cls == FLEX_BLOCK_FULL) {
                fill_run(f, r->lo, r->hi - r->lo);
                f += r->hi - r->lo;
            } else {
                *p++ = r->lo;
            }
        }
    }
}

/* Writes one job's blocks into the lists of slot s (= b * H + h); the
 * offsets of the slot are already set. */
static void job_fill(const grid_job *job, flex_block_mask *m, int64_t s) {
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks;
    write_lines(job->row_run_off, job->row_runs, nq, &m->kv_full, &m->kv_partial, s * nq);
    write_lines(job->col_run_off, job->col_runs, nk, &m->q_full, &m->q_partial, s * nk);
}

/* Copies the indices of slot `from` to slot `to` (same counts). */
static void copy_slot(flex_block_lists *l, int64_t per_slot, int64_t from, int64_t to) {
    int32_t a = l->offsets[from * per_slot], n = l->offsets[(from + 1) * per_slot] - a;
    memcpy(l->indices + l->offsets[to * per_slot], l->indices + a, sizeof(int32_t) * (size_t)n);
}

/* Resolves undecided blocks: through the backend's slot, or directly with
 * the views and tables already built when the backend leaves the slot to
 * the core's default (the same evaluator the wrapper would call). */
static flex_status resolve_blocks(flex_context *ctx, const flex_mod *mod,
                                  const mod_buffer_view *views, const mod_range_tables *tables,
                                  int64_t q_len, int64_t kv_len, int qb, int kb,
                                  const flex_block_ref *refs, int64_t count, uint8_t *classes) {
    if (count == 0) return FLEX_OK;
    if (ctx->backend && !ctx->backend->mask_blocks && views)
        return flex_block_mask_eval_host_with(ctx, mod, views, tables, q_len, kv_len, qb, kb, refs,
                                              count, classes);
    return flex_backend_mask_blocks(ctx, mod, q_len, kv_len, qb, kb, refs, count, classes);
}

static flex_status build_from_mod_ieee(flex_context *ctx, flex_block_mask *m,
                                      const flex_mod *mod);

/* Interval analysis and the evaluation of undecided blocks run with
 * subnormals, the arithmetic of every mod evaluation (core/fpenv.h), on the
 * calling thread and in each thread of a parallel region. */
static flex_status build_from_mod(flex_context *ctx, flex_block_mask *m, const flex_mod *mod) {
    unsigned fp = flex_fp_mods_begin();
    flex_status st = build_from_mod_ieee(ctx, m, mod);
    flex_fp_restore(fp);
    return st;
}

static flex_status build_from_mod_ieee(flex_context *ctx, flex_block_mask *m,
                                       const flex_mod *mod) {
    const ir_mod *ir = &mod->ir;
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks;
    flex_status st = FLEX_OK;

    mod_buffer_view views[IR_MAX_BUFFERS];
    void *host_copies[IR_MAX_BUFFERS];
    memset(views, 0, sizeof views);
    memset(host_copies, 0, sizeof host_copies);
    st = flex_mod_host_views(ctx, mod, views, host_copies);
    if (st != FLEX_OK) return st;
    mod_range_tables *tables = mod_range_tables_build(ir, views);
    grid_job *jobs = NULL;
    flex_block_ref *refs = NULL;
    uint8_t *resolved = NULL;
    int64_t num_jobs = 0;
    if (!tables && ir->num_buffers > 0) goto oom;

    /* Only the (b, h) the mod can tell apart are built; the others copy. */
    uint8_t *deps = malloc((size_t)(ir->num_nodes > 0 ? ir->num_nodes : 1));
    if (!deps) goto oom;
    ir_dependencies(ir, deps);
    int root_deps = ir->num_nodes > 0 ? deps[ir->root] : 0;
    free(deps);
    int64_t jb = (root_deps & IR_DEP_B) ? m->B : 1, jh = (root_deps & IR_DEP_H) ? m->H : 1;
    num_jobs = jb * jh;
    jobs = calloc((size_t)num_jobs, sizeof *jobs);
    if (!jobs) goto oom;
    for (int64_t k = 0; k < num_jobs; k++) {
        jobs[k].b = (int32_t)(k / jh);
        jobs[k].h = (int32_t)(k % jh);
    }

    size_t scratch_size = mod_interval_scratch_size(ir);
    int walk_failed = 0;
    /* The first grid is walked on the calling thread, and timed: only when
     * the others would take a while is a thread team worth waking. */
    int64_t first_jobs = 1;
    {
        grid_walk g = {ir,          tables,    malloc(scratch_size > 0 ? scratch_size : 1),
                       m->q_len,    m->kv_len, m->q_block,
                       m->kv_block, &jobs[0]};
        if (!g.scratch) goto oom;
        int parallel = 0;
#ifdef _OPENMP
        double t = flex_now_ms();
#endif
        walk(&g, 0, (int32_t)nq, 0, (int32_t)nk);
#ifdef _OPENMP
        parallel = omp_get_max_threads() > 1 && (flex_now_ms() - t) * (double)(num_jobs - 1) > 1.0;
#endif
        if (!parallel) {
            for (; first_jobs < num_jobs; first_jobs++) {
                g.job = &jobs[first_jobs];
                walk(&g, 0, (int32_t)nq, 0, (int32_t)nk);
            }
        }
        free(g.scratch);
    }
    if (first_jobs < num_jobs) {
#ifdef _OPENMP
#pragma omp parallel
#endif
        {
            unsigned fp = flex_fp_mods_begin();
            grid_walk g = {ir,          tables,    malloc(scratch_size > 0 ? scratch_size : 1),
                           m->q_len,    m->kv_len, m->q_block,
                           m->kv_block, NULL};
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t k = first_jobs; k < num_jobs; k++) {
                g.job = &jobs[k];
                if (!g.scratch) {
                    jobs[k].failed = 1;
                    continue;
                }
                walk(&g, 0, (int32_t)nq, 0, (int32_t)nk);
            }
            free(g.scratch);
            flex_fp_restore(fp);
        }
    }
    int64_t num_refs = 0;
    for (int64_t k = 0; k < num_jobs; k++) {
        walk_failed |= jobs[k].failed;
        jobs[k].undecided_base = num_refs;
        num_refs += jobs[k].num_undecided;
    }
    if (walk_failed) goto oom;

    /* One call resolves the undecided blocks of every (b, h). */
    refs = malloc(sizeof *refs * (size_t)(num_refs > 0 ? num_refs : 1));
    resolved = malloc((size_t)(num_refs > 0 ? num_refs : 1));
    if (!refs || !resolved) goto oom;
    for (int64_t k = 0; k < num_jobs; k++)
        if (jobs[k].num_undecided)
            memcpy(refs + jobs[k].undecided_base, jobs[k].undecided,
                   sizeof *refs * (size_t)jobs[k].num_undecided);
    st = resolve_blocks(ctx, mod, views, tables, m->q_len, m->kv_len, m->q_block, m->kv_block, refs,
                        num_refs, resolved);
    if (st != FLEX_OK) goto done;
    for (int64_t k = 0; k < num_refs; k++) {
        if (resolved[k] > FLEX_BLOCK_FULL) {
            st = flex_fail(ctx, FLEX_ERR_INTERNAL,
                           "the backend's block evaluator returned class %d for a block",
                           (int)resolved[k]);
            goto done;
        }
    }

    for (int64_t k = 0; k < num_jobs; k++)
        if (job_runs(&jobs[k], nq, nk, resolved)) goto oom;

    /* Offsets of every (b, h) slot from the counts of the job it copies. */
    int64_t slots = m->B * m->H, rows = slots * nq, cols = slots * nk;
    if (lists_alloc_offsets(m)) goto oom;
    for (int64_t s = 0; s < slots; s++) {
        int64_t b = s / m->H, h = s % m->H;
        const grid_job *job = &jobs[(jb > 1 ? b : 0) * jh + (jh > 1 ? h : 0)];
        for (int64_t i = 0; i < nq; i++) {
            m->kv_full.offsets[s * nq + i + 1] = job->row_full[i];
            m->kv_partial.offsets[s * nq + i + 1] = job->row_part[i];
        }
        for (int64_t j = 0; j < nk; j++) {
            m->q_full.offsets[s * nk + j + 1] = job->col_full[j];
            m->q_partial.offsets[s * nk + j + 1] = job->col_part[j];
        }
    }
    m->num_full = counts_to_offsets(m->kv_full.offsets, rows);
    m->num_partial = counts_to_offsets(m->kv_partial.offsets, rows);
    counts_to_offsets(m->q_full.offsets, cols);
    counts_to_offsets(m->q_partial.offsets, cols);
    if (lists_alloc_indices(m, m->num_full, m->num_partial)) goto oom;

        /* Each job writes its own slot, (b, h) = (job b, job h); the slots that
         * broadcast it copy. */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (num_jobs > 1 && m->num_full > (1 << 22))
#endif
    for (int64_t k = 0; k < num_jobs; k++)
        job_fill(&jobs[k], m, (int64_t)jobs[k].b * m->H + jobs[k].h);
    if (num_jobs < slots) {
        for (int64_t s = 0; s < slots; s++) {
            int64_t b = s / m->H, h = s % m->H;
            int64_t src = (jb > 1 ? b : 0) * m->H + (jh > 1 ? h : 0);
            if (src == s) continue;
            copy_slot(&m->kv_full, nq, src, s);
            copy_slot(&m->kv_partial, nq, src, s);
            copy_slot(&m->q_full, nk, src, s);
            copy_slot(&m->q_partial, nk, src, s);
        }
    }
    goto done;
oom:
    st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY,
                   "out of memory while building a block mask of %lld x %lld blocks", (long long)nq,
                   (long long)nk);
done:
    if (jobs)
        for (int64_t k = 0; k < num_jobs; k++)
            job_free(&jobs[k]);
    free(jobs);
    free(refs);
    free(resolved);
    if (tables) mod_range_tables_free(tables);
    flex_mod_release_host_views(host_copies);
    return st;
}

static flex_status check_mask_mod(flex_context *ctx, const flex_mod *mod, const char *what) {
    if (!mod) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s is NULL", what);
    if (mod->ir.kind != FLEX_MOD_MASK)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s is a score mod; a block mask needs a mask mod (one that returns "
                         "a bool)",
                         what);
    for (int i = 0; i < mod->ir.num_buffers; i++)
        if (!mod->bound[i])
            return flex_fail(ctx, FLEX_ERR_BUFFER_UNBOUND,
                             "buffer '%s' of %s has no data bound (flex_mod_bind_buffer)",
                             mod->ir.buffers[i].name, what);
    return FLEX_OK;
}

flex_status flex_block_mask_create(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                   int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                   int kv_block, flex_block_mask **out) {
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "out (the new mask) is NULL");
    *out = NULL;
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "ctx is NULL");
    flex_status st = check_mask_mod(ctx, mask_mod, "mask_mod");
    if (st != FLEX_OK) return st;
    double t0 = flex_now_ms();
    flex_block_mask *m = NULL;
    st = mask_new(ctx, B, H, q_len, kv_len, q_block, kv_block, &m);
    if (st != FLEX_OK) return st;
    m->mask_mod = mask_mod;
    st = build_from_mod(ctx, m, mask_mod);
    if (st != FLEX_OK) {
        flex_block_mask_destroy(m);
        return st;
    }
    m->build_ms = flex_now_ms() - t0;
    *out = m;
    return FLEX_OK;
}

/* Fills a new mask m (sizes set) from a dense class grid: checks every
 * class and that partial blocks have a mod, then builds the lists. */
static flex_status fill_from_classes(flex_context *ctx, flex_block_mask *m,
                                     const flex_mod *mask_mod, const uint8_t *classes) {
    int64_t total = m->B * m->H * m->num_q_blocks * m->num_kv_blocks;
    for (int64_t k = 0; k < total; k++) {
        if (classes[k] > FLEX_BLOCK_FULL)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "classes[%lld] is %d; a class is 0 (empty), 1 (partial) or 2 (full)",
                             (long long)k, (int)classes[k]);
        if (classes[k] == FLEX_BLOCK_PARTIAL && !mask_mod)
            return flex_fail(ctx, FLEX_ERR_NULL_POINTER,
                             "classes[%lld] is partial but mask_mod is NULL; partial blocks need "
                             "a mask mod to decide their elements",
                             (long long)k);
    }
    m->mask_mod = mask_mod;
    return lists_from_dense(ctx, m, classes);
}

/* Explicit masks take an optional mask mod; only its kind is checked here
 * (its buffers are read when a partial block is evaluated). */
static flex_status check_optional_mask_kind(flex_context *ctx, const flex_mod *mask_mod) {
    if (mask_mod && mask_mod->ir.kind != FLEX_MOD_MASK)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "mask_mod is a score mod; a block mask needs a mask mod");
    return FLEX_OK;
}

flex_status flex_block_mask_from_classes(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                         int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                         int kv_block, const uint8_t *classes,
                                         flex_block_mask **out) {
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "out (the new mask) is NULL");
    *out = NULL;
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "ctx is NULL");
    if (!classes) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "classes is NULL");
    flex_status st = check_optional_mask_kind(ctx, mask_mod);
    if (st != FLEX_OK) return st;
    double t0 = flex_now_ms();
    flex_block_mask *m = NULL;
    st = mask_new(ctx, B, H, q_len, kv_len, q_block, kv_block, &m);
    if (st == FLEX_OK) st = fill_from_classes(ctx, m, mask_mod, classes);
    if (st != FLEX_OK) {
        flex_block_mask_destroy(m);
        return st;
    }
    m->build_ms = flex_now_ms() - t0;
    *out = m;
    return FLEX_OK;
}

/* Marks one list of a row in classes; fails on an index out of range or
 * a block listed twice. */
static flex_status mark_list(flex_context *ctx, uint8_t *row_classes, int64_t nk, int64_t row,
                             int32_t count, const int32_t *indices, uint8_t cls, const char *what) {
    if (count < 0 || count > nk)
        return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                         "%s_num_blocks[%lld] is %d; it must be in [0, %lld]", what, (long long)row,
                         (int)count, (long long)nk);
    for (int32_t j = 0; j < count; j++) {
        const int32_t kb = indices[row * nk + j];
        if (kb < 0 || kb >= nk)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "%s_indices[%lld] is %d; kv block indices are in [0, %lld)", what,
                             (long long)(row * nk + j), (int)kb, (long long)nk);
        if (row_classes[kb] != FLEX_BLOCK_EMPTY)
            return flex_fail(ctx, FLEX_ERR_INVALID_ARGUMENT,
                             "kv block %d is listed twice in q-block row %lld", (int)kb,
                             (long long)row);
        row_classes[kb] = cls;
    }
    return FLEX_OK;
}

flex_status flex_block_mask_from_kv_blocks(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                           int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                           int kv_block, const int32_t *kv_num_blocks,
                                           const int32_t *kv_indices,
                                           const int32_t *full_kv_num_blocks,
                                           const int32_t *full_kv_indices, flex_block_mask **out) {
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "out (the new mask) is NULL");
    *out = NULL;
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "ctx is NULL");
    if (!kv_num_blocks || !kv_indices)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s is NULL",
                         !kv_num_blocks ? "kv_num_blocks" : "kv_indices");
    if (!full_kv_num_blocks != !full_kv_indices)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER,
                         "full_kv_num_blocks and full_kv_indices must both be given or both "
                         "be NULL (%s is NULL)",
                         !full_kv_num_blocks ? "full_kv_num_blocks" : "full_kv_indices");
    flex_status st = check_optional_mask_kind(ctx, mask_mod);
    if (st != FLEX_OK) return st;
    double t0 = flex_now_ms();
    flex_block_mask *m = NULL;
    st = mask_new(ctx, B, H, q_len, kv_len, q_block, kv_block, &m);
    if (st != FLEX_OK) return st;
    const int64_t rows = m->B * m->H * m->num_q_blocks, nk = m->num_kv_blocks;
    uint8_t *classes = calloc((size_t)(rows * nk), 1);
    if (!classes)
        st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "no memory for %lld block classes",
                       (long long)(rows * nk));
    for (int64_t row = 0; row < rows && st == FLEX_OK; row++) {
        st = mark_list(ctx, classes + row * nk, nk, row, kv_num_blocks[row], kv_indices,
                       FLEX_BLOCK_PARTIAL, "kv");
        if (st == FLEX_OK && full_kv_num_blocks)
            st = mark_list(ctx, classes + row * nk, nk, row, full_kv_num_blocks[row],
                           full_kv_indices, FLEX_BLOCK_FULL, "full_kv");
    }
    if (st == FLEX_OK) st = fill_from_classes(ctx, m, mask_mod, classes);
    free(classes);
    if (st != FLEX_OK) {
        flex_block_mask_destroy(m);
        return st;
    }
    m->build_ms = flex_now_ms() - t0;
    *out = m;
    return FLEX_OK;
}

/* ---- composition ---- */

static flex_status combine(flex_context *ctx, const flex_block_mask *a, const flex_block_mask *b,
                           int is_and, flex_block_mask **out) {
    const char *op = is_and ? "flex_block_mask_and" : "flex_block_mask_or";
    if (!out) return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: out is NULL", op);
    *out = NULL;
    if (!ctx) return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "%s: ctx is NULL", op);
    if (!a || !b)
        return flex_fail(ctx, FLEX_ERR_NULL_POINTER, "%s: mask %s is NULL", op, !a ? "a" : "b");
    if (a->q_len != b->q_len || a->kv_len != b->kv_len || a->q_block != b->q_block ||
        a->kv_block != b->kv_block)
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: the masks differ in lengths or block sizes (a: %lld x %lld in "
                         "%d x %d blocks, b: %lld x %lld in %d x %d blocks)",
                         op, (long long)a->q_len, (long long)a->kv_len, a->q_block, a->kv_block,
                         (long long)b->q_len, (long long)b->kv_len, b->q_block, b->kv_block);
    if ((a->B != b->B && a->B != 1 && b->B != 1) || (a->H != b->H && a->H != 1 && b->H != 1))
        return flex_fail(ctx, FLEX_ERR_SHAPE,
                         "%s: the masks have B x H of %lld x %lld and %lld x %lld; each must "
                         "match or be 1 (broadcast)",
                         op, (long long)a->B, (long long)a->H, (long long)b->B, (long long)b->H);
    double t0 = flex_now_ms();
    int64_t B = a->B > b->B ? a->B : b->B, H = a->H > b->H ? a->H : b->H;
    flex_block_mask *m = NULL;
    flex_status st = mask_new(ctx, B, H, a->q_len, a->kv_len, a->q_block, a->kv_block, &m);
    if (st != FLEX_OK) return st;
    int64_t nq = m->num_q_blocks, nk = m->num_kv_blocks, grid = nq * nk;
    uint8_t *da = malloc((size_t)(a->B * a->H * grid));
    uint8_t *db = malloc((size_t)(b->B * b->H * grid));
    uint8_t *dc = malloc((size_t)(B * H * grid));
    flex_block_ref *refs = NULL;
    uint8_t *resolved = NULL;
    int64_t num_refs = 0;
    if (!da || !db || !dc) goto oom;
    flex_block_mask_to_dense(a, da);
    flex_block_mask_to_dense(b, db);

    /* The combined mod decides the partial blocks of the result. A mask
     * with no mod has no partial blocks, so the other's mod is enough. */
    if (a->mask_mod && b->mask_mod) {
        st = is_and ? flex_mod_and(ctx, a->mask_mod, b->mask_mod, &m->owned_mod)
                    : flex_mod_or(ctx, a->mask_mod, b->mask_mod, &m->owned_mod);
        if (st != FLEX_OK) goto done;
        m->mask_mod = m->owned_mod;
    } else {
        m->mask_mod = a->mask_mod ? a->mask_mod : b->mask_mod;
    }

    /* Block classes combine exactly except partial with partial, where the
     * combined elements may be anything. */
    for (int64_t s = 0; s < B * H; s++) {
        int64_t bi = s / H, hi = s % H;
        const uint8_t *ra = da + ((a->B > 1 ? bi : 0) * a->H + (a->H > 1 ? hi : 0)) * grid;
        const uint8_t *rb = db + ((b->B > 1 ? bi : 0) * b->H + (b->H > 1 ? hi : 0)) * grid;
        uint8_t *rc = dc + s * grid;
        for (int64_t k = 0; k < grid; k++) {
            uint8_t x = ra[k], y = rb[k], c;
            if (is_and)
                c = x == FLEX_BLOCK_EMPTY || y == FLEX_BLOCK_EMPTY ? FLEX_BLOCK_EMPTY
                    : x == FLEX_BLOCK_FULL                         ? y
                    : y == FLEX_BLOCK_FULL                         ? x
                                                                   : 255;
            else
                c = x == FLEX_BLOCK_FULL || y == FLEX_BLOCK_FULL ? FLEX_BLOCK_FULL
                    : x == FLEX_BLOCK_EMPTY                      ? y
                    : y == FLEX_BLOCK_EMPTY                      ? x
                                                                 : 255;
            rc[k] = c;
            if (c == 255) num_refs++;
        }
    }
    if (num_refs > 0) {
        refs = malloc(sizeof *refs * (size_t)num_refs);
        resolved = malloc((size_t)num_refs);
        if (!refs || !resolved) goto oom;
        int64_t n = 0;
        for (int64_t k = 0; k < B * H * grid; k++) {
            if (dc[k] != 255) continue;
            int64_t s = k / grid, cell = k % grid;
            refs[n++] = (flex_block_ref){(int32_t)(s / H), (int32_t)(s % H), (int32_t)(cell / nk),
                                         (int32_t)(cell % nk)};
        }
        st = flex_backend_mask_blocks(ctx, m->mask_mod, m->q_len, m->kv_len, m->q_block,
                                      m->kv_block, refs, num_refs, resolved);
        if (st != FLEX_OK) goto done;
        n = 0;
        for (int64_t k = 0; k < B * H * grid; k++) {
            if (dc[k] != 255) continue;
            if (resolved[n] > FLEX_BLOCK_FULL) {
                st = flex_fail(ctx, FLEX_ERR_INTERNAL,
                               "%s: the backend's block evaluator returned class %d", op,
                               (int)resolved[n]);
                goto done;
            }
            dc[k] = resolved[n++];
        }
    }
    st = lists_from_dense(ctx, m, dc);
    goto done;
oom:
    st = flex_fail(ctx, FLEX_ERR_OUT_OF_MEMORY, "%s: out of memory", op);
done:
    free(da);
    free(db);
    free(dc);
    free(refs);
    free(resolved);
    if (st != FLEX_OK) {
        flex_block_mask_destroy(m);
        return st;
    }
    m->build_ms = flex_now_ms() - t0;
    *out = m;
    return FLEX_OK;
}

flex_status flex_block_mask_and(flex_context *ctx, const flex_block_mask *a,
                                const flex_block_mask *b, flex_block_mask **out) {
    return combine(ctx, a, b, 1, out);
}

flex_status flex_block_mask_or(flex_context *ctx, const flex_block_mask *a,
                               const flex_block_mask *b, flex_block_mask **out) {
    return combine(ctx, a, b, 0, out);
}

/* ---- queries ---- */

flex_status flex_block_mask_get_shape(const flex_block_mask *mask, flex_block_mask_shape *shape) {
    if (!mask || !shape)
        return flex_fail(NULL, FLEX_ERR_NULL_POINTER, "%s is NULL", !mask ? "mask" : "shape");
    shape->B = mask->B;
    shape->H = mask->H;
    shape->q_len = mask->q_len;
    shape->kv_len = mask->kv_len;
    shape->q_block = mask->q_block;
    shape->kv_block = mask->kv_block;
    shape->num_q_blocks = mask->num_q_blocks;
    shape->num_kv_blocks = mask->num_kv_blocks;
    shape->num_full = mask->num_full;
    shape->num_partial = mask->num_partial;
    return FLEX_OK;
}

double flex_block_mask_sparsity(const flex_block_mask *mask) {
    if (!mask) return 0.0;
    double total = (double)mask->B * (double)mask->H * (double)mask->num_q_blocks *
                   (double)mask->num_kv_blocks;
    return 100.0 * (1.0 - (double)(mask->num_full + mask->num_partial) / total);
}

flex_status flex_block_mask_to_dense(const flex_block_mask *mask, uint8_t *classes) {
    if (!mask || !classes)
        return flex_fail(mask ? mask->ctx : NULL, FLEX_ERR_NULL_POINTER, "%s is NULL",
                         !mask ? "mask" : "classes");
    int64_t nk = mask->num_kv_blocks, rows = mask->B * mask->H * mask->num_q_blocks;
    memset(classes, FLEX_BLOCK_EMPTY, (size_t)(rows * nk));
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = classes + r * nk;
        for (int32_t k = mask->kv_partial.offsets[r]; k < mask->kv_partial.offsets[r + 1]; k++)
            row[mask->kv_partial.indices[k]] = FLEX_BLOCK_PARTIAL;
        for (int32_t k = mask->kv_full.offsets[r]; k < mask->kv_full.offsets[r + 1]; k++)
            row[mask->kv_full.indices[k]] = FLEX_BLOCK_FULL;
    }
    return FLEX_OK;
}
