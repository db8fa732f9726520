"""The int4 x int8 and int8 x int8 ``dp4a`` paths of the decode op (model/matvec_dp4a.py, ``X8`` in
matvec_kernels.py, on with ``MatvecTuning.int4_activations`` / ``int8_activations`` "int8"): the
same integer sums as a float64 reference from the same activation codes, with the op's fusions, and
close to the float product (its ahead-of-time build is in test_decode_linear.py). On a GPU it runs
compiled with the real instruction; on the CPU in Triton's interpreter, where ``dp4a`` is summed
byte by byte."""
from __future__ import annotations

import dataclasses

import torch

from triton_device import DEVICE  # before the kernels: sets TRITON_INTERPRET on a CPU

import pytest  # noqa: E402
from test_decode_linear import _reference  # noqa: E402

from ros_infmllm.model import decode_linear as op  # noqa: E402
from ros_infmllm.model import matvec_dp4a  # noqa: E402
from ros_infmllm.model.quantized import QuantizedLinear  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402


# the weights of each case (bits, offsets, group): int4 with offsets (Q4_1 style), int4 centred on 8
# (Q4_0), int8 (Q8_0), int8 in groups of 16 (Q6_K read directly: x rounded per 16 inputs too)
WEIGHTS = {"q4_1-offsets": (4, True, 32), "q4_0-centred": (4, False, 32), "q8_0": (8, False, 32),
           "q6_k-int8-g16": (8, False, 16)}


def _packed(rows: int, columns: int, offsets: bool, seed: int = 0, bits: int = 4, group: int = 32) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    layer = QuantizedLinear.from_float(weight, None, "int4" if bits == 4 else "int8", group=group)
    if bits == 4 and not offsets:  # GGUF Q4_0 style: codes centred on 8, no offsets
        layer = QuantizedLinear(layer.qweight, layer.scales, None, 4, columns, None)
    return layer.to(DEVICE)


def _int8_activations(monkeypatch, **fields) -> None:
    """The decode op's packed products against x's int8 codes (``MatvecTuning.int4_activations``
    and ``int8_activations``)."""
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, int4_activations="int8",
                                                          int8_activations="int8", **fields))


