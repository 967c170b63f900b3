"""Tests of the data pipeline: wiki cleaning, sources, indexed datasets and packed batches."""

from __future__ import annotations

import bz2
import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from nemo_minitron.data.indexed import build_indexed, load_metadata, open_indexed, smallest_dtype
from nemo_minitron.data.packed import PackedSequences
from nemo_minitron.data.sources import expand_paths, iter_documents
from nemo_minitron.data.wiki import iter_articles, strip_markup

WORDS = "the a cat dog sat on mat ran far away and then slept . , x".split()


def make_tokenizer(extra_words=()):
    words = ["[UNK]", "[EOS]"] + WORDS + [f"d{i}" for i in range(40)] + list(extra_words)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_docs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [
        f"d{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30))))
        for i in range(n)
    ]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------
# wiki markup


def test_strip_markup_templates_tables_refs_comments():
    src = (
        "{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}|x={{{1|}}}}}\n"
        "'''Ada''' was<ref name=\"a\">Cite {{cite web|url=x}}</ref> a ''mathematician''.<ref name=\"b\"/>"
        " <!-- hidden\ncomment -->Done.\n"
        "{| class=\"wikitable\"\n|-\n! head !! {{tmpl|y}}\n|-\n| cell || cell\n|}\n"
        "After the table."
    )
    assert strip_markup(src) == "Ada was a mathematician. Done.\nAfter the table."


def test_strip_markup_links_files_categories():
    src = (
        "An [[England|English]] [[mathematician]]s and [[Charles Babbage]].\n"
        "[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]] in 1840]]\n"
        "[[Image:x.png|left]]See [http://example.com the site] or [http://bare.example.com].\n"
        "[[Category:1815 births]]\n[[fr:Ada Lovelace]]\n[[:Category:Lists|lists]] [[wikt:cat|cat]]"
    )
    out = strip_markup(src)
    assert out.splitlines() == [
        "An English mathematicians and Charles Babbage.",
        "See the site or.",
        "lists cat",
    ]


def test_strip_markup_headings_html_lists_blank_lines():
    src = (
        "Intro line.\n\n\n\n== Early life ==\nBorn in <span class=\"x\">London</span> &amp; raised"
        " there.<br/>Second sentence.\n* item one\n# item two\n\n"
        "=== Empty section ===\n== Career ==\nWorked.\n== References ==\n{{reflist}}\n"
        "* [http://x.org x]\n=== Sub of references ===\nstill dropped\n"
    )
    assert strip_markup(src) == (
        "Intro line.\n\nEarly life\nBorn in London & raised there. Second sentence.\n"
        "item one\nitem two\n\nCareer\nWorked."
    )


def test_strip_markup_tidies_parentheses_left_by_templates():
    src = "Achilles ({{IPAc-en|ə|ˈ|k|ɪ|l|iː|z}}; {{lang-grc|Ἀχιλλεύς}}, Akhilleus, {{IPA|x}}) was a hero ({{lang|x}})."
    assert strip_markup(src) == "Achilles (Akhilleus) was a hero."


def test_strip_markup_unclosed_template_keeps_rest():
    assert strip_markup("Start {{broken|x and more text [[a|b]].") == "Start broken|x and more text b."
    assert strip_markup("a {{ " * 3000 + "end") == "a " * 3000 + "end"  # linear, no recursion


def _dump(pages):
    body = []
    for title, ns, text, redirect in pages:
        red = f'<redirect title="{redirect}" />' if redirect else ""
        body.append(
            f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{text}</text></revision></page>'
        )
    return (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
        "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(body) + "</mediawiki>"
    )


@pytest.fixture
def wiki_dump(tmp_path):
    long_text = "'''Cat''' is a [[mammal|small mammal]]. " + "The cat sat on the mat. " * 12
    pages = [
        ("Cat", 0, long_text + "{{stub}}\n[[Category:Cats]]", None),
        ("Kitty", 0, "#REDIRECT [[Cat]]", "Cat"),
        ("Talk:Cat", 1, "The cat sat on the mat. " * 20, None),
        ("Stub", 0, "Too short. {{stub}}", None),
        ("Dog", 0, "&lt;ref&gt;cite&lt;/ref&gt;A [[dog]] ran far away. " * 12, None),
    ]
    path = tmp_path / "enwiki-test.xml.bz2"
    path.write_bytes(bz2.compress(_dump(pages).encode()))
    return path


def test_iter_articles(wiki_dump):
    arts = list(iter_articles(wiki_dump))
    assert [t for t, _ in arts] == ["Cat", "Dog"]
    cat = arts[0][1]
    assert cat.startswith("Cat is a small mammal. The cat sat on the mat.")
    assert "{{" not in cat and "Category" not in cat and "[[" not in cat
    assert "<ref>" not in arts[1][1] and "cite" not in arts[1][1]
    assert [t for t, _ in iter_articles(wiki_dump, min_chars=0)] == ["Cat", "Stub", "Dog"]


