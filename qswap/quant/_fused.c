/* qswap.quant._fused: per-tensor fake quantization of float32 values in one pass.
 *
 * fake_quantize_f32(src, dst, n, inverse, lo, hi, scale) writes, for i < n,
 *
 *     dst[i] = clamp(nearbyint(src[i] * inverse), lo, hi) * scale + 0.0
 *
 * in float32: the same operations, in the same order, as qswap.quant.primitives'
 * four vectorized torch passes (multiply by the float32 1/s, round half to even, clamp to the
 * codes' range minus the zero point, times s, +0.0 so that a zero code is +0.0), so the same
 * result bit for bit on every input: an exact tie rounds to even (nearbyint in the default
 * rounding mode), +-inf lands on the grid's ends and a NaN stays NaN (both comparisons fail).
 * No fused multiply-add (-ffp-contract=off in setup.py) and no fast-math: each product rounds
 * once, as torch's kernels do. src and dst may be the same buffer (in place).
 *
 * fake_quantize_twice_f32(src, dst, n, inverse1, lo1, hi1, scale1, inverse2, lo2, hi2, scale2) does
 * that twice per value, the second grid reading the first's result: two quantizers in a row.
 *
 * grid_mismatches_f32(src, None, n, inverse, lo, hi, scale) counts the values that differ from
 * that (the honesty audit's proof that a quantizer's output lies on its grid: 0), reading src once.
 *
 * fake_quantize_channels_f32(src, dst, n, channels, inverse, lo, hi, scale) does it per channel of the
 * last axis of a contiguous tensor: value i is rounded onto grid i % channels, whose inverse, lo, hi
 * and scale are element i % channels of four contiguous float32 arrays of `channels` values each (their
 * addresses): qswap.quant.primitives' per-channel passes, bit for bit (a frozen per-channel activation
 * quantizer: a residual stream's grid per feature).
 *
 * min_max_f32(src, n) returns (min, max, nonfinite) of src[0..n), n >= 1: the exact extremes (no
 * arithmetic, so torch.aminmax's values; of +0.0 and -0.0 either may come back) and whether any value
 * is +-inf or NaN (read from its exponent bits; the extremes are then meaningless). Calibration's
 * observers read every activation's range with it.
 *
 * observe_f32(src, n, rule, has_range, min_val, max_val, operand, grid, qmin, qmax, symmetric, signed,
 * min_scale, max_range) is one calibration step of a per-tensor min/max-family observer, in one call:
 * min_max_f32's extremes (lo, hi) of src[0..n), the running range (min_val, max_val) combined with
 * them by `rule` (0: the running mean of per-batch ranges, operand the float32 count of batches
 * including this one, mn + (lo - mn) / operand; 1: the running extremes, min and max; 2: the moving
 * average, operand the momentum m, mn + m * (lo - mn); without a range yet (has_range 0) the batch's
 * range itself), and, for grid 1, the grid of the new range: qswap.quant.primitives'
 * choose_qparams_scalar, the same float32 operations on numpy float32 scalars in the same order
 * (Python's min(a, b) is b < a ? b : a, max(a, b) is b > a ? b : a; np.round is nearbyintf), and
 * the float32 inverse (float)(1.0 / (double)scale) that pass_grid gives the kernel. Returns
 * (status, min_val, max_val[, scale, zero_point, inverse]): status 0, or 1 where a value of src
 * is +-inf or NaN, 2 where the combined range is not finite (the caller raises either; the other
 * numbers then mean nothing). Observers (qswap.quant.observers) call it and write the results into
 * their buffers; tests/quant/test_fused.py checks it against the Python definitions.
 *
 * src and dst are addresses of contiguous float32 buffers (torch's data_ptr()); the Python
 * caller (qswap.quant.fused) checks dtype, device, layout and size. Single-threaded; the GIL is
 * released while it runs. Compiled for AVX2, SSE4.1 (hardware rounding) and baseline x86-64, the
 * best picked at load time (gcc's target_clones); other architectures compile the plain loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* A grid: inverse (the float32 1/s), lo and hi (the codes' range minus the zero point), scale. */
typedef struct {
    float inverse, lo, hi, scale;
} grid_t;

/* The value of x on grid g: clamp(nearbyint(x * inverse), lo, hi) * scale + 0.0, in float32. Inlined
 * into each loop (and each of its target clones), so every loop runs the same operations. */
static inline __attribute__((always_inline)) float on_grid(float x, grid_t g) {
    float t = nearbyintf(x * g.inverse);
    t = t < g.lo ? g.lo : t;
    t = t > g.hi ? g.hi : t;
    return t * g.scale + 0.0f;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static void fake_quantize_loop(const float *src, float *dst, int64_t n, grid_t g) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = on_grid(src[i], g);
    }
}

