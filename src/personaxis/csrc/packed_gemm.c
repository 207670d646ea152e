/* y[m][n] = x[m][k] · wᵀ for a float32 weight w [n][k] packed as [n / 16][k][16]: blocks of 16 output columns,
 * each the block's columns side by side for every k. Built and loaded by personaxis.compiled_gemm (see its notes).
 *
 * Two versions of the same arithmetic: packed_gemm (AVX2 and FMA) and packed_gemm_avx512 (AVX-512F, compiled for
 * it function by function; called only where the CPU has it). Each thread takes a run of column blocks.
 * - Several rows: tiles of up to 6 rows (AVX2, 12 accumulators of 8 floats) or 12 rows (AVX-512, 12 accumulators of
 *   16 floats) run over all of k with fused multiply-adds; the first tile of each block prefetches the next block,
 *   so that reading the weights overlaps computing with them.
 * - One row with AVX-512 (decoding one sequence: reading the weights is all the work): two blocks at a time, two
 *   independent streams that the hardware prefetchers follow (explicit prefetches made these products slower). With
 *   AVX2 the tiles' prefetching was faster for one row too.
 * Every output is one running sum over k in order, in either version, whatever the number of rows, their tile, the
 * block split or the thread count: a row's result does not depend on the rows beside it or on the instruction set. */
#include <immintrin.h>
#include <stddef.h>

#define AVX512 __attribute__((target("avx512f")))
#define INLINE static inline __attribute__((always_inline))

typedef void (*tile_fn)(int rows, int k_len, const float *x, const float *w, const float *next, float *y,
                        size_t ldy);
typedef void (*pair_fn)(int blocks, int k_len, const float *x, const float *w, float *y);

/* ---- AVX2: 6 rows × 16 columns (two 8-float registers per row) ---- */
#define FMA2(i)                                                                          \
    if (rows > i) {                                                                      \
        __m256 a = _mm256_broadcast_ss(x + (size_t)(i) * k_len + k);                     \
        c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                       \
        c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                       \
    }
#define STORE2(i)                                                                        \
    if (rows > i) {                                                                      \
        _mm256_storeu_ps(y + (size_t)(i) * ldy, c##i##0);                                \
        _mm256_storeu_ps(y + (size_t)(i) * ldy + 8, c##i##1);                            \
    }

INLINE void tile_avx2(const int rows, int k_len, const float *x, const float *w, const float *next, float *y,
                      size_t ldy) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < k_len; k++) {
        __m256 b0 = _mm256_loadu_ps(w + (size_t)k * 16), b1 = _mm256_loadu_ps(w + (size_t)k * 16 + 8);
        if (next) _mm_prefetch((const char *)(next + (size_t)k * 16), _MM_HINT_T0);
        FMA2(0) FMA2(1) FMA2(2) FMA2(3) FMA2(4) FMA2(5)
    }
    STORE2(0) STORE2(1) STORE2(2) STORE2(3) STORE2(4) STORE2(5)
}

static void tile_rows_avx2(int rows, int k_len, const float *x, const float *w, const float *next, float *y,
                           size_t ldy) {
    switch (rows) {
        case 6: tile_avx2(6, k_len, x, w, next, y, ldy); break;
        case 5: tile_avx2(5, k_len, x, w, next, y, ldy); break;
        case 4: tile_avx2(4, k_len, x, w, next, y, ldy); break;
        case 3: tile_avx2(3, k_len, x, w, next, y, ldy); break;
        case 2: tile_avx2(2, k_len, x, w, next, y, ldy); break;
        default: tile_avx2(1, k_len, x, w, next, y, ldy); break;
    }
}

/* ---- AVX-512: 12 rows × 16 columns (one 16-float register per row) ---- */
#define FMA1(i)                                                                          \
    if (rows > i) c##i = _mm512_fmadd_ps(_mm512_set1_ps(x[(size_t)(i) * k_len + k]), b, c##i);
