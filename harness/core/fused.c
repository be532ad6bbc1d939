/* Fused elementwise merge kernels, loaded through ctypes by harness/core/fused.py.
 *
 * Hand-written because a measurement requires it: eager torch computes Task Arithmetic on a
 * block as one operation per task vector, sum and scale, each a pass over memory, where one
 * loop reads every input once. Exactness is kept: every element goes through the same float32
 * operations, in the same order, as the torch rule (harness/methods/task_arithmetic.py), and
 * the build turns off contraction into fused multiply-adds (-ffp-contract=off) and any
 * value-changing optimisation, so the bits are torch's.
 *
 * Built as an optional extension module (harness.core._fused); where it cannot be built the
 * torch rule runs instead. The module-init function exists only so that the build tools accept
 * it as an extension; Python code calls the plain C functions below.
 */
#include <Python.h>
#include <stdint.h>

#define MAX_TASKS 64

/* out[i] = ((t_0[i] - b[i]) + (t_1[i] - b[i]) + ... + (t_{n-1}[i] - b[i])) * lam + b[i]
 * for i in [0, count), in float32, the tasks added in order (the first two into the sum, the
 * rest one by one: sum_task_vectors's order). changed[t] += the number of i with
 * t_t[i] != b[i] (NaN counts as changed). n_tasks is 1..MAX_TASKS; returns 0, or -1 when not. */
int task_arithmetic_f32(float *out, const float *base, const float *const *tasks, int n_tasks,
                        int64_t count, float lam, int64_t *changed) {
    int64_t local[MAX_TASKS] = {0};
    if (n_tasks < 1 || n_tasks > MAX_TASKS)
        return -1;
    for (int64_t i = 0; i < count; i++) {
        const float b = base[i];
        const float t0 = tasks[0][i];
        float acc = t0 - b;
        local[0] += t0 != b;
        if (n_tasks > 1) {
            const float t1 = tasks[1][i];
            local[1] += t1 != b;
            acc = acc + (t1 - b);
            for (int t = 2; t < n_tasks; t++) {
                const float v = tasks[t][i];
                local[t] += v != b;
                acc += v - b;
            }
        }
        out[i] = acc * lam + b;
    }
    for (int t = 0; t < n_tasks; t++)
        changed[t] += local[t];
    return 0;
}

/* out[i] = (float)(((double)t_0[i] + t_1[i] + ... + t_{n-1}[i]) / n): the mean accumulated
 * in float64 in task order, divided, rounded once (weight_average's order). changed[t] as
 * above, against base. */
int weight_average_f32(float *out, const float *base, const float *const *tasks, int n_tasks,
                       int64_t count, int64_t *changed) {
    int64_t local[MAX_TASKS] = {0};
    if (n_tasks < 1 || n_tasks > MAX_TASKS)
        return -1;
    const double n = (double)n_tasks;
    for (int64_t i = 0; i < count; i++) {
        const float b = base[i];
        double acc = 0.0;
        for (int t = 0; t < n_tasks; t++) {
            const float v = tasks[t][i];
            local[t] += v != b;
            acc = t == 0 ? (double)v : acc + (double)v;
        }
        out[i] = (float)(acc / n);
    }
    for (int t = 0; t < n_tasks; t++)
        changed[t] += local[t];
    return 0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused",
                                    "Fused merge kernels (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
