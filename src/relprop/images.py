"""Read any image a user has into an RGB PIL image, or fail with one line that names the file.

Users bring photos from phones (EXIF-rotated), scans (CMYK), microscopes (16-bit grayscale),
logos (RGBA, palette) and huge panoramas; the model wants 8-bit RGB. Transparent pixels are
composited on **white** (not dropped): dropping alpha shows whatever colour the encoder left
under transparent pixels, and black would look like the "removed" pixels of the deletion metric.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from relprop.errors import ImageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico"}
)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_NUMERIC_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_BACKGROUND = (255, 255, 255)
# Bounds of the model input after resizing (the source-pixel bomb guard does not see a 5000x3
# strip become a 186667x112 input). Four 224x224 inputs: the default methods' memory grows by
# about 24 kB per input pixel (Integrated Gradients runs 50 copies at once), so a few GB at most.
MAX_INPUT_PIXELS = 4 * 224 * 224
MAX_ASPECT_RATIO = 8.0
# Bound of the decoded image where a command keeps it at full size: `detect` resizes inside the
# model but draws and upsamples every map onto the original (a 9000x9000 photo took 7.2 GB).
# 4096x4096 (16.8 megapixels) lets 12-megapixel phone photos pass; measured peak with the shared
# SSD, 2 detections: 3.3 GB at 12 MP, 4.1 GB at 16.8 MP (most of it the full-size panels).
MAX_DECODED_PIXELS = 4096 * 4096


def _pillows_own_open() -> Callable[..., Image.Image]:
    """Pillow's own ``Image.open``, even where another library replaced it: Ultralytics does at
    import, and on a file Pillow cannot identify its replacement looks for (and online may
    install) pi-heif, so a corrupt file became an internal error instead of one line."""
    opener = Image.open
    if getattr(opener, "__module__", None) != "PIL.Image":  # replaced before relprop was imported
        opener = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", opener)
    return opener


_PILLOW_OPEN = _pillows_own_open()


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image.

    Raises ImageError (one line naming the file) for a missing, non-image, corrupt or
    truncated file, for anything but a regular file (a FIFO would block the reader forever, a
    device never ends), for decompression bombs (more pixels than Pillow's
    `Image.MAX_IMAGE_PIXELS`, about 89 megapixels by default) and, where given, for more than
    `max_pixels` pixels (read from the header, before decoding).
    """
    path = Path(path)
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; refuse the whole range.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _PILLOW_OPEN(path) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(f"{path}: {width}x{height} = {width * height:,} pixels, above "
                                     f"this command's limit of {max_pixels:,}; scale the image down")
                img.load()  # decode now, so a truncated file fails here and not in a worker
                return to_rgb(_upright(img))
    except ImageError as error:
        text = str(error)
        raise ImageError(text if text.startswith(f"{path}:") else f"{path}: {text}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (no format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({reason})") from None


def _check_regular(path: Path) -> None:
    """Refuse, without opening it, anything that is not a regular file (after symlinks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except (OSError, ValueError) as error:  # a name too long, a NUL byte in it, a loop of links
        raise ImageError(f"{path}: cannot read it ({type(error).__name__})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise ImageError(f"{path}: {kind}, not an image file; refused (reading it could block forever)")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is no reason to lose the image."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # Pillow raises many types on broken EXIF data
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha on white, 16-bit scaled, CMYK via ICC if given).

    Transparency of 16-bit and float images is ignored (such files are scans, not cut-outs).
    """
    if img.mode in _NUMERIC_MODES:  # before alpha: Pillow's own conversion clips 16-bit values
        return Image.fromarray(_to_uint8(img), mode="L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    return img.convert("RGB")


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel image to 0..255."""
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():  # NaN breaks min/max below and casts to 0: a black image
        bad = int((~np.isfinite(values)).sum())
        raise ImageError(f"{bad:,} pixel(s) are NaN or infinite (a float image); refused rather "
                         "than shown as black")
    if img.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255 exactly
    else:
        low, high = float(values.min()), float(values.max())
        if img.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = values
        elif low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0
        else:  # unknown range: stretch what is there
            scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one (print CMYK looks wrong without it)."""
    profile = img.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms  # optional: Pillow may be built without littlecms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # a broken profile or no littlecms: fall back to Pillow's formula
            pass
    return img.convert("RGB")


def resized_size(width: int, height: int, resize: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(resize)`: an int sets the shorter side and
    scales the longer one (truncated, as torchvision does); (h, w) is taken as it is."""
    if not isinstance(resize, int | float) and len(resize) == 1:
        resize = resize[0]
    if isinstance(resize, int | float):
        size = int(resize)
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    h, w = (int(v) for v in resize)
    return w, h


def check_input_size(width: int, height: int, resize: int | Sequence[int]) -> None:
    """Refuse an image whose resized model input would exceed MAX_INPUT_PIXELS pixels or an
    aspect ratio of MAX_ASPECT_RATIO:1 (checked before resizing, so nothing big is allocated)."""
    w, h = resized_size(width, height, resize)
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{width}x{height} pixels: aspect ratio {ratio:.0f}:1 is above the limit of "
            f"{MAX_ASPECT_RATIO:g}:1 (the model input would be {w}x{h} pixels); crop the image first")
    if w * h > MAX_INPUT_PIXELS:
        raise ImageError(
            f"{width}x{height} pixels: the model input would be {w}x{h} = {w * h:,} pixels, above "
            f"the limit of {MAX_INPUT_PIXELS:,}; lower the model's resize setting")


class BoundedTransform:
    """A preprocessing transform that first checks the resized size (`check_input_size`)."""

    def __init__(self, transform: Callable[[Image.Image], Any], resize: int | Sequence[int]) -> None:
        self.transform, self.resize = transform, resize

    def __call__(self, image: Image.Image) -> Any:
        check_input_size(*image.size, self.resize)
        return self.transform(image)


def find_images(paths: Iterable[str | Path],
                exclude: str | Path | None = None) -> Iterator[tuple[Path, Path | None]]:
    """Expand files and folders into image files, as (file, the folder it was found under).

    A file named on the command line is always returned (so a non-image gets its own clear
    error); folders are searched recursively, in sorted order, for known image suffixes, leaving
    out everything under `exclude` (a command's own output folder inside an input folder).
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.is_file() and found.suffix.lower() in IMAGE_SUFFIXES and \
                        not (skip is not None and found.resolve().is_relative_to(skip)):
                    yield found, path
        else:
            yield path, None
