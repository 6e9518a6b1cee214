"""Trigger images: loaded with PIL (never unpickled) or from scikit-learn's bundled photos,
and resized to the input size as float tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

SKLEARN_PREFIX = "sklearn:"
SKLEARN_IMAGES = ("china.jpg", "flower.jpg")  # shipped inside the scikit-learn wheel: no download


def check_image_spec(spec: str, field: str) -> None:
    """Fail with the field's name when ``spec`` names neither a bundled photo nor a file."""
    from ..config import ConfigError

    if spec.startswith(SKLEARN_PREFIX):
        name = spec[len(SKLEARN_PREFIX):]
        if name not in SKLEARN_IMAGES:
            allowed = ", ".join(SKLEARN_PREFIX + n for n in SKLEARN_IMAGES)
            raise ConfigError(f"{field}: {spec!r} is not a bundled image; allowed: {allowed} or a file path")
    else:
        path = Path(spec).expanduser()
        allowed = f"(give an image file, or one of {', '.join(SKLEARN_PREFIX + n for n in SKLEARN_IMAGES)})"
        if path.is_file():
            return
        # a folder or a device (/dev/zero) exists: "does not exist" would send the user looking elsewhere
        what = "does not exist" if not path.exists() else "is a folder" if path.is_dir() else "is not a regular file"
        raise ConfigError(f"{field}: {spec!r} {what} {allowed}")


def load_image(spec: str, channels: int) -> torch.Tensor:
    """The image named by ``spec`` as float (channels, h, w) in [0, 1]."""
    if spec.startswith(SKLEARN_PREFIX):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(spec[len(SKLEARN_PREFIX):])  # uint8 (h, w, 3)
        if channels == 1:
            from PIL import Image

            array = np.asarray(Image.fromarray(array).convert("L"))[..., None]
    else:
        from PIL import Image

        with Image.open(Path(spec).expanduser()) as img:
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        if array.ndim == 2:
            array = array[..., None]
    if array.shape[-1] != channels:
        raise ValueError(f"trigger image {spec!r} has {array.shape[-1]} channels; the data has {channels}")
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div_(255.0)  # a writable copy


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(C, h, w) -> (C, H, W); bilinear is antialiased when shrinking (as PIL's resize is)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.clone()
    if mode == "bilinear":
        out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    elif mode == "nearest":
        out = F.interpolate(image[None], size=size, mode="nearest-exact")
    else:
        raise ValueError(f"resize mode {mode!r}; allowed: bilinear, nearest")
    return out[0].clamp_(0.0, 1.0)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of an 8-bit image, as a trigger read from a PNG would be."""
    return image.mul(255.0).round_().div_(255.0)