@pytest.mark.parametrize("ahead", [1, 2], ids=["one-ahead", "two-ahead"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("rows, columns, residual", [(64, 256, False), (37, 1024, True), (16, 2048, False)])
def test_dp4a_products_give_the_integer_sums_of_the_activation_codes(monkeypatch, ahead, weights, rows, columns,
                                                                     residual) -> None:
    _int8_activations(monkeypatch, int4_block_k=256, int8_block_k=256, packed_ahead=ahead)  # several chunks per row
    bits, offsets, group = WEIGHTS[weights]
    layer = _packed(rows, columns, offsets, bits=bits, group=group)
    x = torch.randn(1, columns, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    res = torch.randn(1, rows).to(DEVICE) if residual else None
    got = op.decode_linear(x, layer.qweight, None, None, res, 1e-6, False, scales=layer.scales, offsets=layer.offsets,
                           bits=bits)
    want = _rounded_reference(x.cpu(), layer.dequantized(torch.float64).cpu(), None, None,
                              None if res is None else res.cpu(), 1e-6, False, group=group)
    assert got.shape == (1, rows) and got.dtype == x.dtype
    assert torch.allclose(got.double().cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _rounded_reference(x, weight, bias, norm_weight, residual, eps, gated, cos=None, sin=None, rotated_rows=0,
                       group=32):
    """The op's product in float64 from x's int8 codes: rounding per group commutes with the RMS
    (one scale for all of x), so the codes of ``x * w`` give those of ``norm(x) * w`` times 1/rms."""
    h = x.double()
    if norm_weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    return _reference(matvec_dp4a.rounded_activations(h, group), weight, bias, None, residual, eps, gated, cos, sin,
                      rotated_rows)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("norm,bias,residual", [(False, False, False), (True, True, True)], ids=["bare", "all"])
@pytest.mark.parametrize("rows,columns", [(40, 96), (9, 1088)], ids=["one-chunk", "two-chunks-ragged"])
def test_the_decode_op_with_int8_activations_folds_in_what_the_float_path_does(monkeypatch, weights, gated, norm,
                                                                                bias, residual, rows, columns) -> None:
    """``int4_activations`` / ``int8_activations`` "int8": the op's fusions (norm, bias, SwiGLU,
    residual) around the dp4a products, against a float64 reference from the same codes."""
    _int8_activations(monkeypatch)
    bits, offsets, group = WEIGHTS[weights]
    generator = torch.Generator().manual_seed(rows + columns + 3 * gated + offsets)
    layer = _packed(2 * rows if gated else rows, columns, offsets, seed=rows, bits=bits, group=group)
    x = torch.randn(1, columns, generator=generator).to(DEVICE)
    rest = (torch.randn(layer.out_features, generator=generator).to(DEVICE) if bias else None,
            (torch.rand(columns, generator=generator) + 0.5).to(DEVICE) if norm else None,
            torch.randn(1, rows, generator=generator).to(DEVICE) if residual else None, 1e-6, gated)
    out = op.decode_linear(x, layer.qweight, *rest, scales=layer.scales, offsets=layer.offsets, bits=bits)
    want = _rounded_reference(x.cpu(), layer.dequantized(torch.float64).cpu(), *(
        None if t is None else t.cpu() if isinstance(t, torch.Tensor) else t for t in rest), group=group)
    assert out.shape == (1, rows)
    assert float((out.double().cpu() - want).norm() / want.norm()) < 1e-5  # x's rounding alone is ~5e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_the_decode_op_with_int8_activations_rotates_q_and_k(monkeypatch, bits) -> None:
    _int8_activations(monkeypatch)
    generator = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, columns = 3, 1, 32, 1088
    rows, rotated_rows = (heads + 2 * kv_heads) * dim, (heads + kv_heads) * dim
    cos, sin = Rotary(dim, 10000.0).cos_sin(torch.tensor([77]), torch.float32)
    layer = _packed(rows, columns, True, seed=4, bits=bits)
    x, bias, norm = (torch.randn(*shape, generator=generator) for shape in ((1, columns), (rows,), (columns,)))
    rest = (bias, norm, None, 1e-6, False, cos, sin, rotated_rows)
    out = op.decode_linear(x.to(DEVICE), layer.qweight, *(t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                                                          for t in rest), scales=layer.scales, offsets=layer.offsets,
                           bits=bits)
    want = _rounded_reference(x, layer.dequantized(torch.float64).cpu(), *rest)
    assert float((out.double().cpu() - want).norm() / want.norm()) < 1e-5  # x's rounding alone is ~5e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_activations_stay_close_to_the_float_product(monkeypatch, bits) -> None:
    """x rounded to int8 per group of 32: about 0.4% of the output's scale (llama.cpp's Q8_1 does the same)."""
    _int8_activations(monkeypatch)
    layer = _packed(128, 2048, True, seed=2, bits=bits)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = op.decode_linear(x, layer.qweight, None, None, None, 1e-6, False, scales=layer.scales,
                           offsets=layer.offsets, bits=bits).double().cpu()
    exact = x.double().cpu() @ layer.dequantized(torch.float64).cpu().T
    error = (got - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.01, error  # not zero: the activations really are rounded


def test_activation_codes_are_split_into_even_and_odd_elements_with_their_group_scales() -> None:
    x = torch.arange(64, dtype=torch.float32).to(DEVICE) - 20.0
    codes, stats = matvec_dp4a.quantized_activations(x, 32)
    codes, stats = codes.view(torch.int8).cpu(), stats.cpu()
    even, odd, dx, sums = codes[:32], codes[32:], stats[:2], stats[2:4]
    assert torch.allclose(dx, torch.tensor([20.0 / 127, 43.0 / 127]))
    assert even[0] == -127 and odd[-1] == 127  # -20 is group 0's largest magnitude, 43 group 1's
    decoded = torch.stack((even, odd), dim=1).reshape(-1).float() * dx.repeat_interleave(32)
    assert (decoded - x.cpu()).abs().max() <= dx.max().item() / 2 + 1e-6
    assert torch.allclose(sums, decoded.reshape(2, 32).sum(dim=1), atol=1e-4)
    assert torch.allclose(stats[4:], (x.cpu() ** 2).reshape(2, 32).sum(dim=1))  # the norm's sums of squares, of raw x


def test_activation_codes_for_int8_weights_stay_in_order() -> None:
    x = torch.randn(96, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    split, split_stats = matvec_dp4a.quantized_activations(x, 32)
    codes, stats = matvec_dp4a.quantized_activations(x, 32, split=False)
    codes, split = codes.view(torch.int8).cpu(), split.view(torch.int8).cpu()
    assert torch.equal(stats, split_stats)
    assert torch.equal(codes[0::2], split[:48]) and torch.equal(codes[1::2], split[48:])
    decoded = codes.float() * stats[:3].repeat_interleave(32).cpu()
    assert (decoded - x.cpu()).abs().max() <= stats[:3].max().item() / 2 + 1e-6


def test_int8_weights_in_groups_wider_than_x8_max_group_keep_float_x(monkeypatch) -> None:
    """Per-channel int8 (one group per row): x rounded with one scale for the whole row would be
    too coarse, so the op takes the float path and its product is exact to the codes."""
    _int8_activations(monkeypatch)
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(6)) * 0.05
    layer = QuantizedLinear.from_float(weight, None, "int8", group=0).to(DEVICE)
    assert layer.group == 256 > op.X8_MAX_GROUP and not op.TUNING.x8(8, layer.group) and op.TUNING.x8(8, 32)
    assert not op.TUNING.x8(8, 12)  # x's code words need groups of a multiple of 8 inputs
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = op.decode_linear(x, layer.qweight, None, None, None, 1e-6, False, scales=layer.scales, bits=8)
    exact = x.double().cpu() @ layer.dequantized(torch.float64).cpu().T
    assert float((got.double().cpu() - exact).norm() / exact.norm()) < 1e-5


def test_a_misspelt_int8_activations_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, int8_activations="int4"))
    layer = _packed(8, 64, False, bits=8)
    with pytest.raises(ValueError, match="int8_activations"):
        op.decode_linear(torch.randn(1, 64).to(DEVICE), layer.qweight, None, None, None, 1e-6, False,
                         scales=layer.scales, bits=8)


def test_a_folded_norm_weight_scales_the_codes_not_the_sum_of_squares() -> None:
    x, weight = torch.randn(64).to(DEVICE), torch.rand(64).to(DEVICE) + 0.5
    _, plain = matvec_dp4a.quantized_activations(x * weight, 32)
    _, folded = matvec_dp4a.quantized_activations(x, 32, weight)
    assert torch.allclose(plain[:4], folded[:4], rtol=1e-5)  # scales and sums of x * weight
    assert torch.allclose(folded[4:], (x ** 2).reshape(2, 32).sum(dim=1))  # of raw x, per group
    assert not torch.allclose(plain[4:], folded[4:])


@pytest.mark.parametrize("split", [True, False], ids=["int4-halves", "int8-order"])
def test_the_rounding_launch_spread_over_programs_writes_what_one_program_does(split) -> None:
    """Each program rounds a few groups (``groups_per_program``), the last program's block running
    past x's 13 groups: the same codes and stats as one program over all of x, with and without
    a folded norm."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(13 * 32, generator=generator).to(DEVICE)
    weight = (torch.rand(13 * 32, generator=generator) + 0.5).to(DEVICE)
    for norm in (None, weight):
        whole_codes, whole_stats = matvec_dp4a.quantized_activations(x, 32, norm, split=split)
        assert whole_stats.numel() == 3 * 13
        for per_program in (1, 4, 16):
            codes, stats = matvec_dp4a.quantized_activations(x, 32, norm, split=split, groups_per_program=per_program)
            assert torch.equal(codes, whole_codes)
            assert torch.equal(stats[:26], whole_stats[:26])  # scales and sums: the same arithmetic per group
            assert torch.allclose(stats[26:], whole_stats[26:], rtol=1e-6)  # sums of squares, summed in any order
    with pytest.raises(ValueError, match="power of two"):
        matvec_dp4a.quantized_activations(x, 32, groups_per_program=3)


@pytest.mark.parametrize("per_program", [0, 2, 8])
def test_the_op_with_the_rounding_spread_over_programs_gives_the_same_product(monkeypatch, per_program) -> None:
    """``MatvecTuning.x8_round_groups`` changes how the launch is cut, not the codes: the product
    with a folded norm (summing the groups' squares) equals the one-program launch's; a value that
    is not a power of two is refused."""
    _int8_activations(monkeypatch, x8_round_groups=0)  # the baseline: one program over all of x
    layer = _packed(24, 1088, False, seed=9)
    packing = dict(scales=layer.scales, offsets=layer.offsets, bits=4)
    x = torch.randn(1, 1088, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    norm = (torch.rand(1088, generator=torch.Generator().manual_seed(12)) + 0.5).to(DEVICE)
    one_program = op.decode_linear(x, layer.qweight, None, norm, None, 1e-6, False, **packing)
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, x8_round_groups=per_program))
    spread = op.decode_linear(x, layer.qweight, None, norm, None, 1e-6, False, **packing)
    assert torch.allclose(spread, one_program, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, x8_round_groups=6))
    with pytest.raises(ValueError, match="x8_round_groups"):
        op.decode_linear(x, layer.qweight, None, norm, None, 1e-6, False, **packing)


def test_inputs_that_do_not_split_into_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 32"):
        matvec_dp4a.quantized_activations(torch.zeros(100, device=DEVICE), 32)


@pytest.mark.parametrize("weights", ["q4_0-centred", "q8_0"])
def test_x_codes_from_the_writer_give_the_product_of_the_rounding_launch(monkeypatch, weights) -> None:
    """x's codes and stats handed in (as ``decode_attention_codes`` writes them for o_proj) give the
    product the op's own rounding launch gives, with a norm's weight folded into them too; they are
    refused where the product reads float x, and without their stats."""
    _int8_activations(monkeypatch)
    bits, offsets, group = WEIGHTS[weights]
    layer = _packed(24, 256, offsets, seed=5, bits=bits, group=group)
    packing = dict(scales=layer.scales, offsets=layer.offsets, bits=bits)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    residual = torch.randn(1, 24, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    codes, stats = matvec_dp4a.quantized_activations(x, group, split=bits == 4)
    rounded_here = op.decode_linear(x, layer.qweight, None, None, residual, 0.0, False, **packing)
    handed_in = op.decode_linear(x, layer.qweight, None, None, residual, 0.0, False, **packing,
                                 x_codes=codes.view(torch.int8), x_stats=stats)
    assert torch.equal(handed_in, rounded_here)
    with pytest.raises(ValueError, match="x_codes and x_stats come together"):
        op.decode_linear(x, layer.qweight, None, None, None, 0.0, False, **packing, x_codes=codes.view(torch.int8))
    norm = (torch.rand(256, generator=torch.Generator().manual_seed(8)) + 0.5).to(DEVICE)
    codes, stats = matvec_dp4a.quantized_activations(x, group, norm, split=bits == 4)  # the norm's weight folded in
    assert torch.equal(op.decode_linear(x, layer.qweight, None, norm, residual, 1e-6, False, **packing,
                                        x_codes=codes.view(torch.int8), x_stats=stats),
                       op.decode_linear(x, layer.qweight, None, norm, residual, 1e-6, False, **packing))
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, int4_activations="float",
                                                          int8_activations="float"))
    with pytest.raises(ValueError, match="reads x's int8 codes"):
        op.decode_linear(x, layer.qweight, None, None, None, 0.0, False, **packing, x_codes=codes.view(torch.int8),
                         x_stats=stats)


def _steps_off_and_on(monkeypatch, decoder, inputs: dict, field: str) -> list[tuple]:
    """The decoder's one-token step with the ``MatvecTuning`` switch ``field`` off, then on, each
    with the number of rounding launches it made (``quantized_activations`` calls)."""
    rounding = matvec_dp4a.quantized_activations
    launches = []

    def counted(*args, **kwargs):
        launches.append(args[0].numel())
        return rounding(*args, **kwargs)

    monkeypatch.setattr(matvec_dp4a, "quantized_activations", counted)
    steps = []
    for on in (False, True):
        monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, **{field: on}))
        launches.clear()
        steps.append((decoder.step(**inputs, attn_window=4), len(launches)))
    return steps


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_the_decode_step_takes_o_projs_codes_from_the_attention(monkeypatch, head16_model_dir, mode) -> None:
    """With o_proj packed in groups that divide a head (16 here), the decode step's attention launch
    rounds its output for o_proj (``MatvecTuning.fused_x_codes``): one rounding launch fewer per
    layer, and the same logits, keys, values and mass as with the launch, since the codes are the same."""
    from ros_infmllm.model import load_model
    from builders import one_token_step_inputs

    _int8_activations(monkeypatch, round_written=False)
    model = load_model(head16_model_dir, device=DEVICE, weights="int4")
    decoder = model.decoder
    for block in decoder.layers:
        o_proj = block.self_attn.o_proj
        block.self_attn.o_proj = QuantizedLinear.from_float(o_proj.dequantized(), o_proj.bias, mode, group=16)
    decoder.fuse_projections()
    decoder.use_decode_kernel(True)
    inputs = one_token_step_inputs(model.cfg.text, capacity=40, filled=29, seed=2, device=DEVICE)
    (apart, apart_launches), (fused, fused_launches) = _steps_off_and_on(monkeypatch, decoder, inputs, "fused_x_codes")
    layers = model.cfg.text.num_layers
    assert apart_launches == 4 * layers and fused_launches == 3 * layers  # the LM head is float here
    assert torch.equal(fused.logits, apart.logits)
    assert torch.equal(fused.new_k, apart.new_k) and torch.equal(fused.new_v, apart.new_v)
    assert torch.equal(fused.attn_mass, apart.attn_mass)


def _rounded_by(x: torch.Tensor, group: int, norm: torch.Tensor | None, split: bool):
    """What the rounding launch makes of ``x``: its codes as bytes, and its stats."""
    codes, stats = matvec_dp4a.quantized_activations(x, group, norm, split=split)
    return codes.view(torch.int8), stats


def _same_rounding(got: tuple, want: tuple, group: int) -> None:
    """Codes, scales and sums of a group as the rounding launch's; the sums of squares to their
    float sum's order (a group's 32 squares may be added in another order)."""
    (codes, stats), (want_codes, want_stats) = got, want
    groups = want_stats.numel() // 3
    assert torch.equal(codes, want_codes)
    assert torch.equal(stats[:2 * groups], want_stats[:2 * groups])
    torch.testing.assert_close(stats[2 * groups:], want_stats[2 * groups:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("weights", ["float", "q4_1-offsets", "q8_0"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("next_norm, split", [(False, True), (True, True), (True, False)],
                         ids=["int4-next", "int4-next-norm", "int8-next-norm"])
@pytest.mark.parametrize("group, rows_per_program", [(32, 8), (16, 2), (32, 32)], ids=["4-programs", "8", "one"])
def test_a_product_rounds_its_output_as_the_rounding_launch_does(monkeypatch, weights, gated, next_norm, split,
                                                                 group, rows_per_program) -> None:
    """``decode_linear_codes`` (``MatvecTuning.round_written``): the product's output, and its codes
    and stats for the next product, written by the last of the programs that write each group, are
    those the rounding launch makes of that output (the next norm's weight folded in or not, either
    layout); a group's arrival counter is 0 again after the call, so a second call gives the same."""
    _int8_activations(monkeypatch, x8_block_n=rows_per_program, int8_block_n=rows_per_program,
                      int4_block_n=rows_per_program, block_n=rows_per_program,
                      gated_block_n=rows_per_program)  # packed SwiGLU programs take half: 1 to 16 per group
    generator = torch.Generator().manual_seed(group + rows_per_program + gated)
    rows, columns = 96, 256
    if weights == "float":
        weight, packing = (torch.randn(2 * rows if gated else rows, columns, generator=generator) * 0.05).to(DEVICE), {}
    else:
        bits, offsets, weight_group = WEIGHTS[weights]
        layer = _packed(2 * rows if gated else rows, columns, offsets, seed=group, bits=bits, group=weight_group)
        weight, packing = layer.qweight, dict(scales=layer.scales, offsets=layer.offsets, bits=bits)
    x = torch.randn(1, columns, generator=generator).to(DEVICE)
    residual = None if gated else torch.randn(1, rows, generator=generator).to(DEVICE)
    norm = (torch.rand(rows, generator=generator) + 0.5).to(DEVICE) if next_norm else None
    plain = op.decode_linear(x, weight, None, None, residual, 0.0, gated, **packing)
    for _ in range(2):
        out, codes, stats = op.decode_linear_codes(x, weight, None, None, residual, 0.0, gated, group, split, norm,
                                                   **packing)
        assert torch.equal(out, plain)
        _same_rounding((codes, stats), _rounded_by(out.view(-1), group, norm, split), group)
    key = next(k for k in op._ARRIVALS if k[1] == weight.data_ptr() and k[2] == rows // group)
    assert not op._ARRIVALS[key].any()


def test_a_product_refuses_groups_its_programs_do_not_write_whole(monkeypatch) -> None:
    _int8_activations(monkeypatch, x8_block_n=8)
    layer = _packed(96, 256, True, seed=1)
    packing = dict(scales=layer.scales, offsets=layer.offsets, bits=4)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for group in (4, 12, 64):  # under the 8 rows of a program, not a multiple of them, not dividing 96
        with pytest.raises(ValueError, match=f"round_group {group}"):
            op.decode_linear_codes(x, layer.qweight, None, None, None, 0.0, False, group, True, **packing)


@pytest.mark.parametrize("mode,head", [("int4", "float"), ("int8", "float"), ("int4", "int8"), ("int4", "int4")])
def test_the_decode_step_takes_the_mlps_codes_from_the_products_before(monkeypatch, head16_model_dir, mode,
                                                                      head) -> None:
    """With ``MatvecTuning.round_written`` o_proj rounds its output for gate/up (the post-attention
    norm's weight folded in), gate/up for down, and down for the next block's q/k/v (its input
    norm's weight folded in) or, in the last block, for a packed LM head (the final norm folded
    in): three rounding launches fewer per layer, but the first block's q/k/v still rounds the
    embedding, and a float head rounds nothing; the same logits, keys, values and mass (the codes
    are the same; on a GPU the sums of squares may be added in another order, so there to
    rounding)."""
    from ros_infmllm.model import load_model
    from builders import one_token_step_inputs

    _int8_activations(monkeypatch)
    model = load_model(head16_model_dir, device=DEVICE, weights=mode, lm_head_weights=head)
    decoder = model.decoder
    decoder.fuse_projections()
    decoder.use_decode_kernel(True)
    inputs = one_token_step_inputs(model.cfg.text, capacity=40, filled=29, seed=3, device=DEVICE)
    (apart, apart_launches), (fused, fused_launches) = _steps_off_and_on(monkeypatch, decoder, inputs, "round_written")
    layers = model.cfg.text.num_layers
    assert apart_launches - fused_launches == 3 * layers - (head == "float")
    # left: the first block's q/k/v, and each o_proj's (its groups of 32 span two of this model's 16-wide
    # heads, so the attention's launch does not round them); none for the head
    assert fused_launches == 1 + layers
    same = torch.equal if DEVICE.type == "cpu" else lambda a, b: torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert same(fused.logits, apart.logits)
    assert same(fused.new_k, apart.new_k) and same(fused.new_v, apart.new_v)
    assert same(fused.attn_mass, apart.attn_mass)
    # traced as the backend compiles a block (fake tensors through the ops' registered shapes)
    from ros_infmllm.model.decoder import run_block

    torch._dynamo.reset()
    compiled = decoder.step(**inputs, attn_window=4, block_fn=torch.compile(run_block, backend="aot_eager",
                                                                            dynamic=False))
    assert same(compiled.logits, fused.logits)
