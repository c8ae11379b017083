"""Patchify DDPM: patching at the U-Net input, so a 256 x 256 model costs what a 64 x 64 one does.

Paper
    Luhman, Luhman. "Improving Diffusion Model Efficiency Through Patching." 2022.
        https://arxiv.org/abs/2207.04316
    Original code: github.com/ericl122333/PatchDiffusion-TF (Keras) and
        github.com/ericl122333/PatchDiffusion-Pytorch (a guided-diffusion fork with the same model).

What this file adds over ddpm.py
    A ViT-style patching step around the U-Net (paper Sec. 3): the image (B, 3, H, W) is cut into
    P x P patches and rearranged space-to-depth into (B, 3 P^2, H/P, W/P); a 3x3 convolution maps it
    to the base width, a fixed 2-D sinusoidal position encoding is added, ddpm.py's U-Net runs on
    the (H/P) x (W/P) grid, and GroupNorm + SiLU + a zero-initialised 3x3 convolution to 3 P^2
    channels followed by depth-to-space give the output back at full resolution. Every convolution
    and attention layer therefore sees P^2 times fewer positions: with P = 4 a 256 x 256 model
    costs what a 64 x 64 model costs with P = 1. The paper argues (Sec. 3) that this loses little
    because the optimal x0 prediction is blurry for most timesteps, so the network predicts x0
    (not eps), trained with a squared error weighted by sqrt(SNR_t) (Sec. 3), on a linear
    schedule with T = 1000; sampling is 250-step respaced ancestral sampling whose last step
    returns x0_hat (`--target`, `--loss_weight`, `--beta_end`, `--patch_size`). Everything else
    (data, EMA, AMP, DDP, checkpoints, DDIM, guidance) is ddpm.py's, copied with `# Copied from`
    markers.

Departures from the paper and the original code (each is also stated where it happens)
    - The U-Net is ddpm.py's (ADM-style) rather than the original's: its time embedding MLP is
      Linear(c, 4c) SiLU Linear(4c, 4c) (original: Dense(4c, swish) Dense(c c_mult[-1], swish)),
      width changes happen in the first ResBlock of a level (original: in the Downsample/Upsample
      convolution), and GroupNorm uses at most 32 groups with at least 4 channels each.
    - No learned variance: the original's hybrid loss (L_simple + L_vlb with a variance head) is
      not implemented; sampling uses the fixed small variance beta~ (the original's v = 1 end).
    - t is drawn from all of 0..T-1: the original restricts t to an SNR range (start_snr/end_snr)
      and, because TF's randint excludes its maximum, never trains t = 999.
    - The loss is averaged over pixels instead of summed (original): Adam is invariant to a
      constant scale of the loss, so this changes only what the gradient-clipping threshold means.
    - Guidance clips x0_hat to [-1, 1] instead of the TF code's dynamic thresholding.
    - fp32/bf16/fp16 on GPUs instead of bf16 on TPUs; EMA every step instead of every 100 steps.

Commands
    python patchify_ddpm.py                                # quick CPU run: 256x256, P = 8
    python patchify_ddpm.py --dataset_path DIR --preset paper                  # one GPU, LSUN P = 4
    python patchify_ddpm.py --dataset_path DIR --preset paper --patch_size 2   # LSUN P = 2
    python patchify_ddpm.py --dataset_path DIR --preset paper --image_size 1024   # FFHQ-1024
    torchrun --nproc_per_node=4 patchify_ddpm.py --dataset_path DIR --preset paper  # 4 GPUs, DDP
    python patchify_ddpm.py --sample --checkpoint runs/patchify_ddpm/checkpoints/last.pt
    tensorboard --logdir runs/patchify_ddpm

Sections (the same order in every script): imports, configuration and CLI, data, model,
diffusion math, sampling, training loop, main().
"""

# ------------------------------------------------------------------------------------------------
# Imports
# ------------------------------------------------------------------------------------------------

import argparse
import concurrent.futures
import contextlib
import copy
import functools
import json
import math
import os
import random
import shutil
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import kernels

try:
    import resource                                                 # Unix only
except ImportError:
    resource = None

METHOD = "patchify_ddpm"
FORMAT_VERSION = 1

# ------------------------------------------------------------------------------------------------
# Configuration and CLI
# ------------------------------------------------------------------------------------------------


# Copied from ddpm.UserError
class UserError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits with status 2."""


# Copied from ddpm.TrainingDiverged
class TrainingDiverged(Exception):
    """Training keeps producing non-finite gradients: main() prints it and exits with status 1."""


# Every flag's default. The `quick` preset is these values; `paper` overrides some of them.
# Copied from ddpm.DEFAULTS
DEFAULTS = {
    # data
    "dataset_path": None,
    "image_size": "32",
    "class_conditional": False,
    "hflip": True,
    "procedural_size": 4096,
    "num_workers": 4,
    "max_memory_dataset_gb": 4.0,
    # model
    "base_channels": 32,
    "channel_mults": "1,2,2",
    "num_res_blocks": 1,
    "attention_resolutions": "8",
    "num_heads": 4,
    "dropout": 0.0,
    "label_dropout": 0.1,
    # diffusion
    "schedule": "cosine",
    "timesteps": 1000,
    "loss": "mse",
    # optimisation
    "batch_size": 32,
    "accumulation_iters": 1,
    "max_steps": 1200,
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "precision": "fp32",
    "ema_decay": 0.995,
    "ema_start": 200,
    "swa": False,
    "swa_start": 800,
    "max_nonfinite_steps": 25,
    # bookkeeping
    "output_dir": None,
    "save_every": 400,
    "sample_every": 400,
    "log_every": 10,
    "seed": 0,
    "resume": None,
    "kernels": "auto",
    # sampling
    "sampler": "ddim",
    "sampling_steps": 50,
    "eta": 0.0,
    "guidance_scale": 1.0,
    "class_label": None,
    "num_samples": 16,
    "weights": "ema",
    "save_gif": False,
}
# What patchify_ddpm.py adds to ddpm.py's flags and changes in them. The quick preset trains at
# 256x256 with P = 8: the U-Net runs on a 32x32 grid with ddpm.py's quick widths, so its body
# costs what `python ddpm.py` (32x32 images) costs; the 3x3 convolutions from and to
# 3 P^2 = 192 channels add about half of that again at this narrow width (0.72 vs 0.50 GFLOP per
# image; at the paper's widths they are a few percent).
# 1024 built-in images instead of ddpm.py's 4096: at 256x256 they take 200 MB and ~15 s to draw.
# Previews use 50 ancestral steps instead of the paper's 250 (the previews are for watching
# training, and 250 steps of 16 samples would take longer than 100 training steps on a CPU).
DEFAULTS.update({
    "image_size": "256",
    "procedural_size": 1024,
    "patch_size": 8,
    "schedule": "linear",
    "beta_end": 0.02,
    "target": "x0",
    "loss_weight": "sqrt_snr",
    "adam_beta2": 0.999,
    "sampler": "ddpm",
})

# `--preset paper`: the original configs.py (methods notes, section 2(c)). Shared by all rows: T =
# 1000, linear betas from 1e-4, x0 target with sqrt(SNR) weighting, dropout 0, attention at grid
# sides 16 and 8 with 64 channels per head, Adam lr 1e-4 after 5k warmup steps, no decay, EMA 0.99
# every 100 steps, 250 ancestral sampling steps, no augmentation (no flips).
# Our EMA updates every step: 0.99 ** (1 / 100) per step keeps the same memory (the average of the
# last ~10k steps) without the 100-step staircase.
# Heads: --num_heads is a count here; 8 heads give 64 channels per head at every attended width of
# these rows (512) except P = 8's 16x16 level (384 channels: 8 heads of 48 instead of 6 of 64).
# The rows that depend on the resolution and P are in PAPER_CONFIGS (None here).
PRESETS = {
    "quick": {},
    "paper": {
        "image_size": "256",
        "hflip": False,
        "patch_size": 4,
        "base_channels": None,
        "channel_mults": None,
        "num_res_blocks": None,
        "attention_resolutions": "16,8",
        "num_heads": 8,
        "dropout": 0.0,
        "schedule": "linear",
        "beta_end": None,
        "batch_size": None,
        "max_steps": None,
        "lr": 1e-4,
        "lr_schedule": "constant",
        "warmup_steps": 5000,
        "adam_beta2": None,
        "ema_decay": 0.99 ** (1 / 100),
        "ema_start": 0,
        "save_every": 10_000,
        "sample_every": 10_000,
        "sampling_steps": 250,
    },
}

# The original's configs.py rows, keyed by (height, width, patch size): LSUN church at 256x256
# with P = 2, 4, 8 and FFHQ at 1024x1024 with P = 4. (The ImageNet models are two class-conditional
# experts split at SNR 0.25, not reproduced here.)
PAPER_ROW_KEYS = ("base_channels", "channel_mults", "num_res_blocks", "batch_size", "max_steps",
                  "beta_end", "adam_beta2")
PAPER_CONFIGS = {
    (256, 256, 2): {"base_channels": 128, "channel_mults": "1,2,2,4,4", "num_res_blocks": 2,
                    "batch_size": 128, "max_steps": 335_000, "beta_end": 0.02, "adam_beta2": 0.99},
    (256, 256, 4): {"base_channels": 256, "channel_mults": "1,1,2,2", "num_res_blocks": 2,
                    "batch_size": 256, "max_steps": 275_000, "beta_end": 0.02, "adam_beta2": 0.99},
    (256, 256, 8): {"base_channels": 256, "channel_mults": "1,1.5,2", "num_res_blocks": 3,
                    "batch_size": 512, "max_steps": 215_000, "beta_end": 0.02, "adam_beta2": 0.99},
    (1024, 1024, 4): {"base_channels": 128, "channel_mults": "1,2,2,4,4,4", "num_res_blocks": 2,
                      "batch_size": 32, "max_steps": 780_000, "beta_end": 0.025,
                      "adam_beta2": 0.98},
}


# Copied from ddpm._Parser
class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit status 2, no usage dump)."""

    def error(self, message):
        raise UserError(message)


