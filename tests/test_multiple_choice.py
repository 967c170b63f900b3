"""Multiple-choice log-likelihood scoring: against a plain transformers scorer, on tiny random
models and on the real SmolLM2 teacher, the task readers, and TP=2 / PP=2 / DP=2 under torchrun.

The reference below is deliberately plain: one Hugging Face forward per item (its choices padded
on the right), no sorting, no sharing of rows, no parallelism, and the lm-evaluation-harness
recipe written out again (trailing context whitespace moves to the continuation; continuation
tokens are those of context+continuation after the context's; an empty context is the BOS/EOS
token; the model reads (context+continuation)[:-1], left-truncated to max_length).
"""

import json
import random

import pytest
import torch

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.evaluate.multiple_choice import accuracy, predictions, score_items
from nemo_minitron.evaluate.tasks import Item, load_task
from nemo_minitron.runtime.shard import load_checkpoint

from tests.helpers import tiny_hf, tiny_tokenizer, torchrun


def hf_request_ids(tok, ctx, cont, max_length):
    """(model input ids, continuation ids) of one request, the harness' recipe written out again:
    trailing context whitespace moves to the continuation, the continuation's tokens are those
    of the whole text after the context's, an empty context reads BOS (else EOS), and inputs
    longer than ``max_length`` keep their rightmost tokens."""
    stripped = ctx.rstrip()
    if len(stripped) < len(ctx):
        ctx, cont = stripped, ctx[len(stripped):] + cont
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    if ctx:
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = whole[len(ctx_ids):]
    else:
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctx_ids, cont_ids = [bos], whole
    return (ctx_ids + cont_ids)[-(max_length + 1):][:-1], cont_ids


def hf_reference_scores(model, tok, items, max_length=None):
    """Sum log-probability of each choice with a transformers causal LM, item by item (the item's
    choices in one forward, padded on the right, which a causal model never attends to)."""
    max_length = max_length or model.config.max_position_embeddings
    out = []
    for it in items:
        ctxs = it.contexts or [it.context] * len(it.choices)
        reqs = []
        for ctx, cont in zip(ctxs, it.choices):
            reqs.append(hf_request_ids(tok, ctx, cont, max_length))
        width = max(len(inp) for inp, _ in reqs)
        first = min(len(inp) - len(cont) for inp, cont in reqs)  # first scored position
        batch = torch.tensor([inp + [0] * (width - len(inp)) for inp, _ in reqs])
        with torch.no_grad():  # logits of positions first.. only
            logits = model(batch, logits_to_keep=width - first).logits.float()
        row = []
        for r, (inp, cont_ids) in enumerate(reqs):
            end = len(inp) - first
            logp = logits[r, end - len(cont_ids):end].log_softmax(-1)
            row.append(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum().item())
        out.append(row)
    return out


def reference_accuracy(items, scores):
    """acc / acc_norm straight from the definition (numpy-style first-max on ties)."""
    import numpy as np

    acc = norm = 0
    for it, sc in zip(items, scores):
        lens = np.array([len(c[1:] if c.startswith(" ") else c) for c in it.choices], dtype=float)
        acc += int(np.argmax(sc)) == it.label
        norm += int(np.argmax(np.array(sc) / lens)) == it.label
    return acc / len(items), norm / len(items)


