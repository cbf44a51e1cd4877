"""ZClip in a PyTorch Lightning Trainer: zclip's own Lightning callback steps a
zclip.ZClip in `on_before_optimizer_step`; fastclip's ZClip goes in the same
place, with the same arguments and the same results, and no host sync.

    python examples/lightning_zclip.py --steps 60

Lightning calls `on_before_optimizer_step` after backward and after AMP has
unscaled the grads, before the optimizer step: the place for any clipper.
Leave the Trainer's own `gradient_clip_val` unset (ZClip clips).
"""

from __future__ import annotations

import argparse
import logging
import time

import pytorch_lightning as pl
import torch

import fastclip

try:
    from examples.lightning_patch import TinyRegression, _data
except ImportError:  # run as a script from examples/
    from lightning_patch import TinyRegression, _data


class ZClipCallback(pl.Callback):
    """fastclip.ZClip as a Lightning callback (zclip's ZClipLightningCallback, with fastclip's ZClip)."""

    def __init__(self, **zclip_kwargs):
        super().__init__()
        self.zclip = fastclip.ZClip(**zclip_kwargs)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.zclip.step(pl_module)


class ReferenceZClipCallback(pl.Callback):
    """What zclip.ZClipLightningCallback does (zclip imports the `lightning`
    package for it; this one works with `pytorch_lightning` too)."""

    def __init__(self, **zclip_kwargs):
        super().__init__()
        import zclip

        self.zclip = zclip.ZClip(**zclip_kwargs)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.zclip.step(pl_module)


def train(steps: int, callback: pl.Callback, model=None):
    """Fit for `steps` steps with `callback`; returns the model."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    model = model or TinyRegression()
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, _data())
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    settings = {"warmup_steps": 10, "max_grad_norm": 5.0}
    results = {}
    for label, callback in (("zclip", ReferenceZClipCallback), ("fastclip", ZClipCallback)):
        start = time.perf_counter()
        cb = callback(**settings)
        model = train(args.steps, cb)
        results[label] = {"losses": model.losses, "params": [p.detach().clone() for p in model.parameters()],
                          "mean": float(cb.zclip.mean)}  # fmt: skip
        print(f"{label:>9}: final loss {model.losses[-1]:.6f}, EMA of the norm {float(cb.zclip.mean):.4f}, "
              f"{time.perf_counter() - start:.2f} s")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
