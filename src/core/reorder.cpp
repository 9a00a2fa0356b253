// tile() / untile(): raster <-> tiled order of the video part of a contiguous [B, S, H, D] tensor on the host.
#include <cstring>

#include "core/errors.hpp"

namespace tilewise {
namespace {

enum class Direction { to_tiled, to_raster };

void reorder(const Problem& problem, const void* in, void* out, Direction dir) {
  detail::require(in != nullptr, dir == Direction::to_tiled ? "raster_in" : "tiled_in", "null", "a tensor pointer");
  detail::require(out != nullptr, dir == Direction::to_tiled ? "tiled_out" : "raster_out", "null", "a tensor pointer");
  Problem p = problem;
  p.order = TokenOrder::tiled;  // validates that the tile divides the latent
  const Plan plan(p, Pattern::dense(), Device::cpu);
  const TokenMap tiled = plan.token_map();
  TokenMap raster = tiled;
  raster.order = TokenOrder::raster;
  const int64_t row = p.q_heads * p.head_dim * dtype_size(p.dtype);  // bytes of one sequence position
  const int64_t S = plan.problem().seq_len;
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t base = b * S * row;
    for (int64_t s = 0; s < S; ++s) {
      if (tiled.seq.is_text(s)) {
        std::memcpy(dst + base + s * row, src + base + s * row, row);
        continue;
      }
      const Dim3 c = raster.video_coord(s);
      const int64_t from = dir == Direction::to_tiled ? s : tiled.video_position(c);
      const int64_t to = dir == Direction::to_tiled ? tiled.video_position(c) : s;
      std::memcpy(dst + base + to * row, src + base + from * row, row);
    }
  }
}

}  // namespace

void tile(const Problem& problem, const void* raster_in, void* tiled_out) {
  reorder(problem, raster_in, tiled_out, Direction::to_tiled);
}
void untile(const Problem& problem, const void* tiled_in, void* raster_out) {
  reorder(problem, tiled_in, raster_out, Direction::to_raster);
}

}  // namespace tilewise