def write_jsonl_task(path, seed=0):
    """A small offline task over the tiny tokenizer's words: varied lengths, shared contexts with
    one-token choices, a context ending in a space, an empty context and long items."""
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(2, 1000)}" for _ in range(n))  # noqa: E731
    rows = []
    for i in range(14):
        n_ctx = rng.choice([1, 3, 8, 20, 40]) if i < 11 else 150
        k = rng.randrange(2, 5)
        rows.append({"context": words(n_ctx), "choices": [" " + words(rng.randrange(1, 7))
                                                          for _ in range(k)],
                     "label": rng.randrange(k)})
    rows.append({"context": words(12), "choices": [" w7", " w8", " w9", " w10"], "label": 2})
    rows.append({"context": words(5) + " ", "choices": ["w11 w12", "w13"], "label": 1})
    rows.append({"context": "", "choices": [" w14 w15", " w16 w17 w18"], "label": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def jsonl_task(tmp_path_factory):
    return write_jsonl_task(tmp_path_factory.mktemp("mc") / "task.jsonl")


def tiny_checkpoint(kind, tmp):
    hf = tiny_hf(kind)
    path = ckpt.save(tmp / f"ckpt_{kind}", arch_from_hf_config(hf.config), hf.state_dict(),
                     tokenizer=tiny_tokenizer(), provenance={"stage": "test"})
    return hf, path


# ------------------------------------------------------------------------------------------------
# (a) tiny random models against transformers


@pytest.mark.parametrize("kind", ["gqa", "odd_vocab", "mistral_swa"])
def test_tiny_scores_match_transformers(kind, jsonl_task, tmp_path, single_rank):
    hf, path = tiny_checkpoint(kind, tmp_path)
    shard, c = load_checkpoint(path)
    tok = c.tokenizer()
    items = load_task(f"jsonl:{jsonl_task}")
    for max_length in (None, 24):  # 24 < the long items: exercises left truncation
        ours = score_items(shard, tok, items, micro_batch_size=4, max_length=max_length,
                           progress=False)
        ref = hf_reference_scores(hf, tok, items, max_length=max_length)
        assert [len(s) for s in ours] == [len(it.choices) for it in items]
        delta = max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y))
        assert delta <= 1e-4, f"max |dlogprob| = {delta}"
        assert predictions(items, ours) == predictions(items, ref)
        acc = accuracy(items, ours)
        assert (acc["acc"], acc["acc_norm"]) == reference_accuracy(items, ref)
        assert acc["n"] == len(items)


def test_longrope_scores_past_its_context_match_transformers(jsonl_task, tmp_path, single_rank):
    """Phi-3-128k's LongRoPE over items longer than its (here 64) pretraining positions: those
    rows take the long factors, as transformers does for any forward that long; a shared row
    that would cross the limit is split into one row per request. Each request alone on both
    sides (a padded batch picks the factors by its padded length, in transformers too)."""
    from tests.helpers.models import canonical_state

    hf = tiny_hf("phi3_longrope")
    arch = arch_from_hf_config(hf.config)  # Phi-3's fused projections, split as import does
    path = ckpt.save(tmp_path / "longrope", arch, canonical_state(hf, arch),
                     tokenizer=tiny_tokenizer())
    shard, c = load_checkpoint(path)
    tok = c.tokenizer()
    items = load_task(f"jsonl:{jsonl_task}")
    ours = score_items(shard, tok, items, micro_batch_size=1, progress=False)
    ref, lengths = [], []
    for it in items:
        row = []
        for ctx, cont in zip(it.contexts or [it.context] * len(it.choices), it.choices):
            inp, cont_ids = hf_request_ids(tok, ctx, cont, hf.config.max_position_embeddings)
            lengths.append(len(inp))
            with torch.no_grad():
                logp = hf(torch.tensor([inp])).logits[0, -len(cont_ids):].float().log_softmax(-1)
            row.append(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum().item())
        ref.append(row)
    assert max(lengths) > 64 >= min(lengths)  # both sides of the switch are scored
    delta = max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y))
    assert delta <= 1e-4, f"max |dlogprob| = {delta}"


def test_micro_batch_size_does_not_change_scores(jsonl_task, tmp_path, single_rank):
    _, path = tiny_checkpoint("gqa", tmp_path)
    shard, c = load_checkpoint(path)
    items = load_task(f"jsonl:{jsonl_task}")
    a = score_items(shard, c.tokenizer(), items, micro_batch_size=1, progress=False)
    b = score_items(shard, c.tokenizer(), items, micro_batch_size=16, progress=False)
    assert max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r, s)) <= 1e-5


