"""The example scripts run, and training with fastclip follows its reference's
loss curve: examples/train_gpt.py (torch, zclip, autoclip, timm), the
Lightning ZClip callback and the HF Trainer (the Lightning patch example:
tests/test_patch.py); the benchmark CLI's argument checks."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "grad-scaler"])
@pytest.mark.parametrize("method", ["per-tensor", "agc", "zclip", "autoclip", "into-step", "norm"])
def test_gpt_with_every_method_follows_its_reference(method, amp, capsys):
    """--clip METHOD --compare: fastclip's run against the library the method comes from."""
    if method == "agc" and importlib.util.find_spec("timm") is None:  # its agc.py is loaded by file
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    if method in ("zclip", "autoclip"):
        pytest.importorskip(method, reason=f"{method} is not installed")
    runs = train_gpt.main(TINY + ["--steps", "10", "--compare", "--clip", method] + (["--amp"] if amp else []))
    (ref_name, ref), (_name, ours) = runs.items()
    assert ref_name == {"zclip": "zclip", "autoclip": "autoclip", "agc": "timm"}.get(method, "torch")
    assert ours["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]
    assert "ms/step" in capsys.readouterr().out


def test_gpt_script_runs_from_the_command_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_gpt.py"), *TINY, "--steps", "2", "--clip-backend", "cpu"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fastclip-cpu" in result.stdout and "clip" in result.stdout


def test_lightning_zclip_callback_matches_zclips(monkeypatch):
    pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed")
    pytest.importorskip("zclip", reason="zclip is not installed")
    from examples import lightning_zclip

    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], "norm")
    runs = lightning_zclip.main(["--steps", "25"])
    assert calls["norm"] >= 15  # fastclip's ZClip ran the fused norm after its warm-up
    assert runs["fastclip"]["losses"] == pytest.approx(runs["zclip"]["losses"], rel=1e-5)
    assert runs["fastclip"]["mean"] == pytest.approx(runs["zclip"]["mean"], rel=1e-5)
    for a, b in zip(runs["fastclip"]["params"], runs["zclip"]["params"]):
        assert a.sub(b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("mode", ["patch", "zclip"])
def test_hf_trainer_clips_with_fastclip(mode, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed")
    if mode == "zclip":
        pytest.importorskip("zclip", reason="zclip is not installed")
    from examples import hf_trainer

    # (patched, the Trainer clips through accelerate: clip_grad_norm_, the
    # backend's clip_norm, before accelerate 1.16; get_total_norm, its norm, since)
    methods = ("clip_norm", "norm") if mode == "patch" else ("norm",)
    calls = count_calls(monkeypatch, FUSED_BACKENDS["cpu"], *methods)
    runs = hf_trainer.main(["--mode", mode, "--steps", "8"])
    assert sum(calls.values()) >= 3  # the Trainer's clip (or the callback's ZClip) ran fastclip's kernels
    reference = "torch" if mode == "patch" else "zclip"
    assert len(runs["fastclip"]) == 8
    assert runs["fastclip"] == pytest.approx(runs[reference], rel=1e-5)


def test_benchmark_cli_refuses_a_selection_that_runs_nothing(capsys):
    from benchmarks.__main__ import main as bench_main

    with pytest.raises(SystemExit) as info:
        bench_main(["--quick", "--ops", "zclip", "--no-save"])  # the quick suite has no ZClip case
    assert info.value.code == 2
    assert "no case of the quick suite runs zclip" in capsys.readouterr().err


def test_host_benchmark_cli_runs_and_writes_its_files(tmp_path, capsys):
    """`python -m benchmarks.host` (smoke test: few tensors, one round): its
    table has every implementation, and its JSON what the README quotes."""
    import json

    from benchmarks.host import main as host_main

    assert host_main(["--count", "20", "--size", "8", "--rounds", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("torch clip_grad_norm_", "fastclip clip_grad_norm_", "fastclip ZClip.step", "fastclip grad_stats"):
        assert f"| {name} |" in out
    (path,) = tmp_path.glob("*_host.json")
    rows = json.loads(path.read_text())["results"]
    assert {r["implementation"] for r in rows} >= {"torch clip_grad_norm_", "fastclip get_total_norm"}
    assert all(r["median_ms"] > 0 and r["torch_over_this"] > 0 for r in rows)
