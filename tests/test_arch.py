"""Arch: validation messages, layout checks, analytic parameter counts, launcher environments."""

import pytest
import torch

from nemo_minitron.arch import Arch
from nemo_minitron.convert.hf_config import arch_from_hf_config, export_model_type
from nemo_minitron.runtime.dist import read_env

from tests.helpers import tiny_hf

SMOL = dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
            num_query_groups=3, head_dim=64, vocab_size=49152, tie_embeddings=True)


@pytest.mark.parametrize("kind", ["gqa", "tied", "head_dim", "qwen2", "odd_vocab", "qwen3",
                                  "nemotron"])
def test_param_count_matches_built_model(kind):
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    assert arch.num_params() == sum(p.numel() for p in hf.parameters())
    emb = hf.model.embed_tokens.weight.numel() * (1 if arch.tie_embeddings else 2)
    assert arch.num_params(embeddings=False) == arch.num_params() - emb


def test_smollm2_count():
    assert Arch(**SMOL).num_params() == 134_515_008


def test_invalid_arch_messages():
    with pytest.raises(ValueError, match="num_attention_heads=9 is not a multiple of arch.num_query_groups=2"):
        Arch(**dict(SMOL, num_query_groups=2))
    with pytest.raises(ValueError, match="arch.hidden_size must be positive"):
        Arch(**dict(SMOL, hidden_size=0))
    with pytest.raises(ValueError, match="unknown architecture fields"):
        Arch.from_dict(dict(SMOL, hiden_size=3))


def test_parallel_checks():
    a = Arch(**SMOL)
    a.check_parallel(3, 2)
    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible by parallel.tp=2"):
        a.check_parallel(2, 1)
    with pytest.raises(ValueError, match="num_layers=30 is not divisible by parallel.pp=4"):
        a.check_parallel(1, 4)
    assert a.padded_vocab_size(8) == 49152 and Arch(**dict(SMOL, vocab_size=1001)).padded_vocab_size(2) == 1024


def test_export_class_choice():
    a = Arch(**SMOL)
    assert export_model_type(a) == "llama"
    assert export_model_type(a.replace(hidden_size=512)) == "mistral"  # 9 heads x 64 != 512
    assert export_model_type(a.replace(qkv_bias=True, model_type="qwen2")) == "qwen2"


def test_launcher_environments():
    e = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1",
                  "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 8, 3, "n1", 1234)
    e = read_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"})
    assert (e.rank, e.world_size, e.local_rank) == (9, 16, 1)
    assert e.master_addr == "gpu017" and e.master_port == 20000 + 4242
    e = read_env({})
    assert (e.rank, e.world_size) == (0, 1)


def test_bf16_forward_close_to_fp32(single_rank):
    from nemo_minitron.evaluate.loss import validation_loss
    from nemo_minitron.runtime.shard import build_shard, load_state

    hf = tiny_hf("gqa")
    arch = arch_from_hf_config(hf.config)
    ids = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    b = {"tokens": ids, "position_ids": torch.arange(32).expand(2, 32),
         "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(2, 32)}
    losses = {}
    for dtype in ("fp32", "bf16"):
        shard = build_shard(arch, dtype)
        load_state(shard, hf.state_dict().__getitem__)
        assert next(shard.model.parameters()).dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        losses[dtype] = validation_loss(shard, [b])["loss"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02


def test_slurm_node_list_parsing():
    from nemo_minitron.runtime.dist import first_host

    assert first_host("gpu[017-018,020],cpu1") == "gpu017"
    assert first_host("node7") == "node7"
    assert first_host("a-b-[3,5]") == "a-b-3"
