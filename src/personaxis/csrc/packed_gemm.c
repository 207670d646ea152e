/* y[m][n] = x[m][k] · wᵀ for a float32 weight w [n][k] packed as [n / 16][k][16]: blocks of 16 output columns,
 * each the block's columns side by side for every k. Built and loaded by personaxis.compiled_gemm (see its notes).
 *
 * Each thread takes a run of column blocks. For a block, tiles of up to 6 rows run over all of k with 12 AVX2
 * accumulators (6 rows × 16 columns) and fused multiply-adds; the first tile of each block prefetches the next
 * block into the cache, so that reading the weights overlaps computing with them. Every output is one running sum
 * over k in order, whatever the number of rows, their tile, the block split or the thread count: a row's result does
 * not depend on the rows beside it. */
#include <immintrin.h>
#include <stddef.h>

#define ROWS 6
#define ROW_FMA(i)                                                                       \
    if (rows > i) {                                                                      \
        __m256 a = _mm256_broadcast_ss(x + (size_t)(i) * k_len + k);                     \
        c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                       \
        c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                       \
    }
#define ROW_STORE(i)                                                                     \
    if (rows > i) {                                                                      \
        _mm256_storeu_ps(y + (size_t)(i) * ldy, c##i##0);                                \
        _mm256_storeu_ps(y + (size_t)(i) * ldy + 8, c##i##1);                            \
    }

static inline __attribute__((always_inline)) void tile(const int rows, int k_len, const float *x, const float *w,
                                                        const float *next, float *y, size_t ldy) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < k_len; k++) {
        __m256 b0 = _mm256_loadu_ps(w + (size_t)k * 16), b1 = _mm256_loadu_ps(w + (size_t)k * 16 + 8);
        if (next) _mm_prefetch((const char *)(next + (size_t)k * 16), _MM_HINT_T0);
        ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5)
    }
    ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)
}

static void tile_rows(int rows, int k_len, const float *x, const float *w, const float *next, float *y, size_t ldy) {
    switch (rows) {
        case 6: tile(6, k_len, x, w, next, y, ldy); break;
        case 5: tile(5, k_len, x, w, next, y, ldy); break;
        case 4: tile(4, k_len, x, w, next, y, ldy); break;
        case 3: tile(3, k_len, x, w, next, y, ldy); break;
        case 2: tile(2, k_len, x, w, next, y, ldy); break;
        default: tile(1, k_len, x, w, next, y, ldy); break;
    }
}

/* Returns the library's interface version (personaxis checks it before use). */
int packed_gemm_version(void) { return 1; }

void packed_gemm(int m, int n, int k_len, const float *x, const float *packed, float *y, int threads) {
    const int blocks = n / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int j = 0; j < blocks; j++) {
        const float *w = packed + (size_t)j * k_len * 16;
        const float *next = j + 1 < blocks ? w + (size_t)k_len * 16 : NULL;
        for (int i = 0; i < m; i += ROWS) {
            int rows = m - i < ROWS ? m - i : ROWS;
            tile_rows(rows, k_len, x + (size_t)i * k_len, w, i == 0 ? next : NULL, y + (size_t)i * n + (size_t)j * 16,
                      (size_t)n);
        }
    }
}
