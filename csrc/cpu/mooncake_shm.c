/* Hot loops of the shared-memory CPU data plane (mooncake.fast.cpu).
 *
 * Plain C with no Python or torch headers, loaded with ctypes by mooncake/fast/cpu/native.py.  A
 * wheel ships it prebuilt (setup.py compiles it with mooncake._nativebuild.CPU_FLAGS: no -march, so
 * it runs on any CPU of the architecture; the folds pick their vector width at run time); in a source
 * checkout native.py compiles it on first use into the user's cache, keyed by source hash, compiler
 * and flags.  Every function has a pure-Python/torch fallback in native.py, so a machine without
 * the library still works.
 *
 * Bitwise contract: mc_sum_* compute, per element, the left fold ((x0 + x1) + x2) + ... in the
 * inputs' own dtype, which is what mooncake.model.reduce.fold does for SUM over float32/float64
 * (IEEE addition is exact per element; vector and scalar lanes give the same bits).  NaN payloads
 * too: where the input being added is a NaN, the sum is that NaN, quieted, as torch.add(acc, x)
 * returns on x86 (which of two NaN operands an add returns depends on operand order, which the
 * compiler may swap, so each step states it: MC_ADD_* below).
 * tests/fast_cpu/test_fold.py and test_native.py check them against the model, at each width.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MC_ABI 4

int mc_abi(void) { return MC_ABI; }

/* ---- shared words ------------------------------------------------------------------------- */

int64_t mc_load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

void mc_store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Store then full fence: the store is visible before any later load (the sleeper/waker race). */
void mc_store_fence(int64_t *p, int64_t v) {
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void mc_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* ---- futex (process-shared: the word lives in a shared mapping) ------------------------------ */

/* Sleep while *addr == expected, at most timeout_ns.  Returns 0 when woken or the value differed,
 * 1 on timeout, -1 on other errors. */
int mc_futex_wait(int32_t *addr, int32_t expected, int64_t timeout_ns) {
    struct timespec ts;
    ts.tv_sec = timeout_ns / 1000000000LL;
    ts.tv_nsec = timeout_ns % 1000000000LL;
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (r == 0) return 0;
    if (errno == EAGAIN || errno == EINTR) return 0;
    if (errno == ETIMEDOUT) return 1;
    return -1;
}

/* Change the word and wake every sleeper on it. */
void mc_futex_bump_wake(int32_t *addr) {
    __atomic_fetch_add(addr, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Wait until *p >= target (spinning with pause for at most spin_ns, then returning 0), so the
 * caller can re-check other conditions; returns 1 once reached. */
int mc_spin_until_ge(const int64_t *p, int64_t target, int64_t spin_ns) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 0;; i++) {
        if (__atomic_load_n(p, __ATOMIC_ACQUIRE) >= target) return 1;
#if defined(__x86_64__)
        _mm_pause();
#endif
        if ((i & 63) == 63) {
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if ((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec) >= spin_ns) return 0;
        }
    }
}

/* ---- copies ------------------------------------------------------------------------------- */

/* memcpy; with nt != 0 the bulk uses non-temporal stores (no read-for-ownership of the
 * destination, no cache pollution): for large buffers that nobody reads soon. */
void mc_copy(void *dst, const void *src, size_t n, int nt) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
    if (nt && n >= 4096) {
        size_t head = (64 - ((uintptr_t)d & 63)) & 63;
        memcpy(d, s, head);
        d += head; s += head; n -= head;
        size_t i = 0;
#if defined(__AVX512F__)
        for (; i + 64 <= n; i += 64)
            _mm512_stream_si512((__m512i *)(d + i), _mm512_loadu_si512((const void *)(s + i)));
#elif defined(__AVX2__)
        for (; i + 64 <= n; i += 64) {
            _mm256_stream_si256((__m256i *)(d + i), _mm256_loadu_si256((const __m256i *)(s + i)));
            _mm256_stream_si256((__m256i *)(d + i + 32), _mm256_loadu_si256((const __m256i *)(s + i + 32)));
        }
#else
        for (; i + 16 <= n; i += 16)
            _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
#endif
        memcpy(d + i, s + i, n - i);
        _mm_sfence();
        return;
    }
#endif
    memcpy(d, s, n);
}

/* ---- folds -------------------------------------------------------------------------------- */

/* out[i] = ((ins[0][i] + ins[1][i]) + ins[2][i]) + ...  for k >= 1 inputs of n elements.
 * The bulk goes through vector lanes (non-temporal stores with nt != 0 once out is 64-byte
 * aligned), the rest through the same additions one element at a time: IEEE addition per element
 * gives the same bits either way.
 *
 * The file is built without -march (a wheel's library runs on any x86-64), so each vector width is
 * compiled into its own function with a target attribute and the widest one the CPU (and OS) has
 * is picked on first use: AVX-512F, else AVX, else SSE2 (the x86-64 baseline).  Other machines get
 * the scalar loop, which the compiler vectorizes for its own baseline. */
