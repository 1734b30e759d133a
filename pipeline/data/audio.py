"""Data kind `audio`: a folder of WAV files cut into fixed-length windows.

    calibration:
      data: {kind: audio, path: ../clips, sample_rate: 16000, window: 16000, hop: 8000, mono: true,
             normalize: none, split: {seed: 0, validation: 0.3}}

Per file, in this order: read the WAV (PCM 8/16/24/32-bit integer or 32/64-bit float, any channel count;
read with the standard library, no codec needed); integers to float in [-1, 1) (divided by 2^(bits-1),
8-bit is unsigned around 128); `mono: true` averages the channels; resample to `sample_rate` when the file
has another rate (polyphase, scipy); `normalize: peak` scales the file so its largest |sample| is 1
(`none` keeps the level the model would hear); cut windows of `window` samples every `hop` samples (a
last partial window is zero-padded with `pad_last: true`, else dropped). A window is
`[channels, window]` (`[window]` when mono) reshaped to one sample of the input: the input, without its
batch axis, must hold exactly that many values with the time axis last (`[1, 16000]`, `[1, 1, 16000]`,
`[16000]` with `batch: false`...). A batch of B takes B consecutive windows.

Files are the folder's `*.wav` in sorted name order (or one `.wav` file); `split` splits the files, so
windows of one recording never land in both parts. Each file starts a new sequence for recurrent states.
Windows are made one file at a time while the source is iterated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from ..core.fileio import sha256_file
from ..core.schema import StrictModel
from ..errors import DataError
from .base import Batch, DataKind, DataSource, OpenContext, SplitSettings, register_data_kind, split_part

__all__ = ["AudioData", "read_wav"]


class AudioData(StrictModel):
    """A folder of WAV files (or one file) cut into windows (see the module docstring)."""

    kind: Literal["audio"]
    path: Path
    input: str | None = None
    sample_rate: Annotated[int, Field(ge=1)] | None = None  # None: the files' own (they must agree)
    window: Annotated[int, Field(ge=1)] | None = None  # samples per window; None: the input's last dim
    hop: Annotated[int, Field(ge=1)] | None = None  # None: = window (no overlap)
    mono: bool = True
    normalize: Literal["none", "peak"] = "none"
    pad_last: bool = False
    split: SplitSettings | None = None


_FORMATS = {1: "pcm", 3: "float", 0xFFFE: "extensible"}


def _header(path: Path, where: str) -> tuple[str, int, int, int, int, int]:
    """(kind, channels, rate, bits, data offset, frames) from the RIFF chunks, without reading the samples."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                raise DataError(f"{where}: {path} is not a WAV file (no RIFF/WAVE header)")
            fmt = data = None
            while fmt is None or data is None:
                chunk = handle.read(8)
                if len(chunk) < 8:
                    break
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = handle.read(size)
                    handle.seek(size & 1, 1)
                elif name == b"data":
                    data = (handle.tell(), size)
                    handle.seek(size + (size & 1), 1)
                else:
                    handle.seek(size + (size & 1), 1)  # chunks are word-aligned
            end = handle.seek(0, 2)
    except OSError as err:
        raise DataError(f"{where}: {path} cannot be read ({err.strerror or err})") from None
    if fmt is None or data is None or len(fmt) < 16:
        raise DataError(f"{where}: {path} is a damaged WAV file (no 'fmt ' or 'data' chunk)")
    tag, channels, rate, _, block, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the plain format tag
    kind = _FORMATS.get(tag)
    if kind not in ("pcm", "float") or channels == 0 or bits not in (8, 16, 24, 32, 64) or block != channels * bits // 8:
        raise DataError(f"{where}: {path}: WAV format {tag} with {bits}-bit samples is not supported "
                        "(PCM 8/16/24/32-bit or float 32/64-bit; convert it, e.g. with sox or ffmpeg)")
    offset, size = data
    return kind, channels, rate, bits, offset, min(size, end - offset) // block


