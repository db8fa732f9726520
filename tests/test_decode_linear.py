"""The Triton matrix-vector op (model/decode_linear.py) against a float64 reference, and the decoder's
one-token block through it against the plain path. On a GPU the kernel runs compiled; on the CPU in
Triton's interpreter (TRITON_INTERPRET, set by triton_device before the kernel is first imported), same code."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import torch

from triton_device import DEVICE, DTYPES  # before the kernels: sets TRITON_INTERPRET on a CPU

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ros_infmllm.model import decode_linear as op  # noqa: E402
from ros_infmllm.model import load_model  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402
from ros_infmllm.model.quantized import QuantizedLinear, quantize_decoder  # noqa: E402
from builders import one_token_step_inputs  # noqa: E402


@pytest.fixture(autouse=True)
def _float_activations(monkeypatch):
    """These tests hold the packed products against unrounded x (``int4_activations`` and
    ``int8_activations`` "float"), exact to the weights' codes; the dp4a paths, the shipped
    default, round x and are tested in test_matvec_dp4a.py against a reference from the same
    rounded codes."""
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, int4_activations="float",
                                                          int8_activations="float"))


def _reference(x, weight, bias, norm_weight, residual, eps, gated, cos=None, sin=None, rotated_rows=0):
    h = x.double()
    if norm_weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    y = h @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if cos is not None:
        heads = y[:, :rotated_rows].view(-1, cos.shape[-1])
        y = torch.cat((Rotary.apply(heads, cos.double(), sin.double()).view(1, -1), y[:, rotated_rows:]), dim=-1)
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("norm,bias,residual", [(False, False, False), (True, True, False), (False, False, True),
                                                (True, False, True)], ids=["bare", "norm-bias", "residual", "all"])
@pytest.mark.parametrize("rows,columns", [(40, 96), (9, 1100)], ids=["one-chunk", "two-chunks-ragged"])
def test_matvec_matches_a_float64_reference(dtype, gated, norm, bias, residual, rows, columns) -> None:
    generator = torch.Generator().manual_seed(rows * columns + 7 * gated + 3 * norm)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)

    weight = draw(2 * rows if gated else rows, columns, scale=columns ** -0.5)
    x = draw(1, columns)
    args = (x, weight, draw(weight.shape[0]) if bias else None, draw(columns) if norm else None,
            draw(1, rows) if residual else None, 1e-6, gated)
    out = op.decode_linear(*args)
    want = _reference(*args)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.shape == (1, rows) and out.dtype == dtype
    assert float((out.double() - want).norm() / want.norm()) < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim,columns", [(4, 2, 16, 64), (3, 1, 32, 1100)])
def test_rotary_folded_into_qkv_matches_a_float64_reference(dtype, heads, kv_heads, dim, columns) -> None:
    """q and k heads rotated by the token's angle, v heads untouched, with the norm and bias."""
    generator = torch.Generator().manual_seed(heads * dim + columns)
    rows, rotated_rows = (heads + 2 * kv_heads) * dim, (heads + kv_heads) * dim
    cos, sin = Rotary(dim, 10000.0).cos_sin(torch.tensor([123]), torch.float32)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)

    args = (draw(1, columns), draw(rows, columns, scale=columns ** -0.5), draw(rows), draw(columns), None, 1e-6, False,
            cos.to(DEVICE, dtype), sin.to(DEVICE, dtype), rotated_rows)
    out, want = op.decode_linear(*args), _reference(*args)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.shape == (1, rows) and float((out.double() - want).norm() / want.norm()) < tolerance
    plain = op.decode_linear(*args[:7])  # the v heads are the unrotated product
    assert torch.equal(out[:, rotated_rows:], plain[:, rotated_rows:])
    assert not torch.allclose(out[:, :rotated_rows], plain[:, :rotated_rows], atol=1e-2)


