"""Image message conversion: encodings, row padding, and every malformed case named."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ros_infmllm.ros.conversion import ImageConversionError, compressed_to_rgb, image_to_rgb, rgb_to_image_fields

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_round_trip_through_a_real_message(encoding: str) -> None:
    msg = Image(**rgb_to_image_fields(RGB, encoding))
    assert np.array_equal(image_to_rgb(msg), RGB)


def test_mono8_becomes_grey_rgb() -> None:
    msg = Image(**rgb_to_image_fields(RGB, "mono8"))
    out = image_to_rgb(msg)
    grey = cv2.cvtColor(RGB, cv2.COLOR_RGB2GRAY)
    assert out.shape == (5, 7, 3) and np.array_equal(out[..., 1], grey)


def test_row_padding_in_step_is_skipped() -> None:
    padded = np.zeros((5, 7 * 3 + 11), np.uint8)
    padded[:, : 7 * 3] = RGB.reshape(5, -1)
    padded[:, 7 * 3:] = 255  # garbage in the padding must not leak into the image
    msg = Image(height=5, width=7, encoding="rgb8", step=7 * 3 + 11, data=padded.tobytes())
    assert np.array_equal(image_to_rgb(msg), RGB)


@pytest.mark.parametrize("fields, message", [
    (dict(height=5, width=7, encoding="rgb8", step=20, data=bytes(200)), "step=20 is smaller than width"),
    (dict(height=5, width=7, encoding="rgb8", step=21, data=bytes(50)), "data has 50 bytes, fewer than"),
    (dict(height=0, width=7, encoding="rgb8", step=21, data=b""), "zero-size"),
    (dict(height=20000, width=20000, encoding="rgb8", step=60000, data=bytes(10)), "too large"),
    (dict(height=5, width=7, encoding="32FC1", step=28, data=bytes(140)), "unsupported encoding '32FC1'"),
])
def test_malformed_images_are_refused_with_the_field_named(fields: dict, message: str) -> None:
    with pytest.raises(ImageConversionError, match=message):
        image_to_rgb(Image(**fields))


def test_jpeg_and_png_decode() -> None:
    big = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    assert ok and np.array_equal(compressed_to_rgb(CompressedImage(format="png", data=png.tobytes())), big)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    decoded = compressed_to_rgb(CompressedImage(format="jpeg", data=jpeg.tobytes()))
    assert decoded.shape == big.shape and np.abs(decoded.astype(int) - big).mean() < 12


@pytest.mark.parametrize("fmt, data, message", [
    ("jpeg", b"\xff\xd8\xff\xe0garbage", "could not decode"),
    ("jpeg", b"", "empty compressed image"),
    ("tiff", b"II*\x00", "unsupported compressed format"),
])
def test_bad_compressed_images_are_refused(fmt: str, data: bytes, message: str) -> None:
    with pytest.raises(ImageConversionError, match=message):
        compressed_to_rgb(CompressedImage(format=fmt, data=data))
