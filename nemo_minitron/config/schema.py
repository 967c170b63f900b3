"""Dataclass schemas of the stage configs, validated before any heavy work starts.

Each stage's YAML in ``conf/`` starts from one of these schemas (``defaults: [<stage>_schema, ...]``),
so Hydra rejects a mistyped override at merge time, and ``OmegaConf.to_object`` runs the
``__post_init__`` checks below, whose messages name the field and the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, get_args

from omegaconf import OmegaConf

from .constants import BATCH_AGGS, SEQUENCE_AGGS, TASK_NAMES, cache_dir
from .targets import Targets

# Imported on use: hydra (only when the schemas are registered, by the CLI) and the runtime's
# hardware probe for model.dtype=auto (the one upward import, see tests/test_layering.py), so that
# the schema itself imports neither torch nor hydra.

# The closed string settings. OmegaConf has no Literal fields, so the fields are typed ``str`` and
# each __post_init__ checks its value with check_choice against one of these. Dtype names are
# those of nemo_minitron.dtypes.DTYPES, the one table that maps them to torch dtypes.
Dtype = Literal["fp32", "bf16"]
"""Compute dtypes a model trains and evaluates in (and checkpoints are stored in)."""
CacheDtype = Literal["fp16", "bf16", "fp32"]
"""Storage dtypes of cached teacher log-probabilities."""
ExportFormat = Literal["hf", "megatron"]
Depth = Literal["block_importance", "lm_loss", "accuracy"]
ImportanceMode = Literal["activation", "random"]
Count = Literal["total", "active"]
"""What a search budget counts: every parameter, or those one token passes through."""
Axis = Literal["num_layers", "hidden_size", "ffn_hidden_size", "attention", "num_experts",
               "moe_shared_expert_intermediate_size"]
"""Search axes (attention: heads and query groups together)."""
AXES = get_args(Axis)
DTYPES = get_args(Dtype)


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    """Short name used in output directory names and reports."""
    checkpoint: Optional[str] = None
    """Our checkpoint directory (written by `minitron import`, prune, distill...)."""
    source: Optional[str] = None
    """Source for `minitron import`: Hugging Face dir, hub name or .gguf file, or a megatron-core
    distributed checkpoint (Megatron-LM --save dir or a dist_checkpointing.save dir)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `source`, when source is a directory or hub repo."""
    dtype: str = "fp32"
    """Compute/parameter dtype: fp32, bf16, or auto (bf16 where the hardware multiplies bf16
    natively: AMX/AVX512-BF16 CPUs, bf16 GPUs; fp32 elsewhere; the shipped model configs use it)."""
    # --- megatron-core checkpoints (issue 20) ---
    arch: Dict[str, Any] = field(default_factory=dict)
    """Architecture fields (Arch names) overriding, or supplying where it records none, the
    architecture of a megatron checkpoint being imported, e.g. +model.arch.num_query_groups=8 (Hydra adds new keys with +)."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer (dir or hub name) stored with a megatron checkpoint on import."""

    def __post_init__(self):
        if self.dtype == "auto":  # resolved once, here: every stage sees fp32 or bf16
            from ..runtime.precision import auto_dtype

            self.dtype = auto_dtype()
        check_choice("model.dtype", self.dtype, Dtype, "auto")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (must divide heads, query groups and FFN size)."""
    pp: int = 1
    """Pipeline-parallel size (must divide the number of layers)."""
    ep: int = 1
    """Expert-parallel size for MoE models: experts split over data-parallel ranks (must divide
    num_experts and the data-parallel size)."""
    seed: int = 1234
    """Seed of megatron's RNG trackers and data shuffling."""
    timeout_s: int = 600
    """Collective timeout: a hung or dead rank fails the job after this many seconds."""

    def __post_init__(self):
        _at_least("parallel", self, ("tp", "pp", "ep", "timeout_s"), 1)


@dataclass
class DataConfig:
    prefix: Optional[str] = None
    """Indexed dataset prefix (<prefix>.bin/.idx), as written by `minitron data`."""
    seq_length: int = 256
    """Tokens per packed sample."""
    valid_fraction: float = 0.05
    """Fraction of documents held out for validation (whole documents)."""

    def __post_init__(self):
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length} must be at least 2")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"data.valid_fraction={self.valid_fraction} must be in (0, 1)")


