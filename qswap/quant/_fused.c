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
 * src and dst are addresses of contiguous float32 buffers (torch's data_ptr()); the Python
 * caller (qswap.quant.fused) checks dtype, device, layout and size. Single-threaded; the GIL is
 * released while it runs. Compiled for AVX2, SSE4.1 (hardware rounding) and baseline x86-64, the
 * best picked at load time (gcc's target_clones); other architectures compile the plain loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static void fake_quantize_loop(const float *src, float *dst, int64_t n, float inverse, float lo, float hi,
                               float scale) {
    for (int64_t i = 0; i < n; i++) {
        float t = nearbyintf(src[i] * inverse);
        t = t < lo ? lo : t;
        t = t > hi ? hi : t;
        dst[i] = t * scale + 0.0f;
    }
}

/* fake_quantize_loop twice, the second grid reading the first's output (two quantizers in a row,
 * a ReLU between them folded into the first's lo): the same float32 operations in the same order
 * as two calls of the loop above, so the same bits, with one read and one write of the tensor. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static void fake_quantize_twice_loop(const float *src, float *dst, int64_t n, const float *g1, const float *g2) {
    const float inverse1 = g1[0], lo1 = g1[1], hi1 = g1[2], scale1 = g1[3];
    const float inverse2 = g2[0], lo2 = g2[1], hi2 = g2[2], scale2 = g2[3];
    for (int64_t i = 0; i < n; i++) {
        float t = nearbyintf(src[i] * inverse1);
        t = t < lo1 ? lo1 : t;
        t = t > hi1 ? hi1 : t;
        float u = nearbyintf((t * scale1 + 0.0f) * inverse2);
        u = u < lo2 ? lo2 : u;
        u = u > hi2 ? hi2 : u;
        dst[i] = u * scale2 + 0.0f;
    }
}

/* How many of src[0..n) differ from their own fake quantization (the loop above): 0 proves every
 * value is a grid point in range. A NaN differs from everything; -0.0 equals +0.0 (== compares). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "sse4.1", "default")))
#endif
static int64_t grid_mismatches_loop(const float *src, int64_t n, float inverse, float lo, float hi, float scale) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        float t = nearbyintf(src[i] * inverse);
        t = t < lo ? lo : t;
        t = t > hi ? hi : t;
        count += !(t * scale + 0.0f == src[i]);
    }
    return count;
}

/* Both functions: fake_quantize_f32 (write: src's values fake-quantized into dst) and
 * grid_mismatches_f32 (count: dst is None), arguments (src, dst, n, inverse, lo, hi, scale). */
static PyObject *run(const char *name, PyObject *const *args, Py_ssize_t nargs, int write) {
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "%s(src, dst, n, inverse, lo, hi, scale): 7 arguments", name);
        return NULL;
    }
    void *src = PyLong_AsVoidPtr(args[0]);
    void *dst = NULL;
    if (!PyErr_Occurred() && args[1] != Py_None) {
        dst = PyLong_AsVoidPtr(args[1]);
    }
    long long n = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[2]);
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};  /* inverse, lo, hi, scale: float32 values */
    for (int i = 0; i < 4 && !PyErr_Occurred(); i++) {
        g[i] = (float)PyFloat_AsDouble(args[3 + i]);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (n < 0 || (n > 0 && (src == NULL || (write && dst == NULL)))) {
        PyErr_Format(PyExc_ValueError, "%s: a negative size or a null buffer", name);
        return NULL;
    }
    int64_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    if (write) {
        fake_quantize_loop((const float *)src, (float *)dst, (int64_t)n, g[0], g[1], g[2], g[3]);
    } else {
        count = grid_mismatches_loop((const float *)src, (int64_t)n, g[0], g[1], g[2], g[3]);
    }
    Py_END_ALLOW_THREADS
    if (write) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong((long long)count);
}

/* fake_quantize_twice_f32(src, dst, n, inverse1, lo1, hi1, scale1, inverse2, lo2, hi2, scale2). */
static PyObject *fake_quantize_twice_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "fake_quantize_twice_f32(src, dst, n, inverse1, lo1, hi1, scale1, "
                                         "inverse2, lo2, hi2, scale2): 11 arguments");
        return NULL;
    }
    void *src = PyLong_AsVoidPtr(args[0]);
    void *dst = PyErr_Occurred() ? NULL : PyLong_AsVoidPtr(args[1]);
    long long n = PyErr_Occurred() ? 0 : PyLong_AsLongLong(args[2]);
    float g[8] = {0.0f};  /* the two grids: inverse, lo, hi, scale each, as float32 values */
    for (int i = 0; i < 8 && !PyErr_Occurred(); i++) {
        g[i] = (float)PyFloat_AsDouble(args[3 + i]);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (n < 0 || (n > 0 && (src == NULL || dst == NULL))) {
        PyErr_SetString(PyExc_ValueError, "fake_quantize_twice_f32: a negative size or a null buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fake_quantize_twice_loop((const float *)src, (float *)dst, (int64_t)n, g, g + 4);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *fake_quantize_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run("fake_quantize_f32", args, nargs, 1);
}

static PyObject *grid_mismatches_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return run("grid_mismatches_f32", args, nargs, 0);
}

static PyMethodDef methods[] = {
    {"fake_quantize_f32", (PyCFunction)(void (*)(void))fake_quantize_f32, METH_FASTCALL,
     "fake_quantize_f32(src, dst, n, inverse, lo, hi, scale): one-pass per-tensor fake quantization"},
    {"fake_quantize_twice_f32", (PyCFunction)(void (*)(void))fake_quantize_twice_f32, METH_FASTCALL,
     "fake_quantize_twice_f32(src, dst, n, inverse1, lo1, hi1, scale1, inverse2, lo2, hi2, scale2): two "
     "per-tensor fake quantizations in a row, in one pass"},
    {"grid_mismatches_f32", (PyCFunction)(void (*)(void))grid_mismatches_f32, METH_FASTCALL,
     "grid_mismatches_f32(src, None, n, inverse, lo, hi, scale): how many values differ from their "
     "fake quantization"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
