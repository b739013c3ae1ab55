"""W4A16: linear layers over packed int4 weights and bf16 activations (`quant/int4.py`'s layout).

Why. A decode step at small batch is a stream of weight bytes: at 4.25 bits a weight (half a byte
plus an fp32 scale per 128) the GEMMs read a quarter of bf16's bytes, so a weight-bound step can
run up to ~3.8x faster, and a rollout server holds a model four times its bf16 size.

How (CUDA, Triton). Each program takes [BLOCK_N weight rows x BLOCK_M tokens] of the output
(transposed, `gemm_plan.py` says why and how K is split) and walks K one 128-wide group at a time:
it loads the group's 64 packed bytes per row, turns the low nibbles (even inputs) and the high
nibbles (odd inputs) into exact small integers in the activations' dtype with bit operations
(no int-to-float conversions: `_nibbles`), interleaves them back into input order in registers,
multiplies them by the activations on the tensor cores, and adds the product times the group's
scale (loaded one group ahead) to an fp32 accumulator. The weights are never widened in memory.

One token (decode at batch 1, where W4A16 is meant to pay) takes a GEMV instead
(`_w4a16_gemv_kernel`): a tensor-core dot would waste 15 of its 16 token columns and needs the
nibbles interleaved in registers first. The GEMV reads the packed bytes as int32 words (8 inputs
each, 16-byte loads), turns each nibble into an exact fp32 with one `lop3` and one subtraction
(`_magic`), and multiplies on CUDA cores in fp32 (products q * x are exact). The words of the next
two groups are already loading while a step computes (`gemm_plan.GEMV_PREFETCH`), and each thread
loads its own rows' scales (`_group_scales`: no trip through shared memory, no barrier a step). On
the H200 the GEMV made the Qwen3-8B shape's batch-1 decode step 3.35 ms against the tensor-core
kernel's 4.28 ms, and these choices 3.11 ms (docs/benchmarks.md, issue 16); its 144 launches a
step still stream ~1.7 TB/s, about a third of the bandwidth.

Same function as `dequantize_int4` then matmul, which is what runs on the CPU (and on GPUs
without Triton); the roundings differ only in where fp32 products meet bf16 (the kernel scales
after each group's product instead of rounding q * scale to bf16 first).
`tests/test_w4a16.py` pins the kernel against that definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slipstream.kernels import gemm_plan
from slipstream.quant.int4 import GROUP, dequantize_int4, int4_names, quantize_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: dequantize and matmul
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:

    @triton.jit
    def _nibbles(n, dt: tl.constexpr):
        """int16 nibbles (0..15, the stored q + 8) -> q in dt, exactly. For bf16/fp16 without an
        int-to-float conversion: OR-ing n into the mantissa of 128 (bf16) / 1024 (fp16), whose last
        mantissa bit is worth 1, gives 128 + n / 1024 + n; one subtraction leaves q."""
        if dt == tl.bfloat16:
            return (n | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
        elif dt == tl.float16:
            return (n | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        else:
            return (n - 8).to(dt)

    @triton.jit
    def _w4a16_kernel(
        x_ptr, p_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
        stride_xm, stride_pn, stride_sn, stride_om,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_K: tl.constexpr,
    ):  # fmt: skip
        pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        half = tl.arange(0, GROUP_K // 2)  # byte i of a group holds inputs 2i (low) and 2i+1 (high)
        full = tl.arange(0, GROUP_K)
        n_mask, m_mask = offs_n < N, offs_m < M
        p_rows = p_ptr + offs_n.to(tl.int64)[:, None] * stride_pn
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        s_rows = s_ptr + offs_n * stride_sn
        dt: tl.constexpr = x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # out transposed: weight rows x tokens
        lo = split * CHUNK
        scale = tl.load(s_rows + lo, mask=n_mask & (lo * GROUP_K < K), other=0.0)
        for step in range(CHUNK):  # the last split may run past K: masked
            g = lo + step
            byte = g * (GROUP_K // 2) + half
            k = g * GROUP_K + full
            p = tl.load(p_rows + byte[None, :], mask=n_mask[:, None] & (byte < K // 2)[None, :], other=136)
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            # the next group's scales now, so their latency hides behind this group's product
            next_scale = tl.load(s_rows + g + 1, mask=n_mask & ((g + 1) * GROUP_K < K), other=0.0)
            p16 = p.to(tl.int16)
            w = tl.join(_nibbles(p16 & 15, dt), _nibbles(p16 >> 4, dt))  # [BLOCK_N, 64, (even, odd)]
            w = tl.reshape(w, [BLOCK_N, GROUP_K])  # back in input order: one dot over the group
            if IEEE:
                prod = tl.dot(w, tl.trans(x), input_precision="ieee")
            else:
                prod = tl.dot(w, tl.trans(x))
            acc += prod * scale[:, None]
            scale = next_scale
        gemm_plan.store_tile(
            acc, out_ptr, part_ptr, count_ptr, bias_ptr, offs_n, offs_m, M, N, stride_om, SPLITS, HAS_BIAS,
            False,
        )  # fmt: skip

    @triton.jit
    def _magic(src, mask: tl.constexpr, ASM: tl.constexpr):
        """(src & mask) | 0x4B000000 (the bits of 2^23 + the masked nibble). ptxas emits an AND and
        an OR for it; one `lop3` does both (CUDA only: the interpreter runs the plain form)."""
        if ASM:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, $2, 0x4B000000, 0xEA;", "=r,r,r",
                [src, tl.full(src.shape, mask, tl.int32)], dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            return (src & mask) | 0x4B000000

    @triton.jit
    def _group_scales(s_ptr, s_rows, g, mask, WORDS: tl.constexpr, OWN: tl.constexpr):
        """Group g's scale of each row, [BLOCK_N, 1] or broadcast over the words [BLOCK_N, WORDS]. A
        plain load is laid out for coalescing and then moved into the words' layout through shared
        memory, two barriers a step that hold a program's warps in lockstep; with OWN each thread
        loads its own rows' scales in the words' layout (an `ld.global.nc` Triton does not re-lay)."""
        if OWN:
            ok = mask[:, None] & (tl.arange(0, WORDS) >= 0)[None, :]
            scale = tl.inline_asm_elementwise(
                "ld.global.nc.f32 $0, [$1];", "=f,l", [tl.where(ok, s_rows[:, None] + g, s_ptr)],
                dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
            return tl.where(ok, scale, 0.0)
        else:
            return tl.load(s_rows + g, mask=mask, other=0.0)[:, None]

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, N, K, stride_wn, stride_sn,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
        PREFETCH: tl.constexpr, OWN_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
    ):  # fmt: skip
        """One token: out[n] = sum over groups g of scale[n, g] * sum_i q[n, i] * x[i], on CUDA
        cores. w is the packed bytes read as int32 words: word w holds inputs 8w..8w+7, input
        8w+j in bits 4j..4j+3 (little-endian bytes, low nibble first). The words of the next
        PREFETCH groups (0-2) ride in registers from step to step."""
        pid_n, split = tl.program_id(0), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        words_per_group: tl.constexpr = GROUP_K // 8
        offs_w = tl.arange(0, words_per_group)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        s_rows = s_ptr + offs_n * stride_sn
        acc = tl.zeros([BLOCK_N, words_per_group], tl.float32)
        lo = split * CHUNK
        group_words = w_rows + offs_w[None, :]  # + g * words_per_group: group g's words
        # Triton pipelines only loads that feed a dot (or, given the loop's own num_stages, stages
        # these through shared memory with a barrier a step: slower on the H200, session 13).
        ahead = tl.zeros([BLOCK_N, words_per_group], tl.int32)
        ahead2 = ahead
        if PREFETCH >= 1:
            ahead = tl.load(
                group_words + lo * words_per_group, mask=n_mask[:, None] & (lo * GROUP_K < K), other=0
            )
        if PREFETCH >= 2:
            ahead2 = tl.load(
                group_words + (lo + 1) * words_per_group,
                mask=n_mask[:, None] & ((1 < CHUNK) & ((lo + 1) * GROUP_K < K)),
                other=0,
            )
        for step in range(CHUNK):  # the last split may run past K: masked
            g = lo + step
            inside = g * GROUP_K < K
            if PREFETCH == 0:
                words = tl.load(group_words + g * words_per_group, mask=n_mask[:, None] & inside, other=0)
            else:  # this step's words came PREFETCH steps ago; the group PREFETCH ahead starts loading
                next_g = g + PREFETCH
                next_mask = n_mask[:, None] & ((next_g - lo < CHUNK) & (next_g * GROUP_K < K))
                coming = tl.load(group_words + next_g * words_per_group, mask=next_mask, other=0)
                if PREFETCH == 1:
                    words, ahead = ahead, coming
                else:
                    words, ahead, ahead2 = ahead, ahead2, coming
            scale = _group_scales(s_ptr, s_rows, g, n_mask & inside, words_per_group, OWN_SCALES and ASM)
            x_group = x_ptr + g * GROUP_K + offs_w * 8
            part = tl.zeros([BLOCK_N, words_per_group], tl.float32)
            for half in tl.static_range(2):
                src = words >> (16 * half)  # inputs 4..7 of a word: its high half
                for j in tl.static_range(4):
                    # Nibble j of src, in place (times 16^j), OR-ed into the mantissa of 2^23: the
                    # float 2^23 + nibble * 16^j exactly, and one subtraction leaves q * 16^j (one
                    # LOP3 and one FADD a weight, no shift, no int-to-float conversion). The
                    # activation is scaled by 16^-j (a power of two: exact) to match.
                    f = _magic(src, 15 << (4 * j), ASM).to(tl.float32, bitcast=True)
                    q = f - (8388608.0 + 8.0 * 16**j)
                    x = tl.load(x_group + 4 * half + j, mask=inside, other=0.0).to(tl.float32)
                    part += q * (x * (1.0 / 16**j))[None, :]
            acc += part * scale
        out = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]: store_tile's transposed tile of one token
        gemm_plan.store_tile(
            out, out_ptr, part_ptr, count_ptr, bias_ptr, offs_n, tl.arange(0, 1), 1, N, N, SPLITS, HAS_BIAS,
            False,
        )  # fmt: skip


def _as_words(packed: torch.Tensor) -> torch.Tensor | None:
    """packed uint8 [N, K/2] viewed as int32 [N, K/8] (no copy), or None where its strides forbid it."""
    if packed.stride(1) != 1 or packed.stride(0) % 4 or packed.storage_offset() % 4:
        return None
    return packed.view(torch.int32)


def w4a16_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ dequantize_int4(packed, scales).T (+ bias): packed uint8 [N, K/2], scales fp32
    [N, K/128] -> [..., N] in x's dtype. The Triton kernel on CUDA; dequantize-then-matmul elsewhere."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = packed.shape[0]
    if tuple(packed.shape) != (n, k // 2) or tuple(scales.shape) != (n, k // GROUP) or k % GROUP:
        raise ValueError(
            f"w4a16_linear: x [..., {k}] needs packed [N, {k // 2}] and scales [N, {k // GROUP}] "
            f"(K a multiple of {GROUP}), got {tuple(packed.shape)} and {tuple(scales.shape)}"
        )
    if not available(x):
        return F.linear(x, dequantize_int4(packed, scales, x.dtype), bias)
    return w4a16_matmul(x.reshape(-1, k), packed, scales, bias).view(*lead, n)


def w4a16_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton path of `w4a16_linear` for x [M, K] (CUDA; tests also run it on CPU tensors
    under TRITON_INTERPRET=1)."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    (m, k), n = x2.shape, packed.shape[0]
    words = _as_words(packed) if m == 1 and gemm_plan.W4A16_GEMV else None
    if words is not None:  # one token: the GEMV, no tensor cores
        return _gemv(x2[0], words, scales, bias)
    p = gemm_plan.plan(m, n, k, gemm_plan.num_sms(x.device))
    out, part, counters = gemm_plan.outputs(m, n, p, x.dtype, x.device)
    _w4a16_kernel[(triton.cdiv(n, p.block_n), triton.cdiv(m, p.block_m), p.splits)](
        x2, packed, scales, bias if bias is not None else scales, out, part, counters, m, n, k,
        x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        CHUNK=p.chunk, SPLITS=p.splits, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_N=p.block_n, BLOCK_M=p.block_m, GROUP_K=GROUP, num_warps=p.num_warps, num_stages=p.num_stages,
    )  # fmt: skip
    return out


def _gemv(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One token x [K] against int32 words [N, K/8] -> [1, N] in x's dtype."""
    n, k = words.shape[0], x.shape[0]
    p = gemm_plan.gemv_plan(n, k, gemm_plan.num_sms(x.device))
    out, part, counters = gemm_plan.outputs(1, n, p, x.dtype, x.device)
    _w4a16_gemv_kernel[(triton.cdiv(n, p.block_n), 1, p.splits)](
        x, words, scales, bias if bias is not None else scales, out, part, counters, n, k,
        words.stride(0), scales.stride(0),
        CHUNK=p.chunk, SPLITS=p.splits, HAS_BIAS=bias is not None, ASM=x.is_cuda,
        PREFETCH=int(gemm_plan.GEMV_PREFETCH), OWN_SCALES=gemm_plan.GEMV_OWN_SCALES,
        BLOCK_N=p.block_n, GROUP_K=GROUP, num_warps=p.num_warps, num_stages=p.num_stages,
    )  # fmt: skip
    return out


