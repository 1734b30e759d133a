"""Class labels, checked before an accuracy is computed from them.

Accuracy compares each label with the argmax of the model's output, so a label is one integer class
index per sample in [0, classes). One-hot rows, text, booleans, floats and NaN would still compare (as
never or always equal) and give a meaningless accuracy that gates then pass: they are refused with one
line naming the array and the first bad sample.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["check_class_labels", "preflight_labels"]


def check_class_labels(labels: object, where: str, *, classes: int | None = None) -> np.ndarray:
    """`labels` as a 1-D int64 array of class indices (shape [N] or [N, 1]); DataError otherwise.
    `classes`: the size of the classifier's output, when known (labels must be below it)."""
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        raise DataError(
            f"{where}: labels have shape {list(array.shape)} (one-hot or scores?); give one integer class per "
            "sample (e.g. labels.argmax(axis=1))"
        )
    if array.ndim != 1:
        raise DataError(f"{where}: labels have shape {list(array.shape)}; give one integer class per sample ([N])")
    kind = array.dtype.kind
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise DataError(f"{where}: label of sample {int(bad[0])} is {array[bad[0]]}; labels are integer class indices")
        raise DataError(f"{where}: labels are {array.dtype} numbers; class labels must be integers "
                        "(save them with .astype('int64'))")
    if kind not in "iu":
        what = {"b": "booleans", "U": "text", "S": "bytes", "O": "Python objects"}.get(kind, str(array.dtype))
        raise DataError(f"{where}: labels are {what} ({array.dtype}); class labels are integer indices of the "
                        "model's output (0, 1, 2, ...)")
    negative = np.flatnonzero(array < 0)
    if negative.size:
        raise DataError(f"{where}: label of sample {int(negative[0])} is {int(array[negative[0]])}; "
                        "class indices start at 0")
    if classes is not None:
        above = np.flatnonzero(array >= classes)
        if above.size:
            raise DataError(
                f"{where}: label of sample {int(above[0])} is {int(array[above[0]])}, but the model's output has "
                f"{classes} classes (0..{classes - 1})"
            )
    return array.astype(np.int64)


def preflight_labels(recipe) -> None:
    """Check a classification recipe's validation labels without running the model (`check`): file data
    kinds only (a builder's labels come from running its code)."""
    from . import open_dataset

    data = recipe.validation.data
    if recipe.validation.task != "classification" or getattr(data, "labels", None) is None:
        return
    source = open_dataset(recipe, "validation")
    if source.labels is not None:
        check_class_labels(source.labels, f"validation.data.labels ({source.description})")
