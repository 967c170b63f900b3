"""`minitron pipeline ARGS` that SIGKILLs itself at one point inside a stage, as `kill -9` from
outside would, but at a chosen point rather than a moment (tiny stages last milliseconds):

    python pipeline_killed.py POINT pipeline ARGS...

POINT is ``none`` (run to completion) or ``KIND:PATH`` where PATH ends the output path:
``commit:PATH``  inside a save: its temporary directory is written, not yet renamed;
``step:PATH@N``  mid-training: run directory PATH, before step N is logged (the newest checkpoint
                 is older than step N, the steps after it are lost);
``result:PATH``  while writing a results file: its temporary copy is written, not yet renamed.
"""

import os
import signal
import sys


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    kind, _, where = point.partition(":")
    if kind == "commit":
        from nemo_minitron.artifacts import atomic

        real_commit = atomic.commit_dir

        def commit(tmp, final):
            if str(final).endswith(where):
                die()
            return real_commit(tmp, final)

        atomic.commit_dir = commit
    elif kind == "step":
        from nemo_minitron.distill import logger

        run, _, n = where.rpartition("@")
        real_write = logger.Logger.write

        def write(self, step, metrics):
            if self.file and self.file.name.endswith(f"{run}/metrics.jsonl") and step == int(n):
                die()
            return real_write(self, step, metrics)

        logger.Logger.write = write
    elif kind == "result":
        from nemo_minitron.artifacts import atomic

        real_atomic = atomic.write_file

        def write_file(path, write):
            if str(path).endswith(where):
                return real_atomic(path, lambda tmp: (write(tmp), die()))
            return real_atomic(path, write)

        atomic.write_file = write_file
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    kill_at(sys.argv[1])
    from nemo_minitron.cli.main import main

    main(sys.argv[2:])
