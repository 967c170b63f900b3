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
