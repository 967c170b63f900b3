"""Bad inputs and damaged files, across every stage: each is refused with one line naming the field
or file, a non-zero exit, before any model is built, and with nothing left under output= (nor in the
working directory: Hydra's run directory is off).

The CLI runs in this process (``cli.main.main``; a subprocess per case would spend seconds on
imports). Fixtures are written by the project's own writers: ``import_hf`` and ``checkpoint.save``
for checkpoints, ``build_indexed`` for datasets, ``Importance.save`` for scores; the damage is
done to those files.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import tiny_hf, tiny_tokenizer
from nemo_minitron.cli.main import main as cli_main
from nemo_minitron.runtime import model as rmodel

SEQ = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny checkpoints, datasets, scores, and damaged copies of them; name -> path."""
    from nemo_minitron.arch import Arch
    from nemo_minitron.convert import checkpoint as ckpt
    from nemo_minitron.convert.hf import import_hf
    from nemo_minitron.convert.weights import canonical_shapes
    from nemo_minitron.data.indexed import _indexed_module, build_indexed
    from nemo_minitron.pruning.select import random_importance

    root = tmp_path_factory.mktemp("bad_inputs")
    a = {"root": root, "hf": root / "hf"}
    tiny_hf("gqa").save_pretrained(a["hf"])
    tiny_tokenizer().save_pretrained(a["hf"])
    a["ck"] = import_hf(str(a["hf"]), str(root / "ck"))
    tiny_hf("phi3_longrope").save_pretrained(root / "hf_longrope")  # Phi-3-128k's rotary scaling
    tiny_tokenizer().save_pretrained(root / "hf_longrope")
    a["longrope"] = import_hf(str(root / "hf_longrope"), str(root / "longrope"))
    teacher = ckpt.Checkpoint(a["ck"])
    a["student"] = ckpt.save(root / "student", teacher.arch, teacher.tensors())
    odd = teacher.arch.replace(vocab_size=1001)  # another tokenizer's vocabulary
    a["odd_vocab"] = ckpt.save(root / "odd_vocab", odd, {
        k: torch.zeros(shape) for k, shape in canonical_shapes(odd).items()})

    def damaged(name, damage):
        d = root / name
        shutil.copytree(a["ck"], d)
        damage(d)
        a[name] = d

    shard = ckpt.shard_name(0, 1)
    damaged("truncated", lambda d: os.truncate(d / shard, (d / shard).stat().st_size // 2))
    damaged("arch_not_json", lambda d: (d / ckpt.ARCH).write_text("{hidden_size: 128,"))
    damaged("arch_disagrees", lambda d: Arch.from_json(d / ckpt.ARCH).replace(
        ffn_hidden_size=192).to_json(d / ckpt.ARCH))
    damaged("no_meta", lambda d: (d / ckpt.META).unlink())
    damaged("shard_missing", lambda d: (d / shard).unlink())
    a["run_of_ck"] = root / "run_of_ck"  # a finished finetune of ck, as its final/ records it
    final = shutil.copytree(a["ck"], a["run_of_ck"] / "final")
    meta = json.loads((final / ckpt.META).read_text())
    (final / ckpt.META).write_text(json.dumps(meta | {"stage": "finetune", "step": 1000,
                                                      "parent": str(a["ck"])}))
    a["run_from_hf"] = root / "run_from_hf"  # a finished distillation of student from another
    final = shutil.copytree(a["student"], a["run_from_hf"] / "final")  # teacher (the HF dir)
    meta = json.loads((final / ckpt.META).read_text())
    (final / ckpt.META).write_text(json.dumps(meta | {"stage": "distill", "step": 1000,
                                                      "parent": str(a["student"]),
                                                      "teacher": str(a["hf"])}))

    words = [" ".join(f"w{(7 * i + j) % 997 + 2}" for j in range(60)) for i in range(40)]
    text = root / "corpus.txt"
    text.write_text("\n\n".join(words))
    a["text"] = text
    a["ds"] = root / "ds"
    build_indexed(iter(words), tiny_tokenizer(), a["ds"], progress=False)
    a["ds_small"] = root / "ds_small"  # 3 documents: one valid doc of 61 tokens
    build_indexed(iter(words[:3]), tiny_tokenizer(), a["ds_small"], progress=False)
    a["ds_one"] = root / "ds_one"  # what one short text file makes: a single document
    build_indexed(iter(words[:1]), tiny_tokenizer(), a["ds_one"], progress=False)
    a["ds_empty"] = root / "ds_empty"  # a foreign (megatron-written) dataset with no documents
    builder = _indexed_module().IndexedDatasetBuilder(str(a["ds_empty"]) + ".bin")
    builder.finalize(str(a["ds_empty"]) + ".idx")
    def other_tokenizer(p):  # the ids a tokenizer with a larger vocabulary gives
        tokens = np.memmap(p + ".bin", dtype=np.uint16, mode="r+")
        tokens += 3000
        tokens.flush()

    for name, damage in (("ds_truncated", lambda p: os.truncate(p + ".bin", 100)),
                         ("ds_bad_idx", lambda p: Path(p + ".idx").write_bytes(b"garbage" * 4)),
                         ("ds_other_tokenizer", other_tokenizer)):
        for suffix in (".bin", ".idx", ".json"):
            shutil.copy(str(a["ds"]) + suffix, str(root / name) + suffix)
        damage(str(root / name))
        a[name] = root / name

    arch = teacher.arch
    a["scores"] = root / "importance.safetensors"
    random_importance(arch, 0).save(a["scores"])
    a["scores_other"] = root / "importance_other.safetensors"
    random_importance(arch.replace(num_layers=6), 0).save(a["scores_other"])
    a["not_scores"] = root / "notes.safetensors"
    a["not_scores"].write_text("not a safetensors file")
    a["pickled_scores"] = root / "importance.pt"  # what versions before safetensors scores wrote
    a["pickled_scores"].write_bytes(b"\x80\x02}q\x00.")
    a["bad_jsonl"] = root / "bad.jsonl"
    a["bad_jsonl"].write_text('{"text": "w2 w3"}\n{oops\n')
    a["mc_not_json"] = root / "items.jsonl"  # a multiple-choice task file that is not JSON
    a["mc_not_json"].write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\nb, c, 0\n')
    a["mc_label_text"] = root / "label_text.jsonl"  # the right choice's text, not its index
    a["mc_label_text"].write_text('{"context": "a", "choices": ["b", "c"], "label": "c"}\n')
    a["mc_empty"] = root / "no_items.jsonl"
    a["mc_empty"].write_text("\n")
    a["latin1"] = root / "latin1.txt"
    a["latin1"].write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    a["cut_gz"] = root / "cut.txt.gz"  # a download cut short
    a["cut_gz"].write_bytes(gzip.compress(text.read_bytes())[:40])
    a["mc_empty_choice"] = root / "empty_choice.jsonl"  # a choice with no text to score
    a["mc_empty_choice"].write_text('{"context": "w2 w3", "choices": [" w4", " w5"], "label": 0}\n'
                                    '{"context": "w2 w3", "choices": [" w4", ""], "label": 0}\n')
    a["mc_one_choice"] = root / "one_choice.jsonl"
    a["mc_one_choice"].write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    a["table_csv"] = root / "table.csv"
    a["table_csv"].write_text("a,b\n1,2\n")
    a["empty_dir"] = root / "empty_dir"
    a["empty_dir"].mkdir()
    a["not_parquet"] = root / "table.parquet"  # text saved under a parquet name
    a["not_parquet"].write_text("a,b\n1,2\n")
    a["hf_copy"] = root / "hf_copy"  # a source a bad import may replace: not the shared one
    shutil.copytree(a["hf"], a["hf_copy"])
    gpt2 = root / "gpt2"  # a Hugging Face model of a family we do not handle
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(gpt2)
    a["gpt2"] = gpt2
    from nemo_minitron.artifacts.evaluation import write_eval

    a["eval_results"] = write_eval(root / "eval_results.json", {"loss": 3.0, "perplexity": 20.1})
    a["results_not_json"] = root / "results.json"
    a["results_not_json"].write_text("{loss: 1")
    a["results_wrong_types"] = write_eval(root / "eval_types.json", {"loss": 3.0,
                                                                     "tasks": "piqa"})
    a["mc_not_utf8"] = root / "latin1_items.jsonl"
    a["mc_not_utf8"].write_bytes('{"context": "caf\u00e9", "choices": [" a", " b"], '
                                 '"label": 0}\n'.encode("latin-1"))
    a["mc_null_context"] = root / "null_context.jsonl"  # scored the text "None" as the context
    a["mc_null_context"].write_text('{"context": null, "choices": [" w4", " w5"], "label": 0}\n')
    damaged("tokenizer_damaged", lambda d: (d / "tokenizer" / "tokenizer.json").write_text(
        '{"broken": '))

    def other_vocab(d):  # the same vocabulary size, two ids swapped (Llama-2 vs Mistral)
        f = d / "tokenizer" / "tokenizer.json"
        tok = json.loads(f.read_text())
        vocab = tok["model"]["vocab"]
        (x, i), (y, j) = list(vocab.items())[10:12]
        vocab[x], vocab[y] = j, i
        f.write_text(json.dumps(tok))
    damaged("other_tokenizer", other_vocab)
    a["ds_dir"] = root / "ds_dir"  # a dataset in a directory of its own
    a["ds_dir"].mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(str(a["ds"]) + suffix, str(a["ds_dir"] / "corpus") + suffix)
    a["ds_in_dir"] = a["ds_dir"] / "corpus"
    a["scores_dir"] = root / "scores_dir"  # an earlier prune's scores, in their own directory
    a["scores_dir"].mkdir()
    a["scores_in_dir"] = shutil.copy(a["scores"], a["scores_dir"] / "importance.safetensors")
    a["corpus_json"] = root / "json_corpus" / "corpus.json"  # JSON lines with a text field
    a["corpus_json"].parent.mkdir()
    a["corpus_json"].write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
    a["corpus_json_prefix"] = a["corpus_json"].with_suffix("")
    import bz2

    a["plain_bz2"] = root / "corpus.bz2"  # compressed text, named as a bare dump would be
    a["plain_bz2"].write_bytes(bz2.compress(text.read_bytes()))
    a["utf16"] = root / "utf16.txt"  # Windows' "Unicode": the fix said iconv -f latin1
    a["utf16"].write_bytes("w2 w3 w4\n".encode("utf-16"))
    a["other_xml"] = root / "items.xml"  # XML that is no MediaWiki dump: dropped in silence
    a["other_xml"].write_text("<items><item>w2 w3 w4</item><item>w5 w6</item></items>")
    return a


# stage, arguments ({name} = an asset path, {out} = this case's output), words the message must
# contain (the field or file, and what is wrong), extra environment.
COMMON = ["model.checkpoint={ck}", "data.prefix={ds}", f"data.seq_length={SEQ}",
          "data.valid_fraction=0.2"]
TRAIN = COMMON + ["output={out}"]
PRUNE = TRAIN + ["prune=none"]
DATA = ["tokenizer={ck}", "output={out}", "eod_token=null"]
DISTILL = ["model.checkpoint={student}", "kd.teacher={ck}", "data.prefix={ds}",
           f"data.seq_length={SEQ}", "output={out}"]
SEARCH = COMMON + ["output={out}", "search.budget=0.6"]
CASES = [
    # --- import
    ("import_no_source", "import", ["model.source=null", "output={out}"],
     ["model.source is required"]),
    ("import_missing_dir", "import", ["model.source=/nonexistent/model", "output={out}"],
     ["/nonexistent/model", "does not exist"]),
    ("import_hub_offline", "import", ["model.source=org/some-llm", "output={out}"],
     ["model.source=org/some-llm", "no network", "local directory (model.source="],
     {"HF_HUB_OFFLINE": "1"}),
    ("import_hub_unreachable", "import", ["model.source=org/some-llm", "output={out}"],
     ["model.source=org/some-llm", "cannot be reached", "no network"],
     {"HF_ENDPOINT": "http://127.0.0.1:9"}),
    ("import_dir_without_config", "import", ["model.source={empty_dir}", "output={out}"],
     ["model.source=", "no config.json"]),
    ("import_gguf_file_missing", "import",
     ["model.source={hf}", "model.gguf_file=smol.gguf", "output={out}"],
     ["model.gguf_file=smol.gguf", "not found"]),
    ("import_unsupported_family", "import", ["model.source={gpt2}", "output={out}"],
     ["config.json", "gpt2", "supported"]),
    ("import_output_exists", "import", ["model.source={hf}", "output={ck}"],
     ["already exists", "overwrite=true"]),
    ("import_source_is_text_file", "import", ["model.source={text}", "output={out}"],
     ["model.source=", "corpus.txt is a file but not a .gguf"]),
    # the megatron-only settings were ignored silently on a Hugging Face import
    ("import_arch_on_hf_source", "import",
     ["model.source={hf}", "output={out}", "+model.arch.num_query_groups=1"],
     ["model.arch: only for a megatron checkpoint", "drop it"]),
    ("import_bad_dtype", "import", ["model.source={hf}", "output={out}", "dtype=fp16"],
     ["dtype='fp16'"]),
    # the import replaced the Hugging Face directory it had just read with the checkpoint
    ("import_output_is_its_source", "import",
     ["model.source={hf_copy}", "output={hf_copy}", "overwrite=true"],
     ["output=", "would replace model.source=", "outside it"]),
    # --- export
    ("export_no_output", "export", ["model.checkpoint={ck}"], ["output=<dir> is required"]),
    ("export_missing_checkpoint", "export", ["model.checkpoint=/nonexistent/ck", "output={out}"],
     ["model.checkpoint", "/nonexistent/ck", "does not exist"]),
    ("export_into_its_checkpoint", "export", ["model.checkpoint={ck}", "output={ck}",
                                              "overwrite=true"],
     ["output=", "input checkpoint"]),
    ("export_truncated_shard", "export", ["model.checkpoint={truncated}", "output={out}"],
     ["model-00001-of-00001.safetensors is truncated"]),
    ("export_arch_not_json", "export", ["model.checkpoint={arch_not_json}", "output={out}"],
     ["arch.json is not valid JSON", "re-create"]),
    ("export_arch_disagrees", "export", ["model.checkpoint={arch_disagrees}", "output={out}"],
     ["arch.json disagrees with the tensors", "arch.json implies (128, 192)"]),
    ("export_incomplete_checkpoint", "export", ["model.checkpoint={no_meta}", "output={out}"],
     ["not a complete nemo_minitron checkpoint", "minitron.json"]),
    ("export_shard_missing", "export", ["model.checkpoint={shard_missing}", "output={out}"],
     ["missing model-00001-of-00001.safetensors"]),
    ("export_megatron_tp_not_dividing_heads", "export",
     ["model.checkpoint={ck}", "output={out}", "format=megatron", "parallel.tp=3"],
     ["num_attention_heads=4 is not divisible by parallel.tp=3"]),
    ("export_bad_dtype", "export", ["model.checkpoint={ck}", "output={out}", "dtype=fp8"],
     ["dtype='fp8'"]),
    # overwrite=true replaces output= whole: the checkpoint inside it was deleted after the export
    ("export_output_holds_its_checkpoint", "export",
     ["model.checkpoint={ck}", "output={root}", "overwrite=true"],
     ["output=", "would replace model.checkpoint="]),
    # --- data
    ("data_inputs_missing", "data", DATA + ["inputs=[/nonexistent/corpus.jsonl]"],
     ["inputs not found"]),
    ("data_no_inputs", "data", DATA + ["inputs=[]"],
     ["inputs=[...] is required"]),
    ("data_unsupported_suffix", "data", DATA + ["inputs=[{table_csv}]"],
     ["table.csv"]),
    ("data_eod_not_in_vocab", "data", ["inputs=[{text}]", "tokenizer={ck}", "output={out}",
                                       "eod_token='<endoftext>'"],
     ["eod_token='<endoftext>'", "not in the tokenizer's vocabulary"]),
    ("data_eod_unquoted_lexer", "data", ["inputs=[{text}]", "tokenizer={ck}", "output={out}",
                                         "eod_token=<|end_of_text|>"],
     ["eod_token=<|end_of_text|>", "\"eod_token='<|end_of_text|>'\""]),
    ("data_output_exists", "data", ["inputs=[{text}]", "tokenizer={ck}", "output={ds}"],
     ["output=", "already there", "overwrite=true"]),
    ("data_tokenizer_missing", "data", ["inputs=[{text}]", "tokenizer=/nonexistent/tok",
                                        "output={out}"], ["tokenizer /nonexistent/tok not found"]),
    ("data_tokenizer_without_one", "data", ["inputs=[{text}]", "tokenizer={student}",
                                            "output={out}", "eod_token=null"],
     ["tokenizer=", "student holds no tokenizer"]),
    ("data_output_with_suffix", "data", ["inputs=[{text}]", "tokenizer={ck}",
                                         "output={out}.bin", "eod_token=null"],
     ["output=", "without their suffix", "use output="]),
    ("data_tokenizer_hub_offline", "data", ["inputs=[{text}]", "tokenizer=org/some-tokenizer",
                                            "output={out}", "eod_token=null"],
     ["tokenizer=org/some-tokenizer", "no network"], {"HF_HUB_OFFLINE": "1"}),
    ("data_bad_jsonl_line", "data", DATA + ["inputs=[{bad_jsonl}]"],
     ["bad.jsonl, line 2", "not valid JSON"]),
    ("data_not_utf8", "data", DATA + ["inputs=[{latin1}]"],
     ["latin1.txt is not UTF-8", "iconv"]),
    ("data_gzip_cut_short", "data", DATA + ["inputs=[{cut_gz}]"],
     ["cut.txt.gz cannot be read", "cut short"]),
    ("data_output_under_a_file", "data", ["inputs=[{text}]", "tokenizer={ck}",
                                          "output={text}/ds", "eod_token=null"],
     ["output=", "corpus.txt is a file, not a directory"]),
    # every document twice, some copies held out: the validation loss scored training text
    # the corpus (corpus.json) was replaced by the dataset's metadata (corpus.json)
    ("data_output_replaces_its_input", "data",
     ["inputs=[{corpus_json}]", "tokenizer={ck}", "output={corpus_json_prefix}",
      "eod_token=null"],
     ["output=", "corpus.json, which is one of the inputs"]),
    ("data_utf16", "data", DATA + ["inputs=[{utf16}]"],
     ["utf16.txt is not UTF-8 text (byte 0xff)", "iconv -f utf-16 -t utf-8"]),
    ("data_bz2_not_a_dump", "data", DATA + ["inputs=[{plain_bz2}]"],
     ["corpus.bz2: not a MediaWiki XML dump", "corpus.txt.bz2"]),
    ("data_xml_without_pages", "data", DATA + ["inputs=[{other_xml},{text}]"],
     ["items.xml holds no <page> elements"]),
    ("data_input_twice", "data", DATA + ["inputs=[{text},{text}]"],
     ["inputs:", "corpus.txt is read twice"]),
    # transformers read the file as a config.json: a traceback
    ("data_tokenizer_is_a_file", "data", ["inputs=[{text}]", "tokenizer={text}",
                                          "output={out}", "eod_token=null"],
     ["tokenizer=", "corpus.txt is a file"]),
    # pyarrow's message named neither the file nor the fix
    ("data_parquet_not_parquet", "data", DATA + ["inputs=[{not_parquet}]"],
     ["table.parquet cannot be read as parquet"]),
    # a directory: it wrote the hidden files .bin/.idx/.json inside it
    ("data_output_ends_in_slash", "data", ["inputs=[{text}]", "tokenizer={ck}",
                                           "output={out}/", "eod_token=null"],
     ["output=", "ends in '/'", "prefix of the files"]),
    ("data_output_non_ascii_unquoted", "data", ["inputs=[{text}]", "tokenizer={ck}",
                                                "output={out}/caf\u00e9", "eod_token=null"],
     ["non-ASCII characters unquoted", "\"output='"]),
    # --- evaluate
    ("evaluate_micro_batch_0", "evaluate", COMMON + ["eval.micro_batch_size=0", "output={out}"],
     ["eval.micro_batch_size=0"]),
    ("evaluate_limit_0", "evaluate", COMMON + ["eval.tasks=[piqa]", "eval.limit=0",
                                               "output={out}"], ["eval.limit=0", ">= 1"]),
    ("evaluate_unknown_task", "evaluate", COMMON + ["eval.tasks=[arcc]", "output={out}"],
     ["eval.tasks: unknown ['arcc']"]),
    ("evaluate_misspelt_task", "evaluate", COMMON + ["eval.tasks=[hellaswg]", "output={out}"],
     ["eval.tasks: unknown ['hellaswg'] (did you mean hellaswag?)"]),
    ("evaluate_task_twice", "evaluate", COMMON + ["eval.tasks=[piqa,arc_easy,piqa]",
                                                  "output={out}"],
     ["eval.tasks: ['piqa'] listed more than once"]),
    # an MMLU subject is checked against the installed data before the model loads
    ("evaluate_unknown_mmlu_subject", "evaluate",
     COMMON + ["eval.tasks=[mmlu_astrologyy]", "output={out}"],
     ["eval.tasks: mmlu_astrologyy: unknown MMLU subject 'astrologyy' (did you mean "
      "mmlu_astronomy?)"]),
    ("evaluate_jsonl_task_missing", "evaluate",
     COMMON + ["eval.tasks=[jsonl:/nonexistent/items.jsonl]", "output={out}"],
     ["eval.tasks", "/nonexistent/items.jsonl", "not found"]),
    # a user's task file is read whole before the model loads (not after the held-out loss)
    ("evaluate_jsonl_task_fields", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{bad_jsonl}]", "output={out}"],
     ["bad.jsonl:1", "missing field(s) ['choices', 'context', 'label']"]),
    ("evaluate_jsonl_task_not_json", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_not_json}]", "output={out}"],
     ["items.jsonl:2", "not a JSON object"]),
    ("evaluate_jsonl_task_label_text", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_label_text}]", "output={out}"],
     ["label_text.jsonl:1", "label 'c'", "0-based index"]),
    ("evaluate_jsonl_task_one_choice", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_one_choice}]", "output={out}"],
     ["one_choice.jsonl:1", "at least two answers"]),
    ("evaluate_jsonl_task_choice_without_tokens", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_empty_choice}]", "output={out}"],
     ["empty_choice.jsonl", "item 1", "tokenises to nothing"]),
    ("evaluate_jsonl_task_empty", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_empty}]", "output={out}"], ["no_items.jsonl holds no items"]),
    # a checkpoint imported without its tokenizer (megatron, no model.tokenizer) cannot score text
    ("evaluate_tasks_without_tokenizer", "evaluate",
     ["model.checkpoint={student}", "data.prefix={ds}", f"data.seq_length={SEQ}",
      "eval.tasks=[piqa]", "output={out}"], ["eval.tasks=['piqa'] needs the tokenizer",
                                             "no tokenizer/", "model.tokenizer="]),
    # evaluate's output is the results file: a directory there failed after the evaluation
    ("evaluate_output_is_a_directory", "evaluate", COMMON + ["output={empty_dir}"],
     ["output=", "is a directory", "eval_results.json"]),
    # a directory to be: the results went to a file of that name, after the evaluation
    ("evaluate_output_ends_in_slash", "evaluate", COMMON + ["output={out}/"],
     ["output=", "ends in '/'", "eval_results.json"]),
    # the message said the file "does not exist"
    ("evaluate_checkpoint_is_a_file", "evaluate",
     ["model.checkpoint={text}", "data.prefix={ds}", "output={out}"],
     ["model.checkpoint", "corpus.txt is a file, not a checkpoint directory"]),
    ("evaluate_checkpoint_is_hugging_face", "evaluate",
     ["model.checkpoint={hf}", "data.prefix={ds}", "output={out}"],
     ["Hugging Face model directory", "minitron import model.source="]),
    # "mmlu_" named the MMLU directory itself: a message about a missing split, without the field
    ("evaluate_mmlu_without_subject", "evaluate", COMMON + ["eval.tasks=[mmlu_]", "output={out}"],
     ["eval.tasks: mmlu_: unknown MMLU subject ''"]),
    # the results replaced a file of the checkpoint being evaluated
    ("evaluate_output_inside_checkpoint", "evaluate",
     COMMON + ["output={ck}/model.safetensors.index.json"],
     ["output=", "would write into the input checkpoint"]),
    # the Markdown report, written beside the JSON with suffix .md, replaced the results
    ("evaluate_output_markdown", "evaluate", COMMON + ["output={out}.md"],
     ["output=", "result.md", "result.json"]),
    # the tokenizer's JSON error came alone ("Expecting value"), after the held-out loss ran
    ("evaluate_tokenizer_damaged", "evaluate",
     ["model.checkpoint={tokenizer_damaged}"] + COMMON[1:] + ["eval.tasks=[piqa]",
                                                              "output={out}"],
     ["tokenizer_damaged/tokenizer", "does not load", "re-import"]),
    ("evaluate_jsonl_task_not_utf8", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_not_utf8}]", "output={out}"],
     ["latin1_items.jsonl:1", "not UTF-8", "0xe9"]),
    ("evaluate_jsonl_task_null_context", "evaluate",
     COMMON + ["eval.tasks=[jsonl:{mc_null_context}]", "output={out}"],
     ["null_context.jsonl:1", "context must be a string"]),
    # the round's whole output went to /tmp/.../escaped, outside output=
    ("pipeline_round_name_a_path", "pipeline",
     TRAIN + ["pipeline.rounds=[{name:'../escaped',target:{ffn_hidden_size:128}}]"],
     ["pipeline.rounds[].name='../escaped'", "one plain name"]),
    # the search offered the unpruned model as its nearest candidate
    ("search_budget_whole_model", "search", COMMON + ["output={out}", "search.budget=1.0"],
     ["search.budget=1", "keeps the whole model", "nothing to prune"]),
    ("report_results_wrong_types", "report", ["{results_wrong_types}", "output={out}"],
     ["eval_types.json", "damaged results file"]),
    ("pipeline_jsonl_task_fields", "pipeline",
     TRAIN + ["prune=none", "eval.tasks=[jsonl:{bad_jsonl}]"], ["bad.jsonl:1", "missing field"]),
    ("prune_ep_on_dense", "prune", PRUNE + ["parallel.ep=2"],
     ["parallel.ep=2", "mixture-of-experts"]),
    ("pipeline_ep_on_dense", "pipeline", TRAIN + ["parallel.ep=2"],
     ["parallel.ep=2", "mixture-of-experts"]),
    ("pipeline_aux_loss_on_dense", "pipeline", TRAIN + ["train.moe_aux_loss_coeff=0.01"],
     ["train.moe_aux_loss_coeff=0.01", "mixture-of-experts"]),
    ("evaluate_dataset_missing", "evaluate", ["model.checkpoint={ck}",
                                              "data.prefix=/nonexistent/ds", "output={out}"],
     ["data.prefix=/nonexistent/ds", "no indexed dataset"]),
    ("evaluate_prefix_with_suffix", "evaluate", ["model.checkpoint={ck}", "data.prefix={ds}.bin",
                                                 "output={out}"],
     ["data.prefix=", "ds.bin", "without their suffix", "use "]),
    ("evaluate_dataset_empty", "evaluate", ["model.checkpoint={ck}", "data.prefix={ds_empty}",
                                            "output={out}"], ["ds_empty is empty"]),
    # the hint was valid_fraction=0, which the CLI refuses
    ("evaluate_dataset_one_document", "evaluate", ["model.checkpoint={ck}", "data.prefix={ds_one}",
                                                   "output={out}"],
     ["ds_one has 1 document(s)", "one per JSONL line"]),
    # a dataset of another tokenizer: an IndexError in the embedding, once the model was built
    ("evaluate_dataset_of_another_tokenizer", "evaluate",
     COMMON[:1] + ["data.prefix={ds_other_tokenizer}"] + COMMON[2:] + ["output={out}"],
     ["data.prefix=", "holds token id", "outside the 1000-token vocabulary of model.checkpoint",
      "minitron data tokenizer="]),
    ("finetune_dataset_of_another_tokenizer", "finetune",
     COMMON[:1] + ["data.prefix={ds_other_tokenizer}"] + COMMON[2:] + ["output={out}"],
     ["data.prefix=", "holds token id", "1000-token vocabulary"]),
    ("evaluate_dataset_truncated", "evaluate", ["model.checkpoint={ck}",
                                                "data.prefix={ds_truncated}", "output={out}"],
     ["ds_truncated.bin is truncated"]),
    ("evaluate_dataset_bad_index", "evaluate", ["model.checkpoint={ck}",
                                                "data.prefix={ds_bad_idx}", "output={out}"],
     ["ds_bad_idx.idx cannot be read"]),
    ("evaluate_seq_longer_than_data", "evaluate", ["model.checkpoint={ck}", "data.prefix={ds}",
                                                   "data.seq_length=100000", "output={out}"],
     ["data.prefix=", "fewer than one sample", "seq_length"]),
    # rotary positions run at any length: beyond the trained context they are silently wrong
    ("evaluate_seq_beyond_context", "evaluate",
     ["model.checkpoint={ck}", "data.prefix={ds}", "data.seq_length=300",
      "data.valid_fraction=0.5", "eval.micro_batch_size=1", "output={out}"],
     ["data.seq_length=300", "max_position_embeddings=256"]),
    ("evaluate_batch_larger_than_split", "evaluate",
     ["model.checkpoint={ck}", "data.prefix={ds_small}", f"data.seq_length={SEQ}",
      "eval.micro_batch_size=4", "output={out}"],
     ["valid split holds 1 samples", "eval.micro_batch_size"]),
    ("evaluate_tp_not_dividing_heads", "evaluate", COMMON + ["parallel.tp=3", "output={out}"],
     ["num_attention_heads=4 is not divisible by parallel.tp=3"]),
    ("prune_target_not_dividing_tp", "prune",
     PRUNE + ["prune.target.ffn_hidden_size=129", "parallel.tp=2"],
     ["prune.target: the pruned model's ffn_hidden_size=129 is not divisible by parallel.tp=2"]),
    ("evaluate_mistyped_key", "evaluate", COMMON + ["parallel.tpp=2"],
     ["parallel.tpp is not a setting", "did you mean parallel.tp?"]),
    # Hydra's hint for a mistyped key was "use +prune.calib_sample=16", and the '+' form was
    # taken: a stray attribute nothing read, and calibration ran on the default 1024 samples
    ("prune_mistyped_key_appended", "prune", PRUNE + ["+prune.calib_sample=4"],
     ["prune.calib_sample is not a setting", "did you mean prune.calib_samples?"]),
    ("prune_mistyped_key_hint", "prune", PRUNE + ["prune.calib_sample=4"],
     ["prune.calib_sample is not a setting", "did you mean prune.calib_samples?"]),
    ("distill_appended_top_level_key", "distill", TRAIN + ["+steps=4"],
     ["steps is not a setting of DistillJob", "did you mean train.steps?"]),
    ("evaluate_wrong_type", "evaluate", ["model.checkpoint={ck}", "data.seq_length=long"],
     ["data.seq_length", "long"]),
    ("evaluate_valid_fraction", "evaluate", COMMON + ["data.valid_fraction=1.5"],
     ["data.valid_fraction=1.5"]),
    ("evaluate_tp_0", "evaluate", COMMON + ["parallel.tp=0"], ["parallel.tp=0"]),
    ("evaluate_cache_env_is_a_file", "evaluate", COMMON + ["output={out}"],
     ["NEMO_MINITRON_CACHE=", "corpus.txt is a file", "directory"],
     {"NEMO_MINITRON_CACHE": "{text}"}),
    ("evaluate_timeout_0", "evaluate", COMMON + ["parallel.timeout_s=0"],
     ["parallel.timeout_s=0", ">= 1"]),
    ("evaluate_negative_fewshot", "evaluate", COMMON + ["eval.num_fewshot=-1"],
     ["eval.num_fewshot=-1"]),
    # --- prune
    ("prune_keep_layers_out_of_range", "prune", PRUNE + ["prune.keep_layers=[0,9]"],
     ["prune.keep_layers=[0, 9]", "[0, 4)"]),
    ("prune_keep_layers_duplicate", "prune", PRUNE + ["prune.keep_layers=[1,1]"],
     ["prune.keep_layers=[1, 1]", "twice"]),
    ("prune_keep_no_layers", "prune", PRUNE + ["prune.keep_layers=[]"],
     ["prune.keep_layers=[]", "keeps no layer"]),
    ("prune_scores_missing", "prune", PRUNE + ["prune.scores=/nonexistent/importance.safetensors"],
     ["prune.scores=/nonexistent/importance.safetensors not found"]),
    ("prune_scores_a_directory", "prune", PRUNE + ["prune.scores={root}"],
     ["prune.scores=", "is a directory", "importance.safetensors"]),
    ("prune_scores_wrong_shape", "prune", PRUNE + ["prune.scores={scores_other}",
                                                   "prune.target.ffn_hidden_size=128"],
     ["prune.scores=", "importance_other.safetensors", "another model"]),
    ("prune_scores_not_torch", "prune", PRUNE + ["prune.scores={not_scores}"],
     ["prune.scores=", "notes.safetensors is not an importance file"]),
    ("prune_scores_pickle", "prune", PRUNE + ["prune.scores={pickled_scores}"],
     ["prune.scores=", "importance.pt", "are not read", "re-run"]),
    ("prune_target_grows", "prune", PRUNE + ["prune.target.hidden_size=4096"],
     ["prune.target.hidden_size=4096", "cannot grow"]),
    ("prune_target_breaks_gqa", "prune", PRUNE + ["prune.target.num_attention_heads=3"],
     ["prune.target.num_attention_heads=3", "num_query_groups=2"]),
    ("prune_output_is_checkpoint", "prune", COMMON + ["prune=none", "output={ck}", "overwrite=true",
                                                      "prune.target.ffn_hidden_size=128"],
     ["output=", "input checkpoint"]),
    # the task loaded only after the calibration, the model built
    ("prune_depth_task_unknown_subject", "prune",
     PRUNE + ["prune.depth=accuracy", "prune.target.num_layers=2",
              "prune.depth_task=mmlu_astrologyy"],
     ["prune.depth_task='mmlu_astrologyy'", "unknown MMLU subject"]),
    ("prune_depth_task_file_missing", "prune",
     PRUNE + ["prune.depth=accuracy", "prune.target.num_layers=2",
              "prune.depth_task=jsonl:/nonexistent/items.jsonl"],
     ["prune.depth_task=", "/nonexistent/items.jsonl not found"]),
    ("prune_unknown_depth_task", "prune", PRUNE + ["prune.depth=accuracy",
                                                   "prune.target.num_layers=2",
                                                   "prune.depth_task=nope"],
     ["prune.depth_task='nope'"]),
    ("prune_calibration_batch_too_large", "prune", PRUNE + ["prune.micro_batch_size=100000",
                                                            "prune.target.ffn_hidden_size=128"],
     ["train split holds", "prune.micro_batch_size"]),
    ("prune_bad_seq_agg", "prune", PRUNE + ["prune.seq_agg=max"], ["prune.seq_agg='max'"]),
    ("prune_no_output", "prune", COMMON, ["output=<dir> is required"]),
    ("prune_output_is_a_file", "prune", COMMON + ["prune=none", "output={text}",
                                                  "prune.target.ffn_hidden_size=128"],
     ["output=", "corpus.txt is a file"]),
    ("prune_depth_accuracy_without_tokenizer", "prune",
     ["model.checkpoint={student}", "data.prefix={ds}", f"data.seq_length={SEQ}", "prune=none",
      "output={out}", "prune.depth=accuracy", "prune.target.num_layers=2"],
     ["prune.depth_task='winogrande' needs the tokenizer", "no tokenizer/"]),
    # --- finetune
    ("finetune_micro_batch_0", "finetune", TRAIN + ["train.micro_batch_size=0"],
     ["train.micro_batch_size=0"]),
    ("finetune_negative_lr", "finetune", TRAIN + ["train.lr=-1e-4"], ["train.lr=-0.0001"]),
    ("finetune_steps_le_warmup", "finetune", TRAIN + ["train.steps=4", "train.warmup_steps=4"],
     ["train.steps=4", "train.warmup_steps=4"]),
    ("finetune_gbs_not_multiple", "finetune", TRAIN + ["train.global_batch_size=5"],
     ["train.global_batch_size=5", "train.micro_batch_size=2"]),
    ("finetune_gbs_larger_than_data", "finetune", TRAIN + ["train.global_batch_size=100000"],
     ["train split holds", "train.global_batch_size"]),
    ("finetune_seed_negative", "finetune", TRAIN + ["train.seed=-1"], ["train.seed=-1"]),
    ("finetune_log_interval_0", "finetune", TRAIN + ["train.log_interval=0"],
     ["train.log_interval=0"]),
    ("finetune_adam_beta2", "finetune", TRAIN + ["train.adam_beta2=1.5"], ["train.adam_beta2=1.5"]),
    ("finetune_no_output", "finetune", COMMON, ["output=<dir> is required"]),
    ("finetune_output_is_checkpoint", "finetune", COMMON + ["output={ck}"],
     ["output=", "input checkpoint"]),
    # the run there was reported as finished (or resumed), its model in place of the one given
    ("finetune_output_holds_another_models_run", "finetune",
     ["model.checkpoint={student}"] + COMMON[1:] + ["output={run_of_ck}"],
     ["output=", "holds a run of model.checkpoint=", "(final)", "overwrite=true"]),
    ("distill_output_holds_a_run_from_another_teacher", "distill",
     DISTILL[:-1] + ["output={run_from_hf}"],
     ["output=", "holds a run distilled from", "kd.teacher=", "overwrite=true"]),
    # --- teacher_cache (kd.teacher is the model it runs; data/train/kd as the distillation's)
    ("teacher_cache_k_0", "teacher_cache", DISTILL + ["cache.k=0"], ["cache.k=0"]),
    ("teacher_cache_dtype", "teacher_cache", DISTILL + ["cache.dtype=int8"],
     ["cache.dtype='int8'", "fp16"]),
    ("teacher_cache_k_above_vocab", "teacher_cache", DISTILL + ["cache.k=100000"],
     ["cache.k=100000", "vocabulary"]),
    ("teacher_cache_top_k", "teacher_cache", DISTILL + ["kd.top_k=4"], ["kd.top_k", "cache.k"]),
    ("teacher_cache_tp2_one_rank", "teacher_cache", DISTILL + ["parallel.tp=2"],
     ["parallel.tp=2", "launched ranks"]),
    ("teacher_cache_no_output", "teacher_cache", DISTILL[:-1], ["output=<dir> is required"]),
    ("distill_cache_missing_manifest", "distill", DISTILL + ["kd.teacher_cache={empty_dir}"],
     ["kd.teacher_cache=", "manifest.json", "minitron teacher_cache"]),
    # --- distill
    ("distill_top_k_0", "distill", DISTILL + ["kd.top_k=0"], ["kd.top_k=0"]),
    ("distill_teacher_missing", "distill", ["model.checkpoint={student}",
                                            "kd.teacher=/nonexistent/teacher", "data.prefix={ds}",
                                            "output={out}"],
     ["kd.teacher", "/nonexistent/teacher does not exist"]),
    ("distill_teacher_truncated", "distill", ["model.checkpoint={student}",
                                              "kd.teacher={truncated}",
                                              "data.prefix={ds}", f"data.seq_length={SEQ}",
                                              "output={out}"],
     ["kd.teacher", "is truncated"]),
    ("distill_hidden_pair_out_of_range", "distill", DISTILL + ["kd.hidden_pairs=[[9,0]]"],
     ["kd.hidden_pairs[0]=[9, 0]", "student has 4 layers"]),
    ("distill_auto_pairs_unpruned", "distill", DISTILL + ["kd.auto_hidden_pairs=true"],
     ["kd.auto_hidden_pairs=true", "plan.json"]),
    ("distill_vocab_mismatch", "distill", ["model.checkpoint={odd_vocab}", "kd.teacher={ck}",
                                           "data.prefix={ds}", f"data.seq_length={SEQ}",
                                           "output={out}"],
     ["kd.teacher=", "vocabulary (1001 tokens)"]),
    ("distill_keep_no_checkpoints", "distill", DISTILL + ["train.keep_checkpoints=0"],
     ["train.keep_checkpoints=0"]),
    ("distill_temperature_0", "distill", DISTILL + ["kd.temperature=0"], ["kd.temperature=0"]),
    # NaN passes every > / < check and inf trains into a diverged first step: both refused first
    ("distill_temperature_inf", "distill", DISTILL + ["kd.temperature=inf"],
     ["kd.temperature=inf must be a finite number"]),
    ("distill_lr_nan", "distill", DISTILL + ["train.lr=nan"], ["train.lr=nan must be a finite"]),
    ("distill_student_is_teacher", "distill", TRAIN + ["kd.teacher={ck}"],
     ["model.checkpoint is the teacher itself"]),
    # --- search
    ("search_budget_2", "search", COMMON + ["output={out}", "search.budget=2.0"],
     ["search.budget=2", "read as 2 parameters", "<= 1"]),
    ("search_budget_above_source", "search", COMMON + ["output={out}", "search.budget=1e12"],
     ["search.budget=1e+12", "parameters", "source has"]),
    ("search_budget_unreachable", "search", COMMON + ["output={out}", "search.budget=0.1"],
     ["search.budget=0.1: no candidate architecture", "reach down to"]),
    ("search_rank_by_not_evaluated", "search", SEARCH + ["search.rank_by=piqa"],
     ["search.rank_by='piqa'", "eval.tasks"]),
    ("search_unknown_axis", "search", SEARCH + ["search.axes=[depth]"],
     ["search.axes: unknown ['depth']"]),
    ("search_steps_le_warmup", "search", SEARCH + ["search.steps=2"],
     ["search.steps=2", "train.warmup_steps=4"]),
    ("search_only_unknown", "search", SEARCH + ["search.only=[99]"],
     ["search.only=[99]", "not selected"]),
    ("search_tolerance", "search", SEARCH + ["search.tolerance=1.5"], ["search.tolerance=1.5"]),
    ("search_empty_axis_values", "search", SEARCH + ["search.hidden_size=[]"],
     ["search.hidden_size=[] allows no value", "unset"]),
    ("search_min_fraction", "search", SEARCH + ["search.min_fraction.hidden_size=0"],
     ["search.min_fraction"]),
    # reported as an unreachable budget, with hints that could not help
    ("search_no_axes", "search", SEARCH + ["search.axes=[]"],
     ["search.axes=[] lets the search shrink nothing"]),
    # it calibrated and built the teacher cache, then trained nothing
    ("search_only_none", "search", SEARCH + ["search.only=[]"],
     ["search.only=[] runs no candidate"]),
    # overwrite=true replaced the directory holding the dataset (and the scores) it had read
    ("prune_overwrite_replaces_data", "prune",
     ["model.checkpoint={ck}", "data.prefix={ds_in_dir}", f"data.seq_length={SEQ}",
      "data.valid_fraction=0.2", "prune=none", "prune.target.ffn_hidden_size=128",
      "output={ds_dir}", "overwrite=true"],
     ["output=", "would replace data.prefix=", "corpus.bin"]),
    ("prune_overwrite_replaces_scores", "prune",
     COMMON + ["prune=none", "prune.target.ffn_hidden_size=128", "prune.scores={scores_in_dir}",
               "output={scores_dir}", "overwrite=true"],
     ["would replace prune.scores="]),
    ("prune_keep_layers_against_num_layers", "prune",
     PRUNE + ["prune.keep_layers=[0,1]", "prune.target.num_layers=3"],
     ["prune.keep_layers lists 2 layers", "prune.target.num_layers=3"]),
    ("prune_scores_and_random", "prune",
     PRUNE + ["prune.scores={scores}", "prune.importance=random",
              "prune.target.ffn_hidden_size=128"],
     ["prune.scores", "prune.importance=random", "one of them"]),
    # `true` built a teacher cache in ./True
    ("search_teacher_cache_yes", "search", SEARCH + ["search.teacher_cache=true"],
     ["search.teacher_cache=True", "auto", "off", "directory"]),
    ("search_confirm_more_than_trained", "search",
     SEARCH + ["search.confirm_top=10", "search.max_candidates=6"],
     ["search.confirm_top=10", "search.max_candidates=6"]),
    # every step logged loss 0 and a "distilled" copy of the student was saved
    ("distill_no_loss_term", "distill", DISTILL + ["kd.logit_weight=0"],
     ["kd.logit_weight=0", "nothing to train on"]),
    ("distill_other_tokenizer", "distill",
     ["model.checkpoint={other_tokenizer}", "kd.teacher={ck}"] + DISTILL[2:],
     ["model.checkpoint=", "different vocabularies", "same tokenizer"]),
    # finetune continued a distillation's checkpoints and saved them as its own
    ("finetune_continues_a_distill_run", "finetune",
     ["model.checkpoint={student}", "data.prefix={ds}", f"data.seq_length={SEQ}",
      "output={run_from_hf}"],
     ["holds a `minitron distill` run", "final", "overwrite=true"]),
    ("distill_top_k_above_vocab", "distill", DISTILL + ["kd.top_k=5000"],
     ["kd.top_k=5000", "vocabulary"]),
    # "not a complete checkpoint: missing minitron.json, ..." without the way out
    ("evaluate_run_directory", "evaluate",
     ["model.checkpoint={run_of_ck}", "data.prefix={ds}", "output={out}"],
     ["run_of_ck is not a complete", "it is a run directory: its model is", "run_of_ck/final"]),
    # --- pipeline
    ("pipeline_round2_impossible", "pipeline",
     TRAIN + ["pipeline.teacher_correction_steps=8",
              "pipeline.rounds=[{target:{hidden_size:96}},{target:{hidden_size:112}}]"],
     ["round2's teacher", "pipeline.rounds[1].target.hidden_size=112", "[1, 96]"]),
    ("pipeline_round2_keep_layers", "pipeline",
     TRAIN + ["prune.keep_layers=[0,1,3]",
              "pipeline.rounds=[{target:{ffn_hidden_size:192}},{target:{ffn_hidden_size:128}}]"],
     ["prune.keep_layers=[0, 1, 3]", "of round2 has 3 layers"]),
    ("pipeline_round2_scores", "pipeline",
     TRAIN + ["prune.scores={scores}",
              "pipeline.rounds=[{target:{hidden_size:96}},{target:{hidden_size:64}}]"],
     ["prune.scores=", "of round2 needs"]),
    ("pipeline_correction_le_warmup", "pipeline", TRAIN + ["pipeline.teacher_correction_steps=2"],
     ["pipeline.teacher_correction_steps=2", "train.warmup_steps=4"]),
    ("pipeline_round_budget_and_target", "pipeline",
     TRAIN + ["pipeline.rounds=[{budget:0.6,target:{hidden_size:64}}]"],
     ["either target", "budget"]),
    ("pipeline_round_budget_unreachable", "pipeline", TRAIN + ["pipeline.rounds=[{budget:0.1}]"],
     ["pipeline.rounds[0].budget=0.1", "no candidate architecture"]),
    ("pipeline_round_budget_percent", "pipeline", TRAIN + ["pipeline.rounds=[{budget:60}]"],
     ["pipeline.rounds[].budget=60", "read as 60 parameters"]),
    ("pipeline_teacher_cache_word", "pipeline", TRAIN + ["pipeline.teacher_cache=yes"],
     ["pipeline.teacher_cache='yes'", "round"]),
    ("pipeline_round_cache_reverse_kl", "pipeline",
     TRAIN + ["pipeline.teacher_cache=round", "kd.kind=reverse"],
     ["pipeline.teacher_cache=round", "kd.kind=reverse", "pipeline.teacher_cache=off"]),
    ("search_cache_k_above_vocab", "search", SEARCH + ["cache.k=100000"],
     ["cache.k=100000", "vocabulary", "search.teacher_cache=off"]),
    ("pipeline_duplicate_round_names", "pipeline",
     TRAIN + ["pipeline.rounds=[{name:a,target:{hidden_size:96}},"
              "{name:a,target:{hidden_size:64}}]"],
     ["pipeline.rounds", "repeat"]),
    ("pipeline_round_without_target", "pipeline", TRAIN + ["pipeline.rounds=[{name:a}]"],
     ["pipeline.rounds[0] sets neither target nor budget", "prunes nothing"]),
    # it distilled an unpruned copy of the teacher into itself, then evaluated it three times
    ("pipeline_prunes_nothing", "pipeline", TRAIN + ["prune=none"],
     ["prune.target={}", "prunes nothing", "prune.target.ffn_hidden_size=128"]),
    # the export at the end of the round failed after the training: transformers cannot size a
    # LongRoPE model's factors when hidden_size != heads x head_dim
    ("pipeline_longrope_width_pruned", "pipeline",
     ["model.checkpoint={longrope}"] + COMMON[1:] + ["output={out}", "prune=none",
                                                     "prune.target.hidden_size=96"],
     ["prune (round1) ends in a Hugging Face export", "LongRoPE", "hidden_size=96",
      "pipeline.export=false"]),
    ("export_megatron_longrope", "export", ["model.checkpoint={longrope}", "format=megatron",
                                            "output={out}"],
     ["format=megatron", "LongRoPE", "format=hf"]),
    ("pipeline_prune_target_grows", "pipeline", TRAIN + ["prune=none",
                                                          "prune.target.ffn_hidden_size=1024"],
     ["prune.target.ffn_hidden_size=1024", "cannot grow"]),
    # --- report (not a Hydra app)
    ("report_missing_run", "report", ["/nonexistent/run", "output={out}"],
     ["/nonexistent/run does not exist"]),
    ("report_not_a_run", "report", ["{empty_dir}", "output={out}"], ["is neither kind of run"]),
    # the loss-curve plot beside output= was written before the report failed on a directory
    ("report_output_is_a_directory", "report", ["{eval_results}", "output={empty_dir}"],
     ["output=", "is a directory", "report.md"]),
    ("report_results_not_json", "report", ["{results_not_json}", "output={out}"],
     ["results.json: not a JSON file"]),
]


