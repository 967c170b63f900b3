"""Which device a process runs on: the CPU (gloo) whenever a node has more ranks than GPUs, so the
multi-rank tests also run on a one-GPU host, or when NEMO_MINITRON_DEVICE says so."""

import os

import pytest
import torch

from nemo_minitron.runtime import cpu_compat
from nemo_minitron.runtime.dist import choose_device, local_world_size

TORCHRUN2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_local_world_size_from_launchers():
    assert local_world_size({}) == 1
    assert local_world_size(TORCHRUN2) == 2
    assert local_world_size({"SLURM_PROCID": "5", "SLURM_NTASKS": "8",
                             "SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert local_world_size({"SLURM_PROCID": "5", "SLURM_NTASKS": "7",
                             "SLURM_TASKS_PER_NODE": "3(x2),1"}) == 3


@pytest.mark.parametrize("env, gpus, device", [
    ({}, 0, "cpu"),
    ({}, 1, "cuda"),
    (TORCHRUN2, 1, "cpu"),  # two ranks, one GPU: set_device(1) would fail
    (TORCHRUN2, 2, "cuda"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8"}, 8, "cuda"),
    (dict(TORCHRUN2, NEMO_MINITRON_DEVICE="cpu"), 8, "cpu"),
    ({"NEMO_MINITRON_DEVICE": "CUDA"}, 1, "cuda"),
])
def test_choose_device(env, gpus, device):
    assert choose_device(env, gpus=gpus) == device


def test_choose_device_rejects_bad_settings():
    with pytest.raises(ValueError, match="NEMO_MINITRON_DEVICE=cuda but no GPU"):
        choose_device({"NEMO_MINITRON_DEVICE": "cuda"}, gpus=0)
    with pytest.raises(ValueError, match="use 'cpu' or 'cuda'"):
        choose_device({"NEMO_MINITRON_DEVICE": "gpu0"}, gpus=1)


def test_hide_gpus_makes_a_gpu_process_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cpu_compat.hide_gpus_from_process()
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert choose_device({}) == "cpu"
