"""The lm-evaluation-harness adapter: a harness task defined in YAML over local JSONL runs on our
checkpoint, and agrees with our own multiple-choice scorer and with plain transformers.

Fully offline: the task's data are local files read by HF datasets' packaged ``json`` builder,
with the hub switched off. References below are written out from the definitions (one forward
per request, no batching, no sharing of rows) rather than through the code under test.
"""

import json
import random

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from nemo_minitron.convert import checkpoint as ckpt
from nemo_minitron.convert.hf_config import arch_from_hf_config
from nemo_minitron.evaluate.lm_eval_adapter import MinitronLM
from nemo_minitron.evaluate.multiple_choice import evaluate_tasks, score_continuations
from nemo_minitron.runtime.shard import load_checkpoint

from tests.helpers import minitron, read_jsonl, tiny_hf, tiny_tokenizer, torchrun
from tests.helpers.proc import python
from tests.test_multiple_choice import hf_request_ids

TASK = "minitron_mini_mc"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub access from HF datasets/hub, and their caches under the test's directory."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    import datasets.config as dcfg  # read the variables at import: patch the module too

    monkeypatch.setattr(dcfg, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(dcfg, "HF_DATASETS_OFFLINE", True, raising=False)


def write_task(root, seed=0, n=16):
    """A JSONL file both readers take (ours: context/choices/label with the choices' leading
    space; the harness: ``options`` without it, joined by its target delimiter " ") and a harness
    task YAML over it. Returns (jsonl, include_dir)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(2, 1000)}" for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        k = rng.randrange(2, 5)
        options = [words(rng.randrange(1, 6)) for _ in range(k)]
        ctx = words(rng.choice([1, 4, 12, 30])) if i else ""  # one empty context: the BOS/EOS path
        rows.append({"context": ctx, "choices": [" " + o for o in options], "options": options,
                     "label": rng.randrange(k)})
    root.mkdir(parents=True, exist_ok=True)
    data = root / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {json.dumps(str(data))}}}\n"
        f"  cache_dir: {json.dumps(str(root / 'hf_cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: options\n"
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n")
    return data, tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, our checkpoint dir, tokenizer) of a random tiny Llama."""
    hf = tiny_hf("gqa", seed=3)
    tok = tiny_tokenizer()
    path = ckpt.save(tmp_path_factory.mktemp("lmeval") / "ckpt", arch_from_hf_config(hf.config),
                     hf.state_dict(), tokenizer=tok, provenance={"stage": "test"})
    return hf, path, tok


@pytest.fixture(scope="module")
def tiny_lm(tiny, single_rank):  # the session owns the process groups; adapters nest in them
    lm = MinitronLM(checkpoint=str(tiny[1]), batch_size=3)
    yield lm
    lm.close()


def ll_request(ctx, cont):
    return Instance("loglikelihood", {}, (ctx, cont), 0)


def hf_logprob(model, tok, ctx, cont, max_length):
    """(sum log-prob, greedy) of one request with a transformers model."""
    inp, cont_ids = hf_request_ids(tok, ctx, cont, max_length)
    with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0, -len(cont_ids):].float()
    lp = logits.log_softmax(-1).gather(1, torch.tensor(cont_ids)[:, None]).sum().item()
    return lp, bool((logits.argmax(-1) == torch.tensor(cont_ids)).all())


def hf_rolling(model, prefix, ids, window):
    """Each token predicted once, chunk by chunk of ``window`` tokens, every forward reading the
    ``window`` tokens that end just before the chunk's last token (the BOS/EOS prefix first)."""
    seq = [prefix] + list(ids)
    total = 0.0
    for k in range(0, len(ids), window):
        r = min(window, len(ids) - k)
        inp = seq[max(0, k + r - window):k + r]
        with torch.no_grad():
            lp = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
        tgt = torch.tensor(seq[k + 1:k + r + 1])
        total += lp[-r:].gather(1, tgt[:, None]).sum().item()
    return total


# ------------------------------------------------------------------------------------------------
# the adapter's requests against transformers


def test_loglikelihood_matches_transformers(tiny, tiny_lm, tmp_path):
    hf, _, tok = tiny
    rng = random.Random(1)
    words = lambda k: " ".join(f"w{rng.randrange(2, 1000)}" for _ in range(k))  # noqa: E731
    reqs = [(words(n), " " + words(m)) for n, m in ((1, 1), (5, 3), (40, 2), (12, 1), (3, 6))]
    reqs += [("", " " + words(3)), (words(4) + " ", words(2))]
    best = 0
    while best < 2:  # a word (not <eos>/<unk>) that is the argmax after ctx: greedy by design
        ctx = words(9)
        with torch.no_grad():
            ids = tok(ctx, add_special_tokens=False)["input_ids"]
            best = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
    reqs.append((ctx, " " + tok.convert_ids_to_tokens(best)))
    for max_length in (None, 16):  # 16 < the longest request: left truncation
        lm = tiny_lm if max_length is None else MinitronLM(checkpoint=str(tiny[1]),
                                                          max_length=max_length, batch_size=2)
        try:
            got = lm.loglikelihood([ll_request(c, k) for c, k in reqs])
        finally:
            if lm is not tiny_lm:
                lm.close()
        ref = [hf_logprob(hf, tok, c, k, max_length or hf.config.max_position_embeddings)
               for c, k in reqs]
        assert len(got) == len(reqs)
        assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) <= 1e-4
        assert [g for _, g in got] == [g for _, g in ref]
        assert got[-1][1] is True


