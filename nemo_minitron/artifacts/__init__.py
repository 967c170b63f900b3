"""Every file a run writes or reads, in one place.

- :mod:`.atomic`: the one file primitive (:func:`~.atomic.write_file`: temporary sibling, fsync,
  rename) and the one directory primitive (:func:`~.atomic.new_dir`, or
  :func:`~.atomic.begin_dir` / :func:`~.atomic.commit_dir` for collective saves);
- typed read/write pairs, one module per producer: :mod:`.checkpoint_meta` (``minitron.json``),
  :mod:`.evaluation` (``eval_*.json``), :mod:`.metrics` (``metrics.jsonl``),
  :mod:`.pipeline_files` (``summary.json``, ``stage_seconds.json``), :mod:`.search_files`
  (``candidates.json``, ``chosen.json``, ``diverged.json``), :mod:`.reports` (Markdown, PNG).

``arch.json``, ``plan.json`` and ``importance.safetensors`` belong to their typed classes (``Arch``,
``pruning.plan.Plan``, ``importance.reduce.Importance``), whose save methods write through
:mod:`.atomic`. This package imports nothing else of nemo_minitron, so every layer may use it.
"""
