/* BiGLA on the CPU: both scans as token-by-token recurrences, float32, threads over (batch, head).
 *
 * ViG (Liao et al., AAAI 2025, Sec. 3.2): the forward scan S_t = diag(a_t) S_{t-1} + k_t v_t^T and the
 * backward one S_t = diag(a_t) S_{t+1} + k_t v_t^T (a_t = exp(log decay), per key channel),
 * o_t = scale/2 * q_t^T (S^f_t + S^b_t). Written in scan order s (t = s forward, T-1-s backward) both
 * are S_s = diag(a_s) S_{s-1} + k_s v_s^T: one routine serves both, walking the tokens in either order
 * (no flipped copies). The [K, V] state stays in the L1 cache, vectorised over V.
 *
 * The state is kept as S = diag(D) U: a float64 scale D per key channel carries the decays (D <- D a), the
 * float32 rows U only add k_s v_s^T / D. So a decay within an ulp of 1 is not lost (a float32 state
 * multiplied by a = exp(-2e-8) would keep it unchanged: 1.6e-4 error after 8k such tokens), and a step
 * costs two fused multiply-adds per element (update, readout). Where D would fall below 2^-20 it is
 * folded into its row (U <- D U, D = 1), so the rows stay within 2^20 of the terms they sum.
 *
 * Backward, per scan: dq_s = c S_s do_s (c = scale/2, a pass in scan order, recomputing S and keeping each
 * token's decays for the next pass, [T, K] float64 per thread), then in
 * reverse scan order R_s = c q_s do_s^T + diag(a_{s+1}) R_{s+1} (the gradient of S_s, kept the same
 * way), dk_s = R_s v_s, dv_s = R_s^T k_s, and the log decays' gradient
 * dla_r = sum_{s >= r} (q_s * dq_s - k_s * dk_s) per channel (the scan's own dq and dk; float64 sums).
 *
 * Tensors are [B, T, H, D] with unit stride in D; the inputs take any (b, t, h) strides (in elements),
 * the outputs are contiguous. The gates are log decays, or (gnorm > 0) gate logits z with log decays
 * logsigmoid(z) / gnorm, whose gradient the backward then returns. Per token, the log decays are formed in
 * float32 (exp_f, log1p_f: their relative precision is all the products need) and the decays exp(log decay)
 * in float64 (exp_d: a decay within 1e-10 of 1 must not round to 1): polynomials the compiler vectorises over
 * K (a libm call per element would cost more than the state update; the float64 forms of the log decays cost
 * as much as the state update itself).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h" /* exp_f */

#define RENORM 0x1p-20

typedef struct {
    const float *q, *k, *v, *g[2], *dout;
    float *o, *dq, *dk, *dv, *dg[2];
    long B, T, H, K, V;
    long st[6][3]; /* (b, t, h) strides of q, k, v, gf, gb, do */
    float c, gnorm; /* gnorm > 0: the gates are logits */
} job_t;

#define ROW(x, i, b, t, h) ((x) + (b) * J->st[i][0] + (t) * J->st[i][1] + (h) * J->st[i][2])
#define OUT(x, b, t, h, D) ((x) + (((b) * J->T + (t)) * J->H + (h)) * (D))

static long token(const job_t *J, int scan, long s) { return scan ? J->T - 1 - s : s; }

static inline double from_bits(int64_t i) {
    double x;
    memcpy(&x, &i, sizeof x);
    return x;
}

/* exp(x) in float64 to a few ulp (degree-13 Taylor on |r| <= ln2 / 2, then 2^n in two factors so that
 * results down to the subnormals come out); 0 below -745, NaN stays NaN */
static inline double exp_d(double x) {
    double xc = x < -746.0 ? -746.0 : (x > 709.0 ? 709.0 : x);
    double n = __builtin_floor(xc * 1.4426950408889634 + 0.5);
    double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    static const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                        1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = p * r + inv_fact[i];
    int64_t ni = (int64_t)n, n1 = ni / 2;
    return p * from_bits((n1 + 1023) << 52) * from_bits((ni - n1 + 1023) << 52);
}

