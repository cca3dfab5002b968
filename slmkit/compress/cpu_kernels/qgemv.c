/* Integer GEMV for int4 and int8 weights against a few activation rows (decode-sized inputs), in the style of
 * llama.cpp's Q4 x Q8 and Q8 x Q8 dot products. (The int8 kernel, at the end, shares the activation side.)
 *
 * Each activation row is quantized per block of 32 columns to int8 with one fp32 scale (symmetric,
 * round to nearest, d = max|x| / 127). For output row n and block b the 4-bit codes q (unsigned) meet the
 * int8 activations in an integer dot product, and the group's zero point z enters through the block's
 * activation sum:
 *
 *     y[m, n] = sum_b s[n, g(b)] * d[m, b] * (sum_{j in b} q[n, j] * xq[m, j]  -  z[n, g(b)] * sum_{j in b} xq[m, j])
 *
 * which is the dequantized weight (q - z) s times the rounded activations d * xq, exactly, in exact
 * arithmetic: the only approximation is the 8-bit rounding of x (plus fp32 accumulation).
 *
 * The zero-point term is summed per group first: Z[m, g] = sum_{b in g} d[m, b] * xsum[m, b], and
 * y[m, n] -= sum_g (s z)[n, g] * Z[m, g] (sz is precomputed, padded to a multiple of 8 with zeros).
 *
 * Weight layout (prepared once in Python): per output row, per block of 32 input columns, 16 bytes; byte i
 * holds column i in its low nibble and column i + 16 in its high nibble. Loading two consecutive blocks as
 * one 256-bit vector, `& 0x0F` gives columns 0..15 of both blocks (one per 128-bit lane) and `>> 4` gives
 * columns 16..31; the activations of a block pair are stored in the same order (b[0:16], b+1[0:16],
 * b[16:32], b+1[16:32]), so two `maddubs` (u8 x s8 -> i16 pairs; 15 * 127 * 2 < 32767 cannot saturate)
 * and one `madd` with ones give per-lane i32 sums: lanes 0..3 belong to block b, 4..7 to block b + 1.
 *
 * Scales: `scale` holds one fp32 per `bps` blocks (blocks per scale entry). When bps is even a block
 * pair never straddles two scales, and the pair's float sums are accumulated per scale entry and scaled
 * once; when bps is 1 (group 32, or groups of an odd number of blocks, expanded per block in Python) each
 * pair builds its two-scale vector.
 *
 * Dispatch: the AVX2 + FMA and AVX-512 VNNI functions (the latter described before them below) are compiled
 * with target attributes and only called when the CPU reports their features and the caller's level allows them;
 * everything else runs the portable scalar code, so the library loads and runs on any x86-64 (or other) CPU.
 * Threads: OpenMP over output rows, `nthreads` from torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SLM_X86 1
#include <immintrin.h>
#endif

#define QK 32

/* Per-thread workspace for the quantized activations, grown as needed (never shrunk). */
static __thread void *ws_ptr = NULL;
static __thread size_t ws_cap = 0;

static void *workspace(size_t bytes) {
    if (bytes > ws_cap) {
        free(ws_ptr);
        ws_ptr = NULL;
        ws_cap = 0;
        if (posix_memalign(&ws_ptr, 64, bytes) != 0) return NULL;
        ws_cap = bytes;
    }
    return ws_ptr;
}

/* Activation workspace layout, per input row m (row stride `row_bytes`):
 *   xq:  nb * 32 int8, block pairs interleaved as described above (a last unpaired block in natural order)
 *   dx:  one 8-float vector per pair ([d_b x4, d_b+1 x4]) and, for an odd nb, 8 more floats [d_last x8]
 *   db:  nb floats, the per-block scales (scalar path)
 *   xs:  nb int32, the per-block sums of xq (scalar path)
 *   Z:   gp floats (groups padded to a multiple of 8), the zero-point sums per group */
typedef struct {
    int8_t *xq;
    float *dx;
    float *db;
    int32_t *xs;
    float *Z;
} act_row;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t act_row_bytes(int nb, int gp) {
    int nvec = (nb + 1) / 2;
    return align64((size_t)nb * QK) + align64((size_t)nvec * 8 * sizeof(float)) + align64((size_t)nb * sizeof(float))
           + align64((size_t)nb * sizeof(int32_t)) + align64((size_t)gp * sizeof(float));
}

static act_row act_at(char *base, size_t row_bytes, int m, int nb) {
    act_row r;
    char *p = base + (size_t)m * row_bytes;
    int nvec = (nb + 1) / 2;
    r.xq = (int8_t *)p; p += align64((size_t)nb * QK);
    r.dx = (float *)p; p += align64((size_t)nvec * 8 * sizeof(float));
    r.db = (float *)p; p += align64((size_t)nb * sizeof(float));
    r.xs = (int32_t *)p; p += align64((size_t)nb * sizeof(int32_t));
    r.Z = (float *)p;
    return r;
}