class W4A16Linear(nn.Module):
    """An `nn.Linear` whose weight is held as packed int4 + group scales (`quant/int4.py`). A bias
    stays a parameter in the model's dtype under its Hugging Face name."""

    def __init__(
        self, in_features: int, out_features: int, device: torch.device, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"W4A16Linear needs in_features a multiple of {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        # Not in the state dict: updates address the layer by its weight's name and [out, in] shape.
        self.register_buffer(
            "packed", torch.full((out_features, in_features // 2), 136, dtype=torch.uint8, device=device),
            persistent=False,
        )  # fmt: skip
        self.register_buffer(
            "scales", torch.ones((out_features, in_features // GROUP), dtype=torch.float32, device=device),
            persistent=False,
        )  # fmt: skip
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> W4A16Linear:
        layer = cls(linear.in_features, linear.out_features, linear.weight.device, linear.bias)
        layer.load_(linear.weight)
        return layer

    @torch.no_grad()
    def load_(self, w: torch.Tensor) -> None:
        """Quantize a full-precision [out, in] weight into this layer's buffers, in place (a CUDA
        graph that reads them sees the new version)."""
        self.load_packed_(*quantize_int4(w.to(self.packed.device)))

    @torch.no_grad()
    def load_packed_(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        """Take an already packed weight (the wire's int4) as it is: no second rounding."""
        self.packed.copy_(packed)
        self.scales.copy_(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(x, self.packed, self.scales, self.bias)


def convert_to_w4a16(model: nn.Module, targets: str = "linear") -> dict[str, W4A16Linear]:
    """Swap the linear layers `quant.int4.int4_names(..., targets)` picks for `W4A16Linear`, in
    place; returns the new layers by their weight's Hugging Face name (how updates address them)."""
    names = int4_names(((n, p.shape) for n, p in model.named_parameters()), targets)
    swapped: dict[str, W4A16Linear] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and name + ".weight" in names:
                layer = W4A16Linear.from_linear(child)
                setattr(parent, child_name, layer)
                swapped[name + ".weight"] = layer
    return swapped