@pytest.mark.parametrize("kind", ["gqa", "odd_vocab"])
def test_output_layer_runs_only_at_scored_positions(kind, jsonl_task, tmp_path, single_rank,
                                                    monkeypatch):
    """Scoring skips the output layer's full [b, s, vocab] logits: inside ``final_hidden`` the
    model returns hidden states, the selected rows become the same logits as the full layer's,
    and the model is itself again afterwards; scores equal those of the full output layer."""
    from nemo_minitron.runtime import selected_logits as S

    _, path = tiny_checkpoint(kind, tmp_path)
    shard, c = load_checkpoint(path)
    shard.model.eval()
    tokens = torch.randint(0, 50, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([8, 0, 5])
    with torch.no_grad():
        full = shard.model(tokens, pos, None)
        with S.final_hidden(shard.model) as picked:
            hidden = shard.model(tokens, pos, None)
        after = shard.model(tokens, pos, None)
    assert full.shape[-1] >= shard.arch.vocab_size and hidden.shape[-1] == shard.arch.hidden_size
    assert torch.allclose(picked.logits_at(hidden, rows, cols), full[rows, cols], atol=1e-5)
    assert torch.equal(after, full)

    items = load_task(f"jsonl:{jsonl_task}")
    fast = score_items(shard, c.tokenizer(), items, micro_batch_size=4, progress=False)
    monkeypatch.setattr(S, "_can_skip", lambda gpt: False)  # the full output layer
    slow = score_items(shard, c.tokenizer(), items, micro_batch_size=4, progress=False)
    assert max(abs(x - y) for r, q in zip(fast, slow) for x, y in zip(r, q)) <= 1e-5


def test_selected_logits_follow_the_output_weight_dtype():
    """Hidden states handed back upcast (as megatron's Float16Module does on GPUs) are cast to
    the output weight's dtype, as the output layer itself would see them."""
    from nemo_minitron.runtime.selected_logits import Selected

    sel = Selected()
    sel.weight = torch.randn(10, 4).bfloat16()
    hidden = torch.randn(2, 3, 4)
    got = sel.logits_at(hidden, torch.tensor([1, 0]), torch.tensor([2, 0]))
    want = torch.nn.functional.linear(hidden[[1, 0], [2, 0]].bfloat16(), sel.weight)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_accuracy_and_norm_definition():
    items = [Item("q", [" a", " bbbb"], 1), Item("q", [" a", " bbbb"], 0), Item("q", [" x", " y"], 1)]
    scores = [[-1.0, -2.0], [-1.0, -2.0], [-3.0, -3.0]]  # tie: first index wins
    res = accuracy(items, scores)
    assert res["acc"] == pytest.approx(1 / 3) and res["n"] == 3
    assert res["acc_norm"] == pytest.approx(1 / 3)  # -2/4 > -1/1: item 0 right, item 1 wrong


# ------------------------------------------------------------------------------------------------
# (b) the real SmolLM2 teacher against transformers

REAL_TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")
REAL_LIMIT = 20


@pytest.fixture(scope="module")
def real_scores(teacher, hf_teacher, single_rank):
    hf = hf_teacher
    shard, c = load_checkpoint(teacher)
    tok = c.tokenizer()
    res = {}
    for task in REAL_TASKS:
        items = load_task(task, limit=REAL_LIMIT)
        ours = score_items(shard, tok, items, micro_batch_size=8, progress=False)
        res[task] = (items, ours, hf_reference_scores(hf, tok, items))
    return res


@pytest.mark.real_model
@pytest.mark.parametrize("task", REAL_TASKS)
def test_teacher_matches_transformers(real_scores, task):
    items, ours, ref = real_scores[task]
    assert len(items) == REAL_LIMIT
    delta = max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y))
    assert delta <= 2e-3, f"max |dlogprob| = {delta}"
    assert predictions(items, ours) == predictions(items, ref)
    acc = accuracy(items, ours)
    assert (acc["acc"], acc["acc_norm"]) == reference_accuracy(items, ref)
    assert all(s < 0 for row in ours for s in row)


# ------------------------------------------------------------------------------------------------
# (c) task readers

