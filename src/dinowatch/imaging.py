"""Decode stage: any supported image file -> an RGB PIL image, or an error naming the file."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pillow_heif
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from dinowatch.errors import DinowatchError, readable

pillow_heif.register_heif_opener()
# Our own pixel limit replaces this warning with an error naming the file. Set once here:
# warnings.catch_warnings() is not thread-safe, and two decoders run at once.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
PILLOW_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_CHUNK
PILLOW_TEXT_MEMORY = PngImagePlugin.MAX_TEXT_MEMORY

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
# Draft decoding (JPEG DCT scaling, a HEIF's embedded thumbnail) keeps at least this multiple
# of the model input, so the BILINEAR downscale that follows still averages several source
# pixels into each output pixel.
DRAFT_FACTOR = 2
# Pillow's format names for JPEG-coded files: a camera JPEG carrying an MPF preview opens as
# MPO, and libjpeg's DCT scaling applies to it all the same.
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# EXIF tag 0x0112 (Orientation) -> the transpose that shows the picture upright; the same
# table as Pillow's ImageOps.exif_transpose (EXIF 2.32, section 4.6.5). Applied here because
# exif_transpose also rewrites the metadata we discard, and that rewrite raises on malformed
# tags (a rational with a zero denominator: struct.error) that do not affect the pixels.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPPING = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
            Image.Transpose.ROTATE_270}  # these turn the picture by 90 degrees
# The largest plausible file for an image of max_pixels: uncompressed 16-bit RGBA (8 bytes a
# pixel) plus room for metadata. Files above it are refused before they are read.
MAX_BYTES_PER_PIXEL = 8
METADATA_ALLOWANCE = 64 << 20


class ImageError(DinowatchError):
    """An image file could not be decoded; the message names the file."""


class ImageTooLarge(ImageError):
    """The image has more pixels than `max_pixels` allows."""


@dataclass(frozen=True)
class ImagingOptions:
    exif_transpose: bool = False  # seed-compatible default; the daemon turns it on
    fast_jpeg: bool = False  # JPEG/MPO: libjpeg decodes at 1/2, 1/4 or 1/8 scale
    heif_thumbnail: bool = False  # HEIF: decode an embedded thumbnail when one is big enough
    max_pixels: int = DEFAULT_MAX_PIXELS

    def drafts(self, image_format: str | None) -> bool:
        """True if files of this Pillow format are decoded through their draft fast path."""
        return (self.fast_jpeg and image_format in JPEG_FORMATS) or \
            (self.heif_thumbnail and image_format == "HEIF")

    @property
    def max_file_bytes(self) -> int:
        """Larger files are refused unread: memory stays bounded by `max_pixels`."""
        return self.max_pixels * MAX_BYTES_PER_PIXEL + METADATA_ALLOWANCE

    def check_file_size(self, size: int, name: str | Path) -> None:
        """ImageTooLarge, naming the file, if `size` bytes are over `max_file_bytes`."""
        if size > self.max_file_bytes:
            raise ImageTooLarge(f"{readable(name)}: {size:,} bytes is more than an image "
                                f"within imaging.max_pixels can take "
                                f"({self.max_file_bytes:,} bytes)")


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, already drafted/transposed as the options asked
    width: int  # the file's own size (after EXIF orientation), not the draft's
    height: int


def decode(source: str | Path | BinaryIO, options: ImagingOptions = ImagingOptions(),
           draft_size: int = 224, *, name: str | None = None) -> DecodedImage:
    """Open, check and fully decode an image file (a path, or an open binary file) into RGB.

    `name` (default: the path) names the file in error messages. Raises FileNotFoundError,
    PIL.UnidentifiedImageError (not an image), ImageTooLarge (over `max_pixels`), or ImageError
    for anything else the decoder raises on this file (truncated or corrupt data, a directory,
    permissions, and whatever a format plug-in raises on hostile input: struct.error,
    IndexError, MemoryError, ...). The message names the file and the underlying error.
    """
    label = readable(name or (str(source) if isinstance(source, str | Path) else "<image>"))
    _follow_limits(options.max_pixels)
    try:
        with Image.open(source) as opened:
            image: Image.Image = opened
            _check_pixels(label, image.size, options.max_pixels)
            width, height = image.size  # the file's own size, not a draft's
            if options.drafts(image.format):
                # pillow_heif's draft picks the smallest thumbnail that is a scaled copy of
                # the image (same crop, orientation and colour profile) and at least this big.
                image.draft("RGB", (DRAFT_FACTOR * draft_size, DRAFT_FACTOR * draft_size))
            image.load()
            _check_pixels(label, image.size, options.max_pixels)  # some formats resize
            transpose = ORIENTATIONS.get(_orientation(image, label)) \
                if options.exif_transpose else None
            if transpose is not None:
                image = image.transpose(transpose)
                if transpose in SWAPPING:
                    width, height = height, width
            rgb = to_rgb(image)
    except (FileNotFoundError, ImageError):
        raise
    except UnidentifiedImageError as err:  # Pillow's message names a buffer, not the file
        raise UnidentifiedImageError(f"{label}: not an image, or not in a format dinowatch "
                                     "reads") from err
    except Image.DecompressionBombError as err:  # over twice our limit, found by Pillow
        raise ImageTooLarge(f"{label}: over the limit of {options.max_pixels:,} pixels "
                            f"(imaging.max_pixels): {err}") from err
    except IsADirectoryError as err:
        raise ImageError(f"{label}: is a directory, not an image") from err
    except PermissionError as err:
        raise ImageError(f"{label}: permission denied") from err
    except Exception as err:  # a format plug-in parsing hostile bytes may raise anything
        raise ImageError(f"{label}: cannot decode ({_kind(err)}: {err})") from err
    return DecodedImage(rgb, width, height)


def _follow_limits(max_pixels: int) -> None:
    """Make Pillow's own limits follow ours, so `max_pixels` alone decides.

    Pillow refuses images over 2 x MAX_IMAGE_PIXELS (~179 MP by default) before we see their
    size, and PNG text or ICC chunks over MAX_TEXT_CHUNK (1 MiB) however valid the image.
    Our pixel check runs first; metadata may use up to one byte per allowed pixel, and never
    less than Pillow allows by default.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    PngImagePlugin.MAX_TEXT_CHUNK = max(PILLOW_TEXT_CHUNK, max_pixels)
    PngImagePlugin.MAX_TEXT_MEMORY = max(PILLOW_TEXT_MEMORY, max_pixels)


