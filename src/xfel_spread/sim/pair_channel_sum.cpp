// The per-term loop of xfel_spread.sim.forward.PairChannelSum in one pass (sim/fused.py builds it).
//
// Per pair i and each of its channels j: du = u[i, j] - centre[i], arg = du^2 curvature[i] + floor[i];
// a term below the cut-off adds e = exp(-2 arg) weight[i, j] to the pair's total, and (with moments) e du
// and e du^2 to its two moment sums; a term at or beyond the cut-off adds nothing. One pass over the
// rows, vectorised, where eager torch makes about eight. A NaN arg anywhere in a pair's row makes its
// three sums NaN, as in the eager forward (NaN is not beyond the cut-off there, and NaN * 0 is NaN).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kShifter = 6755399441055744.0;       // 1.5 * 2^52: adding it rounds to an integer
constexpr int64_t kShifterBits = 0x4338000000000000;  // its bits
constexpr int kDegree = 13;
constexpr double kInverseFactorial[kDegree + 1] = {
    1.0,          1.0,          1.0 / 2,        1.0 / 6,         1.0 / 24,         1.0 / 120,      1.0 / 720,
    1.0 / 5040,   1.0 / 40320,  1.0 / 362880,   1.0 / 3628800,   1.0 / 39916800,   1.0 / 479001600, 1.0 / 6227020800};

// Four doubles and four 64-bit integers (GCC and Clang vector extensions; on a CPU without AVX two SSE2
// halves).
typedef double Doubles __attribute__((vector_size(32)));
typedef int64_t Integers __attribute__((vector_size(32)));
constexpr int kLanes = 4;

// The terms of four channels: their exp(-2 arg) weight (0 for a dead term, NaN for a NaN arg) and du.
// exp(x), x = -2 arg in (-2 cutoff, 0] (0 for a dead term), is x = n ln2 + r with |r| <= ln2 / 2, exp(r)
// by its Taylor polynomial to r^13 (truncation below 1e-17 relative) and 2^n put straight into the
// exponent bits: within a few ulp of std::exp, with no libm call and no branch.
template <typename D, typename I>
__attribute__((always_inline)) inline D terms(D u, D weight, double centre, double curvature, double floor_, double cutoff, D& du) {
  du = u - centre;
  const D arg = du * du * curvature + floor_;
  const auto live = arg < cutoff;  // then arg >= 0 by construction
  const D zero = D{} + 0.0;
  const D x = live ? -2.0 * arg : zero;
  const D shifted = x * kLog2e + kShifter;
  const D n = shifted - kShifter;
  const D r = (x - n * kLn2Hi) - n * kLn2Lo;
  D p = zero + kInverseFactorial[kDegree];
  for (int power = kDegree - 1; power >= 0; --power) p = p * r + kInverseFactorial[power];
  const I scale_bits = ((I)shifted - kShifterBits + 1023) << 52;
  const D nan = arg != arg ? arg : zero;
  return p * (D)scale_bits * (live ? weight : zero) + nan;
}

// The pairs' rows of channels: padded (row i at u + i width, weight + i width) or, when k_first is set,
// ragged: row i is band[k_first[i] ...] with weights table[row[i], k_first[i] ...], n_channels[i] long.
struct Rows {
  const double *curvature, *centre, *floor, *u, *weight;
  double *total, *first, *second;
  int64_t width;
  double cutoff;
  const int64_t *row = nullptr, *k_first = nullptr, *n_channels = nullptr;
};

