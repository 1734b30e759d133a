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
torch, float32, on the threads it is given.

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
    import torch

    gram, cross, c = quadratic(m, centered)
    nearest = np.clip(np.round(w / scale), qmin, qmax)
    e_near = reconstruction_error(nearest * scale, gram, cross, c)
    report = {"rows": m.n, "error_nearest": e_near, "kept": "nearest"}
    if not np.isfinite(e_near) or e_near <= 0 or settings.iterations <= 0:
        report["error_adaround"] = e_near
        return nearest, report
    torch.manual_seed(seed)
    dtype = torch.float32
    scaled = w / scale
    floor = np.floor(scaled)
    rest = np.clip(scaled - floor, 0.01, 0.99)
    v = torch.tensor(-np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1), dtype=dtype, requires_grad=False)
    s_t = torch.tensor(np.broadcast_to(scale, w.shape).copy(), dtype=dtype)
    floor_t = torch.tensor(floor, dtype=dtype)
    w_t = torch.tensor(w, dtype=dtype)
    # Gradient of the reconstruction in W': 2 (W' G - P^T) = 2 (D G - R), D = W' - W, R = P^T - W G.
    r_t = torch.tensor(np.swapaxes(cross, 1, 2) - np.matmul(w, gram), dtype=dtype)
    if m.rows is not None and m.rows.shape[1] < w.shape[2]:  # G = X^T X of few rows: use X itself
        x = m.rows.astype(np.float64)
        if centered:
            x = x - m.sum_x[:, None, :] / m.n
        x_t = torch.tensor(x, dtype=dtype)
        x_tt = x_t.transpose(1, 2).contiguous()
        times_gram = lambda d: torch.matmul(torch.matmul(d, x_tt), x_t)  # noqa: E731
    else:
        g_t = torch.tensor(gram, dtype=dtype)
        times_gram = lambda d: torch.matmul(d, g_t)  # noqa: E731
    norm = 2.0 / e_near
    adam_m, adam_v = torch.zeros_like(v), torch.zeros_like(v)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, settings.learning_rate
    count = v.numel()
    per_step = float(np.prod(w.shape)) * (2 * m.rows.shape[1] if m.rows is not None and m.rows.shape[1] < w.shape[2]
                                           else w.shape[2])
    iterations = int(min(settings.iterations, max(settings.min_iterations, settings.work_limit // max(per_step, 1))))
    report["iterations"] = iterations
    warm = int(settings.warmup * iterations)
    for step in range(iterations):
        sig = torch.sigmoid(v)
        h_raw = sig * (_ZETA - _GAMMA) + _GAMMA
        h = h_raw.clamp(0, 1)
        q = (floor_t + h).clamp(qmin, qmax)
        d = s_t * q - w_t
        grad_w = norm * (times_gram(d) - r_t)
        inside = ((h_raw > 0) & (h_raw < 1) & (floor_t + h > qmin) & (floor_t + h < qmax)).to(dtype)
        grad_h = grad_w * s_t
        if step >= warm:
            progress = (step - warm) / max(iterations - warm, 1)
            beta = settings.beta[0] + (settings.beta[1] - settings.beta[0]) * progress
            u = 2 * h - 1
            grad_h = grad_h - settings.regularization / count * beta * torch.abs(u).pow(beta - 1) * torch.sign(u) * 2
        grad_v = grad_h * inside * sig * (1 - sig) * (_ZETA - _GAMMA)
        adam_m.mul_(b1).add_(grad_v, alpha=1 - b1)
        adam_v.mul_(b2).addcmul_(grad_v, grad_v, value=1 - b2)
        step_size = lr * np.sqrt(1 - b2 ** (step + 1)) / (1 - b1 ** (step + 1))
        v.addcdiv_(adam_m, adam_v.sqrt().add_(eps), value=-step_size)
    h_final = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1).numpy().astype(np.float64)
    learned = np.clip(floor + (h_final >= 0.5), qmin, qmax)
    e_learned = reconstruction_error(learned * scale, gram, cross, c)
    report["error_adaround"] = min(e_learned, e_near)
    report["flipped"] = int((learned != nearest).sum())
    if e_learned < e_near:
        report["kept"] = "adaround"
        return learned, report
    return nearest, report
