"""model.dtype=auto: bf16 where the CPU multiplies bf16 natively, fp32 elsewhere."""

import pytest

from nemo_minitron.config.schema import ModelConfig
from nemo_minitron.runtime import precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t: fpu avx2 avx512f avx512bw\nbugs\t: spectre\n"


@pytest.mark.parametrize("cpuinfo, want", [(ZEN4, "bf16"), (SAPPHIRE, "bf16"), (SKYLAKE, "fp32")])
def test_auto_dtype_from_cpu_flags(cpuinfo, want):
    assert precision.auto_dtype(cuda=False, cpuinfo=cpuinfo) == want


def test_auto_reason_names_what_decided():
    assert "natively" in precision.auto_reason(cuda=False, cpuinfo=ZEN4)
    assert "twice the time" in precision.auto_reason(cuda=False, cpuinfo=SKYLAKE)


def test_the_cli_says_what_auto_became(caplog):
    """A user whose laptop runs the default pipeline in fp32 learns why it is slow, up front."""
    import logging
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from nemo_minitron.cli.main import say_auto_dtype

    job = SimpleNamespace(model=ModelConfig(dtype="auto"))
    with caplog.at_level(logging.INFO, logger="nemo_minitron"):
        say_auto_dtype(OmegaConf.create({"model": {"dtype": "auto"}}), job)
        say_auto_dtype(OmegaConf.create({"model": {"dtype": "fp32"}}), job)  # chosen: no line
    assert caplog.messages == [f"model.dtype=auto -> {precision.auto_dtype()}: "
                               f"{precision.auto_reason()}"]


def test_model_config_resolves_auto_to_this_machine():
    assert ModelConfig(dtype="auto").dtype == precision.auto_dtype()
    assert ModelConfig(dtype="fp32").dtype == "fp32"
    with pytest.raises(ValueError, match=r"model.dtype='fp16'.*or auto"):
        ModelConfig(dtype="fp16")


def test_config_dtype_names_are_the_precision_table():
    """The config's closed dtype settings name dtypes of the one table runtime and convert use."""
    import typing

    from nemo_minitron.config import schema

    assert set(typing.get_args(schema.CacheDtype)) == set(precision.DTYPES)
    assert set(typing.get_args(schema.Dtype)) <= set(precision.DTYPES)
    assert precision.torch_dtype("bfloat16") is precision.torch_dtype("bf16")


@pytest.mark.parametrize("kind", ["gqa", "qwen3", "nemotron"])
def test_bf16_model_has_no_fp32_stray_weights(single_rank, kind):
    """A bf16 model is bf16 throughout, norms (and QK-norms, LayerNorm biases) included, as
    megatron's Float16Module makes it on GPUs; a forward then takes PyTorch's fused norm kernel
    (no "Mismatch dtype" warning) and stays close to the fp32 model's."""
    import warnings

    import torch

    from nemo_minitron.convert.hf_config import arch_from_hf_config
    from nemo_minitron.runtime.shard import build_shard
    from tests.helpers.models import tiny_hf

    arch = arch_from_hf_config(tiny_hf(kind).config)
    torch.manual_seed(0)
    fp32 = build_shard(arch, "fp32")
    torch.manual_seed(0)
    bf16 = build_shard(arch, "bf16")
    dtypes = {n: p.dtype for n, p in bf16.model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert any("layernorm" in n or "norm" in n for n in dtypes)
    ids = torch.randint(0, arch.vocab_size, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            warnings.filterwarnings("ignore", message=".*(Apex|full scope).*")
            got = bf16.model(ids, pos, None).float()
        want = fp32.model(ids, pos, None)
    assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=2e-2)
