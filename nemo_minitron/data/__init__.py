"""Data: text sources -> tokenised indexed datasets -> packed, data-parallel training batches.

- :mod:`.sources` / :mod:`.wiki`: documents from .txt, .jsonl and Wikipedia XML dumps;
- :mod:`.indexed`: ``build_indexed`` into megatron-core ``.bin``/``.idx`` (+ ``.json`` metadata);
- :mod:`.packed`: ``PackedSequences``, fixed-length samples with a document-level train/valid split.
"""