# Copied from ddpm._int_list
def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


# Copied from ddpm._float_list
def _float_list(text):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


# Copied from ddpm.parse_image_size
def parse_image_size(text):
    """'64' -> [64, 64]; '64x96' -> [64, 96] (height x width)."""
    parts = str(text).lower().split("x")
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--image_size must be N or HxW, got {text!r}") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--image_size must be N or HxW with positive sides, got {text!r}")
    return size


# Copied from ddpm.build_parser with build_parser->build_shared_parser
def build_shared_parser():
    p = _Parser(
        prog=f"{METHOD}.py",
        description="Train a DDPM on a folder of images (or the built-in dataset), or sample from "
        "a checkpoint with --sample. Defaults are the 'quick' preset; '--preset paper' "
        "values are shown where they differ. Explicit flags override the preset.",
    )

    def add(group, name, help, **kw):
        key = name.lstrip("-")
        default = DEFAULTS[key]
        paper = PRESETS["paper"].get(key, default)
        shown = f"default: {default}" + (f"; paper: {paper}" if paper != default else "")
        if paper is None and default is not None:               # the preset leaves it open
            shown = f"default: {default}; paper: chosen per --image_size (--dry_run shows it)"
        group.add_argument(name, default=None, help=f"{help} ({shown})", **kw)

    def flag(group, name, help):
        key = name.lstrip("-")
        group.add_argument(name, default=None, action="store_true",
                           help=f"{help} (default: {'on' if DEFAULTS[key] else 'off'})")
        group.add_argument(f"--no_{key}", dest=key, action="store_false", help=f"turn {name} off")

    g = p.add_argument_group("mode")
    g.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                   help="'quick': a useful run on a 2-core CPU in minutes; 'paper': the "
                   "published configuration (default: quick)")
    g.add_argument("--sample", action="store_true",
                   help="sample from --checkpoint instead of training")
    g.add_argument("--checkpoint", default=None, help="checkpoint to sample from (with --sample)")
    g.add_argument("--dry_run", action="store_true",
                   help="print the resolved configuration and parameter count, then exit")

    g = p.add_argument_group("data")
    add(g, "--dataset_path", "folder of images, searched recursively; omit to use the built-in "
        "procedural landscapes")
    add(g, "--image_size", "training resolution, N or HxW")
    flag(g, "--class_conditional", "use the top-level subfolders of --dataset_path as class labels "
         "(on the built-in dataset: day and dusk); enables classifier-free guidance")
    flag(g, "--hflip", "random horizontal flips")
    add(g, "--procedural_size", "number of built-in procedural images", type=int)
    add(g, "--num_workers", "threads that decode and resize the images: all of them once at "
        "start-up, or, for a folder streamed from disk, each micro-batch's while the one before "
        "it trains", type=int)
    add(g, "--max_memory_dataset_gb", "decode the folder into memory once if its decoded "
        "size (image files x 3 x H x W bytes, in every process) is at most this many GB (1e9 "
        "bytes); a larger folder is streamed from disk: each micro-batch is decoded when it is "
        "needed (0: always stream)", type=float)

    g = p.add_argument_group("model")
    add(g, "--base_channels", "U-Net width at the highest resolution", type=int)
    add(g, "--channel_mults", "width multiplier per resolution level, comma-separated")
    add(g, "--num_res_blocks", "residual blocks per level", type=int)
    add(g, "--attention_resolutions", "feature-map sides (shorter side) whose levels get "
        "self-attention, comma-separated, empty for none (the middle block always has it)")
    add(g, "--num_heads", "attention heads", type=int)
    add(g, "--dropout", "dropout in the residual blocks", type=float)
    add(g, "--label_dropout", "probability of replacing the class label by the null label in "
        "training (classifier-free guidance)", type=float)

    g = p.add_argument_group("diffusion")
    add(g, "--schedule", "noise schedule", choices=["linear", "cosine"])
    add(g, "--timesteps", "number of diffusion steps T", type=int)
    add(g, "--loss", "elementwise training loss: squared error, absolute error or Huber "
        "(quickgrid used huber)", choices=["mse", "l1", "huber"])

    g = p.add_argument_group("optimisation")
    add(g, "--batch_size", "images per micro-batch per process (also the sampling batch)", type=int)
    add(g, "--accumulation_iters", "micro-batches per optimizer step", type=int)
    add(g, "--max_steps", "optimizer steps", type=int)
    add(g, "--lr", "peak learning rate (AdamW)", type=float)
    add(g, "--lr_schedule", "after the linear warmup: cosine decay to 0 at --max_steps, or "
        "constant", choices=["cosine", "constant"])
    add(g, "--warmup_steps", "linear learning-rate warmup steps", type=int)
    add(g, "--weight_decay", "AdamW weight decay", type=float)
    add(g, "--grad_clip", "clip the gradient norm to this value (0: off)", type=float)
    add(g, "--precision", "autocast dtype; fp16 adds a GradScaler",
        choices=["fp32", "bf16", "fp16"])
    add(g, "--ema_decay", "EMA decay per optimizer step", type=float)
    add(g, "--ema_start", "optimizer steps before the EMA starts averaging (it copies until then)",
        type=int)
    flag(g, "--swa", "also keep a stochastic weight average (torch.optim.swa_utils.AveragedModel)")
    add(g, "--swa_start", "optimizer step from which --swa averages", type=int)
    add(g, "--max_nonfinite_steps", "stop after this many consecutive steps with non-finite "
        "gradients", type=int)

    g = p.add_argument_group("bookkeeping")
    add(g, "--output_dir", f"run directory (training: runs/{METHOD}; sampling: "
        f"runs/{METHOD}/generated)")
    add(g, "--save_every", "checkpoint every N optimizer steps (and at the end)", type=int)
    add(g, "--sample_every", "preview grid every N optimizer steps (and at the end)", type=int)
    add(g, "--log_every", "TensorBoard scalars every N optimizer steps", type=int)
    add(g, "--seed", "random seed", type=int)
    add(g, "--resume", "'latest' (OUTPUT_DIR/checkpoints/last.pt) or a checkpoint path")
    add(g, "--kernels", "group norm and attention implementation",
        choices=["auto", "triton", "torch"])

    g = p.add_argument_group("sampling (previews during training, and --sample)")
    add(g, "--sampler", "ancestral DDPM (Ho et al. Alg. 2) or DDIM (Song et al. Eq. 12)",
        choices=["ddpm", "ddim"])
    add(g, "--sampling_steps", "respaced number of sampling steps (<= --timesteps)", type=int)
    add(g, "--eta", "DDIM stochasticity: 0 deterministic, 1 ancestral", type=float)
    add(g, "--guidance_scale", "classifier-free guidance scale s: out_u + s (out_c - out_u) on the "
        "network's unconditional and conditional outputs, which is 1 + w in Ho & Salimans' "
        "Eq. 6; 1 is plain conditional sampling", type=float)
    add(g, "--class_label", "class to sample (default: cycle through the classes)", type=int)
    add(g, "--num_samples", "images to sample (also the preview grid size)", type=int)
    add(g, "--weights", "which weights --sample uses", choices=["ema", "model", "swa"])
    flag(g, "--save_gif", "with --sample: also write trajectory.gif of the denoising")
    return p


def build_parser():
    """ddpm.py's flags, plus the patch size and the paper's objective and optimiser settings."""
    p = build_shared_parser()
    p.description = ("Train a patched DDPM (Luhman & Luhman 2022: the U-Net runs on P x P patches "
                     "stacked as channels) on a folder of images (or the built-in dataset), or "
                     "sample from a checkpoint with --sample. Defaults are the 'quick' preset; "
                     "'--preset paper' values are shown where they differ. Explicit flags "
                     "override the preset.")

    def add(group, name, help, **kw):
        key = name.lstrip("-")
        default, paper = DEFAULTS[key], PRESETS["paper"].get(key, DEFAULTS[key])
        shown = f"default: {default}" + (f"; paper: {paper}" if paper != default else "")
        if paper is None and default is not None:               # the preset leaves it open
            shown = f"default: {default}; paper: chosen per --image_size and --patch_size"
        group.add_argument(name, default=None, help=f"{help} ({shown})", **kw)

    g = p.add_argument_group("patches and objective (Luhman & Luhman 2022)")
    add(g, "--patch_size", "patch side P: the U-Net runs on an (H/P) x (W/P) grid of 3 P^2 "
        "channels, so --attention_resolutions name grid sides (the image side / P) and "
        "--base_channels, also the width of the grid's position encoding, must be even. "
        "--preset paper has the original rows for --image_size 256 with P = 2, 4, 8 (LSUN) and "
        "--image_size 1024 with P = 4 (FFHQ)", type=int, choices=[1, 2, 4, 8])
    add(g, "--beta_end", "last beta of the linear schedule (at T = 1000; scaled by 1000 / T "
        "otherwise); the original uses 0.02 for LSUN and ImageNet, 0.025 for FFHQ", type=float)
    add(g, "--target", "what the network predicts: x0 (the paper) or the noise eps (ddpm.py); the "
        "loss is on x0 either way", choices=["x0", "eps"])
    add(g, "--loss_weight", "w(t) in the loss w(t) ||x0 - x0_hat||^2 (paper Sec. 3): sqrt_snr "
        "(the paper), snr (with --target eps: ddpm.py's unweighted eps loss), none",
        choices=["sqrt_snr", "snr", "none"])
    add(g, "--adam_beta2", "AdamW's second-moment decay beta2 (beta1 is 0.9)", type=float)
    return p


# Copied from ddpm.resolve_args
def resolve_args(namespace, base=None):
    """Fill every flag left unset: from `base` (a checkpoint's configuration), else the preset,
    else DEFAULTS."""
    for key, default in DEFAULTS.items():
        if getattr(namespace, key) is not None:
            continue
        if base is not None and key in base:
            value = base[key]
        else:
            value = PRESETS[namespace.preset].get(key, default)
        setattr(namespace, key, value)
    return namespace