@dataclass
class ModelJob:
    """The groups of every stage that runs a model over a dataset: what model, laid out how, on
    which tokens."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ImportJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    output: Optional[str] = None
    """Checkpoint directory to create (default: model.checkpoint, which a model config names;
    required where that is the embedded default teacher and model.source is another model)."""
    dtype: str = "auto"
    """Storage dtype: auto (keep the source's), fp32, bf16."""
    overwrite: bool = False
    """Replace an existing output directory."""

    def __post_init__(self):
        if not self.model.source:
            raise ValueError("model.source is required: a Hugging Face directory, hub name or .gguf "
                             "file, e.g. `minitron import model.source=meta-llama/Llama-3.1-8B "
                             "output=ckpt/llama8b`")
        if not (self.output or self.model.checkpoint):
            raise ValueError("set output=<dir> (or model.checkpoint) for the imported checkpoint")
        check_choice("dtype", self.dtype, Dtype, "auto")


@dataclass
class ExportJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    output: Optional[str] = None
    """Hugging Face directory to create."""
    dtype: Optional[str] = None
    """Cast weights on export (fp32/bf16); default keeps the checkpoint's dtype."""
    overwrite: bool = False
    format: str = "hf"
    """hf (Hugging Face directory) or megatron (megatron-core torch_dist checkpoint, Megatron-LM
    layout; written at parallel.tp/pp, loadable at any layout)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        _need_checkpoint(self.model)
        check_choice("format", self.format, ExportFormat)
        if not self.output:
            raise ValueError("output=<dir> is required: where to write the Hugging Face model")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, Dtype, "null (keep the checkpoint's)")


@dataclass
class DataJob:
    inputs: list[str] = field(default_factory=list)
    """Text (.txt), JSON lines (.jsonl, .json), Wikipedia dump (.xml/.bz2), each also compressed
    (.gz/.bz2/.xz/.zst), parquet or arrow (Hugging Face datasets: hub parquet files,
    save_to_disk directories) files or directories."""
    json_key: str = "text"
    """The JSON field, or the parquet/arrow column, holding the text."""
    tokenizer: Optional[str] = None
    """Checkpoint directory (its tokenizer/) or Hugging Face tokenizer name/dir."""
    output: Optional[str] = None
    """Output prefix: writes <output>.bin, <output>.idx, <output>.json."""
    eod_token: Optional[str] = None
    """Token appended after every document (default: the tokenizer's eos token)."""
    overwrite: bool = False

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("inputs=[...] is required: text, JSONL or Wikipedia dump files")
        missing = [p for p in self.inputs if not Path(p).exists()]
        if missing:
            raise ValueError(f"inputs not found: {missing}; check the paths (or run "
                             "`python -m nemo_minitron.assets install` for the embedded data)")
        if not self.tokenizer:
            raise ValueError("tokenizer=<checkpoint dir or HF tokenizer> is required")
        if not self.output:
            raise ValueError("output=<prefix> is required")


@dataclass
class EvalConfig:
    micro_batch_size: int = 4
    """Samples per micro-batch on each data-parallel rank."""
    num_batches: Optional[int] = 8
    """Global batches of held-out data to evaluate (None = the whole split)."""
    tasks: list[str] = field(default_factory=list)
    """Downstream multiple-choice tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande,
    boolq, mmlu, mmlu_<subject>, openbookqa, sciq, jsonl:<path>."""
    limit: Optional[int] = None
    """Items per task (None: all); for mmlu, items per subject (57 subjects)."""
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    task_batch_size: int = 8
    """Requests per micro-batch when scoring tasks."""
    reuse: bool = True
    """Reuse the results of an identical earlier evaluation (same checkpoint files, data,
    settings, dtype, layout and code; kept under <cache>/eval_results) instead of running it
    again: a pipeline re-run skips its teacher's evaluation. false: always evaluate."""

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASK_NAMES and not t.startswith(("jsonl:", "mmlu_"))]
        if bad:  # MMLU subjects are checked against the data when the task loads
            near = [m for t in bad for m in difflib.get_close_matches(t, TASK_NAMES, n=1)]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"eval.tasks: unknown {bad}{hint}; known: {sorted(TASK_NAMES)}, "
                             "mmlu_<subject> or jsonl:<path>")
        twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if twice:
            raise ValueError(f"eval.tasks: {twice} listed more than once; each task is scored "
                             "once, so name it once")
        missing = [t for t in self.tasks if t.startswith("jsonl:") and not Path(t[6:]).is_file()]
        if missing:
            raise ValueError(f"eval.tasks: {missing} not found; jsonl:<path> needs an existing "
                             "JSONL file of multiple-choice items")
        _at_least("eval", self, ("micro_batch_size", "task_batch_size", "num_batches", "limit"), 1)
        _at_least("eval", self, ("num_fewshot",), 0)


@dataclass
class EvaluateJob(ModelJob):
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: Optional[str] = None
    """Where to write results JSON (default: outputs/evaluate/<time>/eval_results.json)."""

    def __post_init__(self):
        _need_checkpoint(self.model)
        _need_data(self.data)


