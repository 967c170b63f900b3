"""Applying pruning plans: shapes, parameter counts and the masking identities that define each axis.

Every identity compares Hugging Face forward logits in float32: the pruned model (built from
``hf_config_from_arch(plan.target)`` and loaded with ``apply_plan``'s tensors) against the original
model with the pruned structure masked out (zeroed, or decoder layers removed).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import tiny_hf
from nemo_minitron.arch import Arch
from nemo_minitron.convert.hf_config import arch_from_hf_config, export_model_type, hf_config_from_arch
from nemo_minitron.convert.weights import EMBED, FINAL_NORM, LM_HEAD, canonical_keys
from nemo_minitron.pruning.apply import apply_plan, pruned_keys
from nemo_minitron.pruning.plan import Plan, identity_plan

TOL = 1e-5


# ---------------------------------------------------------------------------------------- helpers
def source(kind: str):
    hf = tiny_hf(kind)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random init leaves RMSNorm weights at one: make their slicing matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    arch = arch_from_hf_config(hf.config)
    sd = hf.state_dict()
    tensors = {k: sd[k].detach().clone() for k in canonical_keys(arch)}
    return hf, arch, tensors


def plan_for(arch, **keep) -> Plan:
    base = identity_plan(arch)  # per-layer axes given flat: the same indices in every layer
    fields = dict(hidden=base.hidden, ffn=base.ffn[0], groups=base.groups[0], heads=base.heads[0],
                  layers=base.layers)
    return Plan(arch, **dict(fields, **keep))


def build(arch, tensors) -> torch.nn.Module:
    """An HF model for ``arch`` loaded with ``tensors``; only a tied lm_head may be missing."""
    cfg = hf_config_from_arch(arch)
    model = AutoModelForCausalLM.from_config(cfg).float()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert unexpected == []
    assert set(missing) <= ({LM_HEAD} if arch.tie_embeddings else set()), missing
    if arch.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def head_cols(heads, d) -> list[int]:
    return [j * d + t for j in heads for t in range(d)]


def expected_shapes(arch) -> dict[str, tuple]:
    h, d, f, V = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    nq, ng = arch.num_attention_heads * d, arch.num_query_groups * d
    per = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
           "self_attn.q_proj.weight": (nq, h), "self_attn.k_proj.weight": (ng, h),
           "self_attn.v_proj.weight": (ng, h), "self_attn.o_proj.weight": (h, nq),
           "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
           "self_attn.q_proj.bias": (nq,), "self_attn.k_proj.bias": (ng,), "self_attn.v_proj.bias": (ng,)}
    out = {EMBED: (V, h), FINAL_NORM: (h,), LM_HEAD: (V, h)}
    for i in range(arch.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per.items()})
    return out


def prune_everything(arch, seed: int = 1) -> Plan:
    """A plan that shrinks every axis (hidden, ffn, groups, heads, layers) of a tiny model."""
    g = torch.Generator().manual_seed(seed)
    hidden = sorted(torch.randperm(arch.hidden_size, generator=g)[: arch.hidden_size * 3 // 4].tolist())
    ffn = sorted(torch.randperm(arch.ffn_hidden_size, generator=g)[: arch.ffn_hidden_size * 5 // 8].tolist())
    ng, hpg = arch.num_query_groups, arch.heads_per_group
    groups = list(range(1, ng)) if ng > 1 else [0]
    keep = max(1, hpg - 1)
    heads = [gr * hpg + t for gr in groups for t in range(hpg - keep, hpg)]
    layers = [0, 2, 3]
    return Plan(arch, hidden, ffn, groups, heads, layers)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["gqa", "tied", "qwen2", "head_dim"])
def test_shapes_and_param_count(kind):
    hf, arch, tensors = source(kind)
    plan = prune_everything(arch)
    tgt = plan.target
    assert tgt.head_dim == arch.head_dim and tgt.tie_embeddings == arch.tie_embeddings
    out = apply_plan(plan, tensors)
    assert list(out) == pruned_keys(plan) == canonical_keys(tgt)
    shapes = expected_shapes(tgt)
    for k, t in out.items():
        assert tuple(t.shape) == shapes[k], k
        assert t.is_contiguous() and t.dtype == torch.float32
    assert sum(t.numel() for t in out.values()) == tgt.num_params()
    assert tgt.num_params() < arch.num_params()
    # and the pruned model loads strictly into stock transformers and runs
    y = logits(build(tgt, out))
    assert y.shape == (2, 16, arch.vocab_size) and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["gqa", "tied", "qwen2"])
def test_identity_plan_is_a_copy(kind):
    hf, arch, tensors = source(kind)
    out = apply_plan(identity_plan(arch), tensors)
    assert list(out) == canonical_keys(arch)
    for k, t in out.items():
        assert torch.equal(t, tensors[k]), k
        assert t.untyped_storage().data_ptr() != tensors[k].untyped_storage().data_ptr(), k
    # a copy, not a view: writing to the output leaves the source alone
    before = tensors[EMBED].clone()
    out[EMBED].zero_()
    assert torch.equal(tensors[EMBED], before)
    fresh = apply_plan(identity_plan(arch), tensors)
    assert (logits(build(arch, fresh)) - logits(hf)).abs().max() <= TOL


def test_views_of_the_source_are_not_shared():
    _, arch, tensors = source("gqa")
    plan = plan_for(arch, ffn=list(range(arch.ffn_hidden_size)))  # nothing sliced
    out = apply_plan(plan, tensors)
    ptrs = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert all(t.untyped_storage().data_ptr() not in ptrs for t in out.values())
    # non-contiguous sources come out contiguous
    nc = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in tensors.items()}
    assert not nc["model.layers.0.mlp.up_proj.weight"].is_contiguous()
    out = apply_plan(prune_everything(arch), nc)
    assert all(t.is_contiguous() for t in out.values())


def test_wrong_source_shape_is_reported():
    _, arch, tensors = source("gqa")
    plan = identity_plan(arch.replace(ffn_hidden_size=512))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight.*expects"):
        apply_plan(plan, tensors)


# ---------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_mlp_pruning_equals_zeroed_neurons(kind):
    hf, arch, tensors = source(kind)
    ffn = sorted(torch.randperm(arch.ffn_hidden_size, generator=torch.Generator().manual_seed(3))[:100].tolist())
    plan = plan_for(arch, ffn=ffn)
    pruned = build(plan.target, apply_plan(plan, tensors))
    drop = sorted(set(range(arch.ffn_hidden_size)) - set(ffn))
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in masked.model.layers:
            layer.mlp.gate_proj.weight[drop] = 0
            layer.mlp.up_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[:, drop] = 0
    ref = logits(masked)
    assert (logits(pruned) - ref).abs().max() <= TOL
    assert (logits(hf) - ref).abs().max() > 1e-3  # the mask matters


def test_per_layer_selection_equals_per_layer_masks():
    """Each layer keeps its own neurons and heads (only the counts are shared)."""
    hf, arch, tensors = source("gqa")
    g = torch.Generator().manual_seed(4)
    ffn = [sorted(torch.randperm(arch.ffn_hidden_size, generator=g)[:90].tolist()) for _ in range(4)]
    heads = [[0, 2], [1, 3], [0, 3], [1, 2]]
    plan = plan_for(arch, ffn=ffn, heads=heads)
    assert plan.layer_keep(1) == (ffn[1], [0, 1], [1, 3])
    pruned = build(plan.target, apply_plan(plan, tensors))
    masked = copy.deepcopy(hf)
    d = arch.head_dim
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            drop = sorted(set(range(arch.ffn_hidden_size)) - set(ffn[i]))
            layer.mlp.gate_proj.weight[drop] = 0
            layer.mlp.up_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[:, drop] = 0
            for h in set(range(4)) - set(heads[i]):
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    assert (logits(pruned) - logits(masked)).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["gqa", "qwen2", "head_dim"])
def test_head_pruning_equals_zeroed_o_proj_columns(kind):
    hf, arch, tensors = source(kind)
    assert arch.num_query_groups == 2 and arch.heads_per_group == 2
    heads = [1, 2]  # one of two heads in each group, at different positions within the group
    plan = plan_for(arch, heads=heads)
    assert plan.target.num_query_groups == 2 and plan.target.heads_per_group == 1
    pruned = build(plan.target, apply_plan(plan, tensors))
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[:, head_cols([0, 3], arch.head_dim)] = 0
    ref = logits(masked)
    assert (logits(pruned) - ref).abs().max() <= TOL
    assert (logits(hf) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_group_pruning_equals_zeroed_group_heads(kind):
    hf, arch, tensors = source(kind)
    plan = plan_for(arch, groups=[1], heads=[2, 3])
    assert plan.target.num_query_groups == 1 and plan.target.num_attention_heads == 2
    pruned = build(plan.target, apply_plan(plan, tensors))
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[:, head_cols([0, 1], arch.head_dim)] = 0
    ref = logits(masked)
    assert (logits(pruned) - ref).abs().max() <= TOL
    assert (logits(hf) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_layer_dropping_equals_removed_layers(kind):
    hf, arch, tensors = source(kind)
    plan = plan_for(arch, layers=[0, 3])
    out = apply_plan(plan, tensors)
    for new, old in enumerate(plan.layers):  # renumbered in order, weights untouched
        for k in canonical_keys(arch.replace(num_layers=1)):
            if k.startswith("model.layers.0."):
                suffix = k[len("model.layers.0."):]
                assert torch.equal(out[f"model.layers.{new}.{suffix}"], tensors[f"model.layers.{old}.{suffix}"])
    pruned = build(plan.target, out)
    masked = copy.deepcopy(hf)
    masked.model.layers = torch.nn.ModuleList([masked.model.layers[i] for i in plan.layers])
    ref = logits(masked)
    assert (logits(pruned) - ref).abs().max() <= TOL
    assert (logits(hf) - ref).abs().max() > 1e-3


def test_depth_and_width_without_hidden_compose():
    """ffn + heads + layers together == all three masks applied to the original model."""
    hf, arch, tensors = source("qwen2")
    ffn = list(range(0, arch.ffn_hidden_size, 2))
    plan = plan_for(arch, ffn=ffn, heads=[0, 3], layers=[1, 2, 3])
    pruned = build(plan.target, apply_plan(plan, tensors))
    drop_ffn = list(range(1, arch.ffn_hidden_size, 2))
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in masked.model.layers:
            layer.mlp.gate_proj.weight[drop_ffn] = 0
            layer.mlp.down_proj.weight[:, drop_ffn] = 0
            layer.self_attn.o_proj.weight[:, head_cols([1, 2], arch.head_dim)] = 0
    masked.model.layers = torch.nn.ModuleList([masked.model.layers[i] for i in plan.layers])
    assert (logits(pruned) - logits(masked)).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["gqa", "tied", "qwen2", "head_dim"])
def test_hidden_pruning(kind):
    """Hidden channels: RMSNorm divides by the channel count, so plain zeroing is no identity.

    With the dropped channels zero in the embedding and in every write to the residual stream
    (o_proj / down_proj rows) they stay zero; the sum of squares is then the same and only the mean's
    divisor changes, h -> h'. Scaling every norm weight by sqrt(h/h') and eps by h/h' restores it.
    """
    hf, arch, tensors = source(kind)
    keep = 112 if kind == "head_dim" else 96
    hidden = sorted(torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(5))[:keep].tolist())
    plan = plan_for(arch, hidden=hidden)
    tgt = plan.target
    assert tgt.hidden_size == keep and tgt.head_dim == arch.head_dim
    if kind == "qwen2":
        assert export_model_type(tgt) == "qwen2"
    else:  # hidden != heads * head_dim after pruning
        assert tgt.hidden_size != tgt.num_attention_heads * tgt.head_dim
        assert export_model_type(tgt) == "mistral"
    out = apply_plan(plan, tensors)
    assert list(out) == canonical_keys(tgt)
    assert torch.equal(out[EMBED], tensors[EMBED][:, hidden])
    assert torch.equal(out["model.layers.1.self_attn.o_proj.weight"],
                       tensors["model.layers.1.self_attn.o_proj.weight"][hidden])

    # loads with no missing / unexpected keys into the exported config class, and runs
    model = AutoModelForCausalLM.from_config(hf_config_from_arch(tgt)).float()
    assert model.config.model_type == export_model_type(tgt)
    res = model.load_state_dict(out, strict=not tgt.tie_embeddings)
    if tgt.tie_embeddings:
        assert res.unexpected_keys == [] and set(res.missing_keys) <= {LM_HEAD}
    y = logits(build(tgt, out))
    assert torch.isfinite(y).all()

    # the renormalisation identity
    ratio = arch.hidden_size / keep
    scaled = {k: (v * math.sqrt(ratio) if k.endswith("norm.weight") else v) for k, v in out.items()}
    pruned = build(tgt.replace(norm_eps=arch.norm_eps * ratio), scaled)
    drop = sorted(set(range(arch.hidden_size)) - set(hidden))
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        masked.model.embed_tokens.weight[:, drop] = 0
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[drop] = 0
    ref = logits(masked)
    assert (logits(pruned) - ref).abs().max() <= TOL
    assert (y - ref).abs().max() > 1e-4  # without the rescale RMSNorm does differ


# ---------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_layer_subset_matches_full(kind):
    _, arch, tensors = source(kind)
    plan = prune_everything(arch)  # layers [0, 2, 3]
    full = apply_plan(plan, tensors)

    fetched = []

    def getter(key):
        fetched.append(key)
        return tensors[key]

    part = apply_plan(plan, getter, layers=[3])
    assert set(part) == {k for k in full if k.startswith("model.layers.2.")}  # new global index
    assert all(k.startswith("model.layers.3.") for k in fetched) and len(fetched) == len(set(fetched))
    for k, t in part.items():
        assert torch.equal(t, full[k])

    first = apply_plan(plan, getter, layers=[0], include_embedding=True)
    last = apply_plan(plan, getter, layers=[2, 3], include_head=True)
    assert EMBED in first and FINAL_NORM not in first and LM_HEAD not in first
    assert FINAL_NORM in last and "model.layers.0.input_layernorm.weight" not in last
    if arch.tie_embeddings:  # the output layer of a tied model is the embedding
        assert EMBED in last and LM_HEAD not in last
    else:
        assert LM_HEAD in last and EMBED not in last
    merged = {**first, **last}
    assert list(sorted(merged)) == sorted(full)
    for k, t in merged.items():
        assert torch.equal(t, full[k]), k

    with pytest.raises(ValueError, match="not kept"):
        apply_plan(plan, tensors, layers=[1])


# ---------------------------------------------------------------------------------------- plans
def test_plan_json_round_trip(tmp_path):
    _, arch, _ = source("qwen2")
    plan = prune_everything(arch)
    plan.meta = {"scores": "activation", "step": 3}
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert back == plan
    assert back.target == plan.target and back.source == arch
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize("keep, match", [
    (dict(heads=[0, 2, 3]), "unequal number of heads"),
    (dict(groups=[0, 1], heads=[0, 1]), "unequal number of heads"),
    (dict(groups=[0], heads=[0, 2]), "heads of query groups it removes"),
    (dict(ffn=[0, 256]), r"plan\.ffn must be sorted unique indices in \[0, 256\)"),
    (dict(layers=[-1, 0]), r"plan\.layers"),
    (dict(heads=[3, 1]), r"plan\.heads must be sorted"),
    (dict(hidden=[0, 0, 1]), r"plan\.hidden must be sorted unique"),
    (dict(groups=[]), "keeps no groups"),
])
def test_plan_validation_errors(keep, match):
    arch = Arch(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                num_query_groups=2, head_dim=32, vocab_size=1000)
    with pytest.raises(ValueError, match=match):
        plan_for(arch, **keep)
