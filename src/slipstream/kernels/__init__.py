"""Optional fast paths, one shim each, every one with a plain-PyTorch fallback that CI runs.

- `fp8_linear`: FP8 e4m3 linear layers (the wire's 128x128 block weight scales, per-token
  activation scales); `fp8_gemm`'s Triton GEMM on GPUs with FP8 tensor cores (Hopper, Ada),
  dequantize-and-matmul elsewhere.
- `w4a16`: linear layers over packed int4 weights (`quant/int4.py`) and bf16 activations; a Triton
  GEMM on CUDA, dequantize-and-matmul elsewhere. `gemm_plan` holds both GEMMs' tiling and split-K.
- `sampling`: one fused Triton pass over the logits that samples (Gumbel-max over the rollout
  engine's hashed noise) and computes the sampled token's log-prob; `None` where Triton or CUDA
  is missing, and the engine's plain sampler runs instead.
- `attention`: decode attention over the slot KV cache (each sequence read to its own length,
  keys split across programs at small batch with long caches; bf16 or FP8 cache, the latter widened
  to fp16 in registers); SDPA elsewhere.
- `decode_layer`: the glue between a decode step's GEMMs in three kernels (add+RMSNorm, q/k norm +
  RoPE + KV write, SiLU*up; FP8 activation quantization folded in); the rollout engine's
  `fused_step.py` uses them on CUDA, the model's own forward runs elsewhere.

Nothing here imports a service; the rollout engine picks these up.
"""
