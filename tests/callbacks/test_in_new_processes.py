"""Resume in a new process, and DDP on two CPU processes: both run the compression script as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests.scripts.compress_digits", *args], check=True, cwd=ROOT, env=env,
                   timeout=600)


# With rehabilitation only: its resume carries all the state the plain schedule does and the DNS masks
# besides (the plain schedule's resume is also tests/test_resume.py, in process); 14 s of CI each.
def test_resume_mid_schedule_in_a_new_process_matches_uninterrupted(tmp_path):
    flag = ["--rehabilitation"]
    _run(str(tmp_path / "full"), "--save-every-epoch", *flag)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert any(k.endswith("weight_mask") for k in saved["state_dict"])  # masks travel in the checkpoint
    _run(str(tmp_path / "resumed"), "--resume", str(ckpt), *flag)
    full = torch.load(tmp_path / "full" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    assert full["history"] == resumed["history"]
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def test_ddp_two_processes_share_identical_masks(tmp_path):
    _run(str(tmp_path), "--devices", "2", "--epochs", "2")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    masks = [k for k in rank0["state"] if k.endswith("weight_mask")]
    assert masks
    for key in masks:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
    assert rank0["history"] == rank1["history"]
    assert rank0["history"][-1][1] > 0.5


def test_sharing_resumes_after_clustering_in_a_new_process(tmp_path):
    _run(str(tmp_path / "full"), "--method", "share", "--save-every-epoch")
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"  # saved after clustering at epoch 1
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["state_dict"]["model.features.3.weight_code"] >= 0).any()
    _run(str(tmp_path / "resumed"), "--method", "share", "--resume", str(ckpt))
    full = torch.load(tmp_path / "full" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def test_sharing_ddp_two_processes_share_identical_codebooks(tmp_path):
    _run(str(tmp_path), "--method", "share", "--devices", "2", "--epochs", "2")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    keys = [k for k in rank0["state"] if k.endswith(("weight_code", "weight_codebook", ".weight"))]
    assert any(k.endswith("weight_codebook") for k in keys)
    for key in keys:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key


@pytest.mark.parametrize("epoch", [0, 1])
def test_decomposition_resumes_in_a_new_process(tmp_path, epoch):
    flags = ["--method", "decompose", "--decompose-epoch", str(epoch)]
    _run(str(tmp_path / "full"), "--save-every-epoch", *flags)
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"  # after the factorization either way
    saved = torch.load(ckpt, weights_only=True)
    assert any(".core.weight" in k for k in saved["state_dict"])
    _run(str(tmp_path / "resumed"), "--resume", str(ckpt), *flags)
    full = torch.load(tmp_path / "full" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    assert full["history"] == resumed["history"]
    assert any(method == "tucker" for _, method, _ in full["history"])
    assert full["state"].keys() == resumed["state"].keys()
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def test_decomposition_mid_fit_under_ddp_trains_identical_factors(tmp_path):
    # Factorized at epoch 1 of 3: the DDP wrapper is rebuilt, so the new factors' gradients are
    # all-reduced; without that the two processes' factors would drift apart on their own data shards.
    _run(str(tmp_path), "--method", "decompose", "--decompose-epoch", "1", "--devices", "2", "--epochs", "3")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["history"] == rank1["history"]
    factors = [k for k in rank0["state"] if ".core." in k or ".reduce." in k or ".expand." in k]
    assert factors
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key


def test_qat_resumes_in_a_new_process_with_its_observer_state(tmp_path):
    _run(str(tmp_path / "full"), "--method", "quantize", "--save-every-epoch")
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"]["model.features.3.activation_observed"]
    _run(str(tmp_path / "resumed"), "--method", "quantize", "--resume", str(ckpt))
    full = torch.load(tmp_path / "full" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def test_qat_ddp_two_processes_use_identical_activation_ranges(tmp_path):
    # Each process sees its own shard; the ranges are all-reduced, so the scales agree everywhere.
    _run(str(tmp_path), "--method", "quantize", "--devices", "2", "--epochs", "2")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    ranges = [k for k in rank0["state"] if k.endswith(("activation_min", "activation_max"))]
    assert ranges
    for key in rank0["state"]:
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key


def test_composed_decompose_prune_quantize_resumes_in_a_new_process(tmp_path):
    _run(str(tmp_path / "full"), "--method", "compose", "--save-every-epoch")
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any(k.endswith(".core.weight_mask") for k in saved)  # factors pruned
    assert any(k.endswith(".core.activation_max") for k in saved)  # and quantized
    _run(str(tmp_path / "resumed"), "--method", "compose", "--resume", str(ckpt))
    full = torch.load(tmp_path / "full" / "rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "rank0.pt", weights_only=False)
    assert full["history"] == resumed["history"]
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key