/* log(1 + t) for t in [0, 1], float32, to an ulp or two: 2 atanh(f) with f = t / (2 + t) (exact identity,
 * no rounding of 1 + t), |f| <= 1/3, series to f^15 */
static inline float log1p_f(float t) {
    float f = t / (2.0f + t), f2 = f * f, p = 1.0f / 15.0f;
    for (int k = 13; k >= 1; k -= 2) p = p * f2 + 1.0f / k;
    return 2.0f * f * p;
}

/* a token's log decays: logsigmoid(z) / gnorm = (min(z, 0) - log1p(exp(-|z|))) / gnorm of logits, formed
 * in float32 (their relative precision is what the decays need; the decays themselves and their products
 * are float64 below), or the log decays as given */
static inline void log_decays(const job_t *J, const float *restrict g, double *restrict la) {
    const float inv = J->gnorm > 0 ? 1.0f / J->gnorm : 1.0f;
    for (long i = 0; i < J->K; i++) {
        float z = g[i];
        la[i] = J->gnorm > 0 ? ((z < 0 ? z : 0.0f) - log1p_f(exp_f(-__builtin_fabsf(z)))) * inv : z;
    }
}

/* a token's decays exp(log decay), float64 */
static inline void decays(const job_t *J, const float *restrict g, double *restrict a) {
    log_decays(J, g, a);
    for (long i = 0; i < J->K; i++) a[i] = exp_d(a[i]);
}

/* d(log decay) / d(gate) of a token's gates: sigmoid(-z) / gnorm for logits (float32), else 1 */
static inline void gate_slopes(const job_t *J, const float *restrict g, double *restrict slope) {
    const float inv = J->gnorm > 0 ? 1.0f / J->gnorm : 1.0f;
    for (long i = 0; i < J->K; i++) {
        float z = g[i], t = exp_f(-__builtin_fabsf(z));
        slope[i] = J->gnorm > 0 ? (z < 0 ? 1.0f : t) / (1.0f + t) * inv : 1.0f;
    }
}

/* One step of S = diag(D) U, S <- diag(a) S + x y^T, as per-channel coefficients: row i of U becomes
 * f_i U_i + u_i y. Mostly f = 1, u = x / D with D <- D a; where D a falls below RENORM, f = D a, u = x and
 * D <- 1. Then w_i = wscale_i D_i, the factor of a readout of row i (float64 scalars, vectorised over K). */
static void coefficients(long K, double *restrict D, const double *restrict a, const float *restrict x, float xs,
                         const float *restrict wscale, float ws, float *restrict f, float *restrict u,
                         float *restrict w) {
    for (long i = 0; i < K; i++) {
        double d = D[i] * a[i];
        int fold = d < RENORM;
        double nd = fold ? 1.0 : d;
        f[i] = fold ? (float)d : 1.0f;
        u[i] = (float)((double)(xs * x[i]) / nd);
        D[i] = nd;
        w[i] = (float)(ws * wscale[i] * nd);
    }
}

/* row <- f row + u y; then, where given, acc += w row and the result's dot product with z (returned): one
 * pass over the row (inlined: the absent parts compile away) */
static inline __attribute__((always_inline)) float advance(float *restrict row, long V, float f, float u,
                                                           const float *restrict y, const float *restrict z,
                                                           float w, float *restrict acc) {
    float dot = 0.0f;
    if (f == 1.0f) {
        for (long j = 0; j < V; j++) {
            float r = row[j] + u * y[j];
            row[j] = r;
            if (z) dot += r * z[j];
            if (acc) acc[j] += w * r;
        }
    } else {
        for (long j = 0; j < V; j++) {
            float r = f * row[j] + u * y[j];
            row[j] = r;
            if (z) dot += r * z[j];
            if (acc) acc[j] += w * r;
        }
    }
    return dot;
}

