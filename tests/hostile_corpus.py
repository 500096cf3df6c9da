"""A corpus of hostile files (and the good images among them) for the daemon's intake.

`build_corpus()` describes every file: its exact name (bytes), how to make it, and which end
state the daemon must give it. `materialize()` writes the corpus into a staging folder and
`move_in()` renames it into a watched folder in one burst (same filesystem, so each file
arrives complete). Run as a script to write a corpus for a look by hand:

    python tests/hostile_corpus.py /tmp/corpus

Everything is generated: seeded pictures (`dinowatch.testing.synthetic_photo`), PNG chunks
written with struct/zlib and correct CRCs, decompression bombs whose zlib streams are built
block by block (a 1 GiB text chunk costs ~1 MB here), and a sparse file that is large only on
paper.
"""

from __future__ import annotations

import io
import os
import random
import struct
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from dinowatch.testing import synthetic_photo

DONE, FAILED, DELETED = "done", "failed", "deleted"
# No row at all: only for a file that left before the daemon could see it (when inotify's
# queue overflows, its arrival and departure are both lost and the rescan finds nothing).
ABSENT = "absent"
DONE_OR_FAILED = frozenset({DONE, FAILED})

# File kinds: how `materialize` makes the entry.
FILE, SYMLINK, FIFO, UNREADABLE, VANISHING, SPARSE = (
    "file", "symlink", "fifo", "unreadable", "vanishing", "sparse")

FLIP_FORMATS = ("jpeg", "png", "gif", "webp", "tiff", "bmp")
FLIP_EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif", "webp": "webp", "tiff": "tif",
                   "bmp": "bmp"}
FLIPS_PER_FORMAT = 25
FLIP_WINDOW = 64  # bit flips land within the first bytes: the headers
BOMB_ZEROS = 1 << 30  # what the text and ICC chunk bombs inflate to


@dataclass(frozen=True)
class Entry:
    """One file of the corpus and what the daemon must make of it."""

    name: bytes  # the exact file name in the watched folder
    group: str  # good, truncated, bitflip, extension, empty, bomb, odd, special, name
    expect: frozenset[str]  # the allowed end states
    data: bytes = b""
    kind: str = FILE
    target: bytes | None = None  # SYMLINK: the link's (relative) target
    size: int = 0  # SPARSE: the file's length
    errors: frozenset[str] = frozenset()  # FAILED: the allowed `error` kinds (empty: any)
    dims: tuple[int, int] | None = None  # DONE: the payload's width and height

    @property
    def good(self) -> bool:
        return self.group == "good"

    @property
    def label(self) -> str:
        """The name for messages (repr shows newlines and undecodable bytes)."""
        return repr(self.name)[1:]


# ---- pictures -------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int, fmt: str = "JPEG", **options: object) -> bytes:
    image = synthetic_photo(width, height, seed=seed)
    if fmt == "JPEG":
        options.setdefault("quality", 88)
    return encode(image, fmt, **options)


def frames(width: int, height: int, seed: int, count: int = 3) -> list[Image.Image]:
    return [synthetic_photo(width, height, seed=seed + i) for i in range(count)]


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# ---- PNG by hand ----------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes, *, length: int | None = None) -> bytes:
    """One chunk with a correct CRC; `length` overrides the declared length (a liar)."""
    declared = len(data) if length is None else length
    return struct.pack(">I", declared) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type,
                                          0, 0, 0))


def png_idat_rows(width: int, rows: int) -> bytes:
    """IDAT holding `rows` black RGB scanlines (filter byte 0)."""
    return png_chunk(b"IDAT", zlib.compress(bytes((1 + 3 * width) * rows)))


def png_file(width: int, height: int, *extra: bytes, rows: int | None = None) -> bytes:
    """IHDR, the `extra` chunks (before the pixels), IDAT, IEND."""
    return b"".join([PNG_SIGNATURE, png_ihdr(width, height), *extra,
                     png_idat_rows(width, height if rows is None else rows),
                     png_chunk(b"IEND", b"")])


