"""AdaRound's optimisation for one layer (Nagel et al., 2020, "Up or Down? Adaptive Rounding for
Post-Training Quantization"), on the layer's streamed moments.

Each weight rounds down or up: W' = s * clamp(floor(W / s) + h(V), qmin, qmax), with the rectified sigmoid
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), V learned by Adam from h = the fractional part
(round-to-nearest's neighbourhood). Loss: the reconstruction error of the layer's output over the streamed
rows, normalised by its value at round-to-nearest, plus lambda * mean(1 - |2h - 1|^beta), beta annealed
from 20 to 2 after a warm-up without it, which drives every h to 0 or 1 (with the loss normalised so,
lambda = 10 lets the regulariser win by the end: 0.01, the paper's value for an unnormalised loss, leaves
h fractional and the final hard rounding undoes the optimisation). The gradient of the quadratic
reconstruction is written out (2 (D G - R) with D = W' - W: one batched matrix product per step, no
autograd; with fewer rows than fan-in, (D X^T) X on the kept rows instead) and the optimisation runs in
numpy, float32 (no torch import: three seconds of a tiny model's whole run).

The result is rounded hard (h >= 0.5) and kept only if its reconstruction error, computed in float64,
is below round-to-nearest's; otherwise round-to-nearest stays. With `centered`, the error is measured
after each output's mean is removed, because the caller moves that mean into the bias (bias correction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gram import LayerMoments

__all__ = ["SolveSettings", "solve_layer", "reconstruction_error", "quadratic"]

_ZETA, _GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class SolveSettings:
    iterations: int = 300
    learning_rate: float = 0.01
    regularization: float = 10.0
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    # Multiply-accumulates one layer may spend (the steps of a large 1x1 conv cost M K^2 each): big layers
    # get fewer steps, never fewer than `min_iterations`. Counted, not timed, so results are reproducible.
    work_limit: float = 2e10
    min_iterations: int = 50


def quadratic(m: LayerMoments, centered: bool):
    """(G, P, c) of the loss sum ||W' x - t||^2, optionally with the per-output means removed."""
    if m.rows is not None:
        x, t = m.rows.astype(np.float64), m.targets.astype(np.float64)
        gram = np.matmul(np.swapaxes(x, 1, 2), x)
        cross = np.matmul(np.swapaxes(x, 1, 2), t)
    else:
        gram, cross = m.gram, m.cross
    c = m.sum_tt
    if centered and m.n:
        mx, mt = m.sum_x / m.n, m.sum_t / m.n
        gram = gram - m.n * mx[:, :, None] * mx[:, None, :]
        cross = cross - m.n * mx[:, :, None] * mt[:, None, :]
        c = c - m.n * float((mt * mt).sum())
    return gram, cross, c


def reconstruction_error(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, c: float) -> float:
    """sum ||W x - t||^2 for W [g, M, K] (float64)."""
    wg = np.matmul(w, gram)
    return float((w * wg).sum() - 2 * (w * np.swapaxes(cross, 1, 2)).sum() + c)