EXPECTED_CHOICES = {"arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "hellaswag": {4},
                    "piqa": {2}, "winogrande": {2}, "boolq": {2}, "mmlu": {4}, "openbookqa": {4},
                    "sciq": {4}}
EXPECTED_SIZES = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
                  "winogrande": 1267, "boolq": 3270, "mmlu": 1531, "openbookqa": 500, "sciq": 1000}


@pytest.mark.parametrize("task", sorted(EXPECTED_CHOICES))
def test_task_loads(task):
    items = load_task(task)
    assert len(items) == EXPECTED_SIZES[task]
    assert {len(it.choices) for it in items} <= EXPECTED_CHOICES[task]
    assert all(0 <= it.label < len(it.choices) for it in items)
    assert all(c.startswith(" ") for it in items for c in it.choices)
    assert len({it.label for it in items}) > 1 or task == "sciq"  # SciQ's answer is always last
    assert len(load_task(task, limit=7)) == (7 * 57 if task == "mmlu" else 7)


def test_prompt_formats():
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices == [" cellular telephone", " television", " refrigerator", " airplane"]
    assert arc.label == 0
    hs = load_task("hellaswag", limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[3] == " starts pulling up roofing on a roof." and hs.label == 3
    assert all("[" not in it.context for it in load_task("hellaswag", limit=300))
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    wg = load_task("winogrande", limit=1)[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.choices == [" always got the easier cases."] * 2 and wg.label == 1
    bq = load_task("boolq", limit=1)[0]
    assert bq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.choices == [" no", " yes"] and bq.label == 0
    mm = load_task("mmlu_anatomy", limit=1)[0]
    assert mm.context.startswith("The following are multiple choice questions (with answers) about "
                                 "anatomy.\n\nWhich of the following terms")
    assert mm.context.endswith("\nD. Homeostasis\nAnswer:") and mm.choices == [" A", " B", " C", " D"]
    assert mm.label == 3


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "winogrande", "mmlu_anatomy"])
def test_fewshot_deterministic(task):
    a = load_task(task, limit=6, num_fewshot=3, seed=7)
    b = load_task(task, limit=6, num_fewshot=3, seed=7)
    assert a == b
    assert load_task(task, limit=3, num_fewshot=3, seed=7) == a[:3]  # independent of limit
    zero = load_task(task, limit=6)
    for it, z in zip(a, zero):
        own = z.context.split("\n\n")[-1]  # MMLU: the subject line comes before the shots
        assert it.context.endswith(own) and it.context.count("\n\n") >= 3
        assert it.context.startswith(z.context[:-len(own)])
        assert it.choices == z.choices and it.label == z.label
        if task == "arc_easy":  # drawn from the same split: never the item itself
            assert z.context not in it.context[:-len(z.context)]
    if task != "mmlu_anatomy":  # MMLU takes the first dev examples, whatever the seed
        assert load_task(task, limit=6, num_fewshot=3, seed=8) != a


def test_fewshot_shot_is_solved():
    it = load_task("arc_easy", limit=1, num_fewshot=1, seed=0)[0]
    shot = it.context.split("\n\n")[0]
    assert shot.startswith("Question: ") and "\nAnswer: " in shot
    docs = load_task("arc_easy")
    assert any(shot == d.context + d.choices[d.label] for d in docs)
    wg = load_task("winogrande", limit=1, num_fewshot=1, seed=0)[0]
    shot = wg.contexts[0].split("\n\n")[0]
    assert "_" not in shot and shot.endswith(tuple(d.choices[0] for d in load_task("winogrande")))


def test_jsonl_task(jsonl_task, tmp_path):
    items = load_task(f"jsonl:{jsonl_task}")
    rows = [json.loads(line) for line in jsonl_task.read_text().splitlines()]
    assert [(it.context, it.choices, it.label) for it in items] == \
        [(r["context"], r["choices"], r["label"]) for r in rows]
    assert len(load_task(f"jsonl:{jsonl_task}", limit=3)) == 3
    shot = load_task(f"jsonl:{jsonl_task}", num_fewshot=2, seed=1)
    assert shot == load_task(f"jsonl:{jsonl_task}", num_fewshot=2, seed=1)
    assert all(s.context.endswith(it.context) for s, it in zip(shot, items))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": [" a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        load_task(f"jsonl:{bad}")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope")
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        load_task("mmlu_nope")


