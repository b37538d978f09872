/*
 * flex_tma_sm90.cuh: Hopper (sm_90a) TMA copies and the mbarriers that
 * count them in, for every kernel that hands its copies to one issuing
 * thread: the forward's producer warpgroup and the backward's issuing
 * thread. Placed after flex_wgmma_sm90.cuh.
 *
 * A copy lands in shared memory as boxes of 64 columns in wgmma's 128-byte
 * swizzle (16-bit tiles) or as plain rows (lse, delta); the host passes a
 * tensor map per operand as the kernel's second parameter, and elements
 * outside the map's dims read as zero. An mbarrier per stage is armed with
 * the stage's bytes by the issuing thread's arrive (which releases what it
 * wrote before, e.g. the step it hands over) and completes when they land;
 * waiting on it acquires both.
 */
struct __align__(64) flex_tmap {
    unsigned long long opaque[16];
};

static FLEX_DEVICE_INLINE void flex_mbar_init(flex_u32 bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
/* Makes the initialised mbarriers visible to the async proxy (the TMA
 * units' complete_tx); before the CTA barrier that publishes them. */
static FLEX_DEVICE_INLINE void flex_mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* This thread's arrive, arming the phase with `bytes` more to land. */
static FLEX_DEVICE_INLINE void flex_mbar_expect_tx(flex_u32 bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
static FLEX_DEVICE_INLINE void flex_mbar_arrive(flex_u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* Waits for the phase of parity `parity` to complete. A phase that never
 * completes is a bug; after 2^28 polls (minutes: each poll suspends the
 * warp for a while) the kernel traps, so it fails with an error instead of
 * hanging the process. */
static FLEX_DEVICE_INLINE void flex_mbar_wait(flex_u32 bar, unsigned parity) {
    asm volatile("{\n"
                 ".reg .pred done, more;\n"
                 ".reg .u32 polls;\n"
                 "mov.u32 polls, 0;\n"
                 "FLEX_MBAR_POLL:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@done bra.uni FLEX_MBAR_DONE;\n"
                 "add.u32 polls, polls, 1;\n"
                 "setp.lt.u32 more, polls, 268435456;\n"
                 "@more bra.uni FLEX_MBAR_POLL;\n"
                 "trap;\n"
                 "FLEX_MBAR_DONE:\n"
                 "}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
/* One box of map at coordinates (col, row, h, b), innermost first, into
 * dst, counted on bar (armed by the caller). */
static FLEX_DEVICE_INLINE void flex_tma_box(flex_u32 dst, const flex_tmap &map, int col, int row,
                                            int h, int b, flex_u32 bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
                 "l"(reinterpret_cast<unsigned long long>(&map)), "r"(col), "r"(row), "r"(h),
                 "r"(b), "r"(bar)
                 : "memory");
}
/* Rows [row0, row0 + ROWS) of head h, batch b of a 16-bit map with
 * 64-column boxes: DPAD / 64 boxes, 64-column block c at c ROWS 128 bytes.
 * Not armed: the caller arms bar with ROWS DPAD 2 bytes (and whatever else
 * the phase counts). */
template <int ROWS, int DPAD>
static FLEX_DEVICE_INLINE void flex_tma_rows(flex_u32 dst, const flex_tmap &map, int row0, int h,
                                             int b, flex_u32 bar) {
#pragma unroll
    for (int c = 0; c < DPAD / 64; c++)
        flex_tma_box(dst + c * ROWS * 128, map, c * 64, row0, h, b, bar);
}
/* The same, arming bar with its bytes (the phase counts this tile alone). */
template <int ROWS, int DPAD>
static FLEX_DEVICE_INLINE void flex_tma_tile(flex_u32 dst, const flex_tmap &map, int row0, int h,
                                             int b, flex_u32 bar) {
    flex_mbar_expect_tx(bar, ROWS * DPAD * 2);
    flex_tma_rows<ROWS, DPAD>(dst, map, row0, h, b, bar);
}