def apply_paper_config(args):
    """Fill the flags that `--preset paper` leaves open (None) from the original configuration
    for this resolution and patch size. Explicit flags were filled before and stay."""
    open_keys = [k for k in PAPER_ROW_KEYS if getattr(args, k) is None]
    if not open_keys:
        return
    key = (*args.image_size, args.patch_size)
    if key not in PAPER_CONFIGS:
        known = ", ".join(f"{h}x{w} with --patch_size {p}" for h, w, p in PAPER_CONFIGS)
        raise UserError(f"--preset paper has no configuration for {key[0]}x{key[1]} with "
                        f"--patch_size {key[2]} (the paper has {known}); use one of those or "
                        f"give {' '.join('--' + k for k in open_keys)} explicitly")
    for k in open_keys:
        setattr(args, k, PAPER_CONFIGS[key][k])


# Copied from ddpm.parse_unet_flags
def parse_unet_flags(args):
    """--channel_mults and --attention_resolutions from text to lists; every level's width must be
    a whole number of channels that group norm can split."""
    for key, convert in (("channel_mults", _float_list), ("attention_resolutions", _int_list)):
        value = getattr(args, key)
        if isinstance(value, str):
            setattr(args, key, convert(value))
    args.channel_mults = [int(m) if float(m).is_integer() else m for m in args.channel_mults]
    if not args.channel_mults:
        raise UserError("--channel_mults needs at least one level, e.g. 1,2,2")
    for m in args.channel_mults:
        width = args.base_channels * m
        if width != int(width) or width < 4:
            raise UserError(f"--base_channels {args.base_channels} x channel multiplier {m} = "
                            f"{width} channels; every level needs a whole number of at least 4")


# Copied from ddpm.check_attention
def check_attention(args, height, width, described="feature-map sides"):
    """For a U-Net whose input is height x width: the attended levels' channels must split into
    --num_heads heads, and an --attention_resolutions entry that names no level is worth a warning
    (`described` says what the sides are of, in that warning)."""
    sides = [min(height, width) // 2 ** level for level in range(len(args.channel_mults))]
    widths = [int(args.base_channels * m) for m in args.channel_mults]
    attended = [c for c, side in zip(widths, sides) if side in args.attention_resolutions]
    for channels in attended + widths[-1:]:                         # the middle block attends too
        if channels % args.num_heads:
            raise UserError(f"{channels} attention channels do not split into --num_heads "
                            f"{args.num_heads} heads; choose a divisor of {channels}")
    unused = [r for r in args.attention_resolutions if r not in sides]
    if unused and int(os.environ.get("RANK", 0)) == 0:
        print(f"{METHOD}.py: warning: --attention_resolutions {','.join(map(str, unused))} "
              f"matches no level ({described} {','.join(map(str, sides))}); only the middle "
              f"block and the matching levels attend", file=sys.stderr)


# Copied from ddpm.check_run_flags
def check_run_flags(args):
    """The counts, probabilities and paths every run needs, checked before any work starts."""
    positive = ["batch_size", "accumulation_iters", "max_steps", "timesteps", "sampling_steps",
                "num_samples", "save_every", "sample_every", "log_every", "num_heads",
                "num_res_blocks", "num_workers", "procedural_size", "max_nonfinite_steps"]
    for key in positive:
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.sampling_steps > args.timesteps:
        raise UserError(f"--sampling_steps {args.sampling_steps} exceeds --timesteps "
                        f"{args.timesteps}")
    for key in ("dropout", "label_dropout", "ema_decay"):
        if not 0.0 <= getattr(args, key) < 1.0:
            raise UserError(f"--{key} must be in [0, 1), got {getattr(args, key)}")
    if not args.max_memory_dataset_gb >= 0:                         # NaN fails this too
        raise UserError(f"--max_memory_dataset_gb must be 0 (always stream) or more, got "
                        f"{args.max_memory_dataset_gb}")
    if args.dataset_path is not None and not os.path.isdir(args.dataset_path):
        raise UserError(f"--dataset_path {args.dataset_path} is not a folder")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", METHOD, "generated" if args.sample else "")
        args.output_dir = args.output_dir.rstrip(os.sep)


def finalize_args(args):
    """Parse the list-valued flags and check what can be checked before any work starts. As in
    ddpm.py, except that the U-Net's sizes are those of the patch grid: the image sides must be
    divisible by P times the U-Net's downsampling factor, and attention resolutions are grid
    sides."""
    args.image_size = parse_image_size(args.image_size if not isinstance(args.image_size, list)
                                       else "x".join(map(str, args.image_size)))
    apply_paper_config(args)
    parse_unet_flags(args)
    if args.base_channels < 4 or args.base_channels % 2:
        raise UserError(f"--base_channels {args.base_channels}: the position encoding needs an "
                        f"even number of at least 4 (half for x, half for y)")
    factor = 2 ** (len(args.channel_mults) - 1)
    h, w = args.image_size
    p = args.patch_size
    if h % (p * factor) or w % (p * factor):
        raise UserError(f"--image_size {h}x{w} is not divisible by --patch_size {p} x the "
                        f"U-Net's downsampling factor {factor} (2^(levels-1) for --channel_mults "
                        f"{','.join(map(str, args.channel_mults))}) = {p * factor}; use a "
                        f"multiple of {p * factor}, or a smaller --patch_size or fewer levels")
    check_attention(args, h // p, w // p, f"grid sides with --patch_size {p}:")
    check_run_flags(args)
    if not 0.0 <= args.adam_beta2 < 1.0:
        raise UserError(f"--adam_beta2 must be in [0, 1), got {args.adam_beta2}")
    if not 0.0 < args.beta_end * 1000 / args.timesteps < 1.0:
        raise UserError(f"--beta_end {args.beta_end} x 1000 / --timesteps {args.timesteps} must "
                        f"be in (0, 1); lower --beta_end or raise --timesteps")
    return args


def parse_args(argv=None):
    """Command line -> resolved namespace (preset applied, lists parsed, sizes checked)."""
    return finalize_args(resolve_args(build_parser().parse_args(argv)))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

# Copied from ddpm.IMAGE_EXTENSIONS
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Copied from ddpm.procedural_landscape
def procedural_landscape(index, height, width, seed=0):
    """One built-in training image: a landscape drawn in continuous coordinates, so any resolution
    shows the same scene. Global structure (sky gradient, horizon, sun, mountain ridges) spans the
    whole image; local detail (rock texture, ripples) lives at the pixel scale. The patch methods
    need both: only a model that sees across patches keeps ridges continuous at patch borders.

    The label, drawn at random, is 0 for a day palette and 1 for a dusk palette (the classes of a
    class-conditional run). Returns (uint8 array (3, H, W), label)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(2))
    y = (np.arange(height)[:, None] + 0.5) / height                # (H, 1), 0 at the top
    x = (np.arange(width)[None, :] + 0.5) / width                  # (1, W)
    if label == 0:
        sky_top, sky_low = np.array([0.20, 0.45, 0.85]), np.array([0.70, 0.85, 0.98])
        sun_color, rock = np.array([1.0, 0.97, 0.80]), np.array([0.30, 0.38, 0.30])
    else:
        sky_top, sky_low = np.array([0.18, 0.12, 0.35]), np.array([0.98, 0.55, 0.25])
        sun_color, rock = np.array([1.0, 0.75, 0.35]), np.array([0.22, 0.15, 0.22])
    horizon = rng.uniform(0.55, 0.75)
    t = np.clip(y / horizon, 0, 1)[..., None]                       # (H, 1, 1)
    image = sky_top * (1 - t) + sky_low * t + 0 * x[..., None]      # (H, W, 3)

    # The sun: a disc with a soft glow, somewhere in the sky.
    sx, sy, sr = rng.uniform(0.15, 0.85), rng.uniform(0.12, horizon - 0.15), rng.uniform(0.05, 0.1)
    aspect = width / height
    d = np.sqrt(((x - sx) * aspect) ** 2 + (y - sy) ** 2)[..., None]
    image = image + 0.5 * np.exp(-((d / (2.5 * sr)) ** 2)) * (sun_color - image)
    image = np.where(d < sr, sun_color, image)

    # Mountain ridges: sums of sines with random phases; nearer ridges are lower and darker.
    for layer in range(3):
        ridge = horizon - 0.25 + 0.08 * layer + np.zeros_like(x)
        for octave in range(4):
            freq = (2 ** octave) * rng.uniform(1.0, 2.0)
            phase = rng.uniform(0, 6.3)
            ridge = ridge + 0.1 / (1.6 ** octave) * np.sin(2 * np.pi * freq * x + phase)
        texture = 0.06 * np.sin(2 * np.pi * (37 * x + 23 * y) + rng.uniform(0, 6.3)) \
            * np.sin(2 * np.pi * (29 * x - 41 * y))
        color = rock * (0.7 + 0.25 * layer) * (1 - 0.15 * (2 - layer)) + texture[..., None]
        image = np.where((y > ridge)[..., None], color, image)

    # Water below the horizon, with a dimmed reflection of the sky and horizontal ripples.
    water = (y > horizon)[..., None]
    ripple = 0.05 * np.sin(2 * np.pi * 60 * y + 3 * np.sin(2 * np.pi * 5 * x))[..., None]
    reflected = 0.55 * (sky_top * 0.5 + sky_low * 0.5) + ripple + 0 * x[..., None]
    image = np.where(water, reflected, image)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image.transpose(2, 0, 1), label                         # (H, W, 3) -> (3, H, W)


# Copied from ddpm.procedural_dataset
def procedural_dataset(size, height, width, seed, class_conditional):
    """The built-in dataset: `size` landscapes (uint8 (N, 3, H, W)) and their labels."""
    items = [procedural_landscape(i, height, width, seed) for i in range(size)]
    images = torch.from_numpy(np.stack([im for im, _ in items]))
    labels = torch.tensor([lab for _, lab in items]) if class_conditional else None
    return images, labels, ["day", "dusk"] if class_conditional else []


# Copied from ddpm.find_images
def find_images(root, class_conditional):
    """All image files under `root` (recursively, sorted), with class indices from the top-level
    subfolder names when `class_conditional`."""
    paths, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Follow symbolic links, but read each real folder once (a link cycle would never end).
        if os.path.realpath(dirpath) in seen:
            dirnames.clear()
            continue
        seen.add(os.path.realpath(dirpath))
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if not class_conditional:
        return paths, None, []
    relative = [os.path.relpath(p, root).split(os.sep) for p in paths]
    at_top = [os.path.join(root, *r) for r in relative if len(r) == 1]
    if at_top:
        raise UserError(f"--class_conditional needs every image in a class subfolder of {root}; "
                        f"{len(at_top)} are directly in it (e.g. {at_top[0]})")
    classes = sorted({r[0] for r in relative})
    labels = [classes.index(r[0]) for r in relative]
    return paths, labels, classes


# Copied from ddpm.to_rgb
def to_rgb(image):
    """Any PIL image -> 8-bit RGB. 16-bit and 32-bit grayscale are rescaled (PIL's own convert
    would clip them at 255; float images in [0, 1] would turn black); transparent pixels are
    composited over white rather than revealing whatever colour the encoder left under alpha = 0."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0                                   # 65535 -> 255
        elif image.mode == "F" and array.max() <= 1.0:
            array = array * 255.0                                   # 1.0 -> 255
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# Copied from ddpm.load_image
def load_image(path, height, width):
    """Decode, convert to RGB, resize so the image covers HxW, centre-crop.
    Returns (uint8 array (3, H, W), upscaled?) or None if the file cannot be read."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (width, height))                     # JPEG: decode at 1/2..1/8
            image = ImageOps.exif_transpose(image)                  # phone photos: upright
            image.load()
            image = to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = Image.BICUBIC if scale > 1 else Image.LANCZOS
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image).transpose(2, 0, 1).copy(), scale > 1  # (H, W, 3) -> (3, H, W)


# Copied from ddpm.read_image_size
def read_image_size(path):
    """(width, height) of an image file read from its header, upright by its EXIF orientation, or
    None if PIL cannot identify the file. No pixel is decoded: this is the start-up check of a
    streamed folder.

    Image.open reads a few kilobytes, enough to reject empty files, text files and unknown formats
    but not a file cut short after its header (StreamedImageFolder handles that one when it is
    decoded). `Image.verify()` would not catch it either: for JPEG it does nothing, and for PNG it
    reads the whole file to check every chunk's CRC, i.e. the entire dataset at start-up (90 GB of
    FFHQ-1024 PNGs), which is what streaming is there to avoid."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # PNG's getexif() decodes the pixels to reach an eXIf chunk stored after them; one
            # stored before them (as PIL writes it) is already in image.info.
            if image.format != "PNG" or "exif" in image.info:
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # rotated by 90 or 270 degrees
                    width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return width, height


# Copied from ddpm.load_image_folder
def load_image_folder(root, height, width, class_conditional, num_workers, log=print,
                      max_memory_gb=math.inf):
    """The images of a folder, unreadable files skipped with one warning. Returns images, labels
    (N,) or None, and the class names. `images` is a uint8 tensor (N, 3, H, W) or, if that would
    take more than `max_memory_gb`, a StreamedImageFolder that make_batch indexes the same way.

    Memory: N x 3 x H x W bytes, in every process of a DDP run: 2 GB for 10,000 images at 256x256,
    but 220 GB for FFHQ (70,000 at 1024x1024) and 600 GB for LSUN bedrooms (3M at 256x256). In
    memory, `num_workers` threads decode every image once (PIL releases the GIL while it decodes
    and resizes) straight into one preallocated array; a list of arrays and np.stack would hold
    the dataset twice at the peak. Streamed, only the file headers are read here. Under DDP
    every rank does this itself; only rank 0 prints."""
    paths, labels, classes = find_images(root, class_conditional)
    decoded_gb = len(paths) * 3 * height * width / 1e9
    streamed = decoded_gb > max_memory_gb
    if streamed:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            sizes = list(pool.map(read_image_size, paths))
        # "Upscaled" from the header's size: what load_image will find when it decodes the file.
        upscaled = [None if size is None else max(height / size[1], width / size[0]) > 1
                    for size in sizes]
    else:
        array = np.empty((len(paths), 3, height, width), dtype=np.uint8)

        def decode(i):
            result = load_image(paths[i], height, width)
            if result is None:
                return None
            array[i] = result[0]                                    # each thread its own rows
            return result[1]

        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            upscaled = list(pool.map(decode, range(len(paths))))
    keep = [i for i, u in enumerate(upscaled) if u is not None]
    if not keep:
        raise UserError(f"none of the {len(paths)} image files under {root} could be read")
    bad = [p for p, u in zip(paths, upscaled) if u is None]
    if bad and int(os.environ.get("RANK", 0)) == 0:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"{METHOD}.py: warning: skipping {len(bad)} unreadable image file(s): {shown}",
              file=sys.stderr)
    labels = torch.tensor([labels[i] for i in keep]) if class_conditional else None
    if streamed:
        images = StreamedImageFolder([paths[i] for i in keep], labels, height, width, num_workers)
    else:
        for j, i in enumerate(keep):                                # close the skipped files'
            if j != i:                                              # gaps in place (j < i)
                array[j] = array[i]
        images = torch.from_numpy(array[:len(keep)])
    log(f"dataset: {len(keep)} images from {root}, {len(bad)} skipped, "
        f"{sum(upscaled[i] for i in keep)} upscaled to {height}x{width}"
        + (f", streamed from disk ({decoded_gb:.3g} GB decoded > --max_memory_dataset_gb "
           f"{max_memory_gb:g})" if streamed else "")
        + (f", {len(classes)} classes: {', '.join(classes)}" if classes else ""))
    return images, labels, classes


