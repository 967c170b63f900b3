"""Multi-rank workers, each launched by ``tests.helpers.proc.torchrun`` as ``-m tests.workers.<name>``."""
