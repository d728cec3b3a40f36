// Adam's update in three element-wise passes (sae-core/src/fused_adam.rs), one thread per element,
// grid-strided: each moment in place from the gradient and the clip factor, then the weights from
// the moments. The moments are f32 or bf16 (kept as raw 16-bit words, rounded to nearest even as
// candle rounds); the arithmetic is f32 in the order of the tensor ops it replaces. Compiled at run
// time by NVRTC; `scripts/check_cuda_build.sh` compiles it with nvcc too.

__device__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ unsigned short f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// moment = moment * beta + g * one_minus, g = grad * clip[0] (squared for the second moment).
__device__ float moment_of(float old, float grad, float clip, float beta, float one_minus, int square) {
  float g = grad * clip;
  if (square) g = g * g;
  return old * beta + g * one_minus;
}

extern "C" __global__ void adam_moment_f32(float *m, const float *grad, const float *clip, float beta,
                                           float one_minus, int square, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    m[i] = moment_of(m[i], grad[i], clip[0], beta, one_minus, square);
  }
}

extern "C" __global__ void adam_moment_bf16(unsigned short *m, const float *grad, const float *clip,
                                            float beta, float one_minus, int square,
                                            unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    m[i] = f32_to_bf16(moment_of(bf16_to_f32(m[i]), grad[i], clip[0], beta, one_minus, square));
  }
}

// w = w - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * step_size
__device__ float updated(float w, float m, float v, float step_size, float inv_sqrt_bc2, float eps) {
  float denom = sqrtf(v) * inv_sqrt_bc2 + eps;
  return w - (m / denom) * step_size;
}

extern "C" __global__ void adam_update_f32(float *w, const float *m, const float *v, float step_size,
                                           float inv_sqrt_bc2, float eps, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    w[i] = updated(w[i], m[i], v[i], step_size, inv_sqrt_bc2, eps);
  }
}

extern "C" __global__ void adam_update_bf16(float *w, const unsigned short *m,
                                            const unsigned short *v, float step_size,
                                            float inv_sqrt_bc2, float eps, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    w[i] = updated(w[i], bf16_to_f32(m[i]), bf16_to_f32(v[i]), step_size, inv_sqrt_bc2, eps);
  }
}

// bf16 weights (`DeviceOptions::weights`): the update is computed in f32 from the stored bf16
// weight and rounded back stochastically, up in magnitude with the probability of the fraction
// that bf16 drops, so that updates far below bf16's resolution still count on average. The random
// 16 bits are a hash of (seed, element): the same bits on every run, device and replica.
__device__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ unsigned short f32_to_bf16_stochastic(float f, unsigned long long seed,
                                                 unsigned long long i) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
  if ((u & 0x7fffffffu) == 0x7f800000u) return (unsigned short)(u >> 16);          // and infinity
  unsigned int r = (unsigned int)(mix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull) >> 48);
  return (unsigned short)((u + r) >> 16);
}

extern "C" __global__ void adam_update_f32_w16(unsigned short *w, const float *m, const float *v,
                                               float step_size, float inv_sqrt_bc2, float eps,
                                               unsigned long long seed, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float nw = updated(bf16_to_f32(w[i]), m[i], v[i], step_size, inv_sqrt_bc2, eps);
    w[i] = f32_to_bf16_stochastic(nw, seed, i);
  }
}

extern "C" __global__ void adam_update_bf16_w16(unsigned short *w, const unsigned short *m,
                                                const unsigned short *v, float step_size,
                                                float inv_sqrt_bc2, float eps,
                                                unsigned long long seed, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float nw = updated(bf16_to_f32(w[i]), bf16_to_f32(m[i]), bf16_to_f32(v[i]), step_size,
                       inv_sqrt_bc2, eps);
    w[i] = f32_to_bf16_stochastic(nw, seed, i);
  }
}