/* fake_quantize_loop twice, the second grid reading the first's output (two quantizers in a row,
 * a ReLU between them folded into the first's lo): the same float32 operations in the same order
 * as two calls of the loop above, so the same bits, with one read and one write of the tensor. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static void fake_quantize_twice_loop(const float *src, float *dst, int64_t n, grid_t g1, grid_t g2) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = on_grid(on_grid(src[i], g1), g2);
    }
}

/* fake_quantize_loop with one grid per channel of the last axis: rows of `channels` values, the grids'
 * parts in four arrays. The same float32 operations in the same order as on_grid. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static void fake_quantize_channels_loop(const float *src, float *dst, int64_t rows, int64_t channels,
                                        const float *inverse, const float *lo, const float *hi, const float *scale) {
    for (int64_t r = 0; r < rows; r++) {
        const float *s = src + r * channels;
        float *d = dst + r * channels;
        for (int64_t c = 0; c < channels; c++) {
            float t = nearbyintf(s[c] * inverse[c]);
            t = t < lo[c] ? lo[c] : t;
            t = t > hi[c] ? hi[c] : t;
            d[c] = t * scale[c] + 0.0f;
        }
    }
}

/* How many of src[0..n) differ from their own fake quantization (on_grid): 0 proves every value is
 * a grid point in range. A NaN differs from everything; -0.0 equals +0.0 (== compares). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static int64_t grid_mismatches_loop(const float *src, int64_t n, grid_t g) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        count += !(on_grid(src[i], g) == src[i]);
    }
    return count;
}

/* The extremes of some values, and whether any is +-inf or NaN. */
typedef struct {
    float lo, hi;
    int nonfinite;
} range_t;

static inline int nonfinite_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return (b & 0x7f800000u) == 0x7f800000u;
}

/* r widened by src[0..n), one value at a time. */
static range_t min_max_plain(const float *src, int64_t n, range_t r) {
    for (int64_t i = 0; i < n; i++) {
        float v = src[i];
        r.nonfinite |= nonfinite_bits(v);
        r.lo = v < r.lo ? v : r.lo;
        r.hi = v > r.hi ? v : r.hi;
    }
    return r;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* The same with AVX2, 16 values a step (gcc does not vectorize a float min/max reduction without
 * fast-math, which the other loops must not have): minps/maxps keep exact values, as the plain loop. */
__attribute__((target("avx2")))
static range_t min_max_avx2(const float *src, int64_t n) {
    __m256 lo0 = _mm256_set1_ps(src[0]), lo1 = lo0, hi0 = lo0, hi1 = lo0;
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    __m256i bad = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(src + i), b = _mm256_loadu_ps(src + i + 8);
        lo0 = _mm256_min_ps(lo0, a);
        hi0 = _mm256_max_ps(hi0, a);
        lo1 = _mm256_min_ps(lo1, b);
        hi1 = _mm256_max_ps(hi1, b);
        __m256i ea = _mm256_and_si256(_mm256_castps_si256(a), exponent);
        __m256i eb = _mm256_and_si256(_mm256_castps_si256(b), exponent);
        bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpeq_epi32(ea, exponent), _mm256_cmpeq_epi32(eb, exponent)));
    }
    float lo[8], hi[8];
    _mm256_storeu_ps(lo, _mm256_min_ps(lo0, lo1));
    _mm256_storeu_ps(hi, _mm256_max_ps(hi0, hi1));
    range_t r = {src[0], src[0], !_mm256_testz_si256(bad, bad)};
    for (int j = 0; j < 8; j++) {
        r.lo = lo[j] < r.lo ? lo[j] : r.lo;
        r.hi = hi[j] > r.hi ? hi[j] : r.hi;
    }
    return min_max_plain(src + i, n - i, r);
}
#endif

static range_t min_max(const float *src, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (__builtin_cpu_supports("avx2")) {
        return min_max_avx2(src, n);
    }
#endif
    range_t r = {src[0], src[0], 0};
    return min_max_plain(src, n, r);
}

/* The arguments of every function: (src, dst, n, then `grids` grids of inverse, lo, hi, scale);
 * dst may be None where `write` is 0. Returns 0, or -1 with a Python exception set. */
