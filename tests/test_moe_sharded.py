"""Sharded saves of mixture-of-experts models under expert parallelism: each EP rank writes the
experts it holds under their global names, no weight gathered. In one process, the pieces of
EP=2 x TP=2 ranks read back as the whole tensors; in one 2-rank launch (tests/workers/
moe_sharded.py), an EP=2 sharded save of a tiny Qwen2-MoE holds exactly the gathered save's
tensors, restores the EP=2 model bitwise and loads at EP=1, TP=2 and PP=2 with equal logits."""

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert import sharded
from nemo_minitron.convert.experts import per_expert
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.convert.weights import LAYER, canonical_shapes, expert_keys, to_megatron

from tests.helpers import batch, tiny_hf, tiny_tokenizer, torchrun

TOL = 1e-5


def expert_file(c: ckpt.Checkpoint, arch, j: int) -> set[str]:
    """The files holding expert ``j``'s pieces (every layer, gate/up/down)."""
    return {p["file"] for i in range(arch.num_layers) for x in expert_keys(arch, j)
            for p in c.sharded.tensors[LAYER.format(i) + x]["pieces"]}


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_parallel_pieces_read_back_whole(tmp_path, kind):
    """Four (tp, ep) ranks of an EP=2 x TP=2 layout write what a sharded save writes (dense
    tensors from EP rank 0 only): every canonical tensor reads back equal to the source, each
    EP rank's file holds its own experts, and the index stays the one format."""
    hf = tiny_hf(kind)
    arch = arch_from_hf_config(hf.config)
    sd, shapes, layers = per_expert(hf.state_dict(), arch), canonical_shapes(arch), range(4)
    entries = []
    for e in range(2):
        for t in range(2):
            state = to_megatron(sd.__getitem__, arch, tp_rank=t, tp_size=2, layers=layers,
                                pre_process=True, post_process=True, ep_rank=e, ep_size=2)
            local = sharded.rank_tensors(state, arch, layers=layers, pre_process=True,
                                         post_process=True, te=False, tp_size=2, ep_rank=e,
                                         ep=2, dense=e == 0)
            entries.append(sharded.write_pieces(tmp_path, sharded.piece_file(t, 0, e, 2),
                                                sharded.pieces(local, shapes, t)))
    ckpt.write_description(tmp_path, arch, {"stage": "test"})
    sharded.write_index(tmp_path, sharded.merge(entries, shapes), {"tp": 2, "pp": 1, "ep": 2})
    c = ckpt.Checkpoint(tmp_path).verify()
    assert c.files() == [f"model-tp{t}-pp0-ep{e}.safetensors" for t in (0, 1) for e in (0, 1)]
    assert sorted(c.keys()) == sorted(shapes)
    for k in shapes:
        assert torch.equal(c.get(k), sd[k]), k
    for j in range(arch.num_experts):
        assert expert_file(c, arch, j) == {f"model-tp{t}-pp0-ep{j // 4}.safetensors"
                                           for t in (0, 1)}, j
    q = LAYER.format(0) + "self_attn.q_proj.weight"
    assert {p["file"] for p in c.sharded.tensors[q]["pieces"]} == {
        "model-tp0-pp0-ep0.safetensors", "model-tp1-pp0-ep0.safetensors"}


# ------------------------------------------------------------------ multi-rank (one launch)
@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_sharded")
    hf = tiny_hf("qwen2_moe")
    arch = arch_from_hf_config(hf.config)
    ckpt.save(tmp / "src", arch, per_expert(hf.state_dict(), arch), tokenizer=tiny_tokenizer())
    b = batch(arch.vocab_size, s=32)
    with torch.no_grad():
        torch.save({"batches": [b], "logits": hf(b["tokens"]).logits}, tmp / "ref.pt")
    return tmp, torchrun("moe_sharded", 2, tmp)


@pytest.mark.multirank
def test_ep2_sharded_save_gathers_no_weights_and_holds_the_gathered_tensors(ep2):
    tmp, rows = ep2
    saves = [r for r in rows if r["layout"] == "ep2"]
    assert len(saves) == 2 and all(r["max_dlogit_ref"] <= 1e-4 for r in saves), saves
    for r in saves:
        assert r["gathers"]["sharded"] == 0 and r["gathers"]["gathered"] > 0, r
    whole, split = ckpt.Checkpoint(tmp / "ep2").verify(), ckpt.Checkpoint(tmp / "ep2_sharded")
    split.verify()
    assert whole.sharded is None and split.sharded is not None
    assert split.arch == whole.arch and sorted(split.keys()) == sorted(whole.keys())
    for k in whole.keys():
        assert torch.equal(split.get(k), whole.get(k)), k
    assert split.sharded.layout == {"tp": 1, "pp": 1, "ep": 2}
    assert split.files() == ["model-tp0-pp0-ep0.safetensors", "model-tp0-pp0-ep1.safetensors"]
    for j in range(split.arch.num_experts):
        assert expert_file(split, split.arch, j) == {f"model-tp0-pp0-ep{j // 4}.safetensors"}
    shared = LAYER.format(0) + "mlp.shared_expert.up_proj.weight"
    assert [p["file"] for p in split.sharded.tensors[shared]["pieces"]] == [
        "model-tp0-pp0-ep0.safetensors"]


@pytest.mark.multirank
def test_ep2_sharded_save_resumes_bitwise_and_loads_at_other_layouts(ep2):
    _, rows = ep2
    saves = [r for r in rows if r["layout"] == "ep2"]
    assert all(r["resumed_bitwise"] and r["logits_bitwise"] for r in saves), saves
    for layout in ("ep1", "tp2", "pp2"):
        deltas = [r["max_dlogit"] for r in rows if r["layout"] == layout
                  and r["max_dlogit"] is not None]
        assert deltas and max(deltas) <= TOL, (layout, deltas)
