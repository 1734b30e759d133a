"""What a batch reports: per-recipe outcomes, the table, the JSON summary and JUnit XML, and exit codes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path

from ..errors import PipelineError

__all__ = ["SEVERITY", "BatchError", "Shard", "RecipeOutcome", "BatchResult", "one_line", "status_for", "junit_xml"]

# Most severe first (see the package docstring); any other code ranks after these.
SEVERITY = (1, 2, 3, 5, 4)
_FAILURE_CODES = {3, 4, 5}


class BatchError(PipelineError):
    """The batch cannot start: no recipes, a bad --shard, duplicate recipe names or run folders."""

    exit_code = 2


@dataclass(frozen=True)
class Shard:
    """The `index`-th (1-based) of `count` disjoint slices of a sorted recipe list."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        head, sep, tail = text.partition("/")
        if sep and head.strip().isdigit() and tail.strip().isdigit():
            shard = cls(int(head), int(tail))
            if 1 <= shard.index <= shard.count:
                return shard
        raise BatchError(f"--shard: {text!r} is not i/n with 1 <= i <= n (e.g. 1/4)")

    def select(self, items: Sequence) -> list:
        """Round-robin over the sorted list: shards differ in size by at most one recipe."""
        return [item for position, item in enumerate(items) if position % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RecipeOutcome:
    """One recipe's result: what the summary table, the JSON summary and the JUnit testcase show."""

    recipe: str
    name: str
    status: str  # "passed" | "failed" | "error"
    exit_code: int
    message: str = ""  # one line; empty when passed
    detail: str = ""  # the full message (may span lines)
    target: str | None = None
    format: str | None = None
    gates: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    artifact: str | None = None
    log: str = ""

    @property
    def gate_summary(self) -> str:
        if not self.gates:
            return "-"
        passed = sum(1 for g in self.gates if g["passed"])
        return f"{passed}/{len(self.gates)} {'pass' if passed == len(self.gates) else 'FAIL'}"

    @property
    def cache_summary(self) -> str:
        cached = sum(1 for s in self.stages.values() if s.get("cached"))
        return f"{cached}/{len(self.stages)}" if self.stages else "-"

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("log")
        return data


def status_for(code: int) -> str:
    return "passed" if code == 0 else "failed" if code in _FAILURE_CODES else "error"


def one_line(message: str) -> str:
    """A possibly multi-line error message as one line (a recipe's error list is joined with '; ')."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


@dataclass
class BatchResult:
    outcomes: list[RecipeOutcome]
    jobs: int
    shard: Shard | None
    total: int  # recipes found before sharding
    seconds: float

    @property
    def exit_code(self) -> int:
        codes = {o.exit_code for o in self.outcomes if o.exit_code != 0}
        if not codes:
            return 0
        return min(codes, key=lambda c: SEVERITY.index(c) if c in SEVERITY else len(SEVERITY) + c)

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "error": 0}
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return counts

    def table(self) -> str:
        from ..report import format_table

        rows = [
            (o.name, o.target or "-", o.format or "-", o.gate_summary, o.cache_summary, f"{o.seconds:.1f} s",
             o.status.upper() if o.status != "passed" else o.status, o.artifact or "-")
            for o in self.outcomes
        ]
        header = ("recipe", "target", "format", "gates", "cached", "time", "status", "artifact")
        lines = [format_table(header, rows)] if rows else ["(no recipes in this shard)"]
        lines += [o.message if o.message.startswith(f"{o.name}:") else f"{o.name}: {o.message}"
                  for o in self.outcomes if o.status != "passed"]
        counts = self.counts()
        shard = f", shard {self.shard} of {self.total} recipes" if self.shard else ""
        lines.append(
            f"{len(self.outcomes)} recipe(s){shard}: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['error']} error(s) in {self.seconds:.1f} s with {self.jobs} job(s); exit code {self.exit_code}"
        )
        return "\n".join(lines)

    def summary(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "jobs": self.jobs,
            "shard": str(self.shard) if self.shard else None,
            "recipes_total": self.total,
            "seconds": round(self.seconds, 2),
            "recipes": [o.as_dict() for o in self.outcomes],
        }

    def write_summary(self, path: Path) -> None:
        from ..core.fileio import dump_json

        _write_report(path, dump_json(self.summary()), "--summary")

    def write_junit(self, path: Path) -> None:
        _write_report(path, junit_xml(self), "--junit")


def _write_report(path: Path, text: str, option: str) -> None:
    from ..core.fileio import atomic_write

    try:
        atomic_write(Path(path), text)
    except OSError as err:
        raise BatchError(f"{option}: cannot write {path} ({err.strerror or err})") from None


def _xml_text(text: str) -> str:
    """Drop the characters XML 1.0 cannot hold (terminal escapes, NULs) from captured output."""
    return "".join(c for c in text if c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd")
                   or c >= "\U00010000")


def junit_xml(result: BatchResult) -> str:
    """One <testcase> per recipe; gate, stage and readiness failures as <failure>, the rest as <error>."""
    import xml.etree.ElementTree as ET

    counts = result.counts()
    attrs = {"tests": str(len(result.outcomes)), "failures": str(counts["failed"]), "errors": str(counts["error"]),
             "skipped": "0", "time": f"{result.seconds:.3f}"}
    root = ET.Element("testsuites", {"name": "npu-pipeline batch", **attrs})
    suite_name = f"npu-pipeline batch{f' shard {result.shard}' if result.shard else ''}"
    suite = ET.SubElement(root, "testsuite", {"name": suite_name, **attrs})
    for o in result.outcomes:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"npu-pipeline.{o.target or 'unknown'}.{o.format or 'unknown'}",
            "name": o.name, "file": o.recipe, "time": f"{o.seconds:.3f}",
        })
        props = ET.SubElement(case, "properties")
        for key, value in (("recipe", o.recipe), ("exit_code", o.exit_code), ("artifact", o.artifact or ""),
                           ("gates", o.gate_summary), ("cached_stages", o.cache_summary)):
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
        if o.status != "passed":
            tag = "failure" if o.status == "failed" else "error"
            kind = {1: "InternalError", 2: "BadInput", 3: "StageError", 4: "GateError", 5: "ReadinessError"}
            element = ET.SubElement(case, tag, {"message": _xml_text(o.message), "type": kind.get(o.exit_code, "Error")})
            element.text = _xml_text(o.detail or o.message)
        if o.log:
            ET.SubElement(case, "system-out").text = _xml_text(o.log)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

