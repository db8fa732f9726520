"""LLaMA / Qwen2 / Mistral decoder with the one step contract of DESIGN.md.

``Decoder.step`` takes the embeddings of q new tokens, their (cache-relative) positions and the
cache's K/V buffers at full capacity with a validity mask, and returns logits, the new tokens'
K/V per layer and, when asked, the attention mass that the last queries paid to every slot.
The cache buffers are read, never written: the caller appends the new K/V, so one step can be
replayed, exported or captured with static shapes (everything is fixed but q).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.kv_codes import Int8Rows, dequantize_rows, read_keys
from ..rope import Rotary, rotary_for
from .config import TextConfig
from . import decode_linear
from .decode_attention import decode_attention, decode_attention_codes, kernel_supported
from . import prefill_mass as prefill_mass_op
from .prefill_attention import attention, attention_with_lse, probe_cudnn
from .staged_drop import StagedDrop, layer_mask, rank_and_keep
from .layers import FusedLinear, FusedRuns, RMSNorm, activation, fuse_linears
from .quantized import FusedQuantizedLinear, linear_operands

XCodes = dict[str, torch.Tensor]  # x's int8 codes and stats (matvec_dp4a's layout): decode_linear's x_codes, x_stats
# The product after a block (the next block's q/k/v, or the LM head): its weight, its decode_linear
# packing keywords and the norm folded into it, for the block's down to round its output for
NextInput = tuple[torch.Tensor, dict, torch.Tensor]


@dataclass
class StepOutput:
    """What one decoder step returns.

    logits: ``[q, vocab]`` (all positions) or ``[1, vocab]`` (last position only).
    new_k, new_v: ``[layers, kv_heads, q, head_dim]``; keys already rotated at their positions.
    attn_mass: ``[layers, kv_heads, capacity + q]`` or None: softmax attention of the last
        ``attn_window`` queries, summed over those queries and over the query heads of each KV
        group; columns are the cache slots, then the q new tokens.
    kept: ``[layers, q]`` bool or None: with a staged drop (``StagedDrop``), which new tokens are
        still in play in each layer (the cache marks the others dropped there).
    """

    logits: torch.Tensor
    new_k: torch.Tensor
    new_v: torch.Tensor
    attn_mass: torch.Tensor | None = None
    kept: torch.Tensor | None = None


class Attention(nn.Module):
    """Grouped-query attention over (cached slots + new tokens)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv: FusedLinear | FusedQuantizedLinear | FusedRuns | None = None
        self.decode_kernel = False  # one-token steps through the Triton op (decode_attention.py)
        self.mass_kernel = False  # a whole chunk's mass through the Triton op (prefill_mass.py)

    def fuse_projections(self) -> None:
        """q, k and v from one matrix (see FusedLinear); done once, on the device it will run on."""
        if self.qkv is None:
            self.qkv = fuse_linears(self, "qkv", (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor,
                int8_rows: Int8Rows | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q, k, v = self.qkv(self, x) if self.qkv else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        out, k, v, mass = self.attend(q, k, v, cos, sin, past_k, past_v, mask, attn_window, int8_rows=int8_rows)
        return self.o_proj(out), k, v, mass

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor,
               rotated: bool = False, int8_rows: Int8Rows | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Projected q, k, v ``[q_len, heads|kv_heads * dim]`` (q and k already rotated if ``rotated``)
        -> attention output ``[q_len, heads * dim]`` (before o_proj), the rotated keys and the
        values ``[kv_heads, q_len, dim]``, the mass. ``int8_rows``: this layer's row scales and
        the slots' rotation tables where past_k/v are an int8 cache's codes (keys unrotated,
        cache/kv_codes.py): the Triton decode op reads the codes, other paths dequantize this
        layer's rows and turn its keys first."""
        q_len = q.shape[0]
        q, k, v = self._heads(q, k, v, cos, sin, rotated)
        group = self.num_heads // self.num_kv_heads
        if self.decode_kernel and one_token_step(q_len, attn_window):
            out, mass = self._kernel(q, k, v, past_k, past_v, mask, attn_window, int8_rows)
        else:
            if int8_rows is not None:  # this layer's rows as a float cache holds them, for torch's products
                k_scale, v_scale, read_cos, read_sin = int8_rows
                past_k = read_keys(past_k, k_scale, read_cos, read_sin, q.dtype)
                past_v = dequantize_rows(past_v, v_scale, q.dtype)
            if fused_attention(q_len, attn_window, self.mass_kernel):
                out, mass = self._fused(q, k, v, past_k, past_v, mask, attn_window, group)
            else:
                out, mass = self._explicit(q, k, v, past_k, past_v, mask, attn_window, group)
        return out.transpose(0, 1).reshape(q_len, self.num_heads * self.head_dim), k, v, mass

    def attend_with_codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, mask: torch.Tensor, attn_window: int, x8_group: int, x8_split: bool,
                          int8_rows: Int8Rows | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor,
                                     torch.Tensor]:
        """``attend`` for one decode token through the Triton op (``decode_kernel`` on; q and k
        rotated), the output also rounded to int8 codes and stats for the o projection's
        int8-activation product (``decode_attention_codes``): its rounding launch is not needed.
        Returns ``attend``'s four values, then the codes and stats."""
        q, k, v = self._heads(q, k, v, None, None, True)
        capacity = past_k.shape[1]
        rows = int8_rows if int8_rows is not None else (None,) * 4  # k_scale, v_scale, read_cos, read_sin
        out, mass, codes, stats = decode_attention_codes(q[:, 0], k[:, 0], v[:, 0], past_k, past_v,
                                                         mask[0, :capacity], attn_window > 0, x8_group, x8_split,
                                                         *rows)
        return (out.view(1, self.num_heads * self.head_dim), k, v, mass if attn_window > 0 else None, codes,
                stats)

    def _heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
               sin: torch.Tensor | None, rotated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[q_len, heads * dim]`` projections -> ``[heads, q_len, dim]`` each, q and k rotated
        unless they already are."""
        q_len = q.shape[0]
        q = q.reshape(q_len, self.num_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(q_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = v.reshape(q_len, self.num_kv_heads, self.head_dim).transpose(0, 1)
        if not rotated:
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        return q, k, v

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                  past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor, group: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities materialised: the attention mass comes from the same softmax. Cached
        slots and new tokens are scored separately and the two blocks of scores joined, so the
        cache is read once in place (no concatenated or head-repeated copy of it), which is what
        bounds decode speed. Query heads are grouped under their KV head (GQA)."""
        q_len = q.shape[1]
        grouped_q = q.reshape(self.num_kv_heads, group * q_len, self.head_dim)
        # One new token (decode, in torch): its score and value term as element-wise work that the
        # compiler fuses into the softmax, instead of two tiny matrix products.
        single = one_token_step(q_len, attn_window)
        new_scores = (grouped_q * k).sum(-1, keepdim=True) if single else grouped_q @ k.transpose(-1, -2)
        scores = torch.cat((grouped_q @ past_k.transpose(-1, -2), new_scores), dim=-1)
        scores = scores.view(self.num_kv_heads, group, q_len, -1).float() * self.head_dim ** -0.5
        # float32 softmax: policies read these probabilities, and bf16 would round small ones away
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        capacity = past_k.shape[1]
        flat = probs.to(q.dtype).view(self.num_kv_heads, group * q_len, -1)
        out = flat[..., :capacity] @ past_v + (flat[..., capacity:] * v if single else flat[..., capacity:] @ v)
        mass = None
        if isinstance(attn_window, torch.Tensor) or attn_window > 0:
            # A tensor window (exported graphs) always reports, so one graph serves every policy.
            in_window = torch.arange(q_len, device=q.device) >= q_len - attn_window  # the last queries
            mass = (probs * in_window.view(1, 1, -1, 1).to(probs.dtype)).sum(dim=(1, 2))
        return out.view(self.num_heads, q_len, self.head_dim), mass

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor, attn_window: int,
                int8_rows: Int8Rows | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode token: scores, softmax, values and the mass in two Triton launches."""
        capacity = past_k.shape[1]
        rows = int8_rows if int8_rows is not None else (None,) * 4  # k_scale, v_scale, read_cos, read_sin
        out, mass = decode_attention(q[:, 0], k[:, 0], v[:, 0], past_k, past_v, mask[0, :capacity], attn_window > 0,
                                     *rows)
        return out.view(self.num_heads, 1, self.head_dim), mass if attn_window > 0 else None

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor, mask: torch.Tensor, attn_window: int, group: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prefill chunk: fused attention (no q x (C + q) score matrix in memory), and the
        probabilities of the last ``attn_window`` queries only, which is all a policy reads; where
        it reads every query (``h2o``), their summed probabilities from the Triton mass op, with
        each query's log-sum-exp from the attention kernel (prefill_attention.py)."""
        q_len = q.shape[1]
        keys, values = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
        grouped_q = q.reshape(self.num_kv_heads, group * q_len, self.head_dim)
        mass = None
        if attn_window >= q_len:  # every query: no score matrix at all (prefill_mass.py)
            out, lse = attention_with_lse(grouped_q, keys, values, mask, group, prefill_mass_op.TUNING.lse_from)
            mass = prefill_mass_op.prefill_mass(grouped_q, keys, mask, lse)
        else:
            out = attention(grouped_q, keys, values, mask, group)
        out = out.reshape(self.num_heads, q_len, self.head_dim)  # fused kernels may return another layout
        if 0 < attn_window < q_len:
            last = q[:, q_len - attn_window:].reshape(self.num_kv_heads, group * attn_window, self.head_dim)
            scores = (last @ keys.transpose(-1, -2)).float() * self.head_dim ** -0.5
            last_mask = mask[q_len - attn_window:].repeat(group, 1)
            mass = scores.masked_fill(~last_mask, float("-inf")).softmax(dim=-1).sum(dim=1)
        return out, mass


def fused_attention(q_len: int, attn_window: int | torch.Tensor, mass_kernel: bool = False) -> bool:
    """Whether a step takes the fused path: chunks of at least ``FUSED_MIN_QUERIES`` whose policy
    reads fewer queries than the chunk has, or every query where the Triton mass op runs
    (``mass_kernel``). Decode (q = 1: the Triton op where it runs) and exported graphs (a tensor
    window) keep the explicit path, where the probabilities are shared with the mass at no extra
    read."""
    return (not isinstance(attn_window, torch.Tensor) and q_len >= FUSED_MIN_QUERIES
            and (attn_window < q_len or mass_kernel))


FUSED_MIN_QUERIES = 16


def one_token_step(q_len: int, attn_window: int | torch.Tensor) -> bool:
    """Whether a step is eager or captured decode: one new token and a Python window. The window
    is tested first, so an exported graph (tensor window, symbolic q) never branches on q."""
    return not isinstance(attn_window, torch.Tensor) and q_len == 1


class FeedForward(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)
        self.gate_up: FusedLinear | FusedQuantizedLinear | FusedRuns | None = None

    def fuse_projections(self) -> None:
        """gate and up from one matrix (see FusedLinear)."""
        if self.gate_up is None:
            self.gate_up = fuse_linears(self, "gate_up", (self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self, x) if self.gate_up else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)
        self.silu = cfg.hidden_act == "silu"
        self.decode_matvec = False  # one-token steps through the Triton linear op (decode_linear.py)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor, attn_window: int | torch.Tensor,
                int8_rows: Int8Rows | None = None, x_rounded: XCodes | None = None,
                next_input: NextInput | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, XCodes | None]:
        """The block's output, new keys and values, attention mass, and its output's int8 codes for
        the product after it (``next_input``: the next block's q/k/v or the LM head) where the
        one-token path rounds them (``decode_linear.written_group``; else None). ``x_rounded``: x's
        codes and stats for this block's q/k/v, as the block before wrote them."""
        if self.decode_matvec and one_token_step(x.shape[0], attn_window):
            return self._decode_token(x, cos, sin, past_k, past_v, mask, attn_window, int8_rows, x_rounded,
                                      next_input)
        attn_out, k, v, mass = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask, attn_window,
                                              int8_rows)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), k, v, mass, None

    def can_use_matvec(self) -> bool:
        """The one-token path needs the fused q/k/v matrices (or runs of them, ``FusedRuns``), one
        gate/up matrix (SwiGLU pairs a gate row with its up row in one launch) and a SwiGLU MLP."""
        gate_up = self.mlp.gate_up
        return (self.self_attn.qkv is not None and gate_up is not None and not isinstance(gate_up, FusedRuns)
                and self.silu)

    def _o_codes_group(self, o_weight: torch.Tensor, o_packing: dict, attn_window: int) -> int:
        """The group in which the attention's launch rounds its output for o_proj, or 0 where it
        does not: o_proj's product reads x's int8 codes (``MatvecTuning.x8``), the attention runs
        through the Triton op and the group divides a head (a combine program owns one head)."""
        bits = o_packing.get("bits", 0)
        if not bits or not (self.self_attn.decode_kernel and one_token_step(1, attn_window)):
            return 0
        group = decode_linear.input_group(o_weight, o_packing["scales"], bits)
        x8 = decode_linear.TUNING.x8(bits, group) and decode_linear.TUNING.fused_x_codes
        return group if x8 and self.self_attn.head_dim % group == 0 else 0

    def _decode_token(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                      past_v: torch.Tensor, mask: torch.Tensor, attn_window: int,
                      int8_rows: Int8Rows | None = None, x_rounded: XCodes | None = None,
                      next_input: NextInput | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, XCodes | None]:
        """The same block for one token in four matrix-vector launches around the attention: the
        norms go into the products that read them, rotary into q/k/v, SwiGLU into gate/up, the
        residual adds into o_proj and down_proj (each of those was a kernel launch of its own, at
        ~2 us apiece)."""
        attn, mlp, linear = self.self_attn, self.mlp, decode_linear.decode_linear
        parts, rotated = [], (attn.num_heads + attn.num_kv_heads) * attn.head_dim  # q and k turn, v does not
        for part in getattr(attn.qkv, "parts", (attn.qkv,)):  # one matrix, or runs of one packing (FusedRuns)
            weight, bias, packing = part.matvec_operands(attn)
            width = sum(part.sizes)
            turned = max(0, min(width, rotated))
            parts.append(linear(x, weight, bias, self.input_layernorm.weight, None, self.input_layernorm.eps, False,
                                cos if turned else None, sin if turned else None, turned, **packing,
                                **(x_rounded or {})))
            rotated -= width
        qkv = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        o_weight, o_bias, o_packing = linear_operands(attn.o_proj)
        x8_group = self._o_codes_group(o_weight, o_packing, attn_window)
        rounded = {}  # o_proj's x codes where the attention's combine launch rounds them
        if x8_group:
            out, k, v, mass, codes, stats = attn.attend_with_codes(
                *qkv.split(attn.qkv.sizes, dim=-1), past_k, past_v, mask, attn_window, x8_group,
                o_packing["bits"] == 4, int8_rows=int8_rows)
            rounded = {"x_codes": codes, "x_stats": stats}
        else:
            out, k, v, mass = attn.attend(*qkv.split(attn.qkv.sizes, dim=-1), cos, sin, past_k, past_v, mask,
                                          attn_window, rotated=True, int8_rows=int8_rows)
        gate_up_weight, gate_up_bias, gate_up_packing = mlp.gate_up.matvec_operands(mlp)
        down_weight, down_bias, down_packing = linear_operands(mlp.down_proj)
        norm = self.post_attention_layernorm
        # o_proj, gate/up and down (for the next block's q/k/v or the LM head) round their outputs for the
        # next product where it reads int8 codes (MatvecTuning.round_written): no rounding launch between them
        x, rounded = _product(out, o_weight, o_bias, None, x, 0.0, False, o_packing, rounded,
                              gate_up_weight, gate_up_packing, norm.weight)
        hidden, rounded = _product(x, gate_up_weight, gate_up_bias, norm.weight, None, norm.eps, True,
                                   gate_up_packing, rounded, down_weight, down_packing, None)
        x, rounded = _product(hidden, down_weight, down_bias, None, x, 0.0, False, down_packing, rounded,
                              *(next_input or ()))
        return x, k, v, mass, rounded or None

    def qkv_input(self) -> NextInput | None:
        """What the block before must know to round its output for this block's q/k/v (weight,
        packing, the input norm's weight), where they are one matrix on the one-token path; else None."""
        qkv = self.self_attn.qkv
        if not self.decode_matvec or qkv is None or hasattr(qkv, "parts"):
            return None
        weight, _, packing = qkv.matvec_operands(self.self_attn)
        return weight, packing, self.input_layernorm.weight


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
             residual: torch.Tensor | None, eps: float, gated: bool, packing: dict, rounded: XCodes,
             next_weight: torch.Tensor | None = None, next_packing: dict | None = None,
             next_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, XCodes]:
    """One product of the decode step (``rounded``: x's codes where the launch before wrote them),
    and its output's codes for the next product where this launch rounds them
    (``decode_linear.written_group``; else an empty dict: that product rounds x itself, or there is
    none: no ``next_weight``)."""
    next_packing = next_packing or {}
    group = decode_linear.written_group(weight, packing, gated, next_weight, next_packing)
    if not group:
        return decode_linear.decode_linear(x, weight, bias, norm_weight, residual, eps, gated, **packing,
                                           **rounded), {}
    out, codes, stats = decode_linear.decode_linear_codes(x, weight, bias, norm_weight, residual, eps, gated, group,
                                                          next_packing["bits"] == 4, next_norm, **packing, **rounded)
    return out, {"x_codes": codes, "x_stats": stats}


