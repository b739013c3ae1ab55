"""Weights on the wire: pack -> messages -> stager round trips, and every refusal of the stager."""

import pytest
import torch

from slipstream.proto import types_pb2
from slipstream.quant import dequantize_blockwise, quantize_blockwise
from slipstream.weights import WeightError, WeightStager, iter_messages, model_fingerprint, pack

torch.set_num_threads(1)

QUANTIZED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (50, 24),
        "model.layers.0.input_layernorm.weight": (24,),
        "model.layers.0.self_attn.q_proj.weight": (200, 24),  # partial blocks on both edges
        "model.layers.0.mlp.down_proj.weight": (24, 300),
        "lm_head.weight": (50, 24),
    }
    sd = {name: torch.randn(shape, generator=g, dtype=torch.bfloat16) for name, shape in shapes.items()}
    sd["model.rotary.positions"] = torch.arange(5)  # an integer buffer travels unchanged
    return sd


def _shapes(sd):
    return {name: tuple(t.shape) for name, t in sd.items()}


def _stage(stager: WeightStager, messages) -> tuple[int, dict[str, torch.Tensor]]:
    for msg in messages:
        stager.add(msg)
    return stager.finish()


def _copy(m: types_pb2.WeightManifest) -> types_pb2.WeightManifest:
    out = types_pb2.WeightManifest()
    out.CopyFrom(m)
    return out


def _chunk(version: int, index: int, data: bytes) -> types_pb2.WeightMessage:
    return types_pb2.WeightMessage(chunk=types_pb2.WeightChunk(version=version, index=index, data=data))


# ---- round trips ------------------------------------------------------------------------------


def test_fp8_round_trip():
    sd = _state_dict()
    manifest, chunks = pack(sd, version=3, fmt="fp8", chunk_bytes=1000)
    assert manifest.format == "fp8-block128" and manifest.version == 3
    dtypes = {e.name: e.dtype for e in manifest.tensors}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "float8_e4m3fn"
    assert dtypes["model.layers.0.self_attn.q_proj.weight_scale_inv"] == "float32"
    assert dtypes["model.embed_tokens.weight"] == "bfloat16"
    assert dtypes["model.layers.0.input_layernorm.weight"] == "bfloat16"

    stager = WeightStager(_shapes(sd), current_version=2)
    version, out = _stage(stager, iter_messages(manifest, chunks))
    assert version == 3 and stager.current_version == 3
    assert set(out) == set(sd)  # scale entries are folded into their matrices
    for name, w in sd.items():
        assert out[name].shape == w.shape
        if name in QUANTIZED:
            w = w.float()
            assert out[name].dtype == torch.float32
            assert torch.equal(out[name], dequantize_blockwise(*quantize_blockwise(w)))
            # FP8 bound: within 2^-3 (e4m3's relative step) of each block's amax, hence of the matrix amax.
            assert ((out[name] - w).abs() <= 2**-3 * w.abs().max()).all()
        elif w.is_floating_point():
            assert out[name].dtype == torch.float32 and torch.equal(out[name], w.float())
        else:
            assert torch.equal(out[name], w)


def test_bf16_round_trip_is_exact():
    sd = _state_dict()
    manifest, chunks = pack(sd, version=1, fmt="bf16")
    assert manifest.format == "bf16" and len(chunks) == 1
    assert all(e.dtype != "float8_e4m3fn" and not e.scale_name for e in manifest.tensors)
    _, out = _stage(WeightStager(_shapes(sd), current_version=0), iter_messages(manifest, chunks))
    for name, w in sd.items():
        assert torch.equal(out[name].to(w.dtype), w)


