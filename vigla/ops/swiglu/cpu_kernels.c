/* SwiGLU's gating on the CPU, float32: y = SiLU(a) * b for [a | b] = u, one pass over u forward, one pass
 * over u and dy backward (the activation recomputed), threads over rows.
 *
 * u: [R, 2I] rows with row stride su (unit stride within a row); y, dy: [R, I] and du: [R, 2I], contiguous.
 */
#include "cpu_math.h"

void swiglu_fwd_f32(const float *u, float *y, long R, long I, long su, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < R; r++) {
        const float *a = u + r * su, *b = a + I;
        float *yr = y + r * I;
#pragma omp simd
        for (long i = 0; i < I; i++) yr[i] = a[i] * sigmoid_f(a[i]) * b[i];
    }
}

/* du = [dy * b * SiLU'(a) | dy * SiLU(a)] */
void swiglu_bwd_f32(const float *dy, const float *u, float *du, long R, long I, long su, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < R; r++) {
        const float *a = u + r * su, *b = a + I, *g = dy + r * I;
        float *da = du + r * 2 * I, *db = da + I;
#pragma omp simd
        for (long i = 0; i < I; i++) {
            float s = sigmoid_f(a[i]), silu = a[i] * s;
            da[i] = g[i] * b[i] * (s + silu * (1.0f - s));
            db[i] = g[i] * silu;
        }
    }
}
