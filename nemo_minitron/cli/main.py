"""`minitron` entry point: dispatch `minitron <stage> ...` to that stage's run function.

:data:`STAGES` is the one table of commands: each names the config it composes from
``conf/<config>.yaml`` (validated into the schema's job dataclass), the pure ``run(job) -> dict``
that does the work (in the package that does it, testable without Hydra), and a line of help.
Everything after the stage name is handed to Hydra unchanged: overrides, ``--help``,
``--cfg job``, ``-m`` multirun. Works the same under ``torchrun ... -m nemo_minitron``.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """One `minitron <stage>`. ``run`` is "module:function", imported only when the command runs
    (`minitron --help` loads no torch): ``run(job) -> dict`` for a Hydra command, or, for a plain
    one (``config=None``), a ``main()`` that parses ``sys.argv`` itself."""

    config: str | None
    run: str
    help: str

    def function(self):
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


STAGES = {
    "import": Command("import", "nemo_minitron.import_export:run_import",
                      "Hugging Face model (dir, hub name, GGUF) or Megatron checkpoint "
                      "-> checkpoint"),
    "export": Command("export", "nemo_minitron.import_export:run_export",
                      "checkpoint -> Hugging Face directory (or Megatron checkpoint)"),
    "data": Command("data_prep", "nemo_minitron.data.run:run",
                    "text/JSONL/Wikipedia -> indexed dataset (.bin/.idx)"),
    "evaluate": Command("evaluate", "nemo_minitron.evaluate.run:run",
                        "validation loss and perplexity of a checkpoint"),
    "prune": Command("prune", "nemo_minitron.pruning.run:prune",
                     "activation-importance width/depth pruning to targets"),
    "search": Command("search", "nemo_minitron.search.run:run_search",
                      "rank architectures at a parameter budget by short distillation"),
    "distill": Command("distill", "nemo_minitron.distill.trainer:run_distill",
                       "train a student from a frozen teacher (co-located or cached)"),
    "teacher_cache": Command("teacher_cache", "nemo_minitron.distill.teacher_cache:build",
                             "teacher top-k log-probs of a run's tokens, once"),
    "finetune": Command("finetune", "nemo_minitron.distill.trainer:run_finetune",
                        "teacher correction: LM-loss training on the corpus"),
    "pipeline": Command("pipeline", "nemo_minitron.pipeline:run_pipeline",
                        "correct -> prune -> distill -> evaluate -> export, in rounds"),
    # not Hydra apps: they parse their own arguments (positional run directories; another tool's
    # command line), and `minitron <stage> --help` prints their usage
    "report": Command(None, "nemo_minitron.cli.report:main",
                      "compare runs side by side: Markdown table + loss curves"),
    "lm_eval": Command(None, "nemo_minitron.evaluate.lm_eval_adapter:main",
                       "lm-evaluation-harness tasks on a checkpoint"),
}
PLAIN_STAGES = frozenset(k for k, c in STAGES.items() if c.config is None)

USAGE = """usage: minitron <stage> [key=value ...] [--help] [--cfg job] [-m]
       minitron report RUN_DIR [RUN_DIR ...] [output=FILE.md]
       minitron lm_eval --model_args checkpoint=DIR --tasks TASK[,TASK] [lm_eval options]

Minitron compression toolkit: prune and distill LLMs on megatron-core.

stages:
{stages}