@pytest.mark.parametrize("chunk_bytes", [7, 1000, 4096])
def test_chunk_boundaries_split_tensors(chunk_bytes):
    sd = _state_dict()
    manifest, chunks = pack(sd, version=1, chunk_bytes=chunk_bytes)
    assert sum(len(c) for c in chunks) == manifest.total_bytes
    assert all(len(c) == chunk_bytes for c in chunks[:-1])
    q = next(e for e in manifest.tensors if e.name == QUANTIZED[0])
    # The 200x24 fp8 matrix (4800 bytes) straddles at least one chunk boundary.
    assert q.offset // chunk_bytes != (q.offset + q.nbytes - 1) // chunk_bytes
    _, out = _stage(WeightStager(_shapes(sd), current_version=0), iter_messages(manifest, chunks))
    assert torch.equal(out["lm_head.weight"], sd["lm_head.weight"].float())


def test_messages_are_manifest_then_chunks_in_order():
    manifest, chunks = pack(_state_dict(), version=9, chunk_bytes=512)
    msgs = list(iter_messages(manifest, chunks))
    assert msgs[0].WhichOneof("kind") == "manifest"
    assert [(m.chunk.version, m.chunk.index) for m in msgs[1:]] == [(9, i) for i in range(len(chunks))]
    assert [m.chunk.data for m in msgs[1:]] == chunks


def test_fingerprint_ignores_order_but_not_shapes():
    a = model_fingerprint([("x", (2, 3)), ("y", [4])])
    assert a == model_fingerprint([("y", (4,)), ("x", torch.Size([2, 3]))])
    assert a != model_fingerprint([("x", (3, 2)), ("y", (4,))])
    assert a != model_fingerprint([("x", (2, 3)), ("z", (4,))])


def test_pack_refuses_unknown_format_and_unencodable_dtype():
    with pytest.raises(WeightError, match="unknown weight format"):
        pack(_state_dict(), version=1, fmt="int8")
    with pytest.raises(WeightError, match="no wire encoding"):
        pack({"mask": torch.ones(3, dtype=torch.bool)}, version=1)


# ---- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def packed():
    sd = _state_dict()
    manifest, chunks = pack(sd, version=5, chunk_bytes=1000)
    return sd, manifest, chunks


@pytest.mark.parametrize("current", [5, 6])
def test_refuses_a_version_not_newer(packed, current):
    sd, manifest, _ = packed
    with pytest.raises(WeightError, match="not newer than the current version"):
        WeightStager(_shapes(sd), current_version=current).add(types_pb2.WeightMessage(manifest=manifest))


def test_refuses_another_models_fingerprint(packed):
    sd, manifest, _ = packed
    bad = _copy(manifest)
    bad.model_fingerprint = "0" * 64
    with pytest.raises(WeightError, match="model fingerprint"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=bad))


def test_refuses_a_different_name_set(packed):
    sd, manifest, _ = packed
    expected = _shapes(sd)
    expected["model.layers.1.mlp.up_proj.weight"] = (8, 8)
    with pytest.raises(WeightError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        WeightStager(expected, 0).add(types_pb2.WeightMessage(manifest=manifest))
    del expected["model.layers.1.mlp.up_proj.weight"], expected["lm_head.weight"]
    with pytest.raises(WeightError, match=r"unexpected \['lm_head.weight'\]"):
        WeightStager(expected, 0).add(types_pb2.WeightMessage(manifest=manifest))


def test_refuses_a_shape_mismatch(packed):
    sd, manifest, _ = packed
    expected = _shapes(sd)
    expected["lm_head.weight"] = (51, 24)
    with pytest.raises(WeightError, match=r"lm_head.weight has shape \[50, 24\], expected \[51, 24\]"):
        WeightStager(expected, 0).add(types_pb2.WeightMessage(manifest=manifest))


def test_refuses_inconsistent_dtypes(packed):
    sd, manifest, _ = packed
    unknown = _copy(manifest)
    unknown.tensors[0].dtype = "float16"
    with pytest.raises(WeightError, match="unknown wire dtype 'float16'"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=unknown))
    # An fp8 matrix relabelled bf16: its byte count no longer fits its shape.
    relabelled = _copy(manifest)
    entry = next(e for e in relabelled.tensors if e.name == QUANTIZED[0])
    entry.dtype = "bfloat16"
    with pytest.raises(WeightError, match="its shape and dtype need"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=relabelled))
    # An fp8 matrix whose scale entry is gone.
    no_scale = _copy(manifest)
    next(e for e in no_scale.tensors if e.name == QUANTIZED[0]).scale_name = ""
    with pytest.raises(WeightError, match="scale entry iff it is FP8"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=no_scale))


