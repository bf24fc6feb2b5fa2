// CUDA error checks of the CUDA backend (cpp/cuda only): failures become medusa_rt errors.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "medusa_rt/errors.h"

namespace medusa_rt {
namespace cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a sticky launch error so the next call reports its own
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

}  // namespace cuda
}  // namespace medusa_rt

#define MRT_CUDA_CHECK(call) ::medusa_rt::cuda::check((call), #call)
#define MRT_CUDA_LAUNCHED(name) ::medusa_rt::cuda::check(cudaGetLastError(), name)