/* Position of column c (0..31) of block b in the interleaved activation layout. */
static inline size_t xq_index(int b, int c, int nb) {
    int pair = b / 2;
    if (2 * pair + 1 >= nb) return (size_t)b * QK + c;  /* unpaired last block: natural order */
    int lane = b & 1, half = c >= 16;
    return (size_t)pair * 64 + half * 32 + lane * 16 + (c & 15);
}

/* Quantize one activation row (scalar; also fills every field the AVX2 path reads). */
static void quantize_row_scalar(const float *x, act_row r, int k, int nb, int bpg, int gp) {
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * QK;
        float amax = 0.0f;
        for (int c = 0; c < QK; c++) {
            float a = fabsf(xb[c]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int c = 0; c < QK; c++) {
            int v = (int)nearbyintf(xb[c] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            r.xq[xq_index(b, c, nb)] = (int8_t)v;
            sum += v;
        }
        r.db[b] = d;
        r.xs[b] = sum;
        float *dv = r.dx + (size_t)(b / 2) * 8;
        if ((b & 1) == 0 && b + 1 == nb) {
            for (int i = 0; i < 8; i++) dv[i] = d;
        } else {
            for (int i = 0; i < 4; i++) dv[(b & 1) * 4 + i] = d;
        }
    }
    int groups = nb / bpg;
    for (int g = 0; g < gp; g++) {
        float z = 0.0f;
        if (g < groups)
            for (int b = g * bpg; b < (g + 1) * bpg; b++) z += r.db[b] * (float)r.xs[b];
        r.Z[g] = z;
    }
    (void)k;
}

/* Scalar kernel: output rows [n0, n1). */
static void q4_rows_scalar(const uint8_t *w, const float *scale, const float *sz, const float *bias, char *acts,
                           size_t row_bytes, float *y, int m_rows, int n_out, int nb, int bps, int gp, int bpg,
                           int n0, int n1) {
    (void)bpg;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wn = w + (size_t)n * nb * 16;
        const float *sn = scale + (size_t)n * (nb / bps);
        const float *szn = sz + (size_t)n * gp;
        for (int m = 0; m < m_rows; m++) {
            act_row r = act_at(acts, row_bytes, m, nb);
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *wb = wn + (size_t)b * 16;
                int32_t isum = 0;
                for (int i = 0; i < 16; i++) {
                    isum += (int32_t)(wb[i] & 15) * r.xq[xq_index(b, i, nb)];
                    isum += (int32_t)(wb[i] >> 4) * r.xq[xq_index(b, i + 16, nb)];
                }
                acc += sn[b / bps] * r.db[b] * (float)isum;
            }
            for (int g = 0; g < gp; g++) acc -= szn[g] * r.Z[g];
            y[(size_t)m * n_out + n] = acc + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- int8 weights (one scale per output row): the same activation blocks, weights stored in the same
 * interleaved order as the activations, so position i of a row's weights meets position i of the activations.
 * y[m, n] = s[n] * sum_b d[m, b] * sum_{j in b} w[n, j] * xq[m, j]. */

/* The block of interleaved position i (see xq_index). */
static inline int q8_block_of(size_t i, int nb) {
    int pair = (int)(i / 64);
    if (2 * pair + 1 >= nb) return (int)(i / QK);
    return 2 * pair + (int)((i % 32) / 16);
}

static void q8_rows_scalar(const int8_t *w, const float *scale, const float *bias, char *acts, size_t row_bytes,
                           float *y, int m_rows, int n_out, int nb, int n0, int n1) {
    size_t k = (size_t)nb * QK;
    for (int n = n0; n < n1; n++) {
        const int8_t *wn = w + (size_t)n * k;
        for (int m = 0; m < m_rows; m++) {
            act_row r = act_at(acts, row_bytes, m, nb);
            float acc = 0.0f;
            int32_t isum = 0;
            int cur = q8_block_of(0, nb);
            for (size_t i = 0; i < k; i++) {
                int b = q8_block_of(i, nb);
                if (b != cur) {
                    acc += r.db[cur] * (float)isum;
                    isum = 0;
                    cur = b;
                }
                isum += (int32_t)wn[i] * r.xq[i];
            }
            acc += r.db[cur] * (float)isum;
            y[(size_t)m * n_out + n] = scale[n] * acc + (bias ? bias[n] : 0.0f);
        }
    }
}

#ifdef SLM_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* Software prefetch of the weights two tiles ahead (the same columns, 2 * NR rows further on): at batch 1 each
 * token streams every weight once from DRAM or L3, which the hardware prefetcher alone does not keep up with.
 * Prefetches never fault, so running past the last row is harmless (the address is
 * formed as an integer, never as a pointer beyond the array). */
#define PREFETCH_AHEAD(base, offset) _mm_prefetch((const char *)((uintptr_t)(base) + (offset)), _MM_HINT_T0)

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Quantize one activation row with AVX2 (same arithmetic as the scalar version: x * (127 / max|x|),
 * rounded to nearest even). */
AVX2 static void quantize_row_avx2(const float *x, act_row r, int nb, int bpg, int gp, int quad) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 vi = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* block sum of the codes */
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* pack to int8 in column order: packs works per 128-bit lane, the permute restores the order */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);  /* cols 0..15, 16..31 */
        int pair = b / 2;
        if (2 * pair + 1 >= nb) {
            _mm256_storeu_si256((__m256i *)(r.xq + (size_t)b * QK), p);
        } else if (quad && b < nb / 4 * 4) {  /* AVX-512 layout: the quad's four low halves, then its high halves */
            int8_t *dst = r.xq + (size_t)(b / 4) * 128 + (b & 3) * 16;
            _mm_storeu_si128((__m128i *)dst, lo);
            _mm_storeu_si128((__m128i *)(dst + 64), hi);
        } else {
            int8_t *dst = r.xq + (size_t)pair * 64 + (b & 1) * 16;
            _mm_storeu_si128((__m128i *)dst, lo);
            _mm_storeu_si128((__m128i *)(dst + 32), hi);
        }
        r.db[b] = d;
        r.xs[b] = _mm_cvtsi128_si32(s4);
        float *dv = r.dx + (size_t)pair * 8;
        if ((b & 1) == 0 && b + 1 == nb) {
            _mm256_storeu_ps(dv, _mm256_set1_ps(d));
        } else {
            _mm_storeu_ps(dv + (b & 1) * 4, _mm_set1_ps(d));
        }
    }
    int groups = nb / bpg;
    for (int g = 0; g < gp; g++) {
        float z = 0.0f;
        if (g < groups)
            for (int b = g * bpg; b < (g + 1) * bpg; b++) z += r.db[b] * (float)r.xs[b];
        r.Z[g] = z;
    }
}

