"""Error metrics between a reference (float) tensor and a test (quantized) one, streamed.

One definition of SQNR and cosine for the whole pipeline: validation, per-layer error, the fallback's
sensitivity ranking. Sums are accumulated in float64 sample by sample, so memory does not grow with the
number of samples. SQNR is capped at 200 dB (identical tensors), the cap standing in for "no error".
"""

from __future__ import annotations

import numpy as np

__all__ = ["SQNR_CAP_DB", "ErrorSums", "OutputAccumulator", "compare_outputs", "sqnr_db", "nearest_neighbours"]

SQNR_CAP_DB = 200.0


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), capped at SQNR_CAP_DB (and SQNR_CAP_DB when there is no noise)."""
    if noise <= 0:
        return SQNR_CAP_DB
    with np.errstate(divide="ignore"):
        return float(min(10 * np.log10(signal / noise), SQNR_CAP_DB)) if signal > 0 else float(10 * np.log10(1e-300))


class ErrorSums:
    """Running sums over flattened tensors: signal, noise, dot product, test energy, max |error|."""

    __slots__ = ("signal", "noise", "dot", "energy", "max_abs")

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.energy = self.max_abs = 0.0

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        # float64 accumulation without float64 copies of the inputs, and no BLAS: ddot on converted copies
        # was 5x slower per layer (and far worse when BLAS threads compete with onnxruntime's).
        ref, got = np.asarray(ref).reshape(-1), np.asarray(got).reshape(-1)
        err = np.subtract(got, ref, dtype=np.float64)
        self.signal += float(np.einsum("i,i->", ref, ref, dtype=np.float64))
        self.noise += float(np.einsum("i,i->", err, err))
        self.dot += float(np.einsum("i,i->", ref, got, dtype=np.float64))
        self.energy += float(np.einsum("i,i->", got, got, dtype=np.float64))
        if err.size:
            self.max_abs = max(self.max_abs, float(np.abs(err, out=err).max()))

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        """Cosine of the concatenated tensors (1.0 when either is all zero)."""
        denom = np.sqrt(self.signal * self.energy)
        return float(self.dot / denom) if denom > 0 else 1.0


class OutputAccumulator:
    """Per-output validation statistics: SQNR and max error over all samples, cosine per sample."""

    def __init__(self) -> None:
        self.sums = ErrorSums()
        self.cosines: list[float] = []

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref64 = ref.astype(np.float64).reshape(len(ref), -1)
        got64 = got.astype(np.float64).reshape(len(got), -1)
        self.sums.update(ref64, got64)
        norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(got64, axis=1)
        dots = (ref64 * got64).sum(axis=1)
        # Two all-zero vectors agree perfectly; one zero vector against a non-zero one does not.
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(dots == 0, 1.0, 0.0))
        self.cosines.extend(float(c) for c in cos)

    def result(self) -> dict:
        sqnr = 10 * np.log10(self.sums.signal / self.sums.noise) if self.sums.noise > 0 else float("inf")
        cos = np.asarray(self.cosines)
        return {
            "sqnr_db": round(float(min(sqnr, SQNR_CAP_DB)), 3),
            "max_abs_error": float(self.sums.max_abs),
            "cosine_mean": float(cos.mean()) if cos.size else 1.0,
            "cosine_min": float(cos.min()) if cos.size else 1.0,
        }


def compare_outputs(refs: list[np.ndarray], gots: list[np.ndarray]) -> dict:
    acc = OutputAccumulator()
    for ref, got in zip(refs, gots):
        acc.update(ref, got)
    return acc.result()


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)