def _packed(weight: torch.Tensor, packing: str) -> QuantizedLinear:
    """int8 / int4 (offsets) rounded from floats, or int4 centred on 8 from GGUF Q4_0 blocks."""
    if packing != "int4-centred":
        return QuantizedLinear.from_float(weight.float().cpu(), None, packing)
    from gguf import GGMLQuantizationType, quants

    blocks = quants.quantize(weight.float().cpu().numpy(), GGMLQuantizationType.Q4_0)
    return QuantizedLinear.from_gguf_blocks(blocks, "Q4_0", tuple(weight.shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing", ["int8", "int4", "int4-centred"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("norm,bias,residual", [(False, False, False), (True, True, True)], ids=["bare", "all"])
@pytest.mark.parametrize("rows,columns", [(40, 96), (9, 1088)], ids=["one-chunk", "two-chunks-ragged"])
def test_packed_matvec_matches_a_float64_reference(dtype, packing, gated, norm, bias, residual, rows,
                                                   columns) -> None:
    """Packed weights dequantized in registers give the product of the dequantized matrix."""
    generator = torch.Generator().manual_seed(rows * columns + 5 * gated + len(packing))

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)

    layer = _packed(draw(2 * rows if gated else rows, columns, scale=columns ** -0.5), packing).to(DEVICE)
    x = draw(1, columns)
    rest = (draw(layer.out_features) if bias else None, draw(columns) if norm else None,
            draw(1, rows) if residual else None, 1e-6, gated)
    out = op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets, bits=layer.bits)
    want = _reference(x, layer.dequantized(torch.float64), *rest)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert out.shape == (1, rows) and out.dtype == dtype
    assert float((out.double() - want).norm() / want.norm()) < tolerance


@pytest.mark.parametrize("packing", ["int8", "int4"])
def test_packed_rotary_qkv_matches_a_float64_reference(packing) -> None:
    generator = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, columns = 3, 1, 32, 1088
    rows, rotated_rows = (heads + 2 * kv_heads) * dim, (heads + kv_heads) * dim
    cos, sin = Rotary(dim, 10000.0).cos_sin(torch.tensor([77]), torch.float32)
    layer = _packed(torch.randn(rows, columns, generator=generator) * columns ** -0.5, packing).to(DEVICE)
    x, bias, norm = (torch.randn(*shape, generator=generator).to(DEVICE) for shape in ((1, columns), (rows,), (columns,)))
    rest = (bias, norm, None, 1e-6, False, cos.to(DEVICE), sin.to(DEVICE), rotated_rows)
    out = op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets, bits=layer.bits)
    want = _reference(x, layer.dequantized(torch.float64), *rest)
    assert float((out.double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize("packing", ["int8", "int4", "int4-centred"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
def test_two_packed_chunks_requested_ahead_give_the_same_product(monkeypatch, packing, gated) -> None:
    """``packed_ahead`` 2 (two chunks in flight) over five chunks, the last ragged: the same
    product of the dequantized matrix as one chunk ahead."""
    generator = torch.Generator().manual_seed(3 + gated)
    rows, columns = 24, 1088
    layer = _packed(torch.randn(2 * rows if gated else rows, columns, generator=generator) * columns ** -0.5,
                    packing).to(DEVICE)
    x, norm, res = (torch.randn(*shape, generator=generator).to(DEVICE) for shape in ((1, columns), (columns,), (1, rows)))
    rest = (None, norm, res, 1e-6, gated)
    want = _reference(x, layer.dequantized(torch.float64), *rest)
    outs = []
    for ahead in (1, 2):
        monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, packed_ahead=ahead, int8_block_k=256,
                                                                    int4_block_k=256))
        outs.append(op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets,
                                     bits=layer.bits))
        assert float((outs[-1].double() - want).norm() / want.norm()) < 1e-6
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, packed_ahead=3))
    with pytest.raises(ValueError, match="packed_ahead"):
        op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets, bits=layer.bits)
    if layer.bits == 4:  # a misspelt activation path is refused, not taken as float
        monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, packed_ahead=1, int4_activations="int4"))
        with pytest.raises(ValueError, match="int4_activations"):
            op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets, bits=layer.bits)


