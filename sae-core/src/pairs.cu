// TopK's pair rows on CUDA (sae-core/src/pairs.rs): acc[features[p], c] += coef[p] * rows[p / k, c]
// for every pair p and column c, one thread per (pair, column), grid-strided. Compiled at run
// time by NVRTC; `scripts/check_cuda_build.sh` compiles it with nvcc too.
extern "C" __global__ void pair_rows_add(
    float *acc, const unsigned int *features, const float *coef, const float *rows,
    unsigned long long pairs, unsigned long long k, unsigned long long width) {
  unsigned long long total = pairs * width;
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    unsigned long long p = i / width;
    unsigned long long c = i - p * width;
    float a = coef[p];
    if (a != 0.0f) {
      atomicAdd(acc + (unsigned long long)features[p] * width + c, a * rows[(p / k) * width + c]);
    }
  }
}
