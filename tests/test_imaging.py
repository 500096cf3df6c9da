"""Decode stage: formats, modes, EXIF, JPEG draft, pixel limit and bad files."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from dinowatch.imaging import ImageError, ImageTooLarge, ImagingOptions, decode
from dinowatch.testing import synthetic_photo, write_png_header


@pytest.mark.parametrize(("suffix", "save_kwargs", "lossless"), [
    (".jpg", {"quality": 95}, False),
    (".png", {}, True),
    (".webp", {"lossless": True}, True),
    (".heic", {"quality": 95}, False),
    (".bmp", {}, True),
    (".tif", {}, True),
])
def test_formats_decode_to_the_same_rgb_picture(tmp_path: Path, suffix: str, save_kwargs: dict,
                                                lossless: bool) -> None:
    original = synthetic_photo(320, 240, seed=3)
    path = tmp_path / f"picture{suffix}"
    original.save(path, **save_kwargs)
    decoded = decode(path)
    assert (decoded.image.mode, decoded.image.size) == ("RGB", (320, 240))
    assert (decoded.width, decoded.height) == (320, 240)
    error = np.abs(np.asarray(decoded.image, np.int16) - np.asarray(original, np.int16)).mean()
    assert error == 0 if lossless else error < 6


def test_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert decode(path).image.getpixel((10, 10)) == (255, 0, 0)


@pytest.mark.parametrize(("image", "expected"), [
    (Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (10, 20, 30)),
    (Image.new("LA", (8, 8), (77, 128)), (77, 77, 77)),
    (Image.new("L", (8, 8), 100), (100, 100, 100)),
    (Image.new("RGB", (8, 8), (1, 2, 3)).convert("P", palette=Image.Palette.ADAPTIVE), (1, 2, 3)),
    (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    (Image.new("I;16", (8, 8), 40000), (155, 155, 155)),  # scaled, not clipped to white
    (Image.new("1", (8, 8), 1), (255, 255, 255)),
])
def test_modes_become_rgb(tmp_path: Path, image: Image.Image, expected: tuple) -> None:
    path = tmp_path / f"mode-{image.mode.replace(';', '_')}.{'tif' if image.mode != 'P' else 'png'}"
    image.save(path)
    decoded = decode(path).image
    assert decoded.mode == "RGB"
    assert decoded.getpixel((4, 4)) == expected


def _rotated_jpeg(path: Path) -> Path:
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_only_when_asked(tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "rotated.jpg")
    plain = decode(path)
    assert plain.image.size == (40, 20) and (plain.width, plain.height) == (40, 20)
    upright = decode(path, ImagingOptions(exif_transpose=True))
    assert upright.image.size == (20, 40) and (upright.width, upright.height) == (20, 40)
    red, green, blue = upright.image.getpixel((10, 2))  # the stripe is now along the top
    assert red > 200 and green < 60 and blue < 60


def test_fast_jpeg_drafts_to_at_least_twice_the_input(tmp_path: Path, report: Callable) -> None:
    path = tmp_path / "big.jpg"
    synthetic_photo(4056, 3040, seed=4).save(path, quality=90)
    exact = decode(path)
    fast = decode(path, ImagingOptions(fast_jpeg=True))
    assert exact.image.size == (4056, 3040)
    assert min(fast.image.size) >= 448 and fast.image.size[0] < 1100  # scale 1/4 or 1/8
    assert (fast.width, fast.height) == (4056, 3040)  # the record keeps the true size
    exact_small = np.asarray(exact.image.resize((224, 224), Image.Resampling.BILINEAR), np.float32)
    fast_small = np.asarray(fast.image.resize((224, 224), Image.Resampling.BILINEAR), np.float32)
    error = np.abs(exact_small - fast_small).mean()
    report(f"fast_jpeg: 4056x3040 drafted to {fast.image.size}; mean abs pixel difference at "
           f"224 px {error:.2f}/255")
    assert error < 3


def _small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR), np.float32)


def test_a_camera_jpeg_with_an_mpf_preview_is_drafted(tmp_path: Path, report: Callable) -> None:
    # Phone and camera JPEGs carry a preview in an MPF segment; Pillow opens them as "MPO".
    path = tmp_path / "camera.jpg"
    picture = synthetic_photo(4056, 3040, seed=5)
    picture.save(path, format="MPO", save_all=True, quality=90,
                 append_images=[picture.resize((1920, 1440))])
    with Image.open(path) as opened:
        assert opened.format == "MPO"
    exact = decode(path)
    fast = decode(path, ImagingOptions(fast_jpeg=True))
    assert exact.image.size == (4056, 3040)
    assert min(fast.image.size) >= 448 and fast.image.size[0] < 1100  # scale 1/4 or 1/8
    assert (fast.width, fast.height) == (4056, 3040)
    error = np.abs(_small(exact.image) - _small(fast.image)).mean()
    report(f"MPO draft: 4056x3040 drafted to {fast.image.size}; mean abs pixel difference at "
           f"224 px {error:.2f}/255")
    assert error < 3


@pytest.fixture(scope="module")
def heic_with_thumbnails(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1600x1200 HEIC carrying a 600x450 and a 256x192 thumbnail."""
    path = tmp_path_factory.mktemp("heic") / "phone.heic"
    synthetic_photo(1600, 1200, seed=6).save(path, quality=90, thumbnails=[600, 256])
    return path