def read_wav(path: Path, *, where: str) -> tuple[np.ndarray, int]:
    """(float32 samples [frames, channels], sample rate) of a RIFF/WAVE file."""
    kind, channels, rate, bits, offset, frames = _header(path, where)
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(frames * channels * bits // 8)
    if kind == "float":
        samples = np.frombuffer(data, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        samples = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 24:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        samples = (((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 8).astype(np.float32) / 2.0**23
    else:
        samples = np.frombuffer(data, "<i2" if bits == 16 else "<i4").astype(np.float32) / 2.0 ** (bits - 1)
    if not np.isfinite(samples).all():
        raise DataError(f"{where}: {path} holds NaN/inf samples")
    return samples.reshape(frames, channels), rate


def _window_count(frames: int, window: int, hop: int, pad_last: bool) -> int:
    count = (frames - window) // hop + 1 if frames >= window else 0
    if pad_last and frames > 0 and (frames < window or (frames - window) % hop):
        count += 1
    return count


def _files(path: Path, section: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{section}.data.path: {path} is neither a folder of .wav files nor a .wav file")
    files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".wav" and p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.name)
    if not files:
        raise DataError(f"{section}.data.path: {path} holds no .wav files")
    return files


def _target(data: AudioData, inputs: list, section: str):
    by_name = {s.name: s for s in inputs}
    if data.input is not None and data.input not in by_name:
        raise DataError(f"{section}.data.input: '{data.input}' is not a model input fed by data ({', '.join(by_name)})")
    target = by_name[data.input] if data.input is not None else inputs[0]
    if len(inputs) > 1:
        raise DataError(f"{section}.data: audio feeds one input ('{target.name}'); the model's other inputs "
                        f"({', '.join(n for n in by_name if n != target.name)}) would get no data "
                        "(give them a value: or from_output:, or use npz or builder data)")
    return target


def _geometry(spec, data: AudioData, section: str) -> tuple[int, list[int], int, int]:
    """(windows per sample, shape of one window, window, hop)."""
    shape = list(spec.shape)
    batch = shape[0] if spec.has_batch else 1
    one = shape[1:] if spec.has_batch else shape
    if not one:
        raise DataError(f"{section}.data: input '{spec.name}' {shape} has no time axis for audio windows")
    window = data.window or one[-1]
    if one[-1] != window:
        raise DataError(f"{section}.data.window: {window} samples, input '{spec.name}' {shape} takes {one[-1]} "
                        "on its last (time) axis")
    if math.prod(one) % window:
        raise DataError(f"{section}.data: input '{spec.name}' {shape} is not a whole number of {window}-sample windows")
    channels = math.prod(one) // window
    if data.mono and channels != 1:
        raise DataError(f"{section}.data.mono: input '{spec.name}' {shape} takes {channels} channels per window; "
                        "set mono: false to keep the files' channels")
    return batch, one, window, data.hop or window


def _windows(file: Path, data: AudioData, window: int, hop: int, channels: int, section: str) -> list[np.ndarray]:
    samples, rate = read_wav(file, where=f"{section}.data")
    if data.mono:
        samples = samples.mean(axis=1, keepdims=True)
    elif samples.shape[1] != channels:
        raise DataError(f"{section}.data: {file} has {samples.shape[1]} channel(s), the input takes {channels}")
    if data.sample_rate is not None and rate != data.sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, data.sample_rate)
        samples = resample_poly(samples, data.sample_rate // g, rate // g, axis=0).astype(np.float32)
    if data.normalize == "peak" and samples.size and np.abs(samples).max() > 0:
        samples = samples / np.abs(samples).max()
    frames = samples.shape[0]
    count = _window_count(frames, window, hop, data.pad_last)
    samples = np.pad(samples, ((0, max(0, (count - 1) * hop + window - frames)), (0, 0)))
    return [np.ascontiguousarray(samples[i * hop : i * hop + window].T) for i in range(count)]


def _open(data: AudioData, ctx: OpenContext) -> DataSource:
    section = ctx.section
    spec = _target(data, ctx.inputs, section)
    if np.dtype(spec.dtype).kind != "f":
        raise DataError(f"{section}.data: audio feeds float samples; input '{spec.name}' is {spec.dtype}")
    batch, one, window, hop = _geometry(spec, data, section)
    channels = math.prod(one) // window
    files = _files(ctx.resolve(data.path), section)
    files = [files[i] for i in split_part(len(files), data.split, section, unit="file")]
    rates = set()
    plan: list[tuple[Path, int]] = []  # (file, windows it gives), from the headers alone
    for file in files:
        _, file_channels, rate, _, _, frames = _header(file, f"{section}.data")
        if not data.mono and file_channels != channels:
            raise DataError(f"{section}.data: {file} has {file_channels} channel(s), the input takes {channels}")
        if data.sample_rate is not None and rate != data.sample_rate:  # resample_poly's output length
            g = math.gcd(rate, data.sample_rate)
            frames = -(-frames * (data.sample_rate // g) // (rate // g))
        rates.add(rate)
        plan.append((file, _window_count(frames, window, hop, data.pad_last)))
    if data.sample_rate is None and len(rates) > 1:
        raise DataError(f"{section}.data.sample_rate: the files have different rates ({sorted(rates)}); "
                        "set sample_rate to the model's and they are resampled to it")
    total = sum(n for _, n in plan) // batch
    count = min(ctx.limit, total)
    if count == 0:
        raise DataError(f"{section}.data: {ctx.resolve(data.path)} gives no {window}-sample window "
                        "(files shorter than a window: set pad_last: true, or a smaller window)")
    starts, first = set(), 0
    for _, n in plan:  # the sample that holds each file's first window starts a sequence
        starts.add(first // batch)
        first += n

    def batches() -> Iterator[Batch]:
        pending: list[np.ndarray] = []
        made = 0
        for file, _ in plan:
            for w in _windows(file, data, window, hop, channels, section):
                pending.append(w.reshape(one))
                if len(pending) == batch:
                    stacked = np.stack(pending) if spec.has_batch else pending[0]
                    yield {spec.name: stacked.astype(spec.dtype)}
                    pending, made = [], made + 1
                    if made == count:
                        return

    return DataSource(f"{ctx.resolve(data.path).name} ({len(files)} WAV files)", ctx.inputs, count, batches,
                      starts=frozenset(s for s in starts if s < count))


def _fingerprint(data: AudioData, ctx: OpenContext) -> dict:
    import hashlib

    path = ctx.resolve(data.path)
    if path.is_file():
        return {"data": sha256_file(path)}
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(path.glob("*")):
            if file.suffix.lower() == ".wav" and file.is_file():
                digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return {"data": digest.hexdigest() if path.is_dir() else str(path)}


register_data_kind(DataKind("audio", AudioData, _open, _fingerprint))
