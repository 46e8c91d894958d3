// LSTM and GRU recurrences, forward and backward, as MindSpore Custom(func_type="aot") kernels.
//
// The input projection and the recurrence of one layer in one op, with the arithmetic of
// ds2exp/kernels/rnn.py (its docstrings are the specification), directions d = 0 (forward), 1 (reverse):
//   forward  in: x (B,T,In), lengths (B) int32, then w_ih (G,In), w_hh (G,H), b_hh (G), b_ih (G) per direction
//           out: y (B,T,D*H), A (D,T,B,G), C|S (D,T,B,H), Hs (D,T,B,H)      [aligned time, see rnn.py]
//   backward in: x, lengths, then w_ih, w_hh per direction, then A, C|S, Hs, dy (B,T,D*H)
//           out: dx (B,T,In), then d_w_ih, d_w_hh, d_b_hh, d_b_ih per direction
// The projections x w_ih^T and their gradients live only inside the op (oneDNN's GEMM from the
// MindSpore wheel), so the step keeps no (B,T,D*G) tensor between forward and backward.
// G = 4H (LSTM i,f,g,o) or 3H (GRU r,z,n). The kernels run on MindSpore's own buffers: no copies,
// no Python, no GIL.
//
// Threads: with no more threads than directions, each direction runs whole on a thread of its own.
// With more, one direction at a time, every thread owning a fixed range of hidden units (all gates
// of those units), so that a direction's W_hh is read once per step by all cores together and stays
// in cache; one barrier per time step. Every output element of the recurrence is one running sum in
// the same order (k = 0, 1, ...) whichever thread computes it and however the columns are blocked,
// and the GEMMs are cut into blocks that do not depend on the thread count, so no result depends on it.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

int g_threads = 1;
// 1: with no more threads than directions, each direction runs whole on its own thread (no barriers,
// which a busy machine makes costly: a thread waits at every step for one the OS has descheduled);
// 0: one direction at a time, every thread on it.
int g_split_directions = 1;
// wall seconds spent in the forward and in the backward kernels (the step bench reads them)
std::atomic<int64_t> g_nanoseconds[2];

struct Timer {
  int which;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  explicit Timer(int w) : which(w) {}
  ~Timer() {
    g_nanoseconds[which] += std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - start).count();
  }
};

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

// A matrix M (K rows, N columns) packed in panels of 16 columns (pack_panels): element (k, n) at
// p[(n / 16) * 16 * K + k * 16 + n % 16], so that a block of columns is read as a few sequential
// streams. A row-major W_hh row is 4-16 KiB apart from the next, and reading it down a column block
// crosses a page every few rows, which the prefetchers do not follow (the recurrence's product
// streams W_hh from cache at every step).
struct Panels {
  const float* p;
  int K;
  const float* column_block(int n) const { return p + (long)(n >> 4) * 16 * K; }
  float at(int k, int n) const { return column_block(n)[k * 16 + (n & 15)]; }
};

