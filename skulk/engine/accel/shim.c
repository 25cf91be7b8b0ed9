/*
 * Skulk fast-BLAS shim.
 *
 * Theory of operation
 * -------------------
 * The Linux `mlx[cpu]` wheel's libmlx.so imports `cblas_sgemm`, `cblas_dgemm`
 * and `cblas_cgemm` as ordinary undefined dynamic symbols and gets them from a
 * bundled reference (netlib) libblas. The dynamic linker resolves a symbol by
 * searching the global scope first (the executable, its dependencies and every
 * object loaded with RTLD_GLOBAL) and only then the dlopen-ed object's own
 * dependencies. This library defines those three entry points; once it sits in
 * the global scope before `import mlx.core`, libmlx.so binds to it instead of
 * the reference BLAS.
 *
 * The shim links against nothing. skulk.engine.accel loads an optimized BLAS
 * (OpenBLAS from a PyPI wheel, which exports only *prefixed* symbols such as
 * `scipy_cblas_sgemm`) with RTLD_LOCAL so none of its symbols leak into the
 * global scope, and hands the function addresses to `skulk_blas_bind`
 * together with the reference BLAS's own addresses. The shim forwards every
 * call to the selected table: the fast one, or the reference one after
 * `skulk_blas_select(0)` (used when the self-check fails after mlx is bound).
 *
 * Invariants
 * ----------
 * - A forwarding entry point never calls through a null pointer: if no table
 *   is bound (the library was loaded by something other than
 *   skulk.engine.accel) it reports the fault on stderr and aborts rather than
 *   compute garbage.
 * - The integer width of the fast table may be 32 or 64 bits (OpenBLAS ILP64
 *   builds); the caller's `int` arguments are widened losslessly.
 * - `skulk_blas_calls()` counts forwarded calls, so skulk.engine.accel can
 *   prove that mlx really routes its matmuls through this library.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define SKULK_BLAS_ABI 1

typedef void (*sgemm32_fn)(int, int, int, int32_t, int32_t, int32_t, float,
                           const float *, int32_t, const float *, int32_t,
                           float, float *, int32_t);
typedef void (*dgemm32_fn)(int, int, int, int32_t, int32_t, int32_t, double,
                           const double *, int32_t, const double *, int32_t,
                           double, double *, int32_t);
typedef void (*cgemm32_fn)(int, int, int, int32_t, int32_t, int32_t,
                           const void *, const void *, int32_t, const void *,
                           int32_t, const void *, void *, int32_t);
typedef void (*sgemm64_fn)(int, int, int, int64_t, int64_t, int64_t, float,
                           const float *, int64_t, const float *, int64_t,
                           float, float *, int64_t);
typedef void (*dgemm64_fn)(int, int, int, int64_t, int64_t, int64_t, double,
                           const double *, int64_t, const double *, int64_t,
                           double, double *, int64_t);
typedef void (*cgemm64_fn)(int, int, int, int64_t, int64_t, int64_t,
                           const void *, const void *, int64_t, const void *,
                           int64_t, const void *, void *, int64_t);

struct blas_table {
    int ilp64; /* 1 when the integer arguments are 64-bit */
    void *sgemm;
    void *dgemm;
    void *cgemm;
};

static struct blas_table fast_table;
static struct blas_table reference_table;
/* 0: nothing bound, 1: fast, 2: reference. Read on every call. */
static int selected;
static uint64_t calls;

__attribute__((visibility("default"))) int skulk_blas_abi(void) {
    return SKULK_BLAS_ABI;
}

/*
 * Bind both tables and select the fast one. Returns 0 on success, -1 when an
 * sgemm pointer is missing (nothing is changed then).
 */
__attribute__((visibility("default"))) int skulk_blas_bind(
    int fast_ilp64, void *fast_sgemm, void *fast_dgemm, void *fast_cgemm,
    void *ref_sgemm, void *ref_dgemm, void *ref_cgemm) {
    if (fast_sgemm == NULL || ref_sgemm == NULL) {
        return -1;
    }
    fast_table.ilp64 = fast_ilp64 ? 1 : 0;
    fast_table.sgemm = fast_sgemm;
    fast_table.dgemm = fast_dgemm;
    fast_table.cgemm = fast_cgemm;
    reference_table.ilp64 = 0;
    reference_table.sgemm = ref_sgemm;
    reference_table.dgemm = ref_dgemm;
    reference_table.cgemm = ref_cgemm;
    __atomic_store_n(&selected, 1, __ATOMIC_RELEASE);
    return 0;
}

/* Select the fast (1) or the reference (0) table; returns the previous one. */
__attribute__((visibility("default"))) int skulk_blas_select(int fast) {
    int previous = __atomic_load_n(&selected, __ATOMIC_ACQUIRE);
    if (previous != 0) {
        __atomic_store_n(&selected, fast ? 1 : 2, __ATOMIC_RELEASE);
    }
    return previous == 1;
}

/* 1 when the fast table is selected, 0 for the reference one, -1 unbound. */
__attribute__((visibility("default"))) int skulk_blas_selected(void) {
    int current = __atomic_load_n(&selected, __ATOMIC_ACQUIRE);
    return current == 0 ? -1 : (current == 1);
}

__attribute__((visibility("default"))) uint64_t skulk_blas_calls(void) {
    return __atomic_load_n(&calls, __ATOMIC_RELAXED);
}

static const struct blas_table *current_table(const char *name) {
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
    int current = __atomic_load_n(&selected, __ATOMIC_ACQUIRE);
    const struct blas_table *table =
        current == 1 ? &fast_table : (current == 2 ? &reference_table : NULL);
    if (table == NULL) {
        fprintf(stderr,
                "skulk fast-BLAS shim: %s called before skulk_blas_bind; "
                "load the shim only through skulk.engine.accel\n",
                name);
        abort();
    }
    return table;
}

static void *entry(const struct blas_table *table, void *fn, const char *name) {
    if (fn == NULL) {
        fprintf(stderr, "skulk fast-BLAS shim: no %s bound (%s table)\n", name,
                table == &fast_table ? "fast" : "reference");
        abort();
    }
    return fn;
}

__attribute__((visibility("default"))) void cblas_sgemm(
    int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
    const float *a, int lda, const float *b, int ldb, float beta, float *c,
    int ldc) {
    const struct blas_table *t = current_table("cblas_sgemm");
    void *fn = entry(t, t->sgemm, "cblas_sgemm");
    if (t->ilp64) {
        ((sgemm64_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    } else {
        ((sgemm32_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    }
}

__attribute__((visibility("default"))) void cblas_dgemm(
    int order, int trans_a, int trans_b, int m, int n, int k, double alpha,
    const double *a, int lda, const double *b, int ldb, double beta, double *c,
    int ldc) {
    const struct blas_table *t = current_table("cblas_dgemm");
    void *fn = entry(t, t->dgemm, "cblas_dgemm");
    if (t->ilp64) {
        ((dgemm64_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    } else {
        ((dgemm32_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    }
}

__attribute__((visibility("default"))) void cblas_cgemm(
    int order, int trans_a, int trans_b, int m, int n, int k,
    const void *alpha, const void *a, int lda, const void *b, int ldb,
    const void *beta, void *c, int ldc) {
    const struct blas_table *t = current_table("cblas_cgemm");
    void *fn = entry(t, t->cgemm, "cblas_cgemm");
    if (t->ilp64) {
        ((cgemm64_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    } else {
        ((cgemm32_fn)fn)(order, trans_a, trans_b, m, n, k, alpha, a, lda, b,
                         ldb, beta, c, ldc);
    }
}
