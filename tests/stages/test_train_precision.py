"""train.precision: bf16 autocast of the student's forward pass on CUDA workers, float32 on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spear.config import ConfigError, load_config
from spear.stages.train_loop import autocast_settings, build_objective

PLAN = SimpleNamespace(roles=["speech"], codebooks={"speech": 4}, frame_rates={"speech": 50.0})


def test_precision_defaults_to_bf16_and_names_the_field_when_wrong():
    assert load_config(None).train.precision == "bf16"
    assert load_config(None, ["train.precision=fp32"]).train.precision == "fp32"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("device,precision,enabled", [
    (torch.device("cuda", 0), "bf16", True), (torch.device("cuda", 0), "fp32", False),
    (torch.device("cpu"), "bf16", False), (torch.device("cpu"), "fp32", False)])
def test_autocast_only_on_cuda_in_bf16(device, precision, enabled):
    settings = autocast_settings(device, precision)
    assert settings["enabled"] is enabled and settings["device_type"] == device.type
    assert settings["dtype"] is torch.bfloat16


def test_the_student_objective_runs_under_bf16_autocast_close_to_float32():
    # What the CUDA path runs, on the CPU's bf16 autocast: every op of the objective must accept it,
    # the loss stays float32 and close to the float32 loss, and gradients reach every trained tensor.
    torch.manual_seed(0)
    cfg = load_config(None, ["train.student.size=tiny", "train.student.num_mel_bins=40"]).train
    objective = build_objective(cfg, PLAN).eval()
    feats, lengths = torch.randn(2, 200, 40), torch.tensor([200, 150])
    frames = int(objective.encoder.output_lengths(lengths).max())
    targets = {"speech": torch.randint(0, 256, (2, frames, 4))}
    with torch.no_grad():
        full = objective(feats, lengths, targets).loss
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        half = objective(feats, lengths, targets).loss
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert abs(float(half.detach()) - float(full)) < 0.02 * abs(float(full))
    half.backward()
    assert all(p.grad is not None for n, p in objective.named_parameters() if p.requires_grad and "mask" not in n)
