// TopK's pairs on CUDA (sae-core/src/pairs.rs). pair_rows_add: acc[features[p], c] +=
// coef[p] * rows[p / k, c] for every pair p and column c, one thread per (pair, column),
// grid-strided, with atomic adds. Compiled at run time by NVRTC; `scripts/check_cuda_build.sh`
// compiles it with nvcc too.
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

// W_dec's elements as f32: f32 weights as they are, bf16 ones (`DeviceOptions::weights`, their raw
// 16-bit words) widened exactly.
__device__ float load(const float *w, unsigned long long i) { return w[i]; }
__device__ float load(const unsigned short *w, unsigned long long i) {
  return __uint_as_float(((unsigned int)w[i]) << 16);
}

// The pairs' decode: out[t, c] = sum_j coef[t * k + j] * w[features[t * k + j] * width + c], one
// thread per (token, column), the pairs in order (no atomics: the same bits on every run).
template <typename W>
__device__ void decode(float *out, const unsigned int *features, const float *coef, const W *w,
                       unsigned long long tokens, unsigned long long k, unsigned long long width) {
  unsigned long long total = tokens * width;
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    unsigned long long t = i / width;
    unsigned long long c = i - t * width;
    float sum = 0.0f;
    for (unsigned long long j = 0; j < k; j++) {
      float a = coef[t * k + j];
      if (a != 0.0f) sum += a * load(w, (unsigned long long)features[t * k + j] * width + c);
    }
    out[i] = sum;
  }
}

// The pairs' dot products: out[p] = sum_c d[(p / k) * width + c] * w[features[p] * width + c],
// one thread per pair, the columns in order.
template <typename W>
__device__ void dots(float *out, const unsigned int *features, const float *d, const W *w,
                     unsigned long long pairs, unsigned long long k, unsigned long long width) {
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long p = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
       p < pairs; p += stride) {
    unsigned long long row = (unsigned long long)features[p] * width;
    const float *dt = d + (p / k) * width;
    float sum = 0.0f;
    for (unsigned long long c = 0; c < width; c++) sum += dt[c] * load(w, row + c);
    out[p] = sum;
  }
}

extern "C" __global__ void pair_decode(float *out, const unsigned int *features, const float *coef,
                                       const float *w, unsigned long long tokens,
                                       unsigned long long k, unsigned long long width) {
  decode(out, features, coef, w, tokens, k, width);
}

extern "C" __global__ void pair_decode_w16(float *out, const unsigned int *features,
                                           const float *coef, const unsigned short *w,
                                           unsigned long long tokens, unsigned long long k,
                                           unsigned long long width) {
  decode(out, features, coef, w, tokens, k, width);
}

extern "C" __global__ void pair_dots(float *out, const unsigned int *features, const float *d,
                                     const float *w, unsigned long long pairs,
                                     unsigned long long k, unsigned long long width) {
  dots(out, features, d, w, pairs, k, width);
}

extern "C" __global__ void pair_dots_w16(float *out, const unsigned int *features, const float *d,
                                         const unsigned short *w, unsigned long long pairs,
                                         unsigned long long k, unsigned long long width) {
  dots(out, features, d, w, pairs, k, width);
}
