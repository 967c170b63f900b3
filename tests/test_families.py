"""Model families end to end: every family prunes, exports and loads in stock transformers with
the pruned megatron model's logits; importer refusals; Qwen3 and Nemotron at TP=2/PP=2 and their
multi-rank pruning (one torchrun launch)."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf import export_hf, import_hf
from nemo_minitron.convert.hf_config import (arch_from_hf_config, export_model_type,
                                             hf_config_from_arch)
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.importance.calibrate import batches_forward_loop, calibrate
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import Plan
from nemo_minitron.pruning.select import Targets, make_plan
from nemo_minitron.runtime.forward import gather_logits, run_forward
from nemo_minitron.runtime.shard import build_shard, gather_canonical, load_checkpoint, load_state

from tests.helpers import (batch, canonical_state, exported, tiny_corpus, tiny_hf, tiny_tokenizer,
                           torchrun)

TOL = 1e-4


def megatron_logits(arch, get, b):
    shard = build_shard(arch)
    load_state(shard, get)
    return run_forward(shard, [b], lambda lg, _: {"logits": gather_logits(lg, arch.vocab_size)})[0]["logits"]


def hub_logits_match(path, model, b):
    """Our model of checkpoint ``path`` gives the Hugging Face ``model``'s logits on batch ``b``
    (within TOL); returns the latter."""
    with torch.no_grad():
        ref = model(b["tokens"]).logits
    shard, c = load_checkpoint(path)
    vocab = c.arch.vocab_size
    ours = run_forward(shard, [b], lambda lg, _: {"logits": gather_logits(lg, vocab)})
    assert (ours[0]["logits"] - ref).abs().max().item() <= TOL
    return ref


# family kind -> the model_type its pruned export (hidden != heads * head_dim) is written as
EXPORTS = {"gqa": "mistral", "tied": "mistral", "head_dim": "mistral", "qwen2": "qwen2",
           "qwen3": "qwen3", "nemotron": "nemotron", "phi3": "phi3", "mistral_swa": "mistral"}


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_pruned_export_loads_with_the_pruned_logits(kind, single_rank, tmp_path):
    """Prune every axis (hidden 128->80, a query group and its heads, FFN, a layer), then the
    megatron model of the plan, the exported directory in stock from_pretrained and nothing else
    must agree."""
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    g = torch.Generator().manual_seed(11)
    hidden = sorted(torch.randperm(arch.hidden_size, generator=g)[:80].tolist())
    ffn = sorted(torch.randperm(arch.ffn_hidden_size, generator=g)[:160].tolist())
    groups = [arch.num_query_groups - 1]
    heads = [h for h in range(arch.num_attention_heads) if h // arch.heads_per_group in groups]
    plan = Plan(arch, hidden, ffn, groups, heads, [0, 1, 3])
    tgt = plan.target
    assert tgt.hidden_size != tgt.num_attention_heads * tgt.head_dim
    tensors = apply_plan(plan, canonical_state(hf, arch))
    b = batch(arch.vocab_size)
    ours = megatron_logits(tgt, tensors.__getitem__, b)
    out, back, theirs = exported(tmp_path / "pruned", tgt, tensors, b["tokens"])
    assert json.loads((out / "config.json").read_text())["model_type"] == EXPORTS[kind]
    assert sum(p.numel() for p in back.parameters()) == tgt.num_params()
    delta = (ours - theirs).abs().max().item()
    assert delta <= TOL, f"{kind}: max |dlogit| = {delta}"
    # and the pruned weights really were what the plan kept
    w = back.state_dict()["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(w, hf.state_dict()["model.layers.3.mlp.down_proj.weight"][hidden][:, ffn])


def test_llama_dir_that_stock_transformers_rejects_imports(hf_dir, tmp_path, single_rank):
    """A Llama config.json with hidden 512 = 6 heads x 64 (what ModelOpt/Bridge write after pruning)."""
    src, model = hf_dir("llama_pruned")
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        AutoConfig.from_pretrained(src)
    c = ckpt.Checkpoint(import_hf(str(src), tmp_path / "ours"))
    a = c.arch
    assert (a.model_type, a.hidden_size, a.num_attention_heads, a.head_dim) == ("llama", 512, 6, 64)
    b = batch(a.vocab_size)
    with torch.no_grad():
        ref = model(b["tokens"]).logits
    shard, _ = load_checkpoint(c.path)
    ours = run_forward(shard, [b], lambda lg, _: {"logits": gather_logits(lg, a.vocab_size)})[0]["logits"]
    assert (ours - ref).abs().max().item() <= TOL
    out = export_hf(str(c.path), tmp_path / "hf")  # written back as a config class that loads
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(back(b["tokens"]).logits, ref)


def test_phi3_imports_with_its_logits_and_exports_fused(hf_dir, tmp_path, single_rank):
    """Phi-3's fused qkv_proj / gate_up_proj are split on import (our model gives the hub model's
    logits, partial rotary included) and joined again on export, which stock transformers loads
    as Phi-3 with the same logits; a fused tensor of the wrong size names itself."""
    src, model = hf_dir("phi3")
    c = ckpt.Checkpoint(import_hf(str(src), tmp_path / "ours"))
    a = c.arch
    assert (a.model_type, a.rotary_fraction, a.num_query_groups) == ("phi3", 0.75, 2)
    assert "model.layers.0.self_attn.k_proj.weight" in c.weight_map
    b = batch(a.vocab_size)
    ref = hub_logits_match(c.path, model, b)
    out = export_hf(str(c.path), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3"
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(back.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(back(b["tokens"]).logits, ref)
    from nemo_minitron.convert.fused import unfuse

    sd = model.state_dict()
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    sd[qkv] = sd[qkv][:-8]
    with pytest.raises(ValueError, match=r"layers.1.self_attn.qkv_proj.weight has 248 rows; "
                                         r"config.json's sizes need 128 \+ 64 \+ 64 = 256"):
        unfuse(sd, a)


def test_fused_export_keeps_each_projection_in_one_file():
    """A fused tensor is written whole into the file of its first part, whichever files the
    checkpoint spread its parts over; the other tensors stay where they were."""
    from nemo_minitron.convert.hf import _export_shards
    from nemo_minitron.convert.weights import canonical_keys

    arch = arch_from_hf_config(tiny_hf("phi3").config)
    where = {k: f"s{i % 3}" for i, k in enumerate(canonical_keys(arch))}  # parts scattered
    shards = _export_shards(where, arch, fused=True)
    assert sorted(k for names in shards.values() for k in names) == sorted(where)
    p = "model.layers.2."
    q_file = where[p + "self_attn.q_proj.weight"]
    assert {p + f"self_attn.{x}_proj.weight" for x in "qkv"} <= set(shards[q_file])
    assert where[p + "self_attn.k_proj.weight"] != q_file  # the case being tested
    assert p + "self_attn.o_proj.weight" in shards[where[p + "self_attn.o_proj.weight"]]
    unfused = _export_shards(where, arch, fused=False)
    assert {f: sorted(v) for f, v in unfused.items()} == {
        f: sorted(k for k in where if where[k] == f) for f in ("s0", "s1", "s2")}


def test_longrope_short_and_long_factors_give_the_hub_logits(hf_dir, tmp_path, single_rank):
    """Phi-3-128k's LongRoPE: the short factors and the cos/sin factor give the hub model's logits
    and round-trip through export; past the pretraining context transformers switches to the
    long factors for the whole sequence, and so do we (this was refused)."""
    from types import SimpleNamespace

    from nemo_minitron import preflight

    src, model = hf_dir("phi3_longrope")
    c = ckpt.Checkpoint(import_hf(str(src), tmp_path / "ours"))
    a = c.arch
    assert a.longrope_context == 64 and abs(a.rope_attention_factor - (1 + 2 / 6) ** 0.5) < 1e-12
    b = batch(a.vocab_size, s=64)
    ref = hub_logits_match(c.path, model, b)
    out = export_hf(str(c.path), tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    factors = (back.config.rope_parameters["short_factor"],
               model.config.rope_parameters["short_factor"])
    assert factors[0] == factors[1]
    with torch.no_grad():
        assert torch.equal(back(b["tokens"]).logits, ref)
    narrow = a.replace(hidden_size=96)  # width-pruned: transformers sizes the factors by it
    with pytest.raises(ValueError, match=r"LongRoPE model with hidden_size=96 != "
                                         r"num_attention_heads x head_dim = 128"):
        export_model_type(narrow)
    assert export_model_type(a.replace(num_attention_heads=2, num_query_groups=1,
                                       hidden_size=64)) == "phi3"
    for s in (65, 128):  # just past the 64 pretraining positions, and twice them
        long = batch(a.vocab_size, s=s)
        ref_long = hub_logits_match(c.path, model, long)
        with torch.no_grad():  # the long factors are in play: a 64-token forward (short
            # factors) gives other logits at the same positions
            assert not torch.allclose(model(long["tokens"][:, :64]).logits, ref_long[:, :64],
                                      atol=1e-3)
    preflight.positions(a, SimpleNamespace(seq_length=128))  # was refused
    with pytest.raises(ValueError, match="data.seq_length=257 exceeds the context"):
        preflight.positions(a, SimpleNamespace(seq_length=257))


def test_longrope_config_faults_name_the_field():
    """A Phi-3 LongRoPE config whose factors do not fit the rotated dims, or that lacks the
    pretraining context, is refused at import naming the field."""
    d = tiny_hf("phi3_longrope").config.to_dict()
    rope = dict(d["rope_parameters"])
    short = {**d, "rope_parameters": {**rope, "short_factor": rope["short_factor"][:-1]}}
    with pytest.raises(ValueError, match=r"rope_scaling.short_factor must list one factor per "
                                         r"rotated pair of dims \(12\)"):
        arch_from_hf_config(short)
    rope.pop("original_max_position_embeddings")
    lost = {k: v for k, v in d.items() if k != "original_max_position_embeddings"}
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        arch_from_hf_config({**lost, "rope_parameters": rope})
    old = {k: v for k, v in d.items() if k != "rope_parameters"}  # 2024 config.json fields
    old.update(rope_theta=10000.0, partial_rotary_factor=0.75, rope_scaling={
        "type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    assert arch_from_hf_config(old) == arch_from_hf_config(d)


def test_sliding_window_trains_as_transformers_does(single_rank):
    """Mistral-7B-v0.1-style sliding-window attention imports as arch.sliding_window, and our
    model's loss and gradients over sequences three windows long are Hugging Face's."""
    import torch.nn.functional as F

    hf = tiny_hf("mistral_swa")
    arch = arch_from_hf_config(hf.config)
    assert arch.sliding_window == 8
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    b = batch(arch.vocab_size)  # 24 tokens
    logits = shard.model(b["tokens"], b["position_ids"], None)
    ours = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten())
    ours.backward()
    ref = F.cross_entropy(hf(b["tokens"]).logits.flatten(0, 1), b["labels"].flatten())
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    g_ours = shard.model.embedding.word_embeddings.weight.grad
    g_ref = hf.model.embed_tokens.weight.grad
    assert (g_ours - g_ref).abs().max().item() < 1e-5 * g_ref.abs().max().item() + 1e-7


def test_nemotron_weights_round_trip_through_model(single_rank):
    """1p LayerNorm weights are folded (+1) into megatron and unfolded on the way back."""
    hf = tiny_hf("nemotron")
    arch = arch_from_hf_config(hf.config)
    assert (arch.norm, arch.mlp, arch.rotary_fraction) == ("layernorm1p", "relu2", 0.5)
    shard = build_shard(arch)
    sd = hf.state_dict()
    load_state(shard, sd.__getitem__)
    w = shard.model.decoder.layers[0].input_layernorm.weight
    assert torch.allclose(w, sd["model.layers.0.input_layernorm.weight"] + 1)
    back = gather_canonical(shard)
    assert set(back) == set(sd)
    for k, v in back.items():
        assert torch.allclose(v, sd[k], atol=1e-6), k


def test_nemotron_ffn_importance_is_the_down_projection_input(single_rank):
    """Squared-ReLU neurons are scored on relu(up(x))**2, the input of down_proj."""
    hf = tiny_hf("nemotron")
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    batches = [batch(arch.vocab_size, seed=s) for s in (1, 2)]
    imp = calibrate(shard, batches_forward_loop(shard, batches, None))
    seen = []
    h = hf.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            hf(b["tokens"])
    h.remove()
    per_sample = torch.cat([x.abs().mean(dim=1) for x in seen])  # mean |x| over tokens
    assert torch.allclose(imp.ffn[1], per_sample.pow(2).sum(0).sqrt(), rtol=1e-4)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"model_type": "qwen2", "sliding_window": 64}, "sliding_window=64 attention is not "
                                                    "supported for qwen2"),
    ({"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"] * 2},
     "layers of different attention are not supported"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 24, "long_factor": [1.0] * 24},
      "original_max_position_embeddings": 64}, "'longrope' is supported for phi3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config (awq)"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, field):
    base = json.loads(tiny_hf("head_dim").config.to_json_string())
    base["max_position_embeddings"] = 256
    with pytest.raises(ValueError, match=re.escape(field)):
        arch_from_hf_config({**base, **change, "use_sliding_window": True}
                            if "sliding_window" in change else {**base, **change})


def test_qwen3_attention_bias_is_refused():
    d = tiny_hf("qwen3").config.to_dict()
    with pytest.raises(ValueError, match="attention_bias=true is not supported for qwen3"):
        arch_from_hf_config({**d, "attention_bias": True})


# ------------------------------------------------------------------ multi-rank (one launch)
def reference(hf, tmp, name):
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / name, arch, canonical_state(hf, arch), tokenizer=tiny_tokenizer())
    # LongRoPE past its 64 pretraining positions: the long factors at TP=2 and PP=2
    b = batch(arch.vocab_size, s=96 if name == "phi3_longrope" else 32)
    with torch.no_grad():
        logits = hf(b["tokens"]).logits
    torch.save({"batches": [b], "logits": logits}, tmp / f"{name}.pt")


@pytest.fixture(scope="module")
def multi_rank(tmp_path_factory, single_rank):
    tmp = tmp_path_factory.mktemp("families")
    for fam in ("qwen3", "nemotron", "phi3_longrope", "mistral_swa"):
        reference(tiny_hf(fam), tmp, fam)
    tiny_corpus(tmp / "corpus")
    rows = torchrun("families", 2, tmp, tmp / "corpus")
    return tmp, rows


@pytest.mark.multirank
@pytest.mark.parametrize("fam", ["qwen3", "nemotron", "phi3_longrope", "mistral_swa"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_multi_rank_logit_parity(multi_rank, fam, layout):
    _, rows = multi_rank
    deltas = [r["max_dlogit"] for r in rows if r.get("family") == fam and r["layout"] == layout
              and r["max_dlogit"] is not None]
    assert deltas and max(deltas) <= TOL, f"{fam} {layout}: {deltas}"


@pytest.mark.multirank
@pytest.mark.parametrize("fam", ["qwen3", "nemotron"])
def test_multi_rank_pruning_keeps_what_one_process_keeps(multi_rank, fam):
    tmp, _ = multi_rank
    hf = tiny_hf(fam)
    arch = arch_from_hf_config(hf.config)
    shard = build_shard(arch)
    load_state(shard, hf.state_dict().__getitem__)
    data = PackedSequences(tmp / "corpus", 32, split="train", valid_fraction=0.1)
    imp = calibrate(shard, batches_forward_loop(shard, data.batches(2, num_batches=4), None))
    plan = make_plan(arch, imp, Targets(hidden_size=96, ffn_hidden_size=160,
                                        num_attention_heads=2, num_layers=3))
    got = Plan.load(tmp / f"{fam}_tp2" / "plan.json")
    assert (got.hidden, got.layers, got.ffn, got.heads, got.groups) == (
        plan.hidden, plan.layers, plan.ffn, plan.heads, plan.groups)
    c = ckpt.Checkpoint(tmp / f"{fam}_tp2")
    ref = apply_plan(plan, hf.state_dict())
    assert c.arch == plan.target and set(c.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.allclose(c.get(k), v, atol=1e-6), k


def test_hub_style_config_json_of_minitron_8b():
    """Minitron-8B-Base's config.json as published (old-style top-level rope fields)."""
    d = {"architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "hidden_act": "relu2",
         "hidden_size": 4096, "head_dim": 128, "intermediate_size": 16384, "num_hidden_layers": 32,
         "num_attention_heads": 48, "num_key_value_heads": 8, "max_position_embeddings": 4096,
         "norm_eps": 1e-5, "partial_rotary_factor": 0.5, "rope_theta": 10000,
         "tie_word_embeddings": False, "vocab_size": 256000, "torch_dtype": "bfloat16"}
    a = arch_from_hf_config(d)
    assert (a.norm, a.mlp, a.rotary_fraction, a.head_dim, a.num_query_groups) == (
        "layernorm1p", "relu2", 0.5, 128, 8)
    assert round(a.num_params() / 1e9, 2) == 8.27
    cfg = hf_config_from_arch(a)  # and it exports as itself: NemotronConfig takes head_dim
    assert cfg.model_type == "nemotron" and cfg.head_dim == 128
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5