static int parse(const char *name, PyObject *const *args, Py_ssize_t nargs, int grids, int write,
                 void **src, void **dst, int64_t *n, grid_t *g) {
    if (nargs != 3 + 4 * grids) {
        PyErr_Format(PyExc_TypeError, "%s(src, dst, n, %s): %d arguments", name,
                     grids == 1 ? "inverse, lo, hi, scale" : "inverse1, lo1, hi1, scale1, inverse2, lo2, hi2, scale2",
                     3 + 4 * grids);
        return -1;
    }
    *src = PyLong_AsVoidPtr(args[0]);
    *dst = NULL;
    if (!PyErr_Occurred() && args[1] != Py_None) {
        *dst = PyLong_AsVoidPtr(args[1]);
    }
    long long size = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[2]);
    for (int i = 0; i < grids && !PyErr_Occurred(); i++) {  /* float32 values */
        g[i].inverse = (float)PyFloat_AsDouble(args[3 + 4 * i]);
        g[i].lo = (float)PyFloat_AsDouble(args[4 + 4 * i]);
        g[i].hi = (float)PyFloat_AsDouble(args[5 + 4 * i]);
        g[i].scale = (float)PyFloat_AsDouble(args[6 + 4 * i]);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    if (size < 0 || (size > 0 && (*src == NULL || (write && *dst == NULL)))) {
        PyErr_Format(PyExc_ValueError, "%s: a negative size or a null buffer", name);
        return -1;
    }
    *n = (int64_t)size;
    return 0;
}

static PyObject *fake_quantize_twice_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *src, *dst;
    int64_t n;
    grid_t g[2];
    if (parse("fake_quantize_twice_f32", args, nargs, 2, 1, &src, &dst, &n, g) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fake_quantize_twice_loop((const float *)src, (float *)dst, n, g[0], g[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fake_quantize_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *src, *dst;
    int64_t n;
    grid_t g;
    if (parse("fake_quantize_f32", args, nargs, 1, 1, &src, &dst, &n, &g) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fake_quantize_loop((const float *)src, (float *)dst, n, g);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *grid_mismatches_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    void *src, *dst;
    int64_t n, count = 0;
    grid_t g;
    if (parse("grid_mismatches_f32", args, nargs, 1, 0, &src, &dst, &n, &g) < 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    count = grid_mismatches_loop((const float *)src, n, g);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)count);
}

static PyObject *fake_quantize_channels_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "fake_quantize_channels_f32(src, dst, n, channels, inverse, lo, hi, scale): "
                                         "8 arguments");
        return NULL;
    }
    void *ptr[6];  /* src, dst, then the grids' inverse, lo, hi, scale arrays */
    const int at[6] = {0, 1, 4, 5, 6, 7};
    for (int i = 0; i < 6 && !PyErr_Occurred(); i++) {
        ptr[i] = PyLong_AsVoidPtr(args[at[i]]);
    }
    long long size = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[2]);
    long long channels = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    int null = 0;
    for (int i = 0; i < 6; i++) {
        null |= ptr[i] == NULL;
    }
    if (size < 0 || channels < 1 || size % channels != 0 || (size > 0 && null)) {
        PyErr_SetString(PyExc_ValueError, "fake_quantize_channels_f32: a negative size, a size that is not a multiple "
                                          "of channels >= 1, or a null buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fake_quantize_channels_loop((const float *)ptr[0], (float *)ptr[1], (int64_t)(size / channels), (int64_t)channels,
                                (const float *)ptr[2], (const float *)ptr[3], (const float *)ptr[4],
                                (const float *)ptr[5]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *min_max_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "min_max_f32(src, n): 2 arguments");
        return NULL;
    }
    void *src = PyLong_AsVoidPtr(args[0]);
    long long size = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (size < 1 || src == NULL) {
        PyErr_SetString(PyExc_ValueError, "min_max_f32: a size below 1 or a null buffer");
        return NULL;
    }
    range_t r;
    Py_BEGIN_ALLOW_THREADS
    r = min_max((const float *)src, (int64_t)size);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ddO)", (double)r.lo, (double)r.hi, r.nonfinite ? Py_True : Py_False);
}

/* Python's min(a, b) and max(a, b) of two floats: the first unless the second is below (above) it. */
static inline float py_min(float a, float b) { return b < a ? b : a; }
static inline float py_max(float a, float b) { return b > a ? b : a; }

