"""The `minitron` CLI: every shipped config composes, bad input fails early with a clear message."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_minitron.cli.main import PLAIN_STAGES, STAGES, conf_dir
from nemo_minitron.config import schema

from tests.helpers import minitron

CONF = conf_dir()


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("stage", sorted(set(STAGES) - PLAIN_STAGES))
def test_stage_config_composes_to_its_schema(stage):
    schema.register()
    name = STAGES[stage].config
    cls = schema.JOBS[name]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=["model.source=x", "output=y"] if stage == "import" else [])
    OmegaConf.resolve(cfg)
    assert OmegaConf.get_type(cfg) is cls


def test_every_group_option_composes():
    schema.register()
    seen = 0
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for group in ("model", "parallel", "data"):
            for option in group_options(group):
                cfg = compose("evaluate", overrides=[f"{group}={option}"])
                job = schema.to_job(cfg)
                assert job.model.name and job.parallel.tp >= 1 and job.data.seq_length > 1
                seen += 1
    assert seen == sum(len(group_options(g)) for g in ("model", "parallel", "data")) >= 8


def test_mistyped_override_is_rejected():
    schema.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="tpp"):
            compose("evaluate", overrides=["parallel.tpp=2"])
        with pytest.raises(Exception, match="seq_length"):
            compose("evaluate", overrides=["data.seq_length=long"])


def test_help_lists_stages():
    p = minitron("--help")
    assert p.returncode == 0
    assert all(s in p.stdout for s in STAGES)
    # the config each stage composes (data's is not conf/data.yaml)
    assert all(c.config == s or f"conf/{c.config}.yaml" in p.stdout
               for s, c in STAGES.items() if c.config)
    p = minitron("evaluate", "--help")
    assert p.returncode == 0 and "parallel" in p.stdout and "tp2" in p.stdout


def test_unknown_stage():
    p = minitron("prunee")
    assert p.returncode == 2 and "unknown stage 'prunee'" in p.stderr


def test_validation_errors_name_field_and_fix(tmp_path):
    p = minitron("evaluate", "model.dtype=fp8")
    assert p.returncode == 2 and "model.dtype='fp8'" in p.stderr and "fp32" in p.stderr
    p = minitron("export", f"model.checkpoint={tmp_path}")
    assert p.returncode == 2 and "output=<dir> is required" in p.stderr
    p = minitron("data", f"inputs=[{tmp_path}/nope.jsonl]")
    assert p.returncode == 2 and "inputs not found" in p.stderr


def test_parallel_layout_checked_before_loading(tmp_path):
    """9 heads cannot split over tp=4: said in one line before any weights are read."""
    p = minitron("evaluate", "parallel.tp=4", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "num_attention_heads=9 is not divisible by parallel.tp=4" in p.stderr
    assert "Traceback" not in p.stderr


def test_import_export_cli_round_trip(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = hf_dir("head_dim")
    p = minitron("import", f"model.source={src}", f"output={tmp_path}/ours",
                 f"hydra.run.dir={tmp_path}/h1")
    assert p.returncode == 0, p.stderr[-2000:]
    p = minitron("import", f"model.source={src}", f"output={tmp_path}/ours",
                 f"hydra.run.dir={tmp_path}/h2")
    assert p.returncode == 2 and "already exists" in p.stderr and "overwrite=true" in p.stderr
    p = minitron("export", f"model.checkpoint={tmp_path}/ours", f"output={tmp_path}/hf",
                 f"hydra.run.dir={tmp_path}/h3")
    assert p.returncode == 0, p.stderr[-2000:]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_multirun_sweeps_an_override(hf_dir, tmp_path):
    src, _ = hf_dir("gqa")
    p = minitron("import", f"model.source={src}", f"output={tmp_path}/ours",
                 f"hydra.run.dir={tmp_path}/h")
    assert p.returncode == 0, p.stderr[-2000:]
    p = minitron("export", "-m", f"model.checkpoint={tmp_path}/ours", "dtype=fp32,bf16",
                 f"output={tmp_path}/hf_" + "${dtype}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert p.returncode == 0, p.stderr[-2000:]
    from transformers import AutoConfig

    assert str(AutoConfig.from_pretrained(tmp_path / "hf_bf16").dtype).endswith("bfloat16")
    assert str(AutoConfig.from_pretrained(tmp_path / "hf_fp32").dtype).endswith("float32")


@pytest.mark.real_model
def test_evaluate_with_tasks(tmp_path):
    import json

    out = tmp_path / "res.json"
    p = minitron("evaluate", "eval.num_batches=1", "data.seq_length=128", "eval.tasks=[winogrande]",
                 "eval.limit=8", f"output={out}", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    r = res["tasks"]["results"]["winogrande"]
    assert r["n"] == 8 and 0.0 <= r["acc"] <= 1.0
    assert res["tasks"]["settings"]["num_fewshot"] == 0
    md = (tmp_path / "res.md").read_text()  # the same results, readable
    assert f"| winogrande | {r['acc']:.4f} | {r['acc_norm']:.4f} | 8 |" in md
    assert f"| {res['loss']:.4f} |" in md
    p = minitron("evaluate", "eval.tasks=[arcc]")
    assert p.returncode == 2 and "eval.tasks: unknown ['arcc']" in p.stderr


def test_distill_refuses_the_teacher_as_student(tmp_path):
    p = minitron("distill", f"output={tmp_path}/kd")
    assert p.returncode == 2 and "model.checkpoint is the teacher itself" in p.stderr


def test_prune_recipes_and_experiments_compose():
    """Every conf/prune target and every conf/experiment recipe composes and validates."""
    schema.register()
    data = ["data.prefix=data/corpus", "output=runs/x"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for option in group_options("prune"):
            job = schema.to_job(compose("prune", overrides=[f"prune={option}", *data]))
            assert isinstance(job, schema.PruneJob)
        experiments = group_options("experiment")
        for option in experiments:
            job = schema.to_job(compose("pipeline", overrides=[f"+experiment={option}", *data]))
            assert job.pipeline.rounds and job.model.name != "smollm2_135m" and job.parallel.tp >= 4
    assert {"nemotron4_15b_chain", "qwen3_8b_to_4b"} <= set(experiments)


def test_lm_eval_without_the_extra_says_how_to_install_it():
    """`minitron lm_eval` where the eval extra is not installed (scripts/setup.sh leaves it out
    unless EXTRAS names it): one line with the install command, not an ImportError traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['lm_eval'] = None; sys.argv = ['minitron', 'lm_eval', "
            "'--tasks', 'piqa']; from nemo_minitron.cli.main import main; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "minitron lm_eval: error: lm-evaluation-harness is not installed: pip install -e "
        "'.[eval]' (or EXTRAS=slurm,eval bash scripts/setup.sh)"]