@pytest.mark.parametrize("packing,x8", [("float", False), ("int8", False), ("int4", False), ("int8", True),
                                        ("int4", True), ("int4-centred", True)])
@pytest.mark.parametrize("case", ["swiglu", "rotary"])
def test_epilogue_inputs_requested_early_give_the_same_product(monkeypatch, packing, x8, case) -> None:
    """``early_epilogue`` changes when the bias, residual and rotary angles are requested (before or
    right after the wait), not what is computed: the same output bit for bit as loading them after
    the products, one and two chunks ahead, over five chunks."""
    generator = torch.Generator().manual_seed(19 + len(packing) + x8)
    dim, columns = 32, 1088
    rows = 4 * dim if case == "rotary" else 24
    weight = torch.randn(2 * rows if case == "swiglu" else rows, columns, generator=generator) * columns ** -0.5
    layer = None if packing == "float" else _packed(weight, packing).to(DEVICE)
    x, norm, bias = (torch.randn(*shape, generator=generator).to(DEVICE)
                     for shape in ((1, columns), (columns,), (weight.shape[0],)))
    if case == "rotary":
        cos, sin = (t.to(DEVICE) for t in Rotary(dim, 10000.0).cos_sin(torch.tensor([41]), torch.float32))
        rest = (bias, norm, None, 1e-6, False, cos, sin, 3 * dim)
    else:
        rest = (bias, norm, torch.randn(1, rows, generator=generator).to(DEVICE), 1e-6, True)
    packed = {} if layer is None else {"scales": layer.scales, "offsets": layer.offsets, "bits": layer.bits}
    activations = "int8" if x8 else "float"
    outs = {}
    for early in (False, True):
        for ahead in (1, 2):
            monkeypatch.setattr(op, "TUNING", dataclasses.replace(
                op.TUNING, early_epilogue=early, packed_ahead=ahead, int8_block_k=256, int4_block_k=256,
                block_k=256, int4_activations=activations, int8_activations=activations))
            outs[early, ahead] = op.decode_linear(x, weight.to(DEVICE) if layer is None else layer.qweight, *rest,
                                                  **packed)
    for ahead in (1, 2):
        assert torch.equal(outs[True, ahead], outs[False, ahead]), ahead
    want = _reference(x, weight.to(DEVICE).double() if layer is None else layer.dequantized(torch.float64), *rest)
    assert float((outs[True, 1].double() - want).norm() / want.norm()) < (2e-2 if x8 else 1e-6)


def test_packed_arguments_are_checked() -> None:
    x, codes = torch.zeros(1, 64, device=DEVICE), torch.zeros(4, 32, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="packed weights"):
        op.decode_linear(x, codes, None, None, None, 1e-6, False, bits=4)
    with pytest.raises(ValueError, match="packed weights"):
        op.decode_linear(x, codes, None, None, None, 1e-6, False, scales=torch.ones(4, 2, dtype=torch.float16,
                                                                                  device=DEVICE), bits=3)