/* i32 block-pair sums (lanes 0..3: block b, 4..7: block b + 1) of weights `w` (32 bytes) with activations. */
#define PAIR_DOT(lo, hi, xp) \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(xp))), \
                                       _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)((xp) + 32)))), ones)

/* MT activation rows against NR consecutive output rows (MT * NR <= 4). MT and NR are constants at every call
 * site, so the loops over them unroll and the MT * NR accumulators stay in registers; several accumulators also
 * keep several independent FMA chains in flight, which is what a single row (decode at batch 1) needs. */
AVX2 static inline __attribute__((always_inline)) void q4_tile_avx2(
        const uint8_t *w0, size_t wstride, const float *s0, size_t sstride, const float *sz0, size_t szstride,
        act_row *r, float out[4][4], const int MT, const int NR, int nb, int bps, int gp) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm256_setzero_ps();
    int npairs = nb / 2;
    if (bps % 2 == 0) {
        /* a scale covers bps / 2 whole pairs: sum d * isum per scale entry, then scale once */
        int pps = bps / 2, ns = nb / bps;
        for (int e = 0; e < ns; e++) {
            __m256 part[4][4];
            for (int t = 0; t < MT; t++)
                for (int u = 0; u < NR; u++) part[t][u] = _mm256_setzero_ps();
            for (int p = e * pps; p < (e + 1) * pps; p++) {
                __m256 dx[4];
                for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
                for (int u = 0; u < NR; u++) {
                    PREFETCH_AHEAD(w0, (2 * NR + u) * wstride + (size_t)p * 32);
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)p * 32));
                    __m256i lo = _mm256_and_si256(wv, mask);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
                    for (int t = 0; t < MT; t++) {
                        __m256i isum = PAIR_DOT(lo, hi, r[t].xq + (size_t)p * 64);
                        part[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dx[t], part[t][u]);
                    }
                }
            }
            for (int u = 0; u < NR; u++) {
                __m256 sv = _mm256_broadcast_ss(s0 + u * sstride + e);
                for (int t = 0; t < MT; t++) acc[t][u] = _mm256_fmadd_ps(part[t][u], sv, acc[t][u]);
            }
        }
    } else {
        /* one scale per block (bps == 1): a pair's two scales spread over the two lanes */
        const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (int p = 0; p < npairs; p++) {
            __m256 dx[4];
            for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
            for (int u = 0; u < NR; u++) {
                PREFETCH_AHEAD(w0, (2 * NR + u) * wstride + (size_t)p * 32);
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)p * 32));
                __m256i lo = _mm256_and_si256(wv, mask);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
                __m256 sv = _mm256_permutevar8x32_ps(
                    _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(s0 + u * sstride + 2 * p)))), spread);
                for (int t = 0; t < MT; t++) {
                    __m256i isum = PAIR_DOT(lo, hi, r[t].xq + (size_t)p * 64);
                    acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(sv, dx[t]), acc[t][u]);
                }
            }
        }
        if (nb & 1) {
            /* the last, unpaired block: 16 bytes, activations in natural order, d in all 8 lanes */
            int b = nb - 1;
            for (int u = 0; u < NR; u++) {
                __m128i w16 = _mm_loadu_si128((const __m128i *)(w0 + u * wstride + (size_t)b * 16));
                __m256i wv = _mm256_and_si256(
                    _mm256_inserti128_si256(_mm256_castsi128_si256(w16), _mm_srli_epi16(w16, 4), 1), mask);
                __m256 sv = _mm256_broadcast_ss(s0 + u * sstride + b);
                for (int t = 0; t < MT; t++) {
                    __m256i isum = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(wv, _mm256_load_si256((const __m256i *)(r[t].xq + (size_t)b * QK))), ones);
                    __m256 f = _mm256_mul_ps(sv, _mm256_load_ps(r[t].dx + (size_t)(b / 2) * 8));
                    acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc[t][u]);
                }
            }
        }
    }
    /* zero points: acc -= sz[n, :] * Z[m, :] (both zero-padded to gp, a multiple of 8) */
    for (int g = 0; g < gp; g += 8) {
        for (int u = 0; u < NR; u++) {
            __m256 s = _mm256_loadu_ps(sz0 + u * szstride + g);
            for (int t = 0; t < MT; t++) acc[t][u] = _mm256_fnmadd_ps(s, _mm256_load_ps(r[t].Z + g), acc[t][u]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = hsum8(acc[t][u]);
}

/* The row loop shared by every SIMD level: tiles of MT activation rows x NR output rows (MT * NR <= 4 accumulators),
 * `TILE_(MT, NR)` filling out[t][u], then `Y_` (an expression of out[t][u], n, u and bn, the bias) stored. */
#define ROWS_LOOP(TILE_, Y_)                                                                              \
    for (int m0 = 0; m0 < m_rows; m0 += 4) {                                                              \
        int mt = m_rows - m0 < 4 ? m_rows - m0 : 4;                                                       \
        int nr = 4 / mt; /* output rows per tile: four accumulators in all */                             \
        act_row r[4];                                                                                     \
        for (int t = 0; t < mt; t++) r[t] = act_at(acts, row_bytes, m0 + t, nb);                          \
        for (int n = n0; n < n1;) {                                                                       \
            float out[4][4] = {{0}};                                                                      \
            int u_n = n + nr <= n1 ? nr : 1;                                                              \
            if (u_n == 1) {                                                                               \
                switch (mt) {                                                                             \
                    case 1: TILE_(1, 1); break;                                                           \
                    case 2: TILE_(2, 1); break;                                                           \
                    case 3: TILE_(3, 1); break;                                                           \
                    default: TILE_(4, 1); break;                                                          \
                }                                                                                         \
            } else {                                                                                      \
                switch (mt) {                                                                             \
                    case 1: TILE_(1, 4); break;                                                           \
                    case 2: TILE_(2, 2); break;                                                           \
                    case 3: TILE_(3, 1); break;                                                           \
                    default: TILE_(4, 1); break;                                                          \
                }                                                                                         \
            }                                                                                             \
            for (int u = 0; u < u_n; u++) {                                                               \
                float bn = bias ? bias[n + u] : 0.0f;                                                     \
                for (int t = 0; t < mt; t++) y[(size_t)(m0 + t) * n_out + n + u] = Y_;                    \
            }                                                                                             \
            n += u_n;                                                                                     \
        }                                                                                                 \
    }

#define TILE(MT_, NR_) q4_tile_avx2(w + (size_t)n * wstride, wstride, scale + (size_t)n * ns, ns, sz + (size_t)n * gp, \
                                    gp, r, out, MT_, NR_, nb, bps, gp)

AVX2 static void q4_rows_avx2(const uint8_t *w, const float *scale, const float *sz, const float *bias, char *acts,
                              size_t row_bytes, float *y, int m_rows, int n_out, int nb, int bps, int gp, int n0, int n1) {
    size_t ns = (size_t)(nb / bps), wstride = (size_t)nb * 16;
    ROWS_LOOP(TILE, out[t][u] + bn)
}

/* int8 x int8 with AVX2: maddubs needs one unsigned operand, so |w| meets x with w's sign moved onto it
 * (`sign`); |w| <= 128 and |x| <= 127 keep each i16 pair sum below 32767. */
AVX2 static inline __attribute__((always_inline)) __m256i q8_dot32(__m256i w, __m256i x, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
}

/* The unpaired last block of an odd block count (natural order), added into acc. */
AVX2 static inline __attribute__((always_inline)) void q8_last_block_avx2(
        const int8_t *w0, size_t wstride, act_row *r, __m256 acc[4][4], const int MT, const int NR, int nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (!(nb & 1)) return;
    int b = nb - 1;
    for (int u = 0; u < NR; u++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)b * QK));
        for (int t = 0; t < MT; t++) {
            __m256i isum = q8_dot32(wv, _mm256_load_si256((const __m256i *)(r[t].xq + (size_t)b * QK)), ones);
            acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_load_ps(r[t].dx + (size_t)(b / 2) * 8), acc[t][u]);
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void q8_tile_avx2(
        const int8_t *w0, size_t wstride, act_row *r, float out[4][4], const int MT, const int NR, int nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm256_setzero_ps();
    int npairs = nb / 2;
    for (int p = 0; p < npairs; p++) {
        __m256 dx[4];
        for (int t = 0; t < MT; t++) dx[t] = _mm256_load_ps(r[t].dx + (size_t)p * 8);
        for (int u = 0; u < NR; u++) {
            PREFETCH_AHEAD(w0, (2 * NR + u) * wstride + (size_t)p * 64);
            const int8_t *wp = w0 + u * wstride + (size_t)p * 64;
            __m256i wl = _mm256_loadu_si256((const __m256i *)wp), wh = _mm256_loadu_si256((const __m256i *)(wp + 32));
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = r[t].xq + (size_t)p * 64;
                __m256i isum = _mm256_add_epi32(q8_dot32(wl, _mm256_load_si256((const __m256i *)xp), ones),
                                                q8_dot32(wh, _mm256_load_si256((const __m256i *)(xp + 32)), ones));
                acc[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dx[t], acc[t][u]);
            }
        }
    }
    q8_last_block_avx2(w0, wstride, r, acc, MT, NR, nb);
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = hsum8(acc[t][u]);
}

