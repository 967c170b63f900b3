"""Read tensors out of a torch.distributed.checkpoint directory without trusting its pickles.

megatron-core's ``torch_dist`` format is a DCP directory: ``.metadata`` (a pickle of DCP's
``Metadata``: global shape of every tensor, the chunks each rank wrote and where in which
``__R_N.distcp`` file each chunk lies) and the ``.distcp`` files, in which every chunk is one
``torch.save`` record. DCP itself reads ``.metadata`` with a plain ``pickle.load``, which runs any
code the file names. Here it goes through an unpickler that can build only DCP's own metadata
dataclasses, ``torch.Size`` and dtypes (anything else is refused), and chunks are read with
``torch.load(weights_only=True)``. Reads take a box of the global tensor and touch only the chunks
that overlap it, so a rank can read its slice without reading the whole tensor.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_planner

METADATA = ".metadata"

# The classes a DCP ``.metadata`` pickle is made of (plain dataclasses and enums); nothing here
# executes code when built.
_SAFE = {(c.__module__, c.__qualname__): c for c in (
    dcp_md.Metadata, dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata,
    dcp_md.TensorProperties, dcp_md.ChunkStorageMetadata, dcp_md.MetadataIndex,
    dcp_md.StorageMeta, dcp_md._MEM_FORMAT_ENCODING, dcp_fs._StorageInfo, dcp_planner.SavePlan,
    dcp_planner.WriteItem, dcp_planner.WriteItemType, dcp_planner.TensorWriteData, torch.Size)}
_SAFE[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
_SAFE[("collections", "OrderedDict")] = collections.OrderedDict


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not part of DCP's "
                                     "metadata; it is not loaded")


def read_metadata(path: Path) -> dcp_md.Metadata:
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not a readable torch.distributed.checkpoint metadata file "
                         f"({e}); re-save the checkpoint with megatron-core's torch_dist "
                         "format") from None


class DcpReader:
    """Global tensors of one DCP directory, read lazily and by slice."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.meta = read_metadata(self.dir / METADATA)
        sizes = {(fqn, tuple(c.offsets)): tuple(c.sizes)
                 for fqn, md in self.meta.state_dict_metadata.items()
                 if isinstance(md, dcp_md.TensorStorageMetadata) for c in md.chunks}
        self._where: dict[str, list] = {}  # fqn -> [(offsets, sizes, storage info)]
        for idx, info in self.meta.storage_data.items():
            box = (idx.fqn, tuple(idx.offset or ()))
            if box not in sizes:  # a bytes item (e.g. Transformer Engine's _extra_state)
                continue
            if getattr(info, "transform_descriptors", None):
                raise ValueError(f"{self.dir}: chunk {idx.fqn} is stored with transforms "
                                 f"{info.transform_descriptors}; only plain chunks are supported")
            self._where.setdefault(idx.fqn, []).append((box[1], sizes[box], info))
        self.bytes_read = 0

    def tensor_keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta.state_dict_metadata[key].properties.dtype

    def _chunk(self, info, sizes) -> torch.Tensor:
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        self.bytes_read += len(raw)
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True).reshape(sizes)

    def read(self, key: str, box: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The global tensor ``key``, or the part ``box`` of it (one step-1 slice per leading
        dimension), assembled from the chunks that overlap it."""
        if key not in self._where:
            raise KeyError(key)
        shape = self.shape(key)
        box = tuple(box or ()) + (slice(None),) * (len(shape) - len(box or ()))
        lo = [s.indices(n)[0] for s, n in zip(box, shape)]
        hi = [s.indices(n)[1] for s, n in zip(box, shape)]
        out = torch.empty([h - l for l, h in zip(lo, hi)], dtype=self.dtype(key))
        covered = 0
        for offsets, sizes, info in self._where[key]:
            a = [max(l, o) for l, o in zip(lo, offsets)]
            b = [min(h, o + n) for h, o, n in zip(hi, offsets, sizes)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            chunk = self._chunk(info, sizes)
            src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, offsets))
            dst = tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))
            out[dst] = chunk[src]
            covered += out[dst].numel()
        if covered != out.numel():
            raise ValueError(f"{self.dir}: the chunks of {key} do not cover {box}; the checkpoint "
                             "is incomplete")
        return out
