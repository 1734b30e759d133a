"""The batch worker: `python -m pipeline.batch RECIPE --out DIR --result FILE [--force]` converts one recipe
in a fresh interpreter and writes its outcome as JSON (see `pipeline.batch`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..api import run_recipe
from ..core.fileio import atomic_write, dump_json
from ..errors import GateError, PipelineError
from ..recipe import load_recipe
from .results import one_line, status_for

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Convert one recipe and write its `RecipeOutcome` fields as JSON; the exit code is the outcome's."""
    import argparse
    import traceback

    parser = argparse.ArgumentParser(prog="python -m pipeline.batch", description="batch worker (internal)")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    stages: dict[str, dict] = {}
    gates: list[dict] = []

    def on_stage(outcome) -> None:
        stages[outcome.name] = {"cached": outcome.cached, "seconds": outcome.record.seconds}
        print(f"  {outcome.name:<10} {'cached (unchanged)' if outcome.cached else f'{outcome.record.seconds:.2f} s'}")
        if outcome.name == "package":
            gates[:] = outcome.record.metrics.get("gates", [])

    fields: dict = {"stages": stages, "gates": gates}
    try:
        recipe = load_recipe(args.recipe)
        fields["name"] = recipe.name
        target, fmt = recipe.target_and_format()
        fields.update(target=target.name, format=fmt.value)
        print(f"{recipe.name}: {args.out}")
        run_recipe(recipe, out=args.out, force=args.force, progress=False, on_stage=on_stage)
        code, message = 0, ""
    except GateError as err:
        code, message = err.exit_code, str(err)
    except PipelineError as err:
        code, message = err.exit_code, str(err)
        print(f"error: {err}", file=sys.stderr)
    except Exception as err:  # a bug: keep its traceback in the log, report it as an internal error
        traceback.print_exc()
        code, message = 1, f"internal error: {type(err).__name__}: {err}"
    artifact = args.out.resolve() / "artifact"
    fields.update(
        status=status_for(code), exit_code=code, message=one_line(message), detail=message,
        artifact=str(artifact) if "package" in stages else None,
    )
    atomic_write(args.result, dump_json(fields))
    return code
