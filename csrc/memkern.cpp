// memkern._C: operator schemas and the Python module stub.
//
// The ops defined here are the compiled kernels ("cpp" on CPU tensors, "cuda" on CUDA
// tensors) behind memkern's public operators. The public operators themselves
// (memkern::quantize_rowwise, ...) are defined in Python with torch.library.custom_op so
// they exist, with fake and autograd implementations, even when this extension is not
// built; memkern/backends.py decides per call whether they run these kernels, a Triton
// kernel or the PyTorch reference. Keeping one schema per kernel here and the per-device
// implementations in cpu/*.cpp and cuda/*.cpp is the layout of PyTorch's custom-op tutorial.
// The build queries without tensor arguments (int8_packed_kernel_native, int4_kernel_simd)
// have one CompositeImplicitAutograd kernel each, registered beside the code they describe.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(memkern, m) {
  // quantize_rowwise: symmetric absmax int8 per row; see memkern/ops/quantize.py.
  m.def("quantize_rowwise_kernel(Tensor x) -> (Tensor q, Tensor scale)");
  // block_sparse_matmul: x @ W^T (+ bias) over the kept blocks of W; see memkern/ops/sparse.py.
  m.def("block_sparse_matmul_kernel(Tensor x, Tensor values, Tensor crow, Tensor col, int n_out, Tensor? bias) -> Tensor");
  m.def("block_sparse_matmul_backward_kernel(Tensor grad, Tensor x, Tensor values, Tensor crow, Tensor col, "
        "Tensor ccol, Tensor csc_row, Tensor csc_block) -> (Tensor grad_x, Tensor grad_values)");
  // sparse24: 2:4 compressed weights (kept values + 2-bit positions); see memkern/ops/sparse.py.
  m.def("sparse24_compress_kernel(Tensor weight, Tensor mask) -> (Tensor values, Tensor meta)");
  m.def("sparse24_decompress_kernel(Tensor values, Tensor meta, int cols) -> Tensor");
  // bitmask: unstructured sparse weights as kept values + 1 bit per weight; see
  // memkern/ops/sparse_bitmask.py.
  m.def("bitmask_decompress_kernel(Tensor values, Tensor bits, int cols) -> Tensor");
  m.def("bitmask_matmul_kernel(Tensor x, Tensor values, Tensor bits, Tensor? bias) -> Tensor");
  // kd_loss_rows_kernel: per-row distillation loss of (rows x V) logits, and its gradient with
  // respect to the student logits written into grad (scaled by grad_scale * row_scale[r];
  // a 1-D grad means "none"). grad may be the student tensor itself (the fused-linear path
  // overwrites its fp32 logits chunk). divergence: 0 forward_kl, 1 reverse_kl, 2 jsd.
  // See memkern/ops/kd.py.
  m.def("kd_loss_rows_kernel(Tensor student, Tensor teacher, Tensor? labels, Tensor? row_scale, "
        "Tensor(a!) grad, float alpha, float temperature, int divergence, float beta, "
        "int ignore_index, float kd_scale, float grad_scale) -> Tensor");
  // kd_loss_topk_rows_kernel: per-row distillation loss of (rows x V) student logits against
  // a teacher's (rows x k) top-k log-probabilities (the compute dtype) at int64 indices, over
  // k + 1 buckets, and its gradient written into grad as kd_loss_rows_kernel does.
  // See memkern/ops/kd_topk.py.
  m.def("kd_loss_topk_rows_kernel(Tensor student, Tensor teacher_logprobs, Tensor teacher_indices, "
        "Tensor? labels, Tensor? row_scale, Tensor(a!) grad, float alpha, float temperature, "
        "int divergence, float beta, int ignore_index, float kd_scale, float grad_scale) -> Tensor");
  // Low-precision linear layers; see memkern/ops/lowp.py.
  m.def("int8_linear_kernel(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("int8_linear_packed_kernel(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Whether int8_linear_packed_kernel reads the packed layout itself in this build (else it
  // unpacks the weight first); see memkern.ops.int8_packed_kernel_native.
  m.def("int8_packed_kernel_native() -> bool");
  m.def("int8_weight_only_linear_kernel(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("fp16_linear_kernel(Tensor x, Tensor w_half, Tensor? bias) -> Tensor");
  // Block-sparse int8 linear layer (W8A8, or W8A16 with weight_only); see memkern/ops/sparse_int8.py.
  m.def("block_sparse_int8_linear_kernel(Tensor x, Tensor values, Tensor scales, Tensor crow, Tensor col, "
        "Tensor? bias, bool weight_only) -> Tensor");
  // Which int8 path that kernel runs on this CPU: "avx512_vnni", "avx2" or "portable".
  m.def("sparse_int8_kernel_path() -> str");
  // 4-bit group-wise weight-only linear layer; see memkern/ops/int4.py.
  m.def("int4_weight_only_linear_kernel(Tensor x, Tensor w_int4, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias) -> Tensor");
  // Which vector path the int4 kernel compiled: "avx512", "avx2" or "scalar".
  m.def("int4_kernel_simd() -> str");
}

// Internal kernels, no part of memkern's operators: tests reach them as
// torch.ops.memkern_internal.<name>, and their schemas may change without notice.
// int8_mm_kernel: a @ b.T of int8 (M, K) and (N, K) in int32, exact; allow_vnni picks the
// AVX512-VNNI kernel where the build has it, else the portable loop (cpu/int8_linear.cpp).
TORCH_LIBRARY(memkern_internal, m) {
  m.def("int8_mm_kernel(Tensor a, Tensor b, bool allow_vnni) -> Tensor");
  // block_sparse_int8_mm_kernel: the int32 product of int8 rows a (M, K) with the kept int8
  // blocks of an (n_out, K) weight; allow_vnni as above (cpu/sparse_int8_linear.cpp).
  m.def("block_sparse_int8_mm_kernel(Tensor a, Tensor values, Tensor crow, Tensor col, int n_out, "
        "bool allow_vnni) -> Tensor");
}

extern "C" {
// Importing memkern._C loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "memkern compiled kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MEMKERN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