/* The same pass over all K rows for V = 64 (ViG's heads), with the 64 sums of `acc` in four 16-lane vector
 * registers (GCC vector extensions; two or four narrower registers each where the machine has no 512-bit ones).
 * `advance`'s `acc` lives in memory: each row's update waited for the previous row's store to be forwarded, a
 * chain of loads and stores as long as K that set the time of a token. Row i becomes f_i row_i + u_i y; where
 * given, acc = sum_i w_i row_i (written, not added to) and dots[i] = <row_i, z>. */
typedef float vec16 __attribute__((vector_size(64)));

static inline vec16 load16(const float *p) {
    vec16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store16(float *p, vec16 x) { memcpy(p, &x, sizeof x); }

static inline float hsum16(vec16 x) {
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += x[j];
    return s;
}

static inline __attribute__((always_inline)) void advance_rows64(float *restrict S, long K, const float *f,
                                                                 const float *u, const float *w,
                                                                 const float *restrict y, const float *restrict z,
                                                                 float *restrict acc, float *restrict dots) {
    const vec16 y0 = load16(y), y1 = load16(y + 16), y2 = load16(y + 32), y3 = load16(y + 48);
    vec16 z0 = {0}, z1 = {0}, z2 = {0}, z3 = {0};
    if (z) {
        z0 = load16(z); z1 = load16(z + 16); z2 = load16(z + 32); z3 = load16(z + 48);
    }
    vec16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (long i = 0; i < K; i++) {
        float *row = S + i * 64;
        const float fi = f[i], ui = u[i];
        vec16 r0 = load16(row), r1 = load16(row + 16), r2 = load16(row + 32), r3 = load16(row + 48);
        if (fi != 1.0f) {
            r0 *= fi; r1 *= fi; r2 *= fi; r3 *= fi;
        }
        r0 += ui * y0; r1 += ui * y1; r2 += ui * y2; r3 += ui * y3;
        store16(row, r0); store16(row + 16, r1); store16(row + 32, r2); store16(row + 48, r3);
        if (acc) {
            const float wi = w[i];
            a0 += wi * r0; a1 += wi * r1; a2 += wi * r2; a3 += wi * r3;
        }
        if (z) dots[i] = hsum16(r0 * z0 + r1 * z1 + r2 * z2 + r3 * z3);
    }
    if (acc) {
        store16(acc, a0); store16(acc + 16, a1); store16(acc + 32, a2); store16(acc + 48, a3);
    }
}

/* One pass over all K rows (row i becomes f_i row_i + u_i y): where given, acc = sum_i w_i row_i and
 * dots[i] = <row_i, z>; V = 64 (ViG's heads) through advance_rows64's registers, other V row by row. */
static inline __attribute__((always_inline)) void advance_rows(float *restrict S, long K, long V, const float *f,
                                                               const float *u, const float *w,
                                                               const float *restrict y, const float *restrict z,
                                                               float *restrict acc, float *restrict dots) {
    if (V == 64) {
        advance_rows64(S, K, f, u, w, y, z, acc, dots);
        return;
    }
    if (acc)
        for (long j = 0; j < V; j++) acc[j] = 0.0f;
    for (long i = 0; i < K; i++) {
        float dot = advance(S + i * V, V, f[i], u[i], y, z, acc ? w[i] : 0.0f, acc);
        if (dots) dots[i] = dot;
    }
}

static void reset(float *S, double *D, long K, long V) {
    memset(S, 0, sizeof(float) * K * V);
    for (long i = 0; i < K; i++) D[i] = 1.0;
}

static inline __attribute__((always_inline)) void forward_task(const job_t *J, long b, long h, float *S, double *D,
                                                                double *a, float *co, const long V) {
    const long K = J->K;
    float *f = co, *u = co + K, *w = co + 2 * K;
    for (int scan = 0; scan < 2; scan++) {
        reset(S, D, K, V);
        for (long s = 0; s < J->T; s++) {
            long t = token(J, scan, s);
            const float *vv = ROW(J->v, 2, b, t, h);
            decays(J, ROW(J->g[scan], 3 + scan, b, t, h), a);
            coefficients(K, D, a, ROW(J->k, 1, b, t, h), 1.0f, ROW(J->q, 0, b, t, h), J->c, f, u, w);
            float acc[V];
            advance_rows(S, K, V, f, u, w, vv, NULL, acc, NULL);
            float *out = OUT(J->o, b, t, h, V);
            for (long j = 0; j < V; j++) out[j] = scan ? out[j] + acc[j] : acc[j];
        }
    }
}

/* one scan's gradients for task (b, h): dq, dk, dv accumulated (assigned by scan 0), dg[scan] written */
static inline __attribute__((always_inline)) void backward_scan(const job_t *J, int scan, long b, long h, float *S,
                                                                 double *D, double *a, float *co, float *dqs,
                                                                 double *gacc, double *decs, const long V) {
    const long K = J->K, T = J->T;
    float *f = co, *u = co + K, *w = co + 2 * K, *dks = co + 3 * K, *ones = co + 4 * K;
    for (long i = 0; i < K; i++) ones[i] = 1.0f;
    reset(S, D, K, V);
    for (long s = 0; s < T; s++) { /* the states again; dq_s = c S_s do_s */
        long t = token(J, scan, s);
        const float *vv = ROW(J->v, 2, b, t, h), *dd = ROW(J->dout, 5, b, t, h);
        double *as = decs + s * K; /* kept for the reverse pass */
        decays(J, ROW(J->g[scan], 3 + scan, b, t, h), as);
        coefficients(K, D, as, ROW(J->k, 1, b, t, h), 1.0f, ones, J->c, f, u, w);
        float *dq = dqs + s * K;
        advance_rows(S, K, V, f, u, NULL, vv, dd, NULL, dq);
        for (long i = 0; i < K; i++) dq[i] *= w[i];
        float *out = OUT(J->dq, b, t, h, K);
        for (long i = 0; i < K; i++) out[i] = scan ? out[i] + dq[i] : dq[i];
    }
    reset(S, D, K, V); /* now R, the gradient of the state, in reverse scan order */
    double *slope = gacc + K;
    for (long i = 0; i < K; i++) {
        gacc[i] = 0.0;
        a[i] = 1.0;
    }
    const double *an = a; /* the decays between this token and the one after it in scan order */
    for (long s = T - 1; s >= 0; s--) {
        long t = token(J, scan, s);
        const float *qq = ROW(J->q, 0, b, t, h), *kk = ROW(J->k, 1, b, t, h), *vv = ROW(J->v, 2, b, t, h);
        const float *dd = ROW(J->dout, 5, b, t, h), *g = ROW(J->g[scan], 3 + scan, b, t, h);
        coefficients(K, D, an, qq, J->c, kk, 1.0f, f, u, w); /* w = D k */
        float dvs[V];
        advance_rows(S, K, V, f, u, w, dd, vv, dvs, dks);
        for (long i = 0; i < K; i++) dks[i] *= (float)D[i];
        float *dk = OUT(J->dk, b, t, h, K), *dv = OUT(J->dv, b, t, h, V), *dg = OUT(J->dg[scan], b, t, h, K);
        const float *dq = dqs + s * K;
        gate_slopes(J, g, slope);
        for (long i = 0; i < K; i++) {
            dk[i] = scan ? dk[i] + dks[i] : dks[i];
            gacc[i] += (double)qq[i] * dq[i] - (double)kk[i] * dks[i];
            dg[i] = (float)(gacc[i] * slope[i]);
        }
        for (long j = 0; j < V; j++) dv[j] = scan ? dv[j] + dvs[j] : dvs[j];
        an = decs + s * K; /* this token's: R on its way to the token before */
    }
}

/* the (batch, head) tasks [first, last) of one thread, for V values per head; 0 on success */
static inline __attribute__((always_inline)) int run_tasks_v(const job_t *J, long first, long last, const long V) {
    const long K = J->K;
    int backward = J->dout != NULL;
    float *S = malloc(sizeof(float) * (K * V + 5 * K + (backward ? J->T * K : 0)));
    double *D = malloc(sizeof(double) * (4 * K + (backward ? J->T * K : 0)));
    int failed = !S || !D;
    float *co = S + K * V, *dqs = co + 5 * K;
    double *a = D + K, *gacc = a + K; /* and gacc + K: the slopes; then the backward's decays, [T, K] */
    double *decs = gacc + 2 * K;
    for (long task = first; task < last && !failed; task++) {
        long b = task / J->H, h = task % J->H;
        if (backward) {
            backward_scan(J, 0, b, h, S, D, a, co, dqs, gacc, decs, V);
            backward_scan(J, 1, b, h, S, D, a, co, dqs, gacc, decs, V);
        } else {
            forward_task(J, b, h, S, D, a, co, V);
        }
    }
    free(S);
    free(D);
    return failed;
}

/* ViG's 64 values per head as a constant (the loops over V unrolled, their sums kept in registers) */
static int run_tasks(const job_t *J, long first, long last) {
    return J->V == 64 ? run_tasks_v(J, first, last, 64) : run_tasks_v(J, first, last, J->V);
}

/* the B*H tasks in contiguous blocks over nthreads OpenMP threads. Built with -fopenmp, this library
 * links libgomp.so.1 by name, which resolves to the copy PyTorch has loaded: one thread pool, whose
 * threads PyTorch's own ops have just left spinning for work (a second runtime's threads would
 * compete with them for the cores). */
static int run_threads(const job_t *J, int nthreads) {
    long tasks = J->B * J->H;
    if (nthreads > tasks) nthreads = (int)(tasks > 0 ? tasks : 1);
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : failed)
    for (int i = 0; i < nthreads; i++)
        failed |= run_tasks(J, tasks * i / nthreads, tasks * (i + 1) / nthreads);
    return failed;
}

