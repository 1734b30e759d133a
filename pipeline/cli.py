"""`npu-pipeline`: a thin shell over the library. It parses, calls, prints, and maps errors to exit codes.

Exit codes: 0 success; 2 bad input (recipe, data, model, an output path); 3 a stage failed; 4 an accuracy
gate failed; 5 the model breaks a hard NPU rule; 6 a bundle is incomplete or modified; 1 a bug (with its
traceback).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import PipelineError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="PyTorch or ONNX models to quantized, validated, deployable artifacts for AMD Ryzen AI NPUs.",
)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _user_errors(func):
    """Print a PipelineError as one line on stderr and exit with its code; let real bugs show tracebacks."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper


def _echo_stage(outcome) -> None:
    state = "cached (unchanged)" if outcome.cached else f"{outcome.record.seconds:.2f} s"
    typer.echo(f"  {outcome.name:<10} {state}")


OutOption = typer.Option(None, "--out", help="Run folder (default: the recipe's output, else build/<name>).")
SignKeyOption = typer.Option(None, "--sign-key", help="PEM Ed25519 private key: sign the bundle (manifest.sig).")


@app.command()
@_user_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out: Optional[Path] = OutOption,
    force: bool = typer.Option(False, "--force", help="Rerun every stage even when its inputs are unchanged."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    sign_key: Optional[Path] = SignKeyOption,
) -> None:
    """Run every stage of RECIPE: export, prepare, calibrate, quantize, validate, package."""
    from .api import raise_for_readiness, run_recipe
    from .gates import raise_for_failures
    from .recipe import load_recipe
    from .report import OUTPUT_HEADER, accuracy_header, accuracy_rows, format_table, output_rows

    spec = load_recipe(recipe)
    typer.echo(f"{spec.name}: {spec.output_dir(out)}")
    result = run_recipe(spec, out=out, force=force, progress=not quiet, on_stage=_echo_stage, check_gates=False,
                        sign_key=sign_key)
    typer.echo("")
    typer.echo(format_table(accuracy_header(result.metrics), accuracy_rows(result.metrics)))
    if len(result.metrics.get("outputs", {})) > 1:  # every output by name, not only the task output
        typer.echo("\n" + format_table(OUTPUT_HEADER, [tuple(c.replace("**", "") for c in row)
                                                       for row in output_rows(result.metrics)]))
    for gate in result.gates:
        typer.echo(f"gate {'pass' if gate.passed else 'FAIL'}: {gate.describe()}")
    typer.echo(f"\nartifact: {result.artifact}\nreport:   {result.artifact / 'report.md'}")
    raise_for_readiness(result)
    raise_for_failures(spec.name, result.gates, str(result.artifact / "report.md"))


def _stage_command(stage: str, doc: str):
    @_user_errors
    def command(
        recipe: Path = typer.Argument(..., help="Recipe YAML file."),
        out: Optional[Path] = OutOption,
        sign_key: Optional[Path] = SignKeyOption,
    ) -> None:
        from .api import run_stage
        from .errors import PipelineError
        from .recipe import load_recipe

        if sign_key is not None and stage != "package":
            raise PipelineError(f"--sign-key: only 'package' (or 'run') signs a bundle, not '{stage}'")
        _echo_stage(run_stage(load_recipe(recipe), stage, out=out, sign_key=sign_key))

    command.__doc__ = doc
    app.command(name=stage)(command)


for _stage, _doc in [
    ("export", "Export the model to ONNX and check it against torch."),
    ("prepare", "Static shapes, opset 17, folded constants and BatchNorm."),
    ("calibrate", "Stream the calibration set and save activation statistics."),
    ("quantize", "Quantize to the target's format from the saved statistics."),
    ("validate", "Compare the quantized model with the float model on held-out data."),
    ("package", "Write the deployable artifact: models, manifest, provider options, report."),
]:
    _stage_command(_stage, _doc)