// The rows [begin, end), four channels at a time, a row's last few through a one-lane copy of the same
// arithmetic. On x86-64 GCC also builds an x86-64-v3 copy (AVX2, FMA) and picks it at run time when
// the CPU has them, so the build stays portable across a cluster's nodes. That copy is 6x faster than
// the baseline's (SSE2, no 64-bit compare), which is about as fast as eager torch.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void sum_rows(const Rows& rows, int64_t begin, int64_t end) {
  typedef double Double1 __attribute__((vector_size(8)));
  typedef int64_t Integer1 __attribute__((vector_size(8)));
  for (int64_t i = begin; i < end; ++i) {
    const bool ragged = rows.k_first != nullptr;
    const int64_t width = ragged ? rows.n_channels[i] : rows.width, whole = width - width % kLanes;
    const double* ur = ragged ? rows.u + rows.k_first[i] : rows.u + i * width;
    const double* wr = ragged ? rows.weight + rows.row[i] * rows.width + rows.k_first[i] : rows.weight + i * width;
    const double ci = rows.centre[i], ki = rows.curvature[i], fi = rows.floor[i];
    Doubles s0 = {}, s1 = {}, s2 = {};
    for (int64_t j = 0; j < whole; j += kLanes) {
      Doubles u, w, du;
      std::memcpy(&u, ur + j, sizeof u);
      std::memcpy(&w, wr + j, sizeof w);
      const Doubles e = terms<Doubles, Integers>(u, w, ci, ki, fi, rows.cutoff, du);
      s0 += e;
      s1 += e * du;
      s2 += e * du * du;
    }
    double t0 = (s0[0] + s0[1]) + (s0[2] + s0[3]);
    double t1 = (s1[0] + s1[1]) + (s1[2] + s1[3]);
    double t2 = (s2[0] + s2[1]) + (s2[2] + s2[3]);
    for (int64_t j = whole; j < width; ++j) {
      Double1 du;
      const Double1 e = terms<Double1, Integer1>(Double1{ur[j]}, Double1{wr[j]}, ci, ki, fi, rows.cutoff, du);
      t0 += e[0];
      t1 += e[0] * du[0];
      t2 += e[0] * du[0] * du[0];
    }
    rows.total[i] = t0;
    if (rows.first != nullptr) {
      rows.first[i] = t1;
      rows.second[i] = t2;
    }
  }
}

void check(const torch::Tensor& tensor, int64_t dim, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat64 && tensor.is_contiguous() &&
                  tensor.dim() == dim,
              "pair sums: ", name, " must be a contiguous float64 CPU tensor of ", dim, " dimension(s)");
}

// The terms' cut-off must be in (0, 40], the range the loop takes (one check for every entry point).
void check_cutoff(double cutoff, const char* name) {
  TORCH_CHECK(cutoff > 0.0 && cutoff <= 40.0, name, ": the cut-off must be in (0, 40]");
}

// The sums, and with moments the two moment sums, of the pairs' rows (see Rows: padded, or ragged when
// k_first is given), the inputs checked by the caller.
std::vector<torch::Tensor> channel_sums(const torch::Tensor& curvature, const torch::Tensor& centre,
                                        const torch::Tensor& floor_, const torch::Tensor& u,
                                        const torch::Tensor& weight, int64_t width, double cutoff, bool moments,
                                        const int64_t* row = nullptr, const int64_t* k_first = nullptr,
                                        const int64_t* n_channels = nullptr) {
  const int64_t n = curvature.size(0);
  auto total = torch::empty({n}, u.options());
  auto first = torch::empty({moments ? n : 0}, u.options());
  auto second = torch::empty({moments ? n : 0}, u.options());
  const Rows rows{curvature.data_ptr<double>(), centre.data_ptr<double>(), floor_.data_ptr<double>(),
                  u.data_ptr<double>(), weight.data_ptr<double>(), total.data_ptr<double>(),
                  moments ? first.data_ptr<double>() : nullptr, moments ? second.data_ptr<double>() : nullptr,
                  width, cutoff, row, k_first, n_channels};
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) { sum_rows(rows, begin, end); });
  return {total, first, second};
}

std::vector<torch::Tensor> pair_channel_sum(torch::Tensor curvature, torch::Tensor centre, torch::Tensor floor_,
                                            torch::Tensor u, torch::Tensor weight, double cutoff, bool moments) {
  check(curvature, 1, "curvature");
  check(centre, 1, "centre");
  check(floor_, 1, "floor");
  check(u, 2, "u");
  check(weight, 2, "weight");
  const int64_t n = u.size(0), width = u.size(1);
  TORCH_CHECK(curvature.size(0) == n && centre.size(0) == n && floor_.size(0) == n && weight.size(0) == n &&
                  weight.size(1) == width,
              "pair_channel_sum: the pairs' shapes disagree");
  check_cutoff(cutoff, "pair_channel_sum");
  return channel_sums(curvature, centre, floor_, u, weight, width, cutoff, moments);
}

