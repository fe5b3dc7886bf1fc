/* The plain single-threaded C loop of the Mamba-1 recurrence: the speed reference for the kernels.
   u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); out: (batch, dim, L); fp32. */
#include <math.h>
#include <stdlib.h>

void scan_fwd(const float *u, const float *delta, const float *A, const float *B, const float *C,
              float *out, int batch, int dim, int L, int N) {
    float *h = malloc(sizeof(float) * N);
    for (int b = 0; b < batch; b++)
        for (int d = 0; d < dim; d++) {
            for (int n = 0; n < N; n++) h[n] = 0.f;
            const float *ud = u + ((long)b * dim + d) * L, *dd = delta + ((long)b * dim + d) * L;
            const float *Bb = B + (long)b * N * L, *Cb = C + (long)b * N * L;
            for (int t = 0; t < L; t++) {
                float y = 0.f, dt = dd[t], du = dt * ud[t];
                for (int n = 0; n < N; n++) {
                    h[n] = expf(dt * A[d * N + n]) * h[n] + du * Bb[(long)n * L + t];
                    y += Cb[(long)n * L + t] * h[n];
                }
                out[((long)b * dim + d) * L + t] = y;
            }
        }
    free(h);
}