Each stage is a Hydra app configured from conf/<stage>.yaml (conf/data_prep.yaml for data);
`minitron <stage> --help` shows its config and groups, `minitron <stage> --cfg job` prints the
resolved config without running.
`report` and `lm_eval` are not Hydra apps: they take plain arguments (run directories; the
lm-evaluation-harness command line) and `--help` prints their own usage.
Distributed: torchrun --nproc-per-node=N -m nemo_minitron <stage> parallel.tp=2 ...
"""


def conf_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "conf"
    if not (here / "evaluate.yaml").is_file():
        raise FileNotFoundError(f"config directory {here} not found: install the package from a "
                                "source checkout with `pip install -e .`")
    return here


def usage() -> str:
    return USAGE.format(stages="\n".join(f"  {k:<13} {c.help}" for k, c in STAGES.items()))


def hydra_app(stage: str):
    """Compose the stage's config with Hydra (argv overrides), validate, call its ``run(job)``,
    imported only then: `--help`, `--cfg job` and a refused job load no model code."""
    import hydra

    from ..config import schema

    schema.register()
    config_name = STAGES[stage].config

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _main(cfg):
        from .. import preflight
        from ..artifacts import output_lock

        try:
            job = schema.to_job(cfg)
        except Exception as e:  # validation: one clear line, no traceback
            _fail(stage, e, same_on_all_ranks=True)
        try:  # the small files the job will read, before any model or output exists
            preflight.check(stage, job)
        except (ValueError, OSError) as e:
            _fail(stage, e, same_on_all_ranks=True)
        run_fn = STAGES[stage].function()
        out, held = getattr(job, "output", None), None
        if out and _rank() == 0:  # one live job per output (rank 0 speaks for its job)
            try:
                held = output_lock.acquire(out)
            except ValueError as e:
                _fail(stage, e)
        try:
            return _run_stage(stage, cfg, job, run_fn)
        finally:
            output_lock.release(held)

    def _run_stage(stage, cfg, job, run_fn):
        say_auto_dtype(cfg, job)
        if stage in RUN_DIR_STAGES:
            record_run(stage, cfg, job.output)
        ok = False
        # a caller that set up torch.distributed itself (a test session, a notebook) keeps it
        torch = sys.modules.get("torch")  # not imported yet: nothing is initialised
        owned = torch is None or not torch.distributed.is_initialized()
        try:
            result = run_fn(job)
            ok = True
            return result
        except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors, not bugs
            _fail(stage, e)
        except RuntimeError as e:
            lost = _lost_peer(e)
            if lost:  # another rank died or hung: this one only saw its collective fail
                _fail(stage, ValueError(lost))
            if not getattr(e, "same_on_all_ranks", False):  # a bug: Hydra shows the traceback
                raise
            _fail(stage, e)  # an expected stop, e.g. a diverged training run
        except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback per rank
            _interrupted(stage)
        finally:
            from ..runtime import dist

            # After a failure in a multi-rank job the process group is left alone: destroying it
            # can block on peers still waiting in a collective; main() ends the rank instead.
            if owned and (ok or dist.launched_world_size() == 1):
                dist.shutdown()

    return _main()


def say_auto_dtype(cfg, job) -> None:
    """One line (rank 0) on what ``model.dtype=auto`` became here and why: the same command runs
    bf16 on one machine and fp32, about twice as long, on another."""
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is None or model.get("dtype") != "auto":
        return
    from ..runtime import dist
    from ..runtime.precision import auto_reason

    if dist.read_env().rank == 0:
        logging.getLogger("nemo_minitron").info("model.dtype=auto -> %s: %s", job.model.dtype,
                                                auto_reason())


# Stages whose output is a run directory that grows over resumed invocations: each invocation's
# resolved config and log go to <output>/hydra/<time>/, written only once the checks passed
# (Hydra's own run directory is off for every stage: conf/<stage>.yaml sets hydra.run.dir=.).
RUN_DIR_STAGES = frozenset({"search", "pipeline"})


def record_run(stage: str, cfg, output: str) -> Path | None:
    """Resolved config, command line and a log file under <output>/hydra/<time>/ (rank 0)."""
    from omegaconf import OmegaConf

    from ..recipe_record import LOG_DIR
    from ..runtime import dist

    if dist.read_env().rank != 0:
        return None
    base = Path(output) / LOG_DIR / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    d, n = base, 0
    while True:  # the jobs of a sweep may start within the same second
        try:
            d.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            d = base.with_name(f"{base.name}_{n}")
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (d / "overrides.yaml").write_text(OmegaConf.to_yaml(sys.argv[1:]))
    handler = logging.FileHandler(d / f"{stage}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return d


def one_line(err) -> str:
    """An error (or its text) as one line: OmegaConf/Hydra messages span several (key, object
    type, hints)."""
    lines = [x.strip() for x in str(err).splitlines()]
    lines = [x for x in lines if x and not x.startswith(("object_type", "Set the environment"))]
    return "".join(x + ("" if i == len(lines) - 1 else " " if x.endswith(".") else "; ")
                   for i, x in enumerate(lines))


RESUMING_STAGES = frozenset({"finetune", "distill", "search", "pipeline", "teacher_cache"})


def _rank() -> int:
    """The launcher's rank variable, as runtime.dist.read_env reads it, without importing
    torch (1.8 s): a mistyped stage or a refused config answers at once."""
    env = os.environ
    return int(env.get("RANK", env.get("SLURM_PROCID", 0)) or 0)


def _say(line: str) -> None:
    """One write per line: under torchrun (``python -u``) print's text and newline are two
    writes, and two ranks' lines ran together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _interrupted(stage: str):
    if _rank() == 0:
        again = ("resumes from the last checkpoint or finished stage" if stage in RESUMING_STAGES
                 else "starts it again")
        _say(f"minitron {stage}: interrupted; the same command {again}")
    sys.exit(130)


def _fail(stage: str, err: Exception, same_on_all_ranks: bool = False):
    """One line and exit status 2. An error every rank meets alike (the config, the files
    preflight reads, ``same_on_all_ranks`` errors) is said by rank 0; another rank says it only
    if rank 0 has not ended the job within a few seconds (a file only its node lacks)."""
    cause = err
    while getattr(cause, "__cause__", None) is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    msg = str(cause).split("\n    full_key")[0]
    from ..runtime import dist

    same = same_on_all_ranks or getattr(err, "same_on_all_ranks", False)
    rank = _rank()
    if same and rank != 0 and dist.launched_world_size() > 1:
        time.sleep(5)  # the launcher stops this rank when rank 0 exits with the error
        _say(f"minitron {stage}: error (rank {rank}): {one_line(msg)}")
    else:
        _say(f"minitron {stage}: error: {one_line(msg)}")
    sys.exit(2)


