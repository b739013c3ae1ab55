"""Optional fast paths, one shim each, every one with a plain-PyTorch fallback that CI runs.

- `fp8_linear`: FP8 e4m3 linear layers (row-wise weight scales, per-token activation scales);
  `torch._scaled_mm` on GPUs with FP8 tensor cores (Hopper, Ada), dequantize-and-matmul elsewhere.
- `sampling`: one fused Triton pass over the logits that samples (Gumbel-max over the rollout
  engine's hashed noise) and computes the sampled token's log-prob; `None` where Triton or CUDA
  is missing, and the engine's plain sampler runs instead.
- `attention`: decode attention over the slot KV cache (each sequence read to its own length,
  keys split across programs at small batch with long caches; bf16 or FP8 cache); SDPA elsewhere.
- `decode_layer`: the glue between a decode step's GEMMs in three kernels (add+RMSNorm, q/k norm +
  RoPE + KV write, SiLU*up; FP8 activation quantization folded in); the rollout engine's
  `fused_step.py` uses them on CUDA, the model's own forward runs elsewhere.

Nothing here imports a service; the rollout engine picks these up.
"""