#define TILE8(MT_, NR_) q8_tile_avx2(w + (size_t)n * wstride, wstride, r, out, MT_, NR_, nb)

AVX2 static void q8_rows_avx2(const int8_t *w, const float *scale, const float *bias, char *acts, size_t row_bytes,
                              float *y, int m_rows, int n_out, int nb, int n0, int n1) {
    size_t wstride = (size_t)nb * QK;
    ROWS_LOOP(TILE8, scale[n + u] * out[t][u] + bn)
}

/* ---- AVX-512 VNNI (Cascade Lake and later, Zen 4): `vpdpbusd` multiplies unsigned bytes by signed bytes and adds
 * each group of four products into an i32 lane in one instruction, where AVX2 needs maddubs + madd; 512-bit
 * vectors take four blocks at once.
 *
 * int4: the activations of a quad of blocks b..b+3 are stored (b[0:16], b+1[0:16], b+2[0:16], b+3[0:16],
 * b[16:32], ..., b+3[16:32]) (`quad` layout, 128 bytes; blocks after the last whole quad keep the pair layout, so
 * the same workspace serves the AVX2 tail code). A 64-byte load of the weights is the quad's four 16-byte
 * blocks: `& 0x0F` gives columns 0..15 of block b + j in 128-bit lane j and `>> 4` columns 16..31, so two
 * dpbusd (low halves, high halves) leave lane j holding block b + j's four partial sums, scaled by
 * d[b + j] * s[n, g(b + j)] in one multiply-add. The weight layout is the AVX2 one.
 *
 * int8: the weights are stored in the activations' pair order (see prepare_q8), so a 64-byte load of each
 * covers one block pair with lane j in {0, 2} from block b and {1, 3} from block b + 1; dpbusd needs one
 * unsigned operand, so |w| meets x with w's sign moved onto x (a masked negation: AVX-512 has no `sign`). */
