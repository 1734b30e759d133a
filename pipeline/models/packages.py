"""Where an installed package's files are, for the reference models' weights and data (this package may
import nothing of the pipeline but its errors)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["installed_package_dir"]


def installed_package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (`import sklearn` costs
    1.6 s, paid by every stage that reads the data; rapidocr's `__init__` needs OpenCV, not installed);
    None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
