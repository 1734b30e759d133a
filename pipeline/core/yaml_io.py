"""YAML as the pipeline reads it: safe (no Python objects), bounded, and strict about duplicate keys.

`yaml.safe_load` alone has three traps for a config file:
- an alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ...) is cheap for PyYAML, which shares the aliased
  objects, but every consumer that walks the result (pydantic included) expands it: 113 s and 3 GB;
- deep nesting (`[[[[...]]]]`) makes the recursive composer hit Python's recursion limit;
- a repeated key silently keeps the last value.
The loader below counts nesting while composing, counts the nodes of the document with every alias
expanded (memoised per node, so the count itself stays cheap), and refuses a key that a mapping repeats.
Limits: `pipeline.core.limits` (yaml_depth, yaml_nodes, recipe_bytes).
"""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from ..errors import PipelineError
from .limits import exceeded, limit

__all__ = ["load_yaml"]

_MERGE = "tag:yaml.org,2002:merge"


class _LimitHit(Exception):
    def __init__(self, name: str, value: int | None, mark) -> None:
        super().__init__(name)
        self.name, self.value, self.mark = name, value, mark


class _DuplicateKey(Exception):
    def __init__(self, key: object, first, mark) -> None:
        super().__init__(key)
        self.key, self.first, self.mark = key, first, mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with a nesting limit, an expanded-size limit and duplicate-key detection."""

    def __init__(self, stream, max_depth: int, max_nodes: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth
        self._max_nodes = max_nodes

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _LimitHit("yaml_depth", None, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, 1, _Budget(self._max_nodes, self._max_depth), {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first_seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue  # `<<: *base` merges keys on purpose; an explicit key then overrides them
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error says so
                if earlier is not None:
                    raise _DuplicateKey(key, earlier, key_node.start_mark)
                first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


class _Budget:
    def __init__(self, nodes: int, depth: int) -> None:
        self.nodes, self.depth = nodes, depth


def _expanded_size(node: Node, depth: int, budget: _Budget, memo: dict, active: set[int]) -> tuple[int, int]:
    """(nodes, height) of `node` with every alias expanded, stopping as soon as the count passes the
    budget. Aliases of aliases nest deeper than the text shows, so the expanded depth is bounded too."""
    known = memo.get(id(node))
    if known is None:
        if id(node) in active:
            raise _LimitHit("yaml_alias_cycle", None, node.start_mark)
        if depth > budget.depth:
            raise _LimitHit("yaml_depth", None, node.start_mark)
        active.add(id(node))
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size, height = 1, 1
        for child in children:
            child_size, child_height = _expanded_size(child, depth + 1, budget, memo, active)
            size, height = size + child_size, max(height, child_height + 1)
            if size > budget.nodes:
                raise _LimitHit("yaml_nodes", None, node.start_mark)
        active.discard(id(node))
        known = memo[id(node)] = (size, height)
    if depth + known[1] - 1 > budget.depth:
        raise _LimitHit("yaml_depth", None, node.start_mark)
    return known


def load_yaml(text: str, *, source: str, error: type[PipelineError]):
    """Parse one YAML document; every problem (syntax, duplicate key, a limit) raises `error` with one
    message naming `source` and the line."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit("recipe_bytes"):
        raise error(exceeded("recipe_bytes", source, size))
    loader = _StrictLoader(text, limit("yaml_depth"), limit("yaml_nodes"))
    try:
        return loader.get_single_data()
    except _LimitHit as hit:
        where = f"{source}: line {hit.mark.line + 1}" if hit.mark is not None else source
        if hit.name == "yaml_alias_cycle":
            raise error(f"{where}: an alias refers to the node that contains it (a recursive structure); "
                        "remove the cycle") from None
        raise error(exceeded(hit.name, where, hit.value)) from None
    except _DuplicateKey as dup:
        raise error(
            f"{source}: line {dup.mark.line + 1}: key {dup.key!r} appears twice in one mapping (first on line "
            f"{dup.first.line + 1}); keep one (YAML would silently use the last)"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up: the line to look at
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{source}: not valid YAML: {where}{problem}") from None
    finally:
        loader.dispose()
