"""Packed fixed-length training samples over an indexed dataset, with a document-level hold-out.

The documents of a split (each already ending with EOD, as :func:`~nemo_minitron.data.indexed.build_indexed`
writes them) are one token stream, cut into samples of ``seq_length + 1`` tokens that overlap by one
token: sample ``i`` is ``stream[i*L : i*L + L + 1]``, ``tokens = sample[:-1]``, ``labels = sample[1:]``
(Megatron's GPT convention). Documents are only cut by this token window, never by characters; the
tail shorter than one window is dropped.

The validation split is a fixed set of whole documents, the last ``valid_fraction`` of them (at least
one), so train and valid never share a document; it does not depend on ``seq_length`` or the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import numpy as np
import torch

from nemo_minitron.data.indexed import open_indexed

SPLITS = ("train", "valid")


class PackedSequences:
    """Samples of ``seq_length`` tokens (+1 for the shifted labels) from one split of ``prefix``.

    ``seed`` is the default seed of :meth:`batches` when shuffling.
    """

    def __init__(
        self,
        prefix: Union[str, Path],
        seq_length: int,
        split: str = "train",
        valid_fraction: float = 0.05,
        seed: int = 1234,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        self.prefix = str(prefix)
        self.seq_length = seq_length
        self.split = split
        self.valid_fraction = valid_fraction
        self.seed = seed

        ds = open_indexed(prefix)
        index = ds.index
        self.dtype = np.dtype(index.dtype)
        lengths = index.sequence_lengths.astype(np.int64)
        pointers = index.sequence_pointers.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if not np.array_equal(pointers, starts * self.dtype.itemsize):
            raise ValueError(f"{prefix}.bin does not store its sequences contiguously")
        doc_seq = index.document_indices.astype(np.int64)  # sequence index where each doc starts
        n_docs = len(doc_seq) - 1
        seq_offsets = np.concatenate([[0], np.cumsum(lengths)])
        doc_offsets = seq_offsets[doc_seq]  # token offset of each document boundary
        del ds

        if valid_fraction > 0:
            if n_docs < 2:
                raise ValueError(
                    f"{prefix} has {n_docs} document(s); holding out a validation document needs "
                    "at least 2; add documents (`minitron data` writes one per JSONL line and "
                    "per text file, a text file splitting at blank lines only every ~1M "
                    "characters)"
                )
            n_valid = min(n_docs - 1, max(1, int(round(n_docs * valid_fraction))))
        else:
            n_valid = 0
        n_train = n_docs - n_valid
        first, last = (0, n_train) if split == "train" else (n_train, n_docs)
        self.num_documents = last - first
        self.document_range = (int(first), int(last))  # [first, last) document ids of the split
        self._start = int(doc_offsets[first])
        self._end = int(doc_offsets[last])
        self.num_tokens = self._end - self._start
        self._num_samples = max(0, (self.num_tokens - 1) // seq_length)
        if self._num_samples == 0:
            raise ValueError(
                f"split {split!r} of {prefix} has {self.num_tokens} tokens in "
                f"{self.num_documents} documents, fewer than one sample needs "
                f"(seq_length + 1 = {seq_length + 1}); use a smaller seq_length or more data"
                + (" (or a larger valid_fraction)" if split == "valid" else "")
            )
        self._bin: Optional[np.ndarray] = None

    # the memmap is opened lazily and not pickled, so the object can go to DataLoader workers
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_bin"] = None
        return state

    @property
    def _stream(self) -> np.ndarray:
        if self._bin is None:
            self._bin = np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r")
        return self._bin[self._start:self._end]

    def __len__(self) -> int:
        return self._num_samples

    def window(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` raw tokens of sample ``i``."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        L = self.seq_length
        return np.asarray(self._stream[i * L:i * L + L + 1], dtype=np.int64)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        w = torch.from_numpy(self.window(int(i)))
        L = self.seq_length
        return {
            "tokens": w[:-1].clone(),
            "labels": w[1:].clone(),
            # 1 everywhere: packed samples hold no padding (the field is kept for padded loaders)
            "loss_mask": torch.ones(L, dtype=torch.float32),
            "position_ids": torch.arange(L, dtype=torch.int64),
        }

    def batches(
        self,
        micro_batch_size: int,
        *,
        num_batches: Optional[int] = None,
        shuffle: bool = False,
        seed: Optional[int] = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        with_index: bool = False,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Micro-batches of this data-parallel rank: ``[micro_batch_size, seq_length]`` tensors.

        Each global batch is ``micro_batch_size * dp_size`` consecutive samples of the (optionally
        shuffled) order; rank ``r`` takes the ``r``-th slice of ``micro_batch_size``, so ranks never
        share a sample and together cover the global batch. An incomplete last global batch is
        dropped. ``num_batches=None`` gives one pass; a larger ``num_batches`` than one pass holds
        starts another pass (reshuffled with ``seed + pass`` when ``shuffle``). ``with_index``
        adds ``sample``: the int64 sample numbers of the batch (what an offline teacher cache is
        keyed by).
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        global_batch = micro_batch_size * dp_size
        per_pass = len(self) // global_batch
        if per_pass == 0:
            raise ValueError(
                f"split {self.split!r} has {len(self)} samples of {self.seq_length} tokens, fewer "
                f"than one global batch (micro_batch_size {micro_batch_size} x dp_size {dp_size} "
                f"= {global_batch}); use a smaller batch or seq_length, or more data"
            )
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        total = per_pass if num_batches is None else num_batches
        seed = self.seed if seed is None else seed
        done = 0
        epoch = 0
        while done < total:
            if shuffle:
                order = np.random.default_rng(seed + epoch).permutation(len(self))
            else:
                order = np.arange(len(self))
            for g in range(per_pass):
                if done == total:
                    return
                lo = g * global_batch + dp_rank * micro_batch_size
                picked = order[lo:lo + micro_batch_size]
                samples = [self[int(j)] for j in picked]
                batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
                if with_index:
                    batch["sample"] = torch.as_tensor(np.asarray(picked, dtype=np.int64))
                yield batch
                done += 1
            epoch += 1


def step_batches(data: PackedSequences, step: int, global_batch_size: int, micro_batch_size: int,
                 *, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 with_index: bool = False) -> list:
    """The micro-batches of training step ``step`` for one data-parallel rank, in the order a
    training run reads them: each pass over the data is one ``seed + pass`` shuffle, cut into
    global batches. Training and the offline teacher cache both read through here, so the cache
    holds exactly the samples a run with the same data, seq length, seed and batch will need."""
    n_micro = global_batch_size // (micro_batch_size * dp_size)
    per_epoch = len(data) // global_batch_size
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(data)} samples, fewer than one global "
                         f"batch of {global_batch_size}")
    epoch, k = divmod(step, per_epoch)
    it = data.batches(micro_batch_size, num_batches=(k + 1) * n_micro, shuffle=True,
                      seed=seed + epoch, dp_rank=dp_rank, dp_size=dp_size, with_index=with_index)
    return [b for i, b in enumerate(it) if i >= k * n_micro]
