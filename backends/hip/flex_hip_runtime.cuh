/*
 * flex_hip_runtime.cuh: the few HIP device-runtime names the kernel
 * templates and the emitted mods use (thread and block indices, barriers,
 * atomics, cross-lane reads, IEEE-rounded float operations, math), defined
 * here for a compile without HIP's headers: clang's AMDGPU target with
 * -nogpuinc, as the compile checks run it. hiprtc (__HIPCC_RTC__) has its
 * own definitions of all of them, so at run time this file is empty. The
 * math functions are the ROCm device library's (ocml/ockl), as HIP's
 * headers call them.
 */
#ifndef FLEX_HIP_RUNTIME_CUH
#define FLEX_HIP_RUNTIME_CUH
#if !defined(__HIPCC_RTC__)

#define __global__      __attribute__((global))
#define __device__      __attribute__((device))
#define __host__        __attribute__((host))
#define __shared__      __attribute__((shared))
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n)    __attribute__((aligned(n)))
#define __launch_bounds__(n) __attribute__((amdgpu_flat_work_group_size(1, n)))

struct flex_hip_dim3 {
    unsigned x, y, z;
};
/* The dispatch packet (hsa_kernel_dispatch_packet_t): workgroup sizes at
 * bytes 4, 6, 8 (u16), grid sizes in work-items at 12, 16, 20 (u32). */
static __device__ __forceinline__ const unsigned char *flex_hip_packet() {
    return (const unsigned char *)__builtin_amdgcn_dispatch_ptr();
}
static __device__ __forceinline__ flex_hip_dim3 flex_hip_thread_idx() {
    return {__builtin_amdgcn_workitem_id_x(), __builtin_amdgcn_workitem_id_y(),
            __builtin_amdgcn_workitem_id_z()};
}
static __device__ __forceinline__ flex_hip_dim3 flex_hip_block_idx() {
    return {__builtin_amdgcn_workgroup_id_x(), __builtin_amdgcn_workgroup_id_y(),
            __builtin_amdgcn_workgroup_id_z()};
}
static __device__ __forceinline__ flex_hip_dim3 flex_hip_block_dim() {
    const unsigned short *wg = (const unsigned short *)(flex_hip_packet() + 4);
    return {wg[0], wg[1], wg[2]};
}
static __device__ __forceinline__ flex_hip_dim3 flex_hip_grid_dim() {
    const unsigned *grid = (const unsigned *)(flex_hip_packet() + 12);
    const flex_hip_dim3 wg = flex_hip_block_dim();
    return {grid[0] / wg.x, grid[1] / wg.y, grid[2] / wg.z};
}
#define threadIdx (flex_hip_thread_idx())
#define blockIdx  (flex_hip_block_idx())
#define blockDim  (flex_hip_block_dim())
#define gridDim   (flex_hip_grid_dim())

