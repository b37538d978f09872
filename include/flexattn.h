/*
 * flexattn: attention with user-defined score and mask modifications, fused
 * into one block-sparse kernel per backend.
 *
 * This is the only installed header. It is plain C11 (no compiler
 * extensions) and may be included from C++.
 *
 * Ownership conventions used by every comment below:
 *   - "borrows" means the library reads the pointed-to memory during the call
 *     only, unless the comment says it keeps the pointer;
 *   - handles (flex_context, flex_mod, flex_block_mask) are owned by the
 *     caller from the create call that returns them until the matching
 *     destroy call; destroy functions accept NULL;
 *   - strings returned as `const char *` are owned by the library and stay
 *     valid as long as the object they came from (or forever, for static
 *     tables) unless the comment says otherwise.
 *
 * Every fallible call returns a flex_status. The message that explains the
 * calling thread's last failure on a context is flex_error_message(ctx); a
 * failure in a call given no context (ctx == NULL, or context creation
 * itself) is explained by flex_error_message(NULL). Messages are per thread.
 *
 * Threads. A context may be shared by threads: every call that takes a
 * context may run on it from several threads at once, except
 * flex_context_destroy, which must come after every other call on it has
 * returned. The block masks that flex_attention builds for opts->mask_mod are
 * cached on the context behind a lock and reference-counted, so one thread
 * may replace a cache entry while another still computes with it. What the
 * caller owns is the caller's to synchronise: a flex_mod or flex_block_mask
 * may be read by concurrent calls, but must not be destroyed, nor a mod's
 * buffer rebound (flex_mod_bind_buffer), while a call uses it; output
 * tensors of concurrent calls must not overlap. On a GPU, an out-of-range
 * buffer read is reported by the next flex_synchronize on the context,
 * whichever thread calls it.
 */
#ifndef FLEXATTN_H
#define FLEXATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FLEXATTN_VERSION_MAJOR 0
#define FLEXATTN_VERSION_MINOR 1
#define FLEXATTN_VERSION_PATCH 0

/* "MAJOR.MINOR.PATCH" of the library actually loaded. Static string. */
const char *flex_version(void);

/* ---------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------- */
typedef enum flex_status {
    FLEX_OK = 0,
    FLEX_ERR_INVALID_ARGUMENT = 1, /* a value is out of its allowed range */
    FLEX_ERR_NULL_POINTER = 2,     /* a required pointer or handle is NULL */
    FLEX_ERR_SHAPE = 3,            /* tensor sizes or strides do not fit together */
    FLEX_ERR_DTYPE = 4,            /* a dtype is not allowed here */
    FLEX_ERR_UNSUPPORTED = 5,      /* valid request this backend cannot do */
    FLEX_ERR_BACKEND = 6,          /* backend unknown, not built in, or unusable */
    FLEX_ERR_OUT_OF_MEMORY = 7,
    FLEX_ERR_MOD_SYNTAX = 8,     /* mod text does not parse */
    FLEX_ERR_MOD_TYPE = 9,       /* mod text parses but is ill-typed */
    FLEX_ERR_MOD_NAME = 10,      /* mod text names an unknown variable, param, buffer or function */
    FLEX_ERR_BUFFER_BOUNDS = 11, /* a mod read a buffer outside its sizes */
    FLEX_ERR_BUFFER_UNBOUND = 12, /* a mod's buffer has no data bound */
    FLEX_ERR_COMPILE = 13,        /* run-time kernel compilation failed (log in message) */
    FLEX_ERR_DEVICE = 14,         /* a GPU runtime call failed */
    FLEX_ERR_IO = 15,             /* a file could not be read or written */
    FLEX_ERR_INTERNAL = 16,
    FLEX_ERR_OVERFLOW = 17 /* a size, stride or byte count does not fit the address space */
} flex_status;

/* The enumerator's name without the FLEX_ prefix ("ERR_SHAPE"). Static. */
const char *flex_status_name(flex_status status);

