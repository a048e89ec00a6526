// Host side: TMA tensor maps for the WGMMA kernels, encoded through the runtime's driver entry
// point (no link-time libcuda).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moekit {

inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void *ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      return (PFN_cuTensorMapEncodeTiled_v12000) nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// A row-major [rows, k] bf16 matrix in boxes of box_rows x 64 (one 128-byte swizzle row of K)
// with the 128-byte swizzle the WGMMA descriptors (and the GEMM's TMA-store staging) use. Loads
// read out-of-bounds rows and columns as zeros, stores leave them unwritten; row_stride (elements,
// 0: k) lets rows lie further apart; `promotion` is a load hint (stores pass NONE). False when
// the driver refuses the map (e.g. a base that is not 16-byte aligned).
inline bool make_bf16_sw128_map(CUtensorMap *map, const void *base, int64_t rows, int32_t k, int box_rows,
                                int64_t row_stride = 0,
                                CUtensorMapL2promotion promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  auto encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)k, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)(row_stride > 0 ? row_stride : k) * 2};
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promotion,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The bf16 matrix column block [rows][heads][0, cols) of an array with element strides
// (head_stride, row_stride), for TMA stores of boxes of 64 columns x 1 head x box_rows rows with
// the 128-byte swizzle (shared-memory box: box_rows rows of 128 bytes, 16-byte chunk c of row r at
// chunk c ^ (r % 8)). Rows past `rows` are not written. False when the driver refuses the map
// (strides that are not multiples of 8 elements, a misaligned base).
inline bool make_bf16_head_block_store_map(CUtensorMap *map, void *base, int64_t rows, int32_t heads,
                                           int64_t head_stride, int64_t row_stride, int box_rows, int32_t cols = 128) {
  auto encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)heads, (cuuint64_t)rows};
  const cuuint64_t strides[2] = {(cuuint64_t)head_stride * 2, (cuuint64_t)row_stride * 2};
  const cuuint32_t box[3] = {64, 1, (cuuint32_t)box_rows};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, base, dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace moekit