# ------------------------------------------------------------------------------------------------
# (d) TP=2, PP=2, DP=2 under torchrun


@pytest.fixture(scope="module")
def layout_rows(jsonl_task, tmp_path_factory, single_rank):
    tmp = tmp_path_factory.mktemp("mc_layouts")
    hf, path = tiny_checkpoint("odd_vocab", tmp)  # tied, vocabulary padded under TP=2
    shard, c = load_checkpoint(path)
    items = load_task(f"jsonl:{jsonl_task}")
    single = {"scores": score_items(shard, c.tokenizer(), items, micro_batch_size=5, progress=False),
              "scores_trunc": score_items(shard, c.tokenizer(), items, micro_batch_size=5,
                                          max_length=24, progress=False)}
    return single, torchrun("mc_layouts", 2, path, jsonl_task), items


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layouts_match_single_process(layout_rows, layout):
    single, rows, items = layout_rows
    mine = [r for r in rows if r["layout"] == layout]
    assert len(mine) == 2, "every rank returns the scores"
    for r in mine:
        for key in ("scores", "scores_trunc"):
            delta = max(abs(a - b) for x, y in zip(r[key], single[key]) for a, b in zip(x, y))
            assert delta <= 1e-4, f"{layout} rank {r['rank']} {key}: {delta}"
        assert predictions(items, r["scores"]) == predictions(items, single["scores"])
    assert mine[0]["acc"] == mine[1]["acc"] == accuracy(items, single["scores"])


@pytest.mark.multirank
def test_evaluate_tasks_records_settings(layout_rows):
    single, rows, items = layout_rows
    ev = [r["evaluate"] for r in rows if r["layout"] == "dp2"]
    assert len(ev) == 2 and ev[0]["results"].keys() == ev[1]["results"].keys()
    (name, res), = ev[0]["results"].items()
    assert name.startswith("jsonl:") and res["n"] == len(items)
    assert res["acc"] == accuracy(items, single["scores"])["acc"]
    s = ev[0]["settings"]
    assert s["layout"] == {"tp": 1, "pp": 1, "dp": 2}
    assert (s["limit"], s["num_fewshot"], s["fewshot_seed"], s["micro_batch_size"]) == (None, 0, 1234, 3)


def test_expert_parallel_batches_share_shapes_across_ranks(jsonl_task):
    """Under expert parallelism (``same_shapes``) every data-parallel rank gets as many
    micro-batches as the busiest, each of the same shape at the same position; the rows each
    rank scores are the ones it scores without padding, the extra batches score nothing."""
    from nemo_minitron.evaluate.multiple_choice import _my_batches, encode_requests

    items = load_task(f"jsonl:{jsonl_task}")
    enc = encode_requests(tiny_tokenizer(), [(it.context, c) for it in items for c in it.choices])
    plain = [_my_batches(enc, 256, r, 3, 4, pp=1) for r in range(3)]
    padded = [_my_batches(enc, 256, r, 3, 4, pp=1, same_shapes=True) for r in range(3)]
    shapes = lambda bs: [tuple(b["tokens"].shape) for b in bs]  # noqa: E731
    assert len({tuple(shapes(p)) for p in plain}) > 1  # the ranks' shapes differ unpadded
    assert len({tuple(shapes(p)) for p in padded}) == 1
    for p, q in zip(plain, padded):
        assert [b["reqs"].tolist() for b in q] == [b["reqs"].tolist() for b in p] + \
            [[]] * (len(q) - len(p))
        for a, b in zip(p, q):
            r, s = a["tokens"].shape
            assert torch.equal(b["tokens"][:r, :s], a["tokens"]) and (b["tokens"][r:] == 0).all()