/* Device codes follow DLPack's DLDeviceType. */
typedef enum flex_device_type {
    FLEX_DEVICE_CPU = 1,
    FLEX_DEVICE_CUDA = 2,
    FLEX_DEVICE_HIP = 10
} flex_device_type;

/* ---------------------------------------------------------------------------
 * Context: one backend on one device.
 * ------------------------------------------------------------------------- */
typedef struct flex_context flex_context;

/*
 * Creates a context for the backend named by `spec`: "auto", "cpu", "cuda",
 * "hip" (case-insensitive), each optionally followed by ":N" for device N.
 * spec == NULL reads the FLEXATTN_BACKEND environment variable, and "auto"
 * when it is unset or empty. "auto" takes the usable backend with the best
 * score (GPU backends before the CPU). A named backend that is unknown, not
 * built into this library or not usable on this machine is an error
 * (FLEX_ERR_BACKEND) whose message says which and why; there is never a
 * silent fallback to another backend.
 * The rest of the environment is read here too, once: FLEXATTN_DEBUG (the
 * experiment switches of docs/debugging.md; a bad item is warned about),
 * FLEXATTN_LOG (a bad level is warned about) and the kernel cache's folder
 * (FLEXATTN_CACHE_DIR, else XDG_CACHE_HOME or HOME: a folder longer than 960
 * characters is FLEX_ERR_INVALID_ARGUMENT naming the variable).
 * On success *out is a new context owned by the caller (flex_context_destroy).
 * On failure *out is NULL and flex_error_message(NULL) explains.
 */
flex_status flex_context_create(const char *spec, flex_context **out);

/* Frees the context and every cached kernel and block mask it holds. The
 * caller must have destroyed the block masks created on it first, and no
 * other thread may be in a call on it. */
void flex_context_destroy(flex_context *ctx);

/*
 * Where a GPU backend takes the device work space of one call from (the
 * backward's delta rows and dQ accumulator, split-KV pieces of a decode).
 * Without one, the backend allocates in stream order itself
 * (cuMemAllocAsync / hipMallocAsync). A framework with its own caching
 * allocator (PyTorch's) hands it in here so that the two do not compete for
 * the same memory.
 *   alloc: returns `bytes` of device memory on the context's device that
 *          work queued on `stream` may use, aligned to 256 bytes (as
 *          cudaMalloc's and PyTorch's are; otherwise the call takes it
 *          back and fails with FLEX_ERR_INVALID_ARGUMENT), or NULL when it
 *          has none (the call then fails with FLEX_ERR_OUT_OF_MEMORY and
 *          queues nothing).
 *          Called at most a few times a call, from the calling thread.
 *   free:  takes back what alloc returned. It is called as soon as the
 *          call's work is queued on `stream`, before that work has run: the
 *          allocator may give the memory to later work on the same stream
 *          only (stream-ordered reuse, as PyTorch's caching allocator does).
 *   user:  passed to both, never read by the library.
 * While a CUDA graph is being captured the allocations happen during the
 * capture, so the allocator must be one that can capture (PyTorch's can).
 */
typedef struct flex_device_allocator {
    void *(*alloc)(void *user, size_t bytes, void *stream);
    void (*free)(void *user, void *ptr, void *stream);
    void *user;
} flex_device_allocator;

/*
 * Installs allocator (copied; both functions must be set, else
 * FLEX_ERR_INVALID_ARGUMENT) as ctx's source of work space, or with
 * allocator == NULL goes back to the backend's own. The functions and user
 * must stay valid until the allocator is replaced or ctx destroyed. No
 * other thread may be in a call on ctx meanwhile. Backends without device
 * work space (cpu) keep it and never call it.
 */
flex_status flex_context_set_allocator(flex_context *ctx, const flex_device_allocator *allocator);

/* Backend name ("cpu", "cuda", ...) and device index. Static / int. */
const char *flex_context_backend(const flex_context *ctx);
int flex_context_device_index(const flex_context *ctx);

/* Where tensors for this context live (FLEX_DEVICE_CPU for the CPU backend). */
flex_device_type flex_context_device_type(const flex_context *ctx);