def test_arch_fields_must_match_the_family():
    a = arch_from_hf_config(tiny_hf("qwen3").config)
    with pytest.raises(ValueError, match="qwen3' has norm=rmsnorm, mlp=swiglu, qkv_bias=False, qk_norm=True"):
        a.replace(qk_norm=False)
    with pytest.raises(ValueError, match="rotary_fraction=0.5: qwen3 rotates whole heads"):
        a.replace(rotary_fraction=0.5)
    with pytest.raises(ValueError, match="rotary_fraction=0.3 must be in"):
        a.replace(model_type="nemotron", norm="layernorm1p", mlp="relu2", qk_norm=False,
                  rotary_fraction=0.3)


def test_search_space_counts_each_family():
    """The search enumerates Nemotron-4-15B at the 8B budget with squared-ReLU/LayerNorm counts:
    Minitron-8B's shape (hidden 4096, FFN 16384, all heads and layers) is a candidate."""
    from nemo_minitron.search.space import Space, enumerate_candidates

    src = arch_from_hf_config({"model_type": "nemotron", "hidden_act": "relu2", "hidden_size": 6144,
                               "intermediate_size": 24576, "num_hidden_layers": 32,
                               "num_attention_heads": 48, "num_key_value_heads": 8,
                               "vocab_size": 256000, "partial_rotary_factor": 0.5})
    space = Space(budget=8.27e9, tolerance=0.01, hidden_multiple=1024, ffn_multiple=4096,
                  layer_step=8)
    names = [c.name() for c in enumerate_candidates(src, space, tp=8)]
    assert "L32-H4096-F16384-A48g8" in names