@dataclass
class PruneConfig:
    target: Targets = field(default_factory=Targets)
    keep_layers: Optional[list[int]] = None
    """Explicit layers to keep (overrides target.num_layers and the depth criterion)."""
    depth: str = "block_importance"
    """Depth criterion: block_importance (1 - cos, one calibration pass), lm_loss (validation
    loss with each contiguous block removed) or accuracy (downstream accuracy of depth_task with
    each block removed); the last two also write the curve."""
    depth_task: str = "winogrande"
    """Multiple-choice task of depth=accuracy."""
    depth_task_limit: Optional[int] = 200
    """Items of depth_task per candidate block."""
    depth_batches: int = 4
    """Held-out micro-batches per candidate block for depth=lm_loss."""
    contiguous: bool = True
    """Depth by block_importance: drop one contiguous block (True) or scattered layers."""
    importance: str = "activation"
    """activation (Minitron) or random (ablation baseline)."""
    seq_agg: str = "mean_abs"
    """Aggregation over the sequence: mean_abs, mean, l2, var."""
    batch_agg: str = "l2"
    """Aggregation over samples: l2, mean, var."""
    calib_samples: int = 1024
    """Calibration samples (of data.seq_length tokens) from the training split."""
    micro_batch_size: int = 4
    """Calibration micro-batch size per data-parallel rank."""
    scores: Optional[str] = None
    """Reuse importance scores saved by an earlier prune (importance.safetensors): no calibration."""
    seed: int = 1234
    """Seed of the random-importance mode."""

    def __post_init__(self):
        check_choice("prune.depth", self.depth, Depth)
        check_choice("prune.importance", self.importance, ImportanceMode)
        check_choice("prune.seq_agg", self.seq_agg, SEQUENCE_AGGS)
        check_choice("prune.batch_agg", self.batch_agg, BATCH_AGGS)
        _at_least("prune", self, ("calib_samples", "micro_batch_size", "depth_batches",
                                  "depth_task_limit"), 1)
        if self.keep_layers is not None and not self.keep_layers:
            raise ValueError("prune.keep_layers=[] keeps no layer; list the 0-based layers to keep "
                             "or leave it unset (null)")
        if self.keep_layers is not None and len(set(self.keep_layers)) != len(self.keep_layers):
            raise ValueError(f"prune.keep_layers={list(self.keep_layers)} lists a layer twice")
        if self.scores and self.importance == "random":  # the scores were used, silently
            raise ValueError("prune.scores reuses saved importance and prune.importance=random "
                             "ranks at random: set one of them")
        if self.scores and Path(self.scores).is_dir():  # a prune's output: its file is inside
            inside = Path(self.scores) / "importance.safetensors"
            raise ValueError(f"prune.scores={self.scores} is a directory; give the importance "
                             f"file itself" + (f": prune.scores={inside}" if inside.is_file()
                                               else ", which an earlier `minitron prune` wrote"))
        if self.scores and not Path(self.scores).is_file():
            raise ValueError(f"prune.scores={self.scores} not found: give the "
                             "importance.safetensors an earlier `minitron prune` wrote, or unset "
                             "it to calibrate")


@dataclass
class PruneJob(ModelJob):
    prune: PruneConfig = field(default_factory=PruneConfig)
    output: Optional[str] = None
    """Directory of the pruned checkpoint (also holds plan.json, importance.safetensors, report)."""
    overwrite: bool = False

    def __post_init__(self):
        _need_checkpoint(self.model)
        if not self.output:
            raise ValueError("output=<dir> is required: where to write the pruned checkpoint")
        if self.prune.scores is None and self.prune.importance == "activation" and not self.data.prefix:
            raise ValueError("data.prefix is required for calibration (or pass prune.scores=...)")


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    global_batch_size: int = 8
    """Samples per step, over all data-parallel ranks (micro-batches are accumulated)."""
    micro_batch_size: int = 2
    """Samples per forward/backward on one data-parallel rank."""
    lr: float = 1e-4
    """Peak learning rate (after linear warm-up), cosine-decayed to min_lr."""
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    distributed_optimizer: bool = False
    """Shard the optimizer state (fp32 main params, Adam moments) over data-parallel ranks with
    megatron-core's distributed optimizer: less memory per GPU at DP > 1. Checkpoints hold the
    state by parameter name, so a run resumes at any DP size (but not with this switched)."""
    adam_beta2: float = 0.95
    log_interval: int = 10
    """Steps between progress lines."""
    eval_interval: int = 50
    """Steps between validation-loss evaluations (0 disables; always run at the end)."""
    eval_batches: int = 4
    """Held-out micro-batches per evaluation, over all data-parallel ranks together."""
    save_interval: int = 0
    """Steps between resumable checkpoints (0: only the final one)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    sharded_save: bool = True
    """Resumable checkpoints at tensor or expert parallelism > 1 are written sharded: each TP
    (and EP) rank writes its own slices in parallel, no tensor is gathered onto one rank
    (``model.sharded.json`` indexes them; they load at any layout). ``final/`` is always whole,
    HF-named tensors."""
    skip_nonfinite_steps: int = 0
    """Steps with a non-finite loss or gradient skipped (no update) before training stops; 0: stop at the first."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the routers' load-balancing loss (Switch Transformer's: experts x the sum over
    experts of token share x mean router probability, 1 when even), summed over layers, in the
    objective of a mixture-of-experts model. 0 (no term) for distillation and teacher
    correction, which keep the routing the model learned; e.g. 0.01 to train an MoE so that
    its experts share the tokens. Logged per step as moe_aux_loss (the mean over layers)."""
    seed: int = 1234
    """Seed of the data order."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <output>/tb when tensorboard is installed."""
    wandb: Optional[str] = None
    """Weights & Biases project to log to (needs wandb installed)."""

    def __post_init__(self):
        _at_least("train", self, ("steps", "global_batch_size", "micro_batch_size", "log_interval",
                                  "eval_batches", "keep_checkpoints"), 1)
        _at_least("train", self, ("warmup_steps", "eval_interval", "save_interval", "weight_decay",
                                  "clip_grad", "moe_aux_loss_coeff"), 0)
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr} must be > 0 (the peak learning rate, e.g. 1e-4)")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"train.adam_beta2={self.adam_beta2} must be in (0, 1), e.g. 0.95")
        check_warmup(self.warmup_steps, self.steps, "train.steps")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not a multiple "
                             f"of train.micro_batch_size={self.micro_batch_size}")
        if not isinstance(self.sharded_save, bool):
            raise ValueError(f"train.sharded_save={self.sharded_save!r} must be true or false")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        if not 0 <= self.seed < 2**32:  # numpy's range: else it fails after the model loaded
            raise ValueError(f"train.seed={self.seed} must be in [0, 2**32)")
        if self.skip_nonfinite_steps < 0:
            raise ValueError(f"train.skip_nonfinite_steps={self.skip_nonfinite_steps} must be "
                             ">= 0 (0 stops at the first non-finite step)")


