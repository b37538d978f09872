/*
 * The HIP runtime (libamdhip64) and hiprtc entry points the backend uses,
 * declared with our own types so that the library builds without ROCm; the
 * libraries are opened with dlopen at run time (hip_loader.c).
 */
#ifndef FLEXATTN_HIP_LOADER_H
#define FLEXATTN_HIP_LOADER_H

#include <stddef.h>

typedef int hipError_t; /* 0 = hipSuccess */
typedef void *hipDeviceptr_t;
typedef struct ihipModule_t *hipModule_t;
typedef struct ihipModuleSymbol_t *hipFunction_t;
typedef struct ihipStream_t *hipStream_t;
typedef int hiprtcResult; /* 0 = HIPRTC_SUCCESS */
typedef struct _hiprtcProgram *hiprtcProgram;

enum {
    FLEX_HIP_ERROR_OUT_OF_MEMORY = 2, /* hipErrorOutOfMemory */
    /* hipModuleLaunchKernel's `extra` keys */
    FLEX_HIP_LAUNCH_PARAM_BUFFER_POINTER = 1,
    FLEX_HIP_LAUNCH_PARAM_BUFFER_SIZE = 2,
    FLEX_HIP_LAUNCH_PARAM_END = 3,
};

typedef struct flex_hip_api {
    void *libhip, *libhiprtc;
    hipError_t (*hipInit)(unsigned flags);
    hipError_t (*hipDriverGetVersion)(int *version);
    hipError_t (*hipGetDeviceCount)(int *count);
    hipError_t (*hipSetDevice)(int device);
    hipError_t (*hipDeviceGetName)(char *name, int len, int device);
    /* hipDeviceProp_t's layout differs between ROCm releases: the backend
     * passes a large zeroed buffer and reads only gcnArchName from it. */
    hipError_t (*hipGetDeviceProperties)(void *props, int device);
    hipError_t (*hipDeviceSynchronize)(void);
    hipError_t (*hipStreamSynchronize)(hipStream_t stream);
    hipError_t (*hipMalloc)(void **ptr, size_t bytes);
    hipError_t (*hipFree)(void *ptr);
    /* Stream-ordered allocation (ROCm 5.2 and later); NULL where absent. */
    hipError_t (*hipMallocAsync)(void **ptr, size_t bytes, hipStream_t stream);
    hipError_t (*hipFreeAsync)(void *ptr, hipStream_t stream);
    hipError_t (*hipMemcpyHtoD)(hipDeviceptr_t dst, const void *src, size_t bytes);
    hipError_t (*hipMemcpyDtoH)(void *dst, hipDeviceptr_t src, size_t bytes);
    hipError_t (*hipMemsetD8)(hipDeviceptr_t dst, unsigned char value, size_t count);
    hipError_t (*hipModuleLoadData)(hipModule_t *module, const void *image);
    hipError_t (*hipModuleUnload)(hipModule_t module);
    hipError_t (*hipModuleGetFunction)(hipFunction_t *fn, hipModule_t module, const char *name);
    hipError_t (*hipModuleLaunchKernel)(hipFunction_t fn, unsigned gx, unsigned gy, unsigned gz,
                                        unsigned bx, unsigned by, unsigned bz, unsigned smem,
                                        hipStream_t stream, void **params, void **extra);
    const char *(*hipGetErrorName)(hipError_t err);
    const char *(*hipGetErrorString)(hipError_t err);
    /* hiprtc */
    hiprtcResult (*hiprtcVersion)(int *major, int *minor);
    hiprtcResult (*hiprtcCreateProgram)(hiprtcProgram *prog, const char *src, const char *name,
                                        int num_headers, const char *const *headers,
                                        const char *const *include_names);
    hiprtcResult (*hiprtcDestroyProgram)(hiprtcProgram *prog);
    hiprtcResult (*hiprtcCompileProgram)(hiprtcProgram prog, int num_options,
                                         const char *const *options);
    hiprtcResult (*hiprtcGetProgramLogSize)(hiprtcProgram prog, size_t *size);
    hiprtcResult (*hiprtcGetProgramLog)(hiprtcProgram prog, char *log);
    hiprtcResult (*hiprtcGetCodeSize)(hiprtcProgram prog, size_t *size);
    hiprtcResult (*hiprtcGetCode)(hiprtcProgram prog, char *code);
    const char *(*hiprtcGetErrorString)(hiprtcResult result);
    int hiprtc_major, hiprtc_minor;
} flex_hip_api;

/*
 * Loads libamdhip64 and calls hipInit (flex_hip_load_runtime), and hiprtc
 * (flex_hip_load_rtc, which needs the runtime), once per process; later
 * calls return the same result. On success *api points to a static table
 * valid for the process. On failure returns -1 and writes the reason in
 * words to why.
 */
int flex_hip_load_runtime(const flex_hip_api **api, char *why, size_t why_cap);
int flex_hip_load_rtc(const flex_hip_api **api, char *why, size_t why_cap);

/* "hipErrorX (code): description" of a result. */
void flex_hip_describe(const flex_hip_api *api, hipError_t r, char *buf, size_t cap);

#endif /* FLEXATTN_HIP_LOADER_H */
