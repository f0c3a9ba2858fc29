// Fused coupling-law kernels in CUDA C for CuPy (kernels/coupling/cupy_kernels.py); the maths is the NumPy
// reference nflow_np/flows/coupling_law.py, the layout the same as kernels/coupling/numba_cuda.py:
//
//   blocks of (32, ROWS) threads, one warp per row; lane l handles columns l, l + 32, ...
//   forward/inverse: the row's log-det is reduced with warp shuffles (in double);
//   backward: a tile of BACKWARD_ROWS rows per block, each lane sums dL/ds * g for its column
//   over its warp's rows, the ROWS warps are added in shared memory and written to
//   partial[block, column]; column_sum adds the blocks in order (no atomics: reproducible).
//
// Arrays are C-contiguous: x2, z2, d_out (n, d2); h, d_h (n, 2 d2) = [s_hat, t]; scale (d2).
// Affine law: s = scale * tanh(s_hat);  forward  z2 = x2 exp(s) + t,     logdet =  sum_j s_j
//                                       inverse  x2 = (z2 - t) exp(-s),  logdet = -sum_j s_j
// The additive law needs no kernel of its own (CuPy's x2 + h is already one pass).
// Every kernel exists for float (_f32) and double (_f64) as extern "C" entries, so nvcc --ptx
// and CuPy's RawModule see plain names.

#define WARP 32
#define ROWS 8
#define BACKWARD_ROWS 64

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename T>
__device__ void affine_forward(const T* x2, const T* h, const T* scale, T sign, T* out, T* logdet,
                               long long n, long long d2) {
    const int lane = threadIdx.x;
    const long long row = (long long)blockIdx.x * ROWS + threadIdx.y;
    if (row >= n) return;  // whole warps leave together: the shuffles below stay warp-uniform
    const T* x_row = x2 + row * d2;
    const T* s_hat = h + row * 2 * d2;
    const T* t = s_hat + d2;
    T* out_row = out + row * d2;
    double row_sum = 0.0;
    for (long long j = lane; j < d2; j += WARP) {
        const T s = scale[j] * tanh_(s_hat[j]);
        out_row[j] = sign > T(0) ? x_row[j] * exp_(s) + t[j] : (x_row[j] - t[j]) * exp_(-s);
        row_sum += (double)s;
    }
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        row_sum += __shfl_down_sync(0xffffffffu, row_sum, offset);
    }
    if (lane == 0) logdet[row] = (T)((double)sign * row_sum);
}

template <typename T>
__device__ void affine_backward(const T* inp, const T* h, const T* scale, const T* d_out,
                                const T* d_logdet, T sign, T* d_inp, T* d_h, T* partial,
                                long long n, long long d2) {
    __shared__ double shared[ROWS][WARP];
    const int lane = threadIdx.x, warp = threadIdx.y;
    const long long first = (long long)blockIdx.x * BACKWARD_ROWS;
    for (long long start = 0; start < d2; start += WARP) {
        const long long j = start + lane;
        double d_a = 0.0;
        if (j < d2) {
            const T a = scale[j];
            for (int r = warp; r < BACKWARD_ROWS; r += ROWS) {
                const long long row = first + r;
                if (row >= n) break;
                const long long ij = row * d2 + j, hj = row * 2 * d2 + j;
                const T g = tanh_(h[hj]);
                T d_s;
                if (sign > T(0)) {  // z2 = x2 e + t
                    const T d_x = d_out[ij] * exp_(a * g);
                    d_s = d_x * inp[ij] + d_logdet[row];
                    d_inp[ij] = d_x;
                    d_h[hj + d2] = d_out[ij];
                } else {  // x2 = (z2 - t) / e
                    const T e_inv = exp_(-(a * g));
                    const T d_z = d_out[ij] * e_inv;
                    d_s = -d_out[ij] * ((inp[ij] - h[hj + d2]) * e_inv) - d_logdet[row];
                    d_inp[ij] = d_z;
                    d_h[hj + d2] = -d_z;
                }
                d_h[hj] = d_s * a * (T(1) - g * g);
                d_a += (double)(d_s * g);
            }
        }
        shared[warp][lane] = d_a;
        __syncthreads();
        for (int stride = ROWS / 2; stride > 0; stride /= 2) {
            if (warp < stride) shared[warp][lane] += shared[warp + stride][lane];
            __syncthreads();
        }
        if (warp == 0 && j < d2) partial[blockIdx.x * d2 + j] = (T)shared[0][lane];
        __syncthreads();
    }
}

template <typename T>
__device__ void column_sum(const T* partial, T* out, long long blocks, long long d2) {
    const long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (j >= d2) return;
    double total = 0.0;
    for (long long b = 0; b < blocks; ++b) total += (double)partial[b * d2 + j];
    out[j] = (T)total;
}

#define NFLOW_ENTRIES(T, SUFFIX)                                                                   \
    extern "C" __global__ void affine_forward_##SUFFIX(const T* x2, const T* h, const T* scale,    \
                                                       T sign, T* out, T* logdet, long long n,     \
                                                       long long d2) {                             \
        affine_forward<T>(x2, h, scale, sign, out, logdet, n, d2);                                 \
    }                                                                                              \
    extern "C" __global__ void affine_backward_##SUFFIX(                                           \
        const T* inp, const T* h, const T* scale, const T* d_out, const T* d_logdet, T sign,       \
        T* d_inp, T* d_h, T* partial, long long n, long long d2) {                                 \
        affine_backward<T>(inp, h, scale, d_out, d_logdet, sign, d_inp, d_h, partial, n, d2);      \
    }                                                                                              \
    extern "C" __global__ void column_sum_##SUFFIX(const T* partial, T* out, long long blocks,     \
                                                   long long d2) {                                 \
        column_sum<T>(partial, out, blocks, d2);                                                   \
    }

NFLOW_ENTRIES(float, f32)
NFLOW_ENTRIES(double, f64)