def _case(c):
    return pytest.param(*c[1:4], c[4] if len(c) > 4 else {}, id=c[0])


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.mark.parametrize("stage,args,words,env", [_case(c) for c in CASES])
def test_bad_input_is_refused_in_one_line(assets, stage, args, words, env, cwd, tmp_path,
                                          monkeypatch, capsys):
    out = tmp_path / "out" / "result"
    paths = {k: str(v) for k, v in assets.items()} | {"out": str(out)}
    def fill(a):
        return re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), a)

    argv = [stage] + [fill(a) for a in args]
    for k, v in env.items():
        monkeypatch.setenv(k, fill(v))
    before = {p: sorted(Path(p).iterdir()) if Path(p).is_dir() else None
              for p in (assets["ck"], assets["root"])}
    built = rmodel.models_built
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites it for Hydra
    root_log = logging.getLogger()  # and Hydra points the root logger at this test's capture
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None), err
    *progress, msg = [x for x in err.splitlines() if x.strip()] or [""]
    assert msg.startswith(f"minitron {stage}: error: "), err
    assert all("[00:" in x for x in progress), err  # one line, after progress bars at most
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    assert rmodel.models_built == built, "a model was built before the request was refused"
    assert not out.exists() and not (tmp_path / "out").exists()
    assert list(cwd.iterdir()) == [], "something was written into the working directory"
    assert before == {p: sorted(Path(p).iterdir()) if Path(p).is_dir() else None for p in before}


