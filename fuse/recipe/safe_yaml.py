"""YAML read with its aliases bounded: an anchor bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ...) takes a few hundred
bytes to write and billions of values once anything copies or serializes it (a fingerprint, `--set`, `extends`), in
any free-form mapping of the recipe. The document's node graph is measured as if every alias were written out,
before a single Python object is built."""

from __future__ import annotations

from typing import Any

import yaml

from fuse.recipe.base import RecipeError

MAX_ALIAS_EXPANSION = 100_000  # values aliases may add to a document; real recipes add tens
CHARS_PER_VALUE = 100  # a long string counts as one value per this many characters


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load of `text`, refusing (RecipeError naming the key) a document whose aliases would expand it by
    more than MAX_ALIAS_EXPANSION values, or an alias that contains itself. Raises yaml.YAMLError as safe_load does."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_alias_expansion(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError(f"{source}: the YAML is nested too deeply") from None
    finally:
        loader.dispose()


def check_alias_expansion(root: yaml.Node, source: str, limit: int = MAX_ALIAS_EXPANSION) -> None:
    sizes: dict[int, int] = {}
    references: dict[int, int] = {}
    written = _measure(root, (), sizes, references, set(), source)
    added = sizes[id(root)] - written
    if added > limit:
        raise RecipeError(
            f"{source}: {_heaviest_path(root, sizes, references, limit)}: YAML aliases (*name) expand this to "
            f"{sizes[id(root)]:,} values, {added:,} more than written (at most {limit:,}); write the values out"
        )


def _weight(node: yaml.Node) -> int:
    return 1 + len(node.value) // CHARS_PER_VALUE if isinstance(node, yaml.ScalarNode) else 1


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """(key, child) of a sequence (its indices) or a mapping (its keys, then values); a scalar has none."""
    if isinstance(node, yaml.SequenceNode):
        return [(str(index), child) for index, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key, value in node.value:
            name = str(key.value)[:80] if isinstance(key, yaml.ScalarNode) else "<key>"
            pairs += [(name, key), (name, value)]
        return pairs
    return []


def _measure(
    node: yaml.Node,
    path: tuple[str, ...],
    sizes: dict[int, int],
    references: dict[int, int],
    open_nodes: set[int],
    source: str,
) -> int:
    """Fills `sizes` (each node's size with aliases expanded) and `references` (how often each node is reached);
    returns the size of what was written (each node counted once)."""
    key = id(node)
    references[key] = references.get(key, 0) + 1
    if key in sizes:
        return 0
    if key in open_nodes:
        raise RecipeError(f"{source}: {'.'.join(path) or '(top level)'}: a YAML alias that contains itself")
    open_nodes.add(key)
    written, expanded = _weight(node), _weight(node)
    for name, child in _children(node):
        written += _measure(child, (*path, name), sizes, references, open_nodes, source)
        expanded += sizes[id(child)]
    open_nodes.discard(key)
    sizes[key] = expanded
    return written


def _heaviest_path(root: yaml.Node, sizes: dict[int, int], references: dict[int, int], limit: int) -> str:
    """The key whose value holds the expansion: down the heaviest child while it is over `limit` and written once
    (not an alias)."""
    path, node = [], root
    while True:
        heavy = [
            (sizes[id(child)], name, child) for name, child in _children(node) if sizes[id(child)] > limit
        ]
        if not heavy:
            break
        _, name, child = max(heavy, key=lambda item: item[0])
        if references[id(child)] > 1:
            break
        path.append(name)
        node = child
    return ".".join(path) or "(top level)"
