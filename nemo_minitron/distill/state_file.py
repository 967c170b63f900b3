"""Nested training state (optimizer, RNG, small modules) in one safetensors file, no pickle.

An optimizer's ``state_dict()`` is a tree of dicts (integer or string keys), lists, tuples,
numbers, strings, None and tensors. :func:`save` stores every tensor in a safetensors file and
the rest of the tree as JSON in that file's metadata, tensors replaced by their key. Reading it
back parses a JSON header and raw tensor bytes only: a file from a copied or tampered run
directory cannot run code, unlike ``torch.load(weights_only=False)``. A tensor referenced twice
(megatron hands every parameter the same Adam ``step`` tensor) is stored once and comes back as
one tensor, as it would through pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TREE = "nemo_minitron.tree"


class StateFileError(ValueError):
    """A training-state file that cannot be read (truncated, not safetensors, foreign)."""


def _encode(obj, tensors: dict, ids: dict):
    if torch.is_tensor(obj):
        key = ids.get(id(obj))
        if key is None:
            key = ids[id(obj)] = f"t{len(tensors)}"
            # cloned: safetensors refuses tensors that share storage (views of one buffer)
            tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors, ids) for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__intdict__": [[k, _encode(v, tensors, ids)] for k, v in obj.items()]}
        raise TypeError(f"state dict keys must be all str or all int, got {list(obj)[:3]}")
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, ids) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, ids) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training-state file")


def _decode(node, tensors: dict):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__dict__" in node:
        return {k: _decode(v, tensors) for k, v in node["__dict__"].items()}
    if "__intdict__" in node:
        return {int(k): _decode(v, tensors) for k, v in node["__intdict__"]}
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    raise StateFileError(f"unknown node {sorted(node)[:3]} in a training-state tree")


def save(path, tree) -> None:
    tensors, ids = {}, {}
    skeleton = json.dumps(_encode(tree, tensors, ids))
    save_file(tensors, str(path), metadata={TREE: skeleton})


def check(path) -> None:
    """Raise :class:`StateFileError` unless ``path`` is a complete state file (header only)."""
    _open(path)


def _open(path):
    try:
        f = safe_open(str(path), framework="pt")
        meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for truncated/foreign files
        raise StateFileError(f"{path} is not a readable safetensors file ({e})") from None
    if TREE not in meta:
        raise StateFileError(f"{path} is a safetensors file but not a nemo_minitron "
                             "training-state file (no state tree in its metadata)")
    return f


def load(path):
    """The tree written by :func:`save` (tensors on the CPU)."""
    f = _open(path)
    try:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        node = json.loads(f.metadata()[TREE])
    except StateFileError:
        raise
    except Exception as e:
        raise StateFileError(f"{path} cannot be read ({e})") from None
    return _decode(node, tensors)
