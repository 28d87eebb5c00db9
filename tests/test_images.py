"""load_image turns every kind of file a user may have into upright 8-bit RGB, or one clear error."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relprop.errors import ImageError
from relprop.images import find_images, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixel(img: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b, strict=True))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming a huge size, with one tiny IDAT: a bomb in 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    return path


def test_rgb_jpeg_and_png_round_trip(tmp_path: Path) -> None:
    source = Image.new("RGB", (30, 20), RED)
    source.paste(Image.new("RGB", (15, 20), BLUE), (15, 0))
    for name in ("a.jpg", "a.png"):
        source.save(tmp_path / name)
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (30, 20)
        assert _close(_pixel(img, 2, 10), RED, 8) and _close(_pixel(img, 27, 10), BLUE, 8)


def test_grayscale_becomes_equal_channels(tmp_path: Path) -> None:
    Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))).save(tmp_path / "g.png")
    arr = np.asarray(load_image(tmp_path / "g.png"))
    assert arr.shape == (8, 64, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 252


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)  # row 0: fully transparent black
    rgba[1] = (255, 0, 0, 255)  # opaque red
    rgba[2] = (255, 0, 0, 128)  # half-transparent red
    rgba[3] = (0, 0, 0, 255)  # opaque black stays black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert _pixel(img, 0, 0) == WHITE
    assert _pixel(img, 0, 1) == RED
    assert _close(_pixel(img, 0, 2), (255, 127, 127), 2)
    assert _pixel(img, 0, 3) == (0, 0, 0)


def test_gray_alpha_and_palette_transparency(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert _pixel(img, 0, 0) == WHITE and _pixel(img, 1, 0) == (0, 0, 0)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert _pixel(img, 0, 0) == WHITE and _pixel(img, 1, 0) == RED


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # C=0 M=Y=100 %: red
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB" and _close(_pixel(img, 8, 8), RED, 10)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000 * 16, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    row = np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0]
    assert row.tolist() == [0, round(16000 / 257), 128, 255]


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert np.asarray(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(Image.new("RGB", (20, 20), BLUE), (20, 0))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    img = load_image(tmp_path / "phone.jpg")
    assert img.size == (20, 40)
    assert _close(_pixel(img, 10, 5), RED, 10) and _close(_pixel(img, 10, 34), BLUE, 10)


def test_large_image_is_accepted(tmp_path: Path) -> None:
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=50)
    img = load_image(tmp_path / "big.jpg")
    assert img.size == (6000, 4000) and _close(_pixel(img, 5999, 3999), (10, 200, 30))


@pytest.mark.parametrize("side", [10_000, 20_000])  # between 1x and 2x Pillow's limit, and above
def test_decompression_bombs_are_refused(tmp_path: Path, side: int) -> None:
    path = _png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    Image.new("RGB", (64, 64), RED).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    files = {
        "truncated": (tmp_path / "truncated.jpg", data[: len(data) // 2]),
        "text": (tmp_path / "notes.png", b"this is not an image\n"),
        "empty": (tmp_path / "empty.jpg", b""),
        "garbage": (tmp_path / "garbage.jpeg", b"\xff\xd8\xff" + bytes(range(256)) * 4),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {name: path for name, (path, _) in files.items()}


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "garbage"])
def test_unreadable_files_give_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_find_images_expands_folders_and_keeps_named_files(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPEG", "d/sub/a.png", "d/readme.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = list(find_images([tmp_path / "d", tmp_path / "d" / "readme.txt"]))
    assert found == [
        (tmp_path / "d" / "b.JPEG", tmp_path / "d"),
        (tmp_path / "d" / "sub" / "a.png", tmp_path / "d"),
        (tmp_path / "d" / "readme.txt", None),
    ]
