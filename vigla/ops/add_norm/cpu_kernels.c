/* A block's residual add and pre-norm (RMSNorm or LayerNorm) on the CPU, float32, per row of C channels:
 * s = x + delta, y = norm(s) * w (+ b); one pass forward (x, delta read once, s and y written), one backward
 * (s, dy, ds read, dx written; the statistics recomputed from s), threads over rows.
 *
 * x, delta: [R, C] with row strides sx, sd (unit stride within a row; delta may be NULL: s = x, not written);
 * s, y, dy, ds, dx: [R, C] contiguous (ds may be NULL); w, b, dw, db: [C] (b, db may be NULL).
 * The weight and bias gradients are summed per block of BLOCK rows into part [blocks, 2, C] (scratch from the
 * caller), then over the blocks in order: the same sums for any thread count.
 */
#include <math.h>
#include <string.h>

#define BLOCK 32

/* (mean, reciprocal deviation) of row s: the mean is 0 for RMSNorm; two passes for LayerNorm's variance */
static inline float stats(const float *s, long C, float eps, int rms, float *mean) {
    float m = 0.0f, v = 0.0f;
    if (!rms) {
        for (long i = 0; i < C; i++) m += s[i];
        m /= (float)C;
    }
    for (long i = 0; i < C; i++) v += (s[i] - m) * (s[i] - m);
    *mean = m;
    return 1.0f / sqrtf(v / (float)C + eps);
}

void add_norm_fwd_f32(const float *x, const float *delta, const float *w, const float *b, float *s, float *y,
                      long R, long C, long sx, long sd, float eps, int rms, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long r = 0; r < R; r++) {
        const float *sr = x + r * sx;
        if (delta) {
            const float *xr = x + r * sx, *dr = delta + r * sd;
            float *out = s + r * C;
            for (long i = 0; i < C; i++) out[i] = xr[i] + dr[i];
            sr = out;
        }
        float mean, rd = stats(sr, C, eps, rms, &mean);
        float *yr = y + r * C;
        if (b)
            for (long i = 0; i < C; i++) yr[i] = (sr[i] - mean) * rd * w[i] + b[i];
        else
            for (long i = 0; i < C; i++) yr[i] = (sr[i] - mean) * rd * w[i];
    }
}

/* dx = rd (dn - mean(dn) [LayerNorm] - n mean(dn n)) + ds, dn = dy w, n = (s - mean) rd */
static inline void row_bwd(const float *dy, const float *ds, const float *s, const float *w, float *dx,
                           float *acc_w, float *acc_b, long C, float eps, int rms) {
    float mean, rd = stats(s, C, eps, rms, &mean);
    float sdn = 0.0f, sdnn = 0.0f;
    for (long i = 0; i < C; i++) {
        float n = (s[i] - mean) * rd, dn = dy[i] * w[i];
        sdn += dn;
        sdnn += dn * n;
        acc_w[i] += dy[i] * n;
        acc_b[i] += dy[i];
    }
    float c0 = rms ? 0.0f : sdn / (float)C, c1 = sdnn / (float)C;
    for (long i = 0; i < C; i++) {
        float n = (s[i] - mean) * rd;
        dx[i] = rd * (dy[i] * w[i] - c0 - n * c1);
    }
    /* a loop of its own: the sum rounded as autograd's (no multiply-add fused with it), so that add_norm(x, delta)
     * and add_norm(x + delta, None) give the same gradients */
    if (ds)
        for (long i = 0; i < C; i++) dx[i] += ds[i];
}

/* part: [ceil(R / BLOCK), 2, C] scratch; db may be NULL */
void add_norm_bwd_f32(const float *dy, const float *ds, const float *s, const float *w, float *dx, float *dw,
                      float *db, float *part, long R, long C, float eps, int rms, int nthreads) {
    const long blocks = (R + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long blk = 0; blk < blocks; blk++) {
        float *acc_w = part + blk * 2 * C, *acc_b = acc_w + C;
        memset(acc_w, 0, sizeof(float) * 2 * C);
        for (long r = blk * BLOCK; r < R && r < (blk + 1) * BLOCK; r++)
            row_bwd(dy + r * C, ds ? ds + r * C : NULL, s + r * C, w, dx + r * C, acc_w, acc_b, C, eps, rms);
    }
    for (long i = 0; i < C; i++) {
        dw[i] = 0.0f;
        if (db) db[i] = 0.0f;
    }
    for (long blk = 0; blk < blocks; blk++)
        for (long i = 0; i < C; i++) {
            dw[i] += part[blk * 2 * C + i];
            if (db) db[i] += part[blk * 2 * C + C + i];
        }
}
