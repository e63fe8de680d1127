/* A stand-in CUDA driver (libcuda.so.1) for compiling Mosaic GPU kernels on a machine without a GPU.

   benchmarks/kernels/kernel_sass.py builds it with the machine's C compiler and puts it first on
   LD_LIBRARY_PATH. MosaicGpuCompile asks the driver for the device's compute capability before
   it runs ptxas, and compiles for it; these answers describe one device of the compute capability
   in $GPTOSS_STAND_IN_COMPUTE_CAPABILITY ("8.9": an RTX 4090 or L4; read at every question), by
   default 9.0 (an H100/H200). Loading a module fails, so nothing compiled is ever run. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_NO_DEVICE = 100 };
enum { COMPUTE_CAPABILITY_MAJOR = 75, COMPUTE_CAPABILITY_MINOR = 76 };

CUresult cuInit(unsigned int flags) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = 0; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void **context) { *context = (void *)1; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return CUDA_SUCCESS; }

static void compute_capability(int *major, int *minor) {
  const char *asked = getenv("GPTOSS_STAND_IN_COMPUTE_CAPABILITY");
  *major = 9;
  *minor = 0;
  if (asked != NULL && sscanf(asked, "%d.%d", major, minor) != 2) {
    *major = 9;
    *minor = 0;
  }
}

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  int major, minor;
  compute_capability(&major, &minor);
  *value = attribute == COMPUTE_CAPABILITY_MAJOR ? major : attribute == COMPUTE_CAPABILITY_MINOR ? minor : 0;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int length, int device) {
  int major, minor;
  compute_capability(&major, &minor);
  snprintf(name, length, "stand-in sm_%d%d", major, minor);
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = "the stand-in CUDA driver of benchmarks/kernels/kernel_sass.py loads no module";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **text) {
  *text = "CUDA_ERROR_NO_DEVICE";
  return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void **module, const void *image) { return CUDA_ERROR_NO_DEVICE; }

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned int num_options,
                            void *options, void **option_values) {
  return CUDA_ERROR_NO_DEVICE;
}
