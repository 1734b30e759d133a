"""Bounded readers for the data kinds: .npz arrays (size from the zip header, only the rows a recipe asks
for held in memory), text lines (length capped while reading), images (pixel count from the header,
before decoding). Each limit is `pipeline.core.limits`' and hit with one DataError naming the file.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..core.limits import exceeded, limit
from ..errors import DataError

__all__ = ["npz_member_sizes", "npz_shape", "read_npz_rows", "read_text_lines", "open_image"]

_CHUNK = 1 << 20
_CRC_CHECKED: set[tuple] = set()  # (path, size, mtime, member) whose whole member passed its CRC check


def npz_member_sizes(path: Path, where: str) -> dict[str, int]:
    """Uncompressed size of each member of an .npz (from the zip directory: nothing is inflated); DataError
    naming the first over the limit."""
    most = limit("npz_member_bytes")
    with zipfile.ZipFile(path) as archive:
        sizes = {info.filename.removesuffix(".npy"): info.file_size for info in archive.infolist()}
    for key, size in sizes.items():
        if size > most:
            raise DataError(exceeded("npz_member_bytes", f"{where}: array '{key}'", size))
    return sizes


def read_npz_rows(path: Path, key: str, max_rows: int, where: str) -> np.ndarray:
    """Array `key` of the .npz at `path` with only its first `max_rows` rows (sample axis first) in memory.

    The size in the zip header is checked first; the rest of the member is then streamed through in
    chunks and dropped, so its CRC is still checked (a damaged file fails here) while memory stays what
    the rows take: a small .npz that inflates to gigabytes costs the rows it feeds, not gigabytes.
    """
    label = f"{where}: array '{key}'"
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            info = archive.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
            if info.file_size > limit("npz_member_bytes"):
                raise DataError(exceeded("npz_member_bytes", label, info.file_size))
            stat = Path(path).stat()
            checked = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, info.filename)
            with archive.open(info) as member:
                array = _read_rows(member, max_rows, label)
                if checked not in _CRC_CHECKED:  # once per file version and process: stages reopen data
                    while member.read(_CHUNK):  # to the end: zipfile checks the CRC there
                        pass
                    _CRC_CHECKED.add(checked)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise DataError(f"{label} is damaged ({err}); rewrite the file") from None
    return array


def npz_shape(path: Path, key: str) -> list[int]:
    """The full shape of array `key` (from its .npy header; for messages about an array read in part)."""
    with zipfile.ZipFile(path) as archive:
        name = f"{key}.npy" if f"{key}.npy" in set(archive.namelist()) else key
        with archive.open(name) as member:
            return list(_header(member, key)[0])


def _header(member, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(member)
        else:
            raise ValueError(f"npy format version {version} (numpy writes 1.0 or 2.0)")
    except ValueError as err:
        raise DataError(f"{label} is not a readable .npy array ({err})") from None
    return shape, fortran, dtype


def _read_rows(member, max_rows: int, label: str) -> np.ndarray:
    shape, fortran, dtype = _header(member, label)
    if dtype.hasobject:
        raise DataError(f"{label} cannot be read without pickle (it holds Python objects); save numbers only")
    whole = fortran or len(shape) == 0
    rows = shape if whole else (min(shape[0], max_rows), *shape[1:])
    count = math.prod(rows)
    data = member.read(count * dtype.itemsize)
    if len(data) < count * dtype.itemsize:
        raise DataError(f"{label} is cut short ({len(data):,} of {count * dtype.itemsize:,} bytes); rewrite the file")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(rows, order="F" if fortran else "C")


def read_text_lines(path: Path, max_lines: int, where: str) -> list[str]:
    """The first `max_lines` non-empty lines (stripped; split as `str.splitlines` does), reading no more of
    the file than they need and no line past the length limit."""
    most = limit("text_line_chars")
    lines: list[str] = []
    number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            while len(lines) < max_lines:
                chunk = handle.readline(most + 2)  # universal newlines: a line ends with "\n"
                if not chunk:
                    break
                number += 1
                if len(chunk.rstrip("\n")) > most:
                    raise DataError(exceeded("text_line_chars", f"{where}, line {number}"))
                lines += [part.strip() for part in chunk.splitlines() if part.strip()]
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"{where} is not readable UTF-8 text ({err})") from None
    return lines[:max_lines]


def open_image(path: Path, where: str):
    """`PIL.Image.open(path)` (header only), refused past the pixel limit before anything is decoded."""
    from PIL import Image

    most = limit("image_pixels")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our check below, with the image's size in the message, replaces Pillow's
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    width, height = image.size
    if width * height > most:
        image.close()
        raise DataError(exceeded("image_pixels", f"{where}: {path} ({width}x{height})", width * height))
    return image
