"""The Triton matrix-vector op (model/decode_linear.py) against a float64 reference, and the decoder's
one-token block through it against the plain path. On a GPU the kernel runs compiled; on the CPU in
Triton's interpreter (TRITON_INTERPRET, set before the kernel is first imported), same code."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ros_infmllm.model import decode_linear as op  # noqa: E402
from ros_infmllm.model import load_model  # noqa: E402
from ros_infmllm.rope import Rotary  # noqa: E402
from builders import one_token_step_inputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


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


def test_decoder_step_through_the_matvec_op_equals_the_plain_path(head16_model_dir) -> None:
    model = load_model(head16_model_dir, device=DEVICE)
    decoder = model.decoder
    decoder.fuse_projections()
    inputs = one_token_step_inputs(model.cfg.text, capacity=40, filled=29, seed=2, device=DEVICE)
    results = []
    for enabled in (False, True):
        decoder.use_decode_kernel(enabled)
        assert all(block.decode_matvec is enabled for block in decoder.layers)
        results.append(decoder.step(**inputs, attn_window=4))
    decoder.use_decode_kernel(False)
    plain, matvec = results
    assert torch.allclose(matvec.logits, plain.logits, atol=1e-4)
    assert torch.allclose(matvec.new_k, plain.new_k, atol=1e-5) and torch.allclose(matvec.new_v, plain.new_v, atol=1e-5)
    assert torch.allclose(matvec.attn_mass, plain.attn_mass, atol=1e-5)


def test_matvec_is_off_without_fused_projections(head16_model_dir) -> None:
    model = load_model(head16_model_dir, device=DEVICE)
    model.decoder.use_decode_kernel(True)
    assert not any(block.decode_matvec for block in model.decoder.layers)
    assert not op.kernel_supported(DEVICE, torch.int8)


AHEAD_OF_TIME = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from ros_infmllm.model import matvec_kernels
from ros_infmllm.model.decode_linear import TUNING, chunk_size

arch = int(sys.argv[1])
pointers = {name: "*bf16" for name in ("x_ptr", "w_ptr", "out_ptr", "norm_ptr", "bias_ptr", "residual_ptr",
                                       "cos_ptr", "sin_ptr")}
# Qwen2-1.5B: q/k/v (norm, rotary, bias), o (residual), gate/up (norm, SwiGLU), down (residual)
for rows, columns, norm, gated, half, bias, residual in [(2048, 1536, 1, 0, 64, 1, 0), (1536, 1536, 0, 0, 0, 0, 1),
                                                         (8960, 1536, 1, 1, 0, 0, 0), (1536, 8960, 0, 0, 0, 0, 1)]:
    constants = dict(N=rows, K=columns, NORM=bool(norm), GATED=bool(gated), HALF=half, ROTATED_ROWS=1792 if half else 0,
                     BIAS=bool(bias), RESIDUAL=bool(residual),
                     BLOCK_N=TUNING.gated_block_n if gated or half else TUNING.block_n,
                     BLOCK_K=chunk_size(columns, TUNING.block_k), PDL=arch >= 90)
    signature = dict(pointers, eps="fp32", **{name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(fn=matvec_kernels.matvec, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = compile(source, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": TUNING.num_warps, "launch_pdl": arch >= 90})
    ptx = compiled.asm["ptx"]
    assert ".entry matvec" in ptx and compiled.asm["cubin"], (rows, columns)
    assert "evict_first" in ptx  # the weights stream past the caches
    assert ("griddepcontrol.wait" in ptx) is (arch >= 90)  # dependent launch where the GPU has it
    print("built", rows, columns)
"""


@pytest.mark.parametrize("arch", [90, 87], ids=["hopper", "jetson-orin"])
def test_matvec_compiles_for_the_target_gpus(arch: int) -> None:
    """Ahead of time through Triton's compiler and ptxas (no GPU needed), outside the interpreter:
    the Qwen2-1.5B products build for an H100 (with dependent launch) and a Jetson Orin (without)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME, str(arch)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built") == 4