// out[r, n..n+16*NV) = sum_k a[r*lda + k] * M[k, n..]: the register block, r < RB.
template <int RB, int NV>
inline void block(const float* a, long lda, const Panels& m, int n, float* out, long ldo) {
  v16 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = v16{};
  const float* col[NV];
  for (int v = 0; v < NV; ++v) col[v] = m.column_block(n + 16 * v);
  for (int k = 0; k < m.K; ++k) {
    v16 mv[NV];
    for (int v = 0; v < NV; ++v) mv[v] = load(col[v] + k * 16);
    for (int r = 0; r < RB; ++r) {
      const float s = a[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * mv[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * ldo + n + 16 * v, acc[r][v]);
}

// Column blocks: 64 wide for up to 4 rows, 32 wide for 8 rows (16 accumulators either way; 8 rows
// read each W_hh vector for twice the rows). n0 is a multiple of 16.
template <int RB>
inline void rows_block(const float* a, long lda, const Panels& m, float* out, long ldo, int n0, int n1) {
  int n = n0;
  constexpr int NV = RB >= 8 ? 2 : 4;
  for (; n + 16 * NV <= n1; n += 16 * NV) block<RB, NV>(a, lda, m, n, out, ldo);
  for (; n + 16 <= n1; n += 16) block<RB, 1>(a, lda, m, n, out, ldo);
  for (; n < n1; ++n)
    for (int r = 0; r < RB; ++r) {
      float s = 0.0f;
      for (int k = 0; k < m.K; ++k) s += a[r * lda + k] * m.at(k, n);
      out[r * ldo + n] = s;
    }
}

// out[r, n] = sum_k a[r*lda + k] * M[k, n], rows r < R (a row-major, R x K), columns n0 <= n < n1
// (n0 % 16 == 0).
void gemm(const float* a, long lda, int R, const Panels& m, float* out, long ldo, int n0, int n1) {
  int r = 0;
  for (; r + 8 <= R; r += 8) rows_block<8>(a + r * lda, lda, m, out + r * ldo, ldo, n0, n1);
  for (; r + 4 <= R; r += 4) rows_block<4>(a + r * lda, lda, m, out + r * ldo, ldo, n0, n1);
  for (; r < R; ++r) rows_block<1>(a + r * lda, lda, m, out + r * ldo, ldo, n0, n1);
}

// Panels of M[k, n] = src[k * ks + n * ns] for k < K and the columns n0 <= n < n1 (whole panels
// of 16; columns past N are zero) into dst (ceil(N / 16) panels of 16 * K floats).
Panels pack_panels(const float* src, long ks, long ns, int K, int N, int n0, int n1, float* dst) {
  for (int c = n0 / 16; c < (n1 + 15) / 16; ++c) {
    float* panel = dst + (long)c * 16 * K;
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < 16; ++i) {
        const int n = 16 * c + i;
        panel[k * 16 + i] = n < N ? src[k * ks + n * ns] : 0.0f;
      }
  }
  return Panels{dst, K};
}

inline long panels_size(int K, int N) { return 16L * K * ((N + 15) / 16); }

// Eigen's float32 rational tanh (ds2exp/kernels/tanh_fit.py holds the coefficients' one home; the
// numba kernels compute the same function).
inline float tanh_fit(float x) {
  const float clamp = 7.90531110763549805f;
  x = x < -clamp ? -clamp : (x > clamp ? clamp : x);
  const float x2 = x * x;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

inline float sigmoid_fit(float x) { return 0.5f * tanh_fit(0.5f * x) + 0.5f; }

struct Shape {
  int B, T, D, G, H;
};

// Aligned time t of row b (length L) -> frame: direction 1 runs each row backwards over its length.
inline int frame(int d, int t, int L) { return (d == 1 && t < L) ? L - 1 - t : t; }

// Hidden units [u0, u1) owned by thread `id` of `nt`, in blocks of 16 (one vector).
inline void units(int H, int nt, int id, int& u0, int& u1) {
  const int blocks = (H + 15) / 16;
  u0 = std::min(H, 16 * (blocks * id / nt));
  u1 = std::min(H, 16 * (blocks * (id + 1) / nt));
}

inline int team(int H) {
  const int most = std::max(1, (H + 15) / 16);
  return std::max(1, std::min(g_threads, most));
}

void clip_lengths(const int32_t* lengths, int B, int T, std::vector<int>& L, int& Tm) {
  L.resize(B);
  Tm = 0;
  for (int b = 0; b < B; ++b) {
    L[b] = std::max(0, std::min(T, (int)lengths[b]));
    Tm = std::max(Tm, L[b]);
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <bool LSTM>
void forward_direction(const Shape& s, int d, const float* xp, const std::vector<int>& L, int Tm, const float* w,
                       const float* bhh, const float* bih, float* y, float* A, float* CS, float* Hs) {
  const int B = s.B, T = s.T, G = s.G, H = s.H, DH = s.D * H;
  const int NG = G / H;
  std::vector<float> packed(NG * panels_size(H, H)), xb(G), gates((size_t)B * G);
  for (int j = 0; j < G; ++j) xb[j] = LSTM ? bhh[j] + bih[j] : bih[j];
  float* Ad = A + (size_t)d * T * B * G;
  float* Sd = CS + (size_t)d * T * B * H;
  float* Hd = Hs + (size_t)d * T * B * H;
  const int nt = team(H);
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num();
    int u0, u1;
    units(H, omp_get_num_threads(), id, u0, u1);
    // each gate's block of W_hh transposed (M[k, u] = w[g*H + u, k]), in panels: only this thread's
    // units, the only ones it reads
    std::vector<Panels> wT(NG);
    for (int g = 0; g < NG; ++g)
      wT[g] = pack_panels(w + (size_t)g * H * H, 1, H, H, H, u0, u1, packed.data() + g * panels_size(H, H));
    for (int t = 0; t < T; ++t) {
      float* a_t = Ad + (size_t)t * B * G;
      float* s_t = Sd + (size_t)t * B * H;
      float* h_t = Hd + (size_t)t * B * H;
      if (t >= Tm) {  // past every row's length: zero outputs (frame t is padding in every row)
        for (int b = 0; b < B; ++b) {
          for (int g = 0; g < G / H; ++g) std::memset(a_t + (size_t)b * G + g * H + u0, 0, sizeof(float) * (u1 - u0));
          std::memset(s_t + (size_t)b * H + u0, 0, sizeof(float) * (u1 - u0));
          std::memset(h_t + (size_t)b * H + u0, 0, sizeof(float) * (u1 - u0));
          std::memset(y + ((size_t)b * T + t) * DH + d * H + u0, 0, sizeof(float) * (u1 - u0));
        }
        continue;
      }
      const float* h_prev = t > 0 ? Hd + (size_t)(t - 1) * B * H : nullptr;
      for (int g = 0; g < G / H; ++g) {
        if (h_prev)
          gemm(h_prev, H, B, wT[g], gates.data() + g * H, G, u0, u1);
        else
          for (int b = 0; b < B; ++b) std::memset(&gates[(size_t)b * G + g * H + u0], 0, sizeof(float) * (u1 - u0));
      }
      for (int b = 0; b < B; ++b) {
        const int f = frame(d, t, L[b]);
        const float keep = t < L[b] ? 1.0f : 0.0f;
        const float* x = xp + ((size_t)b * T + f) * G;
        const float* gb = &gates[(size_t)b * G];
        float* ab = a_t + (size_t)b * G;
        float* sb = s_t + (size_t)b * H;
        float* hb = h_t + (size_t)b * H;
        float* yb = y + ((size_t)b * T + f) * DH + d * H;
        const float* hp = h_prev ? h_prev + (size_t)b * H : nullptr;
        if (LSTM) {
          const float* cp = t > 0 ? Sd + (size_t)(t - 1) * B * H + (size_t)b * H : nullptr;
#pragma omp simd
          for (int u = u0; u < u1; ++u) {
            const float i = sigmoid_fit(gb[u] + (x[u] + xb[u]));
            const float fg = sigmoid_fit(gb[H + u] + (x[H + u] + xb[H + u]));
            const float gg = tanh_fit(gb[2 * H + u] + (x[2 * H + u] + xb[2 * H + u]));
            const float o = sigmoid_fit(gb[3 * H + u] + (x[3 * H + u] + xb[3 * H + u]));
            ab[u] = i;
            ab[H + u] = fg;
            ab[2 * H + u] = gg;
            ab[3 * H + u] = o;
            const float c = (cp ? cp[u] : 0.0f) * fg + i * gg;
            sb[u] = c;
            const float h = tanh_fit(c) * o;
            hb[u] = h;
            yb[u] = h * keep;
          }
        } else {
#pragma omp simd
          for (int u = u0; u < u1; ++u) {
            const float r = sigmoid_fit((x[u] + xb[u]) + gb[u] + bhh[u]);
            const float z = sigmoid_fit((x[H + u] + xb[H + u]) + gb[H + u] + bhh[H + u]);
            const float sn = gb[2 * H + u] + bhh[2 * H + u];
            const float n = tanh_fit((x[2 * H + u] + xb[2 * H + u]) + r * sn);
            ab[u] = r;
            ab[H + u] = z;
            ab[2 * H + u] = n;
            sb[u] = sn;
            const float h = ((hp ? hp[u] : 0.0f) - n) * z + n;
            hb[u] = h;
            yb[u] = h * keep;
          }
        }
      }
#pragma omp barrier
    }
  }
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------
// oneDNN's GEMM from the MindSpore wheel (mindspore/lib/libdnnl.so.2); without a threadpool it runs
// on the calling thread.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// C (M x N) = op(A) op(B) + beta C, row-major, 'N' or 'T' as in BLAS. The rows of C are cut into
// (at most) four fixed blocks, one GEMM each, shared out to the threads: the cut does not depend
// on the thread count, so neither do the results.
void gemm_blocks(char ta, char tb, int M, int N, int K, const float* A, long lda, const float* B, long ldb, float beta,
                 float* C, long ldc) {
  const int blocks = std::max(1, std::min(4, M));
#pragma omp parallel for num_threads(std::min(g_threads, blocks)) schedule(static)
  for (int i = 0; i < blocks; ++i) {
    const int m0 = (int)((long)M * i / blocks), m1 = (int)((long)M * (i + 1) / blocks);
    if (m1 <= m0) continue;
    const float* a = ta == 'N' ? A + (size_t)m0 * lda : A + m0;
    if (K <= 0) {
      for (int m = m0; m < m1; ++m)
        for (int n = 0; n < N; ++n) C[(size_t)m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[(size_t)m * ldc + n];
      continue;
    }
    dnnl_sgemm(ta, tb, m1 - m0, N, K, 1.0f, a, lda, B, ldb, beta, C + (size_t)m0 * ldc, ldc);
  }
}

// d W_hh[j, u] = sum over steps t >= 1 and rows b of dGh[t, b, j] * Hs[t-1, b, u]
void weight_grad(const float* dGh, const float* Hd, int B, int Tm, int G, int H, float* dw) {
  gemm_blocks('T', 'N', G, H, (Tm - 1) * B, dGh + (size_t)B * G, G, Hd, H, 0.0f, dw, H);
}

template <bool LSTM>
void backward_direction(const Shape& s, int d, const std::vector<int>& L, int Tm, const float* w, const float* A,
                        const float* CS, const float* Hs, const float* dy, float* dxp, float* dw, float* db,
                        float* dbi) {
  const int B = s.B, T = s.T, G = s.G, H = s.H, DH = s.D * H;
  const float* Ad = A + (size_t)d * T * B * G;
  const float* Sd = CS + (size_t)d * T * B * H;
  const float* Hd = Hs + (size_t)d * T * B * H;
  std::vector<float> dGh((size_t)std::max(Tm, 1) * B * G), dh((size_t)B * H, 0.0f), dc((size_t)B * H, 0.0f),
      back(LSTM ? 0 : (size_t)B * H), packed(panels_size(G, H));
  const int nt = team(H);
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num();
    int u0, u1;
    units(H, omp_get_num_threads(), id, u0, u1);
    const Panels wp = pack_panels(w, H, 1, G, H, u0, u1, packed.data());  // W_hh, this thread's columns
    for (int t = Tm; t < T; ++t)  // frames past every row's length get no gradient
      for (int b = 0; b < B; ++b)
        for (int g = 0; g < G / H; ++g)
          std::memset(dxp + ((size_t)b * T + t) * G + g * H + u0, 0, sizeof(float) * (u1 - u0));
    for (int t = Tm - 1; t >= 0; --t) {
      const float* a_t = Ad + (size_t)t * B * G;
      float* dg_t = &dGh[(size_t)t * B * G];
      for (int b = 0; b < B; ++b) {
        const int f = frame(d, t, L[b]);
        const float* dyb = dy + ((size_t)b * T + f) * DH + d * H;
        const bool valid = t < L[b];
        const float* ab = a_t + (size_t)b * G;
        float* dgb = dg_t + (size_t)b * G;
        float* dxb = dxp + ((size_t)b * T + f) * G;
        float* dhb = &dh[(size_t)b * H];
        if (LSTM) {
          float* dcb = &dc[(size_t)b * H];
          const float* cb = Sd + (size_t)t * B * H + (size_t)b * H;
          const float* cpb = t > 0 ? Sd + (size_t)(t - 1) * B * H + (size_t)b * H : nullptr;
#pragma omp simd
          for (int u = u0; u < u1; ++u) {
            const float i = ab[u], fg = ab[H + u], gg = ab[2 * H + u], o = ab[3 * H + u];
            const float dhk = dhb[u] + (valid ? dyb[u] : 0.0f);
            const float tc = tanh_fit(cb[u]);
            const float d_o = dhk * tc * o * (1.0f - o);
            const float dck = dcb[u] + dhk * o * (1.0f - tc * tc);
            const float d_i = dck * gg * i * (1.0f - i);
            const float d_g = dck * i * (1.0f - gg * gg);
            const float d_f = cpb ? dck * cpb[u] * fg * (1.0f - fg) : 0.0f;
            dcb[u] = dck * fg;
            dgb[u] = d_i;
            dgb[H + u] = d_f;
            dgb[2 * H + u] = d_g;
            dgb[3 * H + u] = d_o;
            dxb[u] = d_i;
            dxb[H + u] = d_f;
            dxb[2 * H + u] = d_g;
            dxb[3 * H + u] = d_o;
          }
        } else {
          const float* sb = Sd + (size_t)t * B * H + (size_t)b * H;
          const float* hpb = t > 0 ? Hd + (size_t)(t - 1) * B * H + (size_t)b * H : nullptr;
#pragma omp simd
          for (int u = u0; u < u1; ++u) {
            const float r = ab[u], z = ab[H + u], n = ab[2 * H + u];
            const float dhk = dhb[u] + (valid ? dyb[u] : 0.0f);
            const float h_prev = hpb ? hpb[u] : 0.0f;
            const float dn = dhk * (1.0f - z) * (1.0f - n * n);
            const float dz = (h_prev - n) * dhk * z * (1.0f - z);
            const float dr = dn * sb[u] * r * (1.0f - r);
            dxb[u] = dr;
            dxb[H + u] = dz;
            dxb[2 * H + u] = dn;
            dgb[u] = dr;
            dgb[H + u] = dz;
            dgb[2 * H + u] = dn * r;
            dhb[u] = dhk * z;
          }
        }
      }
#pragma omp barrier
      if (t > 0) {  // dh for step t-1: this step's gate gradients through W_hh, this thread's units
        if (LSTM) {
          gemm(dg_t, G, B, wp, dh.data(), H, u0, u1);
        } else {  // dh = dh * z (above) + the product, added after it as the numpy kernels do
          gemm(dg_t, G, B, wp, back.data(), H, u0, u1);
          for (int b = 0; b < B; ++b)
            for (int u = u0; u < u1; ++u) dh[(size_t)b * H + u] += back[(size_t)b * H + u];
        }
      }
    }
  }
  weight_grad(dGh.data(), Hd, B, Tm, G, H, dw);
  // bias gradients: d b_hh sums the recurrent pre-activations' gradient, d b_ih the input ones'
#pragma omp parallel num_threads(nt)
  {
    const int id = omp_get_thread_num(), all = omp_get_num_threads();
    const int j0 = G * id / all, j1 = G * (id + 1) / all;
    for (int j = j0; j < j1; ++j) db[j] = dbi[j] = 0.0f;
    for (int k = 0; k < Tm * B; ++k)
      for (int j = j0; j < j1; ++j) db[j] += dGh[(size_t)k * G + j];
    for (int k = 0; k < B * T; ++k)
      for (int j = j0; j < j1; ++j) dbi[j] += dxp[(size_t)k * G + j];
  }
}

// Directions on threads of their own (each then runs with a team of one: nested regions are off).
inline bool by_direction(int D) { return D > 1 && g_split_directions && g_threads > 1 && g_threads <= D; }

// MindSpore's aot calling convention: params holds the inputs, then the outputs. Both ops start with
// x (B, T, In), lengths (B) and w_ih, w_hh of the first direction.
struct Call {
  Shape s;
  int In, Tm;
  const float* x;
  std::vector<int> L;
  Call(void** params, int64_t** shapes, int D)
      : s{(int)shapes[0][0], (int)shapes[0][1], D, (int)shapes[3][0], (int)shapes[3][1]},
        In((int)shapes[0][2]),
        x(static_cast<const float*>(params[0])) {
    clip_lengths(static_cast<const int32_t*>(params[1]), s.B, s.T, L, Tm);
  }
};

// The tensors the forward saves for the backward: gate activations, cell states (LSTM) or W_hn h + b_hn
// (GRU), hidden states, each (D, T, B, ...), three consecutive params.
struct Saved {
  float *A, *CS, *Hs;
  explicit Saved(void** p)
      : A(static_cast<float*>(p[0])), CS(static_cast<float*>(p[1])), Hs(static_cast<float*>(p[2])) {}
};

template <bool LSTM>
int forward(int nparam, void** params, int64_t** shapes) {
  Timer timer(0);
  const Call c(params, shapes, (nparam - 6) / 4);
  const Shape& s = c.s;
  const int D = s.D;
  float* y = static_cast<float*>(params[2 + 4 * D]);
  const Saved saved(params + 3 + 4 * D);
  const size_t rows = (size_t)s.B * s.T;
  std::vector<float> xp((size_t)D * rows * s.G);  // each direction's projections, (B*T, G)
  for (int d = 0; d < D; ++d)
    gemm_blocks('N', 'T', (int)rows, s.G, c.In, c.x, c.In, static_cast<const float*>(params[2 + 4 * d]), c.In,
                0.0f, xp.data() + d * rows * s.G, s.G);
#pragma omp parallel for num_threads(D) schedule(static, 1) if (by_direction(D))
  for (int d = 0; d < D; ++d) {
    const float* w = static_cast<const float*>(params[3 + 4 * d]);
    const float* bhh = static_cast<const float*>(params[4 + 4 * d]);
    const float* bih = static_cast<const float*>(params[5 + 4 * d]);
    forward_direction<LSTM>(s, d, xp.data() + d * rows * s.G, c.L, c.Tm, w, bhh, bih, y, saved.A, saved.CS,
                            saved.Hs);
  }
  return 0;
}

template <bool LSTM>
int backward(int nparam, void** params, int64_t** shapes) {
  Timer timer(1);
  const Call c(params, shapes, (nparam - 7) / 6);
  const Shape& s = c.s;
  const int D = s.D, In = c.In, Tm = c.Tm;
  const float* x = c.x;
  const std::vector<int>& L = c.L;
  const Saved saved(params + 2 + 2 * D);
  const float *A = saved.A, *CS = saved.CS, *Hs = saved.Hs;
  const float* dy = static_cast<const float*>(params[5 + 2 * D]);
  const int o = 6 + 2 * D;
  float* dx = static_cast<float*>(params[o]);
  const size_t rows = (size_t)s.B * s.T;
  std::vector<float> dxp((size_t)D * rows * s.G);  // each direction's projections' gradient, (B*T, G)
#pragma omp parallel for num_threads(D) schedule(static, 1) if (by_direction(D))
  for (int d = 0; d < D; ++d) {
    const float* w = static_cast<const float*>(params[3 + 2 * d]);
    float* dw = static_cast<float*>(params[o + 2 + 4 * d]);
    float* db = static_cast<float*>(params[o + 3 + 4 * d]);
    float* dbi = static_cast<float*>(params[o + 4 + 4 * d]);
    backward_direction<LSTM>(s, d, L, Tm, w, A, CS, Hs, dy, dxp.data() + d * rows * s.G, dw, db, dbi);
  }
  for (int d = 0; d < D; ++d) {
    const float* w_ih = static_cast<const float*>(params[2 + 2 * d]);
    const float* g = dxp.data() + d * rows * s.G;
    gemm_blocks('N', 'N', (int)rows, In, s.G, g, s.G, w_ih, In, d == 0 ? 0.0f : 1.0f, dx, In);      // dx
    gemm_blocks('T', 'N', s.G, In, (int)rows, g, s.G, x, In, 0.0f, static_cast<float*>(params[o + 1 + 4 * d]), In);
  }
  return 0;
}

}  // namespace

extern "C" {

void ds2_set_threads(int n) {
  g_threads = n > 0 ? n : 1;
  omp_set_max_active_levels(1);  // a direction on its own thread runs its inner regions on that thread
}
void ds2_set_split_directions(int on) { g_split_directions = on; }
double ds2_kernel_seconds(int which) { return g_nanoseconds[which & 1].load() * 1e-9; }

// The four kernels in MindSpore's aot signature (ndims, dtypes, stream and extra are not needed).
#define DS2_AOT_KERNEL(name, body)                                                                           \
  int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,        \
           void* extra) {                                                                                     \
    return body(nparam, params, shapes);                                                                      \
  }
DS2_AOT_KERNEL(lstm_forward, forward<true>)
DS2_AOT_KERNEL(lstm_backward, backward<true>)
DS2_AOT_KERNEL(gru_forward, forward<false>)
DS2_AOT_KERNEL(gru_backward, backward<false>)
}
