/* Elementwise float32 maths shared by the CPU kernels (BiGLA, the locality mix, SwiGLU, the depthwise conv):
 * inline functions the compiler vectorises inside a loop (a libm call per element would not be).
 *
 * exp_f: exp(x) to an ulp or two (degree-6 Taylor on |r| <= ln2 / 2, then 2^n); 0 below -87.3, where the
 * result would be subnormal, and x clamped to 88 above (1.7e38: sigmoid and SiLU keep float32's absolute
 * precision there). sigmoid_f, silu_slope_f (SiLU'(u) = s (1 + u (1 - s))) build on it; BiGLA's kernel uses
 * exp_f for its gates.
 */
#ifndef VIGLA_CPU_MATH_H
#define VIGLA_CPU_MATH_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float vigla_from_bits_f(int32_t i) {
    float x;
    memcpy(&x, &i, sizeof x);
    return x;
}

static inline float exp_f(float x) {
    float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_floorf(xc * 1.44269504f + 0.5f);
    float r = (xc - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return x < -87.3f ? 0.0f : p * vigla_from_bits_f(((int32_t)n + 127) << 23);
}

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

static inline float silu_slope_f(float u) {
    float s = sigmoid_f(u);
    return s * (1.0f + u * (1.0f - s));
}

/* 1 / sqrt(mean(t^2) + eps) over D floats */
static inline float rrms_f(const float *t, long D, float eps) {
    float ss = 0.0f;
    for (long i = 0; i < D; i++) ss += t[i] * t[i];
    return 1.0f / __builtin_sqrtf(ss / (float)D + eps);
}

/* ViG's locality mix of one (token, head) row of D channels: y = act(G * RMSNorm(a; w_o) + (1 - G) *
 * RMSNorm(b; w_l)), G = sigmoid(g) (a: BiGLA's output, b: the local branch, g: the gate logits). y may be a
 * (each element is read before it is written) */
static inline void mix_row_f(const float *a, const float *b, const float *g, const float *w_o, const float *w_l,
                             float *y, long D, float eps, int act) {
    float ra = rrms_f(a, D, eps), rb = rrms_f(b, D, eps);
#pragma omp simd
    for (long i = 0; i < D; i++) {
        float nb = b[i] * rb * w_l[i];
        float u = nb + sigmoid_f(g[i]) * (a[i] * ra * w_o[i] - nb);
        y[i] = act ? u * sigmoid_f(u) : u;
    }
}

#endif