def _check_pixels(label: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label}: {width}x{height} is over the limit of {max_pixels:,} "
                            "pixels (imaging.max_pixels)")


def _orientation(image: Image.Image, label: str) -> int:
    """The EXIF orientation, or 1 (as stored) when the metadata is missing or unreadable."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as err:  # metadata is advisory: the pixels decoded fine
        log.debug("%s: EXIF unreadable, orientation ignored: %s", label, err)
        return 1


def _kind(err: BaseException) -> str:
    """`struct.error`, `ValueError`, ...: the exception's qualified name for messages."""
    module = type(err).__module__
    return type(err).__qualname__ if module in ("builtins", "PIL.Image") else \
        f"{module.rsplit('.', 1)[-1]}.{type(err).__qualname__}"


def to_rgb(image: Image.Image) -> Image.Image:
    """The seed's `convert("RGB")`, except for 16-bit grey, which PIL would clip to white."""
    if image.mode.startswith("I"):
        image = image.convert("I").point(lambda v: v * (1 / 257), "L")  # 0..65535 -> 0..255
    return image if image.mode == "RGB" else image.convert("RGB")


def thumbnail(source: str | Path | BinaryIO, options: ImagingOptions, longest: int,
              *, quality: int = 80) -> bytes:
    """A JPEG of the image no larger than `longest` pixels on its longest side.

    Raises what `decode` raises.
    """
    picture = decode(source, options, max(1, longest // DRAFT_FACTOR)).image
    picture.thumbnail((longest, longest), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue()