def run_block(block: TransformerBlock, *args):
    """One block's forward as a plain function: what a backend compiles once for every layer."""
    return block(*args)


class Decoder(nn.Module):
    """Token embeddings, blocks, final norm and LM head."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = rotary_for(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def fuse_projections(self) -> None:
        """Fused q/k/v and gate/up matrices in every block (a decode-speed layout; same results)."""
        for block in self.layers:
            block.self_attn.fuse_projections()
            block.mlp.fuse_projections()

    def use_decode_kernel(self, enabled: bool = True) -> bool:
        """Route one-token steps through the Triton decode attention and, where the projections
        are fused (``fuse_projections``), the Triton matrix-vector op, where they can run here
        (``kernel_supported`` of each), and prefill chunks whose policy reads every query through
        the fused attention plus the Triton mass op; returns whether the attention kernel is on.
        Exported graphs are unchanged."""
        weight = self.norm.weight  # the model's device and dtype (the table may be packed)
        on = enabled and kernel_supported(weight.device, self.cfg.head_dim, weight.dtype)
        matvec = enabled and decode_linear.kernel_supported(weight.device, weight.dtype)
        if on:  # before any compiled prefill reads it: whether cuDNN gives the mass op its log-sum-exp
            probe_cudnn(weight.device, weight.dtype, self.cfg.head_dim)
        for block in self.layers:
            block.self_attn.decode_kernel = on
            block.self_attn.mass_kernel = on  # same kernels' requirements (Triton, head size, dtype)
            block.decode_matvec = matvec and block.can_use_matvec()
        return on

    def empty_cache(self, capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V buffers ``[layers, kv_heads, capacity, head_dim]`` on the model's device and dtype."""
        weight = self.norm.weight  # the model's device and dtype (the table may be packed)
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def step(self, embeds: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
             positions: torch.Tensor, attn_window: int | torch.Tensor = 0, all_logits: bool = False,
             block_fn=run_block, drop: StagedDrop | None = None,
             int8_cache: Int8Rows | None = None) -> StepOutput:
        """One forward step over q new tokens (see the module docstring).

        embeds ``[q, hidden]``; cache_k/v ``[layers, kv_heads, C, head_dim]``; valid ``[C]`` bool
        (slots holding a token), or ``[layers, C]`` where layers hold different slots (a cache with
        staged drops); positions ``[q]`` (cache-relative), or ``[3, q]`` for M-RoPE
        (temporal, height, width; ``rope.MultimodalRotary``); attn_window: how many of the
        last queries to report attention mass for (0: none; a 0-d tensor: always report, for export);
        block_fn: how each block runs (a backend may pass a compiled ``run_block``);
        drop: this chunk's staged visual-token drop (staged_drop.py), None for none;
        int8_cache: where cache_k/v hold an int8 cache's codes (keys unrotated), its row scales
        ``[layers, kv_heads, C]`` and the slots' rotation tables ``[C, head_dim / 2]``
        (``BoundedKVCache.int8_cache``, cache/kv_codes.py); None where they hold the values.
        """
        q_len = embeds.shape[0]
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=embeds.device).tril()
        per_layer = valid.dim() == 2
        mask = None if per_layer else layer_mask(valid, causal, None)
        cos, sin = self.rotary.cos_sin(positions, embeds.dtype)
        x = embeds
        live = torch.ones(q_len, dtype=torch.bool, device=embeds.device) if drop is not None else None
        new_k, new_v, masses, kept = [], [], [], []
        # Only the last token's logits through the Triton op: the final norm folded into the LM head's
        # product (cuBLAS read this matrix at 2.3-2.8 TB/s), for prefill chunks too, so a packed head is
        # never dequantized whole (a captured chunk would keep that copy in its graph's memory).
        head_matvec = self.layers[0].decode_matvec and not all_logits and not isinstance(attn_window, torch.Tensor)
        head_weight, head_bias, head_packing = linear_operands(self.lm_head) if head_matvec else (None, None, {})
        rounded = None  # x's int8 codes for the next block's q/k/v (or the head), where the block before wrote them
        # what each block's down rounds its output for: only one-token steps with round_written take it, so
        # prefill chunks and the default path hand the blocks (and their compiled graphs) nothing extra
        rounds_for_next = one_token_step(q_len, attn_window) and decode_linear.TUNING.round_written
        for i, block in enumerate(self.layers):
            if drop is not None and i in drop.boundaries:
                live = rank_and_keep(block, x, cos, sin, live, drop.droppable, drop.kept[drop.boundaries.index(i)])
                mask = None
                rounded = None  # codes of the rows before the drop
            if per_layer or mask is None:
                mask = layer_mask(valid[i] if per_layer else valid, causal, live)
            rows = (int8_cache[0][i], int8_cache[1][i], *int8_cache[2:]) if int8_cache is not None else None
            following = None
            if rounds_for_next and i + 1 < len(self.layers):
                following = self.layers[i + 1].qkv_input()
            elif rounds_for_next and head_matvec:
                following = head_weight, head_packing, self.norm.weight
            x, k, v, mass, rounded = block_fn(block, x, cos, sin, cache_k[i], cache_v[i], mask, attn_window, rows,
                                              rounded, following)
            new_k.append(k)
            new_v.append(v)
            masses.append(mass)
            kept.append(live)
        if head_matvec:  # with the codes the last block's down rounded for it, where it did
            logits = decode_linear.decode_linear(x[-1:], head_weight, head_bias, self.norm.weight, None,
                                                 self.norm.eps, False, **head_packing, **(rounded or {}))
        else:
            logits = self.lm_head(self.norm(x if all_logits else x[-1:]))
        return StepOutput(
            logits=logits.float(), new_k=torch.stack(new_k), new_v=torch.stack(new_v),
            attn_mass=torch.stack(masses) if masses[0] is not None else None,
            kept=torch.stack(kept) if drop is not None else None,
        )