def test_loglikelihood_rolling_matches_transformers(tiny, tiny_lm):
    hf, path, tok = tiny
    rng = random.Random(2)
    texts = [" ".join(f"w{rng.randrange(2, 1000)}" for _ in range(n)) for n in (3, 37, 70)]
    prefix = tok.eos_token_id
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    got = tiny_lm.loglikelihood_rolling(reqs)  # one window each: max_length 256 > 70
    ref = [hf_rolling(hf, prefix, x, 256) for x in ids]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4
    lm = MinitronLM(checkpoint=str(path), max_length=16)
    try:
        got = lm.loglikelihood_rolling(reqs)  # several windows, the last one shorter
    finally:
        lm.close()
    ref = [hf_rolling(hf, prefix, x, 16) for x in ids]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-4
    assert tiny_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("",), 0)]) == [0.0]


def test_generate_until_is_greedy_with_stop_strings(tiny, tiny_lm):
    hf, _, tok = tiny
    ctx = "w5 w17 w300 w42"
    ids = tok(ctx, add_special_tokens=False)["input_ids"]
    new = []
    for _ in range(6):  # plain greedy decoding with transformers
        with torch.no_grad():
            nxt = int(hf(torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    full = tok.decode(new)
    out = tiny_lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [],
                                                                      "max_gen_toks": 6}), 0)])
    assert out == [full]
    stop = tok.decode(new[2:3])  # stop at the third generated word
    cut = full.split(stop)[0]
    out = tiny_lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop],
                                                                      "max_gen_toks": 6}), 0)])
    assert out == [cut] and len(cut) < len(full)


