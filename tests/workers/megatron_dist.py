"""Run under torchrun with 4 ranks: megatron-core distributed checkpoints, TP=2/PP=2 -> TP=1 -> TP=2/PP=2.

A. TP=2, PP=2: load our checkpoint ``src`` (each rank emits the bytes it read) and export it with
   our code (``ours``); build a GPTModel with plain
   megatron-core, randomly initialised, and save it with plain ``dist_checkpointing.save`` twice:
   bare (``plain``, no architecture record) and in Megatron-LM's layout with ``args``
   (``mlm/iter_0000100``). Logits of both models go to ``logits_src.pt`` / ``logits_plain.pt``.
B. TP=1 (DP=4): import the three with our importer, logits of each to ``logits_<name>_tp1.pt``;
   export the imported plain model at TP=1 (``student``).
C. TP=2, PP=2: plain megatron-core loads ``student`` into a fresh GPTModel; its logits go to
   ``logits_student.pt``.
"""

import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tests.workers._emit import emit


def batches():
    g = torch.Generator().manual_seed(7)
    return [{"tokens": torch.randint(0, 1000, (2, 16), generator=g),
             "position_ids": torch.arange(16).expand(2, 16)}]


# The test's own model, built from megatron-core alone (not our runtime).
DIMS = dict(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
            num_query_groups=2, kv_channels=48)


def plain_gpt(tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(**DIMS, normalization="RMSNorm", layernorm_epsilon=1e-5,
                            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                            bias_activation_fusion=False, masked_softmax_fusion=False,
                            apply_rope_fusion=False, bias_dropout_fusion=False,
                            gradient_accumulation_fusion=False, hidden_dropout=0.0,
                            attention_dropout=0.0, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                            use_cpu_initialization=True)
    torch.manual_seed(11)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=1000, max_sequence_length=256, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def megatron_lm_args(tp, pp):
    """What Megatron-LM's argument parser records for this model (the architecture part)."""
    from megatron.core.transformer.enums import AttnBackend

    return Namespace(**DIMS, attention_backend=AttnBackend.auto, group_query_attention=True, max_position_embeddings=256,
                     norm_epsilon=1e-5, swiglu=True, normalization="RMSNorm",
                     position_embedding_type="rope", rotary_base=10000, add_bias_linear=False,
                     add_qkv_bias=False, untie_embeddings_and_output_weights=True,
                     padded_vocab_size=1000, vocab_size=None, num_experts=None,
                     tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     params_dtype=torch.float32, seq_length=16)


def save_logits(model, path):
    """Forward the batches; the first last-stage rank writes full-vocabulary logits."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.runtime.forward import gather_logits, run_forward

    outs = run_forward(SimpleNamespace(model=model), batches(),
                       lambda lg, _: {"logits": gather_logits(lg, 1000)})
    if outs and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(outs[0]["logits"], path)


def main(root):
    from megatron.core import dist_checkpointing

    from nemo_minitron.convert.megatron_dist import import_megatron
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.megatron_save import export_megatron
    from nemo_minitron.runtime.shard import load_checkpoint

    root = Path(root)
    rank0 = lambda: torch.distributed.get_rank() == 0  # noqa: E731

    # A. TP=2, PP=2
    dist.init(2, 2)
    shard, c = load_checkpoint(root / "src")
    emit({"rank": torch.distributed.get_rank(), "src_bytes_read": c.bytes_read})
    save_logits(shard.model, root / "logits_src.pt")
    export_megatron(root / "src", root / "ours", tp=2, pp=2)
    model = plain_gpt(2, 2)
    save_logits(model, root / "logits_plain.pt")
    if rank0():
        (root / "plain").mkdir()
        (root / "mlm" / "iter_0000100").mkdir(parents=True)
        (root / "mlm" / "latest_checkpointed_iteration.txt").write_text("100")
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(root / "plain"))
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": megatron_lm_args(2, 2),
                             "iteration": 100, "checkpoint_version": 3.0},
                            str(root / "mlm" / "iter_0000100"))

    # B. TP=1, DP=4: our importer, then our export of the imported plain model
    dist.init(1, 1)
    if rank0():
        import_megatron(str(root / "ours"), root / "ours_imported")
        import_megatron(str(root / "plain"), root / "plain_imported", arch_overrides={
            "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 48})
        import_megatron(str(root / "mlm"), root / "mlm_imported")
    dist.barrier()
    for name in ("ours", "plain", "mlm"):
        shard, _ = load_checkpoint(root / f"{name}_imported")
        save_logits(shard.model, root / f"logits_{name}_tp1.pt")
    export_megatron(root / "plain_imported", root / "student")

    # C. TP=2, PP=2: plain megatron-core loads the exported student
    dist.init(2, 2)
    model = plain_gpt(2, 2)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                     str(root / "student" / "release"))
    model.load_state_dict(loaded["model"])
    save_logits(model, root / "logits_student.pt")
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
