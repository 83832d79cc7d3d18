#include "layout_copy.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "../common/layout.h"

namespace resfast::cpu {
namespace {

// Tiles of kPixels x kChannels values: a few KiB, read along one layout's
// contiguous dim and written along the other's while both stay in L1.
constexpr int64_t kPixels = 64;
constexpr int64_t kChannels = 16;

// dst[n][p][c] = src[n][c][p] (to_channels_last) or dst[n][c][p] = src[n][p][c],
// for elements of type T (a same-sized integer: the values are only moved).
template <typename T, bool kToChannelsLast>
void transpose(const T* src, T* dst, int64_t n, int64_t c, int64_t p) {
  const int64_t pixel_tiles = (p + kPixels - 1) / kPixels;
  at::parallel_for(0, n * pixel_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t sample = tile / pixel_tiles;
      const int64_t p0 = (tile % pixel_tiles) * kPixels, p1 = std::min(p0 + kPixels, p);
      const T* s = src + sample * c * p;
      T* d = dst + sample * c * p;
      for (int64_t c0 = 0; c0 < c; c0 += kChannels) {
        const int64_t c1 = std::min(c0 + kChannels, c);
        for (int64_t ch = c0; ch < c1; ++ch) {
          for (int64_t px = p0; px < p1; ++px) {
            if constexpr (kToChannelsLast) {
              d[px * c + ch] = s[ch * p + px];
            } else {
              d[ch * p + px] = s[px * c + ch];
            }
          }
        }
      }
    }
  });
}

template <bool kToChannelsLast>
void transpose_bytes(const at::Tensor& src, at::Tensor& dst) {
  const int64_t n = src.size(0), c = src.size(1), p = spatial_numel(src);
  const void* s = src.const_data_ptr();
  void* d = dst.data_ptr();
  switch (src.element_size()) {
    case 2:
      return transpose<uint16_t, kToChannelsLast>(static_cast<const uint16_t*>(s), static_cast<uint16_t*>(d), n, c, p);
    case 4:
      return transpose<uint32_t, kToChannelsLast>(static_cast<const uint32_t*>(s), static_cast<uint32_t*>(d), n, c, p);
    case 8:
      return transpose<uint64_t, kToChannelsLast>(static_cast<const uint64_t*>(s), static_cast<uint64_t*>(d), n, c, p);
    default:
      TORCH_INTERNAL_ASSERT(false, "resfast: to_format of ", src.element_size(), "-byte elements");
  }
}

}  // namespace

at::Tensor to_format(const at::Tensor& x, at::MemoryFormat format) {
  if (x.is_contiguous(format)) return x;
  const bool sized = x.element_size() == 2 || x.element_size() == 4 || x.element_size() == 8;
  if ((x.dim() != 4 && x.dim() != 5) || !sized) return x.contiguous(format);
  const at::MemoryFormat channels_last =
      x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  const bool to_channels_last = format == channels_last && x.is_contiguous();
  const bool from_channels_last = format == at::MemoryFormat::Contiguous && x.is_contiguous(channels_last);
  if (!to_channels_last && !from_channels_last) return x.contiguous(format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (to_channels_last) {
    transpose_bytes<true>(x, out);
  } else {
    transpose_bytes<false>(x, out);
  }
  return out;
}

}  // namespace resfast::cpu
