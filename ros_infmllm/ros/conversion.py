"""sensor_msgs Image / CompressedImage -> RGB uint8 arrays, with the checks cv_bridge makes.

Works on the message fields only (duck-typed), so it needs no ROS import and is tested on real
messages and plain objects alike. Every refusal raises ``ImageConversionError`` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

# Refuse before allocating: a header may claim any size (sensor data is untrusted).
MAX_PIXELS = 8192 * 8192


class ImageConversionError(ValueError):
    """A message that cannot become an RGB frame; the text says which field is wrong."""


@dataclass(frozen=True)
class Encoding:
    channels: int
    to_rgb: int | None  # OpenCV colour conversion code, None when already RGB


# One table, not an if-chain: encoding -> channels and the conversion to RGB (all 8-bit).
ENCODINGS: dict[str, Encoding] = {
    "rgb8": Encoding(3, None),
    "bgr8": Encoding(3, cv2.COLOR_BGR2RGB),
    "rgba8": Encoding(4, cv2.COLOR_RGBA2RGB),
    "bgra8": Encoding(4, cv2.COLOR_BGRA2RGB),
    "mono8": Encoding(1, cv2.COLOR_GRAY2RGB),
    "8UC1": Encoding(1, cv2.COLOR_GRAY2RGB),
    "8UC3": Encoding(3, None),
}


def image_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/Image`` -> ``HxWx3 uint8`` RGB, honouring ``step`` (row padding)."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {encoding!r} (supported: {', '.join(ENCODINGS)})")
    spec = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"zero-size image: height={height}, width={width}")
    if height * width > MAX_PIXELS:
        raise ImageConversionError(f"image too large: {width}x{height} exceeds {MAX_PIXELS} pixels")
    row_bytes = width * spec.channels
    if step < row_bytes:
        raise ImageConversionError(f"step={step} is smaller than width*channels={row_bytes} for {encoding}")
    data = msg.data
    size = len(data)
    if size < height * step:
        raise ImageConversionError(f"data has {size} bytes, fewer than height*step={height * step}")
    try:  # bytes, array.array('B') (what rclpy gives) or numpy: no copy
        buffer = np.frombuffer(data, dtype=np.uint8, count=height * step)
    except TypeError:  # a plain list of ints
        buffer = np.asarray(data[: height * step], dtype=np.uint8)
    rows = buffer.reshape(height, step)[:, :row_bytes]
    image = rows.reshape(height, width, spec.channels)
    if spec.to_rgb is None:
        return np.ascontiguousarray(image)
    return cv2.cvtColor(np.ascontiguousarray(image), spec.to_rgb)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG) -> ``HxWx3 uint8`` RGB."""
    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError(f"empty compressed image (format {msg.format!r})")
    fmt = str(msg.format).lower()
    if fmt and not any(name in fmt for name in ("jpeg", "jpg", "png")):
        raise ImageConversionError(f"unsupported compressed format {msg.format!r} (JPEG or PNG)")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ImageConversionError(f"could not decode {data.size} bytes as {msg.format or 'an image'} (corrupt?)")
    if decoded.shape[0] * decoded.shape[1] > MAX_PIXELS:
        raise ImageConversionError(f"decoded image too large: {decoded.shape[1]}x{decoded.shape[0]}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> dict[str, Any]:
    """Fields of an Image message holding ``rgb`` in ``encoding`` (for publishers and test bags)."""
    conversions = {"rgb8": None, "bgr8": cv2.COLOR_RGB2BGR, "rgba8": cv2.COLOR_RGB2RGBA,
                   "bgra8": cv2.COLOR_RGB2BGRA, "mono8": cv2.COLOR_RGB2GRAY}
    if encoding not in conversions:
        raise ImageConversionError(f"cannot write encoding {encoding!r}")
    code = conversions[encoding]
    pixels = rgb if code is None else cv2.cvtColor(rgb, code)
    pixels = np.ascontiguousarray(pixels)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return dict(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding, is_bigendian=0,
                step=pixels.shape[1] * channels, data=pixels.tobytes())
