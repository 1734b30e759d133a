"""`npu-pipeline parity`: an execution provider's outputs against the emulated NPU numerics, and where
they part.

Reference: the NPU's numerics as validate computes them (the QDQ model with graph optimizations off, Q/DQ
as float ops: ideal integer arithmetic; for BF16 artifacts the bfloat16-rounding copy). EP run: the
artifact as a user runs it on that EP (the CPU EP with every optimization on: its fused int8 kernels).
Over the samples, each output is judged in its own terms: SQNR, max |difference| relative to the
output's range, and top-1 agreement for a classifier.

Localisation, when an output misses the tolerance (or always, with `localize="always"`): the candidates
are the activation QuantizeLinear outputs in graph order, i.e. the integers that the fused QLinear*
kernels themselves produce. Exposing a float intermediate as a graph output can stop onnxruntime from
fusing around it and hide the divergence; exposing a Q output does not, and its integers compare
exactly. All candidates are exposed at once on the worst samples; if the EP's outputs stay bit-identical
to the plain run (the fusion was kept), the first candidate differing by more than `lsb` is the answer.
If exposing changed the EP's result, a bisection exposes one candidate at a time (each probe checked the
same way) for the first one that diverges. Models without Q nodes (BF16, float) compare float node
outputs by SQNR instead. The answer names the compute node that feeds the diverging Q (with the
activation fused into it), the tensor, max |difference| in LSBs, the share of elements that differ, SQNR.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, ParityError
from .common import CPU, Artifact, ep_session, int8_dot_product, open_artifact, open_samples, providers_for
from .localise import Divergence, localise

__all__ = ["Tolerance", "ParityError", "ParityResult", "Divergence", "parity"]

LOCALISATION_SAMPLES = 16


@dataclass(frozen=True)
class Tolerance:
    min_sqnr_db: float = 30.0  # each output, EP against reference
    max_rel_error: float = 0.05  # max |EP - reference| / (reference max - min), each output
    min_top1_agreement: float = 99.0  # % of samples, the task output of a classifier
    lsb: int = 1  # integer intermediates: more than this many LSBs apart is a divergence


@dataclass
class OutputParity:
    name: str
    sqnr_db: float
    max_abs: float
    rel_error: float
    top1_agreement: float | None = None
    accuracy_reference: float | None = None
    accuracy_ep: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityResult:
    artifact: str
    ep: str
    reference: str
    ep_run: str
    samples: int
    outputs: list[OutputParity]
    cpu: dict
    tolerance: Tolerance
    divergence: Divergence | None = None
    localisation: str = ""  # how it was found, or why nothing was
    profile: list[dict] = field(default_factory=list)  # every compared tensor, in graph order

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_json(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def lines(self) -> list[str]:
        from ..report import format_table

        vnni = self.cpu.get("vnni")
        cpu = (f"CPU int8 dot product: {', '.join(vnni) if vnni else 'no VNNI/AMX'} ({self.cpu.get('source')}); "
               f"u8s8 saturation {'expected' if self.cpu.get('saturation_expected') else 'not expected'} on this CPU")
        out = [f"parity: {self.artifact} on {self.ep} ({self.ep_run}) against {self.reference}, {self.samples} samples",
               cpu, ""]
        rows = []
        for o in self.outputs:
            acc = (f"{o.accuracy_reference:.2f} / {o.accuracy_ep:.2f}" if o.accuracy_reference is not None else "-")
            rows.append((o.name, "identical" if o.max_abs == 0 else f"{o.sqnr_db:.2f}", f"{o.max_abs:.4g} ({100 * o.rel_error:.2f}%)",
                         "-" if o.top1_agreement is None else f"{o.top1_agreement:.2f}", acc,
                         "pass" if o.passed else "FAIL: " + "; ".join(o.failures)))
        out.append(format_table(("output", "SQNR dB", "max |diff| (of range)", "top-1 agreement %",
                                 "accuracy % ref / EP", "verdict"), rows))
        out.append("")
        d = self.divergence
        if d is not None:
            fused = f" + {', '.join(d.fused)}" if d.fused else ""
            lsb = f"max |diff| {d.max_lsb:g} LSB, " if d.max_lsb is not None else ""
            channel = (f"; worst channel {d.worst_channel}, {100 * d.share_channels_affected:.1f}% of channels affected"
                       if d.worst_channel is not None else "")
            out.append(f"first diverging node: '{d.node}' ({d.op_type}{fused}), tensor '{d.tensor}': {lsb}"
                       f"{100 * d.share_differing:.2f}% of elements differ ({100 * d.share_beyond_tolerance:.2f}% beyond "
                       f"tolerance), SQNR {d.sqnr_db:.1f} dB{channel}")
        if self.localisation:
            out.append(f"localisation: {self.localisation}")
        out.append(f"parity {'passed' if self.passed else 'FAILED'} (tolerance: SQNR >= {self.tolerance.min_sqnr_db:g} dB, "
                   f"max |diff| <= {100 * self.tolerance.max_rel_error:g}% of the output range, top-1 agreement >= "
                   f"{self.tolerance.min_top1_agreement:g}%, intermediates within {self.tolerance.lsb} LSB)")
        return out

    def raise_for_failure(self) -> None:
        if not self.passed:
            where = f"; first diverging node '{self.divergence.node}' ({self.divergence.op_type})" if self.divergence else ""
            failed = "; ".join(f"{o.name}: {', '.join(o.failures)}" for o in self.outputs if not o.passed)
            raise ParityError(f"parity failed on {self.ep}: {failed}{where}")


# ------------------------------------------------------------------------------------- sessions


def _reference_bytes(art: Artifact, model_path: Path) -> tuple[bytes, str]:
    from ..core.onnx_io import load_onnx

    model = load_onnx(model_path, where="artifact model")
    if art.format == "bf16":
        from ..quant.bf16 import emulate_bf16

        return emulate_bf16(model).SerializeToString(), "NPU numerics (bfloat16 rounding at every op boundary)"
    return model.SerializeToString(), "NPU numerics (unfused QDQ, graph optimizations off)"


def parity(
    artifact: Path,
    ep: str,
    *,
    recipe: Path | None = None,
    data: Path | None = None,
    labels: str | None = None,
    samples: int | None = None,
    tolerance: Tolerance = Tolerance(),
    localize: str = "auto",
) -> ParityResult:
    """Judge `ep` against the NPU numerics on the samples; localise the first divergence (see module doc)."""
    import onnxruntime as ort

    from .common import provider_name

    ep = provider_name(ep)
    if ep not in ort.get_available_providers():
        raise DataError(f"--ep: {ep} is not available on this machine (onnxruntime offers: "
                        f"{', '.join(ort.get_available_providers())}); run parity where it is installed")
    if localize not in ("auto", "always", "never"):
        raise DataError(f"--localize: '{localize}' is not one of auto, always, never")
    art = open_artifact(Path(artifact))
    source = open_samples(art, recipe=recipe, data=data, labels=labels, limit=samples)
    with tempfile.TemporaryDirectory(prefix="npu-parity-") as scratch:  # the VitisAI cache: never in the artifact
        providers = providers_for(ep, art, cache_dir=Path(scratch) / "vitisai_cache")
        return _parity(art, ep, providers, source, recipe, labels, tolerance, localize)


def _parity(art: Artifact, ep: str, providers: list, source, recipe, labels, tolerance: Tolerance, localize: str):
    model_path = art.models.get("quantized", next(iter(art.models.values())))
    ref_bytes, reference = _reference_bytes(art, model_path)
    model_bytes = model_path.read_bytes()
    ref = ep_session(ref_bytes, [CPU], optimize=False)
    run = ep_session(model_bytes, providers, optimize=True)
    names = [o.name for o in ref.get_outputs()]
    task, task_output = _task(art, recipe, labels is not None or source.labels is not None, names)
    stats = {n: _Accumulator() for n in names}
    sample_error = []
    tops_ref, tops_ep = [], []
    for batch in source:
        r, g = ref.run(None, batch), run.run(None, batch)
        err = 0.0
        for name, a, b in zip(names, r, g):
            stats[name].update(a, b)
            scale = max(float(np.abs(a).max()), 1e-12)
            err = max(err, float(np.abs(a.astype(np.float64) - b).max()) / scale)
        sample_error.append(err)
        if task == "classification":
            i = names.index(task_output)
            tops_ref.append(r[i].reshape(len(r[i]), -1).argmax(axis=1))
            tops_ep.append(g[i].reshape(len(g[i]), -1).argmax(axis=1))
    outputs = []
    for name in names:
        o = stats[name].result(name, tolerance)
        if task == "classification" and name == task_output:
            a, b = np.concatenate(tops_ref), np.concatenate(tops_ep)
            o.top1_agreement = 100.0 * float((a == b).mean())
            if source.labels is not None:
                lab = source.labels.reshape(-1)[: len(a)]
                o.accuracy_reference, o.accuracy_ep = 100.0 * float((a == lab).mean()), 100.0 * float((b == lab).mean())
            if o.top1_agreement < tolerance.min_top1_agreement:
                o.failures.append(f"top-1 agreement {o.top1_agreement:.2f}% < {tolerance.min_top1_agreement:g}%")
        outputs.append(o)
    quantized = any(n.op_type == "QuantizeLinear" for n in _graph_nodes(model_bytes))
    ep_run = ("the artifact's EP options, CPU for the rest" if ep != CPU else
              "full graph optimizations: fused int8 kernels" if quantized else "full graph optimizations, float32")
    result = ParityResult(art.name, ep, reference, ep_run, len(sample_error), outputs, int8_dot_product(), tolerance)
    if localize == "always" or (localize == "auto" and not result.passed):
        worst = sorted(np.argsort(-np.asarray(sample_error), kind="stable")[:LOCALISATION_SAMPLES].tolist())
        batches = [b for i, b in enumerate(source) if i in set(worst)]
        result.divergence, result.localisation, result.profile = localise(
            ref_bytes, model_bytes, providers, batches, tolerance=tolerance)
    elif result.passed:
        result.localisation = "not needed: every output is within tolerance (--localize always to profile anyway)"
    return result


def _graph_nodes(model_bytes: bytes):
    import onnx

    return onnx.ModelProto.FromString(model_bytes).graph.node


def _task(art: Artifact, recipe: Path | None, has_labels: bool, names: Sequence[str]) -> tuple[str, str]:
    """(task, task output): from the recipe, else the manifest, else 'classification' when labels came."""
    task, output = None, None
    if recipe is not None:
        from ..recipe import load_recipe

        spec = load_recipe(recipe)
        task, output = spec.validation.task, spec.validation.output
    elif art.manifest:
        metrics = art.manifest.get("metrics", {})
        task, output = metrics.get("task"), metrics.get("task_output")
    if task is None:
        task = "classification" if has_labels else "other"
    return task, output if output in names else names[0]


class _Accumulator:
    def __init__(self) -> None:
        self.signal = self.noise = self.max_abs = 0.0
        self.lo, self.hi = np.inf, -np.inf

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        r, g = ref.astype(np.float64), got.astype(np.float64)
        self.signal += float((r * r).sum())
        self.noise += float(((g - r) ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(g - r).max(initial=0.0)))
        if r.size:
            self.lo, self.hi = min(self.lo, float(r.min())), max(self.hi, float(r.max()))

    def result(self, name: str, tol: Tolerance) -> OutputParity:
        sqnr = 200.0 if self.noise == 0 else min(200.0, 10 * np.log10(max(self.signal, 1e-300) / self.noise))
        span = self.hi - self.lo if self.hi > self.lo else max(abs(self.hi), 1e-12)
        o = OutputParity(name, float(sqnr), self.max_abs, self.max_abs / span)
        if o.sqnr_db < tol.min_sqnr_db:
            o.failures.append(f"SQNR {o.sqnr_db:.2f} dB < {tol.min_sqnr_db:g} dB")
        if o.rel_error > tol.max_rel_error:
            o.failures.append(f"max |diff| {100 * o.rel_error:.2f}% of the range > {100 * tol.max_rel_error:g}%")
        return o