# Copied from ddpm.StreamedImageFolder
class StreamedImageFolder:
    """A folder too large to decode into memory, indexed like the uint8 tensor it stands in for:
    `images[indices]` -> uint8 (B, 3, H, W), decoded from disk when make_batch asks for it.

    Threads, not processes: PIL releases the GIL while it decodes, resizes and converts, so
    `num_workers` threads decode in parallel, and meanwhile the main thread's forward and backward
    run (PyTorch releases the GIL in its kernels; on a GPU they run asynchronously anyway).
    `prefetch` queues the next micro-batches, so that they are ready when they are asked for.

    Determinism: image i is always decoded from file i by load_image, the in-memory path's
    function, so `images[indices]` is bitwise what the tensor would hold, and a batch stays a
    function of its BatchStream index (exact resume, DDP: each rank decodes only its own batches).
    The threads draw no random numbers; make_batch draws the flips afterwards on the main thread.

    A file whose header passed the start-up check can still fail to decode (a truncated
    download). It is replaced by the next file in index order (cyclically) that decodes and has
    the same label, which depends on the index only, so batches stay a function of their index.
    One warning per file names it (each rank warns for its own batches); it is not read again."""

    def __init__(self, paths, labels, height, width, num_workers):
        self.paths, self.height, self.width = paths, height, width
        self.labels = labels.tolist() if labels is not None else None
        self.pool = concurrent.futures.ThreadPoolExecutor(num_workers)
        self.pending = {}                                           # indices -> their futures
        self.failed, self.lock = set(), threading.Lock()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, indices):
        key = tuple(indices.tolist())
        futures = self.pending.pop(key, None) or [self.pool.submit(self.decode, i) for i in key]
        return torch.from_numpy(np.stack([f.result() for f in futures]))   # (B, 3, H, W)

    def prefetch(self, batches):
        """Start decoding `batches` (index tensors) in the background."""
        for indices in batches:
            key = tuple(indices.tolist())
            if key not in self.pending:
                self.pending[key] = [self.pool.submit(self.decode, i) for i in key]

    def decode(self, index):
        """Image `index` as uint8 (3, H, W), or its replacement if its file fails to decode."""
        n = len(self.paths)
        for j in ((index + k) % n for k in range(n)):
            if j in self.failed or (self.labels is not None
                                    and self.labels[j] != self.labels[index]):
                continue
            result = load_image(self.paths[j], self.height, self.width)
            if result is not None:
                return result[0]
            with self.lock:                                         # warned once, and before
                if j not in self.failed:                            # other threads skip it
                    print(f"{METHOD}.py: warning: {self.paths[j]} cannot be decoded (its header "
                          f"passed the start-up check); the next readable image"
                          + (" of its class" if self.labels is not None else "")
                          + " replaces it",
                          file=sys.stderr)
                    self.failed.add(j)
        raise UserError(f"none of the {n} image files"
                        + (" of this class" if self.labels is not None else "")
                        + f" can be decoded (e.g. {self.paths[index]}); check the folder")


# Copied from ddpm.load_dataset
def load_dataset(args, log=print):
    """The training images: the built-in dataset, or a folder decoded once for the whole run,
    or streamed from disk if it is larger than --max_memory_dataset_gb decoded."""
    height, width = args.image_size
    if args.dataset_path is None:
        images, labels, classes = procedural_dataset(args.procedural_size, height, width,
                                                     args.seed, args.class_conditional)
        log(f"dataset: {len(images)} built-in procedural landscapes at {height}x{width}")
        return images, labels, classes
    return load_image_folder(args.dataset_path, height, width, args.class_conditional,
                             args.num_workers, log, args.max_memory_dataset_gb)


# Copied from ddpm.BatchStream
class BatchStream:
    """Deterministic batches: the k-th micro-batch of a rank depends only on (seed, k, rank).

    Epoch e visits the images in the order of a permutation seeded by (seed, e); rank r of
    `world` takes every world-th position. Because a batch is a function of its index, resuming
    at optimizer step s simply continues at micro-batch s * accumulation_iters."""

    def __init__(self, num_images, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = \
            num_images, batch_size, seed, rank, world
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # Keep two epochs: a batch can straddle the boundary between them.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, k):
        positions = (k * self.batch_size + torch.arange(self.batch_size)) * self.world + self.rank
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in positions])