#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

/* The per-lane scale vector of output row `s_row` for the quad starting at block b (b a multiple of 4). */
AVX512 static inline __attribute__((always_inline)) __m512 quad_scales(const float *s_row, int b, int bps) {
    if (bps % 4 == 0) return _mm512_set1_ps(s_row[b / bps]);
    if (bps == 2)
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(s_row + b / 2)))));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(s_row + b)));  /* bps == 1 */
}

/* Whether the quad code handles this scale layout (else the AVX2 code runs): scales per 1, 2 or 4k blocks. */
static int quad_scales_ok(int bps) { return bps == 1 || bps == 2 || bps % 4 == 0; }

AVX512 static inline __attribute__((always_inline)) void q4_tile_avx512(
        const uint8_t *w0, size_t wstride, const float *s0, size_t sstride, const float *sz0, size_t szstride,
        act_row *r, float out[4][4], const int MT, const int NR, int nb, int bps, int gp) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i spread4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm512_setzero_ps();
    int nq = nb / 4;
    for (int q = 0; q < nq; q++) {
        __m512 dv[4];
        for (int t = 0; t < MT; t++)
            dv[t] = _mm512_permutexvar_ps(spread4, _mm512_castps128_ps512(_mm_loadu_ps(r[t].db + (size_t)q * 4)));
        for (int u = 0; u < NR; u++) {
            PREFETCH_AHEAD(w0, (2 * NR + u) * wstride + (size_t)q * 64);
            __m512i wv = _mm512_loadu_si512((const void *)(w0 + u * wstride + (size_t)q * 64));
            __m512i lo = _mm512_and_si512(wv, mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
            __m512 sv = quad_scales(s0 + u * sstride, 4 * q, bps);
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = r[t].xq + (size_t)q * 128;
                __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512((const void *)xp));
                isum = _mm512_dpbusd_epi32(isum, hi, _mm512_load_si512((const void *)(xp + 64)));
                acc[t][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv[t], sv), acc[t][u]);
            }
        }
    }
    /* the blocks after the last whole quad (pair layout: at most one pair and one single block) */
    __m256 tail[4][4];
    const __m256i mask8 = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) tail[t][u] = _mm256_setzero_ps();
    int b = 4 * nq;
    if (b + 1 < nb) {
        int p = b / 2;
        for (int u = 0; u < NR; u++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w0 + u * wstride + (size_t)p * 32));
            __m256i lo = _mm256_and_si256(wv, mask8);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask8);
            const float *sr = s0 + u * sstride;
            __m256 sv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(sr[b / bps])), _mm_set1_ps(sr[(b + 1) / bps]), 1);
            for (int t = 0; t < MT; t++) {
                const int8_t *xp = r[t].xq + (size_t)p * 64;
                __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_load_si256((const __m256i *)xp));
                isum = _mm256_dpbusd_epi32(isum, hi, _mm256_load_si256((const __m256i *)(xp + 32)));
                tail[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum),
                                             _mm256_mul_ps(sv, _mm256_load_ps(r[t].dx + (size_t)p * 8)), tail[t][u]);
            }
        }
        b += 2;
    }
    if (b < nb) {  /* one unpaired last block, natural order */
        for (int u = 0; u < NR; u++) {
            __m128i w16 = _mm_loadu_si128((const __m128i *)(w0 + u * wstride + (size_t)b * 16));
            __m256i wv = _mm256_and_si256(
                _mm256_inserti128_si256(_mm256_castsi128_si256(w16), _mm_srli_epi16(w16, 4), 1), mask8);
            __m256 sv = _mm256_set1_ps(s0[u * sstride + b / bps]);
            for (int t = 0; t < MT; t++) {
                __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv,
                                                   _mm256_load_si256((const __m256i *)(r[t].xq + (size_t)b * QK)));
                tail[t][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum),
                                             _mm256_mul_ps(sv, _mm256_load_ps(r[t].dx + (size_t)(b / 2) * 8)), tail[t][u]);
            }
        }
    }
    for (int g = 0; g < gp; g += 8) {
        for (int u = 0; u < NR; u++) {
            __m256 s = _mm256_loadu_ps(sz0 + u * szstride + g);
            for (int t = 0; t < MT; t++) tail[t][u] = _mm256_fnmadd_ps(s, _mm256_load_ps(r[t].Z + g), tail[t][u]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = _mm512_reduce_add_ps(acc[t][u]) + hsum8(tail[t][u]);
}

#define TILE512(MT_, NR_) q4_tile_avx512(w + (size_t)n * wstride, wstride, scale + (size_t)n * ns, ns, \
                                         sz + (size_t)n * gp, gp, r, out, MT_, NR_, nb, bps, gp)

AVX512 static void q4_rows_avx512(const uint8_t *w, const float *scale, const float *sz, const float *bias, char *acts,
                                  size_t row_bytes, float *y, int m_rows, int n_out, int nb, int bps, int gp, int n0, int n1) {
    size_t ns = (size_t)(nb / bps), wstride = (size_t)nb * 16;
    ROWS_LOOP(TILE512, out[t][u] + bn)
}

AVX512 static inline __attribute__((always_inline)) __m512i q8_dot64(__m512i w, __m512i x) {
    __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);  /* x * sign(w) */
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sx);
}