/* acc + x, except that a NaN x gives x (quieted) whatever acc is: the model's NaN. */
static inline float mc_add_f32(float acc, float x) {
    if (x != x) {
        uint32_t u;
        memcpy(&u, &x, 4);
        u |= 0x00400000u;
        memcpy(&x, &u, 4);
        return x;
    }
    return acc + x;
}
static inline double mc_add_f64(double acc, double x) {
    if (x != x) {
        uint64_t u;
        memcpy(&u, &x, 8);
        u |= 0x0008000000000000ull;
        memcpy(&x, &u, 8);
        return x;
    }
    return acc + x;
}
#define mc_add_float mc_add_f32
#define mc_add_double mc_add_f64

#define MC_SUM_SCALAR(T)                                                                           \
    for (; i < n; i++) {                                                                           \
        T acc = ins[0][i];                                                                         \
        for (int j = 1; j < k; j++) acc = mc_add_##T(acc, ins[j][i]);                              \
        out[i] = acc;                                                                              \
    }

#define MC_SUM(NAME, ATTR, T, VEC_T, LOADU, ADD, STOREU, STREAM, LANES)                            \
    ATTR static void NAME(T *out, const T *const *ins, int k, size_t n, int nt) {                  \
        size_t i = 0;                                                                              \
        if (nt) {                                                                                  \
            while (i < n && ((uintptr_t)(out + i) & 63)) {                                         \
                T acc = ins[0][i];                                                                 \
                for (int j = 1; j < k; j++) acc = mc_add_##T(acc, ins[j][i]);                      \
                out[i] = acc;                                                                      \
                i++;                                                                               \
            }                                                                                      \
            for (; i + LANES <= n; i += LANES) {                                                   \
                VEC_T acc = LOADU(ins[0] + i);                                                     \
                for (int j = 1; j < k; j++) acc = ADD(acc, LOADU(ins[j] + i));                     \
                STREAM(out + i, acc);                                                              \
            }                                                                                      \
            _mm_sfence();                                                                          \
        } else {                                                                                   \
            for (; i + LANES <= n; i += LANES) {                                                   \
                VEC_T acc = LOADU(ins[0] + i);                                                     \
                for (int j = 1; j < k; j++) acc = ADD(acc, LOADU(ins[j] + i));                     \
                STOREU(out + i, acc);                                                              \
            }                                                                                      \
        }                                                                                          \
        MC_SUM_SCALAR(T)                                                                           \
    }

typedef void (*mc_sum_f32_fn)(float *, const float *const *, int, size_t, int);
typedef void (*mc_sum_f64_fn)(double *, const double *const *, int, size_t, int);

#if defined(__x86_64__)
#define MC_AVX512 __attribute__((target("avx512f")))
#define MC_AVX __attribute__((target("avx")))
#define MC_SSE2
/* acc + x per lane, then every lane where x is a NaN takes x quieted (see the contract above). */
MC_AVX512 static inline __m512 mc_add512_ps(__m512 acc, __m512 x) {
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512 quiet = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x00400000)));
    return _mm512_mask_mov_ps(_mm512_add_ps(acc, x), nan, quiet);
}
MC_AVX512 static inline __m512d mc_add512_pd(__m512d acc, __m512d x) {
    __mmask8 nan = _mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q);
    __m512d quiet = _mm512_castsi512_pd(_mm512_or_si512(_mm512_castpd_si512(x),
                                                        _mm512_set1_epi64(0x0008000000000000ll)));
    return _mm512_mask_mov_pd(_mm512_add_pd(acc, x), nan, quiet);
}
MC_AVX static inline __m256 mc_add256_ps(__m256 acc, __m256 x) {
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 quiet = _mm256_or_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x00400000)));
    return _mm256_blendv_ps(_mm256_add_ps(acc, x), quiet, nan);
}
MC_AVX static inline __m256d mc_add256_pd(__m256d acc, __m256d x) {
    __m256d nan = _mm256_cmp_pd(x, x, _CMP_UNORD_Q);
    __m256d quiet = _mm256_or_pd(x, _mm256_castsi256_pd(_mm256_set1_epi64x(0x0008000000000000ll)));
    return _mm256_blendv_pd(_mm256_add_pd(acc, x), quiet, nan);
}
static inline __m128 mc_add128_ps(__m128 acc, __m128 x) {
    __m128 nan = _mm_cmpunord_ps(x, x);
    __m128 quiet = _mm_or_ps(x, _mm_castsi128_ps(_mm_set1_epi32(0x00400000)));
    return _mm_or_ps(_mm_and_ps(nan, quiet), _mm_andnot_ps(nan, _mm_add_ps(acc, x)));
}
static inline __m128d mc_add128_pd(__m128d acc, __m128d x) {
    __m128d nan = _mm_cmpunord_pd(x, x);
    __m128d quiet = _mm_or_pd(x, _mm_castsi128_pd(_mm_set1_epi64x(0x0008000000000000ll)));
    return _mm_or_pd(_mm_and_pd(nan, quiet), _mm_andnot_pd(nan, _mm_add_pd(acc, x)));
}
MC_SUM(sum_f32_avx512, MC_AVX512, float, __m512, _mm512_loadu_ps, mc_add512_ps, _mm512_storeu_ps,
       _mm512_stream_ps, 16)