# Copied from ddpm.make_batch
def make_batch(images, labels, indices, hflip, device):
    """uint8 (N, 3, H, W) (a tensor or a StreamedImageFolder) -> float in [-1, 1] on `device`,
    randomly flipped (global torch RNG, whose state the checkpoint saves), with labels or None."""
    x = images[indices].to(device).float() / 127.5 - 1.0          # (B, 3, H, W) in [-1, 1]
    if hflip:
        flip = (torch.rand(x.shape[0]) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)    # flip(3): mirror W
    y = labels[indices].to(device) if labels is not None else None
    return x, y


# Copied from ddpm.make_grid
def make_grid(images, padding=2):
    """uint8 (N, 3, H, W) -> one uint8 (H', W', 3) grid image, as square as possible
    (torchvision is not a dependency)."""
    n, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), 255,
                   dtype=np.uint8)
    for i, image in enumerate(images.cpu().numpy()):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)   # (3, h, w) -> (h, w, 3)
    return grid


# Copied from ddpm.to_uint8
def to_uint8(x):
    """[-1, 1] float -> uint8, the inverse of make_batch's scaling."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


# Copied from ddpm.save_png
def save_png(array, path):
    """Write a uint8 (H, W, 3) array atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


# Copied from ddpm.timestep_embedding
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. Sec. 3.5, used by
    Ho et al.), in ADM's order: [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2)).
    (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                        # (B, 1) * (1, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)    # (B, dim)


# Copied from ddpm.norm_groups
def norm_groups(channels):
    """GroupNorm(32) as in ADM where the width allows it, but never fewer than 4 channels per
    group: at the narrow widths of a CPU-sized model (32 channels) GroupNorm(32) would normalise
    every channel on its own and erase the mean colour of flat regions, which the network then
    cannot reconstruct. Widths that 32 does not divide (e.g. 144 = 96 + 48 after a skip
    concatenation) take the largest group count that does."""
    return max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))


# Copied from ddpm.GroupNormAct
class GroupNormAct(nn.GroupNorm):
    """GroupNorm with an optional scale/shift and SiLU, fused by kernels.group_norm_act:
    act(GN(x) * (1 + scale) + shift). Statistics in fp32 whatever the input dtype."""

    def __init__(self, channels, act="silu"):
        super().__init__(norm_groups(channels), channels)
        self.act = act

    def forward(self, x, scale=None, shift=None):
        return kernels.group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps,
                                      scale=scale, shift=shift, act=self.act)


