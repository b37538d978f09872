/*
 * flex_wgmma_sm90.cuh: the Hopper (sm_90a) warpgroup matrix primitives the
 * wgmma kernels share (flex_forward_sm90.cuh, flex_backward_sm90.cuh):
 * shared-memory descriptors of 128-byte-swizzled tiles, wgmma.mma_async
 * in the shapes the kernels use, its fences and waits. Inline PTX of our
 * own, so NVRTC needs no toolkit header. The host places it after the
 * mma.sync kernel's file and before the sm_90a kernel's, only where that
 * kernel is compiled.
 *
 * Tiles: R rows x D columns of 16-bit elements are D / 64 column blocks of
 * R rows x 128 bytes (flex_load_tile with SW128), the 16-byte chunk index
 * XORed with the row's low three bits, every block 1024-byte aligned. Read
 * K-major (rows are M or N, columns the reduction) a descriptor advances 32
 * bytes per 16 columns inside a block; read MN-major (rows are the
 * reduction, columns M or N, "transposed") it advances 2 KB per 16 rows and
 * its leading-dimension offset is the distance between column blocks.
 *
 * Also the bulk asynchronous reductions from shared to global memory
 * (cp.reduce.async.bulk, TMA's copy engine without a tensor map) that the
 * backward adds dQ with: like wgmma they read shared memory through the
 * async proxy, published to it by flex_fence_proxy_async.
 */

#if defined(FLEX_ELEM_BF16)
#define FLEX_WGMMA_AB "bf16.bf16"
#else
#define FLEX_WGMMA_AB "f16.f16"
#endif

/* Shared-memory matrix descriptor of a 128-byte-swizzled operand: start
 * address, leading-dimension byte offset (K-major: unused, 16; MN-major: the
 * distance between 64-column blocks), 1024 bytes between 8-row groups. */
static FLEX_DEVICE_INLINE unsigned long long flex_sw128_desc(flex_u32 addr, flex_u32 lbo) {
    return (unsigned long long)((addr & 0x3ffffu) >> 4) |
           ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
           ((unsigned long long)(1024u >> 4) << 32) | (1ull << 62);
}

static FLEX_DEVICE_INLINE void flex_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
static FLEX_DEVICE_INLINE void flex_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> static FLEX_DEVICE_INLINE void flex_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Generic-proxy writes (cp.async) -> visible to wgmma's async-proxy reads. */
static FLEX_DEVICE_INLINE void flex_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
/* Two floats to shared memory (8-byte aligned): staging a bulk source. */
static FLEX_DEVICE_INLINE void flex_st_shared_f32x2(flex_u32 addr, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y));
}
/* Bulk asynchronous reductions: gdst[0 .. bytes / 4) += the floats at
 * shared address src, issued by this thread into its current bulk group
 * (both addresses 16-byte aligned, bytes a multiple of 16). The source's
 * generic-proxy stores must be fenced (flex_fence_proxy_async) by their
 * writers before the issue. flex_bulk_commit closes this thread's group;
 * flex_bulk_wait_read<N> returns once at most N of its groups still read
 * their sources (which may then be written again), flex_bulk_wait<N> once
 * at most N are incomplete at all (their writes done). */