/* A human-readable device description, owned by the context. */
const char *flex_context_device_name(const flex_context *ctx);

/*
 * The message of the calling thread's last failed call on ctx (or, for
 * ctx == NULL, of its last failed context-less call). "" when it has had
 * none (flex_attention and flex_attention_backward clear it once their
 * arguments pass). Other threads' failures on the same context never
 * change it. Owned by the library;
 * valid until this thread's next call on the same ctx (or, for NULL, its
 * next context-less call) or the destruction of ctx. A thread remembers
 * the messages of the 8 contexts it used most recently.
 */
const char *flex_error_message(const flex_context *ctx);

/* ---------------------------------------------------------------------------
 * Backend discovery (for tools such as `flexattn info`)
 * ------------------------------------------------------------------------- */
typedef struct flex_backend_info {
    const char *name; /* "cpu", "cuda", "hip" (static) */
    int built_in;     /* compiled into this library */
    int usable;       /* its runtime was found and a device answered */
    int score;        /* preference for "auto"; 0 when unusable */
    char reason[256]; /* why not usable / what was found, in words */
} flex_backend_info;

/* Number of backends this library knows of (built in or not). */
int flex_backend_count(void);

/* Fills *info for backend i (0 <= i < flex_backend_count()). Probing has no
 * side effects beyond loading vendor libraries with dlopen. */
flex_status flex_backend_get_info(int i, flex_backend_info *info);

/* ---------------------------------------------------------------------------
 * Tensors: non-owning views.
 * ------------------------------------------------------------------------- */
typedef enum flex_dtype {
    FLEX_F32 = 0,
    FLEX_F16 = 1,
    FLEX_BF16 = 2,
    FLEX_I32 = 3, /* buffers only */
    FLEX_I64 = 4, /* buffers only; read as 32-bit int (wraps like torch .int()) */
    FLEX_U8 = 5,  /* buffers only; read as int */
    FLEX_BOOL = 6 /* buffers only; one byte, non-zero is true; read as bool */
} flex_dtype;

/* Size in bytes of one element, and a static name ("f32", "bf16", ...). */
size_t flex_dtype_size(flex_dtype dtype);
const char *flex_dtype_name(flex_dtype dtype);

/*
 * A view of memory the caller owns. sizes[] and strides[] are in elements;
 * only the first ndim entries are read. Attention tensors have ndim == 4 and
 * the logical order (batch, heads, sequence, head_dim) whatever their memory
 * layout: BSHD memory is expressed by strides. GPU backends need
 * strides[3] == 1. The library never keeps a flex_tensor pointer past a call
 * (flex_mod_bind_buffer keeps a copy of the view, not of the data).
 */
typedef struct flex_tensor {
    void *data;
    flex_dtype dtype;
    int ndim;
    int64_t sizes[4];
    int64_t strides[4];
    flex_device_type device;
    int device_index;
} flex_tensor;

/* Views with logical sizes (B, H, S, D) over contiguous memory laid out as
 * B,H,S,D (bhsd) or B,S,H,D (bshd). Pure functions. */
flex_tensor flex_tensor_bhsd(void *data, flex_dtype dtype, int64_t B, int64_t H, int64_t S,
                             int64_t D, flex_device_type device);
flex_tensor flex_tensor_bshd(void *data, flex_dtype dtype, int64_t B, int64_t H, int64_t S,
                             int64_t D, flex_device_type device);
/* A contiguous row-major view of 1 to 4 dims (for buffers). */
flex_tensor flex_tensor_contiguous(void *data, flex_dtype dtype, int ndim, const int64_t *sizes,
                                   flex_device_type device);

/* ---------------------------------------------------------------------------
 * Memory on the context's device (host memory for the CPU backend).
 * ------------------------------------------------------------------------- */

/* Allocates `bytes` on the context's device; *ptr is owned by the caller
 * until flex_free on the same context. */
flex_status flex_malloc(flex_context *ctx, size_t bytes, void **ptr);
void flex_free(flex_context *ctx, void *ptr);
/* Host <-> device copies; both borrow their pointers for the call. They
 * complete before returning. */