#define STORE1(i) \
    if (rows > i) _mm512_storeu_ps(y + (size_t)(i) * ldy, c##i);

AVX512 INLINE void tile_avx512(const int rows, int k_len, const float *x, const float *w, const float *next, float *y,
                               size_t ldy) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
    __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
    for (int k = 0; k < k_len; k++) {
        __m512 b = _mm512_loadu_ps(w + (size_t)k * 16);
        if (next) _mm_prefetch((const char *)(next + (size_t)k * 16), _MM_HINT_T0);
        FMA1(0) FMA1(1) FMA1(2) FMA1(3) FMA1(4) FMA1(5) FMA1(6) FMA1(7) FMA1(8) FMA1(9) FMA1(10) FMA1(11)
    }
    STORE1(0) STORE1(1) STORE1(2) STORE1(3) STORE1(4) STORE1(5)
    STORE1(6) STORE1(7) STORE1(8) STORE1(9) STORE1(10) STORE1(11)
}

AVX512 static void tile_rows_avx512(int rows, int k_len, const float *x, const float *w, const float *next, float *y,
                                    size_t ldy) {
    switch (rows) {
        case 12: tile_avx512(12, k_len, x, w, next, y, ldy); break;
        case 11: tile_avx512(11, k_len, x, w, next, y, ldy); break;
        case 10: tile_avx512(10, k_len, x, w, next, y, ldy); break;
        case 9: tile_avx512(9, k_len, x, w, next, y, ldy); break;
        case 8: tile_avx512(8, k_len, x, w, next, y, ldy); break;
        case 7: tile_avx512(7, k_len, x, w, next, y, ldy); break;
        case 6: tile_avx512(6, k_len, x, w, next, y, ldy); break;
        case 5: tile_avx512(5, k_len, x, w, next, y, ldy); break;
        case 4: tile_avx512(4, k_len, x, w, next, y, ldy); break;
        case 3: tile_avx512(3, k_len, x, w, next, y, ldy); break;
        case 2: tile_avx512(2, k_len, x, w, next, y, ldy); break;
        default: tile_avx512(1, k_len, x, w, next, y, ldy); break;
    }
}

AVX512 static void pair_avx512(int blocks, int k_len, const float *x, const float *w, float *y) {
    const float *v = w + (size_t)k_len * 16;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0;
    if (blocks == 2) {
        for (int k = 0; k < k_len; k++) {
            __m512 a = _mm512_set1_ps(x[k]);
            c0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + (size_t)k * 16), c0);
            c1 = _mm512_fmadd_ps(a, _mm512_loadu_ps(v + (size_t)k * 16), c1);
        }
        _mm512_storeu_ps(y + 16, c1);
    } else {
        for (int k = 0; k < k_len; k++) c0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_loadu_ps(w + (size_t)k * 16), c0);
    }
    _mm512_storeu_ps(y, c0);
}

/* ---- the split over threads, shared by both versions ---- */
static void run(int m, int n, int k_len, const float *x, const float *packed, float *y, int threads, tile_fn tile,
                int tile_rows, pair_fn pair) {
    const int blocks = n / 16;
    const size_t block_floats = (size_t)k_len * 16;
    if (m == 1 && pair) {
        const int pairs = (blocks + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int p = 0; p < pairs; p++) {
            const int j = 2 * p;
            pair(blocks - j < 2 ? 1 : 2, k_len, x, packed + (size_t)j * block_floats, y + (size_t)j * 16);
        }
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int j = 0; j < blocks; j++) {
        const float *w = packed + (size_t)j * block_floats;
        const float *next = j + 1 < blocks ? w + block_floats : NULL;
        for (int i = 0; i < m; i += tile_rows) {
            const int rows = m - i < tile_rows ? m - i : tile_rows;
            tile(rows, k_len, x + (size_t)i * k_len, w, i == 0 ? next : NULL, y + (size_t)i * n + (size_t)j * 16,
                 (size_t)n);
        }
    }
}

/* Returns the library's interface version (personaxis checks it before use). */
int packed_gemm_version(void) { return 3; }

void packed_gemm(int m, int n, int k_len, const float *x, const float *packed, float *y, int threads) {
    run(m, n, k_len, x, packed, y, threads, tile_rows_avx2, 6, NULL);
}

void packed_gemm_avx512(int m, int n, int k_len, const float *x, const float *packed, float *y, int threads) {
    run(m, n, k_len, x, packed, y, threads, tile_rows_avx512, 12, pair_avx512);
}