@pytest.mark.multirank
def test_greedy_flags_at_tp2_and_pp2(tmp_path, single_rank):
    """The greedy flag under a vocab-parallel (padded) output layer and a pipeline: TP=2 and
    PP=2 under torchrun agree with one process and with transformers' argmax."""
    hf = tiny_hf("odd_vocab", seed=4)  # 1001 tokens: padded to 1002 at TP=2
    path = ckpt.save(tmp_path / "ckpt", arch_from_hf_config(hf.config), hf.state_dict(),
                     tokenizer=tiny_tokenizer(), provenance={"stage": "test"})
    rng = random.Random(5)
    encoded = []
    for n in (3, 9, 20, 6, 14, 2):
        ctx = [rng.randrange(2, 1001) for _ in range(n)]
        greedy = []
        for _ in range(rng.randrange(1, 4)):  # greedy continuations of 1-3 tokens
            with torch.no_grad():
                greedy.append(int(hf(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
        encoded += [(ctx, greedy), (ctx, [rng.randrange(2, 1001) for _ in greedy])]
    shard, _ = load_checkpoint(path)
    single = score_continuations(shard, encoded, micro_batch_size=4, progress=False)
    assert [g for _, g in single] == [True, False] * 6
    (tmp_path / "requests.json").write_text(json.dumps(encoded))
    rows = torchrun("greedy_layouts", 2, path, tmp_path / "requests.json")
    for layout in ("tp2", "pp2"):
        mine = [r for r in rows if r["layout"] == layout]
        assert len(mine) == 2, "every rank returns the results"
        for r in mine:
            assert [bool(g) for _, g in r["scored"]] == [g for _, g in single], layout
            assert max(abs(a[0] - b[0]) for a, b in zip(r["scored"], single)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# a YAML-defined harness task against our own scorer


def test_harness_task_matches_our_scorer(tiny, tiny_lm, tmp_path, single_rank):
    hf, _, tok = tiny
    data, include = write_task(tmp_path / "task")
    res = simple_evaluate(model=tiny_lm, tasks=[TASK], task_manager=TaskManager(include_path=str(include)),
                          num_fewshot=0, bootstrap_iters=0, log_samples=True)
    harness = res["results"][TASK]
    ours = evaluate_tasks(tiny_lm.shard, tok, [f"jsonl:{data}"], progress=False)["results"]
    ours = ours[f"jsonl:{data}"]
    assert ours["n"] == 16 and len(res["samples"][TASK]) == 16
    assert harness["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    # per choice: the harness' log-likelihoods against transformers
    rows = read_jsonl(data)
    worst = 0.0
    for s in res["samples"][TASK][:6]:
        doc = rows[s["doc_id"]]
        for (lp, greedy), choice in zip((r[0] for r in s["resps"]), doc["choices"]):
            ref, ref_greedy = hf_logprob(hf, tok, doc["context"], choice, 256)
            worst = max(worst, abs(float(lp) - ref))
            assert bool(greedy) == ref_greedy
    assert worst <= 1e-4, f"max |dlogprob| = {worst}"


def test_cli_entry_registers_the_model(tiny, tmp_path):
    """`python -m nemo_minitron.evaluate.lm_eval_adapter` runs the harness' own CLI with our model
    registered and chosen by default."""
    _, path, _ = tiny
    _, include = write_task(tmp_path / "task", n=5)
    out = tmp_path / "results"
    env = dict(OMP_NUM_THREADS="2", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "cache"))
    python("-m", "nemo_minitron.evaluate.lm_eval_adapter", "--model_args", f"checkpoint={path}",
           "--batch_size", "4", "--tasks", TASK, "--include_path", include, "--output_path", out,
           env=env, timeout=600)
    results = [json.loads(f.read_text()) for f in out.rglob("results_*.json")]
    assert len(results) == 1
    assert 0.0 <= results[0]["results"][TASK]["acc,none"] <= 1.0
    assert results[0]["config"]["model"] == "nemo_minitron"


def test_minitron_lm_eval_help():
    p = minitron("lm_eval", "--help", check=True)
    assert "minitron lm_eval --model_args checkpoint=DIR" in p.stdout and "--tasks" in p.stdout


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        MinitronLM()
    with pytest.raises(ValueError, match="nowhere"):
        MinitronLM(checkpoint=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("args,words", [
    (["--model_args", "checkpoint={missing}", "--tasks", "piqa"],
     ["--model_args checkpoint=", "nowhere does not exist"]),
    (["--model_args", "checkpoint={file}", "--tasks", "piqa"], ["is a file"]),
    (["--model_args", "checkpoint={ok}"], ["--tasks is required", "ls tasks"]),
    (["--tasks", "piqa"], ["--model_args checkpoint=DIR is required"]),
    (["--model_args", "checkpoint={ok}", "--tasks", "no_such_task_xyz"],
     ["Tasks not found: no_such_task_xyz"]),
    (["--model_args", "checkpoint={ok},dtype=bf17", "--tasks", "piqa"],
     ["--model_args dtype=bf17", "unknown dtype"]),
    (["--model_args", "checkpoint={ok},max_length=-5", "--tasks", "piqa"],
     ["--model_args max_length", "positive integer", "-5"]),
    (["--model_args", "checkpoint={ok},batch_size=abc", "--tasks", "piqa"],
     ["--model_args batch_size", "must be an integer"]),
], ids=["missing", "file", "no_tasks", "no_checkpoint", "unknown_task", "dtype", "max_length",
        "batch_size"])
def test_bad_request_is_one_line_before_the_model(tiny, single_rank, tmp_path, monkeypatch,
                                                  capsys, args, words):
    """A missing checkpoint or --tasks, and a task the harness does not know, were tracebacks
    (the first two from inside the harness, after its task registry loaded)."""
    from nemo_minitron.cli.main import main as cli_main
    from nemo_minitron.runtime import model as rmodel

    (tmp_path / "notes.txt").write_text("x")
    paths = {"missing": tmp_path / "nowhere", "file": tmp_path / "notes.txt", "ok": tiny[1]}
    monkeypatch.setattr("sys.argv", ["pytest"])
    built = rmodel.models_built
    assert torch.distributed.is_initialized()  # the suite's world: the call must leave it be
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["lm_eval", *(a.format(**paths) for a in args)])
    assert torch.distributed.is_initialized()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert err.startswith("minitron lm_eval: error: ") and all(w in err for w in words), err
    assert rmodel.models_built == built


# ------------------------------------------------------------------------------------------------
# the real SmolLM2 teacher (BPE tokenizer) against transformers


@pytest.mark.real_model
def test_teacher_requests_match_transformers(teacher, hf_teacher, single_rank):
    lm = MinitronLM(checkpoint=str(teacher), batch_size=4)
    try:
        tok = lm.tokenizer
        reqs = [("Question: What do bees make?\nAnswer:", " honey"),
                ("The capital of France is", " Paris"),
                ("The capital of France is ", "Paris, a city on the Seine."),
                ("", "Hello world"),
                ("Water boils at 100 degrees", " Celsius at sea level.")]
        got = lm.loglikelihood([ll_request(c, k) for c, k in reqs])
        ref = [hf_logprob(hf_teacher, tok, c, k, 8192) for c, k in reqs]
        assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) <= 2e-3
        assert [g for _, g in got] == [g for _, g in ref]
        text = ("The quick brown fox jumps over the lazy dog. " * 6).strip()
        (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert rolled == pytest.approx(hf_rolling(hf_teacher, tok.bos_token_id
                                                  if tok.bos_token_id is not None
                                                  else tok.eos_token_id, ids, 8192), abs=2e-3)
    finally:
        lm.close()
