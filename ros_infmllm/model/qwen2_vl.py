"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution vision tower, patch merger and a Qwen2 decoder
with multimodal RoPE (M-RoPE).

An image of any size whose sides are multiples of ``patch_size * merge_size`` is cut into
3-D patches (the frame repeated over ``temporal_patch_size``), laid out merge block by merge
block as transformers' processor lays them out; each block of ``merge_size`` x ``merge_size``
patches becomes one visual token. Positions:

- in the tower, each patch's (row, column) turns half of each head's rotary pairs (2-D RoPE);
  Qwen2.5-VL attends inside windows of ``window_size`` pixels except in its full-attention blocks;
- in the decoder (``forward_full``), as transformers' ``get_rope_index``: text tokens count up,
  an image's tokens take (start, start + row, start + column) and the text after it starts at
  start + max(rows, columns);
- in a stream (``stream_position_offsets``), positions stay the cache's slots as for every model
  here, and a frame's grid is laid so that it ends where its slots end: the text after a frame
  sees it where transformers puts it; the frame's slots beyond its grid's extent (tokens minus
  the larger side) lie before it. docs/qwen2_vl.md says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..rope import Rotary
from .config import Qwen2VLConfig, QwenVisionConfig
from .image_tokens import ImageTokensModel
from .layers import RMSNorm, activation
from .vision import VisionMLP