MC_SUM(sum_f64_avx512, MC_AVX512, double, __m512d, _mm512_loadu_pd, mc_add512_pd, _mm512_storeu_pd,
       _mm512_stream_pd, 8)
MC_SUM(sum_f32_avx, MC_AVX, float, __m256, _mm256_loadu_ps, mc_add256_ps, _mm256_storeu_ps, _mm256_stream_ps, 8)
MC_SUM(sum_f64_avx, MC_AVX, double, __m256d, _mm256_loadu_pd, mc_add256_pd, _mm256_storeu_pd,
       _mm256_stream_pd, 4)
MC_SUM(sum_f32_sse2, MC_SSE2, float, __m128, _mm_loadu_ps, mc_add128_ps, _mm_storeu_ps, _mm_stream_ps, 4)
MC_SUM(sum_f64_sse2, MC_SSE2, double, __m128d, _mm_loadu_pd, mc_add128_pd, _mm_storeu_pd, _mm_stream_pd, 2)

static int mc_isa_level = -1; /* 0 sse2, 1 avx, 2 avx512f */

static int mc_isa_pick(void) {
    int level = __atomic_load_n(&mc_isa_level, __ATOMIC_RELAXED);
    if (level < 0) {
        __builtin_cpu_init();
        level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx") ? 1 : 0;
        __atomic_store_n(&mc_isa_level, level, __ATOMIC_RELAXED);
    }
    return level;
}

static const mc_sum_f32_fn mc_sum_f32_impl[3] = {sum_f32_sse2, sum_f32_avx, sum_f32_avx512};
static const mc_sum_f64_fn mc_sum_f64_impl[3] = {sum_f64_sse2, sum_f64_avx, sum_f64_avx512};

void mc_sum_f32(float *out, const float *const *ins, int k, size_t n, int nt) {
    mc_sum_f32_impl[mc_isa_pick()](out, ins, k, n, nt);
}
void mc_sum_f64(double *out, const double *const *ins, int k, size_t n, int nt) {
    mc_sum_f64_impl[mc_isa_pick()](out, ins, k, n, nt);
}

/* The vector width the folds use here: "sse2", "avx" or "avx512f" (reported by the doctor). */
const char *mc_isa(void) {
    static const char *names[3] = {"sse2", "avx", "avx512f"};
    return names[mc_isa_pick()];
}

/* Use at most this width from now on (0 sse2, 1 avx, 2 avx512f; tests and benchmarks compare them);
 * never more than the CPU has.  Returns the level in effect. */
int mc_isa_limit(int level) {
    __builtin_cpu_init();
    int have = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx") ? 1 : 0;
    level = level < 0 ? 0 : level > have ? have : level;
    __atomic_store_n(&mc_isa_level, level, __ATOMIC_RELAXED);
    return level;
}
#else
void mc_sum_f32(float *out, const float *const *ins, int k, size_t n, int nt) {
    size_t i = 0;
    (void)nt;
    MC_SUM_SCALAR(float)
}
void mc_sum_f64(double *out, const double *const *ins, int k, size_t n, int nt) {
    size_t i = 0;
    (void)nt;
    MC_SUM_SCALAR(double)
}
const char *mc_isa(void) { return "scalar"; }
int mc_isa_limit(int level) { (void)level; return 0; }
#endif

/* ---- cross-process reads (P2P) ------------------------------------------------------------ */

#include <sys/uio.h>

/* Copy n bytes at address src of process pid into dst with process_vm_readv (cross-memory attach:
 * one copy, no shared mapping), looping over partial reads.  Returns 0, or the errno of the failing
 * call (EFAULT for a read that stopped short: the remote range is no longer mapped). */
int mc_vm_read(int pid, void *dst, uint64_t src, size_t n) {
    char *d = (char *)dst;
    while (n > 0) {
        struct iovec local = {d, n};
        struct iovec remote = {(void *)(uintptr_t)src, n};
        ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (got == 0) return EFAULT;
        d += got;
        src += (uint64_t)got;
        n -= (size_t)got;
    }
    return 0;
}