static PyObject *observe_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "observe_f32(src, n, rule, has_range, min_val, max_val, operand, grid, qmin, "
                                         "qmax, symmetric, signed, min_scale, max_range): 14 arguments");
        return NULL;
    }
    void *src = PyLong_AsVoidPtr(args[0]);
    long long size = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[1]);
    long rule = PyErr_Occurred() ? 0 : PyLong_AsLong(args[2]);
    int has_range = PyErr_Occurred() ? 0 : PyObject_IsTrue(args[3]);
    float mn = PyErr_Occurred() ? 0.0f : (float)PyFloat_AsDouble(args[4]);
    float mx = PyErr_Occurred() ? 0.0f : (float)PyFloat_AsDouble(args[5]);
    float operand = PyErr_Occurred() ? 0.0f : (float)PyFloat_AsDouble(args[6]);
    int grid = PyErr_Occurred() ? 0 : PyObject_IsTrue(args[7]);
    long qmin = PyErr_Occurred() ? 0 : PyLong_AsLong(args[8]);
    long qmax = PyErr_Occurred() ? 0 : PyLong_AsLong(args[9]);
    int symmetric = PyErr_Occurred() ? 0 : PyObject_IsTrue(args[10]);
    int is_signed = PyErr_Occurred() ? 0 : PyObject_IsTrue(args[11]);
    float min_scale = PyErr_Occurred() ? 0.0f : (float)PyFloat_AsDouble(args[12]);
    float max_range = PyErr_Occurred() ? 0.0f : (float)PyFloat_AsDouble(args[13]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (size < 1 || src == NULL || rule < 0 || rule > 2 || has_range < 0 || grid < 0 || symmetric < 0 || is_signed < 0
        || qmax <= qmin) {
        PyErr_SetString(PyExc_ValueError, "observe_f32: a size below 1, a null buffer, a rule other than 0, 1, 2 or "
                                          "qmax <= qmin");
        return NULL;
    }
    range_t r;
    Py_BEGIN_ALLOW_THREADS
    r = min_max((const float *)src, (int64_t)size);
    Py_END_ALLOW_THREADS
    float lo = r.lo, hi = r.hi;
    if (has_range) {
        if (rule == 0) {
            lo = mn + (lo - mn) / operand;
            hi = mx + (hi - mx) / operand;
        } else if (rule == 1) {
            lo = py_min(mn, lo);
            hi = py_max(mx, hi);
        } else {
            lo = mn + operand * (lo - mn);
            hi = mx + operand * (hi - mx);
        }
    }
    int status = r.nonfinite ? 1 : (isfinite(lo) && isfinite(hi) ? 0 : 2);
    if (!grid) {
        return Py_BuildValue("(idd)", status, (double)lo, (double)hi);
    }
    float scale = 1.0f, zero_point = 0.0f;
    if (status == 0) {
        float lo32 = py_min(py_max(lo, -max_range), 0.0f);
        float hi32 = py_min(py_max(hi, 0.0f), max_range);
        if (symmetric) {
            float amax = is_signed ? py_max(-lo32, hi32) : hi32;
            scale = py_max(amax / (float)qmax, min_scale);
        } else {
            scale = py_max((hi32 - lo32) / (float)(qmax - qmin), min_scale);
            zero_point = (float)qmin - nearbyintf(lo32 / scale);
            zero_point = py_min(py_max(zero_point, (float)qmin), (float)qmax);
        }
    }
    float inverse = (float)(1.0 / (double)scale);
    return Py_BuildValue("(iddddd)", status, (double)lo, (double)hi, (double)scale, (double)zero_point,
                         (double)inverse);
}

static PyMethodDef methods[] = {
    {"fake_quantize_f32", (PyCFunction)(void (*)(void))fake_quantize_f32, METH_FASTCALL,
     "fake_quantize_f32(src, dst, n, inverse, lo, hi, scale): one-pass per-tensor fake quantization"},
    {"fake_quantize_twice_f32", (PyCFunction)(void (*)(void))fake_quantize_twice_f32, METH_FASTCALL,
     "fake_quantize_twice_f32(src, dst, n, inverse1, lo1, hi1, scale1, inverse2, lo2, hi2, scale2): two "
     "per-tensor fake quantizations in a row, in one pass"},
    {"fake_quantize_channels_f32", (PyCFunction)(void (*)(void))fake_quantize_channels_f32, METH_FASTCALL,
     "fake_quantize_channels_f32(src, dst, n, channels, inverse, lo, hi, scale): per-channel fake quantization "
     "along the last axis of a contiguous tensor, in one pass"},
    {"grid_mismatches_f32", (PyCFunction)(void (*)(void))grid_mismatches_f32, METH_FASTCALL,
     "grid_mismatches_f32(src, None, n, inverse, lo, hi, scale): how many values differ from their "
     "fake quantization"},
    {"min_max_f32", (PyCFunction)(void (*)(void))min_max_f32, METH_FASTCALL,
     "min_max_f32(src, n): (min, max, any +-inf or NaN) of n >= 1 float32 values"},
    {"observe_f32", (PyCFunction)(void (*)(void))observe_f32, METH_FASTCALL,
     "observe_f32(src, n, rule, has_range, min_val, max_val, operand, grid, qmin, qmax, symmetric, signed, min_scale, "
     "max_range): one calibration step of a per-tensor min/max-family observer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