@app.command()
def check(recipes: list[Path] = typer.Argument(..., help="Recipe YAML file(s).")) -> None:
    """Everything 'run' would refuse, at once, without running a stage: schema, output folder, model
    signature, every data sample, gates (see pipeline/preflight.py)."""
    from .preflight import check_recipe

    code = 0
    for path in recipes:
        try:
            report = check_recipe(path)
            report.raise_for_problems()
        except PipelineError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            code = code or err.exit_code
            continue
        target, fmt = report.recipe.target_and_format()
        typer.echo(f"ok  {path}: {report.recipe.name} ({target.name}, {fmt.value})")
        for line in report.facts:
            typer.echo(f"    {line}")
        for line in report.notes:
            typer.echo(f"    note: {line}")
    if code:
        raise typer.Exit(code)


@app.command()
@_user_errors
def init(
    model: str = typer.Argument(..., help="An ONNX file, or a builder 'package.module:function'."),
    data: Optional[Path] = typer.Option(None, "--data", help="A folder of images or .wav files, an .npz, a .wav or a .txt."),
    target: str = typer.Option("xdna2", "--target", "-t", help="xdna1, xdna2 or cpu."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Number format (default: the target's; xdna2: a8w8)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Recipe file to write (default: ./<model>.yaml)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing recipe file."),
) -> None:
    """Write a commented recipe from MODEL's signature: runs as is with --data; lists what is yours to decide."""
    from .tools.init_recipe import init_recipe

    result = init_recipe(model, data=data, target=target, fmt=fmt, out=output, force=force)
    typer.echo(f"written: {result.path}")
    for line in result.decisions:
        typer.echo(f"  decide: {line}")
    typer.echo(f"next: npu-pipeline check {result.path} && npu-pipeline run {result.path}")


@app.command(name="inspect")
@_user_errors
def inspect_command(
    model: Path = typer.Argument(..., help="ONNX model (float or quantized)."),
    target: str = typer.Option("xdna2", "--target", "-t", help="xdna1, xdna2 or cpu."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="xint8, a8w8, a16w8, bf16, u8s8 (default: detected)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the inspection as JSON here."),
) -> None:
    """Check NPU readiness and predict which nodes run on the NPU and which fall back to the CPU."""
    from .core.fileio import dump_json, write_output
    from .errors import OutputError
    from .inspect import inspect_model

    if json_out is not None and json_out.resolve() == model.resolve():
        raise OutputError(f"--json {json_out}: that is the model being inspected; choose another path")
    inspection = inspect_model(model, target, fmt)
    typer.echo(inspection.table())
    if json_out is not None:
        write_output(json_out, dump_json(inspection.to_json()), option="--json")
        typer.echo(f"written: {json_out}")
    inspection.raise_for_violations()


@app.command()
@_user_errors
def verify(
    bundle: Path = typer.Argument(..., help="An artifact folder written by 'run' or 'package'."),
    key: Optional[Path] = typer.Option(None, "--key", help="PEM Ed25519 public key: the bundle must be signed by it."),
) -> None:
    """Re-check a bundle: manifest digest, exact file set, every hash, the signature (--key), the NPU rules."""
    from .bundle import verify_bundle

    result = verify_bundle(bundle, key=key)
    summary = result.inspection.summary()
    typer.echo(
        f"ok  {bundle}: {result.files_checked} files match manifest.json, nothing added; signature "
        f"{result.signature}; no NPU rule broken; "
        f"NPU share {summary['npu_node_share']:.1%} of nodes, {summary['npu_mac_share']:.1%} of MACs"
    )


@app.command()
@_user_errors
def keygen(
    folder: Path = typer.Argument(..., help="Folder for signing.pem (private) and signing.pub.pem (public)."),
) -> None:
    """Make an Ed25519 key pair for 'package --sign-key' / 'verify --key' (never overwrites a key)."""
    from .core.signing import generate_key_pair

    private, public = folder / "signing.pem", folder / "signing.pub.pem"
    ident = generate_key_pair(private, public)
    typer.echo(f"key {ident}\nprivate: {private} (keep it secret)\npublic:  {public} (give it to whoever verifies)")


@app.command()
@_user_errors
def infer(
    bundle: Path = typer.Argument(..., help="An artifact folder."),
    input: Path = typer.Option(..., "--input", "-i", help=".npz with one array per model input."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the outputs to this .npz."),
    npu_numerics: bool = typer.Option(False, "--npu-numerics", help="On the CPU, compute as the NPU does."),
) -> None:
    """Run a bundle: with the VitisAI EP where onnxruntime offers it, on the CPU otherwise."""
    import numpy as np

    from .bundle import infer_bundle
    from .core.fileio import write_output
    from .errors import OutputError

    if output is not None and output.resolve().is_relative_to(bundle.resolve()):
        raise OutputError(f"--output {output}: inside the bundle, whose file set verify checks; write it elsewhere")
    outputs, provider = infer_bundle(bundle, input, npu_numerics=npu_numerics)
    typer.echo(f"ran on: {provider}")
    for name, value in outputs.items():
        flat = value.reshape(-1)
        preview = ", ".join(f"{v:.4g}" for v in flat[:6]) + (", ..." if flat.size > 6 else "")
        typer.echo(f"{name}: {value.dtype}{list(value.shape)} [{preview}]")
    if output is not None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        write_output(output, buffer.getvalue(), option="--output")
        typer.echo(f"written: {output}")


@app.command()
@_user_errors
def batch(
    paths: Optional[list[Path]] = typer.Argument(None, help="Recipe files and/or folders (default: the shipped recipes)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Recipes converted at once, each in its own process."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: only the i-th of n slices (1-based) of the sorted list."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here (one testcase per recipe)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Write the summary as JSON here."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage even when its inputs are unchanged."),
    out_root: Optional[Path] = typer.Option(None, "--out-root", help="Run folders go to DIR/<name>."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per recipe before its worker is killed."),
) -> None:
    """Convert many recipes in parallel worker processes; exit 0 only if all pass (see pipeline/batch.py)."""
    from .batch import run_batch

    def progress(outcome) -> None:
        typer.echo(f"{outcome.status:<6} {outcome.name} ({outcome.seconds:.1f} s){f': {outcome.message}' if outcome.message else ''}")

    result = run_batch(paths or [RECIPES_DIR], jobs=jobs, shard=shard, out_root=out_root, force=force,
                       timeout=timeout, on_done=progress)
    typer.echo("")
    typer.echo(result.table())
    for path, write in ((summary, result.write_summary), (junit, result.write_junit)):
        if path is not None:
            write(path)
            typer.echo(f"written: {path}")
    raise typer.Exit(result.exit_code)


@app.command()
@_user_errors
def bench(
    artifacts: list[Path] = typer.Argument(..., help="Artifact folders (or .onnx files)."),
    ep: list[str] = typer.Option(["all"], "--ep", help="all, or EP names (cpu, vitisai, ...); repeatable."),
    runs: int = typer.Option(200, "--runs", "-n", help="Timed runs per model and EP."),
    warmup: int = typer.Option(20, "--warmup", help="Runs before timing, not counted."),
    threads: int = typer.Option(0, "--threads", help="Intra-op threads, pinned (default: every usable core)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help=".npz with one array per model input (default: random)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.json and bench.html (default: <artifact>/../bench)."),
) -> None:
    """Latency p50/p90/p99, throughput, session creation time and peak RSS per model and execution provider."""
    from .tools.common import default_out
    from .tools.latency import bench as run_bench

    def progress(row) -> None:
        typer.echo(f"  {row.artifact} {row.model} on {row.ep}: "
                   + (f"p50 {row.figures['p50_ms']:.3f} ms" if row.measured else row.status), err=True)

    result = run_bench(artifacts, eps=ep, runs=runs, warmup=warmup, threads=threads, inputs=input, on_row=progress)
    typer.echo(result.table())
    s = result.settings
    typer.echo(f"\n{s['runs']} runs after {s['warmup']} warm-up, {s['threads']} intra-op thread(s) pinned, 1 inter-op; "
               f"inputs: {s['inputs']}")
    if result.overhead_pct is not None:
        typer.echo(f"harness overhead: at most {result.overhead_pct:.3f}% of the mean latency")
    for line in result.not_measured():
        typer.echo(f"not measured: {line}")
    for path in result.write(out or default_out(artifacts[0], "bench")):
        typer.echo(f"written: {path}")


@app.command()
@_user_errors
def parity(
    artifact: Path = typer.Argument(..., help="An artifact folder (or a QDQ .onnx file)."),
    ep: str = typer.Option(..., "--ep", help="The execution provider to judge (cpu, vitisai, ...)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Judge on this recipe's validation set."),
    data: Optional[Path] = typer.Option(None, "--data", help="Or on this .npz (sample axis first, one array per input)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="The label array in --data (adds accuracy)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="At most this many samples."),
    min_sqnr: float = typer.Option(30.0, "--min-sqnr", help="Tolerance: SQNR of each output, dB."),
    max_rel_error: float = typer.Option(0.05, "--max-rel-error", help="Tolerance: max |diff| / output range."),
    min_agreement: float = typer.Option(99.0, "--min-agreement", help="Tolerance: top-1 agreement of a classifier, %."),
    lsb: int = typer.Option(1, "--lsb", help="Integer intermediates: more LSBs apart than this is a divergence."),
    localize: str = typer.Option("auto", "--localize", help="auto (when parity fails), always, never."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """An EP's outputs against the emulated NPU numerics; on failure, the first node that diverges (exit 4)."""
    from .core.fileio import dump_json, write_output
    from .tools.parity import Tolerance, parity as run_parity

    tolerance = Tolerance(min_sqnr_db=min_sqnr, max_rel_error=max_rel_error, min_top1_agreement=min_agreement, lsb=lsb)
    result = run_parity(artifact, ep, recipe=recipe, data=data, labels=labels, samples=samples, tolerance=tolerance,
                        localize=localize)
    typer.echo("\n".join(result.lines()))
    if json_out is not None:
        write_output(json_out, dump_json(result.to_json()), option="--json")
        typer.echo(f"written: {json_out}")
    result.raise_for_failure()


@app.command()
@_user_errors
def compare(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    formats: str = typer.Option("xint8,a8w8,a16w8,bf16", "--formats", help="Comma-separated formats."),
    targets: Optional[str] = typer.Option(None, "--targets", help="Comma-separated targets (default: the recipe's)."),
    bar: Optional[str] = typer.Option(None, "--bar", help="METRIC>=VALUE or METRIC<=VALUE (default: the recipe's gates)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder of the variants' runs (default: build/<name>-compare)."),
    force: bool = typer.Option(False, "--force", help="Rerun every stage of every variant."),
    runs: int = typer.Option(30, "--runs", help="Timed CPU runs per variant (p50)."),
) -> None:
    """Run RECIPE in several formats (shared cache); accuracy against cost, and the cheapest meeting the bar."""
    from .errors import GateError
    from .tools.compare import compare as run_compare

    def progress(variant) -> None:
        cached = sum(variant.stages.values())
        typer.echo(f"  {variant.label}: {variant.status} ({variant.seconds:.1f} s"
                   + (f", {cached}/{len(variant.stages)} stages cached)" if variant.stages else ")"), err=True)

    result = run_compare(recipe, formats=formats.split(","), targets=(targets or "").split(","), out=out, bar=bar,
                         force=force, runs=runs, on_variant=progress)
    typer.echo(result.table())
    typer.echo(f"\n{result.summary()}\n{len(result.variants)} variants in {result.seconds:.1f} s")
    for path in result.write():
        typer.echo(f"written: {path}")
    if result.bar is not None and result.chosen is None:
        raise GateError(f"compare: no variant of {recipe} meets the bar ({result.bar}); see {result.out / 'compare.html'}")


@app.command()
def recipes() -> None:
    """List the shipped recipes."""
    from .recipe import load_recipe

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            spec = load_recipe(path)
            typer.echo(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}: {spec.description}")
        except PipelineError as err:
            typer.echo(f"{path}: INVALID ({err})")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
