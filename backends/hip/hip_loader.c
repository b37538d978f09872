/*
 * dlopen of the HIP runtime (libamdhip64) and of hiprtc. Nothing from ROCm
 * is needed to build this file: the types are our own (hip_loader.h) and
 * symbols are looked up by name. Each library is loaded once per process
 * (pthread_once) and kept loaded.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hip_loader.h"

static flex_hip_api api_table;
static pthread_once_t runtime_once = PTHREAD_ONCE_INIT, rtc_once = PTHREAD_ONCE_INIT;
static int runtime_ok, rtc_ok;
static char runtime_why[256], rtc_why[512];

#define LOAD_SYM(lib, libname, field, name, why)                                                   \
    do {                                                                                           \
        *(void **)(&api_table.field) = dlsym(lib, name);                                           \
        if (!api_table.field) {                                                                    \
            snprintf(why, sizeof why, "%s lacks the symbol %s (ROCm too old?)", libname, name);    \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)

static int load_runtime_symbols(void *lib) {
    const char *n = "libamdhip64";
    LOAD_SYM(lib, n, hipInit, "hipInit", runtime_why);
    LOAD_SYM(lib, n, hipDriverGetVersion, "hipDriverGetVersion", runtime_why);
    LOAD_SYM(lib, n, hipGetDeviceCount, "hipGetDeviceCount", runtime_why);
    LOAD_SYM(lib, n, hipSetDevice, "hipSetDevice", runtime_why);
    LOAD_SYM(lib, n, hipDeviceGetName, "hipDeviceGetName", runtime_why);
    /* ROCm 6 renamed the structure's getter; the old name stays for old ones. */
    *(void **)(&api_table.hipGetDeviceProperties) = dlsym(lib, "hipGetDevicePropertiesR0600");
    if (!api_table.hipGetDeviceProperties)
        LOAD_SYM(lib, n, hipGetDeviceProperties, "hipGetDeviceProperties", runtime_why);
    LOAD_SYM(lib, n, hipDeviceSynchronize, "hipDeviceSynchronize", runtime_why);
    LOAD_SYM(lib, n, hipStreamSynchronize, "hipStreamSynchronize", runtime_why);
    LOAD_SYM(lib, n, hipMalloc, "hipMalloc", runtime_why);
    LOAD_SYM(lib, n, hipFree, "hipFree", runtime_why);
    /* optional: both or neither */
    *(void **)(&api_table.hipMallocAsync) = dlsym(lib, "hipMallocAsync");
    *(void **)(&api_table.hipFreeAsync) = dlsym(lib, "hipFreeAsync");
    if (!api_table.hipMallocAsync || !api_table.hipFreeAsync)
        api_table.hipMallocAsync = NULL, api_table.hipFreeAsync = NULL;
    LOAD_SYM(lib, n, hipMemcpyHtoD, "hipMemcpyHtoD", runtime_why);
    LOAD_SYM(lib, n, hipMemcpyDtoH, "hipMemcpyDtoH", runtime_why);
    LOAD_SYM(lib, n, hipMemsetD8, "hipMemsetD8", runtime_why);
    LOAD_SYM(lib, n, hipModuleLoadData, "hipModuleLoadData", runtime_why);
    LOAD_SYM(lib, n, hipModuleUnload, "hipModuleUnload", runtime_why);
    LOAD_SYM(lib, n, hipModuleGetFunction, "hipModuleGetFunction", runtime_why);
    LOAD_SYM(lib, n, hipModuleLaunchKernel, "hipModuleLaunchKernel", runtime_why);
    LOAD_SYM(lib, n, hipGetErrorName, "hipGetErrorName", runtime_why);
    LOAD_SYM(lib, n, hipGetErrorString, "hipGetErrorString", runtime_why);
    return 0;
}

