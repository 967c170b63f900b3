"""Integration on the real SmolLM2-135M-Instruct (the embedded default teacher).

Needs the assets that `scripts/setup.sh` installs (`python -m nemo_minitron.assets install`);
without them these tests fail with that command in the message.
"""

import json

import pytest
import torch

from nemo_minitron import demo
from nemo_minitron.convert.checkpoint import Checkpoint
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.evaluate.loss import validation_loss
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import load_checkpoint

from tests.helpers import minitron

pytestmark = pytest.mark.real_model

SEQ = 128


@pytest.fixture(scope="module")
def valid_batches():
    data = PackedSequences(demo.dataset_prefix(), SEQ, split="valid")
    return list(data.batches(2, num_batches=2))


def test_architecture_is_smollm2(teacher):
    arch = Checkpoint(teacher).arch
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
            arch.ffn_hidden_size, arch.vocab_size, arch.tie_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
    assert abs(arch.num_params() - 134.5e6) < 0.1e6


def test_logits_match_transformers(teacher, hf_teacher, valid_batches, single_rank):
    shard, c = load_checkpoint(teacher)
    b = valid_batches[0]
    ours = run_forward(shard, [b], lambda lg, _: {"logits": gather_logits(lg, c.arch.vocab_size)})
    with torch.no_grad():
        ref = hf_teacher(b["tokens"]).logits
    delta = (ours[0]["logits"] - ref).abs().max().item()
    assert delta <= 1e-4, f"max |dlogit| = {delta}"


def test_validation_loss_matches_transformers(teacher, hf_teacher, valid_batches, single_rank):
    shard, _ = load_checkpoint(teacher)
    ours = validation_loss(shard, valid_batches)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf_teacher(b["tokens"]).logits.flatten(0, 1),
                                                    b["labels"].flatten(), reduction="sum")
                  for b in valid_batches]
    ref = sum(x.item() for x in losses) / ours["tokens"]
    assert ours["tokens"] == 2 * 2 * SEQ
    assert abs(ours["loss"] - ref) < 1e-4
    assert 1.0 < ours["loss"] < 5.0  # a trained model on English prose, not a random one (~10.8)


def test_evaluate_cli(tmp_path):
    out = tmp_path / "res.json"
    minitron("evaluate", "eval.num_batches=2", "data.seq_length=128", f"output={out}",
             f"hydra.run.dir={tmp_path}/run", timeout=600, check=True)
    res = json.loads(out.read_text())
    assert res["tokens"] == 2 * 4 * 128 and 1.0 < res["loss"] < 5.0
    assert res["layout"] == {"tp": 1, "pp": 1, "dp": 1}