def test_the_norm_is_folded_in_not_skipped() -> None:
    """A norm weight and a scaled input change the result exactly as RMSNorm says (scale-free input)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, generator=generator).to(DEVICE)
    weight = torch.randn(8, 64, generator=generator).to(DEVICE)
    norm = torch.full((64,), 2.0, device=DEVICE)
    plain = op.decode_linear(x, weight, None, None, None, 0.0, False)
    normed = op.decode_linear(x, weight, None, norm, None, 0.0, False)
    scaled = op.decode_linear(10 * x, weight, None, norm, None, 0.0, False)
    rms = x.pow(2).mean().sqrt()
    assert torch.allclose(normed, 2 * plain / rms, rtol=1e-5)
    assert torch.allclose(scaled, normed, rtol=1e-5)


def as_q4_k_m(decoder) -> None:
    """v and down as int8 in groups of 16 beside int4 q/k/o/gate/up: the packing a Q4_K_M GGUF's
    Q6_K tensors get (read directly, QuantizedLinear._from_q6_k), so q/k/v fuse in two runs."""
    for block in decoder.layers:
        for parent, name in ((block.self_attn, "v_proj"), (block.mlp, "down_proj")):
            layer = getattr(parent, name)
            setattr(parent, name, QuantizedLinear.from_float(layer.dequantized(), layer.bias, "int8", group=16))


@pytest.mark.parametrize("weights,head", [("float", None), ("int8", None), ("int4", None), ("int4", "int8"),
                                          ("int8", "int4"), ("q4_k_m", None)])
def test_decoder_step_through_the_matvec_op_equals_the_plain_path(head16_model_dir, weights, head) -> None:
    """The one-token block through the op against the plain path; packed projections (int8, int4)
    fused as q/k/v and gate/up, and a packed LM head, read by the op against QuantizedLinear's
    dequantize-and-multiply; a Q4_K_M mix (``as_q4_k_m``): q and k one matrix, v another, only
    q and k rotated."""
    model = load_model(head16_model_dir, device=DEVICE, weights="int4" if weights == "q4_k_m" else weights)
    decoder = model.decoder
    if weights == "q4_k_m":
        as_q4_k_m(decoder)
    if head is not None:
        assert quantize_decoder(decoder, head, head=head) == 1  # the projections are packed already
    inputs = one_token_step_inputs(model.cfg.text, capacity=40, filled=29, seed=2, device=DEVICE)
    unfused = decoder.step(**inputs, attn_window=4)
    decoder.fuse_projections()
    results = []
    for enabled in (False, True):
        decoder.use_decode_kernel(enabled)
        assert all(block.decode_matvec is enabled for block in decoder.layers)
        results.append(decoder.step(**inputs, attn_window=4))
    decoder.use_decode_kernel(False)
    plain, matvec = results
    assert torch.allclose(plain.logits, unfused.logits, atol=1e-5)  # fusing moved no weight, scale or bias
    assert torch.allclose(matvec.logits, plain.logits, atol=1e-4)
    assert torch.allclose(matvec.new_k, plain.new_k, atol=1e-5) and torch.allclose(matvec.new_v, plain.new_v, atol=1e-5)
    assert torch.allclose(matvec.attn_mass, plain.attn_mass, atol=1e-5)
    # a prefill chunk's last-token logits also go through the op (the LM head's product)
    chunk = dict(inputs, embeds=torch.randn(5, model.cfg.text.hidden_size, generator=torch.Generator().manual_seed(3))
                 .to(DEVICE), positions=torch.arange(29, 34, device=DEVICE))
    prefill = []
    for enabled in (False, True):
        decoder.use_decode_kernel(enabled)
        prefill.append(decoder.step(**chunk, attn_window=2).logits)
    decoder.use_decode_kernel(False)
    assert prefill[0].shape == prefill[1].shape == (1, model.cfg.text.vocab_size)
    assert torch.allclose(prefill[1], prefill[0], atol=1e-4)
    attn = decoder.layers[0].self_attn
    if weights == "q4_k_m":
        assert [part.sizes for part in attn.qkv.parts] == [attn.qkv.sizes[:2], attn.qkv.sizes[2:]]
        assert attn.v_proj.qweight.data_ptr() == attn.qkv1_qweight.data_ptr()
    elif weights != "float":  # each layer's buffers are views into the fused ones
        assert attn.q_proj.qweight.data_ptr() == attn.qkv_qweight.data_ptr()


def test_matvec_is_off_without_fused_projections(head16_model_dir) -> None:
    model = load_model(head16_model_dir, device=DEVICE)
    model.decoder.use_decode_kernel(True)
    assert not any(block.decode_matvec for block in model.decoder.layers)
    assert not op.kernel_supported(DEVICE, torch.int8)


AHEAD_OF_TIME = """
import sys
from ros_infmllm.model import matvec_kernels
from ros_infmllm.model.ahead_of_time import compile_for
from ros_infmllm.model.decode_linear import TUNING, chunk_size

