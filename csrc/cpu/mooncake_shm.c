/* Hot loops of the shared-memory CPU data plane (mooncake.fast.cpu).
 *
 * Plain C with no Python or torch headers: mooncake/fast/cpu/native.py compiles it with the system
 * C compiler on first use (cached by source hash) and loads it with ctypes.  Every function has a
 * pure-Python/torch fallback in native.py, so a machine without a compiler still works.
 *
 * Bitwise contract: mc_sum_* compute, per element, the left fold ((x0 + x1) + x2) + ... in the
 * inputs' own dtype, which is what mooncake.model.reduce.fold does for SUM over float32/float64
 * (IEEE addition is exact per element; vector and scalar lanes give the same bits, and the
 * accumulator is always the first operand, as in torch.add(acc, x), so NaN payloads match too).
 * tests/fast_cpu/test_native.py checks them against the model.
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

#define MC_ABI 3

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
 * With nt != 0 and an aligned bulk, results go out through non-temporal stores. */
#define MC_SUM(NAME, T, VEC_T, LOADU, ADD, STREAM, LANES)                                          \
    void NAME(T *out, const T *const *ins, int k, size_t n, int nt) {                              \
        size_t i = 0;                                                                              \
        if (nt) {                                                                                  \
            while (i < n && ((uintptr_t)(out + i) & 63)) {                                         \
                T acc = ins[0][i];                                                                 \
                for (int j = 1; j < k; j++) acc = acc + ins[j][i];                                 \
                out[i] = acc;                                                                      \
                i++;                                                                               \
            }                                                                                      \
            for (; i + LANES <= n; i += LANES) {                                                   \
                VEC_T acc = LOADU(ins[0] + i);                                                     \
                for (int j = 1; j < k; j++) acc = ADD(acc, LOADU(ins[j] + i));                     \
                STREAM(out + i, acc);                                                              \
            }                                                                                      \
            _mm_sfence();                                                                          \
        }                                                                                          \
        if (k == 2) {                                                                              \
            const T *a = ins[0], *b = ins[1];                                                      \
            for (; i < n; i++) out[i] = a[i] + b[i];                                               \
            return;                                                                                \
        }                                                                                          \
        for (; i < n; i++) {                                                                       \
            T acc = ins[0][i];                                                                     \
            for (int j = 1; j < k; j++) acc = acc + ins[j][i];                                     \
            out[i] = acc;                                                                          \
        }                                                                                          \
    }

#if defined(__AVX512F__)
MC_SUM(mc_sum_f32, float, __m512, _mm512_loadu_ps, _mm512_add_ps, _mm512_stream_ps, 16)
MC_SUM(mc_sum_f64, double, __m512d, _mm512_loadu_pd, _mm512_add_pd, _mm512_stream_pd, 8)
#elif defined(__AVX__)
MC_SUM(mc_sum_f32, float, __m256, _mm256_loadu_ps, _mm256_add_ps, _mm256_stream_ps, 8)
MC_SUM(mc_sum_f64, double, __m256d, _mm256_loadu_pd, _mm256_add_pd, _mm256_stream_pd, 4)
#elif defined(__SSE2__)
MC_SUM(mc_sum_f32, float, __m128, _mm_loadu_ps, _mm_add_ps, _mm_stream_ps, 4)
MC_SUM(mc_sum_f64, double, __m128d, _mm_loadu_pd, _mm_add_pd, _mm_stream_pd, 2)
#else
#define _mm_sfence() ((void)0)
void mc_sum_f32(float *out, const float *const *ins, int k, size_t n, int nt) {
    (void)nt;
    for (size_t i = 0; i < n; i++) { float a = ins[0][i]; for (int j = 1; j < k; j++) a = a + ins[j][i]; out[i] = a; }
}
void mc_sum_f64(double *out, const double *const *ins, int k, size_t n, int nt) {
    (void)nt;
    for (size_t i = 0; i < n; i++) { double a = ins[0][i]; for (int j = 1; j < k; j++) a = a + ins[j][i]; out[i] = a; }
}
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