# Copied from ddpm.zero_module
def zero_module(module):
    """Zero-initialise a layer so that a residual branch starts as the identity (ADM, Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Copied from ddpm.ResBlock
class ResBlock(nn.Module):
    """Residual block with adaptive group norm (Dhariwal & Nichol, Sec. 3):
    h = conv(SiLU(GN(x))); h = conv(dropout(SiLU(GN(h) * (1 + scale) + shift))); out = skip(x) + h,
    with (scale, shift) = Linear(SiLU(emb)) carrying the timestep (and class)."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout):
        super().__init__()
        self.norm1 = GroupNormAct(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = GroupNormAct(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb_proj(emb).chunk(2, dim=1)          # (B, 2C) -> 2 x (B, C)
        h = self.conv2(self.dropout(self.norm2(h, scale, shift)))
        return self.skip(x) + h


# Copied from ddpm.AttentionBlock
class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual
    connection and a zero-initialised output projection. The softmax(q k^T / sqrt(d)) v product
    runs through kernels.attention (flash attention: the N x N scores are never stored)."""

    def __init__(self, channels, num_heads):
        super().__init__()
        if channels % num_heads:
            raise UserError(f"{channels} channels do not split into --num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNormAct(channels, act=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))                                # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)              # 3 x (B, heads, N, d)
        out = kernels.attention(q, k, v)                            # (B, heads, N, d)
        # (B, heads, N, d) -> (B, heads, d, N) -> (B, C, H, W)
        out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
        return x + self.proj(out)


# Copied from ddpm.Downsample
class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (Ho et al.)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


# Copied from ddpm.Upsample
class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution (Ho et al.)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Copied from ddpm.UNet
class UNet(nn.Module):
    """The epsilon-prediction network eps_theta(x_t, t, y): an ADM-style U-Net.

    Encoder: per level, `num_res_blocks` ResBlocks (+ attention where the feature map's shorter
    side is in `attention_resolutions`), then a Downsample (not after the last level). Middle:
    ResBlock, attention, ResBlock. Decoder: per level, `num_res_blocks + 1` ResBlocks, each fed the
    concatenation with one stored encoder activation, then an Upsample. Output: GN, SiLU and a
    zero-initialised 3x3 convolution, so the untrained network predicts eps = 0.

    Conditioning: emb = MLP(sinusoid(t)) (+ class embedding), injected in every ResBlock as
    scale/shift. With `num_classes > 0`, label `num_classes` is the learned null label of
    classifier-free guidance, and in training a label is replaced by it with probability
    `label_dropout` (Ho & Salimans 2022, Algorithm 1)."""

    def __init__(self, in_channels=3, out_channels=3, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=1, attention_resolutions=(8,), num_heads=4, dropout=0.0,
                 image_size=(32, 32), num_classes=0, label_dropout=0.1):
        super().__init__()
        self.base_channels, self.num_classes, self.label_dropout = \
            base_channels, num_classes, label_dropout
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        widths = [int(base_channels * m) for m in channel_mults]
        side = min(image_size)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(self._level_block(ch, width, emb_dim, dropout, side,
                                                   attention_resolutions, num_heads))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)
                side //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._level_block(ch + skip_widths.pop(), width, emb_dim, dropout,
                                                 side, attention_resolutions, num_heads))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))
                side *= 2
        self.out = nn.Sequential(GroupNormAct(ch),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @staticmethod
    def _level_block(in_ch, out_ch, emb_dim, dropout, side, attention_resolutions, num_heads):
        blocks = [ResBlock(in_ch, out_ch, emb_dim, dropout)]
        if side in attention_resolutions:
            blocks.append(AttentionBlock(out_ch, num_heads))
        return nn.ModuleList(blocks)

    def embed(self, t, y):
        """Timestep (and class) embedding, (B,) -> (B, 4 * base_channels)."""
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            elif self.training and self.label_dropout > 0:
                drop = torch.rand(y.shape, device=y.device) < self.label_dropout
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            emb = emb + self.class_emb(y)
        return emb

    @staticmethod
    def _run(block, h, emb):
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, y=None):
        emb = self.embed(t, y)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)  # (B, C+C_skip, H, W)
        return self.out(h)


def patchify(x, patch_size):
    """Space-to-depth (paper Sec. 3, the original's `to_patches`): every P x P patch becomes one
    grid cell with 3 P^2 channels, ordered (patch row, patch column, colour) as in the original
    (einops `b c (h p1) (w p2) -> b (p1 p2 c) h w`, TF `extract_patches`): channel
    (p1 P + p2) C + c of cell (i, j) is pixel (i P + p1, j P + p2) of colour c.
    F.pixel_unshuffle orders the channels (c, p1, p2) instead; that would matter only when
    porting the original's weights."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)                       # (B, C, H/P, P1, W/P, P2)
    x = x.permute(0, 3, 5, 1, 2, 4)                                 # (B, P1, P2, C, H/P, W/P)
    return x.reshape(b, p * p * c, h // p, w // p)                  # (B, P1*P2*C, H/P, W/P)


def unpatchify(x, patch_size):
    """Depth-to-space, the exact inverse of `patchify` (the original's `from_patches`)."""
    b, k, h, w = x.shape
    p = patch_size
    x = x.reshape(b, p, p, k // (p * p), h, w)                      # (B, P1, P2, C, H/P, W/P)
    x = x.permute(0, 3, 4, 1, 5, 2)                                 # (B, C, H/P, P1, W/P, P2)
    return x.reshape(b, k // (p * p), h * p, w * p)                 # (B, C, H, W)


def position_encoding_2d(height, width, channels, device=None):
    """The fixed 2-D sinusoidal position encoding of the original (`get_2d_positional_encoding`
    in nn.py), added after the input convolution. With c = channels / 2, k = 0..c-1,
        f_k = exp(-ln(10^4) k / (c - 1)),   omega = 64 / side,
        PE[k, i, j] = sin(omega f_k j)   (x: the column j),
        PE[c + k, i, j] = sin(omega f_k i)   (y: the row i).
    Sines only, as in the original; omega stretches the wavelengths so that a 64-cell grid sees
    the frequencies of a Transformer's encoding. The original supports square grids only; on a
    non-square grid we take side = the shorter side for both axes, so one cell is the same step
    along x and y. Returns (channels, height, width) in float32."""
    half = channels // 2
    omega = 64 / min(height, width)
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, device=device) / (half - 1)) * omega
    x = torch.sin(torch.arange(width, device=device)[None] * freqs[:, None])    # (c, W)
    y = torch.sin(torch.arange(height, device=device)[None] * freqs[:, None])   # (c, H)
    return torch.cat([x[:, None, :].expand(half, height, width),               # (c, H, W)
                      y[:, :, None].expand(half, height, width)])              # (2c, H, W)


class PatchInputConv(nn.Conv2d):
    """The input layer on the patch grid (the original's `in_proj` + `positional_emb`): a 3x3
    convolution from 3 P^2 channels to the base width (not a per-patch linear layer as in a ViT),
    plus the fixed position encoding. The convolution has ddpm.UNet.input_conv's parameter names,
    so with P = 1 the state dicts of the two networks are interchangeable."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        h = super().forward(x)                                      # (B, C, H/P, W/P)
        position = position_encoding_2d(h.shape[2], h.shape[3], h.shape[1], h.device)
        return h + position.to(h.dtype)                             # broadcast over B


class PatchifyUNet(UNet):
    """x0_theta(x_t, t, y) of the paper (Sec. 3): patchify, ddpm.py's U-Net on the
    (H/P) x (W/P) grid with 3 P^2 input and output channels, unpatchify.

    The U-Net's own layers are already the paper's in/out layers: its input is a 3x3 convolution
    to the base width (here with the position encoding added: PatchInputConv), and its output is
    GroupNorm, SiLU and a zero-initialised 3x3 convolution, so the untrained network predicts 0.
    `image_size` is the image's; the U-Net is built for the grid (attention resolutions are grid
    sides)."""

    def __init__(self, patch_size=4, in_channels=3, out_channels=3, image_size=(256, 256),
                 **unet_kwargs):
        p = patch_size
        super().__init__(in_channels=in_channels * p * p, out_channels=out_channels * p * p,
                         image_size=[s // p for s in image_size], **unet_kwargs)
        self.patch_size = p
        self.input_conv = PatchInputConv(in_channels * p * p, self.base_channels)

    def forward(self, x, t, y=None):
        h = patchify(x, self.patch_size)                            # (B, 3P^2, H/P, W/P)
        h = super().forward(h, t, y)                                # (B, 3P^2, H/P, W/P)
        return unpatchify(h, self.patch_size)                       # (B, 3, H, W)


def build_model(args):
    """The patched U-Net for a resolved configuration (`args.num_classes` is set from the
    dataset)."""
    return PatchifyUNet(
        patch_size=args.patch_size, in_channels=3, out_channels=3,
        base_channels=args.base_channels, channel_mults=args.channel_mults,
        num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
        num_heads=args.num_heads, dropout=args.dropout, image_size=args.image_size,
        num_classes=getattr(args, "num_classes", 0), label_dropout=args.label_dropout)


# ------------------------------------------------------------------------------------------------
# Diffusion math
# ------------------------------------------------------------------------------------------------


# Copied from ddpm.make_beta_schedule
def make_beta_schedule(kind, timesteps, beta_end=0.02):
    """beta_1..beta_T in float64.

    linear (Ho et al. Sec. 4): beta from 1e-4 to `beta_end` (the paper's 0.02) at T = 1000; for
    other T both ends are scaled by 1000 / T so the total noise stays the same (Nichol & Dhariwal,
    Sec. 3.2 code).
    cosine (Nichol & Dhariwal Eq. 17): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) /
    (1 + s)) pi/2), s = 0.008; beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999
    (`beta_end` does not apply)."""
    if kind == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise UserError(f"unknown noise schedule {kind!r} (linear or cosine)")


# Copied from ddpm._gather
def _gather(buffer, t, x):
    """buffer[t] reshaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
    return buffer[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# Copied from ddpm.per_image_noise
def per_image_noise(shape, seeds, device):
    """A function that draws noise of `shape` (B, ...), each image from its own generator seeded
    by `seeds` (random seeds if None): an image's noise does not depend on the batch it is drawn
    in (EDM, Karras et al. 2022)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in
                  (seeds if seeds is not None else torch.randint(0, 2 ** 62, (shape[0],)))]

    def noise_like():
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)

    return noise_like


# Copied from ddpm.schedule_buffers
def schedule_buffers(betas):
    """Everything the loss and the samplers need from betas_1..T, in float64: alpha_bar_t and its
    square roots (Ho et al. Eq. 4), and the posterior q(x_{t-1} | x_t, x_0) = N(mu~, beta~ I) with
    mu~ = coef1 x_0 + coef2 x_t (Ho et al. Eqs. 6-7)."""
    betas = betas.double()
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)                          # alpha_bar_t
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # beta~_0 = 0: the log is clipped to beta~_1 (the variance at t = 0 is never used).
        "posterior_log_variance_clipped": torch.log(torch.cat(
            [posterior_variance[1:2], posterior_variance[1:]])) if len(betas) > 1
        else torch.zeros(1, dtype=torch.float64),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt()
        / (1.0 - alphas_cumprod),
    }


class GaussianDiffusion(nn.Module):
    """The forward process and everything derived from the betas, as in ddpm.py (float64, stored
    as float32 buffers; index t is the paper's step t+1; `respace` and `timestep_map` likewise),
    for a network that predicts x0 (`target="x0"`, the paper) or eps (`target="eps"`), trained
    with the weighted x0 loss of the paper (Sec. 3): `loss_weight` is w(t) below, `loss` the
    elementwise error (squared in the paper)."""

    def __init__(self, betas, target="x0", loss_weight="sqrt_snr", loss="mse", timestep_map=None):
        super().__init__()
        buffers = schedule_buffers(betas)
        # The signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t) (paper Sec. 3).
        buffers["snr"] = buffers["alphas_cumprod"] / (1.0 - buffers["alphas_cumprod"])
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(len(betas))
        self.register_buffer("timestep_map", timestep_map.long(), persistent=False)
        self.num_timesteps = len(betas)
        self.alphas_cumprod_f64 = buffers["alphas_cumprod"]           # for exact respacing
        self.options = dict(target=target, loss_weight=loss_weight, loss=loss)  # for `respace`
        self.target, self.loss_weight, self.loss = target, loss_weight, loss

    # Copied from ddpm.GaussianDiffusion.q_sample
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (Ho et al. Eq. 4)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    # Copied from ddpm.GaussianDiffusion.predict_x0_from_eps
    def predict_x0_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), Eq. 4 solved for x_0."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    # Copied from ddpm.GaussianDiffusion.q_posterior
    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 7):
        mu~ = coef1 x_0 + coef2 x_t, coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t),
        coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
        beta~ = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t) * x0
                + _gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _gather(self.posterior_variance, t, x_t)

    def p_sample_step(self, x_t, x0, t, noise):
        """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2) from the predicted x0, with
        the fixed small variance sigma_t^2 = beta~_t (the original learns sigma between beta~ and
        beta; we do not): x_{t-1} = mu~(x0_hat, x_t) + sigma_t z, no noise at t = 0. At t = 0 the
        posterior mean is x0_hat itself (coef1 = beta_1 / (1 - alpha_bar_1) = 1, coef2 = 0), so
        the last step returns x0_hat, as the paper's sampler does."""
        mean, _ = self.q_posterior(x0, x_t, t)
        nonzero = (t > 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        std = torch.exp(0.5 * _gather(self.posterior_log_variance_clipped, t, x_t))
        return mean + nonzero * std * noise

    # Copied from ddpm.GaussianDiffusion._alpha_bar
    def _alpha_bar(self, t, x):
        """alpha_bar at index t, with alpha_bar = 1 at t = -1 (before the first step)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        a = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, a, torch.ones_like(a)).reshape(-1, *([1] * (x.dim() - 1)))

    def ddim_step(self, x_t, x0, t, t_prev, eta=0.0, noise=None):
        """DDIM update (Song et al. Eq. 12) from index t to t_prev (-1: the final step to x_0),
        written on the predicted x0 so that an x0 network needs no detour through eps_hat:
            eps_hat = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t),
            x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
            sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)      (Eq. 16),
        with a = alpha_bar (= 1 at index -1, where x_prev = x0_hat exactly). ddpm.py's
        ddim_step is the same update written on eps."""
        a_t = self._alpha_bar(t, x_t).to(x_t.dtype)
        a_prev = self._alpha_bar(t_prev, x_t).to(x_t.dtype)
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * (noise if noise is not None else torch.randn_like(x_t))
        return x_prev

    # Copied from ddpm.GaussianDiffusion.respace
    def respace(self, steps):
        """A process over `steps` evenly spaced original indices (Nichol & Dhariwal Sec. 4):
        alpha_bar is kept at the chosen steps and beta_k = 1 - alpha_bar_k / alpha_bar_{k-1}."""
        use = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()
        use = torch.unique(use)
        alpha_bar = self.alphas_cumprod_f64[use]
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        betas = 1 - alpha_bar / alpha_bar_prev
        return GaussianDiffusion(betas, timestep_map=use, **self.options).to(self.betas.device)

    def weight(self, t):
        """w(t) of the loss: sqrt(SNR_t) (the paper), SNR_t, or 1. (B,) -> (B,)."""
        if self.loss_weight == "sqrt_snr":
            return self.snr[t].sqrt()
        if self.loss_weight == "snr":
            return self.snr[t]
        return torch.ones_like(self.snr[t])

    def training_loss(self, model, x0, y=None):
        """The paper's loss (Sec. 3; the original trainer's L_simple), t ~ U{0..T-1},
        eps ~ N(0, I), x_t = q_sample(x0, t, eps):
            L = w(t) || x0 - x0_hat(x_t, t, y) ||^2,   w(t) = sqrt(SNR_t) by default,
        averaged over pixels and batch (the original sums over pixels; with Adam that changes
        only what the gradient-clipping threshold means). With `target="eps"` the network's
        eps_hat gives x0_hat by Eq. 4 (predict_x0_from_eps), and x0 - x0_hat = (eps_hat - eps) /
        sqrt(SNR_t), so the same loss is
            L = w(t) / SNR_t || eps - eps_hat ||^2,
        and w = snr gives ddpm.py's L_simple (Ho et al. Eq. 14) exactly. `loss` = "l1" or
        "huber" replaces the squared error (not in the paper; ddpm.py has the same choice).
        Every t is trained (the original never draws t = 999 and limits t to an SNR range)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map[t], y).float()
        x0_hat = out if self.target == "x0" else self.predict_x0_from_eps(x_t.float(), t, out)
        error = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}[self.loss](
            x0_hat, x0.float(), reduction="none")
        return (self.weight(t).reshape(-1, 1, 1, 1) * error).mean()

    def predict_x0(self, model, x, t, y, guidance_scale):
        """x0_hat from the network, guided, clipped to the data range [-1, 1]: the network's x0,
        or x0 from its eps by Ho et al.'s Eq. 4 (predict_x0_from_eps)."""
        out = guided_prediction(model, x, self.timestep_map[t], y, guidance_scale)
        x0 = out if self.target == "x0" else self.predict_x0_from_eps(x, t, out)
        return x0.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, model, shape, sampler="ddim", steps=50, eta=0.0, y=None, guidance_scale=1.0,
               seeds=None, trajectory_every=0, progress=False):
        """Draw samples from noise, as ddpm.py's sample (per-image seeds, respacing, the same
        arguments), with both samplers driven by x0_hat. With sampler="ddpm" this is the paper's
        sampler: respaced ancestral steps, the last of which returns x0_hat.
        Returns x_0 in [-1, 1], and the list of intermediate x_t if `trajectory_every` > 0."""
        device = self.betas.device
        process = self if steps == self.num_timesteps else self.respace(steps)
        noise_like = per_image_noise(shape, seeds, device)
        x = noise_like()
        trajectory = []
        indices = range(process.num_timesteps - 1, -1, -1)
        for k in tqdm(indices, desc="sampling", leave=False, disable=not progress):
            t = torch.full((shape[0],), k, device=device, dtype=torch.long)
            x0 = process.predict_x0(model, x, t, y, guidance_scale)
            if sampler == "ddpm":
                x = process.p_sample_step(x, x0, t, noise_like())
            else:
                x = process.ddim_step(x, x0, k, k - 1, eta, noise_like() if eta > 0 else None)
            if trajectory_every and (k % trajectory_every == 0 or k == process.num_timesteps - 1):
                trajectory.append(x.clamp(-1, 1).cpu())
        return (x, trajectory) if trajectory_every else x


