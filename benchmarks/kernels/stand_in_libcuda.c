/* A stand-in CUDA driver (libcuda.so.1) for compiling Mosaic GPU kernels on a machine without a GPU.

   benchmarks/kernels/kernel_sass.py builds it with the machine's C compiler and puts it first on
   LD_LIBRARY_PATH. MosaicGpuCompile asks the driver for the device's compute capability before
   it runs ptxas; these answers describe one sm_90 device (an H100/H200). Loading a module fails,
   so nothing compiled is ever run. */

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

CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  *value = attribute == COMPUTE_CAPABILITY_MAJOR ? 9 : 0;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int length, int device) {
  strncpy(name, "stand-in sm_90", length);
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
