"""A yaml.SafeLoader that remembers the line of every mapping key, so recipe errors can say
``file:line: key 'bits': ...``. Duplicate keys are errors (plain YAML keeps the last one); a key
written beside a merge (``<<: *anchor``) overrides the merged one, as YAML's merge key says."""
from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    """A dict from YAML with ``lines[key]`` = 1-based line of that key."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}
        self.line: int | None = None


class LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode) -> LineDict:
    """The mapping, with its keys' lines. A key the mapping writes itself overrides one it merges
    (``<<: *w``); two of its own keys alike are an error."""
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # the merged pairs first, then the mapping's own
    merged = len(node.value) - own
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    own_keys = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in own_keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        if i >= merged:
            own_keys.add(key)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(text: str) -> Any:
    return yaml.load(text, Loader=LineLoader)  # noqa: S506 - LineLoader is a SafeLoader
