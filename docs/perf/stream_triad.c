/* STREAM-style triad a[i] = b[i] + s*c[i], as a cross-check of `memory.triad`.
 * Same kernel, same array size (default 128 MiB each), all threads (OpenMP),
 * best of N after a warm-up; bandwidth counts 3 x 8 bytes per element, as STREAM does.
 *
 *   gcc -O3 -march=native -fopenmp docs/perf/stream_triad.c -o /tmp/triad
 *   /tmp/triad [MiB per array] [repetitions]
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 128;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    size_t n = mib * 1024 * 1024 / sizeof(double);
    double *a = malloc(n * sizeof(double)), *b = malloc(n * sizeof(double)), *c = malloc(n * sizeof(double));
    if (!a || !b || !c) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) { a[i] = 1.0; b[i] = 2.0; c[i] = 0.5; }
    double best = 0;
    for (int r = 0; r <= reps; r++) {
        double t = omp_get_wtime();
#pragma omp parallel for
        for (size_t i = 0; i < n; i++) a[i] = b[i] + 3.0 * c[i];
        t = omp_get_wtime() - t;
        double mbs = 3.0 * 8.0 * n / t / 1e6;
        if (r > 0 && mbs > best) best = mbs;
    }
    printf("triad %zu MiB x3, %d threads: %.1f MB/s (best of %d)\n", mib, omp_get_max_threads(), best, reps);
    return a[n / 2] == 0.0;
}