// Per pair, arg(u) = |N (u h - hkl)|^2 / gauss_width as curvature (u - centre)^2 + floor, as
// xfel_spread.sim.forward.arg_quadratic computes it: s = N h, curvature = |s|^2 / w, centre = s.(N hkl) /
// |s|^2, floor = |N (centre h - hkl)|^2 / w.
struct Quadratic {
  double s[3], big_h[3], r[3], q, curvature, centre, floor_;
};

inline Quadratic quadratic(const double* h, const double* hkl, const double* ncells, double gauss_width) {
  Quadratic a;
  double dot = 0.0;
  a.q = 0.0;
  for (int axis = 0; axis < 3; ++axis) {
    a.s[axis] = h[axis] * ncells[axis];
    a.big_h[axis] = hkl[axis] * ncells[axis];
    a.q += a.s[axis] * a.s[axis];
    dot += a.s[axis] * a.big_h[axis];
  }
  a.centre = dot / a.q;
  a.floor_ = 0.0;
  for (int axis = 0; axis < 3; ++axis) {
    a.r[axis] = (a.centre * h[axis] - hkl[axis]) * ncells[axis];
    a.floor_ += a.r[axis] * a.r[axis];
  }
  a.curvature = a.q / gauss_width;
  a.floor_ /= gauss_width;
  return a;
}

// The checks of n pairs' ragged rows (see Rows): every pair's channels inside the band and its row inside
// the table, so that the loop reads nothing outside them.
void check_ragged_rows(int64_t n, const torch::Tensor& band, const torch::Tensor& table, const torch::Tensor& row,
                       const torch::Tensor& k_first, const torch::Tensor& n_channels, double cutoff, const char* name) {
  check(band, 1, "band");
  check(table, 2, "table");
  for (const auto* index : {&row, &k_first, &n_channels}) {
    TORCH_CHECK(index->device().is_cpu() && index->scalar_type() == torch::kInt64 && index->is_contiguous() &&
                    index->dim() == 1,
                "pair sums: row, k_first and n_channels must be contiguous int64 CPU vectors");
  }
  const int64_t width = band.size(0), n_rows = table.size(0);
  TORCH_CHECK(table.size(1) == width && row.size(0) == n && k_first.size(0) == n && n_channels.size(0) == n,
              name, ": the pairs' shapes disagree");
  check_cutoff(cutoff, name);
  const int64_t *rp = row.data_ptr<int64_t>(), *kf = k_first.data_ptr<int64_t>(), *nc = n_channels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < n_rows && kf[i] >= 0 && nc[i] >= 0 && kf[i] + nc[i] <= width,
                name, ": pair ", i, "'s channels or table row are outside the band or the table");
  }
}

// pair_channel_sum over ragged rows (see Rows): pair i's channels are band[k_first[i] + j], j < n_channels[i],
// with weights table[row[i], k_first[i] + j]; no padded (pairs, channels) arrays.
std::vector<torch::Tensor> pair_channel_sum_ragged(torch::Tensor curvature, torch::Tensor centre, torch::Tensor floor_,
                                                   torch::Tensor band, torch::Tensor table, torch::Tensor row,
                                                   torch::Tensor k_first, torch::Tensor n_channels, double cutoff,
                                                   bool moments) {
  check(curvature, 1, "curvature");
  check(centre, 1, "centre");
  check(floor_, 1, "floor");
  const int64_t n = curvature.size(0);
  TORCH_CHECK(centre.size(0) == n && floor_.size(0) == n, "pair_channel_sum_ragged: the pairs' shapes disagree");
  check_ragged_rows(n, band, table, row, k_first, n_channels, cutoff, "pair_channel_sum_ragged");
  return channel_sums(curvature, centre, floor_, band, table, band.size(0), cutoff, moments, row.data_ptr<int64_t>(),
                      k_first.data_ptr<int64_t>(), n_channels.data_ptr<int64_t>());
}