static FLEX_DEVICE_INLINE void flex_bulk_red_add_f32(float *gdst, flex_u32 src, flex_u32 bytes) {
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gdst),
        "r"(src), "r"(bytes)
        : "memory");
}
static FLEX_DEVICE_INLINE void flex_bulk_commit() {
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
template <int N> static FLEX_DEVICE_INLINE void flex_bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N> static FLEX_DEVICE_INLINE void flex_bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Pins registers at a point of the instruction stream: values of an
 * asynchronous product are not read before its wait, and registers it reads
 * are not reused before it. */
template <int N> static FLEX_DEVICE_INLINE void flex_pin(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(r[i][0]), "+f"(r[i][1]), "+f"(r[i][2]), "+f"(r[i][3])::"memory");
}
template <int N> static FLEX_DEVICE_INLINE void flex_pin(flex_u32 (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+r"(r[i][0]), "+r"(r[i][1]), "+r"(r[i][2]), "+r"(r[i][3])::"memory");
}

/* A shared-memory address computed once and kept in a register (with
 * FLEX_STEP_CUTS): without this the compiler recomputes it where it is
 * used, and on sm_90 each recomputation reads the CTA's cluster id (S2R,
 * tens of cycles) inside the step loop. */
static FLEX_DEVICE_INLINE flex_u32 flex_keep_addr(flex_u32 addr) {
#if FLEX_STEP_CUTS
    asm volatile("" : "+r"(addr));
#endif
    return addr;
}

/* d (+)= a b for one warpgroup: m64nNk16, fp32 accumulators in the m16n8
 * layout per warp. ss: a and b are shared-memory descriptors; rs: a is this
 * thread's A fragment (m16n8k16 layout) and b is read transposed (MN-major).
 * The _fresh form overwrites d and does not read it, so the registers that
 * held the previous step's probabilities are not inputs of the product.
 * d may be a wider accumulator array of which the product takes the N / 8
 * n-tiles from T0 on (columns 8 T0 onwards): elements of the one array
 * named in the operand list, with no cast of a slice to a narrower array
 * type, which would take the array's address.
 * FLEX_ACC*: the accumulator operands (C is the constraint: "+f"
 * accumulates, "=f" overwrites); FLEX_REGS*: the matching register lists. */
#define FLEX_ACC4(C, i) C(d[T0 + i][0]), C(d[T0 + i][1]), C(d[T0 + i][2]), C(d[T0 + i][3])
#define FLEX_ACC32(C)                                                                              \
    FLEX_ACC4(C, 0), FLEX_ACC4(C, 1), FLEX_ACC4(C, 2), FLEX_ACC4(C, 3), FLEX_ACC4(C, 4),           \
        FLEX_ACC4(C, 5), FLEX_ACC4(C, 6), FLEX_ACC4(C, 7)
#define FLEX_ACC64(C)                                                                              \
    FLEX_ACC32(C), FLEX_ACC4(C, 8), FLEX_ACC4(C, 9), FLEX_ACC4(C, 10), FLEX_ACC4(C, 11),           \
        FLEX_ACC4(C, 12), FLEX_ACC4(C, 13), FLEX_ACC4(C, 14), FLEX_ACC4(C, 15)
#define FLEX_REGS32                                                                                \
    "{"                                                                                            \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"               \
    "}"
#define FLEX_REGS64                                                                                \
    "{"                                                                                            \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "             \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "             \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"               \
    "}"
/* scale-d is a predicate: 1 accumulates, 0 overwrites. */
#define FLEX_WGMMA_HEAD(n, pred)                                                                   \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" #pred ", 0;\nwgmma.mma_async.sync.aligned.m64n" #n        \
    "k16.f32." FLEX_WGMMA_AB " "

template <int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_ss_n128_fresh(float (&d)[NT][4], unsigned long long a,
                                                        unsigned long long b) {
    static_assert(T0 + 16 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(128, 66) FLEX_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FLEX_ACC64("=f")
                 : "l"(a), "l"(b), "r"(0));
}
template <int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_ss_n128(float (&d)[NT][4], unsigned long long a,
                                                  unsigned long long b) {
    static_assert(T0 + 16 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(128, 66) FLEX_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FLEX_ACC64("+f")
                 : "l"(a), "l"(b), "r"(1));
}
template <int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_rs_n128(float (&d)[NT][4], const flex_u32 (&a)[4],
                                                  unsigned long long b) {
    static_assert(T0 + 16 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(128, 69) FLEX_REGS64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FLEX_ACC64("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
template <int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_rs_n64(float (&d)[NT][4], const flex_u32 (&a)[4],
                                                 unsigned long long b) {
    static_assert(T0 + 8 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(64, 37) FLEX_REGS32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FLEX_ACC32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

/* ss, m64n64k16 (the backward's 64-column products). TA, TB: 1 reads A or
 * B MN-major (transposed), 0 K-major. */
template <int TA, int TB, int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_ss_n64_fresh(float (&d)[NT][4], unsigned long long a,
                                                       unsigned long long b) {
    static_assert(T0 + 8 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(64, 34) FLEX_REGS32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : FLEX_ACC32("=f")
                 : "l"(a), "l"(b), "r"(0), "n"(TA), "n"(TB));
}
template <int TA, int TB, int T0 = 0, int NT>
static FLEX_DEVICE_INLINE void flex_wgmma_ss_n64(float (&d)[NT][4], unsigned long long a,
                                                 unsigned long long b) {
    static_assert(T0 + 8 <= NT, "accumulator columns out of range");
    asm volatile(FLEX_WGMMA_HEAD(64, 34) FLEX_REGS32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : FLEX_ACC32("+f")
                 : "l"(a), "l"(b), "r"(1), "n"(TA), "n"(TB));
}