static void runtime_load_once(void) {
    static const char *const names[] = {"libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5",
                                        "/opt/rocm/lib/libamdhip64.so"};
    void *lib = NULL;
    for (size_t i = 0; !lib && i < sizeof names / sizeof names[0]; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(runtime_why, sizeof runtime_why,
                 "libamdhip64 not found (no ROCm HIP runtime: tried libamdhip64.so, .so.6, .so.5 "
                 "and /opt/rocm/lib)");
        return;
    }
    if (load_runtime_symbols(lib) != 0) return;
    api_table.libhip = lib;
    const hipError_t r = api_table.hipInit(0);
    if (r != 0) {
        snprintf(runtime_why, sizeof runtime_why,
                 "hipInit failed: %s (runtime present, no usable AMD GPU)",
                 api_table.hipGetErrorName(r));
        return;
    }
    int count = 0;
    if (api_table.hipGetDeviceCount(&count) != 0 || count <= 0) {
        snprintf(runtime_why, sizeof runtime_why, "the HIP runtime reports no AMD GPU");
        return;
    }
    runtime_ok = 1;
}

static int load_rtc_symbols(void *lib, const char *n) {
    LOAD_SYM(lib, n, hiprtcVersion, "hiprtcVersion", rtc_why);
    LOAD_SYM(lib, n, hiprtcCreateProgram, "hiprtcCreateProgram", rtc_why);
    LOAD_SYM(lib, n, hiprtcDestroyProgram, "hiprtcDestroyProgram", rtc_why);
    LOAD_SYM(lib, n, hiprtcCompileProgram, "hiprtcCompileProgram", rtc_why);
    LOAD_SYM(lib, n, hiprtcGetProgramLogSize, "hiprtcGetProgramLogSize", rtc_why);
    LOAD_SYM(lib, n, hiprtcGetProgramLog, "hiprtcGetProgramLog", rtc_why);
    LOAD_SYM(lib, n, hiprtcGetCodeSize, "hiprtcGetCodeSize", rtc_why);
    LOAD_SYM(lib, n, hiprtcGetCode, "hiprtcGetCode", rtc_why);
    LOAD_SYM(lib, n, hiprtcGetErrorString, "hiprtcGetErrorString", rtc_why);
    return 0;
}

static void rtc_load_once(void) {
    /* ROCm 6 ships hiprtc on its own; ROCm 5 has it inside libamdhip64. */
    static const char *const names[] = {"libhiprtc.so", "libhiprtc.so.6", "libhiprtc.so.5",
                                        "/opt/rocm/lib/libhiprtc.so"};
    void *lib = NULL;
    const char *name = "libhiprtc";
    for (size_t i = 0; !lib && i < sizeof names / sizeof names[0]; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib && api_table.libhip && dlsym(api_table.libhip, "hiprtcCreateProgram")) {
        lib = api_table.libhip;
        name = "libamdhip64";
    }
    if (!lib) {
        snprintf(rtc_why, sizeof rtc_why,
                 "hiprtc not found (tried libhiprtc.so, .so.6, .so.5, /opt/rocm/lib and "
                 "libamdhip64 itself)");
        return;
    }
    if (load_rtc_symbols(lib, name) != 0) return;
    api_table.libhiprtc = lib;
    if (api_table.hiprtcVersion(&api_table.hiprtc_major, &api_table.hiprtc_minor) != 0) {
        snprintf(rtc_why, sizeof rtc_why, "hiprtcVersion failed");
        return;
    }
    rtc_ok = 1;
}

int flex_hip_load_runtime(const flex_hip_api **api, char *why, size_t why_cap) {
    pthread_once(&runtime_once, runtime_load_once);
    if (!runtime_ok) {
        if (why && why_cap) snprintf(why, why_cap, "%s", runtime_why);
        return -1;
    }
    *api = &api_table;
    return 0;
}

int flex_hip_load_rtc(const flex_hip_api **api, char *why, size_t why_cap) {
    pthread_once(&runtime_once, runtime_load_once);
    pthread_once(&rtc_once, rtc_load_once);
    if (!rtc_ok) {
        if (why && why_cap) snprintf(why, why_cap, "%s", rtc_why);
        return -1;
    }
    *api = &api_table;
    return 0;
}

void flex_hip_describe(const flex_hip_api *api, hipError_t r, char *buf, size_t cap) {
    const char *name = api && api->hipGetErrorName ? api->hipGetErrorName(r) : NULL;
    const char *text = api && api->hipGetErrorString ? api->hipGetErrorString(r) : NULL;
    snprintf(buf, cap, "%s (%d): %s", name ? name : "HIP error", r,
             text ? text : "no description");
}