// The sums of pair_channel_sum with each pair's quadratic from its h (n, 3), index hkl (n, 3) and N (3,),
// and (with gradients) each pair's total's derivative in its h (n, 3) and in N (n, 3, summed over the
// pairs by the caller after weighting). By the chain rule through curvature, centre and floor:
//   dT/dcurvature = -2 M2, dT/dcentre = 4 curvature M1, dT/dfloor = -2 T (T, M1, M2 the sums);
//   dcurvature/ds = 2 s / w; dcentre/ds = (H - 2 centre s) / |s|^2, dcentre/dH = s / |s|^2;
//   dfloor/ds = (2 centre r + 2 (r.s) dcentre/ds) / w, dfloor/dH = (-2 r + 2 (r.s) s / |s|^2) / w,
// with H = N hkl and r = centre s - H (r.s vanishes but for rounding; it is kept, as autograd keeps it);
// dT/dh = N dT/ds and dT/dN = h dT/ds + hkl dT/dH, axis by axis.
//
// The channels are ragged rows (see Rows): pair i's are band[k_first[i] + j] for j < n_channels[i], with
// weights table[row[i], k_first[i] + j] (photons_k |F_k|^2 of its index), so no padded (pairs, channels)
// arrays are made at all.
std::vector<torch::Tensor> pair_quadratic_sum(torch::Tensor h, torch::Tensor hkl, torch::Tensor ncells,
                                              torch::Tensor band, torch::Tensor table, torch::Tensor row,
                                              torch::Tensor k_first, torch::Tensor n_channels, double gauss_width,
                                              double cutoff, bool gradients) {
  check(h, 2, "h");
  check(hkl, 2, "hkl");
  check(ncells, 1, "ncells");
  const int64_t n = h.size(0), width = band.size(0);
  TORCH_CHECK(h.size(1) == 3 && hkl.size(0) == n && hkl.size(1) == 3 && ncells.size(0) == 3,
              "pair_quadratic_sum: the pairs' shapes disagree");
  check_ragged_rows(n, band, table, row, k_first, n_channels, cutoff, "pair_quadratic_sum");
  const int64_t *rp = row.data_ptr<int64_t>(), *kf = k_first.data_ptr<int64_t>(), *nc = n_channels.data_ptr<int64_t>();
  const auto u = band;
  auto curvature = torch::empty({n}, u.options());
  auto centre = torch::empty({n}, u.options());
  auto floor_ = torch::empty({n}, u.options());
  auto total = torch::empty({n}, u.options());
  auto first = torch::empty({gradients ? n : 0}, u.options());
  auto second = torch::empty({gradients ? n : 0}, u.options());
  auto grad_h = torch::empty({gradients ? n : 0, 3}, u.options());
  auto grad_n = torch::empty({gradients ? n : 0, 3}, u.options());
  const double *hp = h.data_ptr<double>(), *kp = hkl.data_ptr<double>(), *np = ncells.data_ptr<double>();
  double *cp = curvature.data_ptr<double>(), *up = centre.data_ptr<double>(), *fp = floor_.data_ptr<double>();
  const Rows rows{cp, up, fp, band.data_ptr<double>(), table.data_ptr<double>(), total.data_ptr<double>(),
                  gradients ? first.data_ptr<double>() : nullptr, gradients ? second.data_ptr<double>() : nullptr,
                  width, cutoff, rp, kf, nc};
  double* gh = gradients ? grad_h.data_ptr<double>() : nullptr;
  double* gn = gradients ? grad_n.data_ptr<double>() : nullptr;
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Quadratic a = quadratic(hp + 3 * i, kp + 3 * i, np, gauss_width);
      cp[i] = a.curvature;
      up[i] = a.centre;
      fp[i] = a.floor_;
    }
    sum_rows(rows, begin, end);
    if (!gradients) return;
    for (int64_t i = begin; i < end; ++i) {
      const Quadratic a = quadratic(hp + 3 * i, kp + 3 * i, np, gauss_width);
      const double d_curvature = -2.0 * rows.second[i], d_centre = 4.0 * a.curvature * rows.first[i];
      const double d_floor = -2.0 * rows.total[i];
      double rs = 0.0;
      for (int axis = 0; axis < 3; ++axis) rs += a.r[axis] * a.s[axis];
      for (int axis = 0; axis < 3; ++axis) {
        const double centre_s = (a.big_h[axis] - 2.0 * a.centre * a.s[axis]) / a.q;
        const double centre_h = a.s[axis] / a.q;
        const double d_s = d_curvature * 2.0 * a.s[axis] / gauss_width + d_centre * centre_s +
                           d_floor * (2.0 * a.centre * a.r[axis] + 2.0 * rs * centre_s) / gauss_width;
        const double d_big_h =
            d_centre * centre_h + d_floor * (-2.0 * a.r[axis] + 2.0 * rs * centre_h) / gauss_width;
        gh[3 * i + axis] = d_s * np[axis];
        gn[3 * i + axis] = d_s * hp[3 * i + axis] + d_big_h * kp[3 * i + axis];
      }
    }
  });
  return {total, grad_h, grad_n};
}