static __device__ __forceinline__ void __syncthreads() {
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
    __builtin_amdgcn_s_barrier();
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}
extern "C" __device__ int __ockl_wgred_or_i32(int);
static __device__ __forceinline__ int __syncthreads_or(int p) {
    return __ockl_wgred_or_i32(p);
}
static __device__ __forceinline__ unsigned atomicOr(unsigned *p, unsigned v) {
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
static __device__ __forceinline__ float atomicAdd(float *p, float v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* Cross-lane reads through ds_bpermute, within groups of `width` lanes. */
static __device__ __forceinline__ int flex_hip_lane_id() {
#if __AMDGCN_WAVEFRONT_SIZE == 64
    return (int)__builtin_amdgcn_mbcnt_hi(~0u, __builtin_amdgcn_mbcnt_lo(~0u, 0u));
#else
    return (int)__builtin_amdgcn_mbcnt_lo(~0u, 0u);
#endif
}
static __device__ __forceinline__ int __shfl(int v, int src, int width = __AMDGCN_WAVEFRONT_SIZE) {
    const int lane = flex_hip_lane_id();
    const int from = (lane & ~(width - 1)) | (src & (width - 1));
    return __builtin_amdgcn_ds_bpermute(from << 2, v);
}
static __device__ __forceinline__ float __shfl(float v, int src,
                                               int width = __AMDGCN_WAVEFRONT_SIZE) {
    return __builtin_bit_cast(float, __shfl(__builtin_bit_cast(int, v), src, width));
}
static __device__ __forceinline__ int __shfl_xor(int v, int mask,
                                                 int width = __AMDGCN_WAVEFRONT_SIZE) {
    return __shfl(v, (flex_hip_lane_id() ^ mask) & (width - 1), width);
}
static __device__ __forceinline__ float __shfl_xor(float v, int mask,
                                                   int width = __AMDGCN_WAVEFRONT_SIZE) {
    return __builtin_bit_cast(float, __shfl_xor(__builtin_bit_cast(int, v), mask, width));
}
static __device__ __forceinline__ int __any(int pred) {
#if __AMDGCN_WAVEFRONT_SIZE == 64
    return __builtin_amdgcn_ballot_w64(pred != 0) != 0;
#else
    return __builtin_amdgcn_ballot_w32(pred != 0) != 0;
#endif
}

/* Bits and IEEE-rounded operations (no contraction into fused ones). */
static __device__ __forceinline__ float __int_as_float(int x) {
    return __builtin_bit_cast(float, x);
}
static __device__ __forceinline__ int __float_as_int(float x) {
    return __builtin_bit_cast(int, x);
}
typedef _Float16 __half;
static __device__ __forceinline__ __half __ushort_as_half(unsigned short x) {
    return __builtin_bit_cast(__half, x);
}
static __device__ __forceinline__ float __half2float(__half x) {
    return (float)x;
}
static __device__ __forceinline__ float __fmul_rn(float a, float b) {
#pragma clang fp contract(off)
    return a * b;
}
static __device__ __forceinline__ float __fadd_rn(float a, float b) {
#pragma clang fp contract(off)
    return a + b;
}
static __device__ __forceinline__ float __fsub_rn(float a, float b) {
#pragma clang fp contract(off)
    return a - b;
}
static __device__ __forceinline__ float __fdiv_rn(float a, float b) {
    return a / b; /* HIP divides correctly rounded unless told otherwise */
}
static __device__ __forceinline__ float __fmaf_rn(float a, float b, float c) {
    return __builtin_fmaf(a, b, c);
}
static __device__ __forceinline__ int min(int a, int b) {
    return a < b ? a : b;
}
static __device__ __forceinline__ int max(int a, int b) {
    return a > b ? a : b;
}

/* Math: the device library's functions, as HIP's headers call them. */
#define FLEX_HIP_OCML1(name, ocml)                                                                 \
    extern "C" __device__ float ocml(float);                                                       \
    static __device__ __forceinline__ float name(float x) {                                        \
        return ocml(x);                                                                            \
    }
#define FLEX_HIP_OCML2(name, ocml)                                                                 \
    extern "C" __device__ float ocml(float, float);                                                \
    static __device__ __forceinline__ float name(float x, float y) {                               \
        return ocml(x, y);                                                                         \
    }
FLEX_HIP_OCML1(expf, __ocml_exp_f32)
FLEX_HIP_OCML1(exp2f, __ocml_exp2_f32)
FLEX_HIP_OCML1(logf, __ocml_log_f32)
FLEX_HIP_OCML1(log2f, __ocml_log2_f32)
FLEX_HIP_OCML1(sinf, __ocml_sin_f32)
FLEX_HIP_OCML1(cosf, __ocml_cos_f32)
FLEX_HIP_OCML1(tanf, __ocml_tan_f32)
FLEX_HIP_OCML1(tanhf, __ocml_tanh_f32)
FLEX_HIP_OCML1(sqrtf, __ocml_sqrt_f32)
FLEX_HIP_OCML2(powf, __ocml_pow_f32)
FLEX_HIP_OCML2(fmodf, __ocml_fmod_f32)
static __device__ __forceinline__ float floorf(float x) {
    return __builtin_floorf(x);
}
static __device__ __forceinline__ float ceilf(float x) {
    return __builtin_ceilf(x);
}
static __device__ __forceinline__ float fabsf(float x) {
    return __builtin_fabsf(x);
}
static __device__ __forceinline__ float fmaxf(float a, float b) {
    return __builtin_fmaxf(a, b);
}
static __device__ __forceinline__ float fminf(float a, float b) {
    return __builtin_fminf(a, b);
}
static __device__ __forceinline__ float fmaf(float a, float b, float c) {
    return __builtin_fmaf(a, b, c);
}
static __device__ __forceinline__ float rintf(float x) {
    return __builtin_rintf(x);
}

#endif /* !__HIPCC_RTC__ */
#endif /* FLEX_HIP_RUNTIME_CUH */
