// CPU kernels for the 2:4 compressed weight format: memkern::sparse24_compress_kernel and
// memkern::sparse24_decompress_kernel.
//
// Format (shared with csrc/cuda/sparse24.cuh, the Triton kernel and reference.py): a
// (rows x cols) weight whose every group of 4 consecutive columns keeps at most 2 values is
// stored as values (rows x cols/2, the kept values of group g at columns 2g and 2g+1 in
// column order) and meta (rows x ceil(cols/8), uint8): group g's 4-bit code
// i0 | (i1 << 2), i0 < i1 its kept positions, sits in byte g/2 at bit 4*(g%2). A group
// keeping fewer than 2 values fills the free slots with the lowest unused positions and
// value 0, so decompress(compress(W, M)) == W * M exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace memkern {
namespace {

template <typename scalar_t>
void compress_rows(const scalar_t* w, const bool* mask, int64_t rows, int64_t cols, scalar_t* values,
                   uint8_t* meta) {
  const int64_t groups = cols / 4, meta_cols = (cols + 7) / 8, value_cols = cols / 2;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      uint8_t* mr = meta + r * meta_cols;
      std::memset(mr, 0, meta_cols);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t base = r * cols + 4 * g;
        int pos[2];
        int n = 0;
        for (int p = 0; p < 4 && n < 2; ++p)
          if (mask[base + p]) pos[n++] = p;
        // Fill free slots with the lowest positions not already kept (their value is 0).
        for (int p = 0; p < 4 && n < 2; ++p)
          if (!mask[base + p] && (n == 0 || pos[0] != p)) pos[n++] = p;
        if (pos[0] > pos[1]) std::swap(pos[0], pos[1]);
        for (int s = 0; s < 2; ++s) {
          const int64_t src = base + pos[s];
          values[r * value_cols + 2 * g + s] = mask[src] ? w[src] : scalar_t(0);
        }
        mr[g / 2] |= static_cast<uint8_t>((pos[0] | (pos[1] << 2)) << (4 * (g % 2)));
      }
    }
  });
}

template <typename scalar_t>
void decompress_rows(const scalar_t* values, const uint8_t* meta, int64_t rows, int64_t cols, scalar_t* w) {
  const int64_t groups = cols / 4, meta_cols = (cols + 7) / 8, value_cols = cols / 2;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      scalar_t* wr = w + r * cols;
      std::fill(wr, wr + cols, scalar_t(0));
      for (int64_t g = 0; g < groups; ++g) {
        const int code = (meta[r * meta_cols + g / 2] >> (4 * (g % 2))) & 15;
        const int i0 = code & 3, i1 = code >> 2;
        // A slot that repeats a position (only possible in hand-made meta) adds, as the
        // Triton and CUDA kernels do.
        wr[4 * g + i0] += values[r * value_cols + 2 * g];
        wr[4 * g + i1] += values[r * value_cols + 2 * g + 1];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse24_compress_cpu(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.dim() == 2 && weight.sizes() == mask.sizes(), "sparse24_compress: weight and mask must be ",
              "2-D of one shape, got ", weight.sizes(), " and ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "sparse24_compress: mask must be bool, got ", mask.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(cols % 4 == 0, "sparse24_compress: weight columns must be a multiple of 4, got ", cols);
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  auto values = at::empty({rows, cols / 2}, weight.options());
  auto meta = at::empty({rows, (cols + 7) / 8}, weight.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sparse24_compress", [&] {
    compress_rows<scalar_t>(w.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(), rows, cols,
                            values.mutable_data_ptr<scalar_t>(), meta.mutable_data_ptr<uint8_t>());
  });
  return {values, meta};
}

at::Tensor sparse24_decompress_cpu(const at::Tensor& values, const at::Tensor& meta, int64_t cols) {
  TORCH_CHECK(values.dim() == 2 && meta.dim() == 2, "sparse24_decompress: values and meta must be 2-D");
  TORCH_CHECK(cols % 4 == 0 && values.size(1) == cols / 2 && meta.size(1) == (cols + 7) / 8 &&
                  meta.size(0) == values.size(0) && meta.scalar_type() == at::kByte,
              "sparse24_decompress: expected values (rows, ", cols / 2, ") and uint8 meta (rows, ", (cols + 7) / 8,
              ") for cols=", cols, ", got ", values.sizes(), " and ", meta.sizes(), " ", meta.scalar_type());
  const int64_t rows = values.size(0);
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  auto w = at::empty({rows, cols}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse24_decompress", [&] {
    decompress_rows<scalar_t>(v.const_data_ptr<scalar_t>(), mt.const_data_ptr<uint8_t>(), rows, cols,
                              w.mutable_data_ptr<scalar_t>());
  });
  return w;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("sparse24_compress_kernel", &sparse24_compress_cpu);
  m.impl("sparse24_decompress_kernel", &sparse24_decompress_cpu);
}

}  // namespace memkern
