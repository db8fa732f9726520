"""The Triton decode attention (model/decode_attention.py) against a float64 reference and against the
decoder's explicit path. On a GPU the kernels run compiled; on the CPU they run in Triton's
interpreter (TRITON_INTERPRET, set by triton_device before the kernels are first imported), same code."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import torch

from triton_device import DEVICE, DTYPES  # before the kernels: sets TRITON_INTERPRET on a CPU

import pytest  # noqa: E402

from ros_infmllm.model import decode_attention as op  # noqa: E402
from ros_infmllm.model import load_model  # noqa: E402
from builders import one_token_step_inputs  # noqa: E402



@pytest.fixture
def small_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch shapes small enough that the test sizes span several splits, merge steps and mass blocks."""
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(
        op.TUNING, block=16, grouped_block=16, programs=8, min_split=16, mass_block=32, grouped_mass_block=32,
        merge_elements=32, int8_block=16, int8_programs=8, two_pass_block=16, two_pass_programs=8))


def _reference(q, k_new, v_new, cache_k, cache_v, valid):
    heads, dim = q.shape
    kv_heads = cache_k.shape[0]
    keys = torch.cat((cache_k, k_new[:, None]), 1).double()
    values = torch.cat((cache_v, v_new[:, None]), 1).double()
    scores = q.double().view(kv_heads, heads // kv_heads, dim) @ keys.transpose(-1, -2) * dim ** -0.5
    allowed = torch.cat((valid, torch.ones(1, dtype=torch.bool, device=valid.device)))
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ values).reshape(heads, dim), probs.sum(1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,capacity,dim", [(6, 2, 200, 32), (4, 4, 130, 16), (8, 1, 97, 64)])
def test_kernel_matches_a_float64_reference(small_launches, dtype, heads, kv_heads, capacity, dim) -> None:
    generator = torch.Generator().manual_seed(heads * capacity + dim)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    q, k_new, v_new = draw(heads, dim), draw(kv_heads, dim), draw(kv_heads, dim)
    cache_k, cache_v = draw(kv_heads, capacity, dim), draw(kv_heads, capacity, dim)
    valid = (torch.rand(capacity, generator=generator) < 0.7).to(DEVICE)
    valid[:40] = False  # whole splits with no valid slot: their partial max is -inf
    out, mass = op.decode_attention(q, k_new, v_new, cache_k, cache_v, valid, True)
    want_out, want_mass = _reference(q, k_new, v_new, cache_k, cache_v, valid)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and mass.shape == (kv_heads, capacity + 1)
    assert _relative(out, want_out) < tolerance
    assert _relative(mass, want_mass) < tolerance
    assert float(mass[:, :capacity][:, ~valid].abs().max()) == 0.0  # empty slots draw nothing
    assert torch.allclose(mass.sum(-1), torch.full((kv_heads,), float(heads // kv_heads), device=DEVICE), rtol=1e-4)
    out_only, no_mass = op.decode_attention(q, k_new, v_new, cache_k, cache_v, valid, False)
    assert torch.allclose(out_only, out, rtol=1e-5, atol=1e-6) and no_mass.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two_pass", [None, dict(two_pass_programs=8),
                                      dict(two_pass_programs=512, two_pass_keys_early=False),
                                      dict(two_pass_programs=512, two_pass_maxnreg=64),
                                      dict(two_pass_programs=512, two_pass_keys_early=True),
                                      dict(two_pass=False, int8_programs=512, int8_keys_early=False),
                                      dict(two_pass=False, int8_programs=512, int8_keys_early=True)],
                         ids=["one-pass", "two-pass", "two-pass-tile-per-split", "two-pass-register-cap",
                              "two-pass-keys-early", "one-pass-tile-per-split", "one-pass-keys-early"])
@pytest.mark.parametrize("heads,kv_heads,capacity,dim", [(6, 2, 200, 32), (4, 4, 130, 16), (2, 2, 200, 64)])
def test_kernel_reads_an_int8_cache(small_launches, monkeypatch, dtype, two_pass, heads, kv_heads, capacity,
                                    dim) -> None:
    """Codes, row scales and unrotated keys (cache/kv_codes.py) against the float64 reference of
    the rows a float cache would hold (dequantized, keys turned to their slots): the kernel turns
    each key tile's halves by its slots and applies the scales to scores and probabilities. With
    ``two_pass`` settings the KV heads serving one query head each take the two-pass kernel (keys,
    then values; at 512 programs every split is one tile, through both loops, or with its keys
    requested before the wait for q), the grouped shape the one-pass kernel still. In the last two
    cases every shape takes the one-pass kernel at one tile per split, its keys after the wait for q
    and before it (as shipped)."""
    monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, **two_pass) if two_pass
                        else dataclasses.replace(op.TUNING, two_pass=False))
    tuning = op.TUNING
    group = heads // kv_heads
    early_field = "two_pass_keys_early" if tuning.takes_two_pass(group, True) else "int8_keys_early"
    if two_pass and two_pass.get(early_field):  # the case asks this shape's kernel for its keys early: one-tile splits
        block, programs = tuning.block_for(group, True), tuning.programs_for(group, True)
        assert op.whole_tile_splits(capacity, block, programs // kv_heads, max(block, tuning.min_split))[1] == block
    from ros_infmllm.cache.kv_codes import dequantize_rows, quantize_rows, read_keys, read_tables
    from ros_infmllm.rope import Rotary

    generator = torch.Generator().manual_seed(heads * capacity + dim + 1)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    q, k_new, v_new = draw(heads, dim), draw(kv_heads, dim), draw(kv_heads, dim)
    # rows of different sizes, so that each slot's scale matters
    size = torch.rand(kv_heads, capacity, 1, generator=generator).to(DEVICE) * 4 + 0.1
    (k_codes, k_scale), (v_codes, v_scale) = (quantize_rows(draw(kv_heads, capacity, dim) * size) for _ in range(2))
    tables = read_tables(Rotary(dim, 10000.0), torch.arange(capacity, device=DEVICE))
    valid = (torch.rand(capacity, generator=generator) < 0.7).to(DEVICE)
    valid[:40] = False
    out, mass = op.decode_attention(q, k_new, v_new, k_codes, v_codes, valid, True, k_scale, v_scale, *tables)
    out_only, no_mass = op.decode_attention(q, k_new, v_new, k_codes, v_codes, valid, False, k_scale, v_scale, *tables)
    assert torch.allclose(out_only, out, rtol=1e-5, atol=1e-6) and no_mass.numel() == 0
    keys = read_keys(k_codes, k_scale, *tables, torch.float64)
    want_out, want_mass = _reference(q, k_new, v_new, keys, dequantize_rows(v_codes, v_scale, torch.float64), valid)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    assert _relative(out, want_out) < tolerance
    assert _relative(mass, want_mass) < tolerance
    unturned = _reference(q, k_new, v_new, dequantize_rows(k_codes, k_scale, torch.float64),
                          dequantize_rows(v_codes, v_scale, torch.float64), valid)[0]
    assert _relative(out, unturned) > 0.05  # the keys' turn is what makes it right
    with pytest.raises(ValueError, match="row scales and rotation tables"):
        op.decode_attention(q, k_new, v_new, k_codes, v_codes, valid, True, k_scale, v_scale)


@pytest.mark.parametrize("offset", [200, 1], ids=["layer-row", "unaligned"])
def test_int8_pass_reads_validity_as_words_or_bytes_alike(small_launches, monkeypatch, offset) -> None:
    """The int8 pass's validity read as 32-bit words (``valid_words``) gives what the byte read
    gives, bit for bit, for a layer's row of a ``[layers, C]`` mask (4-byte aligned: words) and
    for a view one byte in (unaligned: the launch falls back to bytes, which must stay right)."""
    from ros_infmllm.cache.kv_codes import quantize_rows, read_tables
    from ros_infmllm.model import decode_kernels_int8
    from ros_infmllm.rope import Rotary

    heads, kv_heads, capacity, dim = 4, 2, 200, 32
    generator = torch.Generator().manual_seed(7)
    q, k_new, v_new = (torch.randn(n, dim, generator=generator).to(DEVICE, torch.float16)
                       for n in (heads, kv_heads, kv_heads))
    (k_codes, k_scale), (v_codes, v_scale) = (
        quantize_rows(torch.randn(kv_heads, capacity, dim, generator=generator).to(DEVICE)) for _ in range(2))
    tables = read_tables(Rotary(dim, 10000.0), torch.arange(capacity, device=DEVICE))
    storage = (torch.rand(3 * capacity + 1, generator=generator) < 0.6).to(DEVICE)
    valid = storage[offset:offset + capacity]
    launched = []
    kernel = decode_kernels_int8.partial_attention_codes

    class Recording:  # records the VALID_WORDS each launch is given, then launches the kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["VALID_WORDS"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(decode_kernels_int8, "partial_attention_codes", Recording())
    results = []
    for words in (False, True):
        monkeypatch.setattr(op, "TUNING", dataclasses.replace(op.TUNING, valid_words=words))
        results.append(op.decode_attention(q, k_new, v_new, k_codes, v_codes, valid, True, k_scale, v_scale, *tables))
    assert launched == [False, offset % 4 == 0]
    (bytes_out, bytes_mass), (words_out, words_mass) = results
    assert torch.equal(words_out, bytes_out) and torch.equal(words_mass, bytes_mass)
    assert float(words_mass[:, :capacity][:, ~valid].abs().max()) == 0.0  # an empty slot draws nothing
    assert bool((words_mass[:, :capacity][:, valid] > 0).all())  # and every valid one something


def test_decoder_step_with_the_kernel_equals_the_explicit_path(head16_model_dir, small_launches) -> None:
    model = load_model(head16_model_dir, device=DEVICE)
    decoder = model.decoder
    inputs = one_token_step_inputs(model.cfg.text, capacity=50, filled=37, seed=1, device=DEVICE)
    results = []
    for enabled in (False, True):
        assert decoder.use_decode_kernel(enabled) is enabled
        results.append(decoder.step(**inputs, attn_window=4))
    explicit, kernel = results
    decoder.use_decode_kernel(False)
    assert torch.allclose(kernel.logits, explicit.logits, atol=1e-4)
    assert torch.allclose(kernel.new_k, explicit.new_k, atol=1e-5)
    assert torch.allclose(kernel.attn_mass, explicit.attn_mass, atol=1e-5)


@pytest.mark.parametrize("capacity", [50, 48], ids=["validity-bytes", "validity-words"])
def test_decoder_step_over_an_int8_cache_with_the_kernel_equals_the_explicit_path(head16_model_dir, small_launches,
                                                                                  capacity) -> None:
    """The same step over an int8 cache (codes with unrotated keys, ``int8_cache``): the kernel reads
    the codes, the explicit path dequantizes and turns the layer; both equal the explicit path over
    the rows a float cache would hold. At 48 slots the kernel reads the validity as words."""
    from ros_infmllm.cache.kv_codes import dequantize_rows, quantize_rows, read_keys, read_tables

    model = load_model(head16_model_dir, device=DEVICE)
    decoder = model.decoder
    inputs = one_token_step_inputs(model.cfg.text, capacity=capacity, filled=37, seed=2, device=DEVICE)
    assert op.reads_valid_words(inputs["valid"], op.TUNING) is (capacity % 4 == 0)
    (k_codes, k_scale), (v_codes, v_scale) = quantize_rows(inputs["cache_k"]), quantize_rows(inputs["cache_v"])
    tables = read_tables(decoder.rotary, torch.arange(capacity, device=DEVICE))
    packed = dict(inputs, cache_k=k_codes, cache_v=v_codes, int8_cache=(k_scale, v_scale, *tables))
    rows = dict(inputs, cache_k=read_keys(k_codes, k_scale, *tables, torch.float32),
                cache_v=dequantize_rows(v_codes, v_scale, torch.float32))
    decoder.use_decode_kernel(False)
    want = decoder.step(**rows, attn_window=4)
    explicit = decoder.step(**packed, attn_window=4)
    assert decoder.use_decode_kernel(True)
    kernel = decoder.step(**packed, attn_window=4)
    decoder.use_decode_kernel(False)
    assert torch.equal(explicit.logits, want.logits)
    assert torch.allclose(kernel.logits, want.logits, atol=1e-4)
    assert torch.allclose(kernel.attn_mass, want.attn_mass, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["float", "int8"])
@pytest.mark.parametrize("x8_group,split", [(32, True), (16, False), (8, True)])
def test_combine_rounds_its_output_as_the_rounding_launch_does(small_launches, dtype, cache, x8_group, split) -> None:
    """``decode_attention_codes``: the output as ``decode_attention`` gives it, and its int8 codes
    and stats for o_proj's product exactly those ``quantized_activations`` makes of that output
    (even / odd halves for int4 weights, in order for int8), the groups' sums of squares too."""
    from ros_infmllm.cache.kv_codes import quantize_rows, read_tables
    from ros_infmllm.model.matvec_dp4a import quantized_activations
    from ros_infmllm.rope import Rotary

    heads, kv_heads, capacity, dim = 6, 2, 200, 32
    generator = torch.Generator().manual_seed(7)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    q, k_new, v_new = draw(heads, dim), draw(kv_heads, dim), draw(kv_heads, dim)
    cache_k, cache_v = draw(kv_heads, capacity, dim), draw(kv_heads, capacity, dim)
    valid = (torch.rand(capacity, generator=generator) < 0.7).to(DEVICE)
    rows = ()
    if cache == "int8":
        (cache_k, k_scale), (cache_v, v_scale) = quantize_rows(cache_k), quantize_rows(cache_v)
        rows = (k_scale, v_scale, *read_tables(Rotary(dim, 10000.0), torch.arange(capacity, device=DEVICE)))
    out, mass = op.decode_attention(q, k_new, v_new, cache_k, cache_v, valid, True, *rows)
    fused_out, fused_mass, codes, stats = op.decode_attention_codes(q, k_new, v_new, cache_k, cache_v, valid, True,
                                                                    x8_group, split, *rows)
    assert torch.equal(fused_out, out) and torch.equal(fused_mass, mass)
    want_codes, want_stats = quantized_activations(out.reshape(-1), x8_group, split=split)
    assert torch.equal(codes.view(torch.int32), want_codes)
    groups = out.numel() // x8_group
    assert torch.equal(stats[:2 * groups], want_stats[:2 * groups])  # scales and sums: the same arithmetic
    assert torch.allclose(stats[2 * groups:], want_stats[2 * groups:], rtol=1e-6)  # sums of squares, any order
    assert codes.abs().max() == 127  # each group's largest element takes the full code range
    shapes = op._decode_attention_codes_shapes(q, k_new, v_new, cache_k, cache_v, valid, True, x8_group, split, *rows)
    assert [t.shape for t in shapes] == [t.shape for t in (fused_out, fused_mass, codes, stats)]  # what compile sees
    with pytest.raises(ValueError, match="multiple of 8 dividing the head size"):
        op.decode_attention_codes(q, k_new, v_new, cache_k, cache_v, valid, True, 12, split, *rows)


AHEAD_OF_TIME = """
import sys
from ros_infmllm.model import decode_kernels, decode_kernels_int8, decode_kernels_int8_two_pass
from ros_infmllm.model.ahead_of_time import compile_for, resource_usage
from ros_infmllm.model.decode_attention import TUNING, register_cap

arch = int(sys.argv[1])


def loads_before_wait(ptx):
    # global loads a thread issues before its kernel's wait for the previous launch (none without dependent
    # launches), and how many waits it holds
    waits = ptx.find("griddepcontrol.wait")
    return (ptx[:waits].count("ld.global") if waits >= 0 else 0), ptx.count("griddepcontrol.wait")


SHARED_LIMIT = {90: 232448, 87: 166912}  # bytes per block, opted in: H100 / H200, Jetson Orin
# (2, 16): a head under 32 wide takes the int8 pass's summed products (its dots are not compiled)
for group, dim, scaled in [(6, 128, False), (1, 128, False), (7, 64, False), (6, 128, True), (1, 128, True),
                           (2, 16, True)]:
    cache = "*i8" if scaled else "*bf16"  # an int8 cache's codes, with float32 row scales, float16 tables
    pointers = dict(q_ptr="*bf16", k_ptr=cache, v_ptr=cache, valid_ptr="*u8", scores_ptr="*fp32",
                    max_ptr="*fp32", sum_ptr="*fp32", acc_ptr="*fp32")
    if scaled:
        pointers.update(k_scale_ptr="*fp32", v_scale_ptr="*fp32", cos_ptr="*fp16", sin_ptr="*fp16")
    block = TUNING.block_for(group, scaled)
    constants = dict(SPLIT_LEN=4 * block, GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()),
                     DIM=dim, BLOCK=block, NUM_SPLITS=8, WITH_SCORES=True, IEEE=False, PDL=arch >= 90)
    if scaled:  # the validity read as words, as launched where the capacity is a multiple of 4
        constants.update(VALID_WORDS=TUNING.valid_words)
    kernel = decode_kernels_int8.partial_attention_codes if scaled else decode_kernels.partial_attention
    # pointers 16-byte aligned, as Triton specialises them at run time: only then are the loads
    # copied asynchronously into shared memory (pipelined), which is what the limit below is about
    compiled = compile_for(kernel, arch, dict(pointers, capacity="i32", scale="fp32"), constants, aligned=pointers,
                           num_warps=TUNING.int8_num_warps if scaled else TUNING.num_warps,
                           num_stages=TUNING.int8_num_stages if scaled else TUNING.num_stages, launch_pdl=arch >= 90)
    assert f".entry {kernel.__name__}" in compiled.asm["ptx"] and compiled.asm["cubin"], (group, dim)
    # a split of four tiles (pipelined): within the shared memory one block may take, checked at launch
    assert compiled.metadata.shared <= SHARED_LIMIT[arch], (group, dim, scaled, compiled.metadata.shared)
    if scaled:  # the combine pass reads float32 partials only: the same kernel serves both caches
        print("built", group, dim, "int8")
        if group > 1 and dim == 128:  # a split of one tile with its keys before the wait for q (int8_keys_early)
            constants.update(SPLIT_LEN=block, KEYS_EARLY=True)
            ptx = compile_for(kernel, arch, dict(pointers, capacity="i32", scale="fp32"), constants,
                              aligned=pointers, num_warps=TUNING.int8_num_warps, num_stages=TUNING.int8_num_stages,
                              launch_pdl=arch >= 90).asm["ptx"]
            print("one-pass-keys-early", *loads_before_wait(ptx))
        continue
    # the combine as decode_attention_codes launches it: o_proj's x codes rounded in groups of 32
    constants = dict(GROUP=group, ROWS=1 << (group - 1).bit_length(), DIM=dim, NUM_SPLITS=33, SPLITS_PAD=64,
                     SPLIT_CHUNK=min(64, TUNING.merge_elements // dim), MASS_BLOCK=TUNING.mass_block_for(group),
                     PDL=arch >= 90, X8_GROUP=32, X8_SPLIT=True)
    types = {name: "*bf16" for name in ("q_ptr", "k_new_ptr", "v_new_ptr")}
    types.update({name: "*fp32" for name in ("scores_ptr", "max_ptr", "sum_ptr", "acc_ptr")})
    types.update(out_ptr="*bf16", mass_ptr="*fp32", codes_ptr="*i8", x_stats_ptr="*fp32", capacity="i32",
                 scale="fp32")
    compiled = compile_for(decode_kernels.combine_attention, arch, types, constants,
                           num_warps=TUNING.combine_warps_for(group), launch_pdl=arch >= 90)
    assert ("griddepcontrol.wait" in compiled.asm["ptx"]) is (arch >= 90)
    assert ".entry combine_attention" in compiled.asm["ptx"] and compiled.asm["cubin"], (group, dim)
    print("built", group, dim)
# the two-pass int8 kernel (one query head per KV head) at its shipped step over four tiles and a 16-wide head,
# and over one tile
two_pass = decode_kernels_int8_two_pass.partial_attention_codes_two_pass
pointers = dict(q_ptr="*bf16", k_ptr="*i8", v_ptr="*i8", valid_ptr="*u8", scores_ptr="*fp32", max_ptr="*fp32",
                sum_ptr="*fp32", acc_ptr="*fp32", k_scale_ptr="*fp32", v_scale_ptr="*fp32", cos_ptr="*fp16",
                sin_ptr="*fp16")
# and at the 7B shape (one tile per split) under a register cap (two_pass_maxnreg), which spills what no longer fits
# and as shipped: its keys requested before the wait for q (two_pass_keys_early, which only a split of one tile
# takes), under the shipped cap
for dim, tiles, cap, early in [(128, 4, 0, False), (16, 4, 0, False), (128, 1, 0, False), (128, 1, 96, False),
                               (128, 1, TUNING.two_pass_maxnreg, True)]:
    block = TUNING.two_pass_block
    constants = dict(SPLIT_LEN=tiles * block, DIM=dim, BLOCK=block, NUM_SPLITS=8, IEEE=False, PDL=arch >= 90,
                     VALID_WORDS=TUNING.valid_words, STAGES=TUNING.two_pass_num_stages, KEYS_EARLY=early)
    compiled = compile_for(two_pass, arch, dict(pointers, capacity="i32", scale="fp32"), constants, aligned=pointers,
                           num_warps=TUNING.two_pass_num_warps, num_stages=TUNING.two_pass_num_stages,
                           launch_pdl=arch >= 90, **register_cap(cap))
    assert compiled.metadata.shared <= SHARED_LIMIT[arch], (dim, compiled.metadata.shared)
    if tiles > 1:  # both loops pipelined: their stages are given (tl.range)
        assert "cp.async" in compiled.asm["ptx"], dim
    if early:  # global loads issued before the wait for the launch that wrote q (none without PDL)
        print("keys-early", *loads_before_wait(compiled.asm["ptx"]))
    elif tiles == 1:
        usage = resource_usage(compiled)
        print("registers", cap, usage["REG"], usage["STACK"])
    else:
        print("built two-pass", dim, tiles)
"""


@pytest.mark.parametrize("arch", [90, 87], ids=["hopper", "jetson-orin"])
def test_kernels_compile_for_the_target_gpus(arch: int) -> None:
    """Ahead of time, through Triton's compiler and ptxas (no GPU needed; a process of its own,
    outside the interpreter): both kernels at the benchmark's head shapes build for an H100 and a
    Jetson Orin, the int8 cache's partial passes too (one-pass and two-pass), each within the shared memory a block may
    take there at a split of four tiles (Triton checks it only at launch: an earlier int8 pass at
    three stages needed 301 KB and failed on the H200 once a split spanned two tiles). A register cap
    on the two-pass kernel (``two_pass_maxnreg``) holds in the cubin, the rest spilled; with
    ``two_pass_keys_early`` its key tile is requested before the wait for q."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME, str(arch)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built") == 8 and done.stdout.count("int8") == 3 and done.stdout.count("two-pass") == 2
    registers = {int(cap): (int(regs), int(stack)) for _, cap, regs, stack in
                 (line.split() for line in done.stdout.splitlines() if line.startswith("registers"))}
    assert registers[0][0] > 96 and registers[0][1] == 0  # uncapped: more than the cap, nothing spilled
    assert registers[96][0] <= 96 and registers[96][1] > 0  # capped: within it, the rest spilled to the stack
    for name in ("keys-early", "one-pass-keys-early"):  # the two-pass kernel's and the one-pass kernel's
        early, waits = (int(n) for n in next(line for line in done.stdout.splitlines()
                                             if line.startswith(name + " ")).split()[1:])
        # with dependent launches (Hopper) the key tile's codes and table rows (24 vector loads a thread at 4 warps),
        # its scales and validity are requested before the one wait; the Orin has no wait, and nothing before it
        assert (early >= 24 and waits == 1) if arch >= 90 else (early, waits) == (0, 0), (name, early, waits)


def test_register_cap_is_a_launch_option_on_a_gpu_only() -> None:
    """``two_pass_maxnreg`` reaches Triton as its ``maxnreg`` option for a GPU; 0 (no cap) and the
    interpreter (not on a GPU) pass nothing; a negative cap is refused by name."""
    assert op.register_cap(96) == {"maxnreg": 96} and op.register_cap(0) == {}
    assert op.register_cap(96, on_gpu=False) == {} and op.register_cap(0, on_gpu=False) == {}
    with pytest.raises(ValueError, match="maxnreg -8"):
        op.register_cap(-8, on_gpu=False)


def test_kernel_is_refused_where_it_cannot_run() -> None:
    assert not op.kernel_supported(torch.device("cuda"), 24, torch.float16)  # head size not a power of two
    assert not op.kernel_supported(DEVICE, 64, torch.int8)
