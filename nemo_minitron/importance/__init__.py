"""Activation-based importance: hooks collect statistics (:mod:`.hooks`), pure functions score
them (:mod:`.scores`), :mod:`.reduce` combines them across data/tensor/pipeline-parallel ranks."""