def test_wandb_not_installed_is_refused_first(assets, cwd, tmp_path, monkeypatch, capsys):
    """train.wandb without wandb: a traceback once the model was built and metrics.jsonl begun
    (run as if wandb were not installed, whether or not it is)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    test_bad_input_is_refused_in_one_line(
        assets, "finetune", TRAIN + ["train.wandb=proj"],
        ["train.wandb=proj needs wandb", "pip install wandb"], {}, cwd, tmp_path, monkeypatch,
        capsys)


def test_enough_distinct_cases_over_every_stage():
    from nemo_minitron.cli.main import STAGES

    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 50
    assert {c[1] for c in CASES} == set(STAGES) - {"lm_eval"}


@pytest.mark.real_model
def test_smollm2_data_defaults_accept_their_eod_token(tmp_path):
    """SmolLM2's unk token is <|endoftext|> itself, its eos: the check must not call it unknown."""
    from nemo_minitron import demo
    from nemo_minitron.data import run as data

    tok = data.load_tokenizer(str(demo.checkpoint_dir()))
    assert tok.unk_token == "<|endoftext|>"
    from nemo_minitron.config.schema import DataJob

    from nemo_minitron.data.indexed import open_indexed

    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]  # one document per text file
    texts[0].write_text("Hello world.")
    texts[1].write_text("A second document.")
    job = DataJob(inputs=[str(t) for t in texts], tokenizer=str(demo.checkpoint_dir()),
                  output=str(tmp_path / "ds"), eod_token="<|endoftext|>")
    stats = data.run(job)
    assert stats["eod_id"] == tok.unk_token_id and stats["documents"] == 2
    ds = open_indexed(tmp_path / "ds")
    assert [int(ds[i][-1]) for i in range(2)] == [tok.unk_token_id] * 2