flex_status flex_copy_to_device(flex_context *ctx, void *device_dst, const void *host_src,
                                size_t bytes);
flex_status flex_copy_to_host(flex_context *ctx, void *host_dst, const void *device_src,
                              size_t bytes);
/* Waits for all work queued on ctx, and reports a buffer read that a GPU
 * kernel clamped since the last synchronize (FLEX_ERR_BUFFER_BOUNDS). */
flex_status flex_synchronize(flex_context *ctx);

/* ---------------------------------------------------------------------------
 * Mods: small expressions compiled once.
 * ------------------------------------------------------------------------- */
typedef enum flex_mod_kind {
    FLEX_MOD_MASK = 0, /* f(b, h, q, kv) -> bool, true = attend */
    FLEX_MOD_SCORE = 1 /* f(score, b, h, q, kv) -> float, the new score */
} flex_mod_kind;

/* A named scalar baked into the compiled mod as a constant. */
typedef struct flex_param {
    const char *name;
    int is_float; /* 0: int (value must be integral, 32-bit); 1: float */
    double value;
} flex_param;

/* A named buffer the mod reads at run time, e.g. doc[q]. Its data is bound
 * later with flex_mod_bind_buffer; only dtype and ndim are compiled in. */
typedef struct flex_buffer_decl {
    const char *name;
    flex_dtype dtype;
    int ndim; /* 1 to 4 */
} flex_buffer_decl;

typedef struct flex_mod_desc {
    flex_mod_kind kind;
    const char *text;
    const flex_param *params;
    int num_params;
    const flex_buffer_decl *buffers;
    int num_buffers;
} flex_mod_desc;

typedef struct flex_mod flex_mod;

/*
 * Parses, type-checks and folds desc->text. Borrows desc and everything it
 * points to for the call only. On success *out is a new mod owned by the
 * caller (flex_mod_destroy). Text errors (FLEX_ERR_MOD_SYNTAX, _TYPE, _NAME)
 * have a message with line:col, the offending token and a caret line; an
 * unknown name suggests the closest known one. ctx may be NULL (the message
 * then goes to flex_error_message(NULL)).
 */
flex_status flex_mod_compile(flex_context *ctx, const flex_mod_desc *desc, flex_mod **out);
void flex_mod_destroy(flex_mod *mod);

/*
 * Binds data to the buffer `name`. The mod keeps a copy of the view (not of
 * the data): the caller keeps the data alive and unchanged until the mod is
 * destroyed or the buffer rebound. Data on the host or on a context's
 * device; a kernel on another device reads it only after the library copies
 * it. dtype and ndim must match the declaration.
 */
flex_status flex_mod_bind_buffer(flex_context *ctx, flex_mod *mod, const char *name,
                                 const flex_tensor *data);

flex_mod_kind flex_mod_get_kind(const flex_mod *mod);
/* Canonical text after folding, owned by the mod. Equal mods (up to
 * whitespace, comments, names of lets and param values written as literals)
 * have equal canonical text. */
const char *flex_mod_canonical_text(const flex_mod *mod);
/* 64-bit hash of kind, canonical text and buffer declarations. */
uint64_t flex_mod_hash(const flex_mod *mod);

/*
 * Combines two mask mods into a new one (a && b, or a || b). Params are
 * already folded; buffers of the same name must have the same declaration
 * and binding. *out is owned by the caller; a and b are borrowed.
 */
flex_status flex_mod_and(flex_context *ctx, const flex_mod *a, const flex_mod *b, flex_mod **out);
flex_status flex_mod_or(flex_context *ctx, const flex_mod *a, const flex_mod *b, flex_mod **out);

/* ---------------------------------------------------------------------------
 * Presets: the seed patterns as mod text. Each preset is mod text plus the
 * params (with defaults) and buffers it names; compiling a preset is
 * compiling that text, one path for presets and user text.
 * ------------------------------------------------------------------------- */