AVX512 static inline __attribute__((always_inline)) void q8_tile_avx512(
        const int8_t *w0, size_t wstride, act_row *r, float out[4][4], const int MT, const int NR, int nb) {
    __m512 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) acc[t][u] = _mm512_setzero_ps();
    int npairs = nb / 2;
    for (int p = 0; p < npairs; p++) {
        __m512 dv[4];
        for (int t = 0; t < MT; t++) dv[t] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_load_ps(r[t].dx + (size_t)p * 8))));
        for (int u = 0; u < NR; u++) {
            PREFETCH_AHEAD(w0, (2 * NR + u) * wstride + (size_t)p * 64);
            __m512i wv = _mm512_loadu_si512((const void *)(w0 + u * wstride + (size_t)p * 64));
            for (int t = 0; t < MT; t++) {
                __m512i isum = q8_dot64(wv, _mm512_load_si512((const void *)(r[t].xq + (size_t)p * 64)));
                acc[t][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dv[t], acc[t][u]);
            }
        }
    }
    __m256 tail[4][4];
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) tail[t][u] = _mm256_setzero_ps();
    q8_last_block_avx2(w0, wstride, r, tail, MT, NR, nb);
    for (int t = 0; t < MT; t++)
        for (int u = 0; u < NR; u++) out[t][u] = _mm512_reduce_add_ps(acc[t][u]) + hsum8(tail[t][u]);
}