def test_a_passing_call_records_itself_under_output_only(assets, cwd, tmp_path, monkeypatch,
                                                         capsys):
    """The counterpart: a valid search (plan only, no model) writes its config and log under
    output/hydra/<time>/ and nothing into the working directory."""
    out = tmp_path / "search"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    root_log = logging.getLogger()
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    cli_main(["search", f"model.checkpoint={assets['ck']}", f"data.prefix={assets['ds']}",
              f"data.seq_length={SEQ}", "data.valid_fraction=0.2", "search.budget=0.6",
              "search.plan_only=true", "search.tolerance=0.1", f"output={out}"])
    (run,) = (out / "hydra").iterdir()
    assert f"checkpoint: {assets['ck']}" in (run / "config.yaml").read_text()
    assert "search.plan_only=true" in (run / "overrides.yaml").read_text()
    assert "architectures within" in (run / "search.log").read_text()
    assert (out / "candidates.json").is_file() and list(cwd.iterdir()) == []


def test_a_refused_relaunch_leaves_its_run_as_it_was(assets, cwd, tmp_path, monkeypatch, capsys):
    """A pipeline relaunch with another prune target over a run whose prune completed stops in
    preflight: one line, no model built, and no new log folder under output/hydra/."""
    from hydra import compose, initialize_config_dir

    from nemo_minitron import recipe_record
    from nemo_minitron.cli.main import STAGES, conf_dir
    from nemo_minitron.config import schema
    from nemo_minitron.convert.checkpoint import META

    out = tmp_path / "run"
    args = [a.replace("{ck}", str(assets["ck"])).replace("{ds}", str(assets["ds"]))
            for a in COMMON] + [f"output={out}"]
    schema.register()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(STAGES["pipeline"].config, overrides=args + ["prune.target.num_layers=2"])
    recipe_record.check(schema.to_job(cfg), out)  # the first invocation's record
    (out / "round1" / "pruned").mkdir(parents=True)
    (out / "round1" / "pruned" / META).write_text("{}")  # ... and its completed prune
    (out / recipe_record.LOG_DIR / "2026-12-02_08-00-00").mkdir(parents=True)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    root_log = logging.getLogger()
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    built = rmodel.models_built
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline"] + args + ["prune.target.num_layers=3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("minitron pipeline: error: output=") and "\n" not in err, err
    assert "prune.target.num_layers=2 (now 3)" in err
    assert rmodel.models_built == built
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("stage", ["import", "export", "evaluate", "prune", "finetune", "search",
                                   "pipeline"])