typedef struct flex_preset {
    const char *name;        /* "causal", "sliding_window", ... */
    const char *description; /* one line */
    flex_mod_kind kind;
    const char *text;
    const flex_param *params; /* defaults; override by name */
    int num_params;
    const flex_buffer_decl *buffers;
    int num_buffers;
} flex_preset;

int flex_preset_count(void);
/* Static table entries; NULL when i is out of range / the name unknown. */
const flex_preset *flex_preset_at(int i);
const flex_preset *flex_preset_find(const char *name);

/*
 * Compiles a preset, with param overrides given by name (a name the preset
 * does not have is FLEX_ERR_MOD_NAME). Borrows everything for the call.
 */
flex_status flex_preset_compile(flex_context *ctx, const char *name, const flex_param *overrides,
                                int num_overrides, flex_mod **out);

/*
 * Fills ids[0..total) with the index of the sequence each token belongs to,
 * given offsets[0..num_offsets) (offsets[0] == 0, non-decreasing, last ==
 * total). Used for document and jagged presets. Borrows both arrays.
 */
flex_status flex_sequence_ids_from_offsets(const int32_t *offsets, int num_offsets, int32_t *ids,
                                           int64_t total);

/* ---------------------------------------------------------------------------
 * Block masks
 * ------------------------------------------------------------------------- */
typedef struct flex_block_mask flex_block_mask;

/* Block classes as exported by flex_block_mask_to_dense. */
enum { FLEX_BLOCK_EMPTY = 0, FLEX_BLOCK_PARTIAL = 1, FLEX_BLOCK_FULL = 2 };

/*
 * Builds the block mask of `mask_mod` for (B, H, q_len, kv_len). B or H of 0
 * or 1 means the mask is the same for every batch / head (evaluated at 0).
 * q_block and kv_block are powers of two from 16 to 1024; 0 means 128.
 * Interval analysis decides most blocks; only undecided ones are evaluated
 * element by element, on the context's backend. The mask keeps a reference
 * to mask_mod, which must outlive it; buffers are read during the call.
 * *out is owned by the caller (flex_block_mask_destroy).
 */
flex_status flex_block_mask_create(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                   int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                   int kv_block, flex_block_mask **out);

/*
 * Builds a block mask from explicit classes: classes[((b*Hm + h)*nq + i)*nk
 * + j] is FLEX_BLOCK_EMPTY, _PARTIAL or _FULL, with Bm = max(B,1), Hm =
 * max(H,1), nq = ceil(q_len/q_block), nk = ceil(kv_len/kv_block).
 * mask_mod (may be NULL when no block is partial) decides the elements of
 * partial blocks and must outlive the mask. Borrows classes.
 */
flex_status flex_block_mask_from_classes(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                         int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                         int kv_block, const uint8_t *classes,
                                         flex_block_mask **out);

/*
 * Builds a block mask from explicit kv-block lists, in the layout of
 * PyTorch's BlockMask.from_kv_blocks. For each (b, h, q block i), with
 * row = (b*Hm + h)*nq + i (Bm, Hm, nq, nk as in flex_block_mask_from_classes):
 *   kv_num_blocks[row]              partial blocks in the row,
 *   kv_indices[row*nk + 0 .. n-1]   their kv block indices,
 *   full_kv_num_blocks[row]         full blocks in the row (may be NULL
 *   full_kv_indices[row*nk + ...]   together with full_kv_indices: none).
 * Indices are in [0, nk) and appear at most once per row across both lists;
 * blocks in neither list are empty. mask_mod (NULL only when no block is
 * partial) decides partial blocks and must outlive the mask. Borrows every
 * array; *out is owned by the caller.
 */
flex_status flex_block_mask_from_kv_blocks(flex_context *ctx, const flex_mod *mask_mod, int64_t B,
                                           int64_t H, int64_t q_len, int64_t kv_len, int q_block,
                                           int kv_block, const int32_t *kv_num_blocks,
                                           const int32_t *kv_indices,
                                           const int32_t *full_kv_num_blocks,
                                           const int32_t *full_kv_indices, flex_block_mask **out);

