/* ViG's local branch on the CPU, float32: a depthwise 3x3 conv (zero padding 1) + optional SiLU on channels-last
 * tokens, threads over the image rows of the batch, vectorised over channels.
 *
 * x: [B, H*W, C] with strides (sb, sn, 1); w9: [9, C] (tap k = 3 i + j of weight[c, 0, i, j], channels
 * contiguous); y, dy, dx, g: [B, H*W, C] contiguous; dw9: [9, C].
 * Forward: y = act(u), u = sum_k w9[k] * x shifted by tap k. Backward: g = dy * SiLU'(u) (u recomputed; g = dy
 * without act), then dx = the transposed conv of g (taps flipped), and dw9[k] = sum g * x shifted by tap k,
 * summed per image row into part [B * H, 9, C] (scratch from the caller), then over the rows in order: the same
 * sums for any thread count.
 */
#include "cpu_math.h"

/* the 9 tap rows of pixel (h, j): in at (h + k / 3 - 1, j + k % 3 - 1), or zero (C zeros) outside the image */
static inline void taps(const float *in, long sn, const float *zero, long h, long j, long H, long W,
                        const float *p[9]) {
    for (int k = 0; k < 9; k++) {
        long hh = h + k / 3 - 1, ww = j + k % 3 - 1;
        p[k] = hh < 0 || hh >= H || ww < 0 || ww >= W ? zero : in + (hh * W + ww) * sn;
    }
}

/* the conv's output u at one pixel, channel c: sum_k w9[k] * p[k] (w9[8 - k] with flip: the transposed conv) */
#define CONV(p, w9, C, c, flip)                                                                              \
    ((flip) ? (w9)[8 * (C) + (c)] * (p)[0][c] + (w9)[7 * (C) + (c)] * (p)[1][c] + (w9)[6 * (C) + (c)] * (p)[2][c] + \
                  (w9)[5 * (C) + (c)] * (p)[3][c] + (w9)[4 * (C) + (c)] * (p)[4][c] + (w9)[3 * (C) + (c)] * (p)[5][c] + \
                  (w9)[2 * (C) + (c)] * (p)[6][c] + (w9)[1 * (C) + (c)] * (p)[7][c] + (w9)[c] * (p)[8][c]          \
            : (w9)[c] * (p)[0][c] + (w9)[1 * (C) + (c)] * (p)[1][c] + (w9)[2 * (C) + (c)] * (p)[2][c] +            \
                  (w9)[3 * (C) + (c)] * (p)[3][c] + (w9)[4 * (C) + (c)] * (p)[4][c] + (w9)[5 * (C) + (c)] * (p)[5][c] + \
                  (w9)[6 * (C) + (c)] * (p)[6][c] + (w9)[7 * (C) + (c)] * (p)[7][c] + (w9)[8 * (C) + (c)] * (p)[8][c])

/* mode 0: out = u; 1: out = SiLU(u); 2: out = dy * SiLU'(u); 3: out = the transposed conv (flipped taps) */
static void conv_row(const float *in, long sn, const float *w9, const float *zero, const float *dy, float *out,
                     long h, long H, long W, long C, int mode) {
    const float *p[9];
    for (long j = 0; j < W; j++) {
        taps(in, sn, zero, h, j, H, W, p);
        float *o = out + j * C;
        const float *d = dy ? dy + j * C : NULL;
        if (mode == 0) {
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] = CONV(p, w9, C, c, 0);
        } else if (mode == 1) {
#pragma omp simd
            for (long c = 0; c < C; c++) {
                float u = CONV(p, w9, C, c, 0);
                o[c] = u * sigmoid_f(u);
            }
        } else if (mode == 2) {
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] = d[c] * silu_slope_f(CONV(p, w9, C, c, 0));
        } else {
#pragma omp simd
            for (long c = 0; c < C; c++) o[c] = CONV(p, w9, C, c, 1);
        }
    }
}

/* zero: C zeros */
void dwconv_fwd_f32(const float *x, const float *w9, const float *zero, float *y, long B, long H, long W, long C,
                    long sb, long sn, int act, int nthreads) {
    const long N = H * W;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long task = 0; task < B * H; task++) {
        long b = task / H, h = task % H;
        conv_row(x + b * sb, sn, w9, zero, NULL, y + (b * N + h * W) * C, h, H, W, C, act);
    }
}

/* adds sum over image row h of g * x shifted by tap k to acc[k] ([9, C]) */
static void weight_row(const float *x, long sn, const float *zero, const float *g, float *acc, long h, long H,
                       long W, long C) {
    const float *p[9];
    for (long j = 0; j < W; j++) {
        const float *gp = g + j * C;
        taps(x, sn, zero, h, j, H, W, p);
        for (int k = 0; k < 9; k++) {
            float *a = acc + k * C;
            const float *xp = p[k];
#pragma omp simd
            for (long c = 0; c < C; c++) a[c] += gp[c] * xp[c];
        }
    }
}

/* g: [B, H*W, C] scratch with act (unused without: g = dy); part: [B * H, 9, C] scratch; zero: C zeros */
void dwconv_bwd_f32(const float *dy, const float *x, const float *w9, const float *zero, float *dx, float *dw9, float *g, float *part,
                    long B, long H, long W, long C, long sb, long sn, int act, int nthreads) {
    const long N = H * W;
    const float *grad = act ? g : dy;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (long task = 0; task < B * H; task++) {
            long b = task / H, h = task % H, row = (b * N + h * W) * C;
            if (act) conv_row(x + b * sb, sn, w9, zero, dy + row, g + row, h, H, W, C, 2);
            float *acc = part + task * 9 * C;
            for (long i = 0; i < 9 * C; i++) acc[i] = 0.0f;
            weight_row(x + b * sb, sn, zero, grad + row, acc, h, H, W, C);
        }
        /* implicit barrier: every row of g is written */
#pragma omp for schedule(static)
        for (long task = 0; task < B * H; task++) {
            long b = task / H, h = task % H;
            conv_row(grad + b * N * C, C, w9, zero, NULL, dx + (b * N + h * W) * C, h, H, W, C, 3);
        }
    }
    for (long i = 0; i < 9 * C; i++) dw9[i] = 0.0f;
    for (long task = 0; task < B * H; task++)
        for (long i = 0; i < 9 * C; i++) dw9[i] += part[task * 9 * C + i];
}
