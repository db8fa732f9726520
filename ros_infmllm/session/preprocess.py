"""OpenCV image preprocessing that follows the checkpoint's ``preprocessor_config.json``.

CLIP-style processors resize the shortest edge and centre-crop; SigLIP-style ones resize to a
fixed height and width; Qwen2-VL's resizes each frame to the nearest size whose sides are
multiples of a merged token's side, within a pixel budget (dynamic resolution). All then rescale
(1/255) and normalise with the file's mean/std. When the file is absent, the tower type gives
the defaults its processor class would use.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..model.checkpoint import CheckpointFiles
from ..model.config import QwenVisionConfig, VisionConfig
from ..model.gguf_file import open_gguf

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes used in processor configs -> OpenCV interpolation.
_RESAMPLE = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LANCZOS4, 2: cv2.INTER_LINEAR, 3: cv2.INTER_CUBIC,
             4: cv2.INTER_AREA, 5: cv2.INTER_AREA}


def validate_rgb(rgb: object) -> np.ndarray:
    """Check a frame is ``HxWx3 uint8`` with a non-zero size; raise ``ValueError`` naming what is wrong."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"frame dtype must be uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"frame must be HxWx3 (RGB), got shape {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"frame has zero size {rgb.shape[:2]}")
    return rgb


def processor_config(model_dir: str | Path | None) -> dict:
    """The folder's ``preprocessor_config.json`` ({} when there is none)."""
    path = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def tower_normalisation(vision: VisionConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean / std a tower's processor class defaults to: CLIP's for CLIP, 0.5 for SigLIP."""
    if vision.model_type == "clip_vision_model":
        return _CLIP_MEAN, _CLIP_STD
    return (0.5,) * 3, (0.5,) * 3


def pixel_scaling(raw: dict, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """Resampling, rescale and normalisation fields from a processor config, ``mean`` / ``std``
    where it names none (what every preprocessor here takes the same way)."""
    return dict(interpolation=_RESAMPLE.get(int(raw.get("resample", 3)), cv2.INTER_CUBIC),
                rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
                mean=tuple(raw.get("image_mean", mean)), std=tuple(raw.get("image_std", std)),
                do_normalize=bool(raw.get("do_normalize", True)))


@dataclass(frozen=True)
class ImagePreprocessor:
    """RGB uint8 frame -> normalised ``[1, 3, H, W]`` float tensor."""

    height: int
    width: int
    shortest_edge: int | None
    interpolation: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    do_normalize: bool = True

    @classmethod
    def for_model(cls, model_dir: str | Path | None, vision: VisionConfig) -> "ImagePreprocessor":
        raw = processor_config(model_dir)
        size = raw.get("size") or {}
        crop = raw.get("crop_size") or {}
        shortest = size.get("shortest_edge") if isinstance(size, dict) else None
        if shortest is not None and raw.get("do_center_crop", True):
            height, width = int(crop.get("height", shortest)), int(crop.get("width", shortest))
        else:
            height = int(size.get("height", vision.image_size)) if isinstance(size, dict) else vision.image_size
            width = int(size.get("width", vision.image_size)) if isinstance(size, dict) else vision.image_size
        return cls(height=height, width=width, shortest_edge=int(shortest) if shortest else None,
                   **pixel_scaling(raw, *tower_normalisation(vision)))

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        if self.shortest_edge is None:
            return cv2.resize(rgb, (self.width, self.height), interpolation=self.interpolation)
        h, w = rgb.shape[:2]
        scale = self.shortest_edge / min(h, w)
        new_h, new_w = max(self.height, round(h * scale)), max(self.width, round(w * scale))
        resized = cv2.resize(rgb, (new_w, new_h), interpolation=self.interpolation)
        top, left = (new_h - self.height) // 2, (new_w - self.width) // 2
        return resized[top:top + self.height, left:left + self.width]

    def __call__(self, rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """Resize on the CPU (OpenCV, uint8); rescale and normalise where ``device`` says, so a GPU
        session uploads a quarter of the bytes and does the float work there."""
        return self.normalise(self.resize(validate_rgb(rgb))[None], device)

    def normalise(self, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float on ``device``, rescaled and normalised."""
        resized = torch.from_numpy(np.ascontiguousarray(images))
        image = resized.to(device, non_blocking=True).permute(0, 3, 1, 2).float() * self.rescale_factor
        if self.do_normalize:
            where = str(torch.device(device))
            image = (image - _channel_constant(self.mean, where)) / _channel_constant(self.std, where)
        return image.contiguous()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's processor resizes an image to: sides rounded to multiples of
    ``factor``, scaled (aspect kept as nearly as it can be) into ``[min_pixels, max_pixels]``."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # 0 for a side under factor / 2
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


REFERENCE_FRAME = (480, 640)  # a VGA camera: the frame size warm-up and token counts assume


@dataclass(frozen=True)
class DynamicResolutionPreprocessor(ImagePreprocessor):
    """Qwen2-VL / Qwen2.5-VL: each frame resized (OpenCV) to ``smart_resize`` of its own size, so
    a camera's frames keep their aspect and take ``pixels / (patch * merge)^2`` visual tokens.
    ``height`` x ``width`` is the size a ``REFERENCE_FRAME`` camera frame is resized to."""

    factor: int = 28
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @classmethod
    def for_qwen(cls, model_dir: str | Path | None, vision: QwenVisionConfig, min_pixels: int = 0,
                 max_pixels: int = 0) -> "DynamicResolutionPreprocessor":
        """From the folder's ``preprocessor_config.json`` (``min_pixels`` / ``max_pixels``, or
        ``size.shortest_edge`` / ``size.longest_edge`` as transformers writes them now); a
        non-zero ``min_pixels`` / ``max_pixels`` overrides the file (the node's parameters)."""
        raw = processor_config(model_dir)
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        low = int(min_pixels or raw.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        high = int(max_pixels or raw.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        factor = vision.pixel_factor
        if low < factor * factor or high < low:
            raise ValueError(f"pixels per frame: need {factor * factor} <= min_pixels ({low}) <= max_pixels ({high})")
        height, width = smart_resize(*REFERENCE_FRAME, factor, low, high)
        return cls(height=height, width=width, shortest_edge=None, **pixel_scaling(raw, _CLIP_MEAN, _CLIP_STD),
                   factor=factor, min_pixels=low, max_pixels=high)

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        height, width = smart_resize(rgb.shape[0], rgb.shape[1], self.factor, self.min_pixels, self.max_pixels)
        if (height, width) == rgb.shape[:2]:
            return rgb
        return cv2.resize(rgb, (width, height), interpolation=self.interpolation)


MAX_IMAGE_SIDE = 4096  # transformers' Idefics3 processor caps an image's longer side here


@dataclass(frozen=True)
class TiledPreprocessor(ImagePreprocessor):
    """SmolVLM's image splitting (transformers' Idefics3 processor, ``do_image_splitting``): the
    frame's longer side resized to ``longest_edge``, both sides rounded up to whole tiles of the
    tower's ``tile`` pixels, cut into rows x columns tiles (row by row), then the whole frame at
    ``tile`` pixels as the global image last: ``[rows * cols + 1, 3, tile, tile]``. A frame no
    larger than one tile is the global image alone. ``height`` x ``width`` is the camera frame
    (``REFERENCE_FRAME``) that warm-up and token counts assume."""

    tile: int = 384
    longest_edge: int = 1536

    @classmethod
    def for_idefics3(cls, model_dir: str | Path | None, vision: VisionConfig) -> "TiledPreprocessor":
        raw = processor_config(model_dir)
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        return cls(height=REFERENCE_FRAME[0], width=REFERENCE_FRAME[1], shortest_edge=None,
                   **pixel_scaling(raw, *tower_normalisation(vision)), tile=vision.image_size,
                   longest_edge=min(int(size.get("longest_edge", 4 * vision.image_size)), MAX_IMAGE_SIDE))

    def split_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the frame is cut from, as transformers computes it: the longer side at
        ``longest_edge`` (the shorter one made even), then both rounded up to whole tiles."""
        aspect = width / height
        if width >= height:
            width, height = self.longest_edge, int(self.longest_edge / aspect)
            height = max(height + height % 2, 1)
        else:
            height, width = self.longest_edge, int(self.longest_edge * aspect)
            width = max(width + width % 2, 1)
        aspect, t = width / height, self.tile
        if width >= height:
            width = math.ceil(width / t) * t
            height = math.ceil(int(width / aspect) / t) * t
        else:
            height = math.ceil(height / t) * t
            width = math.ceil(int(height * aspect) / t) * t
        return height, width

    def split_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles of a ``height`` x ``width`` frame; (0, 0): no split."""
        h, w = self.split_size(height, width)
        if h <= self.tile and w <= self.tile:
            return 0, 0
        return h // self.tile, w // self.tile

    def __call__(self, rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        h, w = self.split_size(*validate_rgb(rgb).shape[:2])
        whole = cv2.resize(rgb, (w, h), interpolation=self.interpolation)
        global_image = cv2.resize(whole, (self.tile, self.tile), interpolation=self.interpolation)
        if h <= self.tile and w <= self.tile:
            return self.normalise(global_image[None], device)
        t = self.tile
        tiles = whole.reshape(h // t, t, w // t, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
        return self.normalise(np.concatenate((tiles, global_image[None])), device)


def preprocessor_for_folder(model_dir: str | Path | None, vision, min_pixels: int = 0,
                            max_pixels: int = 0, image_splitting: bool = False) -> ImagePreprocessor:
    """The preprocessing of a Hugging Face folder's tower (``min_pixels`` / ``max_pixels``: the
    pixel budget of a dynamic-resolution tower, 0 for the checkpoint's own; ``image_splitting``:
    SmolVLM's tiles plus global image instead of the global image alone)."""
    if image_splitting and getattr(vision, "model_type", "") != "idefics3_vision":
        raise ValueError("image_splitting is SmolVLM's (Idefics3 layout); this model's tower takes whole frames")
    if isinstance(vision, QwenVisionConfig):
        return DynamicResolutionPreprocessor.for_qwen(model_dir, vision, min_pixels, max_pixels)
    if image_splitting:
        return TiledPreprocessor.for_idefics3(model_dir, vision)
    return ImagePreprocessor.for_model(model_dir, vision)


@functools.lru_cache(maxsize=32)
def _channel_constant(values: tuple[float, ...], device: str) -> torch.Tensor:
    """A per-channel ``[1, 3, 1, 1]`` constant on ``device``, made once rather than uploaded with
    every frame (only read, never written in place)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def preprocessor_for(files: CheckpointFiles, model, min_pixels: int = 0, max_pixels: int = 0,
                     image_splitting: bool = False) -> ImagePreprocessor | None:
    """The preprocessing a loaded model's checkpoint asks for; None for a text-only model. An
    mmproj GGUF gives its image size and normalisation (``clip.vision.image_mean`` / ``image_std``)
    and llama.cpp's plain square resize; a Hugging Face folder its ``preprocessor_config.json``."""
    vision = model.cfg.vision
    if vision is None:
        return None
    if files.mmproj is None:
        return preprocessor_for_folder(files.folder, vision, min_pixels, max_pixels, image_splitting)
    if image_splitting:
        raise ValueError("image_splitting is SmolVLM's (Idefics3 layout); an mmproj tower takes whole frames")
    from gguf import Keys

    mmproj = open_gguf(files.mmproj)
    mean, std = tower_normalisation(vision)
    return ImagePreprocessor(height=vision.image_size, width=vision.image_size, shortest_edge=None,
                             interpolation=cv2.INTER_CUBIC, rescale_factor=1 / 255,
                             mean=tuple(mmproj.get(Keys.ClipVision.IMAGE_MEAN) or mean),
                             std=tuple(mmproj.get(Keys.ClipVision.IMAGE_STD) or std))