@dataclass
class KDConfig:
    teacher: Optional[str] = None
    """Teacher checkpoint directory (same tokenizer as the student)."""
    temperature: float = 1.0
    """Softmax temperature of the logit loss (1 is the paper's best)."""
    kind: str = "forward"
    """forward KL(teacher||student), reverse KL, or jsd."""
    top_k: Optional[int] = None
    """Use only the teacher's top-k logits per token."""
    chunk_tokens: Optional[int] = 256
    """Tokens per chunk of the logit loss: bounds its fp32 intermediates (50 MB per buffer at
    vocab 49152); None: all tokens at once. With kd.fused_output each chunk also multiplies by
    both output weights, so small chunks re-read them often: on 2 CPU cores (bf16, 4 x 256
    tokens) 128 ran ~10% slower than 256."""
    logit_weight: float = 1.0
    lm_weight: float = 0.0
    """Weight of an added LM (next-token cross-entropy) loss on the student."""
    fused_output: bool = True
    """Fold both models' output layers into the logit-loss chunks: the [tokens, vocab] logits of
    neither model are ever materialised (nor transposed), only chunk_tokens rows at a time (bf16
    weights: their logit gradients are gathered, at most 256 MiB, for one weight-gradient
    matmul). Same loss and gradients to round-off. Applies with a live teacher and
    kd.lm_weight=0; elsewhere (and where the output layer cannot be bypassed: sequence
    parallelism, a biased or gathering output layer) the logits path runs."""
    hidden_pairs: list[list[int]] = field(default_factory=list)
    """Intermediate-state losses between [student_layer, teacher_layer] pairs: 0-based layer
    numbers of each model, the output of that transformer layer. Any pipeline layout works: a
    pair split over two stages is computed on the later one, the earlier state carried there
    with the activations. Empty: no hidden-state loss."""
    auto_hidden_pairs: bool = False
    """Build hidden_pairs from the student's plan.json (a student pruned from this teacher, e.g.
    each search candidate): student layer i against the teacher layer whose output the next kept
    layer reads, so a layer before a removed block learns what the teacher has after it. Replaces
    an explicit hidden_pairs list."""
    hidden_kind: str = "cosine"
    """Per-token loss of hidden_pairs and of the embedding loss: cosine (1 - cos) or mse. A
    learned linear projection maps the student's states when the hidden sizes differ."""
    hidden_weight: float = 1.0
    """Weight of the sum over hidden_pairs of their token-mean losses (times alpha when dynamic)."""
    embedding_weight: float = 0.0
    """Weight of the loss between the embedding outputs (the input of layer 0); 0 disables."""
    teacher_cache: Optional[str] = None
    """Directory written by `minitron teacher_cache` for this run's data, train and kd settings:
    no teacher is built, the logit loss is the forward KL on the cached top-k ids (kd.top_k may
    take fewer of them)."""
    cache_residual: bool = True
    """With teacher_cache: add one bucket for the teacher mass outside the top-k ids; false
    renormalises both distributions on the ids (what kd.top_k does with a live teacher)."""
    hidden_dynamic: bool = True
    """Multiply the intermediate terms by alpha = L_logits / (hidden_weight * L_hidden +
    embedding_weight * L_emb), Minitron's dynamic weighting, from the previous step's means (the
    first step only measures them); false: fixed weights."""

    def __post_init__(self):
        if self.kind not in ("forward", "reverse", "jsd"):
            raise ValueError(f"kd.kind={self.kind!r}: use forward, reverse or jsd")
        _at_least("kd", self, ("top_k", "chunk_tokens"), 1)
        if not isinstance(self.fused_output, bool):
            raise ValueError(f"kd.fused_output={self.fused_output!r} must be true or false")
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature={self.temperature} must be > 0")
        for i, pair in enumerate(self.hidden_pairs):
            if len(pair) != 2 or any(int(x) != x or x < 0 for x in pair):
                raise ValueError(f"kd.hidden_pairs[{i}]={list(pair)}: each pair is [student_layer, "
                                 "teacher_layer], two 0-based layer numbers, e.g. "
                                 "kd.hidden_pairs=[[3,7],[5,11]]")
        if self.auto_hidden_pairs and self.hidden_pairs:
            raise ValueError("kd.auto_hidden_pairs=true builds the pairs from the student's plan; "
                             f"drop kd.hidden_pairs={[list(p) for p in self.hidden_pairs]} or set "
                             "kd.auto_hidden_pairs=false")
        seen = [tuple(p) for p in self.hidden_pairs]
        if len(set(seen)) != len(seen):
            raise ValueError(f"kd.hidden_pairs={[list(p) for p in seen]} lists a pair twice")
        if self.hidden_kind not in ("cosine", "mse"):
            raise ValueError(f"kd.hidden_kind={self.hidden_kind!r}: use cosine or mse")
        for k in ("hidden_weight", "embedding_weight", "logit_weight", "lm_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"kd.{k}={getattr(self, k)} must be >= 0")
        intermediate = self.hidden_pairs or self.auto_hidden_pairs or self.embedding_weight
        hidden = (self.hidden_pairs or self.auto_hidden_pairs) and self.hidden_weight > 0
        if not (self.logit_weight or self.lm_weight or hidden or self.embedding_weight):
            # every step logged loss 0 and a "distilled" copy of the student was saved
            raise ValueError("kd.logit_weight=0 and kd.lm_weight=0 with no hidden-state or "
                             "embedding loss: nothing to train on; give kd.logit_weight a "
                             "positive weight (1.0, the default)")
        if self.hidden_dynamic and self.logit_weight == 0 and intermediate:
            raise ValueError("kd.hidden_dynamic=true sets alpha = L_logits / L_intermediate, but "
                             "the logit loss is off (kd.logit_weight=0): set kd.hidden_dynamic=false "
                             "for fixed weights, or a positive kd.logit_weight")


@dataclass
class FinetuneJob(ModelJob):
    train: TrainConfig = field(default_factory=TrainConfig)
    output: Optional[str] = None
    """Run directory: checkpoints/, the final model in final/, metrics.jsonl, tb/."""
    resume: bool = True
    """Continue from the latest checkpoint in output when there is one."""
    overwrite: bool = False
    """Delete an earlier run's checkpoints, final/ and metrics in output and train from the start."""

    def __post_init__(self):
        _need_checkpoint(self.model)
        if not self.output:
            raise ValueError("output=<dir> is required: the training run directory")
        _need_data(self.data)


@dataclass
class DistillJob(FinetuneJob):
    kd: KDConfig = field(default_factory=KDConfig)

    def __post_init__(self):
        super().__post_init__()
        if not self.kd.teacher and not self.kd.teacher_cache:
            raise ValueError("kd.teacher=<checkpoint dir> is required: the model to distill from "
                             "(or kd.teacher_cache=<dir> written by `minitron teacher_cache`)")
        if not self.kd.teacher:
            return
        if Path(self.kd.teacher).expanduser().resolve() == Path(self.model.checkpoint).expanduser().resolve():
            raise ValueError("model.checkpoint is the teacher itself; set model.checkpoint to the "
                             "student, e.g. the output directory of `minitron prune`")


@dataclass
class CacheConfig:
    k: int = 32
    """Teacher log-probabilities stored per token (the largest ones, with their ids)."""
    dtype: str = "fp16"
    """Storage of the log-probabilities: fp16 (about 0.01 nats of rounding at log p > -16), bf16
    or fp32; ids are int32. Bytes per token: k * (4 + 2) + 2 for fp16."""

    def __post_init__(self):
        _at_least("cache", self, ("k",), 1)
        check_choice("cache.dtype", self.dtype, CacheDtype)


@dataclass
class TeacherCacheJob(ModelJob):
    """`minitron teacher_cache`: takes the data/train/kd settings of the distillation it serves
    (the same overrides), and kd.teacher as the model to run."""

    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: Optional[str] = None
    """Cache directory (a rerun with the same settings resumes it)."""
    overwrite: bool = False
    """Replace a cache of other settings in output."""

    def __post_init__(self):
        if not self.kd.teacher:
            raise ValueError("kd.teacher=<checkpoint dir> is required: the model whose outputs "
                             "are cached")
        if not self.output:
            raise ValueError("output=<dir> is required: the cache directory")
        _need_data(self.data)
        if self.kd.top_k is not None:
            raise ValueError("kd.top_k is a distillation setting; the cache keeps cache.k ids per "
                             "token (drop kd.top_k here)")


@dataclass
class SearchConfig:
    budget: Optional[float] = None
    """Target parameter count: a fraction of the source (<= 1, e.g. 0.6) or absolute (e.g. 4.5e9)."""
    tolerance: float = 0.05
    """Candidates lie within budget * (1 +- tolerance)."""
    count_embeddings: bool = True
    """The budget counts embedding and output-layer parameters (False: non-embedding only)."""
    count: str = "total"
    """total parameters, or active: those one token passes through (MoE: router + top-k experts)."""
    axes: list[str] = field(default_factory=lambda: list(AXES))
    """Axes the search may shrink (attention = heads and query groups together; num_experts
    only for MoE models, moe_shared_expert_intermediate_size only for those with a shared
    expert)."""
    num_layers: Optional[list[int]] = None
    hidden_size: Optional[list[int]] = None
    ffn_hidden_size: Optional[list[int]] = None
    num_attention_heads: Optional[list[int]] = None
    num_query_groups: Optional[list[int]] = None
    num_experts: Optional[list[int]] = None
    moe_shared_expert_intermediate_size: Optional[list[int]] = None
    """Explicit allowed values of an axis (default: generated from the steps and limits; experts
    in steps of an eighth of the source's, never below its top-k; the shared expert's width in
    multiples of ffn_multiple)."""
    layer_step: int = 2
    hidden_multiple: int = 64
    """Hidden sizes tried are multiples of this (hardware-friendly; 128 or 256 on GPUs)."""
    ffn_multiple: int = 128
    min_fraction: dict[str, float] = field(default_factory=lambda: {
        "num_layers": 0.5, "hidden_size": 0.5, "ffn_hidden_size": 0.25,
        "num_attention_heads": 0.5, "num_experts": 0.5,
        "moe_shared_expert_intermediate_size": 0.25})
    """How far each axis may shrink, as a fraction of the source."""
    max_candidates: int = 6
    """Candidates to prune and distill (nearest the budget, spread over depths)."""
    steps: int = 20
    """Short distillation steps per candidate (the paper's rankings settle after ~300)."""
    rank_by: str = "val_loss"
    """val_loss, or a task of eval.tasks (ranked by its acc_norm)."""
    confirm_top: int = 0
    """Also distill the best N for confirm_steps, to check the short ranking (0: skip)."""
    confirm_steps: int = 100
    only: Optional[list[int]] = None
    """Run only these candidates (0..max_candidates-1), e.g. one per job of a Hydra multirun
    `-m 'search.only=[0],[1],[2]'`; a later plain run ranks them all."""
    plan_only: bool = False
    """Write candidates.json (the enumeration) and stop: no calibration, no training."""
    teacher_cache: str = "auto"
    """Teacher outputs for the candidates' distillations: auto builds one offline teacher cache
    (`minitron teacher_cache`, settings in `cache`) under output/teacher_cache, covering the short
    and the confirmation runs, when the kd settings allow one (forward KL, no hidden-state or
    embedding loss; otherwise the live teacher); off runs the live teacher in every candidate; a
    directory builds or reuses the cache there. kd.teacher_cache, when set, is used as given."""

    def __post_init__(self):
        check_budget(self.budget, "search.budget")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"search.tolerance={self.tolerance} must be in (0, 1)")
        check_choice("search.count", self.count, Count)
        _at_least("search", self, ("steps", "max_candidates", "layer_step", "hidden_multiple",
                                   "ffn_multiple"), 1)
        if self.confirm_top < 0 or self.confirm_steps < 1:
            raise ValueError("search.confirm_top must be >= 0 and search.confirm_steps >= 1")
        if not self.axes:  # no axis to shrink: "no candidate within the budget", for another cause
            raise ValueError(f"search.axes=[] lets the search shrink nothing; list axes of "
                             f"{list(AXES)}, or leave it unset for all")
        unknown = sorted(set(self.axes) - set(AXES))
        if unknown:
            raise ValueError(f"search.axes: unknown {unknown}; choose from {list(AXES)}")
        limits = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_experts", "moe_shared_expert_intermediate_size")
        bad = {k: v for k, v in self.min_fraction.items() if k not in limits or not 0 < v <= 1}
        if bad:
            raise ValueError(f"search.min_fraction={dict(self.min_fraction)}: {bad} must be axes "
                             f"of {list(limits)} with fractions in (0, 1]")
        empty = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                             "num_query_groups", "num_experts",
                             "moe_shared_expert_intermediate_size") if getattr(self, k) == []]
        if empty:  # an empty list allows no value at all (unset: values generated from the steps)
            raise ValueError(f"search.{empty[0]}=[] allows no value; list the values to try, or "
                             f"leave it unset (null) for the default steps")
        if self.only == []:  # it calibrated and built the teacher cache, then trained none
            raise ValueError("search.only=[] runs no candidate; list candidate numbers (e.g. "
                             "search.only=[0]), or leave it unset for all")
        if self.only is not None and any(i < 0 for i in self.only):
            raise ValueError(f"search.only={list(self.only)}: candidate numbers are >= 0")
        if str(self.teacher_cache).strip().lower() in ("true", "false", "yes", "no", "on", "none",
                                                       "0", "1", ""):
            # a yes/no word is no directory: `true` built a cache in ./True
            raise ValueError(f"search.teacher_cache={self.teacher_cache}: give auto (a cache when "
                             "the kd settings allow one), off (the live teacher) or a directory")
        if self.confirm_top > self.max_candidates:
            raise ValueError(f"search.confirm_top={self.confirm_top} is more than the "
                             f"search.max_candidates={self.max_candidates} candidates trained; "
                             "lower it")


