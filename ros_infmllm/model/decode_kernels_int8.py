"""The decode attention's partial pass over an int8 K/V cache (cache/kv_codes.py): the codes are read
packed, keys turned to their slots as they are read. The combine pass is decode_kernels.py's: it
reads float32 partials only, whatever the cache holds.

Why a kernel of its own: over an int8 cache the float pass's shape (one tile per program, the next
tile requested into registers) held 244 registers per thread at the 7B shape (the turn's float32
halves and float32 cos / sin rows beside the codes), so two programs shared an SM and the call took
1.5x a bf16 cache's while reading half the bytes (benchmarks/attention_registers.py). Here:

- each program walks several tiles in a loop that Triton pipelines: the codes, scales and table
  rows of the next tiles are copied into shared memory while this one is scored, instead of being
  held in registers;
- the read tables are float16 (``BoundedKVCache.read_cos``, ``kv_codes.read_tables``): a table row is
  read for every (slot, KV head), as many bytes as the codes in float32, and halving them measured
  more than any other change (H100, 7B: 38.3 -> 30.1 us per call with float32 math);
- with 16-bit q the turn runs in float16 pairs (codes are exact there, table entries rounded to
  2^-11 of themselves) and the scores come from float16 products with float32 sums, q rounded to
  float16 (a q entry beyond float16's range, 65,504, would overflow; no model here comes near);
- codes become float16 by a byte permute and one subtraction per pair (``codes_to_half``) instead
  of one integer-to-float conversion per code.

A float32 q (tests on the CPU) keeps the turn and the products in float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode_kernels import empty_split, softmax_step, split_of_program, store_partials, weighted_values
from .matvec_dp4a import INTERPRETED

# four int8 codes (one 32-bit word) -> four float16 values in two words: each byte, offset by 128
# (xor 0x80), becomes the low mantissa byte of 1024 + (c + 128) (float16 0x64xx), and 1152 is
# subtracted from both halves at once
_CODES_TO_HALF = tl.constexpr("""{
.reg .b32 biased, offset;
xor.b32 biased, $2, 0x80808080;
prmt.b32 $0, biased, 0x64646464, 0x4140;
prmt.b32 $1, biased, 0x64646464, 0x4342;
mov.b32 offset, 0x64806480;
sub.f16x2 $0, $0, offset;
sub.f16x2 $1, $1, offset;
}""")


@triton.jit
def codes_to_half(codes):
    """int8 codes -> the same values in float16 (exact)."""
    if INTERPRETED:  # Triton's interpreter has no inline PTX
        return codes.to(tl.float16)
    return tl.inline_asm_elementwise(_CODES_TO_HALF, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def partial_attention_codes(q_ptr, k_ptr, v_ptr, valid_ptr, scores_ptr, max_ptr, sum_ptr, acc_ptr,
                            k_scale_ptr, v_scale_ptr, cos_ptr, sin_ptr, capacity, scale, SPLIT_LEN: tl.constexpr,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, WITH_SCORES: tl.constexpr, IEEE: tl.constexpr,
                            PDL: tl.constexpr, VALID_WORDS: tl.constexpr, KEYS_EARLY: tl.constexpr = False):
    """``decode_kernels.partial_attention`` over int8 codes with a float32 scale per (KV head, slot)
    row, keys unrotated: a key tile is read as its two rotate-half halves, turned to its slots
    by the half-width tables ``cos_ptr`` / ``sin_ptr`` ``[capacity, DIM / 2]`` and scored against
    q's matching half (two products of half the depth); a slot's key scale multiplies its
    scores and its value scale its probabilities, so no tile is scaled. Writes the same partials.

    ``VALID_WORDS``: the validity bytes are read as the 32-bit words holding them (``valid_ptr``
    4-byte aligned, the capacity a multiple of 4), which the pipelined loop copies into shared
    memory asynchronously like the codes; a byte alone is too narrow for that and went through
    registers (the pass's hottest stall in the twenty-fourth session's profile).

    ``KEYS_EARLY`` (a split of one tile, ``SPLIT_LEN == BLOCK``): the tile's key codes, table rows,
    scales and validity are requested before waiting for the launch that wrote q, as the two-pass
    kernel does (no launch of a decode step writes the cache)."""
    if PDL:  # see matvec_kernels.py: the next launch may start placing programs during our last wave
        tl.extra.cuda.gdc_launch_dependents()
    head, split, q_rows, row_ok, first, end = split_of_program(capacity, SPLIT_LEN, GROUP, GROUP_PAD)
    running_max, running_sum, acc = empty_split(GROUP_PAD, DIM)
    dims = tl.arange(0, DIM)
    halves = tl.arange(0, DIM // 2)
    base = head.to(tl.int64) * capacity * DIM
    row_base = head.to(tl.int64) * capacity
    if KEYS_EARLY:  # the one tile's keys, before the wait (nothing before us in the step writes them)
        tl.static_assert(SPLIT_LEN == BLOCK)
        slots, live, keep, front, back, cos, sin, k_scale = tile_keys(
            k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, first, end, BLOCK, DIM, VALID_WORDS)
    if PDL:
        tl.extra.cuda.gdc_wait()
    q_index = q_rows[:, None] * DIM + halves[None, :]
    q_front = tl.load(q_ptr + q_index, mask=row_ok[:, None], other=0.0)
    q_back = tl.load(q_ptr + q_index + DIM // 2, mask=row_ok[:, None], other=0.0)
    value_dtype = q_front.dtype  # values enter their product in q's dtype (codes are exact there)
    if not IEEE:
        q_front, q_back = q_front.to(tl.float16), q_back.to(tl.float16)
    if KEYS_EARLY:
        running_max, running_sum, acc = _fold_tile(
            q_front, q_back, keep, front, back, cos, sin, k_scale, v_ptr, v_scale_ptr, scores_ptr, base, row_base,
            slots, live, q_rows, row_ok, dims, capacity, scale, running_max, running_sum, acc, value_dtype, DIM,
            WITH_SCORES, IEEE)
    else:
        for offset in range(0, SPLIT_LEN, BLOCK):  # pipelined: later tiles are copied in while this one is scored
            slots, live, keep, front, back, cos, sin, k_scale = tile_keys(
                k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, first + offset, end, BLOCK, DIM,
                VALID_WORDS)
            running_max, running_sum, acc = _fold_tile(
                q_front, q_back, keep, front, back, cos, sin, k_scale, v_ptr, v_scale_ptr, scores_ptr, base, row_base,
                slots, live, q_rows, row_ok, dims, capacity, scale, running_max, running_sum, acc, value_dtype, DIM,
                WITH_SCORES, IEEE)
    store_partials(max_ptr, sum_ptr, acc_ptr, q_rows * NUM_SPLITS + split, row_ok, running_max, running_sum, acc, DIM)


@triton.jit
def _fold_tile(q_front, q_back, keep, front, back, cos, sin, k_scale, v_ptr, v_scale_ptr, scores_ptr, base, row_base,
               slots, live, q_rows, row_ok, dims, capacity, scale, running_max, running_sum, acc,
               value_dtype: tl.constexpr, DIM: tl.constexpr, WITH_SCORES: tl.constexpr, IEEE: tl.constexpr):
    """One key tile, as ``key_tile`` reads it, scored against the query rows (its scores stored
    where the mass asks) and folded with its values into the running max, sum and weighted values."""
    raw = _turned_scores(q_front, q_back, front, back, cos, sin, DIM, IEEE)
    scores = tl.where(keep[None, :], raw * (k_scale * scale)[None, :], float("-inf"))
    if WITH_SCORES:
        tl.store(scores_ptr + q_rows[:, None] * capacity + slots[None, :], scores, mask=row_ok[:, None] & live[None, :])
    running_max, rescale, probs, running_sum = softmax_step(scores, running_max, running_sum)
    v = tl.load(v_ptr + base + slots[:, None] * DIM + dims[None, :], mask=live[:, None], other=0)
    v_scale = tl.load(v_scale_ptr + row_base + slots, mask=live, other=0.0)
    acc = acc * rescale[:, None] + weighted_values(probs * v_scale[None, :], v.to(value_dtype), IEEE)
    return running_max, running_sum, acc


@triton.jit
def tile_keys(k_ptr, valid_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, start, end, BLOCK: tl.constexpr,
              DIM: tl.constexpr, VALID_WORDS: tl.constexpr):
    """The tile of ``BLOCK`` slots from ``start`` (``end``: the split's end): its slots, which are
    before the end (``live``), which hold a token (``keep``), and ``key_tile``'s reads."""
    slots = start + tl.arange(0, BLOCK)
    live = slots < end
    keep = slot_validity(valid_ptr, slots, live, VALID_WORDS)
    front, back, cos, sin, k_scale = key_tile(k_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, slots, live, DIM)
    return slots, live, keep, front, back, cos, sin, k_scale


@triton.jit
def key_tile(k_ptr, cos_ptr, sin_ptr, k_scale_ptr, base, row_base, slots, live, DIM: tl.constexpr):
    """What scoring ``slots`` (``live``: before the split's end) reads: the key codes as their
    rotate-half halves ``[BLOCK, DIM / 2]``, the slots' rows of the read tables, and the keys' row
    scales ``[BLOCK]`` (``base``, ``row_base``: the KV head's first code and first row)."""
    halves = tl.arange(0, DIM // 2)
    key = base + slots[:, None] * DIM + halves[None, :]
    front = tl.load(k_ptr + key, mask=live[:, None], other=0)
    back = tl.load(k_ptr + key + DIM // 2, mask=live[:, None], other=0)
    table = slots[:, None] * (DIM // 2) + halves[None, :]
    cos = tl.load(cos_ptr + table, mask=live[:, None], other=1.0)
    sin = tl.load(sin_ptr + table, mask=live[:, None], other=0.0)
    k_scale = tl.load(k_scale_ptr + row_base + slots, mask=live, other=0.0)
    return front, back, cos, sin, k_scale


@triton.jit
def slot_validity(valid_ptr, slots, live, VALID_WORDS: tl.constexpr):
    """Whether each of ``slots`` holds a token (False from the split's end on): its validity byte,
    read alone or (``VALID_WORDS``) out of the 32-bit word holding it, little-endian."""
    if VALID_WORDS:
        words = tl.load(valid_ptr.to(tl.pointer_type(tl.int32)) + slots // 4, mask=live, other=0)
        return ((words >> ((slots % 4) * 8)) & 0xFF) != 0
    return tl.load(valid_ptr + slots, mask=live, other=0) != 0


@triton.jit
def turned_keys(front, back, cos, sin, IEEE: tl.constexpr):
    """Key codes given as their halves ``front``, ``back`` ``[BLOCK, DIM / 2]`` turned by RoPE at
    their slots (rotate-half layout): ``front * cos - back * sin`` and ``back * cos + front * sin``,
    in float32 (``IEEE``) or in float16 pairs (codes exact there, table entries rounded)."""
    if IEEE:
        front, back = front.to(tl.float32), back.to(tl.float32)
        cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    else:
        front, back = codes_to_half(front), codes_to_half(back)
        cos, sin = cos.to(tl.float16), sin.to(tl.float16)
    return front * cos - back * sin, back * cos + front * sin


@triton.jit
def _turned_scores(q_front, q_back, front, back, cos, sin, DIM: tl.constexpr, IEEE: tl.constexpr):
    """Scores ``[rows, BLOCK]`` (float32) of q, as its two halves, against key codes given as their
    halves ``front``, ``back`` ``[BLOCK, DIM / 2]``, each key turned by RoPE at its slot in the
    rotate-half layout (``turned_keys``)."""
    turned_front, turned_back = turned_keys(front, back, cos, sin, IEEE)
    # one branch is compiled (constant conditions), so each assigns rather than returns early: Triton
    # compiles the statements after a constant branch's return too
    if DIM // 2 < 16:  # a dot needs a depth of 16: small heads (tests' models) sum the products instead
        scores = (tl.sum(q_front[:, None, :].to(tl.float32) * turned_front[None, :, :].to(tl.float32), 2)
                  + tl.sum(q_back[:, None, :].to(tl.float32) * turned_back[None, :, :].to(tl.float32), 2))
    elif IEEE:
        scores = (tl.dot(q_front, tl.trans(turned_front), input_precision="ieee")
                  + tl.dot(q_back, tl.trans(turned_back), input_precision="ieee"))
    else:
        scores = tl.dot(q_front, tl.trans(turned_front)) + tl.dot(q_back, tl.trans(turned_back))
    return scores