/* a && b / a || b of two masks of the same sizes and block sizes. Builds the
 * combined mask mod (owned by the new mask). *out is owned by the caller. */
flex_status flex_block_mask_and(flex_context *ctx, const flex_block_mask *a,
                                const flex_block_mask *b, flex_block_mask **out);
flex_status flex_block_mask_or(flex_context *ctx, const flex_block_mask *a,
                               const flex_block_mask *b, flex_block_mask **out);

void flex_block_mask_destroy(flex_block_mask *mask);

typedef struct flex_block_mask_shape {
    int64_t B, H; /* as stored: 1 when broadcast */
    int64_t q_len, kv_len;
    int q_block, kv_block;
    int64_t num_q_blocks, num_kv_blocks;
    int64_t num_full, num_partial; /* blocks over all (b, h) */
} flex_block_mask_shape;

flex_status flex_block_mask_get_shape(const flex_block_mask *mask, flex_block_mask_shape *shape);

/* Percentage (0..100) of blocks that are empty, as PyTorch's
 * BlockMask.sparsity(). */
double flex_block_mask_sparsity(const flex_block_mask *mask);

/* Writes the class of every block to classes (layout as in
 * flex_block_mask_from_classes); classes must hold B*H*nq*nk bytes. */
flex_status flex_block_mask_to_dense(const flex_block_mask *mask, uint8_t *classes);

/*
 * The ASCII picture of the mask for (b, h): "██" full, "░░" partial, "  "
 * empty, one line per row of blocks; shrunk to at most max_cells cells a side
 * (0 = 64) for long sequences, a cell then showing the densest class it
 * covers. Writes at most cap bytes (NUL-terminated when cap > 0) and returns
 * the length the whole picture needs, like snprintf.
 */
size_t flex_block_mask_format(const flex_block_mask *mask, int64_t b, int64_t h, int max_cells,
                              char *buf, size_t cap);

/* ---------------------------------------------------------------------------
 * Attention
 * ------------------------------------------------------------------------- */
typedef struct flex_attention_options {
    float scale;              /* 0 means 1/sqrt(D) */
    const flex_mod *mask_mod; /* used when block_mask is NULL: a block mask is
                                 built and cached on the context */
    void *stream;             /* CUstream / hipStream_t; NULL = default */
    int q_tile, kv_tile;      /* kernel hints; 0 = the plan's choice */
    int kv_splits;            /* >= 0; pieces the kv range of each (batch, head)
                                 is cut into, merged by their LSE; 0 = the
                                 backend's policy. The CPU honours it (at most
                                 one piece per 64 keys); CUDA ignores it */

    /* ---- decode and serving (docs/decode.md). Each is borrowed for the
     * call, may be NULL, is a run-time kernel argument (a new value never
     * recompiles anything) and may live on the host or on the context's
     * device. Host values are checked before any work: a bad one is
     * FLEX_ERR_INVALID_ARGUMENT naming the tensor, the index and the value,
     * and out is not written. ---- */

    /* int32 (B,): query row i of batch b is at absolute position
     * q_offsets[b] + i (>= 0, <= that batch's kv length). Mods and block
     * masks see absolute positions. NULL: all 0. */
    const flex_tensor *q_offsets;
    /* int32 (B,): keys at logical positions >= kv_lengths[b] are not
     * attended (0 .. the logical kv length). NULL: all attended. */
    const flex_tensor *kv_lengths;
    /* int32 (B, max_pages): k and v are page pools, k (num_pages, Hkv,
     * page_size, D) and v (num_pages, Hkv, page_size, Dv), any strides.
     * Logical kv position p of batch b is row p % page_size of page
     * page_table[b][p / page_size]; the logical kv length is max_pages *
     * page_size. Entries of pages a batch reads (below its kv length) must
     * be in [0, num_pages); the others are never read. NULL: not paged. */
    const flex_tensor *page_table;

    /* ---- backward (docs/backward.md, "Determinism") ---- */

    /* 0 or 1; anything else is FLEX_ERR_INVALID_ARGUMENT naming it. A plain
     * value, read during the call.
     * 1: flex_attention_backward writes bit-identical dq, dk, dv and buffer
     * gradients every time it is called with the same inputs, options,
     * backend, device and (CPU) thread count, at some cost in speed on
     * GPUs. A backend that cannot give some gradient that way refuses the
     * call with FLEX_ERR_UNSUPPORTED naming it rather than give it
     * otherwise: the CUDA backend refuses buffer gradients, the HIP
     * backend dq and buffer gradients.
     * 0: the backend's fastest order; on GPUs dq and buffer gradients are
     * then summed with atomics, and their last bits may change from run to
     * run. The forwards of every backend are deterministic and ignore it;
     * the CPU backward is deterministic either way. */
    int deterministic;
} flex_attention_options;

