/* Native kernels of the els-audit score engine (compiled on first use by _native.py).
 *
 * els_softmax_sums: the softmax sums of one (tile, level) step of the nested pass
 * (_nested.py), in one read of the logits instead of four torch passes (subtract the
 * running maximum, clamp, exp2, weighted sum).  Columns r are query pixels, rows j nodes:
 *
 *   part[c, r] = sum_j vals[c, j] * 2**min(max(S[j, r] - m[r], lo), 127)
 *
 * S (n, R) with row stride ldS, m (R,), vals (nc, n) with row stride ldv, part (nc, R)
 * contiguous.  (A variant that also added the parents' logits, replacing the row gather
 * and the GEMM's accumulate, ran slower: bench/README.md.)
 *
 * 2**x is computed as 2**n * 2**f with n = rint(x), f = x - n in [-1/2, 1/2] and 2**f by its
 * Taylor series to degree 7 (truncation < 4e-9 relative; measured in float32 over [-126, 127]
 * against float64: < 6e-8 relative, tests/machines/test_native.py).
 *
 * Threads: OpenMP over blocks of columns; linked against the libgomp that torch has loaded
 * (same soname), so torch and these kernels share one thread pool.
 */
#include <stdint.h>
#include <string.h>

#ifndef BLOCK
#define BLOCK 128   /* columns per work item (64 and 256 measured no faster) */
#endif
#define MAX_NC 8    /* centre channels + 1 */

static inline float exp2_f32(float x) {
    float n = __builtin_rintf(x);
    float f = (x - n) * 0.693147180559945309f;   /* 2**(x-n) = e**f */
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;     /* 2**n, n in [-126, 127] */
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

int els_native_abi(void) { return 1; }

/* The column-block body for a compile-time channel count NC (so that the loop over r, with
 * its NC accumulators, vectorises). */
static inline __attribute__((always_inline)) void
sums_block(const int NC, const float *S, int64_t n, int64_t ldS, const float *mb, const float *vals,
           int64_t ldv, float lo, int64_t w, float *part, int64_t R) {
    float acc[MAX_NC][BLOCK];
    for (int c = 0; c < NC; c++)
        for (int64_t r = 0; r < BLOCK; r++) acc[c][r] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *row = S + j * ldS;
        float v[MAX_NC];
        for (int c = 0; c < NC; c++) v[c] = vals[c * ldv + j];
        #pragma omp simd
        for (int64_t r = 0; r < w; r++) {
            float d = row[r] - mb[r];
            d = d < lo ? lo : d;
            d = d > 127.0f ? 127.0f : d;
            const float e = exp2_f32(d);
            for (int c = 0; c < NC; c++) acc[c][r] += v[c] * e;
        }
    }
    for (int c = 0; c < NC; c++) memcpy(part + c * R, acc[c], (size_t)w * sizeof(float));
}

int els_softmax_sums(const float *S, int64_t n, int64_t R, int64_t ldS, const float *m,
                     const float *vals, int64_t nc, int64_t ldv, float lo, float *part, int nthreads) {
    if (nc < 1 || nc > MAX_NC || n < 0 || R < 0) return 1;
    const int64_t nblocks = (R + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t r0 = b * BLOCK;
        const int64_t w = R - r0 < BLOCK ? R - r0 : BLOCK;
        const float *Sb = S + r0, *mb = m + r0;
        float *pb = part + r0;
        switch (nc) {
            case 1: sums_block(1, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 2: sums_block(2, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 3: sums_block(3, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 4: sums_block(4, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 5: sums_block(5, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 6: sums_block(6, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            case 7: sums_block(7, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;
            default: sums_block(8, Sb, n, ldS, mb, vals, ldv, lo, w, pb, R); break;   /* nc == MAX_NC */
        }
    }
    return 0;
}

/* els_softmax_sums_rows: the same sums for the single-k kernel (_engine.py), whose logit
 * tiles are (rows, keys) with keys contiguous:
 *
 *   part[r, c] = sum_j vals[c, j] * 2**min(max(L[r, j] - m[r], lo), 127)
 *
 * L (R, n) with row stride ldL, m (R,), vals (nc, n) with row stride ldv, part (R, nc)
 * contiguous.  Threads over rows; each row is reduced by 8-lane partial sums.
 */
int els_softmax_sums_rows(const float *L, int64_t R, int64_t n, int64_t ldL, const float *m,
                          const float *vals, int64_t nc, int64_t ldv, float lo, float *part, int nthreads) {
    if (nc < 1 || nc > MAX_NC || n < 0 || R < 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *row = L + r * ldL;
        const float mr = m[r];
        float acc[MAX_NC][8];
        float e[BLOCK];
        for (int64_t c = 0; c < nc; c++)
            for (int l = 0; l < 8; l++) acc[c][l] = 0.0f;
        for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
            const int64_t w = n - j0 < BLOCK ? n - j0 : BLOCK;
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                float d = row[j0 + j] - mr;
                d = d < lo ? lo : d;
                d = d > 127.0f ? 127.0f : d;
                e[j] = exp2_f32(d);
            }
            for (int64_t c = 0; c < nc; c++) {
                const float *v = vals + c * ldv + j0;
                int64_t j = 0;
                for (; j + 8 <= w; j += 8)
                    for (int l = 0; l < 8; l++) acc[c][l] += v[j + l] * e[j + l];
                for (; j < w; j++) acc[c][j & 7] += v[j] * e[j];
            }
        }
        for (int64_t c = 0; c < nc; c++) {
            float s = 0.0f;
            for (int l = 0; l < 8; l++) s += acc[c][l];
            part[r * nc + c] = s;
        }
    }
    return 0;
}

/* els_decode_rows: kept tree rows stored as palette codes (_nested.py) back to engine rows:
 *
 *   out[j, c] = palette[codes[j, c]] - mu[c]   (c < ring),   out[j, ring + i] = extra[j, i]  (i < 2)
 *
 * codes (n, ring) uint8 with row stride ldc, extra (n, 2) with row stride lde, out (n, ring + 2)
 * contiguous.  The same float32 operations as decoding in torch, so the same bits.
 */
int els_decode_rows(const uint8_t *codes, int64_t n, int64_t ring, int64_t ldc, const float *palette,
                    const float *mu, const float *extra, int64_t lde, float *out, int nthreads) {
    if (n < 0 || ring < 0) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * ring > (1 << 16))
    for (int64_t j = 0; j < n; j++) {
        const uint8_t *cj = codes + j * ldc;
        float *oj = out + j * (ring + 2);
        for (int64_t c = 0; c < ring; c++) oj[c] = palette[cj[c]] - mu[c];
        oj[ring] = extra[j * lde];
        oj[ring + 1] = extra[j * lde + 1];
    }
    return 0;
}