# ------------------------------------------------------------------------------------------------
# sources


def test_sources_txt_jsonl_wiki(tmp_path, wiki_dump):
    (tmp_path / "a.txt").write_text("First doc line one.\n\nParagraph two.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", wiki_dump]))
    assert docs[:3] == ["First doc line one.\n\nParagraph two.", "json one", "json two"]
    assert docs[3].startswith("Cat\n\nCat is a small mammal.")
    assert docs[4].startswith("Dog\n\n")
    assert len(docs) == 5


def test_sources_large_txt_split_at_blank_lines(tmp_path):
    paras = [f"paragraph {i} " + "word " * 10 for i in range(6)]
    (tmp_path / "big.txt").write_text("\n\n".join(paras) + "\n")
    docs = list(iter_documents(tmp_path / "big.txt", txt_max_chars=100))
    assert len(docs) == 3
    assert "\n\n".join(docs) == "\n\n".join(paras)  # nothing lost, cut only between paragraphs
    assert all(d.startswith("paragraph") for d in docs)


def test_sources_directory_and_custom_key(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored in a directory")
    assert list(iter_documents(tmp_path, json_key="content")) == ["hello"]


def test_sources_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: no field 'text'.*'body'.*json_key"):
        list(iter_documents(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list(iter_documents(broken))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match="supported are .txt"):
        list(iter_documents(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(tmp_path / "missing.txt"))


def test_sources_compressed_and_json(tmp_path):
    """Every text format reads the same compressed (gzip, bzip2, xz, zstandard across frames) as
    plain; .json is JSON lines or one array; a .jsonl.bz2 is JSON lines, not a Wikipedia dump."""
    import bz2
    import gzip
    import lzma

    import zstandard

    rows = [{"text": f"doc {i}", "id": i} for i in range(3)]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    want = ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(jsonl))
    (tmp_path / "a.json.xz").write_bytes(lzma.compress(jsonl))
    z = zstandard.ZstdCompressor()  # two frames, as pzstd writes them
    (tmp_path / "a.jsonl.zst").write_bytes(z.compress(jsonl[:20]) + z.compress(jsonl[20:]))
    for name in ("a.jsonl.gz", "a.jsonl.bz2", "a.json.xz", "a.jsonl.zst"):
        assert list(iter_documents(tmp_path / name)) == want, name
    (tmp_path / "b.txt.zst").write_bytes(z.compress("one text\n\nsecond paragraph\n".encode()))
    assert list(iter_documents(tmp_path / "b.txt.zst")) == ["one text\n\nsecond paragraph"]
    # a long first line (longer than the look-ahead that tells JSON lines from an array)
    long = [{"text": "x" * 10000}, {"text": "short"}]
    (tmp_path / "c.json").write_text("".join(json.dumps(r) + "\n" for r in long))
    assert [len(d) for d in iter_documents(tmp_path / "c.json")] == [10000, 5]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    assert list(iter_documents(tmp_path / "d.json")) == want
    (tmp_path / "e.json").write_text(json.dumps(["plain one", "plain two"]))
    assert list(iter_documents(tmp_path / "e.json")) == ["plain one", "plain two"]
    (tmp_path / "f.json").write_text(json.dumps({"data": rows}, indent=2))
    with pytest.raises(ValueError, match=r"f.json, line 1: not valid JSON.*one object per line"):
        list(iter_documents(tmp_path / "f.json"))
    (tmp_path / "g.json").write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(ValueError, match=r"g.json, item 0: no field 'text'.*'body'"):
        list(iter_documents(tmp_path / "g.json"))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(z.compress(jsonl * 50)[:-10])
    with pytest.raises(ValueError, match="cut.jsonl.zst cannot be read.*damaged or cut short"):
        list(iter_documents(cut))
    (tmp_path / "a.jsonl.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"supported are .txt, .jsonl, .json and .xml"):
        list(iter_documents(tmp_path / "a.jsonl.tar"))
    # a directory finds every compressed source and nothing else
    found = sorted(p.name for p in expand_paths(tmp_path) if p.name.startswith("a."))
    assert found == ["a.json.xz", "a.jsonl.bz2", "a.jsonl.gz", "a.jsonl.zst"]


def test_zstandard_missing_is_named_before_reading(tmp_path, monkeypatch):
    """Without the zstandard package a .zst source is refused by the data preflight, in one line
    naming the file and the install command, before the tokenizer loads."""
    import sys

    from nemo_minitron import preflight
    from nemo_minitron.config.schema import DataJob

    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    job = DataJob(inputs=[str(tmp_path)], tokenizer=str(tmp_path / "no_tokenizer"),
                  output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"a.jsonl.zst is zstandard-compressed.*pip install "
                                         r"zstandard"):
        preflight.data(job)


def _table(rows: dict):
    import pyarrow as pa

    return pa.table(rows)


def test_sources_parquet_and_arrow(tmp_path):
    """Hub parquet files and save_to_disk directories (Arrow IPC streams), written by pyarrow;
    the random-access Arrow file format too; null rows skipped; only the text column is read."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    pq.write_table(_table({"id": [1, 2, 3], "text": ["p one", None, "p three"]}),
                   tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    disk = tmp_path / "saved" / "train"  # the layout of Dataset.save_to_disk
    disk.mkdir(parents=True)
    (disk / "dataset_info.json").write_text("{}")
    t = _table({"page": ["s one", "s two"], "title": ["A", "B"]})
    with ipc.new_stream(str(disk / "data-00000-of-00001.arrow"), t.schema) as w:
        for b in t.to_batches(max_chunksize=1):
            w.write_batch(b)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as f, ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    assert list(iter_documents(tmp_path / "train-00000-of-00001.parquet")) == ["p one", "p three"]
    assert list(iter_documents(tmp_path / "saved", json_key="page")) == ["s one", "s two"]
    assert list(iter_documents(tmp_path / "file.arrow", json_key="page")) == ["s one", "s two"]


def test_sources_missing_column_named_before_tokenizing(tmp_path):
    import pyarrow.parquet as pq

    from nemo_minitron.config.schema import DataJob
    from nemo_minitron.data.run import run

    pq.write_table(_table({"content": ["x"], "n": [1]}), tmp_path / "a.parquet")
    job = DataJob(inputs=[str(tmp_path / "a.parquet")], tokenizer=str(tmp_path / "no_tokenizer"),
                  output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"a.parquet: no column 'text' \(found: content, n\); "
                                         r"pass json_key=<the column holding the text>"):
        run(job)  # the tokenizer path does not exist: the column check came first
    with pytest.raises(ValueError, match=r"column 'n' holds int64, not text"):
        list(iter_documents(tmp_path / "a.parquet", json_key="n"))
    assert not (tmp_path / "out.bin").exists()


# ------------------------------------------------------------------------------------------------
# indexed datasets


def test_smallest_dtype():
    assert smallest_dtype(256) is np.uint8
    assert smallest_dtype(257) is np.uint16
    assert smallest_dtype(65536) is np.uint16
    assert smallest_dtype(65537) is np.int32
    with pytest.raises(ValueError):
        smallest_dtype(0)


def test_build_indexed_round_trip(tmp_path, tokenizer):
    docs = make_docs(12) + [""]  # the empty document is skipped
    prefix = tmp_path / "out" / "corpus"
    stats = build_indexed(docs, tokenizer, prefix, sources=["made-up.txt"], progress=False)
    expected = [ids(tokenizer, d) + [tokenizer.eos_token_id] for d in docs[:-1]]
    assert stats["documents"] == 12 and stats["skipped_empty"] == 1
    assert stats["tokens"] == sum(map(len, expected))
    assert stats["dtype"] == "uint8"  # vocab of 58 tokens

    ds = open_indexed(prefix)
    assert len(ds) == 12 and ds.index.dtype is np.uint8
    assert [ds[i].tolist() for i in range(12)] == expected
    assert list(ds.document_indices) == list(range(13))

    meta = load_metadata(prefix)
    assert meta["eod_id"] == tokenizer.eos_token_id == 1
    assert meta["vocab_size"] == len(tokenizer)
    assert (meta["documents"], meta["tokens"]) == (12, stats["tokens"])
    assert meta["sources"] == ["made-up.txt"] and meta["dtype"] == "uint8"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus.bin", "corpus.idx", "corpus.json"
    ]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_indexed(docs, tokenizer, prefix, progress=False)


def test_build_indexed_uint16_and_eod_override(tmp_path):
    tok = make_tokenizer(extra_words=[f"w{i}" for i in range(300)])
    prefix = tmp_path / "big"
    stats = build_indexed(["w299 cat", "w5"], tok, prefix, eod_id=0, progress=False)
    assert stats["dtype"] == "uint16"
    ds = open_indexed(prefix)
    assert ds.index.dtype is np.uint16
    assert ds[0].tolist() == ids(tok, "w299 cat") + [0]
    assert ds[0][0] > 255


def test_build_indexed_errors_leave_no_files(tmp_path, tokenizer):
    def docs():
        yield "the cat"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        build_indexed(docs(), tokenizer, tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="eod_id="):
        build_indexed(["the cat"], no_eos, tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="no non-empty documents"):
        build_indexed(["", ""], tokenizer, tmp_path / "z", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="build_indexed"):
        open_indexed(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------
# packed sequences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    docs = make_docs(20, seed=1)
    prefix = tmp_path_factory.mktemp("packed") / "corpus"
    build_indexed(docs, tokenizer, prefix, progress=False)
    per_doc = [ids(tokenizer, d) + [tokenizer.eos_token_id] for d in docs]
    return prefix, per_doc


def test_packed_samples_tile_the_stream(corpus):
    prefix, per_doc = corpus
    L = 8
    train = PackedSequences(prefix, L, split="train", valid_fraction=0.25)
    assert train.document_range == (0, 15) and train.num_documents == 15
    stream = [t for d in per_doc[:15] for t in d]
    assert train.num_tokens == len(stream)
    assert len(train) == (len(stream) - 1) // L
    inputs = torch.cat([train[i]["tokens"] for i in range(len(train))]).tolist()
    assert inputs == stream[:len(train) * L]
    for i in (0, 3, len(train) - 1, -1):
        s = train[i]
        j = i % len(train)
        assert s["tokens"].tolist() == stream[j * L:j * L + L]
        assert s["labels"].tolist() == stream[j * L + 1:j * L + L + 1]
        assert s["tokens"].dtype == s["labels"].dtype == s["position_ids"].dtype == torch.int64
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        assert s["position_ids"].tolist() == list(range(L))
    with pytest.raises(IndexError):
        train[len(train)]


def test_packed_train_valid_disjoint_by_document(corpus, tokenizer):
    prefix, per_doc = corpus
    train = PackedSequences(prefix, 4, split="train", valid_fraction=0.1)
    valid = PackedSequences(prefix, 4, split="valid", valid_fraction=0.1)
    assert train.document_range == (0, 18) and valid.document_range == (18, 20)
    assert train.num_tokens + valid.num_tokens == sum(map(len, per_doc))

    def doc_ids(ds):  # every document starts with its own "d<i>" token
        toks = torch.cat([ds[i]["tokens"] for i in range(len(ds))]).tolist()
        names = tokenizer.convert_ids_to_tokens(toks)
        return {n for n in names if re.fullmatch(r"d[0-9]+", n)}

    assert doc_ids(valid) <= {"d18", "d19"}
    assert doc_ids(train).isdisjoint({"d18", "d19"})
    # at least one document is held out even for a tiny fraction; the split ignores seq_length
    assert PackedSequences(prefix, 2, split="valid", valid_fraction=0.001).num_documents == 1
    assert PackedSequences(prefix, 2, split="train", valid_fraction=0.0).num_documents == 20


def test_packed_dp_slices_disjoint_and_cover_global_batch(corpus):
    prefix, _ = corpus
    ds = PackedSequences(prefix, 4, split="train")
    mbs, dp = 2, 3
    for shuffle in (False, True):
        per_rank = [
            [b["tokens"] for b in ds.batches(mbs, shuffle=shuffle, seed=7, dp_rank=r, dp_size=dp)]
            for r in range(dp)
        ]
        n_global = len(ds) // (mbs * dp)
        assert all(len(batches) == n_global for batches in per_rank)
        order = np.random.default_rng(7).permutation(len(ds)) if shuffle else np.arange(len(ds))
        for g in range(n_global):
            got = torch.cat([per_rank[r][g] for r in range(dp)])
            want = torch.stack([ds[int(j)]["tokens"] for j in order[g * mbs * dp:(g + 1) * mbs * dp]])
            assert torch.equal(got, want)  # ranks take consecutive, disjoint slices of the batch
    b = next(ds.batches(mbs))
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (mbs, 4)
    # more batches than one pass: the next pass starts over
    assert len(list(ds.batches(mbs, num_batches=len(ds) // mbs + 3))) == len(ds) // mbs + 3
    with pytest.raises(ValueError, match="dp_rank"):
        next(ds.batches(mbs, dp_rank=2, dp_size=2))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(ds.batches(len(ds) + 1))


def test_packed_split_too_small(corpus):
    prefix, per_doc = corpus
    n_valid = len(per_doc[-1])
    with pytest.raises(ValueError) as e:
        PackedSequences(prefix, 1000, split="valid", valid_fraction=0.01)
    msg = str(e.value)
    assert f"{n_valid} tokens" in msg and "smaller seq_length" in msg and "1001" in msg
    with pytest.raises(ValueError, match="split must be one of"):
        PackedSequences(prefix, 8, split="test")
