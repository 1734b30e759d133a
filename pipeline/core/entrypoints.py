"""Trusted code named in a recipe (`package.module:function`): imported as if the recipe's folder were the
current script's folder.

A builder module sitting next to the recipe is importable without installing it or setting PYTHONPATH:
the recipe's folder goes first on `sys.path` while the module is imported and called, as Python does for
a script's own folder. A module of the same name imported earlier from another folder (two recipes with
their own `builders.py` in one process) is dropped from the module cache first, so each recipe gets its
own. An import that fails says where it looked and whether the module itself or one of its own imports
is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["recipe_folder_on_path", "import_entry_point", "entry_point_source"]


def _local_file(folder: Path, top: str) -> Path | None:
    for candidate in (folder / f"{top}.py", folder / top / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _from_other_recipe(cached_file: Path, top: str, local: Path) -> bool:
    """Whether a cached module came from a folder that is no longer on sys.path (another recipe's): only
    such a module is replaced by the local one; an installed module keeps precedence, as in plain Python."""
    cached_file = cached_file.resolve()
    if cached_file == local.resolve():
        return False
    root = cached_file.parent.parent if cached_file.name == "__init__.py" else cached_file.parent
    on_path = set()
    for entry in sys.path:
        with contextlib.suppress(OSError):
            on_path.add(Path(entry or ".").resolve())
    return root not in on_path


@contextlib.contextmanager
def recipe_folder_on_path(folder: Path, module_name: str) -> Iterator[None]:
    """`folder` first on sys.path for the duration; a cached module of that name from elsewhere is dropped."""
    folder = Path(folder).resolve()
    top = module_name.split(".")[0]
    local = _local_file(folder, top)
    cached = sys.modules.get(top)
    cached_file = getattr(cached, "__file__", None)
    if local is not None and cached_file is not None and _from_other_recipe(Path(cached_file), top, local):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    entry = str(folder)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # a module written after the interpreter started must be found
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def import_entry_point(spec: str, folder: Path, *, where: str, missing: type[Exception], failing: type[Exception]) -> Callable:
    """The function `spec` names, imported with `folder` on the path (call it inside `recipe_folder_on_path`
    too if it imports lazily). `missing` is raised when the module or function is not there, `failing` when
    the module's own code raises while it is imported."""
    module_name, _, func_name = spec.partition(":")
    with recipe_folder_on_path(folder, module_name):
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing_name = getattr(err, "name", None)
            if missing_name and module_name != missing_name and not module_name.startswith(missing_name + "."):
                raise missing(
                    f"{where}: module '{module_name}' was found but its own import failed: {err} "
                    f"(install what it needs)"
                ) from None
            raise missing(
                f"{where}: cannot import module '{module_name}' ({err}); looked in the recipe's folder {folder} "
                f"and the installed packages: put {module_name.replace('.', '/')}.py next to the recipe, or install "
                "its package"
            ) from None
        except (Exception, SystemExit) as err:  # the user's module raised while it was imported
            raise failing(f"{where}: importing '{module_name}' raised {type(err).__name__}: {err}") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise missing(f"{where}: module '{module_name}' has no function '{func_name}'")
    return func


def entry_point_source(spec: str, folder: Path) -> Path | None:
    """The source file of the entry point's module (for cache keys), found the way the import finds it."""
    module_name = spec.partition(":")[0]
    with recipe_folder_on_path(folder, module_name):
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
    origin = Path(found.origin) if found is not None and found.origin else None
    return origin if origin is not None and origin.is_file() else None