#define TILE8_512(MT_, NR_) q8_tile_avx512(w + (size_t)n * wstride, wstride, r, out, MT_, NR_, nb)

AVX512 static void q8_rows_avx512(const int8_t *w, const float *scale, const float *bias, char *acts, size_t row_bytes,
                                  float *y, int m_rows, int n_out, int nb, int n0, int n1) {
    size_t wstride = (size_t)nb * QK;
    ROWS_LOOP(TILE8_512, scale[n + u] * out[t][u] + bn)
}
#endif /* SLM_X86 */

/* 1 when the AVX2 + FMA kernels can run on this CPU, else 0. */
int slm_cpu_has_avx2(void) {
#ifdef SLM_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* The best code this CPU runs: 2 AVX-512 VNNI (with F, BW, VL), 1 AVX2 + FMA, 0 scalar. */
int slm_cpu_level(void) {
#ifdef SLM_X86
    if (!slm_cpu_has_avx2()) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#else
    return 0;
#endif
}

/* Quantize the activation rows into the per-thread workspace (`quad`: the AVX-512 int4 layout); NULL when it
 * cannot be allocated. */
static char *quantize_acts(const float *x, int m_rows, int k, int bpg, int gp, int level, int quad, size_t *row_bytes) {
    int nb = k / QK;
    *row_bytes = act_row_bytes(nb, gp);
    char *acts = (char *)workspace(*row_bytes * (size_t)m_rows);
    if (!acts) return NULL;
    for (int m = 0; m < m_rows; m++) {
        act_row r = act_at(acts, *row_bytes, m, nb);
#ifdef SLM_X86
        if (level >= 1) {
            quantize_row_avx2(x + (size_t)m * k, r, nb, bpg, gp, quad);
            continue;
        }
#endif
        quantize_row_scalar(x + (size_t)m * k, r, k, nb, bpg, gp);
    }
    return acts;
}

/* Threads and chunks of output rows: a few chunks per thread, taken dynamically, so a thread slowed by other
 * load takes fewer; one thread when the layer is too small to pay for a parallel region. */
static int split_rows(int n_out, int k, int nthreads, int *nt_out) {
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > 1 && (long)n_out * k < 64 * 1024) nt = 1;
    int nchunks = nt == 1 ? 1 : 4 * nt;
    int chunk = (n_out + nchunks - 1) / nchunks;
    *nt_out = nt;
    return (chunk + 7) & ~7;
}

/* The code level to run: the caller's limit (from torch's kernel level), capped by what the CPU has. */
static int resolve_level(int level) {
    int cpu = slm_cpu_level();
    return level < cpu ? (level < 0 ? 0 : level) : cpu;
}

