"""A safe evaluator for the config fields fairseq stores as Python expressions.

fairseq keeps some architecture fields as strings that it ``eval``s, for instance wav2vec 2.0's
``conv_feature_layers``, whose default is ``"[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2"``.
``ast.literal_eval`` rejects the ``+`` and ``*``, and ``eval`` runs anything. This evaluator
accepts the language those fields are written in and nothing more:

==========================  =====================================================
accepted                    example
==========================  =====================================================
integer literals            ``512`` (not ``True``, floats, strings)
list and tuple literals     ``[(512, 10, 5)]``
``+``                       int + int, list + list, tuple + tuple
``*``                       int * int, list * int, int * list (tuples likewise)
==========================  =====================================================

Anything else (names, calls, attributes, other operators, sequences longer than
``MAX_ITEMS``) raises a ``ConvertError`` that names the field.

>>> eval_config_expr("[(512, 10, 5)] + [(512, 3, 2)] * 2", "conv_feature_layers")
[(512, 10, 5), (512, 3, 2), (512, 3, 2)]
"""
from __future__ import annotations

import ast
from typing import Any

from qswap.errors import ConvertError

MAX_CHARS = 10_000  # the parser's recursion and memory stay small
MAX_ITEMS = 10_000  # the longest list or tuple a repetition or concatenation may build
MAX_INT = 2 ** 31  # no integer field of a model config is wider than int32


def eval_config_expr(text: str, field: str) -> Any:
    """The value of fairseq config field ``field`` written as ``text`` (see the module table)."""
    if not isinstance(text, str):
        raise ConvertError(f"config field '{field}' must be a string such as "
                           f"\"[(512, 10, 5)] + [(512, 3, 2)] * 4\", got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ConvertError(f"config field '{field}' is {len(text)} characters long "
                           f"(at most {MAX_CHARS}); write the list with repetitions (`[...] * n`)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ConvertError(f"config field '{field}' is not a valid expression: {text!r} ({err})") from None
    return _Evaluator(field, text).visit(tree.body)


class _Evaluator:
    def __init__(self, field: str, text: str):
        self.field, self.text = field, text

    def fail(self, what: str) -> ConvertError:
        return ConvertError(f"config field '{self.field}' = {self.text!r}: {what}; only integers, "
                            f"list/tuple literals, `+` and `*` are accepted")

    def visit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return self.bounded(node.value)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.visit(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            return self.binop(node.op, self.visit(node.left), self.visit(node.right))
        raise self.fail(f"{ast.unparse(node)!r} is not allowed")

    def binop(self, op: ast.operator, left: Any, right: Any) -> Any:
        if isinstance(op, ast.Add):
            if type(left) is type(right):  # int + int, list + list, tuple + tuple
                return self.bounded(left + right)
        else:
            if isinstance(left, int) and isinstance(right, int):
                return self.bounded(left * right)
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (list, tuple)) and isinstance(n, int):
                if n > 0 and len(seq) * n > MAX_ITEMS:
                    raise self.fail(f"a repetition of {len(seq)} items * {n} is longer than {MAX_ITEMS}")
                return seq * n
        name = "+" if isinstance(op, ast.Add) else "*"
        raise self.fail(f"cannot apply `{name}` to {type(left).__name__} and {type(right).__name__}")

    def bounded(self, value: Any) -> Any:
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise self.fail(f"the integer {value} is larger than {MAX_INT}")
        if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
            raise self.fail(f"a sequence of {len(value)} items is longer than {MAX_ITEMS}")
        return value
