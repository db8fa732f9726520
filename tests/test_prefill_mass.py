"""The Triton prefill-mass op (model/prefill_mass.py) against a float64 softmax, and the decoder's
fused path with it against the explicit path. On a GPU the kernel runs compiled; on the CPU in
Triton's interpreter (TRITON_INTERPRET, set by triton_device before the kernels are first imported)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import torch

from triton_device import DEVICE, DTYPES  # before the kernels: sets TRITON_INTERPRET on a CPU

import pytest  # noqa: E402

from ros_infmllm.model import prefill_mass as op  # noqa: E402



@pytest.fixture
def small_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks small enough that the test sizes span several row blocks, key splits and loop steps."""
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, block_m=16, block_n=16, programs=64,
                                                          min_split=32, mass_block_n=16, mass_programs=64))


def _inputs(kv_heads: int, group: int, chunk: int, cached: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Grouped queries, keys (cache then chunk) and a prefill mask: some cache slots empty, the
    chunk causal."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(kv_heads, group * chunk, dim, generator=generator)
    keys = torch.randn(kv_heads, cached + chunk, dim, generator=generator)
    valid = torch.rand(cached, generator=generator) > 0.3
    causal = torch.ones(chunk, chunk).tril().bool()
    mask = torch.cat((valid.expand(chunk, cached), causal), dim=1)
    return q.to(DEVICE, dtype), keys.to(DEVICE, dtype), mask.to(DEVICE)


def _reference(q, keys, mask, group: int) -> torch.Tensor:
    kv_heads, rows, dim = q.shape
    scores = q.double() @ keys.double().transpose(-1, -2) * dim ** -0.5
    rows_mask = mask.repeat(group, 1)  # row r is position r % T
    return scores.masked_fill(~rows_mask, float("-inf")).softmax(-1).sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,group,chunk,cached,dim", [(2, 3, 20, 50, 16), (3, 1, 17, 90, 32)])
def test_prefill_mass_equals_the_summed_softmax(small_launches, dtype, kv_heads, group, chunk, cached, dim) -> None:
    q, keys, mask = _inputs(kv_heads, group, chunk, cached, dim, dtype)
    mass = op.prefill_mass(q, keys, mask)
    expected = _reference(q, keys, mask, group)
    assert mass.shape == (kv_heads, cached + chunk) and mass.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(mass.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance * group * chunk)
    assert torch.allclose(mass.sum(-1).cpu(), torch.full((kv_heads,), float(group * chunk)), rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_given_log_sum_exp_is_used_and_rows_that_see_nothing_add_nothing(small_launches, dtype) -> None:
    """The mass kernel alone, on each row's log-sum-exp passed in (as the attention gives it): the
    same mass; a row whose mask is empty (its log-sum-exp -inf) adds no NaN and no mass."""
    kv_heads, group, chunk, cached, dim = 2, 2, 20, 40, 16
    q, keys, mask = _inputs(kv_heads, group, chunk, cached, dim, dtype, seed=2)
    mask[5] = False  # position 5 sees no key
    rows_mask = mask.repeat(group, 1)
    scores = (q.double() @ keys.double().transpose(-1, -2) * dim ** -0.5).masked_fill(~rows_mask, float("-inf"))
    lse = scores.logsumexp(-1).float()
    assert torch.isneginf(lse[:, 5]).all()
    given = op.prefill_mass(q, keys, mask, lse)
    own = op.prefill_mass(q, keys, mask)
    expected = torch.nan_to_num(scores.softmax(-1), nan=0.0).sum(1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.isfinite(given).all() and torch.isfinite(own).all()
    assert torch.allclose(given.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance * group * chunk)
    assert torch.allclose(own.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance * group * chunk)
    assert torch.allclose(given.sum(-1).cpu(), torch.full((kv_heads,), float(group * (chunk - 1))), rtol=1e-3)


def test_attention_with_lse_gives_the_outputs_and_each_rows_normaliser() -> None:
    """prefill_attention: the output of scaled_dot_product_attention and the float64 log-sum-exp of
    every grouped row; ``kernel`` leaves the normaliser to the mass op; a bad source is named."""
    from ros_infmllm.model.prefill_attention import attention, attention_with_lse

    kv_heads, group, chunk, cached, dim = 2, 3, 12, 21, 16
    q, keys, mask = _inputs(kv_heads, group, chunk, cached, dim, torch.float32, seed=4)
    values = torch.randn_like(keys)
    out, lse = attention_with_lse(q, keys, values, mask, group, "attention")  # the CPU's or CUDA's efficient kernel
    scores = (q.double() @ keys.double().transpose(-1, -2) * dim ** -0.5).masked_fill(
        ~mask.repeat(group, 1), float("-inf"))
    assert out.shape == q.shape and lse.shape == (kv_heads, group * chunk) and lse.dtype == torch.float32
    assert torch.allclose(lse.double().cpu(), scores.logsumexp(-1).cpu(), atol=1e-4)
    expected = scores.softmax(-1) @ values.double()
    assert torch.allclose(out.double().cpu(), expected.cpu(), atol=1e-4)
    assert torch.allclose(attention(q, keys, values, mask, group), out, atol=1e-5)
    plain, none = attention_with_lse(q, keys, values, mask, group, "kernel")
    assert none is None and torch.allclose(plain, out, atol=1e-5)
    with pytest.raises(ValueError, match="lse_from 'flash'"):
        attention_with_lse(q, keys, values, mask, group, "flash")


def test_cudnn_is_taken_only_where_its_probe_found_it_runs() -> None:
    """Off the CPU, ``cudnn`` without a successful probe for the device type, dtype and head size
    falls back to the mass op's own log-sum-exp (on the meta device: shapes only); on the CPU the
    probe says no and both normaliser sources are the CPU flash kernel's."""
    from ros_infmllm.model import prefill_attention as pa

    q, keys = torch.empty(2, 12, 16, device="meta"), torch.empty(2, 30, 16, device="meta")
    mask = torch.ones(6, 30, dtype=torch.bool, device="meta")
    out, lse = pa.attention_with_lse(q, keys, keys, mask, 2, "cudnn")
    assert out.shape == (2, 12, 16) and lse is None
    out, lse = pa.attention_with_lse(q, keys, keys, mask, 2, "attention")
    assert lse is not None and lse.shape == (2, 12)
    assert not pa.probe_cudnn("cpu", torch.float32, 16)
    if DEVICE == "cuda":
        assert pa.probe_cudnn("cuda", torch.bfloat16, 128)  # the H100/H200 this project measures on
        assert not pa.probe_cudnn("cuda", torch.float32, 128)  # cuDNN would run it in half precision, silently
        assert not pa.probe_cudnn("cuda", torch.bfloat16, 20)


def test_masked_keys_get_no_mass_and_the_default_launch_shape_agrees(small_launches) -> None:
    q, keys, mask = _inputs(2, 2, 24, 40, 16, torch.float32, seed=1)
    small = op.prefill_mass(q, keys, mask)
    op.TUNING = op.PrefillMassTuning()  # the shipped launch shape (the fixture restores its own after)
    assert torch.allclose(op.prefill_mass(q, keys, mask), small, atol=1e-5)
    assert (small[:, :40][:, ~mask[0, :40]] == 0).all()


@pytest.mark.parametrize("lse_from", ["cudnn", "attention", "kernel"])
def test_decoder_takes_the_fused_path_with_the_mass_op_for_whole_chunk_windows(head16_model_dir, monkeypatch,
                                                                              lse_from) -> None:
    """A chunk whose policy reads every query (h2o's window): with the kernels on, the fused
    attention plus the mass op give the explicit path's logits, keys and mass, with each query's
    log-sum-exp from the attention kernel or from the mass op's own first kernel."""
    from ros_infmllm.model import load_model

    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, lse_from=lse_from))
    from ros_infmllm.model.decoder import fused_attention

    decoder = load_model(head16_model_dir, device=DEVICE).decoder
    assert decoder.use_decode_kernel(True) and decoder.layers[0].self_attn.mass_kernel
    capacity, filled, q = 48, 30, 24
    generator = torch.Generator().manual_seed(3)
    cache_k, cache_v = (torch.randn(decoder.cfg.num_layers, decoder.cfg.num_kv_heads, capacity, decoder.cfg.head_dim,
                                    generator=generator).to(DEVICE) for _ in range(2))
    valid = (torch.arange(capacity) < filled).to(DEVICE)
    embeds = torch.randn(q, decoder.cfg.hidden_size, generator=generator).to(DEVICE)
    positions = torch.arange(filled, filled + q, device=DEVICE)
    window = 10**9  # every query
    assert fused_attention(q, window, mass_kernel=True) and not fused_attention(q, window)
    fused = decoder.step(embeds, cache_k, cache_v, valid, positions, window, all_logits=True)
    explicit = decoder.step(embeds, cache_k, cache_v, valid, positions, torch.tensor(window), all_logits=True)
    assert (fused.logits - explicit.logits).abs().max() <= 1e-4
    assert (fused.attn_mass - explicit.attn_mass).abs().max() <= 1e-4
    group = decoder.cfg.num_heads // decoder.cfg.num_kv_heads
    assert torch.allclose(fused.attn_mass.sum(-1), torch.full_like(fused.attn_mass[..., 0], q * group))
    assert fused.attn_mass[..., filled:capacity].abs().max() == 0


AHEAD_OF_TIME = """
import sys
from ros_infmllm.model import prefill_mass_kernel
from ros_infmllm.model.ahead_of_time import compile_for
from ros_infmllm.model.prefill_mass import TUNING

arch = int(sys.argv[1])
KERNELS = {"row_stats": dict(max_ptr="*fp32", sum_ptr="*fp32", split_len="i32"),
           "mass_by_key": dict(lse_ptr="*fp32", partial_ptr="*fp32", rows_per_split="i32")}
for dim in (64, 128):
    for name, own in KERNELS.items():
        block_n = TUNING.mass_block_n if name == "mass_by_key" else TUNING.block_n
        constants = dict(BLOCK_M=TUNING.block_m, BLOCK_N=block_n, DIM=dim, IEEE=False)
        types = dict(q_ptr="*bf16", k_ptr="*bf16", mask_ptr="*u8", **own, rows_total="i32", chunk="i32",
                     width="i32", scale="fp32")
        compiled = compile_for(getattr(prefill_mass_kernel, name), arch, types, constants,
                               num_warps=TUNING.num_warps)
        assert f".entry {name}" in compiled.asm["ptx"] and compiled.asm["cubin"], (dim, name)
        print("built", dim, name)
"""


@pytest.mark.parametrize("arch", [90, 87], ids=["hopper", "jetson-orin"])
def test_kernel_compiles_for_the_target_gpus(arch: int) -> None:
    """Ahead of time through Triton's compiler and ptxas (no GPU needed; outside the interpreter):
    both kernels at head sizes 64 and 128 build for an H100/H200 and a Jetson Orin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME, str(arch)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built") == 4
