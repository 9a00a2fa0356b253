/* tilewise C ABI: a stable, exception-free surface over the C++ plan/run API for bindings (Python ctypes,
 * other languages, C inference engines).
 *
 * Every call returns a tw_status. On failure nothing was written to outputs, and tw_last_error() (thread
 * local) holds the message, e.g. "invalid kv_heads = 5: expected a divisor of q_heads = 24 (grouped-query
 * attention)", and tw_last_error_argument() the argument's name ("kv_heads"). */
#ifndef TILEWISE_TILEWISE_H
#define TILEWISE_TILEWISE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tw_status {
  TW_OK = 0,
  TW_ERROR_INVALID_ARGUMENT = 1, /* a bad argument: see tw_last_error() */
  TW_ERROR_RUNTIME = 2,          /* a CUDA or other run-time failure */
  TW_ERROR_INTERNAL = 3
} tw_status;

enum { TW_DTYPE_F32 = 0, TW_DTYPE_F64 = 1, TW_DTYPE_BF16 = 2, TW_DTYPE_F16 = 3 };
enum { TW_DEVICE_CPU = 0, TW_DEVICE_CUDA = 1, TW_DEVICE_CUDA_REFERENCE = 2 };
enum { TW_TEXT_LAST = 0, TW_TEXT_FIRST = 1 };
enum { TW_ORDER_RASTER = 0, TW_ORDER_TILED = 1 };
enum { TW_LAYOUT_BSHD = 0, TW_LAYOUT_BHSD = 1 };
enum { TW_PATTERN_DENSE = 0, TW_PATTERN_SLIDING_TILE = 1, TW_PATTERN_ATTENTION_TILE = 2, TW_PATTERN_BLOCK_LIST = 3 };
/* docs/semantics.md §11: NATIVE computes in dtype; FP8 quantises q, k, v (in dtype) to e4m3 inside tilewise;
 * FP8_SCALED takes e4m3 q, k, v (one byte per element) with the caller's scales (tw_tensors), dtype being o's. */
enum { TW_PRECISION_NATIVE = 0, TW_PRECISION_FP8 = 1, TW_PRECISION_FP8_SCALED = 2 };

/* Mirrors tilewise::Problem. Strides are in elements: {batch, seq, head, dim}; {0,0,0,1} = contiguous in
 * `layout`. Fill with tw_problem_init() first so that new fields keep their defaults. */
typedef struct tw_problem {
  int64_t batch, q_heads, kv_heads, head_dim;
  int32_t dtype, text_position, order, layout;
  int64_t latent[3]; /* T, H, W */
  int64_t tile[3];   /* tt, th, tw */
  int64_t text_capacity, seq_len, head_offset;
  int64_t q_strides[4], k_strides[4], v_strides[4], o_strides[4];
  double scale; /* 0 = 1/sqrt(head_dim) */
  int32_t precision; /* TW_PRECISION_*, default NATIVE */
  /* SMs the CUDA kernels leave free (>= 0, default 0), e.g. for NCCL beside them; results are unchanged. A
   * persistent launch has max(1, SMs - sm_margin) CTAs; the CPU and CUDA_REFERENCE devices ignore it. */
  int64_t sm_margin;
} tw_problem;

/* Mirrors tilewise::Pattern. Per-head tables hold `num_heads` entries (1 = the same for every head). */
typedef struct tw_pattern {
  int32_t kind;
  int64_t num_heads;
  const int64_t* windows;       /* sliding tile: [num_heads][3] (kt, kh, kw) */
  const int64_t* global_frames; /* attention tile: [num_heads] */
  const int64_t* radius;        /* attention tile: [num_heads], may be NULL (= 0) */
  const int64_t* block_offsets; /* block list: CSR offsets, [heads * num_tiles + 1] */
  int64_t num_block_offsets;
  const int32_t* block_tiles;   /* block list: key tile indices */
  int64_t num_block_tiles;
} tw_pattern;

typedef struct tw_plan tw_plan;

void tw_problem_init(tw_problem* problem);
void tw_pattern_init(tw_pattern* pattern);

tw_status tw_plan_create(const tw_problem* problem, const tw_pattern* pattern, int32_t device, tw_plan** out);
/* Pointers live on the plan's device; lse ([B,Hq,S] float) and text_len ([B] int32) may be NULL.
 * stream: a cudaStream_t for CUDA plans (NULL = default stream), ignored for CPU plans. */
tw_status tw_plan_run(const tw_plan* plan, const void* q, const void* k, const void* v, void* o, float* lse,
                      const int32_t* text_len, void* stream);
/* Mirrors tilewise::Tensors: the pointers of one forward run. lse and text_len may be NULL; the scales are read with
 * TW_PRECISION_FP8_SCALED only (and must be NULL otherwise), float32, contiguous: q_scale [B, Hq, S], k_scale
 * [B, Hkv, tw_plan_fp8_key_blocks], v_scale [B, Hkv, D]. Fill with tw_tensors_init() first. */
typedef struct tw_tensors {
  const void *q, *k, *v;
  void* o;
  float* lse;
  const int32_t* text_len;
  const float *q_scale, *k_scale, *v_scale;
} tw_tensors;

void tw_tensors_init(tw_tensors* tensors);
/* tw_plan_run_with_workspace for every precision. workspace and stream as there. */
tw_status tw_plan_run_tensors(const tw_plan* plan, const tw_tensors* tensors, void* workspace, void* stream);

/* What tw_plan_quantize_fp8 writes (mirrors tilewise::Fp8Tensors): e4m3 q, k, v with the plan's q, k, v strides
 * (bytes) and their float32 scales, shaped as tw_tensors reads them. Fill with tw_fp8_tensors_init() first. */