@cache
def zlib_of_zeros(count: int = BOMB_ZEROS) -> bytes:
    """A valid zlib stream that inflates to `count` zero bytes, built without holding them.

    After a full flush deflate's state is reset, so compressing 1 MiB of zeros gives the same
    block every time: the stream is one header, that block repeated, an empty final block
    and the Adler-32 of `count` zeros (a = 1, b = count mod 65521).
    """
    step = 1 << 20
    assert count % step == 0
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(step)) + compressor.flush(zlib.Z_FULL_FLUSH)
    header, block = first[:2], first[2:]
    final = compressor.flush(zlib.Z_FINISH)[:-4]  # the empty last block, without its checksum
    return header + block * (count // step) + final + struct.pack(">I", (count % 65521) << 16 | 1)


# ---- other formats by hand ------------------------------------------------------------------

def gif_with_screen(width: int, height: int) -> bytes:
    """A valid 8x8 GIF whose logical screen claims `width` x `height`."""
    data = bytearray(encode(Image.new("P", (8, 8), 3), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bitflips(data: bytes, count: int, rng: random.Random) -> list[tuple[int, int, bytes]]:
    """`count` distinct single-bit flips within the first FLIP_WINDOW bytes: (offset, bit,
    flipped bytes)."""
    window = min(FLIP_WINDOW, len(data))
    places = rng.sample([(offset, bit) for offset in range(window) for bit in range(8)], count)
    flipped = []
    for offset, bit in sorted(places):
        copy = bytearray(data)
        copy[offset] ^= 1 << bit
        flipped.append((offset, bit, bytes(copy)))
    return flipped


# ---- the corpus -----------------------------------------------------------------------------

def build_corpus(seed: int = 7) -> list[Entry]:
    """Every entry of the corpus, in a stable order (names are unique)."""
    rng = random.Random(seed)
    entries: list[Entry] = []

    def add(name: str | bytes, group: str, expect: Iterable[str], data: bytes = b"",
            **fields: object) -> None:
        raw = name if isinstance(name, bytes) else name.encode()
        entries.append(Entry(raw, group, frozenset(expect), data, **fields))

    def good(name: str | bytes, data: bytes, dims: tuple[int, int],
             group: str = "good") -> None:
        add(name, group, {DONE}, data, dims=dims)

    # good images, some of them under hostile names (valid or invalid UTF-8)
    for i in range(8):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")][i % 4]
        good(f"good{i:02d}.{ext}", photo(320 + 8 * i, 240, seed=1000 + i, fmt=fmt),
             (320 + 8 * i, 240))
    good("with space.jpg", photo(300, 200, seed=1100), (300, 200))
    good("  lots   of   spaces  .png", photo(200, 300, seed=1101, fmt="PNG"), (200, 300))
    good("new\nline.jpg", photo(256, 256, seed=1102), (256, 256))
    good("tab\there.jpg", photo(240, 160, seed=1103), (240, 160))
    good(b"caf\xe9.jpg", photo(310, 210, seed=1104), (310, 210))  # Latin-1: not UTF-8
    good(b"\xff\xfe\x80 raw.png", photo(210, 310, seed=1105, fmt="PNG"), (210, 310))
    good("caf\\xe9.jpg", photo(330, 220, seed=1106), (330, 220))  # looks like the one above
    good("café-utf8.jpg", photo(290, 190, seed=1107), (290, 190))
    good("emoji 📷.webp", photo(280, 280, seed=1108, fmt="WEBP"), (280, 280))
    good("twin of good00.jpg", photo(320, 240, seed=1000), (320, 240))  # same bytes as good00
    good("UPPER.JPG", photo(250, 250, seed=1109), (250, 250))

    # truncated at every 10 % of their length
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        whole = photo(320, 240, seed=2000, fmt=fmt)
        for percent in range(10, 100, 10):
            add(f"truncated_{ext}_{percent}.{ext}", "truncated", DONE_OR_FAILED,
                whole[: len(whole) * percent // 100])

    # single bit flips in the headers
    bases = {
        "jpeg": photo(64, 48, seed=3000),
        "png": photo(64, 48, seed=3001, fmt="PNG"),
        "gif": encode(synthetic_photo(64, 48, seed=3002).convert("P"), "GIF"),
        "webp": photo(64, 48, seed=3003, fmt="WEBP"),
        "tiff": photo(64, 48, seed=3004, fmt="TIFF"),
        "bmp": photo(64, 48, seed=3005, fmt="BMP"),
    }
    for fmt in FLIP_FORMATS:
        ext = FLIP_EXTENSIONS[fmt]
        for offset, bit, data in bitflips(bases[fmt], FLIPS_PER_FORMAT, rng):
            add(f"bitflip_{fmt}_{offset:02d}_{bit}.{ext}", "bitflip", DONE_OR_FAILED, data)

    # the extension lies
    good("png_named.jpg", photo(120, 90, seed=4000, fmt="PNG"), (120, 90), group="extension")
    good("jpeg_named.png", photo(90, 120, seed=4001), (90, 120), group="extension")
    good("gif_named.tiff", encode(synthetic_photo(70, 50, seed=4002).convert("P"), "GIF"),
         (70, 50), group="extension")
    add("text_named.jpg", "extension", {FAILED},
        b"Just some notes, certainly not a picture.\n" * 20,
        errors=frozenset({"UnidentifiedImageError"}))
    add("html_named.webp", "extension", {FAILED},
        b"<!doctype html><html><head><title>x</title></head><body>hello</body></html>\n",
        errors=frozenset({"UnidentifiedImageError"}))
    add("riff_not_webp.webp", "extension", {FAILED}, b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(8),
        errors=frozenset({"UnidentifiedImageError"}))

    # empty files
    for name in ("empty.jpg", "empty.png", "empty.gif", "empty.webp"):
        add(name, "empty", DONE_OR_FAILED)

    # decompression bombs and liars
    too_large = frozenset({"ImageTooLarge"})
    add("bomb_ihdr_100000x100000.png", "bomb", {FAILED}, png_file(100_000, 100_000, rows=1),
        errors=too_large)
    add("bomb_ihdr_5000x5000.png", "bomb", {FAILED}, png_file(5000, 5000, rows=1),
        errors=too_large)  # over our 20 MP, under Pillow's own 2x limit
    add("bomb_gif_screen_65535x65535.gif", "bomb", {FAILED}, gif_with_screen(65535, 65535),
        errors=too_large)
    add("bomb_ztxt_1gib.png", "bomb", {FAILED},
        png_file(8, 8, png_chunk(b"zTXt", b"Comment\0\0" + zlib_of_zeros())),
        errors=frozenset({"ImageError"}))
    add("bomb_iccp_1gib.png", "bomb", {FAILED},
        png_file(8, 8, png_chunk(b"iCCP", b"ICC Profile\0\0" + zlib_of_zeros())),
        errors=frozenset({"ImageError"}))
    add("liar_chunk_length_2gib.png", "bomb", {FAILED},
        png_file(8, 8, png_chunk(b"tEXt", b"Comment\0hello", length=0x7FFFFFF0)),
        errors=frozenset({"ImageError"}))
    add("sparse_300mb.jpg", "bomb", {FAILED}, photo(64, 48, seed=5000), kind=SPARSE,
        size=300 << 20, errors=too_large)  # over max_pixels * 8 + 64 MB: refused unread

    # odd but valid
    odd = "odd"
    good("tiny_1x1.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1), odd)
    good("tiny_1x1.jpg", encode(Image.new("RGB", (1, 1), (10, 200, 10)), "JPEG"), (1, 1), odd)
    good("tiny_1x1.gif", encode(Image.new("P", (1, 1), 5), "GIF"), (1, 1), odd)
    good("wide_30000x1.png", encode(synthetic_photo(30000, 1, seed=6000), "PNG"), (30000, 1),
         odd)
    good("tall_1x30000.png", encode(synthetic_photo(1, 30000, seed=6001), "PNG"), (1, 30000),
         odd)
    anim = frames(96, 64, seed=6002)
    good("animated.gif", encode(anim[0], "GIF", save_all=True, append_images=anim[1:],
                                duration=100, loop=0), (96, 64), odd)
    good("animated.webp", encode(anim[0], "WEBP", save_all=True, append_images=anim[1:],
                                 duration=100, loop=0), (96, 64), odd)
    good("cmyk.jpg", encode(synthetic_photo(200, 150, seed=6003).convert("CMYK"), "JPEG"),
         (200, 150), odd)
    good("progressive.jpg", photo(400, 300, seed=6004, progressive=True), (400, 300), odd)
    gray16 = Image.fromarray(
        (np.random.default_rng(6005).integers(0, 65536, (90, 120))).astype(np.uint16))
    assert gray16.mode == "I;16"
    good("gray16.png", encode(gray16, "PNG"), (120, 90), odd)
    pages = frames(80, 60, seed=6006)
    good("multipage.tif", encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
         (80, 60), odd)
    for value in (9, 0, 65535):
        good(f"orientation_{value}.jpg", photo(160, 120, seed=6010 + value % 97,
                                               exif=exif_orientation(value)), (160, 120), odd)
    good("orientation_6.jpg", photo(160, 120, seed=6020, exif=exif_orientation(6)),
         (120, 160), odd)  # the one valid rotation: width and height swap
    good("rgba.png", encode(synthetic_photo(100, 80, seed=6030).convert("RGBA"), "PNG"),
         (100, 80), odd)
    good("bilevel.bmp", encode(synthetic_photo(100, 80, seed=6031).convert("1"), "BMP"),
         (100, 80), odd)
    good("trailing_garbage.jpg", photo(150, 100, seed=6032) + b"\0garbage" * 100, (150, 100),
         odd)

    # not regular files, or not there for long
    add("loop_a.jpg", "special", {FAILED}, kind=SYMLINK, target=b"loop_b.jpg",
        errors=frozenset({"OSError", "FileNotFoundError"}))  # dangles until loop_b arrives
    add("loop_b.jpg", "special", {FAILED}, kind=SYMLINK, target=b"loop_a.jpg",
        errors=frozenset({"OSError", "FileNotFoundError"}))
    add("self_loop.jpg", "special", {FAILED}, kind=SYMLINK, target=b"self_loop.jpg",
        errors=frozenset({"OSError"}))
    add("dangling.jpg", "special", {FAILED}, kind=SYMLINK, target=b"no such target.jpg",
        errors=frozenset({"FileNotFoundError"}))
    add("fifo.jpg", "special", {FAILED}, kind=FIFO, errors=frozenset({"ImageError"}))
    add("unreadable.jpg", "special", {FAILED}, photo(64, 48, seed=7000), kind=UNREADABLE,
        errors=frozenset({"PermissionError"}))
    add(b"unreadable caf\xe9.png", "special", {FAILED}, photo(64, 48, seed=7001, fmt="PNG"),
        kind=UNREADABLE, errors=frozenset({"PermissionError"}))
    add("vanishing.jpg", "special", {DELETED, ABSENT}, photo(64, 48, seed=7002),
        kind=VANISHING)

    # bad content under names that are not UTF-8
    add(b"notes \xe9t\xe9.jpg", "name", {FAILED}, b"not a picture",
        errors=frozenset({"UnidentifiedImageError"}))
    add(b"half\xff.jpg", "name", {FAILED}, photo(320, 240, seed=8000)[:3000],
        errors=frozenset({"ImageError"}))

    names = [entry.name for entry in entries]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return entries


def bytes_path(folder: Path, name: bytes) -> bytes:
    """`folder/name` as bytes: the os calls below take names that are not UTF-8 verbatim,
    which is why they are not pathlib calls."""
    return os.fsencode(folder) + b"/" + name


def materialize(entries: Iterable[Entry], staging: Path) -> None:
    """Create every entry in `staging` (a folder on the watched folder's filesystem)."""
    for entry in entries:
        path = bytes_path(staging, entry.name)
        if entry.kind == SYMLINK:
            assert entry.target is not None
            os.symlink(entry.target, path)  # noqa: PTH211
        elif entry.kind == FIFO:
            os.mkfifo(path)
        else:
            with open(path, "wb") as file:
                file.write(entry.data)
                if entry.kind == SPARSE:
                    file.truncate(entry.size)
            if entry.kind == UNREADABLE:
                os.chmod(path, 0)  # noqa: PTH101


def move_in(entries: Iterable[Entry], staging: Path, folder: Path) -> None:
    """Rename every entry from `staging` into `folder`, in one burst; VANISHING entries are
    deleted right after they arrive."""
    for entry in entries:
        target = bytes_path(folder, entry.name)
        os.rename(bytes_path(staging, entry.name), target)  # noqa: PTH104
        if entry.kind == VANISHING:
            os.unlink(target)  # noqa: PTH108


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} EMPTY_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [entry for entry in build_corpus() if entry.kind != VANISHING]
    materialize(corpus, folder)
    print(f"{len(corpus)} files in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
