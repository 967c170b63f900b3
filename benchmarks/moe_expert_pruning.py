"""Expert pruning of a tiny mixture-of-experts model: activation-ranked vs random expert choice.

    python benchmarks/moe_expert_pruning.py --out runs/moe_prune [--teacher-steps 3000]
        [--steps 40] [--seeds 8]

(~10 min on 2 quiet cores: the teacher trains at ~8k tokens/s; a rerun with more seeds reuses
the teacher and the students already distilled.)

The embedded Wikipedia sample, tokenised with a word-level vocabulary of its most frequent words
(a tiny model cannot afford SmolLM2's 49k-row embedding), trains a Mixtral-style teacher from
scratch (8 experts, top-2, hidden 128) with the routers' load-balancing loss (``--aux``, i.e.
``train.moe_aux_loss_coeff``: without it the random init's routers send nearly every token to two
experts per layer, and pruning the idle ones costs nothing whichever way they are chosen). Its
routing over the held-out tokens is printed: expert load (max, min, coefficient of variation),
the entropy of the load (1 = even) and of each token's router distribution (nats; lower = more
decided routing). Each layer is then pruned 8 -> 4 experts, once by
activation importance (each expert's summed routing-weighted output norm over calibration
tokens) and once per seed by random choice, and every pruned student is distilled from the
teacher for the same steps on the same batches, without the balancing loss (distillation keeps
the routing). The table holds the held-out loss of the teacher, of each student before
distillation and after it. One process, in-process library calls.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import time
from pathlib import Path

DIMS = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, num_local_experts=8,
            num_experts_per_tok=2)
# integer options: vocabulary, tokens per sample, samples per step, teacher training steps,
# distillation steps per student, random expert choices, held-out batches of 8 samples
# (3000 teacher steps: the routers decide, token router entropy 1.35 of 2.08 nats; at 100-150
# they are balanced but near uniform and any 4 experts are interchangeable)
OPTIONS = {"--vocab": 2048, "--seq": 128, "--gbs": 8, "--teacher-steps": 3000, "--steps": 40,
           "--seeds": 8, "--eval-batches": 8}
WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenizer(docs: list[str], vocab_size: int):
    """A lower-cased word-level tokenizer of the ``vocab_size - 2`` most frequent words (plus
    end-of-text and unknown); words and single punctuation marks, as ``WORD`` counts them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(w for d in docs for w in WORD.findall(d.lower()))
    vocab = {"<eos>": 0, "<unk>": 1}
    vocab.update({w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab_size - 2))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def prepare(out: Path, vocab_size: int) -> None:
    """The corpus (``out/corpus``) and a randomly initialised teacher (``out/init``)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from nemo_minitron import assets
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.experts import per_expert
    from nemo_minitron.convert.hf_config import arch_from_hf_config
    from nemo_minitron.data.indexed import build_indexed
    from nemo_minitron.data.sources import iter_documents

    if (out / "init").exists():
        return
    docs = list(iter_documents([assets.path("wiki")]))
    tok = word_tokenizer(docs, vocab_size)
    build_indexed(docs, tok, out / "corpus", progress=False, overwrite=True)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(vocab_size=vocab_size, sliding_window=None,
                                          tie_word_embeddings=False, **DIMS))
    arch = arch_from_hf_config(hf.config)
    ckpt.save(out / "init", arch, per_expert(hf.state_dict(), arch), tokenizer=tok)


def common(out: Path, checkpoint: Path, seq: int) -> dict:
    from nemo_minitron.config.schema import DataConfig, ModelConfig

    return dict(model=ModelConfig(name="moe", checkpoint=str(checkpoint)),
                data=DataConfig(prefix=str(out / "corpus"), seq_length=seq, valid_fraction=0.05))


def training(steps: int, lr: float, gbs: int, aux: float = 0.0):
    from nemo_minitron.config.schema import TrainConfig

    return TrainConfig(steps=steps, global_batch_size=gbs, micro_batch_size=gbs, lr=lr,
                       min_lr=lr / 10, warmup_steps=max(1, steps // 20), log_interval=10,
                       eval_interval=0, save_interval=0, eval_batches=8, tensorboard=False,
                       moe_aux_loss_coeff=aux)


def train_teacher(out: Path, args) -> float:
    """LM-loss (plus load-balancing) training of the random teacher; the mean balancing loss
    of its last ten steps (per layer, 1 = even; nan without it)."""
    from nemo_minitron.config.schema import FinetuneJob
    from nemo_minitron.distill.trainer import train

    run = out / "teacher"
    if not (run / "final").exists():
        train(FinetuneJob(**common(out, out / "init", args.seq), output=str(run),
                          train=training(args.teacher_steps, 3e-3, args.gbs, args.aux)),
              "finetune")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r["moe_aux_loss"] for r in rows if "moe_aux_loss" in r][-10:]
    return sum(last) / len(last) if last else float("nan")


def routing(out: Path, checkpoint: Path, args) -> dict:
    """Expert load and routing entropies of ``checkpoint`` over the held-out batches."""
    import torch

    from nemo_minitron.data.packed import PackedSequences
    from nemo_minitron.runtime import dist
    from nemo_minitron.runtime.forward import run_forward
    from nemo_minitron.runtime.routing import load_balance
    from nemo_minitron.runtime.shard import load_checkpoint

    dist.init(1, 1)
    shard, c = load_checkpoint(checkpoint)
    counts = torch.zeros(c.arch.num_layers, c.arch.num_experts, dtype=torch.float64)
    token_h = []

    def hook(i):
        def fn(module, args_, out_):
            counts[i] += out_[1].sum(0).double()  # routing map [tokens, experts]
            p = module.gating(args_[0]).float().softmax(-1)
            token_h.append(-(p * p.clamp_min(1e-12).log()).sum(-1).mean().item())
        return fn

    handles = [layer.mlp.router.register_forward_hook(hook(i))
               for i, layer in enumerate(shard.model.decoder.layers)]
    data = PackedSequences(out / "corpus", args.seq, split="valid", valid_fraction=0.05)
    with torch.no_grad():
        run_forward(shard, data.batches(8, num_batches=args.eval_batches), lambda lg, _: {})
    for h in handles:
        h.remove()
    share = counts / counts.sum(1, keepdim=True)
    load_h = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(c.arch.num_experts)
    return {**load_balance(counts), "load_entropy": float(load_h.mean()),
            "token_entropy": sum(token_h) / len(token_h)}


def prune(out: Path, name: str, importance: str, seed: int, args) -> Path:
    from nemo_minitron.config.schema import PruneConfig, PruneJob, Targets
    from nemo_minitron.pruning.run import prune as run_prune

    dst = out / name
    if not dst.exists():
        run_prune(PruneJob(**common(out, out / "teacher" / "final", args.seq), output=str(dst),
                           prune=PruneConfig(target=Targets(num_experts=4), importance=importance,
                                             seed=seed, calib_samples=64, micro_batch_size=8)))
    return dst


def distill(out: Path, name: str, student: Path, args) -> float:
    from nemo_minitron.config.schema import DistillJob, KDConfig
    from nemo_minitron.distill.trainer import train

    res = train(DistillJob(**common(out, student, args.seq), output=str(out / f"{name}_kd"),
                           train=training(args.steps, 1e-3, args.gbs),
                           kd=KDConfig(teacher=str(out / "teacher" / "final"))), "distill")
    return res["val_loss"]


def held_out(out: Path, checkpoint: Path, args) -> float:
    from nemo_minitron.config.schema import EvalConfig, ParallelConfig
    from nemo_minitron.evaluate.run import evaluate_checkpoint

    c = common(out, checkpoint, args.seq)
    return evaluate_checkpoint(str(checkpoint), ParallelConfig(), c["data"],
                               EvalConfig(micro_batch_size=8, num_batches=args.eval_batches))["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/moe_prune")
    ap.add_argument("--aux", type=float, default=0.02,
                    help="the teacher's train.moe_aux_loss_coeff (0: no load balancing)")
    for flag, default in OPTIONS.items():
        ap.add_argument(flag, type=int, default=default)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prepare(out, args.vocab)
    aux_loss = train_teacher(out, args)
    load = routing(out, out / "teacher" / "final", args)
    rows = [("teacher", held_out(out, out / "teacher" / "final", args), None)]
    students = [("activation", "activation", 0)] + \
        [(f"random_seed{s}", "random", s) for s in range(args.seeds)]
    for name, importance, seed in students:
        pruned = prune(out, name, importance, seed, args)
        rows.append((name, held_out(out, pruned, args), distill(out, name, pruned, args)))
    print(f"\nteacher (aux coeff {args.aux}, balancing loss over its last 10 steps "
          f"{aux_loss:.3f}) routing of the held-out tokens: load max {load['moe_max_load']:.2f}, "
          f"min {load['moe_min_load']:.2f}, cv {load['moe_load_cv']:.2f} (1 / 1 / 0: even); "
          f"load entropy {load['load_entropy']:.3f} (1: even); token router entropy "
          f"{load['token_entropy']:.3f} nats (uniform {math.log(8):.3f})")
    print(f"\n| {'experts kept (8 -> 4)':<22} | pruned loss | after {args.steps} KD steps |")
    print(f"|{'-' * 24}|-------------|------------------|")
    for name, before, after in rows:
        print(f"| {name:<22} | {before:11.3f} | " + (f"{after:16.3f} |" if after else f"{'':16} |"))
    rand = [a for n, _, a in rows if n.startswith("random")]
    act = next(a for n, _, a in rows if n == "activation")
    print(f"\nrandom mean after KD {sum(rand) / len(rand):.3f}; activation lower than "
          f"{sum(a > act for a in rand)} of {len(rand)} random choices; "
          f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