typedef struct tw_fp8_tensors {
  void *q, *k, *v;
  float *q_scale, *k_scale, *v_scale;
} tw_fp8_tensors;

void tw_fp8_tensors_init(tw_fp8_tensors* tensors);

/* The quantisation of TW_PRECISION_FP8 alone (docs/semantics.md §11.2): q, k, v in dtype (text_len may be NULL),
 * for plans with precision NATIVE or FP8; CPU plans, and CUDA plans (native there: the CUDA backends quantise on
 * `stream` but have no FP8 attention yet). */
tw_status tw_plan_quantize_fp8(const tw_plan* plan, const void* q, const void* k, const void* v,
                               const int32_t* text_len, const tw_fp8_tensors* out, void* stream);
/* FP8 key blocks per (batch, kv head) (k_scale's last dimension) into *count, and, when block_of_position is not
 * NULL, the key block of every sequence position into block_of_position[0, S). */
tw_status tw_plan_fp8_key_blocks(const tw_plan* plan, int64_t* count, int64_t* block_of_position);

/* Backward (docs/semantics.md, "Gradients"). Mirrors tilewise::GradTensors: q, k, v, o, lse (required, from
 * the forward) and dout are read; dlse may be NULL (= zero); dq (q's strides), dk and dv (k's and v's strides)
 * are written whole; text_len may be NULL. Fill with tw_grad_tensors_init() first. */
typedef struct tw_grad_tensors {
  const void *q, *k, *v, *o;
  const float* lse;
  const void* dout;
  const float* dlse;
  void *dq, *dk, *dv;
  const int32_t* text_len;
} tw_grad_tensors;

void tw_grad_tensors_init(tw_grad_tensors* tensors);
/* Device scratch bytes tw_plan_run_backward needs (0 for CPU plans). */
tw_status tw_plan_backward_workspace_size(const tw_plan* plan, uint64_t* bytes);
/* workspace: a device buffer of tw_plan_backward_workspace_size bytes, 256-byte aligned (NULL when that size is
 * 0). deterministic != 0: bitwise reproducible dq. stream as for tw_plan_run. */
tw_status tw_plan_run_backward(const tw_plan* plan, const tw_grad_tensors* tensors, void* workspace,
                               int32_t deterministic, void* stream);
/* Device scratch bytes of tw_plan_run_with_workspace (0 for CPU plans). */
tw_status tw_plan_workspace_size(const tw_plan* plan, uint64_t* bytes);
/* tw_plan_run with caller-owned scratch (NULL = the plan's own): one plan then runs on several streams at once,
 * each with its own workspace (device memory, 256-byte aligned, tw_plan_workspace_size bytes). */
tw_status tw_plan_run_with_workspace(const tw_plan* plan, const void* q, const void* k, const void* v, void* o,
                                     float* lse, const int32_t* text_len, void* workspace, void* stream);
/* FLOPs of allowed pairs (4 * D * pairs); text_len_host may be NULL (= full capacity). */
tw_status tw_plan_flops(const tw_plan* plan, const int32_t* text_len_host, double* flops);
/* Allowed video-video pairs over all video-video pairs, averaged over heads. */
tw_status tw_plan_density(const tw_plan* plan, double* density);
void tw_plan_destroy(tw_plan* plan);

/* Raster <-> tiled order of the video part of a contiguous [B,S,H,D] host tensor (H = q_heads). */
tw_status tw_tile(const tw_problem* problem, const void* raster_in, void* tiled_out);
tw_status tw_untile(const tw_problem* problem, const void* tiled_in, void* raster_out);

/* Facts the bindings take from the library instead of re-deriving them. */
/* Tiles per axis of a latent grid (T, H, W) under a tile (tt, th, tw): ceil(latent / tile). Each of the six
 * sizes must be >= 1 (argument "latent" or "tile"). */
tw_status tw_tile_grid(const int64_t latent[3], const int64_t tile[3], int64_t tiles[3]);
/* The sliding-tile window (kt, kh, kw) as it acts on that grid: min(k, tiles) per axis (a window at least as
 * large as an axis covers it whole). window must be >= 1 per axis (argument "window"). */
tw_status tw_effective_window(const int64_t latent[3], const int64_t tile[3], const int64_t window[3],
                              int64_t effective[3]);
/* The tile grid of a plan, and the effective window of its local head `head` (sliding tile plans only). */
tw_status tw_plan_grid(const tw_plan* plan, int64_t tiles[3]);
tw_status tw_plan_window(const tw_plan* plan, int64_t head, int64_t window[3]);
/* TW_OK when `device` can run attention in `dtype` with head dim `head_dim` here (the device's backend takes
 * them and the device is present), else TW_ERROR_INVALID_ARGUMENT with tw_last_error() saying why and
 * tw_last_error_argument() naming "device", "dtype" or "head_dim". It plans a one-tile problem, so it checks
 * exactly what tw_plan_create checks (the CUDA backend: bf16/f16, D 64/96/128, sm_90; the CPU: every dtype
 * and any D). Costs a plan creation: cache the answer. */
tw_status tw_device_supports(int32_t device, int32_t dtype, int64_t head_dim);
/* The same question for a precision (TW_PRECISION_*; the error may then name "precision"). */
tw_status tw_device_supports_precision(int32_t device, int32_t dtype, int64_t head_dim, int32_t precision);

const char* tw_last_error(void);
const char* tw_last_error_argument(void);
int32_t tw_cuda_available(void);
const char* tw_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TILEWISE_TILEWISE_H */