@dataclass
class RecipeJob(ModelJob):
    """What the jobs that chain stages (search, pipeline) configure: every stage's settings."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    """Calibration and depth settings (the search or the rounds give the targets)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The search's offline teacher cache (search.teacher_cache)."""
    output: Optional[str] = None
    """Run directory; stages whose outputs are complete there are skipped (resume)."""

    def __post_init__(self):
        _need_checkpoint(self.model)
        if not self.output:
            raise ValueError(f"output=<dir> is required: the {type(self).__name__[:-3].lower()}'s "
                             "run directory")
        _need_data(self.data)


@dataclass
class SearchJob(RecipeJob):
    def __post_init__(self):
        super().__post_init__()
        if self.search.budget is None:
            raise ValueError("search.budget is required: e.g. search.budget=0.6 (60% of the "
                             "source's parameters) or search.budget=4.5e9")
        _check_rank_by(self.search, self.eval)
        _check_search_steps(self.search, self.train)


def _check_search_steps(search: SearchConfig, train: TrainConfig) -> None:
    """Each candidate trains search.steps (and the confirmed ones confirm_steps) with the train
    group's warm-up."""
    check_warmup(train.warmup_steps, search.steps, "search.steps")
    if search.confirm_top:
        check_warmup(train.warmup_steps, search.confirm_steps, "search.confirm_steps")