arch = int(sys.argv[1])
pointers = {name: "*bf16" for name in ("x_ptr", "w_ptr", "out_ptr", "norm_ptr", "bias_ptr", "residual_ptr",
                                       "cos_ptr", "sin_ptr", "scale_ptr", "offset_ptr", "stats_ptr", "codes_out_ptr",
                                       "stats_out_ptr", "norm_out_ptr", "arrivals_ptr")}
# float, int8 and int4 weights (fp16 scales and offsets); -4: int4 against x's int8 codes (X8, dp4a)
WEIGHTS = {0: "*bf16", 8: "*i8", 4: "*u8", -4: "*i32"}
# Qwen2-1.5B: q/k/v (norm, rotary, bias), o (residual), gate/up (norm, SwiGLU), down (residual)
for (rows, columns, norm, gated, half, bias, residual), kind in [
        (shape, kind) for kind in WEIGHTS for shape in [(2048, 1536, 1, 0, 64, 1, 0), (1536, 1536, 0, 0, 0, 0, 1),
                                                        (8960, 1536, 1, 1, 0, 0, 0), (1536, 8960, 0, 0, 0, 0, 1)]]:
    bits = abs(kind)
    constants = dict(N=rows, K=columns, NORM=bool(norm), GATED=bool(gated), HALF=half, ROTATED_ROWS=1792 if half else 0,
                     BIAS=bool(bias), RESIDUAL=bool(residual),
                     BLOCK_N=(max(1, getattr(TUNING, TUNING.rows_field(bits, kind < 0)) // (2 if gated or half else 1))
                              if bits else TUNING.gated_block_n if gated or half else TUNING.block_n),
                     BLOCK_K=chunk_size(columns, TUNING.chunk(bits)), PDL=arch >= 90,
                     BITS=bits, GROUP=32 if bits else 1, OFFSET=bits == 4, X8=kind < 0,
                     AHEAD=TUNING.packed_ahead if bits else 1, EARLY_EPILOGUE=TUNING.early_epilogue)
    typed = dict(pointers, w_ptr=WEIGHTS[kind], **({"scale_ptr": "*fp16", "offset_ptr": "*fp16"} if bits else {}),
                 **({"x_ptr": "*i32", "stats_ptr": "*fp32"} if kind < 0 else {}))
    compiled = compile_for(matvec_kernels.matvec, arch, dict(typed, eps="fp32"), constants,
                           num_warps=TUNING.warps(bits), launch_pdl=arch >= 90)
    ptx = compiled.asm["ptx"]
    assert ".entry matvec" in ptx and compiled.asm["cubin"], (rows, columns)
    assert "evict_first" in ptx  # the weights stream past the caches
    assert ("griddepcontrol.wait" in ptx) is (arch >= 90)  # dependent launch where the GPU has it
    assert ("dp4a" in ptx) is (kind < 0)
    print("built", rows, columns)
"""


@pytest.mark.parametrize("arch", [90, 87], ids=["hopper", "jetson-orin"])
def test_matvec_compiles_for_the_target_gpus(arch: int) -> None:
    """Ahead of time through Triton's compiler and ptxas (no GPU needed), outside the interpreter:
    the Qwen2-1.5B products, with float, int8 and int4 weights (and int4 against int8 activations,
    through dp4a) at the shipped rows per program, build for an H100 (with dependent launch) and a
    Jetson Orin (without)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME, str(arch)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built") == 16