@pytest.mark.real_model
def test_shipped_defaults_pass_their_preflight(stage, teacher, tmp_path):
    """The checks are not stricter than the stages: every default recipe (the embedded SmolLM2
    and Wikipedia sample) passes, and checking writes nothing."""
    from hydra import compose, initialize_config_dir

    from nemo_minitron import preflight
    from nemo_minitron.cli.main import STAGES, conf_dir
    from nemo_minitron.config import schema

    schema.register()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(STAGES[stage].config, overrides=[f"output={tmp_path}/out"])
    preflight.check(stage, schema.to_job(cfg))
    assert list(tmp_path.iterdir()) == []


def test_prune_keeping_every_size_says_so(assets, cwd, tmp_path, monkeypatch, capfd):
    """prune=none with no size set writes an unpruned copy with its importance scores (a way to
    get scores alone); the log says that nothing was pruned and how to prune."""
    from nemo_minitron.convert.checkpoint import Checkpoint

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    root_log = logging.getLogger()
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    cli_main(["prune", f"model.checkpoint={assets['student']}", f"data.prefix={assets['ds']}",
              f"data.seq_length={SEQ}", "data.valid_fraction=0.2", "prune=none",
              "prune.calib_samples=4", f"output={tmp_path / 'copy'}"])
    assert Checkpoint(tmp_path / "copy").arch == Checkpoint(assets["student"]).arch
    out = "".join(capfd.readouterr())  # Hydra's console log is stdout
    warned = [line for line in out.splitlines() if "keeps every size" in line]
    assert len(warned) == 1 and "prune.target.ffn_hidden_size=" in warned[0], out