def build_diffusion(args):
    """The diffusion process of a resolved configuration (the counterpart of build_model)."""
    return GaussianDiffusion(make_beta_schedule(args.schedule, args.timesteps, args.beta_end),
                             args.target, args.loss_weight, args.loss)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def guided_prediction(model, x, t, y, guidance_scale):
    """Classifier-free guidance on the network's output, x0 or eps: out = out(x, null) +
    s (out(x, y) - out(x, null)) (Ho & Salimans' Eq. 6 with s = 1 + w). The TF original guides
    x0, the PyTorch port eps; both give the same sampler, since x0 = (x_t - sqrt(1 - a) eps) /
    sqrt(a) is affine in eps with coefficients that do not depend on the class. s = 1 is plain
    conditional sampling (one forward pass); otherwise one batched pass evaluates both."""
    if y is None or guidance_scale == 1.0:
        return model(x, t, y).float()
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
    out_c, out_u = out.chunk(2)                                     # (2B, ...) -> 2 x (B, ...)
    return out_u + guidance_scale * (out_c - out_u)


# Copied from ddpm.sample_labels
def sample_labels(args, count, offset=0):
    """Class labels for `count` images: --class_label, or cycling through the classes."""
    if not args.num_classes:
        return None
    if args.class_label is not None:
        if not 0 <= args.class_label < args.num_classes:
            raise UserError(f"--class_label {args.class_label} is not in 0..{args.num_classes - 1}")
        return torch.full((count,), args.class_label, dtype=torch.long)
    return (torch.arange(count) + offset) % args.num_classes


# Copied from ddpm.generate
def generate(model, diffusion, args, num, device, seed, progress=False, trajectory_every=0):
    """`num` images in batches of --batch_size; image i uses noise seed (seed, i) whatever the
    batch size. Returns uint8 (num, 3, H, W) (and the trajectory of the first batch)."""
    images, trajectory = [], None
    for start in range(0, num, args.batch_size):
        count = min(args.batch_size, num - start)
        y = sample_labels(args, count, start)
        seeds = [seed * 1_000_003 + i for i in range(start, start + count)]
        out = diffusion.sample(model, (count, 3, *args.image_size), sampler=args.sampler,
                               steps=args.sampling_steps, eta=args.eta,
                               y=None if y is None else y.to(device),
                               guidance_scale=args.guidance_scale, seeds=seeds, progress=progress,
                               trajectory_every=trajectory_every if start == 0 else 0)
        if trajectory_every and start == 0:
            out, trajectory = out
        images.append(to_uint8(out).cpu())
    images = torch.cat(images)
    return (images, trajectory) if trajectory_every else images


# Copied from ddpm.save_gif
def save_gif(trajectory, path):
    """The denoising trajectory (list of (B, 3, H, W) in [-1, 1]) as an animated GIF of grids."""
    frames = [Image.fromarray(make_grid(to_uint8(x))) for x in trajectory]
    frames += [frames[-1]] * 10                                     # hold the final image
    tmp = f"{path}.tmp.gif"
    frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=60, loop=0)
    os.replace(tmp, path)


# Copied from ddpm.NOT_INHERITED
NOT_INHERITED = ("dataset_path", "output_dir", "resume", "seed", "weights", "save_gif",
                 "class_label")


