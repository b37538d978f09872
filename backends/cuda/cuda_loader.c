/*
 * dlopen of the CUDA driver (libcuda.so.1) and of NVRTC. Nothing from a CUDA
 * toolkit is needed to build this file: the types are our own
 * (cuda_loader.h) and symbols are looked up by name. Each library is loaded
 * once per process (pthread_once) and kept loaded: unloading the driver
 * while contexts may exist is never safe.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_loader.h"

static flex_cuda_api api_table;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT, nvrtc_once = PTHREAD_ONCE_INIT;
static int driver_ok, nvrtc_ok;
static char driver_why[256], nvrtc_why[512];

#define LOAD_SYM(lib, field, name, why, cap)                                                       \
    do {                                                                                           \
        *(void **)(&api_table.field) = dlsym(lib, name);                                           \
        if (!api_table.field) {                                                                    \
            snprintf(why, cap, "%s lacks the symbol %s (driver too old?)", #lib, name);            \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)

static int load_driver_symbols(void *libcuda) {
    char *w = driver_why;
    size_t c = sizeof driver_why;
    LOAD_SYM(libcuda, cuInit, "cuInit", w, c);
    LOAD_SYM(libcuda, cuDriverGetVersion, "cuDriverGetVersion", w, c);
    LOAD_SYM(libcuda, cuDeviceGetCount, "cuDeviceGetCount", w, c);
    LOAD_SYM(libcuda, cuDeviceGet, "cuDeviceGet", w, c);
    LOAD_SYM(libcuda, cuDeviceGetName, "cuDeviceGetName", w, c);
    LOAD_SYM(libcuda, cuDeviceGetAttribute, "cuDeviceGetAttribute", w, c);
    LOAD_SYM(libcuda, cuDeviceTotalMem, "cuDeviceTotalMem_v2", w, c);
    LOAD_SYM(libcuda, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", w, c);
    LOAD_SYM(libcuda, cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", w, c);
    LOAD_SYM(libcuda, cuCtxPushCurrent, "cuCtxPushCurrent_v2", w, c);
    LOAD_SYM(libcuda, cuCtxPopCurrent, "cuCtxPopCurrent_v2", w, c);
    LOAD_SYM(libcuda, cuCtxSynchronize, "cuCtxSynchronize", w, c);
    LOAD_SYM(libcuda, cuMemAlloc, "cuMemAlloc_v2", w, c);
    LOAD_SYM(libcuda, cuMemFree, "cuMemFree_v2", w, c);
    LOAD_SYM(libcuda, cuMemcpyHtoD, "cuMemcpyHtoD_v2", w, c);
    LOAD_SYM(libcuda, cuMemcpyDtoH, "cuMemcpyDtoH_v2", w, c);
    LOAD_SYM(libcuda, cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", w, c);
    LOAD_SYM(libcuda, cuMemsetD8, "cuMemsetD8_v2", w, c);
    LOAD_SYM(libcuda, cuMemsetD8Async, "cuMemsetD8Async", w, c);
    LOAD_SYM(libcuda, cuModuleLoadData, "cuModuleLoadData", w, c);
    LOAD_SYM(libcuda, cuModuleUnload, "cuModuleUnload", w, c);
    LOAD_SYM(libcuda, cuModuleGetFunction, "cuModuleGetFunction", w, c);
    LOAD_SYM(libcuda, cuFuncSetAttribute, "cuFuncSetAttribute", w, c);
    LOAD_SYM(libcuda, cuLaunchKernel, "cuLaunchKernel", w, c);
    LOAD_SYM(libcuda, cuStreamSynchronize, "cuStreamSynchronize", w, c);
    LOAD_SYM(libcuda, cuGetErrorName, "cuGetErrorName", w, c);
    LOAD_SYM(libcuda, cuGetErrorString, "cuGetErrorString", w, c);
    *(void **)(&api_table.cuTensorMapEncodeTiled) = dlsym(libcuda, "cuTensorMapEncodeTiled");
    *(void **)(&api_table.cuFuncGetAttribute) = dlsym(libcuda, "cuFuncGetAttribute");
    *(void **)(&api_table.cuMemAllocAsync) = dlsym(libcuda, "cuMemAllocAsync");
    *(void **)(&api_table.cuMemFreeAsync) = dlsym(libcuda, "cuMemFreeAsync");
    *(void **)(&api_table.cuStreamIsCapturing) = dlsym(libcuda, "cuStreamIsCapturing");
    *(void **)(&api_table.cuStreamCreate) = dlsym(libcuda, "cuStreamCreate");
    *(void **)(&api_table.cuStreamDestroy) = dlsym(libcuda, "cuStreamDestroy_v2");
    *(void **)(&api_table.cuStreamBeginCapture) = dlsym(libcuda, "cuStreamBeginCapture_v2");
    *(void **)(&api_table.cuStreamEndCapture) = dlsym(libcuda, "cuStreamEndCapture");
    *(void **)(&api_table.cuGraphInstantiate) = dlsym(libcuda, "cuGraphInstantiateWithFlags");
    *(void **)(&api_table.cuGraphLaunch) = dlsym(libcuda, "cuGraphLaunch");
    *(void **)(&api_table.cuGraphExecDestroy) = dlsym(libcuda, "cuGraphExecDestroy");
    *(void **)(&api_table.cuGraphDestroy) = dlsym(libcuda, "cuGraphDestroy");
    return 0;
}

static void driver_load_once(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(driver_why, sizeof driver_why, "libcuda.so.1 not found (no NVIDIA driver)");
        return;
    }
    if (load_driver_symbols(lib) != 0) return;
    api_table.libcuda = lib;
    CUresult r = api_table.cuInit(0);
    if (r != 0) {
        const char *name = NULL;
        api_table.cuGetErrorName(r, &name);
        snprintf(driver_why, sizeof driver_why, "cuInit failed: %s (driver present, no usable GPU)",
                 name ? name : "unknown error");
        return;
    }
    int count = 0;
    r = api_table.cuDeviceGetCount(&count);
    if (r != 0 || count <= 0) {
        snprintf(driver_why, sizeof driver_why, "the CUDA driver reports no GPU");
        return;
    }
    driver_ok = 1;
}

static int load_nvrtc_symbols(void *libnvrtc) {
    char *w = nvrtc_why;
    size_t c = sizeof nvrtc_why;
    LOAD_SYM(libnvrtc, nvrtcVersion, "nvrtcVersion", w, c);
    LOAD_SYM(libnvrtc, nvrtcCreateProgram, "nvrtcCreateProgram", w, c);
    LOAD_SYM(libnvrtc, nvrtcDestroyProgram, "nvrtcDestroyProgram", w, c);
    LOAD_SYM(libnvrtc, nvrtcCompileProgram, "nvrtcCompileProgram", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetProgramLog, "nvrtcGetProgramLog", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetCUBINSize, "nvrtcGetCUBINSize", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetCUBIN, "nvrtcGetCUBIN", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetPTXSize, "nvrtcGetPTXSize", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetPTX, "nvrtcGetPTX", w, c);
    LOAD_SYM(libnvrtc, nvrtcGetErrorString, "nvrtcGetErrorString", w, c);
    return 0;
}

static void nvrtc_load_once(void) {
    /* The unversioned name first (a toolkit's own), then the sonames of the
     * releases we know, then the usual toolkit folders. */
    static const char *const names[] = {"libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"};
    void *lib = NULL;
    for (size_t i = 0; !lib && i < sizeof names / sizeof names[0]; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    const char *dirs[2] = {getenv("CUDA_HOME"), "/usr/local/cuda"};
    for (int d = 0; !lib && d < 2; d++) {
        if (!dirs[d] || !*dirs[d]) continue;
        for (size_t i = 0; !lib && i < sizeof names / sizeof names[0]; i++) {
            char path[1024];
            snprintf(path, sizeof path, "%s/lib64/%s", dirs[d], names[i]);
            lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        }
    }
    if (!lib) {
        snprintf(nvrtc_why, sizeof nvrtc_why,
                 "libnvrtc not found (tried libnvrtc.so, .so.13, .so.12 on the library path, "
                 "in $CUDA_HOME/lib64 and /usr/local/cuda/lib64)");
        return;
    }
    if (load_nvrtc_symbols(lib) != 0) return;
    api_table.libnvrtc = lib;
    if (api_table.nvrtcVersion(&api_table.nvrtc_major, &api_table.nvrtc_minor) != 0) {
        snprintf(nvrtc_why, sizeof nvrtc_why, "nvrtcVersion failed");
        return;
    }
    nvrtc_ok = 1;
}

int flex_cuda_load_driver(const flex_cuda_api **api, char *why, size_t why_cap) {
    pthread_once(&driver_once, driver_load_once);
    if (!driver_ok) {
        if (why && why_cap) snprintf(why, why_cap, "%s", driver_why);
        return -1;
    }
    *api = &api_table;
    return 0;
}

int flex_cuda_load_nvrtc(const flex_cuda_api **api, char *why, size_t why_cap) {
    pthread_once(&nvrtc_once, nvrtc_load_once);
    if (!nvrtc_ok) {
        if (why && why_cap) snprintf(why, why_cap, "%s", nvrtc_why);
        return -1;
    }
    *api = &api_table;
    return 0;
}

void flex_cuda_describe(const flex_cuda_api *api, CUresult r, char *buf, size_t cap) {
    const char *name = NULL, *text = NULL;
    if (api && api->cuGetErrorName) api->cuGetErrorName(r, &name);
    if (api && api->cuGetErrorString) api->cuGetErrorString(r, &text);
    snprintf(buf, cap, "%s (%d): %s", name ? name : "CUDA error", r,
             text ? text : "no description");
}
