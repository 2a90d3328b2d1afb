"""Image bytes -> 8-bit RGB PIL image, whatever mode the file stores.

PIL's convert("RGB") is wrong or lossy for several modes real shards hold: 16-bit grey (I;16)
is clipped at 255, so a 16-bit scan comes out nearly white; transparent pixels (RGBA, LA, P
with transparency) keep whatever colour hides under alpha 0, often black. Here deep grey modes
are scaled from the range they use, and transparency is composited onto white, as img2dataset
does when it resizes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode into RGB."""


class ImageTooLargeError(ImageDecodeError):
    """The image header claims more pixels than allowed (a decompression bomb, or just huge)."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes to an 8-bit RGB image.

    The size is checked from the header, before any pixel is decoded: width * height over
    `max_pixels` raises ImageTooLargeError (max_pixels <= 0 disables this check; PIL's own
    limit, twice Image.MAX_IMAGE_PIXELS, still raises it). Unreadable bytes raise ImageDecodeError.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check is ours
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            with image:
                _check_size(image.size, max_pixels)
                return _to_rgb(image)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{exc} (PIL's Image.MAX_IMAGE_PIXELS)") from None
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error...
            raise ImageDecodeError(f"cannot decode {len(data)} bytes as an image: {exc}") from None


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if max_pixels > 0 and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(data.max_image_pixels)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _DEEP_GREY_MODES:
        return _deep_grey_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, RGB, CMYK, YCbCr: PIL converts these correctly


def _deep_grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grey -> L, scaled from the range its values use."""
    values = np.asarray(image, dtype=np.float32)
    low, high = _value_range(image.mode, values)
    scaled = (values - low) * (255.0 / max(high - low, 1e-12)) + 0.5
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))  # 2-D uint8: mode L


def _value_range(mode: str, values: np.ndarray) -> tuple[float, float]:
    """(black, white) of a deep grey image: its bit depth's full scale, else its own min..max."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if low >= 0:
        scales = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
        for full in scales:
            if high <= full:
                return 0.0, full
    return low, high


class DeviceNormalize:
    """The float conversion and Normalize of an image transform, applied to a whole uint8 batch
    where it is used (on the GPU), so workers, pinned memory and the copy carry a quarter of the
    bytes. The same operations as ToTensor then Normalize, so the result is bitwise the same.
    """

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) uint8 on any device -> (b, 3, H, W) float32, normalised."""
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize takes uint8 images, got {images.dtype}")
        if images.device not in self._constants:  # made once per device: no copy per step
            self._constants[images.device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
                for v in (self.mean, self.std)
            )
        mean, std = self._constants[images.device]
        return images.float().div_(255).sub_(mean).div_(std)


def _pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError(f"expected an RGB PIL image before the uint8 conversion, got {image!r}")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def split_device_normalize(transform: Callable) -> tuple[Callable, DeviceNormalize | None]:
    """(transform up to uint8 CHW, the normalisation left for the device) when `transform` is a
    torchvision Compose ending in ToTensor and Normalize, as open_clip's are; else
    (transform, None), and images stay float as the transform makes them."""
    steps = list(getattr(transform, "transforms", []))
    if (
        not isinstance(transform, Compose)
        or len(steps) < 2
        or not isinstance(steps[-2], ToTensor)
        or type(steps[-1]) is not Normalize
    ):
        return transform, None
    return Compose([*steps[:-2], _pil_to_uint8_chw]), DeviceNormalize(steps[-1].mean, steps[-1].std)
