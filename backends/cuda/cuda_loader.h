/*
 * The few CUDA driver and NVRTC entry points the backend uses, declared here
 * with our own types so that the library builds without a CUDA toolkit; the
 * libraries are opened with dlopen at run time (cuda_loader.c).
 */
#ifndef FLEXATTN_CUDA_LOADER_H
#define FLEXATTN_CUDA_LOADER_H

#include <stddef.h>
#include <stdint.h>

typedef int CUresult; /* 0 = CUDA_SUCCESS */
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphExec_st *CUgraphExec;
typedef int nvrtcResult; /* 0 = NVRTC_SUCCESS */
typedef struct _nvrtcProgram *nvrtcProgram;

/* Values of the driver's enums that we use (stable across driver versions). */
enum {
    FLEX_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    FLEX_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    FLEX_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    FLEX_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    FLEX_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
    FLEX_CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    FLEX_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    FLEX_CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    FLEX_CU_FUNC_ATTRIBUTE_NUM_REGS = 4,
    FLEX_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    FLEX_CU_EVENT_DEFAULT = 0,
    FLEX_CU_TENSOR_MAP_DATA_TYPE_UINT16 = 1,
    FLEX_CU_TENSOR_MAP_DATA_TYPE_UINT32 = 2,
    FLEX_CU_TENSOR_MAP_INTERLEAVE_NONE = 0,
    FLEX_CU_TENSOR_MAP_SWIZZLE_NONE = 0,
    FLEX_CU_TENSOR_MAP_SWIZZLE_128B = 3,
    FLEX_CU_TENSOR_MAP_L2_PROMOTION_L2_128B = 2,
    FLEX_CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0, /* out-of-range elements read as zero */
    FLEX_CU_STREAM_NON_BLOCKING = 1,
    FLEX_CU_STREAM_CAPTURE_STATUS_NONE = 0, /* _ACTIVE 1, _INVALIDATED 2 */
    FLEX_CU_STREAM_CAPTURE_MODE_GLOBAL = 0,
};

typedef struct flex_cuda_api {
    void *libcuda, *libnvrtc;
    /* driver */
    CUresult (*cuInit)(unsigned flags);
    CUresult (*cuDriverGetVersion)(int *version);
    CUresult (*cuDeviceGetCount)(int *count);
    CUresult (*cuDeviceGet)(CUdevice *dev, int ordinal);
    CUresult (*cuDeviceGetName)(char *name, int len, CUdevice dev);
    CUresult (*cuDeviceGetAttribute)(int *value, int attrib, CUdevice dev);
    CUresult (*cuDeviceTotalMem)(size_t *bytes, CUdevice dev);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *ctx, CUdevice dev);
    CUresult (*cuDevicePrimaryCtxRelease)(CUdevice dev);
    CUresult (*cuCtxPushCurrent)(CUcontext ctx);
    CUresult (*cuCtxPopCurrent)(CUcontext *ctx);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuMemAlloc)(CUdeviceptr *ptr, size_t bytes);
    CUresult (*cuMemFree)(CUdeviceptr ptr);
    CUresult (*cuMemcpyHtoD)(CUdeviceptr dst, const void *src, size_t bytes);
    CUresult (*cuMemcpyDtoH)(void *dst, CUdeviceptr src, size_t bytes);
    CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void *src, size_t bytes, CUstream s);
    CUresult (*cuMemsetD8)(CUdeviceptr dst, unsigned char value, size_t count);
    CUresult (*cuMemsetD8Async)(CUdeviceptr dst, unsigned char value, size_t count, CUstream s);
    CUresult (*cuModuleLoadData)(CUmodule *mod, const void *image);
    CUresult (*cuModuleUnload)(CUmodule mod);
    CUresult (*cuModuleGetFunction)(CUfunction *fn, CUmodule mod, const char *name);
    CUresult (*cuFuncSetAttribute)(CUfunction fn, int attrib, int value);
    CUresult (*cuLaunchKernel)(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                               unsigned by, unsigned bz, unsigned smem, CUstream stream,
                               void **params, void **extra);
    CUresult (*cuStreamSynchronize)(CUstream stream);
    CUresult (*cuGetErrorName)(CUresult err, const char **str);
    CUresult (*cuGetErrorString)(CUresult err, const char **str);
    /* (optional) a function's attribute, for the error of a failed launch */
    CUresult (*cuFuncGetAttribute)(int *value, int attrib, CUfunction fn);
    /* (optional: NULL before CUDA 11.2) the stream-ordered allocator. */
    CUresult (*cuMemAllocAsync)(CUdeviceptr *ptr, size_t bytes, CUstream s);
    CUresult (*cuMemFreeAsync)(CUdeviceptr ptr, CUstream s);
    /* (optional: NULL where the driver lacks it) a tiled TMA descriptor */
    CUresult (*cuTensorMapEncodeTiled)(void *tensor_map, int data_type, unsigned rank,
                                       void *global_address, const unsigned long long *global_dim,
                                       const unsigned long long *global_strides,
                                       const unsigned *box_dim, const unsigned *element_strides,
                                       int interleave, int swizzle, int l2_promotion, int oob_fill);
    /* (optional: NULL before CUDA 10.0 / 11.4) streams and CUDA graphs:
     * whether a stream is being captured (the backend then refuses what a
     * capture does not allow), and what a caller or test needs to capture
     * and replay one. cuStreamBeginCapture is the _v2 entry (with a mode),
     * cuGraphInstantiate the WithFlags one. */
    CUresult (*cuStreamIsCapturing)(CUstream s, int *status);
    CUresult (*cuStreamCreate)(CUstream *s, unsigned flags);
    CUresult (*cuStreamDestroy)(CUstream s);
    CUresult (*cuStreamBeginCapture)(CUstream s, int mode);
    CUresult (*cuStreamEndCapture)(CUstream s, CUgraph *graph);
    CUresult (*cuGraphInstantiate)(CUgraphExec *exec, CUgraph graph, unsigned long long flags);
    CUresult (*cuGraphLaunch)(CUgraphExec exec, CUstream s);
    CUresult (*cuGraphExecDestroy)(CUgraphExec exec);
    CUresult (*cuGraphDestroy)(CUgraph graph);
    /* NVRTC */
    nvrtcResult (*nvrtcVersion)(int *major, int *minor);
    nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram *prog, const char *src, const char *name,
                                      int num_headers, const char *const *headers,
                                      const char *const *include_names);
    nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram *prog);
    nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram prog, int num_options,
                                       const char *const *options);
    nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram prog, size_t *size);
    nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram prog, char *log);
    nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram prog, size_t *size);
    nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram prog, char *cubin);
    nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram prog, size_t *size);
    nvrtcResult (*nvrtcGetPTX)(nvrtcProgram prog, char *ptx);
    const char *(*nvrtcGetErrorString)(nvrtcResult result);
    int nvrtc_major, nvrtc_minor;
} flex_cuda_api;

/*
 * Loads libcuda.so.1 and calls cuInit (need_driver != 0), and libnvrtc
 * (need_nvrtc != 0), once per process; later calls return the same result.
 * On success *api points to a static table valid for the process. On failure
 * returns -1 and writes the reason in words to why.
 */
int flex_cuda_load_driver(const flex_cuda_api **api, char *why, size_t why_cap);
int flex_cuda_load_nvrtc(const flex_cuda_api **api, char *why, size_t why_cap);

/* "CUDA_ERROR_X: description" for a driver result; static or api-owned. */
void flex_cuda_describe(const flex_cuda_api *api, CUresult r, char *buf, size_t cap);

#endif /* FLEXATTN_CUDA_LOADER_H */
