"""The target dictionary a quantized model was made with, as the model records it, and the check
that a task's dictionary is that one.

A model scores the indices of its target dictionary: a data directory whose dictionary has the
same size but other symbols (two swapped, another SentencePiece model) decodes other words with
no error anywhere. What qswap writes records the dictionary's facts (``dictionary_facts``: special
indices, size, a hash of the symbols): a qswap checkpoint and a QAT checkpoint in their model cfg
(``CFG_KEY``), an export in its manifest; loading checks them (``mismatch``; ``check`` raises its
DataError).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

CFG_KEY = "qswap_dictionary"  # the model cfg's entry: a qswap or QAT checkpoint's dictionary facts


def dictionary_facts(dictionary) -> dict:
    """The target dictionary's special indices, size and a hash of its symbols."""
    symbols = "\n".join(dictionary.symbols).encode("utf-8")
    return {"bos": dictionary.bos(), "eos": dictionary.eos(), "pad": dictionary.pad(), "unk": dictionary.unk(),
            "size": len(dictionary), "symbols_sha256": hashlib.sha256(symbols).hexdigest()}


def recorded_facts(cfg_node: Any) -> dict | None:
    """The dictionary facts a model cfg records (``CFG_KEY``) as a plain dict, or None (a float
    checkpoint, or one written before qswap recorded them)."""
    from omegaconf import OmegaConf

    if cfg_node is None:
        return None
    value = cfg_node.get(CFG_KEY) if isinstance(cfg_node, Mapping) or OmegaConf.is_config(cfg_node) \
        else getattr(cfg_node, CFG_KEY, None)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) and value else None


def mismatch(recorded: dict | None, dictionary, where: str, made: str = "made with",
             advice: str = "pass the data directory the model was trained on") -> str | None:
    """Why ``dictionary`` is not the one ``recorded`` describes (a sentence naming both sizes,
    ``where`` the record is and ``advice``; ``made``: how the model came to record it, "made with"
    a checkpoint, "exported with" an export), or None where it is, or nothing is recorded. The one
    comparison of checkpoints, onnxruntime exports and integer exports."""
    if not recorded or dictionary is None:
        return None
    found = dictionary_facts(dictionary)
    if found == recorded:
        return None
    return (f"the task's target dictionary ({found['size']} symbols) is not the one the model was {made} "
            f"({recorded.get('size')} symbols{', other symbols' if found['size'] == recorded.get('size') else ''}, "
            f"recorded in {where}): its outputs would name other tokens; {advice}")


def check(recorded: dict | None, dictionary, where: str, **wording: str) -> None:
    """A DataError saying ``mismatch``'s sentence (``wording``: its ``made`` and ``advice``) where
    ``dictionary`` is not the one ``recorded`` describes; nothing where it is, or nothing is recorded."""
    problem = mismatch(recorded, dictionary, where, **wording)
    if problem is not None:
        from qswap.errors import DataError
        raise DataError(problem)