/*
 * out = softmax(score_mod(q·kᵀ·scale) masked by block_mask) · v
 *
 * q: (B, Hq, Lq, D), k: (B, Hkv, Lkv, D), v: (B, Hkv, Lkv, Dv), out: (B,
 * Hq, Lq, Dv), all of one dtype (f32, f16 or bf16) on the context's device;
 * Hq a multiple of Hkv (grouped-query attention). lse (may be NULL) is f32
 * (B, Hq, Lq) given as a 4-D tensor with sizes[3] == 1: the natural-log
 * sum of exp of the modified scores. score_mod, block_mask and opts may be
 * NULL. A row with no attended key gives out 0 and lse -inf.
 * Borrows every argument for the call; on GPU backends the work is queued on
 * opts->stream and the inputs must stay alive until it completes.
 * out is never written when an argument check fails.
 * With opts->q_offsets, kv_lengths or page_table, a block mask is in
 * logical positions: its q_len must reach every q_offsets[b] + Lq and its
 * kv_len the logical kv length (the mask opts->mask_mod builds is for
 * q_len = max(logical kv length, largest q_offsets[b] + Lq), so that one
 * mask serves every decode step).
 */
flex_status flex_attention(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                           const flex_tensor *v, const flex_mod *score_mod,
                           const flex_block_mask *block_mask, const flex_attention_options *opts,
                           const flex_tensor *out, const flex_tensor *lse);

/* The gradient of a float buffer read by the score mod, accumulated into
 * grad (f32, same sizes as the bound buffer). */
typedef struct flex_buffer_grad {
    const char *name;
    flex_tensor grad;
} flex_buffer_grad;

/*
 * Gradients of flex_attention: given the forward's inputs, its out and lse,
 * and dout, writes dq, dk, dv (same shapes and dtype as q, k, v; any may be
 * NULL when not wanted) and adds the gradients of the named float buffers.
 * Borrows everything for the call. opts->q_offsets, kv_lengths and
 * page_table are not supported here (FLEX_ERR_UNSUPPORTED naming them);
 * opts->deterministic asks for gradients that are the same bits every run.
 * On GPU backends the work is queued on opts->stream without waiting for
 * it. On the CUDA backend, once a call with the same mods, block mask,
 * dtypes and shapes has run on the context (which compiles the kernels and
 * copies the mask lists and host-resident buffers to the device), a call
 * allocates and copies nothing outside that stream, so it can be captured
 * in a CUDA graph (docs/cuda-backend.md, "Streams, graphs and errors"); the
 * same holds for flex_attention.
 */
flex_status flex_attention_backward(flex_context *ctx, const flex_tensor *q, const flex_tensor *k,
                                    const flex_tensor *v, const flex_tensor *out,
                                    const flex_tensor *dout, const flex_tensor *lse,
                                    const flex_mod *score_mod, const flex_block_mask *block_mask,
                                    const flex_attention_options *opts, const flex_tensor *dq,
                                    const flex_tensor *dk, const flex_tensor *dv,
                                    const flex_buffer_grad *buffer_grads, int num_buffer_grads);

#ifdef __cplusplus
}
#endif
#endif /* FLEXATTN_H */