def test_a_checkpoint_without_tokenizer_prunes_and_trains(assets, cwd, tmp_path, monkeypatch):
    """A checkpoint imported without a tokenizer (a megatron checkpoint, no model.tokenizer) is
    accepted where no text is scored: prune and finetune complete (they failed at their save,
    after the work), and their outputs have no tokenizer either."""
    from nemo_minitron.convert.checkpoint import Checkpoint

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    root_log = logging.getLogger()
    monkeypatch.setattr(root_log, "handlers", list(root_log.handlers))
    data = [f"data.prefix={assets['ds']}", f"data.seq_length={SEQ}", "data.valid_fraction=0.2"]
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    cli_main(["prune", f"model.checkpoint={assets['student']}", *data, "prune=none",
              "prune.target.ffn_hidden_size=128", "prune.calib_samples=4", f"output={pruned}"])
    cli_main(["finetune", f"model.checkpoint={pruned}", *data, "train.steps=2",
              "train.warmup_steps=1", "train.global_batch_size=2", "train.eval_interval=0",
              "train.eval_batches=1", "train.tensorboard=false", f"output={tuned}"])
    final = Checkpoint(tuned / "final")
    assert final.arch.ffn_hidden_size == 128 and final.info.provenance["step"] == 2
    assert not Checkpoint(pruned).has_tokenizer and not final.has_tokenizer