# Copied from ddpm.sample_main
def sample_main(namespace):
    """`--sample`: load a checkpoint, write 00000.png, ... and grid.png to --output_dir. Flags not
    given on the command line come from the checkpoint's configuration."""
    if namespace.checkpoint is None:
        raise UserError("--sample needs --checkpoint PATH")
    ckpt = load_checkpoint(namespace.checkpoint)
    base = {k: v for k, v in ckpt["args"].items() if k not in NOT_INHERITED}
    args = finalize_args(resolve_args(namespace, base=base))
    args.num_classes = ckpt["args"].get("num_classes", 0)
    check_compatible(ckpt["args"], args, namespace.checkpoint)
    if not args.num_classes and (args.class_label is not None or args.guidance_scale != 1.0):
        raise UserError(f"{namespace.checkpoint} is unconditional: --class_label and "
                        f"--guidance_scale need a model trained with --class_conditional")
    kernels.set_backend(args.kernels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    if args.weights == "ema":
        model.load_state_dict(ckpt["ema"]["shadow"])
    elif args.weights == "swa":
        if ckpt.get("swa") is None:
            raise UserError(f"{args.checkpoint} has no SWA weights (train with --swa)")
        averaged = AveragedModel(model)
        averaged.load_state_dict(ckpt["swa"])
        model = averaged.module
    else:
        model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    diffusion = build_diffusion(args).to(device)
    os.makedirs(args.output_dir, exist_ok=True)
    every = max(1, args.sampling_steps // 25) if args.save_gif else 0
    result = generate(model, diffusion, args, args.num_samples, device, args.seed, progress=True,
                      trajectory_every=every)
    images, trajectory = result if args.save_gif else (result, None)
    for i, image in enumerate(images):
        save_png(image.numpy().transpose(1, 2, 0), os.path.join(args.output_dir, f"{i:05d}.png"))
    save_png(make_grid(images), os.path.join(args.output_dir, "grid.png"))
    if trajectory:
        save_gif(trajectory, os.path.join(args.output_dir, "trajectory.gif"))
    print(f"wrote {len(images)} samples and grid.png to {args.output_dir}")
    return 0


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------


# Copied from ddpm.EMA
class EMA:
    """Exponential moving average of the weights (Ho et al. Sec. 4 use decay 0.9999):
    shadow <- decay * shadow + (1 - decay) * weights, after `start` optimizer steps of plain
    copying (early weights are poor; averaging them slows the start). The number of updates is
    saved with the checkpoint (quickgrid lost it, so the EMA restarted after every resume)."""

    def __init__(self, model, decay, start):
        self.decay, self.start, self.num_updates = decay, start, 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        weights = model.state_dict()
        for name, value in self.shadow.state_dict().items():
            if self.num_updates <= self.start or not value.dtype.is_floating_point:
                value.copy_(weights[name])
            else:
                value.lerp_(weights[name], 1.0 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "start": self.start, "num_updates": self.num_updates,
                "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state):
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])


# Copied from ddpm.lr_lambda
def lr_lambda(step, warmup_steps, max_steps, schedule):
    """Learning-rate factor: linear warmup over `warmup_steps`, then cosine decay to 0 at
    `max_steps` or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


# Copied from ddpm.rng_state
def rng_state():
    """Every random generator the run draws from (saved for an exact resume)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


# Copied from ddpm.set_rng_state
def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


# Copied from ddpm._tuples
def _tuples(value):
    """Lists back to tuples, as random.setstate needs (the checkpoint stores lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# Copied from ddpm.save_checkpoint
def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# Copied from ddpm.link_atomically
def link_atomically(source, path):
    """Make `path` the same file as `source` (a hard link: no second copy on disk; a copy where the
    file system has no links), replacing it atomically."""
    tmp = f"{path}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


# Copied from ddpm.load_checkpoint
def load_checkpoint(path):
    """Load and validate a checkpoint written by this script (weights_only: no code runs)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:                                      # truncated, not a zip, ...
        raise UserError(f"checkpoint {path} cannot be read ({type(error).__name__}); it is "
                        f"truncated or not a checkpoint") from None
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository")
    if ckpt["method"] != METHOD:
        raise UserError(f"{path} is a {ckpt['method']}.py checkpoint; use {ckpt['method']}.py "
                        f"with it, or pass a {METHOD}.py checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt.get('format_version')}; this "
                        f"script reads format {FORMAT_VERSION}")
    ckpt["rng"]["python"] = _tuples(ckpt["rng"]["python"])
    return ckpt


# The flags that shape the network or the diffusion process: a resumed run or --sample must agree
# on them (ddpm.py's, plus the patch size, the network's target and the schedule's last beta).
ARCHITECTURE_KEYS = ("image_size", "patch_size", "base_channels", "channel_mults",
                     "num_res_blocks", "attention_resolutions", "num_heads", "num_classes",
                     "schedule", "beta_end", "timesteps", "target", "class_conditional")


# Copied from ddpm.check_compatible
def check_compatible(ckpt_args, args, path, keys=ARCHITECTURE_KEYS):
    different = [f"--{k} {ckpt_args.get(k)} (checkpoint) vs {getattr(args, k)} (now)"
                 for k in keys if ckpt_args.get(k) != getattr(args, k)]
    if different:
        raise UserError(f"{path} was trained with a different configuration: "
                        + "; ".join(different))


# Copied from ddpm.setup_distributed
def setup_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process.
    NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, dist.get_world_size(), device


# Copied from ddpm.peak_memory_mb
def peak_memory_mb(device):
    """CUDA allocator peak on a GPU; the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if resource is None:                                            # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB


# Copied from ddpm.preview
def preview(model, diffusion, args, device, step, writer):
    """A grid from the EMA weights on fixed noise seeds: comparable from step to step."""
    images = generate(model, diffusion, args, args.num_samples, device, seed=args.seed)
    grid = make_grid(images)
    save_png(grid, os.path.join(args.output_dir, "samples", f"step_{step}.png"))
    writer.add_image("samples", grid, step, dataformats="HWC")


# Copied from ddpm.resume_checkpoint
def resume_checkpoint(namespace):
    """The checkpoint `--resume` names (`latest`: OUTPUT_DIR/checkpoints/last.pt), loaded and
    validated before any other work. Returns (path, checkpoint)."""
    if namespace.resume != "latest":
        return namespace.resume, load_checkpoint(namespace.resume)
    folder = os.path.join(namespace.output_dir or os.path.join("runs", METHOD), "checkpoints")
    path = os.path.join(folder, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume latest: no checkpoint in {folder} yet; start without --resume")
    return path, load_checkpoint(path)


def paper_adamw(args):
    """AdamW with beta2 = --adam_beta2: the original trains with Adam betas (0.9, 0.99) on LSUN and
    (0.9, 0.98) on FFHQ, where ddpm.py uses PyTorch's (0.9, 0.999)."""
    return functools.partial(torch.optim.AdamW, betas=(0.9, args.adam_beta2))


# Copied from ddpm.micro_batch_step
def micro_batch_step(model, diffusion, x0, y, args, scaler, autocast, sync):
    """Forward and backward of one micro-batch; gradients accumulate in the parameters. Under
    DDP, `sync` False skips the all-reduce (DDP decides at forward time, so the forward runs in
    no_sync too). Returns this micro-batch's share of the step's loss."""
    with contextlib.nullcontext() if sync else model.no_sync():
        with autocast:
            loss = diffusion.training_loss(model, x0, y) / args.accumulation_iters
        scaler.scale(loss).backward()
    return loss.item()


# Copied from ddpm.train with torch.optim.AdamW->paper_adamw(args)
def train(args, ckpt=None, ckpt_path=None):
    """The training loop. `ckpt` (from resume_checkpoint) continues a run where it stopped."""
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    kernels.set_backend(args.kernels)
    if ckpt is not None:                                            # flags given explicitly
        check_compatible(ckpt["args"], args, ckpt_path,
                         [k for k in ARCHITECTURE_KEYS if k != "num_classes"])
    images, labels, classes = load_dataset(args, log)
    args.num_classes = len(classes) if args.class_conditional else 0
    if len(images) < args.batch_size * world:
        log(f"{METHOD}.py: warning: {len(images)} images for {args.batch_size * world} per "
            f"micro-batch: every batch repeats images", file=sys.stderr)
    if ckpt is not None:                                            # a dataset with other classes
        check_compatible(ckpt["args"], args, ckpt_path, ["num_classes"])

    torch.manual_seed(args.seed)                                    # the same weights on every rank
    model = build_model(args).to(device)
    ema = EMA(model, args.ema_decay, args.ema_start)
    swa = AveragedModel(model) if args.swa else None
    torch.manual_seed(args.seed + rank)                             # noise, t, flips, dropout
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    optimizer = paper_adamw(args)(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.max_steps, args.lr_schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    diffusion = build_diffusion(args).to(device)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if swa is not None and ckpt.get("swa") is not None:
            swa.load_state_dict(ckpt["swa"])
        # load_state_dict restores the checkpoint's hyperparameters (lr, weight decay, betas,
        # eps) with the moments; the ones this run was built with are put back afterwards, so an
        # explicit flag on resume takes effect from here on (without one they are equal anyway).
        current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] and scaler.is_enabled():                  # empty unless fp16 before
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
        for group, hyperparameters in zip(optimizer.param_groups, current):
            group.update(hyperparameters)
            group["lr"] = args.lr * lr_lambda(step, args.warmup_steps, args.max_steps,
                                              args.lr_schedule)
        if world == 1:
            # Only rank 0's generators are saved, so a resumed multi-process run continues with
            # fresh per-rank streams: statistically the same run, not bitwise.
            set_rng_state(ckpt["rng"])
        log(f"resumed from {ckpt_path} at step {step} (EMA updates: {ema.num_updates})")
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                        else None)
    raw_model = model.module if world > 1 else model
    stream = BatchStream(len(images), args.batch_size, args.seed, rank, world)
    micro_batches = args.max_steps * args.accumulation_iters      # in the whole run, per rank
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    writer = None
    if rank == 0:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(args_dict(args), f, indent=2)
        writer = SummaryWriter(args.output_dir)
        log(f"{METHOD}: {count_parameters(raw_model) / 1e6:.2f}M parameters, {world} process(es) "
            f"on {device}, {args.batch_size * args.accumulation_iters * world} images per step")

    def checkpoint():
        state = {"model": raw_model.state_dict(), "ema": ema.state_dict(),
                 "swa": swa.state_dict() if swa is not None else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "step": step,
                 "args": args_dict(args), "rng": rng_state(), "method": METHOD,
                 "format_version": FORMAT_VERSION}
        folder = os.path.join(args.output_dir, "checkpoints")
        save_checkpoint(os.path.join(folder, f"step_{step}.pt"), state)
        link_atomically(os.path.join(folder, f"step_{step}.pt"), os.path.join(folder, "last.pt"))

    nonfinite, skipped = 0, 0
    bar = tqdm(total=args.max_steps, initial=step, desc=METHOD,
               disable=True if rank != 0 else None)          # None: off when not a terminal
    started = tick = time.perf_counter()
    tick_step, interval_loss, paused = step, 0.0, 0.0              # since the last log line
    model.train()
    while step < args.max_steps:
        loss_sum = 0.0
        for micro in range(args.accumulation_iters):
            k = step * args.accumulation_iters + micro              # this rank's micro-batch k
            x0, y = make_batch(images, labels, stream.indices(k), args.hflip, device)
            if isinstance(images, StreamedImageFolder):             # decode k+1, k+2 meanwhile
                images.prefetch(stream.indices(j) for j in range(k + 1, min(k + 3, micro_batches)))
            # DDP all-reduces gradients only in the backward of the last micro-batch.
            sync = micro == args.accumulation_iters - 1 or world == 1
            loss_sum += micro_batch_step(model, diffusion, x0, y, args, scaler, autocast, sync)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        if torch.isfinite(grad_norm):
            nonfinite = 0
            scaler.step(optimizer)
        else:
            # Skip the update. Gradients are all-reduced, so every rank takes this branch together;
            # with fp16 the GradScaler also lowers its scale in update() below.
            nonfinite, skipped = nonfinite + 1, skipped + 1
            if nonfinite >= args.max_nonfinite_steps:
                raise TrainingDiverged(f"{nonfinite} consecutive steps with non-finite gradients "
                                       f"at step {step}; lower --lr, or use --precision bf16/fp32")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]                        # the rate this step used
        scheduler.step()
        step += 1
        ema.update(raw_model)
        if swa is not None and step > args.swa_start:
            swa.update_parameters(raw_model)

        if rank == 0:                                               # rank 0's loss and speed
            bar.update(1)
            interval_loss += loss_sum
            if step % args.log_every == 0 or step == args.max_steps:
                now = time.perf_counter()
                seen = (step - tick_step) * args.batch_size * args.accumulation_iters * world
                ips = seen / (now - tick - paused)                  # previews and saves excluded
                mean_loss = interval_loss / (step - tick_step)
                tick, tick_step, interval_loss, paused = now, step, 0.0, 0.0
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                scalars = {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                           "images_per_sec": ips, "peak_memory_mb": peak_memory_mb(device),
                           "nonfinite_steps": skipped}
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step)
            pause_start = time.perf_counter()
            if step % args.sample_every == 0 or step == args.max_steps:
                if bar.disable:                                     # a log file, not a terminal
                    log(f"step {step}/{args.max_steps} loss {loss_sum:.4f} lr {lr:.2e} "
                        f"{time.perf_counter() - started:.0f}s")
                preview(ema.shadow, diffusion, args, device, step, writer)
            if step % args.save_every == 0 or step == args.max_steps:
                checkpoint()
            paused += time.perf_counter() - pause_start
    bar.close()
    if rank == 0:
        writer.close()
        log(f"done: {step} steps, checkpoint in {os.path.join(args.output_dir, 'checkpoints')}"
            + (f", {skipped} steps skipped for non-finite gradients" if skipped else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


# Copied from ddpm.count_parameters
def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# Copied from ddpm.args_dict
def args_dict(args):
    """The resolved configuration as JSON-friendly values (for args.json and checkpoints)."""
    return {k: v for k, v in vars(args).items() if k not in ("sample", "checkpoint", "dry_run")}


# ------------------------------------------------------------------------------------------------
# main()
# ------------------------------------------------------------------------------------------------


# Copied from ddpm.dry_run
def dry_run(args):
    """Print the resolved configuration and the parameter count; check the dataset folder."""
    if args.dataset_path is None:
        count, classes = args.procedural_size, ["day", "dusk"]
    else:
        paths, _, classes = find_images(args.dataset_path, args.class_conditional)
        count = len(paths)
    args.num_classes = len(classes) if args.class_conditional else 0
    print(json.dumps(args_dict(args), indent=2))
    print(f"parameters: {count_parameters(build_model(args)):,}; {count} training images")
    return 0


# Copied from ddpm.main
def main(argv=None):
    try:
        namespace = build_parser().parse_args(argv)
        if namespace.sample:
            return sample_main(namespace)
        ckpt = path = None
        if namespace.resume is not None:
            # A resumed run keeps its configuration; flags given now override it.
            path, ckpt = resume_checkpoint(namespace)
            base = {k: v for k, v in ckpt["args"].items() if k != "resume"}
            args = finalize_args(resolve_args(namespace, base=base))
        else:
            args = finalize_args(resolve_args(namespace))
        if args.dry_run:
            return dry_run(args)
        return train(args, ckpt, path)
    except UserError as error:
        print(f"{METHOD}.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"{METHOD}.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
