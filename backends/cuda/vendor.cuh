/*
 * vendor.cuh: the few names that differ between CUDA and HIP device code,
 * so the kernel templates are written once. Compiled by NVRTC (CUDA) or
 * hiprtc (HIP, with FLEX_HIP defined); no toolkit header is included, since
 * the run-time compilers may not find them.
 */
#ifndef FLEX_VENDOR_CUH
#define FLEX_VENDOR_CUH

#define FLEX_DEVICE_INLINE __device__ __forceinline__
#define FLEX_INF           __int_as_float(0x7f800000)
#define FLEX_NEG_INF       __int_as_float(0xff800000)

#if defined(FLEX_HIP)
/* The kernels' warps are 32 lanes; on a wave64 GPU two share a wavefront,
 * so lane reads stay inside groups of 32 (FLEX_SHFL(v, 0) is lane 0 of this
 * warp, not of the wave). FLEX_ANY spans the wave: its callers only use it
 * to skip work. */
#define FLEX_WARP_SIZE      64
/* Out of line on CUDA (below); inlined here, as before, until it is
 * measured on AMD hardware. */
#define FLEX_DEVICE_OUT_OF_LINE FLEX_DEVICE_INLINE
#define FLEX_SHFL_XOR(v, m) __shfl_xor((v), (m), 32)
#define FLEX_SHFL(v, src)   __shfl((v), (src), 32)
#define FLEX_ANY(pred)      __any(pred)
/* HIP has no tanh.approx; tanh_approx is exact there (within tanhf's ulps). */
static FLEX_DEVICE_INLINE float flex_tanh_approx(float x) {
    return tanhf(x);
}
static FLEX_DEVICE_INLINE float flex_half_bits_to_float(unsigned short h) {
    return __half2float(__ushort_as_half(h));
}
#else
#define FLEX_WARP_SIZE      32
/* A device function called, never inlined: for the exact sin, cos and tan,
 * whose far-argument reduction would otherwise be copied into the kernel at
 * every score a thread holds (docs/decisions.md, "Where the zoo's slowest
 * mods lose"). */
#define FLEX_DEVICE_OUT_OF_LINE __device__ __noinline__
#define FLEX_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define FLEX_SHFL(v, src)   __shfl_sync(0xffffffffu, (v), (src))
#define FLEX_ANY(pred)      __any_sync(0xffffffffu, (pred))
/* The SFU's tanh (sm_75 and later): max abs error about 2^-10.7. */
static FLEX_DEVICE_INLINE float flex_tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
static FLEX_DEVICE_INLINE float flex_half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

typedef unsigned short flex_u16;
typedef unsigned int flex_u32;

#endif /* FLEX_VENDOR_CUH */