def test_a_heic_with_a_large_enough_thumbnail_decodes_the_thumbnail(
        heic_with_thumbnails: Path, report: Callable) -> None:
    exact = decode(heic_with_thumbnails)
    fast = decode(heic_with_thumbnails, ImagingOptions(heif_thumbnail=True))
    assert exact.image.size == (1600, 1200)
    assert fast.image.size == (600, 450)  # the smallest thumbnail >= 2 x 224 on both sides
    assert (fast.width, fast.height) == (1600, 1200)  # the record keeps the true size
    error = np.abs(_small(exact.image) - _small(fast.image)).mean()
    report(f"HEIF thumbnail: 1600x1200 decoded from its 600x450 thumbnail; mean abs pixel "
           f"difference at 224 px {error:.2f}/255")
    assert error < 3


def test_a_heic_thumbnail_smaller_than_twice_the_input_is_not_used(
        heic_with_thumbnails: Path) -> None:
    # draft_size 400: 2 x 400 = 800 px is more than either thumbnail has
    fast = decode(heic_with_thumbnails, ImagingOptions(heif_thumbnail=True), draft_size=400)
    assert fast.image.size == (1600, 1200)
    assert decode(heic_with_thumbnails, ImagingOptions(fast_jpeg=True)).image.size == (1600, 1200)


def test_pixel_limit_is_a_dinowatch_error_naming_the_file(tmp_path: Path) -> None:
    huge = write_png_header(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ImageTooLarge, match=r"huge\.png"):
        decode(huge)
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 100)).save(small)
    with pytest.raises(ImageTooLarge, match=r"small\.png: 200x100 is over the limit of 19,999"):
        decode(small, ImagingOptions(max_pixels=19_999))
    assert decode(small, ImagingOptions(max_pixels=20_000)).image.size == (200, 100)


def test_truncated_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    synthetic_photo(640, 480, seed=5).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg"):
        decode(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    with pytest.raises(UnidentifiedImageError, match=r"notes\.jpg"):
        decode(text)


def png_with_chunk(path: Path, kind: bytes, body: bytes) -> Path:
    """A small valid PNG with one extra ancillary chunk before its pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I",
                                                                      zlib.crc32(kind + body))
    path.write_bytes(data[:33] + chunk + data[33:])  # after the 8-byte signature and IHDR
    return path


def test_metadata_limits_follow_max_pixels(tmp_path: Path) -> None:
    # A 4 MB XMP packet (Lightroom keeps history there): Pillow alone refuses over 1 MiB.
    xmp = b"XML:com.adobe.xmp\0\0\0\0\0" + np.random.default_rng(1).bytes(4 << 20)
    big_metadata = png_with_chunk(tmp_path / "xmp.png", b"iTXt", xmp)
    assert decode(big_metadata).image.size == (32, 24)
    # A zTXt bomb: 1 KB that inflates past the budget of one byte per allowed pixel.
    bomb = png_with_chunk(tmp_path / "bomb.png", b"zTXt",
                          b"Comment\0\0" + zlib.compress(bytes(2_000_001)))
    with pytest.raises(ImageError, match=r"bomb\.png: cannot decode \(ValueError"):
        decode(bomb, ImagingOptions(max_pixels=2_000_000))
    assert decode(bomb, ImagingOptions(max_pixels=3_000_000)).image.size == (32, 24)
    # Never below Pillow's own allowance: 800 KB of XMP under a small pixel limit.
    modest = png_with_chunk(tmp_path / "modest.png", b"iTXt", xmp[:800_000])
    assert decode(modest, ImagingOptions(max_pixels=500_000)).image.size == (32, 24)


def test_malformed_exif_does_not_cost_the_image(tmp_path: Path) -> None:
    """XResolution as a signed rational -1/0 next to Orientation 6: Pillow's exif_transpose
    raises struct.error while rewriting the EXIF; the pixels are fine."""
    entries = struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", 6, 0) + \
        struct.pack("<HHI", 0x011A, 10, 1) + struct.pack("<I", 8 + 2 + 24 + 4)
    exif = b"Exif\0\0II*\0" + struct.pack("<IH", 8, 2) + entries + struct.pack("<Iii", 0, -1, 0)
    path = tmp_path / "exif.jpg"
    synthetic_photo(64, 48, seed=2).save(path, quality=95, exif=exif)
    decoded = decode(path, ImagingOptions(exif_transpose=True))
    assert decoded.image.size == (48, 64) and (decoded.width, decoded.height) == (48, 64)
    for orientation in (0, 9, 65535):  # out of range: shown as stored
        odd = tmp_path / f"odd{orientation}.jpg"
        synthetic_photo(64, 48, seed=2).save(odd, exif=exif.replace(
            struct.pack("<HH", 6, 0), struct.pack("<HH", orientation, 0)))
        assert decode(odd, ImagingOptions(exif_transpose=True)).image.size == (64, 48)