def _check_rank_by(search: SearchConfig, ev: EvalConfig) -> None:
    if search.rank_by != "val_loss" and search.rank_by not in ev.tasks:
        raise ValueError(f"search.rank_by={search.rank_by!r} must be val_loss or one of "
                         f"eval.tasks={list(ev.tasks)}; add it to eval.tasks")


@dataclass
class RoundConfig:
    target: Targets = field(default_factory=Targets)
    """Pruning targets of this round (its teacher is the previous round's distilled student)."""
    budget: Optional[float] = None
    """Instead of targets: search architectures at this parameter budget (fraction of this
    round's teacher, or absolute), with the settings of `search`."""
    name: Optional[str] = None

    def __post_init__(self):
        check_budget(self.budget, "pipeline.rounds[].budget")
        if self.name is not None:
            check_round_name(self.name)
        if self.budget is not None and self.target:
            raise ValueError("a round sets either target (explicit architecture) or budget "
                             "(architecture search), not both")


# what the pipeline itself keeps in its output directory, beside the rounds
PIPELINE_ENTRIES = ("teacher_correction", "hydra", "recipe.json", "summary.json", "report.md",
                    "stage_seconds.json")


def check_round_name(name) -> None:
    """A round's name is its directory under output=: one plain path component."""
    text = str(name)
    if (not text.strip() or text in (".", "..") or any(c in text for c in "/\\:")
            or text.startswith(("~", ".")) or text in PIPELINE_ENTRIES):
        raise ValueError(f"pipeline.rounds[].name={text!r}: a round's name is its directory "
                         "under output=, so one plain name (letters, digits, -, _; not "
                         f"{', '.join(PIPELINE_ENTRIES[:2])}), e.g. name: r1_width")