def _lost_peer(err: BaseException) -> str | None:
    """The one-line cause of a collective that failed because another rank died or hung."""
    from ..runtime import dist

    text = str(err)
    signs = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
             "Broken pipe", "NCCL communicator was aborted")
    dist_error = getattr(getattr(sys.modules.get("torch"), "distributed", None),
                         "DistBackendError", ())
    if dist.launched_world_size() > 1 and (isinstance(err, dist_error) or
                                           any(s in text for s in signs)):
        return ("lost contact with another rank in a collective (it died, was killed, or hung "
                "past parallel.timeout_s); see that rank's output for why; rerunning the same "
                f"command resumes where it can ({one_line(text)[:200]})")
    return None


def check_overrides(stage: str, args: list[str]) -> None:
    """Parse and compose the overrides before Hydra does, to report a bad one in one line (Hydra
    prints several, and a lexer error on ``<|`` gets a quoting hint). With flags (--help, --cfg,
    -m sweeps) only the parse is done; composing is left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..config import schema

    parser = OverridesParser.create()
    for a in args:
        if a.startswith("-") or "=" not in a:  # a flag, or a flag's value (--cfg job)
            continue
        try:
            parser.parse_override(a)
        except HydraException as e:
            hint = ""
            # special tokens such as <|end_of_text|>; paths such as /data/café
            what = "'<' or '|'" if "<" in a or "|" in a else \
                "non-ASCII characters" if not a.isascii() else None
            if what:
                key, _, value = a.partition("=")
                hint = (f"; Hydra cannot read {what} unquoted: quote the value for Hydra "
                        f"inside the shell's quotes, e.g. \"{key}='{value.strip(chr(39))}'\"")
            _fail(stage, ValueError(f"cannot parse override {a!r}: {one_line(e)}{hint}"),
                  same_on_all_ranks=True)
    if any(a.startswith("-") for a in args):
        return
    schema.register()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(STAGES[stage].config, overrides=args)
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra's hint for a key the config lacks is "use +key=value", which a typed setting
        # refuses as well: name the setting meant instead (a free-form model.arch key keeps it)
        _fail(stage, unknown_key_error(stage, args, e)
              or ValueError(one_line(f"{e}; {e.__cause__ or ''}")), same_on_all_ranks=True)
    try:
        schema.check_known_keys(cfg)
    except ValueError as e:
        _fail(stage, e, same_on_all_ranks=True)


def unknown_key_error(stage: str, args: list[str], err: Exception) -> ValueError | None:
    """Why ``key=value`` cannot be set, when ``+key=value`` (Hydra's hint) is no setting either."""
    from hydra import compose, initialize_config_dir

    from ..config import schema

    hint = "To append to your config use +"
    text = str(err)
    if hint not in text:
        return None
    plus = text.split(hint, 1)[1].split()[0]
    key = plus.split("=", 1)[0]
    args = ["+" + a if a.split("=", 1)[0] == key else a for a in args]
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            schema.check_known_keys(compose(STAGES[stage].config, overrides=args))
    except ValueError as e:
        return e
    except Exception:  # another reason the '+' form fails: Hydra's own message stands
        return None
    return None


def _quiet_dependencies() -> None:
    """megatron-core warns about every optional GPU library it does not find; say it once here."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*")
    # TransformerConfig's CUDA-graph scope default, deprecated in megatron-core: no graphs here
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage = argv[0]
    if stage not in STAGES:
        if _rank() == 0:  # every rank has the same command line: one usage text, not one each
            print(f"minitron: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        else:
            time.sleep(5)  # for rank 0 to say it before the launcher stops the job
        sys.exit(2)
    _quiet_dependencies()
    from ..runtime.host_alloc import keep_freed_memory

    try:
        keep_freed_memory()  # CPU steps reuse freed pages (see the module)
    except ValueError as e:
        print(f"minitron {stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if stage not in PLAIN_STAGES:
        check_overrides(stage, argv[1:])
    sys.argv = [f"minitron {stage}"] + argv[1:]
    command = STAGES[stage]
    try:
        entry = (command.function() if command.config is None
                 else functools.partial(hydra_app, stage))
    except ModuleNotFoundError as e:  # an optional extra that this install left out
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        print(f"minitron {stage}: error: lm-evaluation-harness is not installed: pip install -e "
              "'.[eval]' (or EXTRAS=slurm,eval bash scripts/setup.sh)", file=sys.stderr)
        sys.exit(2)
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:  # under torchrun / srun
        from ..runtime import dist

        if dist.launched_world_size() > 1:  # a failing rank exits at once, for the launcher to
            dist.end_with_launcher()  # (and a killed launcher takes its ranks with it)
            return dist.exit_on_failure(entry)  # stop the others (no hang in teardown)
    entry()

if __name__ == "__main__":
    main()