def patchify(pixels: torch.Tensor, cfg: QwenVisionConfig) -> torch.Tensor:
    """``[N, C, H, W]`` normalised images -> flattened patches ``[N * rows * cols, patch_values]``
    in transformers' order (merge blocks row by row, patches row by row inside a block; each
    patch repeated over the temporal patch size, as one still image is)."""
    n, c, h, w = pixels.shape
    p, m = cfg.patch_size, cfg.merge_size
    if h % cfg.pixel_factor or w % cfg.pixel_factor:
        raise ValueError(f"image sides {h}x{w} must be multiples of {cfg.pixel_factor} (patch_size * merge_size)")
    blocks = pixels.reshape(n, c, h // (p * m), m, p, w // (p * m), m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    # at most 8 dimensions at a time (TensorRT's limit): [patches, channels, temporal, pixels]
    patches = blocks.reshape(-1, c, 1, p * p).expand(-1, c, cfg.temporal_patch_size, p * p)
    return patches.reshape(n * (h // p) * (w // p), cfg.patch_values)


def image_grids(pixels: torch.Tensor, cfg: QwenVisionConfig) -> list[tuple[int, int, int]]:
    """(temporal, rows, columns) patch grid of each of ``[N, C, H, W]`` images, from the shape
    alone (host integers: nothing to trace or sync)."""
    n, _, h, w = pixels.shape
    return [(1, h // cfg.patch_size, w // cfg.patch_size)] * n


def _grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in row) for row in grid_thw.tolist()]


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``[patches, 2]`` (row, column) of every patch, in the merge-block order of ``patchify``."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        block = torch.stack((rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()), dim=-1)
        out.append(block.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], cfg: QwenVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's windows: ``order`` [tokens] puts the merged tokens window by window (windows
    row by row, tokens row by row inside each), and ``window`` [tokens] is the window (unique
    across images and frames) of each token in that order."""
    side = cfg.window_size // cfg.pixel_factor  # merged tokens per window side
    orders, windows, first_token, first_window = [], [], 0, 0
    for t, h, w in grids:
        rows, cols = h // cfg.merge_size, w // cfg.merge_size
        across = -(-cols // side)
        window = ((torch.arange(rows)[:, None] // side) * across + torch.arange(cols)[None, :] // side).flatten()
        per_frame = -(-rows // side) * across
        for frame in range(t):
            order = torch.sort(window, stable=True).indices
            orders.append(order + first_token)
            windows.append(window[order] + first_window)
            first_token += rows * cols
            first_window += per_frame
    return torch.cat(orders), torch.cat(windows)


def segment_mask(segments: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``[1, 1, n, n]`` bool on ``device``: tokens attend within their own segment (image, frame or
    window); None when all are in one."""
    if bool((segments == segments[0]).all()):
        return None
    return (segments[:, None] == segments[None, :]).view(1, 1, segments.shape[0], -1).to(device)


class QwenPatchEmbed(nn.Module):
    """One 3-D convolution over a (temporal, patch, patch) volume, as a linear map of each patch."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return patches.to(weight.dtype) @ weight.view(weight.shape[0], -1).t()


class QwenVisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, cfg.width * 3)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, width = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # [heads, n, dim]
        q = Rotary.apply(q.float(), cos, sin).to(v.dtype)
        k = Rotary.apply(k.float(), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask)
        return self.proj(out[0].transpose(0, 1).reshape(n, width))


class QwenVisionGatedMLP(nn.Module):
    """Qwen2.5-VL: gated (SwiGLU-style) MLP with biases."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_width)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_width)
        self.down_proj = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: QwenVisionConfig, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=1e-6) if cfg.variant == "qwen2_vl" else RMSNorm(width, 1e-6)


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, cfg.width)
        self.norm2 = _norm(cfg, cfg.width)
        self.attn = QwenVisionAttention(cfg)
        self.mlp = (VisionMLP(cfg.width, cfg.mlp_width, cfg.hidden_act) if cfg.variant == "qwen2_vl"
                    else QwenVisionGatedMLP(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, join the ``merge_size``^2 patches of a block side by side, two linear
    layers with an exact GELU between (names as in the checkpoint: ``ln_q``, ``mlp.0``, ``mlp.2``)."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.joined = cfg.width * cfg.merge_size ** 2
        self.ln_q = _norm(cfg, cfg.width)
        self.mlp = nn.Sequential(nn.Linear(self.joined, self.joined), nn.GELU(), nn.Linear(self.joined, cfg.out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.joined))


@dataclass
class TowerLayout:
    """What a set of grids fixes for the tower, on the device: patch order (Qwen2.5-VL windows),
    rotary tables, attention masks and the order that puts merged tokens back."""

    cos: torch.Tensor
    sin: torch.Tensor
    full_mask: torch.Tensor | None
    window_mask: torch.Tensor | None = None
    patch_order: torch.Tensor | None = None
    token_order: torch.Tensor | None = None


class QwenVisionTower(nn.Module):
    """Flattened patches and their grids -> merged visual tokens ``[tokens, out_size]``."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = QwenPatchEmbed(cfg)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        head_dim = cfg.width // cfg.num_heads
        self.rotary = Rotary(head_dim // 2, cfg.rope_theta)  # one frequency set, shared by rows and columns
        self._layouts: dict[tuple, TowerLayout] = {}

    def layout(self, grids: list[tuple[int, int, int]], device: torch.device) -> TowerLayout:
        """Built once per set of grids and device (a stream's frames share one), so a captured or
        compiled frame encoding finds it ready and makes no host round trip."""
        key = (tuple(grids), str(device))
        if key in self._layouts:
            return self._layouts[key]
        cfg, unit = self.cfg, self.cfg.merge_size ** 2
        positions = patch_positions(grids, cfg.merge_size)
        frames = torch.repeat_interleave(torch.arange(sum(t for t, _, _ in grids)),
                                         torch.tensor([h * w for t, h, w in grids for _ in range(t)]))
        layout_extra = {}
        if cfg.window_size:
            order, windows = window_order(grids, cfg)
            patch_order = (order[:, None] * unit + torch.arange(unit)).flatten()
            positions, frames = positions[patch_order], frames[patch_order]
            layout_extra = dict(window_mask=segment_mask(torch.repeat_interleave(windows, unit), device),
                                patch_order=patch_order.to(device), token_order=torch.argsort(order).to(device))
        freqs = (positions.float()[:, :, None] * self.rotary.inv_freq.cpu()).flatten(1)  # rows' pairs, then columns'
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(0)  # [1, patches, head_dim]
        layout = TowerLayout(cos=angles.cos().to(device), sin=angles.sin().to(device),
                             full_mask=segment_mask(frames, device), **layout_extra)
        if len(self._layouts) > 64:  # a stream has one frame size; tests and forward_full make a few
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        layout = self.layout(grids, patches.device)
        x = self.patch_embed(patches)
        if layout.patch_order is not None:
            x = x[layout.patch_order]
        for i, block in enumerate(self.blocks):
            windowed = self.cfg.window_size and i not in self.cfg.full_attention_blocks
            x = block(x, layout.cos, layout.sin, layout.window_mask if windowed else layout.full_mask)
        merged = self.merger(x)
        return merged if layout.token_order is None else merged[layout.token_order]


class Qwen2VLModel(ImageTokensModel):
    """Plain-PyTorch Qwen2-VL / Qwen2.5-VL: a ``CausalLM`` with M-RoPE whose ``<|image_pad|>``
    ids take the merged tokens of the vision tower."""

    dynamic_resolution = True

    def __init__(self, cfg: Qwen2VLConfig) -> None:
        super().__init__(cfg)
        self.vision_tower = QwenVisionTower(cfg.vision)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Session frames ``[N, 3, H, W]`` (normalised, sides multiples of ``patch * merge``) ->
        ``[N, tokens, hidden]``; or transformers' form, flattened patches ``[patches, values]``
        with ``image_grid_thw`` ``[images, 3]`` -> ``[1, all tokens, hidden]``."""
        cfg = self.cfg.vision
        pixels = pixel_values.to(self.device, self.dtype)
        if pixels.dim() == 4:
            grids = image_grids(pixels, cfg)
            return self.vision_tower(patchify(pixels, cfg), grids).view(pixels.shape[0], -1, self.cfg.text.hidden_size)
        if image_grid_thw is None or pixels.dim() != 2 or pixels.shape[1] != cfg.patch_values:
            raise ValueError(f"Qwen2-VL images are [N, 3, H, W] pixels or [patches, {cfg.patch_values}] flattened "
                             f"patches with image_grid_thw; got {tuple(pixels.shape)}")
        grids = _grid_list(image_grid_thw)
        if sum(t * h * w for t, h, w in grids) != pixels.shape[0]:
            raise ValueError(f"image_grid_thw {grids} does not cover the {pixels.shape[0]} patches given")
        return self.vision_tower(pixels, grids).unsqueeze(0)

    def frame_grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of visual tokens of a preprocessed frame ``[1, 3, H, W]``."""
        side = self.cfg.vision.pixel_factor
        return pixels.shape[-2] // side, pixels.shape[-1] // side

    def rope_positions(self, ids: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``[3, T]`` M-RoPE positions of a whole prompt, as transformers' ``get_rope_index``."""
        merge, image = self.cfg.vision.merge_size, self.cfg.image_token_index
        flags = (ids == image).tolist()
        out, position, i, pending = [], 0, 0, iter(grids)
        while i < len(flags):
            if not flags[i]:
                out.append(torch.full((3, 1), position))
                position, i = position + 1, i + 1
                continue
            t, h, w = next(pending, (0, 0, 0))
            rows, cols = h // merge, w // merge
            if t * rows * cols == 0:
                raise ValueError("more image placeholders than image_grid_thw rows")
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij"))
            out.append(grid.reshape(3, -1) + position)
            position, i = position + max(rows, cols), i + t * rows * cols
        return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)

    def stream_position_offsets(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[3, T]`` added to the slots of a frame's template ids ``ids`` (one image of ``grid``
        merged tokens) to give their M-RoPE positions in a stream: 0 for text; for the image
        token k at (row, column), ``tokens - max(rows, columns) - k + (0, row, column)``, so the
        grid's last position is the slot before the token that follows the image."""
        rows, cols = grid
        is_image = (ids == self.cfg.image_token_index)
        offsets = torch.zeros(3, ids.shape[0], dtype=torch.long)
        count = rows * cols
        if int(is_image.sum()) != count:
            raise ValueError(f"{int(is_image.sum())} image placeholders for a {rows}x{cols} frame")
        k = torch.arange(count)
        grid_ids = torch.stack((torch.zeros(count, dtype=torch.long), k // cols, k % cols))
        offsets[:, is_image] = count - max(rows, cols) - k + grid_ids
        return offsets

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """transformers' call: ``input_ids[1, T]``, flattened patches with ``image_grid_thw`` (or
        ``[N, 3, H, W]`` pixels); positions from ``get_rope_index`` unless ``position_ids``
        ``[3, 1, T]`` are given. ``mm_token_type_ids`` is taken for the same signature: image
        placeholders are found by id."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        ids = input_ids[0].cpu()
        features, grids = None, []
        if pixel_values is not None:
            features = self.encode_images(pixel_values, image_grid_thw)
            four_d = pixel_values.dim() == 4
            grids = image_grids(pixel_values, self.cfg.vision) if four_d else _grid_list(image_grid_thw)
        if position_ids is None:
            positions = self.rope_positions(ids, grids)
        else:
            positions = position_ids.reshape(3, -1) if position_ids.dim() == 3 else position_ids.reshape(-1)
        return self.forward_embeds(self.embed_tokens(ids, features), positions.to(self.device))