static void setup(job_t *J, const float *q, const float *k, const float *v, const float *gf, const float *gb,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm) {
    memset(J, 0, sizeof(*J));
    J->q = q; J->k = k; J->v = v; J->g[0] = gf; J->g[1] = gb;
    J->B = B; J->T = T; J->H = H; J->K = K; J->V = V;
    memcpy(J->st, strides, sizeof(J->st));
    J->c = half_scale;
    J->gnorm = gnorm;
}

/* o [B, T, H, V]; strides: 6 x (b, t, h) for q, k, v, gf, gb, (unused); returns 0 on success */
int bigla_fwd_f32(const float *q, const float *k, const float *v, const float *gf, const float *gb, float *o,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm,
                  int nthreads) {
    job_t J;
    setup(&J, q, k, v, gf, gb, B, T, H, K, V, strides, half_scale, gnorm);
    J.o = o;
    return run_threads(&J, nthreads);
}

/* dq, dk, dgf, dgb [B, T, H, K], dv [B, T, H, V] (dgf, dgb: of the gates as given, logits or log decays);
 * strides: 6 x (b, t, h) for q, k, v, gf, gb, do */
int bigla_bwd_f32(const float *q, const float *k, const float *v, const float *gf, const float *gb,
                  const float *dout, float *dq, float *dk, float *dv, float *dgf, float *dgb,
                  long B, long T, long H, long K, long V, const long *strides, float half_scale, float gnorm,
                  int nthreads) {
    job_t J;
    setup(&J, q, k, v, gf, gb, B, T, H, K, V, strides, half_scale, gnorm);
    J.dout = dout; J.dq = dq; J.dk = dk; J.dv = dv; J.dg[0] = dgf; J.dg[1] = dgb;
    return run_threads(&J, nthreads);
}