def test_refuses_total_size_mismatch(packed):
    sd, manifest, chunks = packed
    short = _copy(manifest)
    short.total_bytes -= 1000  # one chunk fewer than the hashes listed, last tensor out of range
    with pytest.raises(WeightError, match="chunk hashes listed"):
        WeightStager(_shapes(sd), 0).add(types_pb2.WeightMessage(manifest=short))
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    with pytest.raises(WeightError, match="chunk 0 has 999 bytes, expected 1000"):
        stager.add(_chunk(5, 0, chunks[0][:-1]))


def test_refuses_a_chunk_out_of_order(packed):
    sd, manifest, chunks = packed
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    stager.add(_chunk(5, 0, chunks[0]))
    with pytest.raises(WeightError, match="chunk 2 arrived, expected chunk 1"):
        stager.add(_chunk(5, 2, chunks[2]))
    with pytest.raises(WeightError, match="chunk 0 arrived, expected chunk 1"):
        stager.add(_chunk(5, 0, chunks[0]))  # a replayed chunk


def test_refuses_a_chunk_before_the_manifest(packed):
    sd, _, chunks = packed
    with pytest.raises(WeightError, match="before any manifest"):
        WeightStager(_shapes(sd), 0).add(_chunk(5, 0, chunks[0]))


def test_refuses_a_chunk_of_another_version(packed):
    sd, manifest, chunks = packed
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    with pytest.raises(WeightError, match="chunk 0 belongs to version 4, staging version 5"):
        stager.add(_chunk(4, 0, chunks[0]))


def test_refuses_a_bad_hash(packed):
    sd, manifest, chunks = packed
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    corrupt = bytearray(chunks[0])
    corrupt[17] ^= 0x01
    # Hashes are checked on a thread pool as chunks arrive: the refusal comes at a later `add`
    # or at `finish` at the latest, always before anything is decoded.
    with pytest.raises(WeightError, match="chunk 0 fails its sha256 check"):
        stager.add(_chunk(5, 0, bytes(corrupt)))
        for i, data in enumerate(chunks[1:], start=1):
            stager.add(_chunk(5, i, data))
        stager.finish()
    assert stager.current_version == 0


def test_refuses_to_finish_with_missing_chunks(packed):
    sd, manifest, chunks = packed
    stager = WeightStager(_shapes(sd), 0)
    n = len(chunks)
    for msg in list(iter_messages(manifest, chunks))[:-2]:
        stager.add(msg)
    with pytest.raises(WeightError, match=f"missing chunks {n - 2}..{n - 1} of {n}"):
        stager.finish()
    assert stager.current_version == 0  # nothing was applied
    with pytest.raises(WeightError, match="no manifest received"):
        WeightStager(_shapes(sd), 0).finish()


def test_one_stager_stages_one_version(packed):
    sd, manifest, chunks = packed
    stager = WeightStager(_shapes(sd), 0)
    stager.add(types_pb2.WeightMessage(manifest=manifest))
    with pytest.raises(WeightError, match="second manifest"):
        stager.add(types_pb2.WeightMessage(manifest=manifest))
    for msg in list(iter_messages(manifest, chunks))[1:]:
        stager.add(msg)
    stager.finish()
    with pytest.raises(WeightError, match="already finished"):
        stager.add(types_pb2.WeightMessage(manifest=manifest))


def test_a_tied_lm_head_is_not_sent():
    from slipstream.weights import weights_to_sync

    sd = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    assert list(weights_to_sync(sd, tie_word_embeddings=True)) == ["model.embed_tokens.weight"]
    assert list(weights_to_sync(sd, tie_word_embeddings=False)) == list(sd)
