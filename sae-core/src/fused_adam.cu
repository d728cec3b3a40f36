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