@dataclass
class PipelineConfig:
    rounds: list[RoundConfig] = field(default_factory=list)
    """Compression rounds; empty: one round with the targets of `prune`."""
    teacher_correction_steps: int = 0
    """LM-loss steps on the corpus for the first teacher before pruning (0: skip)."""
    export: bool = True
    """Write each round's distilled student as a Hugging Face directory."""
    teacher_cache: str = "off"
    """round: each round runs its teacher once into an offline teacher cache (round/teacher_cache,
    settings in `cache`) covering train.steps (and the round's search), which the round's search
    candidates and its distillation read instead of the live teacher; off: the live teacher
    (the search still shares one cache among its candidates, see search.teacher_cache)."""


@dataclass
class PipelineJob(RecipeJob):
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        super().__post_init__()
        rounds = self.pipeline.rounds
        if any(r.budget is not None for r in rounds):
            _check_rank_by(self.search, self.eval)
            _check_search_steps(self.search, self.train)
        names = [r.name or f"round{i}" for i, r in enumerate(rounds, 1)]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline.rounds: names {names} repeat; each round needs its own "
                             "directory (give distinct name: values)")
        empty = [i for i, r in enumerate(rounds) if r.budget is None and not r.target]
        if empty and self.prune.keep_layers is None:  # it would distill an unpruned copy
            raise ValueError(f"pipeline.rounds[{empty[0]}] sets neither target nor budget, so it "
                             "prunes nothing; give it target:{...} (e.g. {target:{hidden_size:"
                             "96}}) or budget: (e.g. {budget:0.6})")
        check_choice("pipeline.teacher_cache", self.pipeline.teacher_cache, ("off", "round"))
        if self.pipeline.teacher_correction_steps < 0:
            raise ValueError(f"pipeline.teacher_correction_steps="
                             f"{self.pipeline.teacher_correction_steps} must be >= 0 (0: skip)")
        if self.pipeline.teacher_correction_steps:
            check_warmup(self.train.warmup_steps, self.pipeline.teacher_correction_steps,
                         "pipeline.teacher_correction_steps")