/* y (m_rows, n_out) = x (m_rows, k) @ W^T (+ bias), int4 W. Returns 0, or -1 when the workspace cannot be
 * allocated.
 *   w:     (n_out, k / 32, 16) uint8, the layout described at the top
 *   scale: (n_out, k / 32 / bps) fp32
 *   sz:    (n_out, gp) fp32, scale * zero per group, zero-padded to gp (a multiple of 8)
 *   bpg:   blocks per zero-point group;  level: the highest code level allowed (0 scalar, 1 AVX2, 2 AVX-512 VNNI) */
int slm_q4_gemv(const float *x, const uint8_t *w, const float *scale, const float *sz, const float *bias, float *y,
                int m_rows, int k, int n_out, int bps, int bpg, int gp, int nthreads, int level) {
    int nb = k / QK, nt;
    size_t row_bytes;
    level = resolve_level(level);
    if (level == 2 && !quad_scales_ok(bps)) level = 1;
    char *acts = quantize_acts(x, m_rows, k, bpg, gp, level, level == 2, &row_bytes);
    if (!acts) return -1;
    int chunk = split_rows(n_out, k, nthreads, &nt);
    int nchunks = (n_out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int c = 0; c < nchunks; c++) {
        int n0 = c * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
#ifdef SLM_X86
        if (level == 2) {
            q4_rows_avx512(w, scale, sz, bias, acts, row_bytes, y, m_rows, n_out, nb, bps, gp, n0, n1);
            continue;
        }
        if (level == 1) {
            q4_rows_avx2(w, scale, sz, bias, acts, row_bytes, y, m_rows, n_out, nb, bps, gp, n0, n1);
            continue;
        }
#endif
        q4_rows_scalar(w, scale, sz, bias, acts, row_bytes, y, m_rows, n_out, nb, bps, gp, bpg, n0, n1);
    }
    return 0;
}

/* The same for int8 W: w (n_out, k) int8 in the interleaved block-pair order, scale (n_out,) fp32. */
int slm_q8_gemv(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                int m_rows, int k, int n_out, int nthreads, int level) {
    int nb = k / QK, nt;
    size_t row_bytes;
    level = resolve_level(level);
    char *acts = quantize_acts(x, m_rows, k, nb, 0, level, 0, &row_bytes);
    if (!acts) return -1;
    int chunk = split_rows(n_out, k, nthreads, &nt);
    int nchunks = (n_out + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int c = 0; c < nchunks; c++) {
        int n0 = c * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
#ifdef SLM_X86
        if (level == 2) {
            q8_rows_avx512(w, scale, bias, acts, row_bytes, y, m_rows, n_out, nb, n0, n1);
            continue;
        }
        if (level == 1) {
            q8_rows_avx2(w, scale, bias, acts, row_bytes, y, m_rows, n_out, nb, n0, n1);
            continue;
        }
#endif
        q8_rows_scalar(w, scale, bias, acts, row_bytes, y, m_rows, n_out, nb, n0, n1);
    }
    return 0;
}

/* ---- Dequantization for many-row inputs (prefill, evaluation): the exact weights, w = (q - z) * s for int4 and
 * w = q * s for int8, in fp32, one pass over the checkpoint's own layout (`pack_int4`: byte j of a row holds column
 * 2j in its low nibble and 2j + 1 in its high nibble). The same two fp32 operations as torch's
 * `(q.float() - z.float()) * s`, so the result is bit-identical. Threads: OpenMP over output rows. */
void slm_q4_dequant(const uint8_t *packed, const float *scale, const uint8_t *zero, float *out, int n_out, int k,
                    int group, int nthreads) {
    int groups = k / group, nt = nthreads < 1 ? 1 : nthreads;
    if ((long)n_out * k < 64 * 1024) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < n_out; n++) {
        const uint8_t *p = packed + (size_t)n * (k / 2);
        float *o = out + (size_t)n * k;
        for (int g = 0; g < groups; g++) {
            const float s = scale[(size_t)n * groups + g], z = (float)zero[(size_t)n * groups + g];
            const uint8_t *pg = p + (size_t)g * (group / 2);
            float *og = o + (size_t)g * group;
            for (int j = 0; j < group / 2; j++) {
                og[2 * j] = ((float)(pg[j] & 15) - z) * s;
                og[2 * j + 1] = ((float)(pg[j] >> 4) - z) * s;
            }
        }
    }
}

void slm_q8_dequant(const int8_t *codes, const float *scale, float *out, int n_out, int k, int nthreads) {
    int nt = nthreads < 1 ? 1 : nthreads;
    if ((long)n_out * k < 64 * 1024) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int n = 0; n < n_out; n++) {
        const int8_t *c = codes + (size_t)n * k;
        float *o = out + (size_t)n * k;
        const float s = scale[n];
        for (int j = 0; j < k; j++) o[j] = (float)c[j] * s;
    }
}
