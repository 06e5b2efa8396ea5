/* ViG's locality mix on the CPU, float32: y = act(G * RMSNorm(o; w_o) + (1 - G) * RMSNorm(x; w_l)), G = sigmoid(z),
 * per (token, head) row of D channels; one pass over the inputs forward, one backward (norms and gate
 * recomputed), threads over tokens.
 *
 * o: [T, Hd * D] contiguous; x, z: [T, Hd * D] with token strides sx, sz (unit stride within a token);
 * y, dy, do, dx, dz: [T, Hd * D] contiguous; w_o, w_l, dw_o, dw_l: [D].
 * The weight gradients are summed per block of BLOCK tokens into part [blocks, 2, D] (scratch from the
 * caller), then over the blocks in order: the same sums for any thread count.
 */
#include "cpu_math.h"

#define BLOCK 32

void locality_mix_fwd_f32(const float *o, const float *x, const float *z, const float *w_o, const float *w_l,
                          float *y, long T, long Hd, long D, long sx, long sz, float eps, int act, int nthreads) {
    const long C = Hd * D;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long t = 0; t < T; t++) {
        for (long h = 0; h < Hd; h++)
            mix_row_f(o + t * C + h * D, x + t * sx + h * D, z + t * sz + h * D, w_o, w_l, y + t * C + h * D, D,
                      eps, act);
    }
}

/* one row's gradients: dz, do, dx written, dna * a * ra and dnb * b * rb added to acc_o, acc_l;
 * dna, dnb: D floats of scratch */
static inline void row_bwd(const float *du_in, const float *a, const float *b, const float *g, const float *w_o,
                           const float *w_l, float *da, float *db, float *dg, float *acc_o, float *acc_l,
                           float *dna, float *dnb, long D, float eps, int act) {
    float ra = rrms_f(a, D, eps), rb = rrms_f(b, D, eps);
    float sa = 0.0f, sb = 0.0f; /* sum(dn * w * t) per norm */
#pragma omp simd reduction(+ : sa, sb)
    for (long i = 0; i < D; i++) {
        float na = a[i] * ra * w_o[i], nb = b[i] * rb * w_l[i];
        float gate = sigmoid_f(g[i]), du = du_in[i];
        if (act) {
            float u = nb + gate * (na - nb);
            du *= silu_slope_f(u);
        }
        dna[i] = du * gate;
        dnb[i] = du - dna[i];
        dg[i] = du * (na - nb) * gate * (1.0f - gate);
        acc_o[i] += dna[i] * a[i] * ra;
        acc_l[i] += dnb[i] * b[i] * rb;
        sa += dna[i] * w_o[i] * a[i];
        sb += dnb[i] * w_l[i] * b[i];
    }
    float ca = ra * ra * ra * sa / (float)D, cb = rb * rb * rb * sb / (float)D;
#pragma omp simd
    for (long i = 0; i < D; i++) {
        da[i] = ra * dna[i] * w_o[i] - a[i] * ca;
        db[i] = rb * dnb[i] * w_l[i] - b[i] * cb;
    }
}

/* part: [ceil(T / BLOCK), 2, D] scratch; returns 0, or 1 when the per-thread rows cannot be allocated */
int locality_mix_bwd_f32(const float *dy, const float *o, const float *x, const float *z, const float *w_o,
                         const float *w_l, float *d_o, float *dx, float *dz, float *dw_o, float *dw_l, float *part,
                         long T, long Hd, long D, long sx, long sz, float eps, int act, int nthreads) {
    const long C = Hd * D, blocks = (T + BLOCK - 1) / BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * 2 * D);
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (long blk = 0; blk < blocks; blk++) {
            float *acc_o = part + blk * 2 * D, *acc_l = acc_o + D;
            memset(acc_o, 0, sizeof(float) * 2 * D);
            for (long t = blk * BLOCK; t < T && t < (blk + 1) * BLOCK && scratch; t++)
                for (long h = 0; h < Hd; h++) {
                    long r = t * C + h * D;
                    row_bwd(dy + r, o + r, x + t * sx + h * D, z + t * sz + h * D, w_o, w_l, d_o + r, dx + r,
                            dz + r, acc_o, acc_l, scratch, scratch + D, D, eps, act);
                }
        }
        free(scratch);
    }
    for (long i = 0; i < D; i++) dw_o[i] = dw_l[i] = 0.0f;
    for (long blk = 0; blk < blocks; blk++)
        for (long i = 0; i < D; i++) {
            dw_o[i] += part[blk * 2 * D + i];
            dw_l[i] += part[blk * 2 * D + D + i];
        }
    return failed;
}