def check_choice(name: str, value, choices, *also: str) -> None:
    """``value`` is one of ``choices`` (a Literal or a tuple) or of ``also`` (a word allowed beside
    them, e.g. auto); the one message every closed string setting gives."""
    allowed = [*(get_args(choices) or choices), *also]
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")


def _at_least(group: str, obj, names, low) -> None:
    """Each of ``names`` (unset ones excepted) is >= ``low``: zero sizes fail later as a modulo by
    zero or a NaN average, far from the field that caused them."""
    for k in names:
        v = getattr(obj, k)
        if v is not None and v < low:
            raise ValueError(f"{group}.{k}={v} must be >= {low}")


def check_warmup(warmup: int, steps: int, field: str) -> None:
    """megatron's scheduler needs warm-up to end before the last step (else a bare assert)."""
    if steps <= warmup:
        raise ValueError(f"{field}={steps} must be larger than train.warmup_steps={warmup}: "
                         f"raise {field} or lower train.warmup_steps")


def check_budget(budget: Optional[float], field: str) -> None:
    """A budget <= 1 is a fraction of the source's parameters, > 1 a parameter count."""
    if budget is None:
        return
    if budget <= 0:
        raise ValueError(f"{field}={budget} must be > 0: a fraction of the source's parameters "
                         "(<= 1, e.g. 0.6) or a parameter count (> 1, e.g. 4.5e9)")
    if 1 < budget < 1e5:  # no LLM is this small: a mistyped fraction or percentage
        raise ValueError(f"{field}={budget:g} is read as {budget:g} parameters (values > 1 are "
                         "parameter counts); for a fraction of the source give a value <= 1 "
                         "(e.g. 0.6 for 60%), for a count e.g. 4.5e9")


def _need_data(data: DataConfig) -> None:
    if not data.prefix:
        raise ValueError("data.prefix is required: an indexed dataset written by `minitron data`")


def _need_checkpoint(model: ModelConfig) -> None:
    if not model.checkpoint:
        raise ValueError("model.checkpoint is required: a checkpoint directory written by "
                         "`minitron import` (or a later stage)")


# primary config in conf/ -> its schema (stored as <config>_job, which the YAML's defaults name);
# which command composes which config is the CLI's table (cli.main.STAGES)
JOBS = {"import": ImportJob, "export": ExportJob, "data_prep": DataJob, "evaluate": EvaluateJob,
        "prune": PruneJob, "finetune": FinetuneJob, "distill": DistillJob, "search": SearchJob,
        "pipeline": PipelineJob, "teacher_cache": TeacherCacheJob}


def _cache(rel: str = "") -> str:
    return str(cache_dir() / rel)


def register() -> None:
    """Register schemas in Hydra's ConfigStore and the ${cache:...} resolver. Idempotent."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("cache"):
        OmegaConf.register_new_resolver("cache", _cache)
    cs = ConfigStore.instance()
    for config_name, schema in JOBS.items():
        if f"{config_name}_job.yaml" not in cs.repo:  # storing converts the dataclass: ~50 ms each
            cs.store(name=f"{config_name}_job", node=schema)


def to_job(cfg):
    """Typed, validated job object from a composed config (runs every __post_init__ check)."""
    check_known_keys(cfg)
    check_finite(OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_object(cfg)


def check_known_keys(node, path: str = "") -> None:
    """Every key is a field of its schema: Hydra lets ``+prune.calib_sample=16`` add a key to a
    typed config, and ``OmegaConf.to_object`` would set it as a stray attribute that nothing reads,
    running the job with the default instead. Free-form ``Dict`` fields (``model.arch``) take any
    key."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, ListConfig):
        for i in range(len(node)):
            check_known_keys(node._get_node(i), f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    names = _field_names(node)  # none: a free-form mapping
    prefix = f"{path}." if path else ""
    for key in node.keys():
        if names and key not in names:
            near = [prefix + n for n in difflib.get_close_matches(str(key), names, n=1)]
            near = near or [f"{prefix}{n}.{key}" for n in names
                            if key in _field_names(node._get_node(n))][:1]  # a level too high
            hint = f"did you mean {near[0]}? " if near else ""
            raise ValueError(f"{prefix}{key} is not a setting of "
                             f"{OmegaConf.get_type(node).__name__}: {hint}the settings are "
                             f"{', '.join(names)}")
        check_known_keys(node._get_node(key), f"{prefix}{key}")


def _field_names(node) -> list[str]:
    """The schema fields of a config node, or none if it is no dataclass-typed mapping."""
    import dataclasses

    from omegaconf import DictConfig

    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return []
    kind = OmegaConf.get_type(node)
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def check_finite(tree, path: str = "") -> None:
    """No setting is NaN or infinite: ``train.lr=nan`` would otherwise pass every ``>``/``<``
    check (each comparison with NaN is false) or fail in a neighbouring field's message, and
    ``kd.temperature=inf`` would surface as a diverged first step after pruning."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise ValueError(f"{path}={tree} must be a finite number")
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            check_finite(v, f"{path}[{i}]")
