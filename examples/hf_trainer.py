"""Hugging Face Trainer with fastclip: a tiny random GPT-2 (no download).

  --mode patch  the Trainer's own clipping (`max_grad_norm`, through
                accelerate and torch.nn.utils.clip_grad_norm_) runs fastclip's
                fused kernels inside `with fastclip.patched():`;
  --mode zclip  ZClip instead of a fixed max_grad_norm: a TrainerCallback
                steps fastclip.ZClip in `on_pre_optimizer_step` (set
                max_grad_norm=0 so the Trainer does not clip as well; the
                clipper has no fixed cap either, so its z-score decides).

    python examples/hf_trainer.py --mode patch --steps 20

Each mode trains twice from the same start, with torch (or zclip.ZClip) and
with fastclip, and prints both loss curves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import fastclip

VOCAB, SEQ = 64, 16
# no fixed cap (max_grad_norm=None) and a low z_thresh: the z-score decides, on a few steps of a short run
ZCLIP_SETTINGS = {"warmup_steps": 5, "z_thresh": 1.0, "max_grad_norm": None}


class Tokens(torch.utils.data.Dataset):
    """Sequences following a fixed permutation of the vocabulary, with noise."""

    def __init__(self, n: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(VOCAB, generator=g)
        tokens = torch.empty(n, SEQ, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (n,), generator=g)
        for i in range(1, SEQ):
            tokens[:, i] = perm[tokens[:, i - 1]]
        noise = torch.rand(n, SEQ, generator=g) < 0.1
        tokens[noise] = torch.randint(VOCAB, (int(noise.sum()),), generator=g)
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class ZClipCallback(TrainerCallback):
    """Steps a clipper (fastclip.ZClip or zclip.ZClip) before every optimizer step."""

    def __init__(self, clipper):
        self.clipper = clipper

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.clipper.step(model)


def train(mode: str, ours: bool, steps: int, max_norm: float = 0.5) -> list[float]:
    """Train the tiny model; returns the logged losses."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    callbacks = []
    if mode == "zclip":
        if ours:
            clipper = fastclip.ZClip(**ZCLIP_SETTINGS)
        else:
            import zclip

            clipper = zclip.ZClip(**ZCLIP_SETTINGS)
        callbacks.append(ZClipCallback(clipper))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=os.path.join(out, "run"), max_steps=steps, per_device_train_batch_size=8,
            learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            max_grad_norm=max_norm if mode == "patch" else 0.0, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
        with fastclip.patched() if ours and mode == "patch" else contextlib.nullcontext():
            trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["patch", "zclip"], default="patch")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    reference = "torch" if args.mode == "patch" else "zclip"
    runs = {reference: train(args.mode, False, args.steps), "fastclip": train(args.mode, True, args.steps)}
    print(f"step {reference:>12} {'fastclip':>12}")
    for i, (a, b) in enumerate(zip(*runs.values())):
        print(f"{i:>4} {a:>12.6f} {b:>12.6f}")
    return runs


if __name__ == "__main__":
    main()