def solve_layer(
    w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, m: LayerMoments, *, centered: bool,
    settings: SolveSettings, seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Integer weights [g, M, K] for the float weight `w` [g, M, K] on the grid `scale` (broadcastable);
    returns (q, report) with the errors at round-to-nearest and after."""
    gram, cross, c = quadratic(m, centered)
    nearest = np.clip(np.round(w / scale), qmin, qmax)
    e_near = reconstruction_error(nearest * scale, gram, cross, c)
    report = {"rows": m.n, "error_nearest": e_near, "kept": "nearest"}
    if not np.isfinite(e_near) or e_near <= 0 or settings.iterations <= 0:
        report["error_adaround"] = e_near
        return nearest, report
    f32 = np.float32
    scaled = w / scale
    floor = np.floor(scaled)
    # Weights whose floor or ceiling falls outside the integer range stay at round-to-nearest.
    free = ((floor >= qmin) & (floor + 1 <= qmax)).astype(f32)
    rest = np.clip(scaled - floor, 0.01, 0.99)
    v = (-np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).astype(f32)
    s32 = np.broadcast_to(scale, w.shape).astype(f32)
    base = (floor * scale - w).astype(f32)  # D = W' - W = s (floor + h) - W = base + s h
    fixed = ((1 - free) * (nearest - floor)).astype(f32)
    # Gradient of the reconstruction in W': 2 (W' G - P^T) = 2 (D G - R), D = W' - W, R = P^T - W G.
    r32 = (np.swapaxes(cross, 1, 2) - np.matmul(w, gram)).astype(f32)
    if m.rows is not None and m.rows.shape[1] < w.shape[2]:  # G = X^T X of few rows: use X itself
        x = m.rows.astype(np.float64)
        if centered:
            x = x - m.sum_x[:, None, :] / m.n
        x32 = x.astype(f32)
        x32t = np.ascontiguousarray(np.swapaxes(x32, 1, 2))
        times_gram = lambda d: np.matmul(np.matmul(d, x32t), x32)  # noqa: E731
    else:
        g32 = gram.astype(f32)
        times_gram = lambda d: np.matmul(d, g32)  # noqa: E731
    norm = f32(2.0 / e_near)
    adam_m, adam_v = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, settings.learning_rate
    count = v.size
    per_step = float(np.prod(w.shape)) * (2 * m.rows.shape[1] if m.rows is not None and m.rows.shape[1] < w.shape[2]
                                           else w.shape[2])
    iterations = int(min(settings.iterations, max(settings.min_iterations, settings.work_limit // max(per_step, 1))))
    report["iterations"] = iterations
    warm = int(settings.warmup * iterations)
    span = f32(_ZETA - _GAMMA)
    # One Adam step per iteration, written with preallocated buffers (in-place numpy operations in the
    # order the formulas read, so every value is the same IEEE result as the plain expressions: the
    # learned rounding does not change; this loop is a third of sequential AdaRound's time).
    sig, h_raw, h_free, d, u, grad_v, tmp = (np.empty_like(v) for _ in range(7))
    mask = np.empty(v.shape, dtype=bool)
    for step in range(iterations):
        np.negative(v, out=tmp)  # sig = 1 / (1 + exp(-v))
        np.exp(tmp, out=tmp)
        tmp += 1.0
        np.divide(1.0, tmp, out=sig)
        np.multiply(sig, span, out=h_raw)  # h_raw = sig * span + gamma
        h_raw += f32(_GAMMA)
        np.clip(h_raw, 0, 1, out=h_free)
        np.multiply(h_free, free, out=tmp)  # d = base + s (h free + fixed)
        tmp += fixed
        tmp *= s32
        np.add(base, tmp, out=d)
        grad_h = times_gram(d)  # grad_h = norm (D G - R) s
        grad_h -= r32
        grad_h *= norm
        grad_h *= s32
        if step >= warm:
            progress = (step - warm) / max(iterations - warm, 1)
            beta = settings.beta[0] + (settings.beta[1] - settings.beta[0]) * progress
            np.multiply(h_free, 2, out=u)  # u = 2 h - 1; grad_h -= c |u|^(beta - 1) sign(u)
            u -= 1
            np.abs(u, out=tmp)
            np.power(tmp, f32(beta - 1), out=tmp)
            tmp *= f32(settings.regularization / count * beta * 2)
            tmp *= np.sign(u)
            grad_h -= tmp
        np.greater(h_raw, 0, out=mask)  # grad_v = grad_h [0 < h_raw < 1] free sig (1 - sig) span
        mask &= h_raw < 1
        np.multiply(grad_h, mask, out=grad_v)
        grad_v *= free
        grad_v *= sig
        np.subtract(1, sig, out=tmp)
        grad_v *= tmp
        grad_v *= span
        adam_m *= b1  # adam_m = b1 m + (1 - b1) g
        np.multiply(grad_v, 1 - b1, out=tmp)
        adam_m += tmp
        adam_v *= b2  # adam_v = b2 v + (1 - b2) g g
        np.multiply(grad_v, 1 - b2, out=tmp)
        tmp *= grad_v
        adam_v += tmp
        step_size = f32(lr * np.sqrt(1 - b2 ** (step + 1)) / (1 - b1 ** (step + 1)))
        np.sqrt(adam_v, out=tmp)  # v -= step adam_m / (sqrt(adam_v) + eps)
        tmp += f32(eps)
        np.multiply(adam_m, step_size, out=grad_v)
        grad_v /= tmp
        v -= grad_v
    h_final = np.clip(1.0 / (1.0 + np.exp(-v.astype(np.float64))) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
    learned = np.where(free > 0, np.clip(floor + (h_final >= 0.5), qmin, qmax), nearest)
    e_learned = reconstruction_error(learned * scale, gram, cross, c)
    report["error_adaround"] = min(e_learned, e_near)
    report["flipped"] = int((learned != nearest).sum())
    if e_learned < e_near:
        report["kept"] = "adaround"
        return learned, report
    return nearest, report