// The runs of channels over which each row's nearest Miller index ceil(u_k h - 0.5) stays the same, as
// xfel_spread.sim.forward.channel_runs finds them with torch: per run its row of h (P, 3), its index
// (n, 3) and its channels k_start <= k < k_end, in row and channel order. The rounding is torch's
// operation for operation (the product, then the half subtracted, then ceil): no FMA contraction.
// The rounding loop; on x86-64 GCC also builds an x86-64-v3 copy (ceil as one instruction, SSE4.1).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
__attribute__((optimize("fp-contract=off"))) int64_t find_runs(const double* hp, const double* up, int64_t n_rows,
                                                               int64_t k, std::vector<int64_t>& pixel,
                                                               std::vector<int64_t>& k_start, std::vector<double>& index) {
  for (int64_t p = 0; p < n_rows; ++p) {
    double previous[3] = {0.0, 0.0, 0.0};
    for (int64_t j = 0; j < k; ++j) {
      double current[3];
      for (int axis = 0; axis < 3; ++axis) {
        const double product = up[j] * hp[3 * p + axis];
        current[axis] = std::ceil(product - 0.5);
      }
      // A NaN index differs from every other, as torch's != says, so it starts a run at each channel.
      if (j == 0 || current[0] != previous[0] || current[1] != previous[1] || current[2] != previous[2]) {
        pixel.push_back(p);
        k_start.push_back(j);
        index.insert(index.end(), current, current + 3);
      }
      std::memcpy(previous, current, sizeof previous);
    }
  }
  return static_cast<int64_t>(pixel.size());
}

std::vector<torch::Tensor> channel_runs(torch::Tensor h, torch::Tensor u) {
  check(h, 2, "h");
  check(u, 1, "u");
  TORCH_CHECK(h.size(1) == 3, "channel_runs: h must be (P, 3)");
  const int64_t n_rows = h.size(0), k = u.size(0);
  const double *hp = h.data_ptr<double>(), *up = u.data_ptr<double>();
  std::vector<int64_t> pixel, k_start;
  std::vector<double> index;
  const int64_t n = find_runs(hp, up, n_rows, k, pixel, k_start, index);
  auto long_options = torch::TensorOptions().dtype(torch::kInt64);
  auto pixel_t = torch::empty({n}, long_options), start_t = torch::empty({n}, long_options);
  auto end_t = torch::empty({n}, long_options);
  auto index_t = torch::empty({n, 3}, h.options());
  int64_t *pp = pixel_t.data_ptr<int64_t>(), *sp = start_t.data_ptr<int64_t>(), *ep = end_t.data_ptr<int64_t>();
  std::memcpy(pp, pixel.data(), n * sizeof(int64_t));
  std::memcpy(sp, k_start.data(), n * sizeof(int64_t));
  std::memcpy(index_t.data_ptr<double>(), index.data(), 3 * n * sizeof(double));
  for (int64_t i = 0; i < n; ++i) ep[i] = (i + 1 < n && pp[i + 1] == pp[i]) ? sp[i + 1] : k;
  return {pixel_t, index_t, start_t, end_t};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pair_channel_sum", &pair_channel_sum,
        "Per pair: sum of exp(-2 arg) weight over its channels below the cut-off, and its two moments in du");
  m.def("pair_channel_sum_ragged", &pair_channel_sum_ragged,
        "pair_channel_sum over ragged channel rows: the band and the table's rows read in place");
  m.def("channel_runs", &channel_runs,
        "The runs of channels over which each row's nearest Miller index ceil(u h - 0.5) stays the same");
  m.def("pair_quadratic_sum", &pair_quadratic_sum,
        "pair_channel_sum of each pair's arg quadratic from (h, hkl, N) over ragged channel rows, with its "
        "derivatives in h and N");
}
