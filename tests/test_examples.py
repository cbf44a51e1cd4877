"""The example scripts run, and training with fastclip follows torch's loss
curve (examples/train_gpt.py; the Lightning example: tests/test_patch.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples import train_gpt
from fastclip._dispatch import FUSED_BACKENDS

from .helpers import count_calls

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "6", "--layers", "1", "--d-model", "32", "--heads", "2", "--seq", "16", "--batch", "4",
        "--vocab", "64", "--device", "cpu", "--max-norm", "0.05"]  # fmt: skip


@pytest.mark.parametrize("patch", [False, True], ids=["direct", "patched"])
def test_gpt_loss_curve_matches_torch(patch, capsys, monkeypatch):
    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], "clip_norm")
    runs = train_gpt.main(TINY + ["--compare"] + (["--patch"] if patch else []))
    assert calls["clip_norm"] == 6  # the fastclip run clipped with the fused kernels every step (the torch run did not)
    torch_run, fast_run = runs["torch"], runs["fastclip-auto"]
    assert len(torch_run["losses"]) == 6 and torch_run["grads"] == fast_run["grads"] == 16
    # max_norm 0.05: every step clips, so any difference in clipping would show
    assert all(n > 0.05 for n in torch_run["norms"])
    assert fast_run["losses"] == pytest.approx(torch_run["losses"], rel=1e-5)
    assert fast_run["norms"] == pytest.approx(torch_run["norms"], rel=1e-5)
    assert torch_run["losses"][-1] < torch_run["losses"][0]
    out = capsys.readouterr().out
    assert "largest loss difference" in out and "ms/step" in out


def test_gpt_script_runs_from_the_command_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_gpt.py"), *TINY, "--steps", "2", "--clip-backend", "cpu"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fastclip-cpu" in result.stdout and "clip" in result.stdout
