"""Decode stage: any supported image file -> an RGB PIL image, or an error naming the file."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pillow_heif
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from dinowatch.errors import DinowatchError

pillow_heif.register_heif_opener()

DEFAULT_MAX_PIXELS = 100_000_000
# JPEG draft decoding keeps at least this multiple of the model input, so the BILINEAR
# downscale that follows still averages several source pixels into each output pixel.
DRAFT_FACTOR = 2
SWAPPED_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees


class ImageError(DinowatchError):
    """An image file could not be decoded; the message names the file."""


class ImageTooLarge(ImageError):
    """The image has more pixels than `max_pixels` allows."""


@dataclass(frozen=True)
class ImagingOptions:
    exif_transpose: bool = False  # seed-compatible default; the daemon turns it on
    fast_jpeg: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, already drafted/transposed as the options asked
    width: int  # the file's own size (after EXIF orientation), not the draft's
    height: int


def decode(path: str | Path, options: ImagingOptions = ImagingOptions(), draft_size: int = 224
           ) -> DecodedImage:
    """Open, check and fully decode `path` into RGB.

    Raises FileNotFoundError, PIL.UnidentifiedImageError (not an image), ImageTooLarge, or
    ImageError (truncated, unreadable, a directory, ...).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces PIL's warning with an error naming the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > options.max_pixels:
                    raise ImageTooLarge(f"{path}: {width}x{height} is over the limit of "
                                        f"{options.max_pixels:,} pixels (imaging.max_pixels)")
                if options.fast_jpeg and image.format == "JPEG":
                    image.draft("RGB", (DRAFT_FACTOR * draft_size, DRAFT_FACTOR * draft_size))
                image.load()
                if options.exif_transpose:
                    if image.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPED_AXES:
                        width, height = height, width
                    rgb = to_rgb(ImageOps.exif_transpose(image))
                else:
                    rgb = to_rgb(image)
    except (FileNotFoundError, UnidentifiedImageError, ImageError):
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{path}: {err}") from err
    except IsADirectoryError as err:
        raise ImageError(f"{path}: is a directory, not an image") from err
    except PermissionError as err:
        raise ImageError(f"{path}: permission denied") from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL's truncated/corrupt-data errors
        raise ImageError(f"{path}: cannot decode: {err}") from err
    return DecodedImage(rgb, width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """The seed's `convert("RGB")`, except for 16-bit grey, which PIL would clip to white."""
    if image.mode.startswith("I"):
        image = image.convert("I").point(lambda v: v * (1 / 257), "L")  # 0..65535 -> 0..255
    return image if image.mode == "RGB" else image.convert("RGB")
