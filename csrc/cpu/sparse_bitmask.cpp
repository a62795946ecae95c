// CPU kernels for the bitmask format of unstructured sparse weights:
// memkern::bitmask_decompress_kernel and memkern::bitmask_matmul_kernel.
//
// Format (shared with memkern/ops/sparse_bitmask.py): a (rows x cols) weight W with keep-mask
// M is stored as values (1-D, the kept values in row-major order) and bits
// (rows x ceil(cols/8), uint8): bit b of byte k of row r is M[r, 8k + b]; padding bits past
// cols are 0. Row r's values start at the number of set bits in rows 0..r-1.
//
// The product y = x W^T (+ bias) expands TILE rows of W at a time into a float buffer
// (double for double weights) and multiplies it with one BLAS call, so the dense weight
// never exists: the extra memory is TILE x cols floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace memkern {
namespace {

constexpr int64_t TILE = 64;

// Start of each row's values; checks that the bits hold exactly values.numel() set bits
// and no padding bit, so that no read goes past values.
std::vector<int64_t> row_starts(const uint8_t* bits, int64_t rows, int64_t cols, int64_t n_values) {
  const int64_t bytes = (cols + 7) / 8;
  const int tail = static_cast<int>(cols % 8);
  const uint8_t padding = tail ? static_cast<uint8_t>(0xFF << tail) : 0;
  std::vector<int64_t> start(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* br = bits + r * bytes;
    int64_t count = 0;
    for (int64_t k = 0; k < bytes; ++k) count += __builtin_popcount(br[k]);
    TORCH_CHECK(bytes == 0 || (br[bytes - 1] & padding) == 0, "bitmask kernel: bits of row ", r,
                " has padding bits past column ", cols, " set");
    start[r + 1] = start[r] + count;
  }
  TORCH_CHECK(start[rows] == n_values, "bitmask kernel: bits hold ", start[rows], " set bits but values has ",
              n_values, " elements");
  return start;
}

// Rows [r0, r1) of W into out ((r1 - r0) x cols, zero-filled here).
template <typename scalar_t, typename out_t>
void expand_rows(const scalar_t* values, const uint8_t* bits, const int64_t* start, int64_t r0, int64_t r1,
                 int64_t cols, out_t* out) {
  const int64_t bytes = (cols + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    out_t* o = out + (r - r0) * cols;
    std::fill(o, o + cols, out_t(0));
    const uint8_t* br = bits + r * bytes;
    const scalar_t* v = values + start[r];
    for (int64_t k = 0; k < bytes; ++k) {
      uint32_t byte = br[k];
      while (byte) {
        const int b = __builtin_ctz(byte);
        o[8 * k + b] = static_cast<out_t>(*v++);
        byte &= byte - 1;
      }
    }
  }
}

void check_format(const char* op, const at::Tensor& values, const at::Tensor& bits, int64_t cols) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kByte && bits.size(1) == (cols + 7) / 8, op,
              ": bits must be uint8 (rows, ", (cols + 7) / 8, "), got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(values.device() == bits.device(), op, ": values and bits must be on one device");
}

at::Tensor bitmask_decompress_cpu(const at::Tensor& values, const at::Tensor& bits, int64_t cols) {
  check_format("bitmask_decompress", values, bits, cols);
  const at::Tensor v = values.contiguous(), b = bits.contiguous();
  const int64_t rows = b.size(0);
  const auto start = row_starts(b.const_data_ptr<uint8_t>(), rows, cols, v.numel());
  auto w = at::empty({rows, cols}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "bitmask_decompress", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const uint8_t* bp = b.const_data_ptr<uint8_t>();
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
      expand_rows<scalar_t, scalar_t>(vp, bp, start.data(), r0, r1, cols, wp + r0 * cols);
    });
  });
  return w;
}

at::Tensor bitmask_matmul_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bits,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "bitmask_matmul: x must be 2-D, got ", x.sizes());
  const int64_t n = x.size(0), cols = x.size(1), rows = bits.size(0);
  check_format("bitmask_matmul", values, bits, cols);
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "bitmask_matmul: x and values must have one dtype, got ",
              x.scalar_type(), " and ", values.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows, "bitmask_matmul: bias must be (", rows, "), got ",
                bias->sizes());
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor v = values.contiguous(), b = bits.contiguous();
  const auto start = row_starts(b.const_data_ptr<uint8_t>(), rows, cols, v.numel());
  const at::Tensor xa = x.to(acc).contiguous();
  auto y = at::empty({n, rows}, x.options().dtype(acc));
  auto tile = at::empty({std::min<int64_t>(TILE, rows), cols}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "bitmask_matmul", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
      const int64_t height = std::min<int64_t>(TILE, rows - r0);
      expand_rows<scalar_t, acc_t>(v.const_data_ptr<scalar_t>(), b.const_data_ptr<uint8_t>(), start.data(), r0,
                                   r0 + height, cols, tile.mutable_data_ptr<acc_t>());
      if (n > 0) {
        auto out = y.narrow(1, r0, height);
        at::mm_out(out, xa, tile.narrow(0, 0, height).t());
      }
    }
  });
  if (bias.has_value()) y.add_(bias->to(acc).unsqueeze(0));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("bitmask_decompress_kernel", &bitmask_decompress_cpu);
  m.impl("bitmask_matmul_kernel", &bitmask_matmul_cpu);
}

}  // namespace memkern
