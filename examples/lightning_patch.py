"""PyTorch Lightning with fastclip: one `fastclip.patched()` (or
`fastclip.patch()` at start-up) and the Trainer's gradient clipping
(`gradient_clip_val`, norm or value) runs fastclip's fused kernels.

Lightning clips through `torch.nn.utils.clip_grad_norm_` / `clip_grad_value_`
(its precision plugin looks them up at call time), so nothing else changes.

    python examples/lightning_patch.py --steps 50 --algorithm norm
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastclip


class TinyRegression(pl.LightningModule):
    def __init__(self, width: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _data(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :1] * 3 - x[:, 1:2] ** 2 + 0.1 * torch.randn(n, 1, generator=g)) * 5  # large grads: clipping acts
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def train(steps: int, algorithm: str = "norm", use_fastclip: bool = True, clip_val: float = 0.5, model=None):
    """Fit for `steps` steps; returns the trained parameters."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    model = model or TinyRegression()
    trainer = pl.Trainer(
        max_steps=steps, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with fastclip.patched() if use_fastclip else contextlib.nullcontext():
        trainer.fit(model, _data())
    return [p.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--algorithm", choices=["norm", "value"], default="norm")
    args = parser.parse_args()
    for use_fastclip in (False, True):
        model = TinyRegression()
        start = time.perf_counter()
        train(args.steps, args.algorithm, use_fastclip, model=model)
        label = "fastclip (patched)" if use_fastclip else "torch"
        print(f"{label:>18}: final loss {model.losses[-1]:.6f} after {args.steps} steps, "
              f"{time.perf_counter() - start:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
