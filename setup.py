"""nemo_minitron: Minitron-style pruning and distillation of LLMs on megatron-core."""

from setuptools import find_packages, setup

# torch is pinned by a range that admits the 2.13 CPU wheel; install torch first (see README), or pip
# resolves a CUDA build of the newest release.
install_requires = [
    "torch>=2.4,<2.14",
    "megatron-core>=0.16.1,<0.18",
    "hydra-core==1.3.8",
    "omegaconf>=2.3,<2.4",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "gguf>=0.10",
    "accelerate>=1.0",  # transformers needs it to load GGUF files
    "sentencepiece",
    "pyarrow>=14",
    "zstandard>=0.22",  # .jsonl.zst corpora (SlimPajama, The Pile)
    "numpy",
    "tqdm",
    "matplotlib>=3.7",
    # train.tensorboard is on by default: the scalars need the writer (~50 MB with grpcio and its
    # data server; torch.utils.tensorboard imports it)
    "tensorboard>=2.14",
]

extras = {
    "test": ["pytest>=8", "pytest-timeout"],
    "eval": ["lm-eval>=0.4"],
    "slurm": ["hydra-submitit-launcher>=1.2", "submitit>=1.5"],
    # Transformer Engine and apex ship in NGC containers (docker/Dockerfile); installing TE from PyPI
    # needs CUDA headers. NVIDIA apex is not on PyPI (the PyPI "apex" is unrelated): never add it here.
    "gpu": ["transformer-engine[pytorch]>=2.0"],
}
extras["dev"] = extras["test"] + ["ruff"]

setup(
    name="nemo_minitron",
    version="0.1.0",
    description="Structured pruning (width/depth) and knowledge distillation of LLMs, Minitron style",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_minitron", "nemo_minitron.*"]),
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["minitron=nemo_minitron.cli.main:main"]},
)
