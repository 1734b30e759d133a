"""End-to-end fine-tuning of a QDQ model's integer weights and biases against the float model's outputs.

    qmodel, report = finetune(qdq_model, float_model, batches, FinetuneSettings(epochs=8))

AdaRound (`pipeline.quant.adaround`) fits each layer to its own float output; what it cannot see is how
the activation rounding noise of a hundred layers adds up at the outputs. This step looks at the outputs:
the QDQ model runs as a torch function (`torch_graph.QDQTorchGraph`, fake quantization with the
straight-through estimator, the same numerics as the NPU emulation), and its integer weights and biases
(held as floats in grid steps) are trained by Adam with a one-cycle schedule to bring its outputs closer to
the float model's on the streamed calibration samples (loss: each output's error power over its mean
signal power, so outputs of different scales weigh alike). Samples are streamed every epoch, `batch` at a
time (stacked on axis 0 when the model allows it, checked on two samples; else one by one with gradients
accumulated), the float targets computed as they come: memory does not grow with `samples`.

It does not keep what it learned unless that carries over to samples it did not train on: the last
`check_samples` of the streamed samples (at most a quarter of them) are held out, the output SQNR of the
emulated QDQ model (onnxruntime, the numerics validate uses) on them is measured before and after, and the
fine-tuned integers are kept only when it went up. (Checked on the training samples themselves, a too
large learning rate on MobileNetV2 gained 0.2 dB there and lost 6 dB on the validation crops.) A model with
an operator the torch evaluation does not reproduce is left as it was and the report says which; so is one
whose torch evaluation, checked against onnxruntime's on a few held-out samples first, is not as close to
the float model as onnxruntime's (training it would tune another model). Scales, zero points and the graph are never changed, so NPU rules
that held still hold.

It generalizes only as far as the calibration data does, and a CNN's calibration data is a few photos:
trained on their crops alone it learns the photos. So each training sample is blended with another of its
batch (`blend`, `_blended`): new inputs the float model still answers, in the same activation ranges.
MobileNetV2 A8W8 (the shipped recipe with `calibration.samples: 432`, `transform_samples: 432` and
`transforms: [cross_layer_equalization, {bias_absorption: {consumer_bias: float}}, adaround, {finetune:
{samples: 432}}]`: 368 crops trained, the 64 of the last calibration photo held out), validation photos:
16.41 dB without this step, 17.02 dB with it unblended, 18.04 dB blended (top-1 over all crops 85.8 ->
86.4%, confident 100%); the held-out photo 15.9 -> 19.3-19.4 dB either way (8 of its crops are trained
on); quantize 27 -> 232 s on 2 cores. So no preset has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np
import onnx

from ...core.metrics import ErrorSums
from ...core.onnx_io import make_session
from .torch_graph import QDQTorchGraph, Unsupported

__all__ = ["FinetuneSettings", "finetune", "Unsupported"]


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 8
    samples: int = 200
    batch: int = 8
    # Adam's step, in grid steps of each weight (biases: 128 of their steps), at the peak of the schedule.
    learning_rate: float = 0.02
    check_samples: int = 64
    # Train on blends of two samples of a batch (each keeps a weight in [blend, 1] of itself; 1.0: no
    # blending), float inputs only; the float model's outputs on the blend are the targets.
    blend: float = 0.3


def _emulated_outputs(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[list[np.ndarray]]:
    """`model`'s outputs `names` on each feed, in onnxruntime's emulation (the numerics validate uses)."""
    session = make_session(model, npu_emulation=True)
    return [session.run(names, feed) for feed in feeds]


def _sqnr(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    """SQNR (dB) of `other` against `reference`, per sample lists of outputs, every error and signal summed."""
    sums = ErrorSums()
    for ref_outputs, other_outputs in zip(reference, other):
        for ref, got in zip(ref_outputs, other_outputs):
            sums.update(ref, got)
    return sums.sqnr_db


# The torch evaluation and onnxruntime differ by float accumulation order, and on a deep network that is
# not small: a value at a rounding midpoint lands one step apart, and the flip travels (MobileNetV2 A8W8:
# the two agree to 16.7 dB, as far apart as each is from the float model). What must hold is that both are
# equally far from the float model and no further from each other than that: an operator evaluated wrong
# moves the torch evaluation away from the float model by much more.
_SAME_ERROR_DB = 1.5
_APART_DB = 3.0
_AGREEMENT_SAMPLES = 8
_STACKED_DB = 10.0


def _torch_agreement(graph: QDQTorchGraph, floats: list[list[np.ndarray]], emulated: list[list[np.ndarray]],
                     feeds: list[dict]) -> str | None:
    """None when the torch evaluation reproduces onnxruntime's emulation (`emulated`, the float model's
    outputs `floats`; see above) on `feeds`, else why not."""
    import torch

    ours = []
    for feed, want in zip(feeds, emulated):
        try:
            with torch.no_grad():
                got = [t.numpy() for t in graph(feed)]
        except (RuntimeError, ValueError, TypeError, IndexError) as err:  # shapes or dtypes torch refuses
            raise Unsupported(f"the torch evaluation fails: {err}".splitlines()[0]) from None
        if any(g.shape != w.shape for g, w in zip(got, want)):
            return "the torch evaluation gives other output shapes than onnxruntime"
        ours.append(got)
    floats, emulated = floats[:len(ours)], emulated[:len(ours)]
    reproduced, torch_db, apart = _sqnr(floats, emulated), _sqnr(floats, ours), _sqnr(emulated, ours)
    if abs(torch_db - reproduced) > _SAME_ERROR_DB or apart < min(reproduced, torch_db) - _APART_DB:
        return (f"the torch evaluation does not reproduce the emulated model (against the float model "
                f"{torch_db:.1f} dB, onnxruntime's {reproduced:.1f} dB; {apart:.1f} dB apart)")
    return None


def _groups(feeds: Iterable[dict], size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for feed in feeds:
        group.append(feed)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _stack(feeds: list[dict]) -> dict:
    return feeds[0] if len(feeds) == 1 else {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def _blended(group: list[dict], lowest: float, rng: np.random.Generator) -> list[dict]:
    """Each feed of `group` blended with another of the group: w * own + (1 - w) * other, w uniform in
    [lowest, 1]. Integer inputs (token ids, masks) cannot be blended: a group with one is returned as is.

    Why: the calibration data of a CNN is a few photos; trained on their crops alone the fine-tune learns
    them. Blends are new inputs the float model still answers, in the same activation ranges, so the
    weights learn the quantization noise and not the photos (validation photos 17.02 -> 18.04 dB; the
    module docstring)."""
    if lowest >= 1.0 or len(group) < 2 or any(np.asarray(v).dtype.kind != "f" for feed in group for v in feed.values()):
        return group
    order = rng.permutation(len(group))
    partners = [int(order[k]) if order[k] != k else int((k + 1) % len(group)) for k in range(len(group))]
    weights = rng.uniform(lowest, 1.0, len(group))
    return [{name: (w * np.asarray(value) + (1.0 - w) * np.asarray(group[j][name])).astype(np.asarray(value).dtype)
             for name, value in feed.items()} for feed, j, w in zip(group, partners, weights)]


def _stacks(graph: QDQTorchGraph, feeds: list[dict]) -> bool:
    """True when the torch evaluation of samples stacked on axis 0 gives each sample's own outputs (a
    model with batch-1 shapes baked into a Reshape does not): checked on two samples."""
    import torch

    if len(feeds) < 2 or any(np.ndim(v) == 0 or np.shape(v)[0] != 1 for v in feeds[0].values()):
        return False
    try:
        with torch.no_grad():
            together = [t.numpy() for t in graph(_stack(feeds[:2]))]
            apart = [np.concatenate([t.numpy() for t in outs], axis=0) for outs in zip(*(graph(f) for f in feeds[:2]))]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    if any(a.shape != b.shape for a, b in zip(together, apart)):
        return False
    # Stacked, torch may accumulate in another order, and a rounding flip travels (see above); samples
    # mixed into each other would be far further off.
    return bool(_sqnr([apart], [together]) >= _STACKED_DB)


def finetune(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, batches: Callable[[], Iterable[dict]],
             settings: FinetuneSettings, *, progress: bool = False) -> tuple[onnx.ModelProto, dict]:
    """`qmodel` with fine-tuned integers (or `qmodel` itself, unchanged) and the report (module docstring)."""
    import torch

    report: dict = {"settings": asdict(settings)}
    try:
        graph = QDQTorchGraph(qmodel)
    except Unsupported as why:
        report.update(kept="original", skipped=f"not fine-tuned: {why}")
        return qmodel, report
    if not graph.learned:
        report.update(kept="original", skipped="not fine-tuned: no constant quantized weight")
        return qmodel, report
    names = [o.name for o in qmodel.graph.output]
    float_names = {o.name for o in float_model.graph.output}
    if not set(names) <= float_names:
        report.update(kept="original", skipped="not fine-tuned: the float model lacks outputs "
                      + ", ".join(sorted(set(names) - float_names)))
        return qmodel, report
    float_session = make_session(float_model)
    available = sum(1 for _ in islice(batches(), settings.samples))
    held_out = min(settings.check_samples, available // 4)
    if held_out == 0:
        report.update(kept="original", skipped=f"not fine-tuned: {available} calibration sample(s), too few to hold "
                      "any out for the check (give quantization.transform_samples >= 4)")
        return qmodel, report
    seen = available - held_out
    check = list(islice(batches(), seen, available))
    # The held-out samples' float outputs and the emulated model's, once: the check before, the loss
    # normalisation and the torch evaluation's agreement all read them.
    check_floats = [float_session.run(names, feed) for feed in check]
    emulated = _emulated_outputs(qmodel, names, check)
    try:
        mismatch = _torch_agreement(graph, check_floats, emulated, check[:_AGREEMENT_SAMPLES])
    except Unsupported as why:
        mismatch = str(why)
    if mismatch:
        report.update(kept="original", skipped=f"not fine-tuned: {mismatch}")
        return qmodel, report
    before = _sqnr(check_floats, emulated)

    # Each output's mean signal power per sample: the loss is the error power over it, so outputs of
    # different scales weigh alike and every sample by its own error (not its share of a batch's signal).
    power = {name: sum(float(np.sum(outputs[i].astype(np.float64) ** 2)) for outputs in check_floats) / len(check)
             for i, name in enumerate(names)}
    stacked = _stacks(graph, check[:2])

    parameters = graph.parameters()
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    steps_per_epoch = -(-seen // settings.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                   total_steps=max(1, settings.epochs * steps_per_epoch), pct_start=0.1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.epochs * seen, desc="fine-tune", unit="sample", leave=False)
    losses = []
    rng = np.random.default_rng(0)
    try:
        for _ in range(settings.epochs):
            total = 0.0
            for group in _groups(islice(batches(), seen), settings.batch):
                group = _blended(group, settings.blend, rng)
                # One forward pass for the group when the model takes samples stacked on axis 0 (checked
                # once, `_stacks`); else one per sample, gradients accumulated.
                parts = [group] if stacked else [[feed] for feed in group]
                for part in parts:
                    wanted = (float_session.run(names, part[0]) if len(part) == 1 else
                              [np.concatenate(outs, axis=0) for outs in zip(*(float_session.run(names, f) for f in part))])
                    loss = 0.0
                    for name, got, want in zip(names, graph(_stack(part)), wanted):
                        loss = loss + torch.sum((got - torch.from_numpy(want)) ** 2) / max(power[name], 1e-30)
                    (loss / len(group)).backward()
                    total += float(loss.detach())
                optimizer.step()
                optimizer.zero_grad()
                schedule.step()
                if bar is not None:
                    bar.update(len(group))
            losses.append(round(-10.0 * np.log10(max(total / seen, 1e-30)), 3))
    finally:
        if bar is not None:
            bar.close()
    tuned = graph.write_back()
    after = _sqnr(check_floats, _emulated_outputs(tuned, names, check))
    kept = bool(after > before)
    report.update(
        samples=seen, held_out=held_out, stacked=stacked, parameters=int(sum(p.numel() for p in parameters)), tensors=len(graph.learned),
        epoch_sqnr_db=losses, check_sqnr_db_before=round(before, 3), check_sqnr_db_after=round(after, 3),
        kept="finetuned" if kept else "original",
    )
    return (tuned if kept else qmodel), report
