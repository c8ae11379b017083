"""Patchify DDPM: patching at the U-Net input, so a 256 x 256 model costs what a 64 x 64 one does.

Paper
    Luhman, Luhman. "Improving Diffusion Model Efficiency Through Patching." 2022.
        https://arxiv.org/abs/2207.04316
    Original code: github.com/ericl122333/PatchDiffusion-TF (Keras) and
        github.com/ericl122333/PatchDiffusion-Pytorch (a guided-diffusion fork with the same model).

What this file adds over ddpm.py
    A ViT-style patching step around the U-Net (paper Sec. 3): the image (B, 3, H, W) is cut into
    P x P patches stacked as channels, (B, 3 P^2, H/P, W/P); a 3x3 convolution plus a fixed 2-D
    sinusoidal position encoding maps them to the base width, ddpm.py's U-Net runs on the grid,
    and its 3 P^2 output channels go back to full resolution by depth-to-space. Every layer sees
    P^2 times fewer positions: with P = 4 a 256 x 256 model costs what a 64 x 64 one does. The
    paper argues that this loses little because the optimal x0 prediction is blurry for most
    timesteps, so the network predicts x0, trained with the x0 error weighted by sqrt(SNR_t), on a
    linear schedule; sampling is 250 respaced ancestral steps, the last of which returns x0_hat.
    Own flags: --patch_size, --loss_weight, --beta_end, --adam_beta2; ddpm.py's --prediction
    defaults to x0 here.

Departures from the paper and the original code
    - The U-Net is ddpm.py's (ADM-style): its time MLP is Linear(c, 4c) SiLU Linear(4c, 4c)
      (original: Dense(4c) Dense(c c_mult[-1])), widths change in the first ResBlock of a level
      (original: in the resampling convolution), GroupNorm has groups of at least 4 channels.
    - No learned variance (the original's hybrid loss with a variance head): sampling uses the
      fixed small variance beta~ (the original's v = 1 end).
    - t is drawn from all of 0..T-1: the original restricts t to an SNR range and, because TF's
      randint excludes its maximum, never trains t = 999.
    - The loss is averaged over pixels instead of summed (Adam is invariant to the scale; the
      paper preset does not clip gradients, nor does the original).
    - x0_hat is clipped to [-1, 1] in sampling instead of the TF code's dynamic thresholding.
    - fp32/bf16/fp16 on GPUs instead of bf16 on TPUs; EMA every step instead of every 100 steps.

Commands
    python patchify_ddpm.py                                # quick CPU run: 256x256, P = 8
    python patchify_ddpm.py --dataset_path DIR --preset paper                  # one GPU, LSUN P = 4
    python patchify_ddpm.py --dataset_path DIR --preset paper --image_size 1024   # FFHQ-1024
    torchrun --nproc_per_node=4 patchify_ddpm.py --dataset_path DIR --preset paper --batch_size 64
    python patchify_ddpm.py --sample --checkpoint runs/patchify_ddpm/checkpoints/last.pt
    tensorboard --logdir runs/patchify_ddpm
    (--batch_size is per process; the original's is global, split among the TPU replicas by
    tf.distribute: on 4 GPUs a quarter of the preset's, 64 for P = 4, matches it.)

The method's own code
    patchify, unpatchify: space-to-depth (B, 3, H, W) <-> (B, 3 P^2, H/P, W/P), original order
    position_encoding_2d: the original's fixed 2-D sinusoidal encoding of the grid cells
    PatchInputConv: the U-Net's input convolution on the grid, plus the position encoding
    PatchifyUNet: patchify, ddpm.py's U-Net on the grid, unpatchify
    unet_input_size, build_model: the grid (H/P, W/P) the U-Net runs on; the patched U-Net
    PatchifyDiffusion, build_diffusion: the paper's loss w(t) ||x0 - x0_hat||^2, --beta_end
    adamw: AdamW with betas (0.9, --adam_beta2)
    PRESETS, PAPER_CONFIGS, build_parser, parse_args: this method's defaults and the paper's rows
"""

import argparse
import concurrent.futures
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import resource
import sys
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

METHOD = "patchify_ddpm"
FORMAT_VERSION = 3


# Copied from ddpm.UserError
class UserError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits with status 2."""


# --- Model ----------------------------------------------------------------------------------------


# Copied from ddpm.timestep_embedding
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (Vaswani et al. Sec. 3.5) in ADM's order [cos(t w_i), sin(t w_i)],
    w_i = max_period^(-i / (dim/2)), and a zero column for an odd dim. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                       # (B, 1) * (1, half)
    return F.pad(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1), (0, dim % 2))


# Copied from ddpm.norm_groups
def norm_groups(channels):
    """ADM's GroupNorm(32), but at least 4 channels per group (at a CPU-sized width of 32, one
    channel per group would erase the mean colour of flat regions); else the largest divisor."""
    return max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))


# Copied from ddpm.GroupNormAct
class GroupNormAct(nn.GroupNorm):
    """act(GN(x) (1 + scale) + shift), fused by kernels.group_norm_act; statistics in fp32."""

    def __init__(self, channels, act="silu"):
        super().__init__(norm_groups(channels), channels)
        self.act = act

    def forward(self, x, scale=None, shift=None):
        return kernels.group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps,
                                      scale=scale, shift=shift, act=self.act)


# Copied from ddpm.zero_module
def zero_module(module):
    """Zero-initialise a layer so that its residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# Copied from ddpm.ResBlock
class ResBlock(nn.Module):
    """Residual block with adaptive group norm (Dhariwal & Nichol Sec. 3):
    h = conv(SiLU(GN(x))); h = conv(dropout(SiLU(GN(h) (1 + scale) + shift))); out = skip(x) + h,
    with (scale, shift) = Linear(SiLU(emb)), emb carrying the timestep (and class)."""

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
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output
    projection; softmax(q k^T / sqrt(d)) v runs through kernels.attention (flash attention)."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNormAct(channels, act=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))                                # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)              # 3 x (B, heads, N, d)
        out = kernels.attention(q, k, v).transpose(2, 3)            # (B, heads, d, N)
        return x + self.proj(out.reshape(b, c, h, w))               # (B, C, H, W)


# Copied from ddpm.UNet
class UNet(nn.Module):
    """The network of Ho et al. in ADM's form, out_theta(x_t, t, y, emb). Per encoder level
    `num_res_blocks` ResBlocks (+ attention where the shorter side is in
    `attention_resolutions`) and a stride-2 convolution; middle: ResBlock, attention,
    ResBlock; per decoder level one more ResBlock, each fed one stored encoder activation,
    then nearest upsampling and a 3x3 conv; out: GN, SiLU, a zero-initialised conv (the
    untrained network outputs 0). Every ResBlock's scale/shift comes from MLP(sinusoid(t)) +
    class_emb(y) + `emb` (B, 4 * base_channels), the door for a method's own conditioning.
    Label `num_classes` is guidance's null label (no y)."""

    def __init__(self, in_channels=3, out_channels=3, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=1, attention_resolutions=(8,), num_heads=4, dropout=0.0,
                 image_size=(32, 32), num_classes=0):
        super().__init__()
        self.base_channels, self.num_classes = base_channels, num_classes
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def level(in_ch, out_ch, side):
            attend = [AttentionBlock(out_ch, num_heads)] if side in attention_resolutions else []
            return nn.ModuleList([ResBlock(in_ch, out_ch, emb_dim, dropout), *attend])

        widths = [int(base_channels * m) for m in channel_mults]
        side, ch = min(image_size), base_channels
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, self.up, skips = nn.ModuleList(), nn.ModuleList(), [ch]
        for i, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(level(ch, width, side))
                ch = width
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                side //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout),
                                  AttentionBlock(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(level(ch + skips.pop(), width, side))
                ch = width
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2.0, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                side *= 2
        self.out = nn.Sequential(GroupNormAct(ch),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def embed(self, t, y=None, emb=None):
        """The conditioning vector of every ResBlock: (B,) -> (B, 4 * base_channels)."""
        h = self.time_mlp(timestep_embedding(t, self.base_channels))
        if self.class_emb is not None:
            h = h + self.class_emb(torch.full_like(t, self.num_classes, dtype=torch.long)
                                   if y is None else y)
        return h if emb is None else h + emb

    def forward(self, x, t, y=None, emb=None):
        emb, h = self.embed(t, y, emb), self.input_conv(x)
        skips = [h]
        for blocks in self.down:
            h = self.run(blocks, h, emb)
            skips.append(h)
        h = self.run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):                     # not the upsampling
                h = torch.cat([h, skips.pop()], dim=1)              # (B, C + C_skip, H, W)
            h = self.run(blocks, h, emb)
        return self.out(h)

    @staticmethod
    def run(blocks, h, emb):
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h


def patchify(x, patch_size):
    """Space-to-depth (paper Sec. 3, the original's `to_patches`): every P x P patch becomes one
    grid cell with 3 P^2 channels, ordered (patch row, patch column, colour) as in the original
    (einops `b c (h p1) (w p2) -> b (p1 p2 c) h w`): channel (p1 P + p2) C + c of cell (i, j) is
    pixel (i P + p1, j P + p2) of colour c. F.pixel_unshuffle orders the channels (c, p1, p2)
    instead; that would matter only when porting the original's weights."""
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
    """The original's fixed 2-D sinusoidal position encoding (`get_2d_positional_encoding`),
    added after the input convolution. With c = channels / 2, k = 0..c-1,
        f_k = exp(-ln(10^4) k / (c - 1)),   omega = 64 / side,
        PE[k, i, j] = sin(omega f_k j)   (x: the column j),
        PE[c + k, i, j] = sin(omega f_k i)   (y: the row i).
    Sines only, as in the original; omega stretches the wavelengths so that a 64-cell grid sees
    the frequencies of a Transformer's encoding. The original has square grids only; on another
    grid, side = the shorter side for both axes, so one cell is the same step along x and y.
    Returns (channels, height, width) in float32."""
    half = channels // 2
    omega = 64 / min(height, width)
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, device=device) / (half - 1)) * omega
    x = torch.sin(torch.arange(width, device=device)[None] * freqs[:, None])    # (c, W)
    y = torch.sin(torch.arange(height, device=device)[None] * freqs[:, None])   # (c, H)
    return torch.cat([x[:, None, :].expand(half, height, width),               # (c, H, W)
                      y[:, :, None].expand(half, height, width)])              # (2c, H, W)


class PatchInputConv(nn.Conv2d):
    """The input layer on the grid (the original's `in_proj` + `positional_emb`): a 3x3
    convolution from 3 P^2 channels to the base width (not a per-patch linear layer as in a ViT),
    plus the fixed position encoding. It has UNet.input_conv's parameter names, so with P = 1 the
    state dicts of PatchifyUNet and ddpm.py's UNet are interchangeable."""

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        h = super().forward(x)                                      # (B, C, H/P, W/P)
        position = position_encoding_2d(h.shape[2], h.shape[3], h.shape[1], h.device)
        return h + position.to(h.dtype)                             # broadcast over B


class PatchifyUNet(UNet):
    """out_theta(x_t, t, y) of the paper (Sec. 3): patchify, ddpm.py's U-Net on the (H/P) x (W/P)
    grid (`grid_size`) with 3 P^2 input and output channels, unpatchify. The U-Net's first and
    last layers are the paper's: a 3x3 convolution to the base width (plus the position encoding:
    PatchInputConv), and GroupNorm, SiLU and a zero-initialised 3x3 convolution."""

    def __init__(self, patch_size, channels, base_channels, channel_mults, num_res_blocks,
                 attention_resolutions, num_heads, dropout, grid_size, num_classes):
        k = channels * patch_size ** 2
        super().__init__(k, k, base_channels, channel_mults, num_res_blocks, attention_resolutions,
                         num_heads, dropout, grid_size, num_classes)
        self.patch_size = patch_size
        self.input_conv = PatchInputConv(k, base_channels)

    def forward(self, x, t, y=None, emb=None):
        h = patchify(x, self.patch_size)                # (B, 3, H, W) -> (B, 3P^2, H/P, W/P)
        h = super().forward(h, t, y, emb)               # (B, 3P^2, H/P, W/P)
        return unpatchify(h, self.patch_size)           # -> (B, 3, H, W)


def unet_input_size(args):
    """The (height, width) the U-Net runs on: the patch grid (H/P, W/P)."""
    (h, w), p = args.image_size, args.patch_size
    if h % p or w % p:
        raise UserError(f"--image_size {h}x{w} is not divisible by --patch_size {p}; use a "
                        f"multiple of {p} (times the U-Net's downsampling factor)")
    if args.base_channels % 2:
        raise UserError(f"--base_channels {args.base_channels} must be even (the position "
                        f"encoding has halves for x and y)")
    return h // p, w // p


def build_model(args):
    """The patched U-Net of a checked configuration (`args.num_classes` comes from the dataset)."""
    return PatchifyUNet(args.patch_size, 3, args.base_channels, args.channel_mults,
                        args.num_res_blocks, args.attention_resolutions, args.num_heads,
                        args.dropout, unet_input_size(args), args.num_classes)


# --- Diffusion math -------------------------------------------------------------------------------


# Copied from ddpm.make_beta_schedule
def make_beta_schedule(kind, timesteps, beta_end=0.02):
    """beta_1..beta_T in float64. linear (Ho et al. Sec. 4): 1e-4 to `beta_end` at T = 1000, both
    scaled by 1000 / T (Nichol & Dhariwal's code). Else beta_t = 1 - alpha_bar(t) / alpha_bar(t-1)
    clipped at 0.999, with cosine (Nichol & Dhariwal Eq. 17) alpha_bar(t) = f(t) / f(0), f(t) =
    cos^2((t/T + s) / (1 + s) pi/2), s = 0.008, or sigmoid (Jabri et al.; start -3, end 3, tau 1)
    alpha_bar(t) = (sig(3) - sig(6 t/T - 3)) / (sig(3) - sig(-3))."""
    if kind == "linear":
        scale = 1000 / timesteps
        if not 0 < scale * beta_end < 1:
            raise UserError(f"the linear schedule's last beta, {beta_end:g} x 1000 / --timesteps "
                            f"{timesteps} = {scale * beta_end:g}, must be in (0, 1)")
        return torch.linspace(scale * 1e-4, scale * beta_end, timesteps, dtype=torch.float64)
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = (torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2 if kind == "cosine"
         else 1 / (1 + math.exp(-3)) - torch.sigmoid(6 * steps - 3))
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)                    # f[0] cancels in the ratio


# Copied from ddpm.at
def at(buffer, t, x):
    """buffer[t] shaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
    return buffer[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# Copied from ddpm.GaussianDiffusion
class GaussianDiffusion(nn.Module):
    """q(x_t | x_0) and the reverse steps, from the betas in float64, kept as float32 buffers.
    Index t is the paper's step t + 1. A respaced process has betas over a subset of the steps
    and a `timestep_map` back to them (what the network is conditioned on). `prediction`: eps,
    x0 or v. Each is trained on its own target, whose squared error is the x0 one times SNR (eps),
    1 (x0) or SNR + 1 (v), SNR = alpha_bar / (1 - alpha_bar); min_snr_gamma > 0 (Hang et al. Eq.
    11) multiplies by `loss_weight` = min(SNR, gamma) / that weight. `variance`: the ancestral
    sigma_t^2, small beta~_t or large beta_t (Ho et al. Sec. 3.2)."""

    def __init__(self, betas, prediction="eps", loss="mse", variance="small", timestep_map=None,
                 min_snr_gamma=0.0):
        super().__init__()
        betas = betas.double()
        alpha_bar = torch.cumprod(1 - betas, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        sigma2 = betas * (1 - alpha_bar_prev) / (1 - alpha_bar) if variance == "small" else betas
        snr = alpha_bar / (1 - alpha_bar)
        implied = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction]
        buffers = {
            "betas": betas, "alpha_bar": alpha_bar, "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(), "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            # No noise in the last step (index 0); improved-diffusion's "fixed large" variance
            # puts index 1's beta~ there, which it never draws either.
            "sigma": torch.cat([sigma2.new_zeros(1), sigma2[1:]]).sqrt(),
            "coef_x0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),           # Eq. 7
            "coef_xt": (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar),
            "loss_weight": snr.clamp(max=min_snr_gamma) / implied if min_snr_gamma > 0
            else torch.ones_like(snr),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.register_buffer("timestep_map", torch.arange(len(betas)) if timestep_map is None
                             else timestep_map.long(), persistent=False)
        self.num_timesteps, self.alpha_bar_f64 = len(betas), alpha_bar
        self.options = dict(prediction=prediction, loss=loss, variance=variance,
                            min_snr_gamma=min_snr_gamma)
        self.prediction, self.loss = prediction, loss

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (Ho et al. Eq. 4)."""
        a, b = at(self.sqrt_alpha_bar, t, x0), at(self.sqrt_one_minus_alpha_bar, t, x0)
        return a * x0 + b * noise

    def target(self, x0, noise, t):
        """What the network learns to output: eps, x0, or v = sqrt(alpha_bar) eps -
        sqrt(1 - alpha_bar) x0 (Salimans & Ho Sec. 4)."""
        if self.prediction != "v":
            return noise if self.prediction == "eps" else x0
        a, b = at(self.sqrt_alpha_bar, t, x0), at(self.sqrt_one_minus_alpha_bar, t, x0)
        return a * noise - b * x0

    def x0_and_eps(self, x_t, t, out):
        """The network's output -> (x0_hat, eps_hat), by Eq. 4 and the definition of v."""
        a, b = at(self.sqrt_alpha_bar, t, x_t), at(self.sqrt_one_minus_alpha_bar, t, x_t)
        if self.prediction == "eps":
            return (x_t - b * out) / a, out
        if self.prediction == "x0":
            return out, (x_t - a * out) / b
        return a * x_t - b * out, b * x_t + a * out                 # v

    def error(self, out, target):
        """The elementwise training error: squared (Ho et al. Eq. 14), absolute or Huber."""
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}[self.loss]
        return fn(out, target, reduction="none")

    def training_losses(self, model, x0, y=None):
        """L_simple (Ho et al. Eq. 14, Alg. 1): t ~ U{0..T-1} (0 too: the last step must be
        learned), eps ~ N(0, I), loss_weight(t) times the error of out_theta(x_t, t, y) on its
        target, averaged. Returns the loss as a list of terms (functions) that add up to it: here
        one; a method may split it into chunks that micro_batch_step backpropagates in turn."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t, target = self.q_sample(x0, t, noise), self.target(x0, noise, t)

        def loss():
            out = model(x_t, self.timestep_map[t], y).float()
            return (at(self.loss_weight, t, x0) * self.error(out, target)).mean()
        return [loss]

    def ddpm_step(self, x_t, out, t, noise):
        """Ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2): mu~(x0_hat, x_t) + sigma_t z,
        mu~ = coef_x0 x0_hat + coef_xt x_t (Eq. 7), x0_hat clipped to [-1, 1]."""
        x0 = self.x0_and_eps(x_t, t, out)[0].clamp(-1, 1)
        mean = at(self.coef_x0, t, x_t) * x0 + at(self.coef_xt, t, x_t) * x_t
        return mean + at(self.sigma, t, x_t) * noise

    def ddim_step(self, x_t, out, t, noise, eta=0.0):
        """DDIM (Song et al. Eq. 12) from index t to t - 1, a = alpha_bar:
            x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps_hat + s z,
            s = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)      (Eq. 16),
        x0_hat clipped to [-1, 1] and eps_hat recomputed from it. eta = 1: ancestral, small
        variance."""
        a, a_prev = at(self.alpha_bar, t, x_t), at(self.alpha_bar_prev, t, x_t)
        x0 = self.x0_and_eps(x_t, t, out)[0].clamp(-1, 1)
        b = at(self.sqrt_one_minus_alpha_bar, t, x_t)
        eps = (x_t - at(self.sqrt_alpha_bar, t, x_t) * x0) / b
        s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - s ** 2).clamp(min=0).sqrt() * eps
        return x_prev + s * noise if eta > 0 else x_prev

    def respace(self, steps):
        """The process over `steps` evenly spaced indices (Nichol & Dhariwal Sec. 4): alpha_bar
        kept there, beta_k = 1 - alpha_bar_k / alpha_bar_{k-1}."""
        use = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()
        use = torch.unique(use)                                     # indices of this process
        alpha_bar = self.alpha_bar_f64[use]
        betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        return GaussianDiffusion(betas, timestep_map=self.timestep_map.cpu()[use],
                                 **self.options).to(self.betas.device)


class PatchifyDiffusion(GaussianDiffusion):
    """ddpm.py's process, trained with the paper's loss (Sec. 3; the original trainer's L_simple):
        L = w(t) || x0 - x0_hat(x_t, t, y) ||^2,   w(t) = sqrt(SNR_t), SNR_t = a_t / (1 - a_t),
    a = alpha_bar, averaged over pixels and batch (`loss_weight` snr and none are the other w;
    min_snr_gamma > 0 clips w at gamma, which with snr is Hang et al.'s min-SNR-gamma).
    x0_hat is the output (prediction x0, the paper) or comes from eps or v by x0_and_eps. For
    eps, x0 - x0_hat = (eps_hat - eps) / sqrt(SNR_t), so w = SNR is ddpm.py's L_simple.
    Sampling is ddpm.py's (guidance is affine in the output for every prediction); the last
    ancestral step (index 0) returns x0_hat, as the paper's sampler does: coef_x0 = 1,
    coef_xt = 0 and sigma = 0 there. A respaced process is a plain GaussianDiffusion."""

    def __init__(self, betas, prediction="x0", loss="mse", variance="small",
                 loss_weight="sqrt_snr", min_snr_gamma=0.0):
        super().__init__(betas, prediction, loss, variance)
        snr = self.alpha_bar_f64 / (1 - self.alpha_bar_f64)
        weight = {"sqrt_snr": snr.sqrt(), "snr": snr, "none": torch.ones_like(snr)}[loss_weight]
        weight = weight.clamp(max=min_snr_gamma) if min_snr_gamma > 0 else weight
        self.register_buffer("weight", weight.float(), persistent=False)

    def training_losses(self, model, x0, y=None):
        """The paper's loss as one term (GaussianDiffusion.training_losses), t in 0..T-1."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.q_sample(x0, t, torch.randn_like(x0))

        def loss():
            x0_hat = self.x0_and_eps(x_t, t, model(x_t, self.timestep_map[t], y).float())[0]
            return (at(self.weight, t, x0) * self.error(x0_hat, x0)).mean()
        return [loss]


def build_diffusion(args):
    """The diffusion process of a checked configuration (the counterpart of build_model)."""
    betas = make_beta_schedule(args.schedule, args.timesteps, args.beta_end)
    return PatchifyDiffusion(betas, args.prediction, args.loss, args.variance, args.loss_weight,
                             args.min_snr_gamma)


# --- Sampling -------------------------------------------------------------------------------------


# Copied from ddpm.guided_output
def guided_output(model, x, t, y, guidance_scale):
    """Classifier-free guidance (Ho & Salimans Eq. 6, s = 1 + w): out_u + s (out_c - out_u), for
    eps, x0 and v alike (affine in each other). s = 1 is one conditional pass."""
    if y is None or guidance_scale == 1.0:
        return model(x, t, y).float()
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()
    out_c, out_u = out.chunk(2)                                     # (2B, ...) -> 2 x (B, ...)
    return out_u + guidance_scale * (out_c - out_u)


# Copied from ddpm.per_image_noise
def per_image_noise(shape, seeds, device):
    """A function drawing noise of `shape` (B, ...), image i's from a generator seeded by
    seeds[i]: an image's noise does not depend on its batch (as in EDM)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return lambda: torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


# Copied from ddpm.SAMPLERS
SAMPLERS = {"ddim": "DDIM (Song et al.)", "ddpm": "ancestral (Ho et al. Alg. 2)"}


# Copied from ddpm.sample
@torch.no_grad()
def sample(model, diffusion, shape, seeds, sampler="ddim", steps=50, eta=0.0, y=None,
           guidance_scale=1.0, trajectory=None, progress=False):
    """x_T ~ N(0, I), then `steps` DDPM or DDIM steps of the respaced process to x_0 in [-1, 1].
    `trajectory` (a list) receives x_t about 25 times along the way."""
    device = diffusion.betas.device
    process = diffusion if steps == diffusion.num_timesteps else diffusion.respace(steps)
    noise = per_image_noise(shape, seeds, device)
    x, every = noise(), max(1, process.num_timesteps // 25)
    for k in tqdm(range(process.num_timesteps - 1, -1, -1), "sampling", leave=False,
                  disable=not progress):
        t = torch.full((shape[0],), k, device=device, dtype=torch.long)
        out = guided_output(model, x, process.timestep_map[t], y, guidance_scale)
        x = (process.ddpm_step(x, out, t, noise()) if sampler == "ddpm"
             else process.ddim_step(x, out, t, noise() if eta > 0 else None, eta))
        if trajectory is not None and k % every == 0:
            trajectory.append(x.clamp(-1, 1).cpu())
    return x.clamp(-1, 1)


# Copied from ddpm.generate
def generate(model, diffusion, args, num, steps, seed, trajectory=None, progress=False):
    """`num` images in batches of --batch_size; image i has noise seed (seed, i) and class
    --class_label or i mod num_classes, whatever the batch size. -> uint8 (num, 3, H, W)."""
    device, images = next(model.parameters()).device, []
    for start in tqdm(range(0, num, args.batch_size), "batches", disable=not progress):
        index = torch.arange(start, min(start + args.batch_size, num), device=device)
        y = (None if not args.num_classes else index % args.num_classes
             if args.class_label is None else torch.full_like(index, args.class_label))
        out = sample(model, diffusion, (len(index), 3, *args.image_size),
                     [seed * 1_000_003 + i for i in index.tolist()], args.sampler, steps,
                     args.eta, y, args.guidance_scale, trajectory if start == 0 else None, progress)
        images.append(to_uint8(out).cpu())
    return torch.cat(images)


# Copied from ddpm.check_labels
def check_labels(args):
    """--class_label and --guidance_scale need classes, once the number of classes is known."""
    if args.num_classes == 0 and (args.class_label is not None or args.guidance_scale != 1.0):
        raise UserError("--class_label and --guidance_scale need a model trained with "
                        "--class_conditional")
    if args.class_label is not None and not 0 <= args.class_label < args.num_classes:
        raise UserError(f"--class_label {args.class_label} is not in 0..{args.num_classes - 1}")


# Copied from ddpm.sample_main
def sample_main(args, ckpt):
    """--sample: 00000.png, ... and grid.png (and trajectory.gif) in --output_dir."""
    check_labels(args)
    if args.weights == "swa" and ckpt["swa"] is None:
        raise UserError(f"{args.checkpoint} has no SWA weights (train with --swa)")
    kernels.set_backend(args.kernels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    if args.weights == "swa":                                       # saved as an AveragedModel
        model = AveragedModel(model)
    model.load_state_dict({"ema": ckpt["ema"]["shadow"], "model": ckpt["model"],
                           "swa": ckpt["swa"]}[args.weights])
    model, trajectory = getattr(model, "module", model), [] if args.save_gif else None
    images = generate(model.to(device).eval(), build_diffusion(args).to(device), args,
                      args.num_samples, args.sampling_steps, args.seed, trajectory, progress=True)
    write_samples(images, trajectory, args.output_dir)
    return 0



# Copied from ddpm.write_samples
def write_samples(images, trajectory, output_dir):
    """uint8 (N, 3, H, W) -> 00000.png, ... and grid.png, and the trajectory (if any) as
    trajectory.gif, in `output_dir`; every file written to a temporary name, then renamed."""
    os.makedirs(output_dir, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image.numpy().transpose(1, 2, 0), os.path.join(output_dir, f"{i:05d}.png"))
    save_png(make_grid(images), os.path.join(output_dir, "grid.png"))
    if trajectory:
        frames = [Image.fromarray(make_grid(to_uint8(x)))           # the final image held 10x
                  for x in trajectory + trajectory[-1:] * 10]
        path = os.path.join(output_dir, "trajectory.gif")
        frames[0].save(f"{path}.tmp.gif", save_all=True, append_images=frames[1:], duration=60,
                       loop=0)
        os.replace(f"{path}.tmp.gif", path)
    print(f"wrote {len(images)} samples and grid.png to {output_dir}")

# --- Data -----------------------------------------------------------------------------------------

# Copied from ddpm.IMAGE_EXTENSIONS
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# Copied from ddpm.procedural_landscape
def procedural_landscape(index, height, width, seed=0):
    """A built-in image in continuous coordinates (any resolution, the same scene): sky, horizon,
    sun and ridges across the image (only a model that sees across patches keeps the ridges
    continuous at their borders), rock texture and ripples at the pixel scale. Label 0: day,
    1: dusk. -> (uint8 (3, H, W), label)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(2))
    y = (np.arange(height)[:, None] + 0.5) / height                # (H, 1), 0 at the top
    x = (np.arange(width)[None, :] + 0.5) / width                  # (1, W)
    sky_top, sky_low, sun_color, rock = np.array([                  # (day, dusk)[label]
        [[0.20, 0.45, 0.85], [0.70, 0.85, 0.98], [1.0, 0.97, 0.80], [0.30, 0.38, 0.30]],
        [[0.18, 0.12, 0.35], [0.98, 0.55, 0.25], [1.0, 0.75, 0.35], [0.22, 0.15, 0.22]]])[label]
    horizon = rng.uniform(0.55, 0.75)
    t = np.clip(y / horizon, 0, 1)[..., None]                       # (H, 1, 1)
    image = sky_top * (1 - t) + sky_low * t + 0 * x[..., None]      # (H, W, 3)
    sx, sy, sr = rng.uniform(0.15, 0.85), rng.uniform(0.12, horizon - 0.15), rng.uniform(0.05, 0.1)
    d = np.sqrt(((x - sx) * width / height) ** 2 + (y - sy) ** 2)[..., None]
    image = image + 0.5 * np.exp(-((d / (2.5 * sr)) ** 2)) * (sun_color - image)   # glow
    image = np.where(d < sr, sun_color, image)                                      # sun
    for layer in range(3):                       # ridges: sums of sines; nearer is lower, darker
        ridge = horizon - 0.25 + 0.08 * layer + np.zeros_like(x)
        for octave in range(4):
            freq, phase = (2 ** octave) * rng.uniform(1.0, 2.0), rng.uniform(0, 6.3)
            ridge = ridge + 0.1 / (1.6 ** octave) * np.sin(2 * np.pi * freq * x + phase)
        texture = 0.06 * np.sin(2 * np.pi * (37 * x + 23 * y) + rng.uniform(0, 6.3)) \
            * np.sin(2 * np.pi * (29 * x - 41 * y))
        color = rock * (0.7 + 0.25 * layer) * (1 - 0.15 * (2 - layer)) + texture[..., None]
        image = np.where((y > ridge)[..., None], color, image)
    ripple = 0.05 * np.sin(2 * np.pi * 60 * y + 3 * np.sin(2 * np.pi * 5 * x))[..., None]
    water = 0.55 * (sky_top * 0.5 + sky_low * 0.5) + ripple + 0 * x[..., None]
    image = np.where((y > horizon)[..., None], water, image)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image.transpose(2, 0, 1), label                         # (H, W, 3) -> (3, H, W)


# Copied from ddpm.find_images
def find_images(root, class_conditional, warn=True):
    """Image files under `root` (recursive, sorted, links followed once; a folder that cannot be
    listed is skipped with a warning) and, when `class_conditional`, class indices from the
    top-level subfolder names."""
    paths, seen, unlisted = [], set(), []
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unlisted.append):
        if os.path.realpath(folder) in seen:                        # a link cycle
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        subfolders.sort()
        paths += [os.path.join(folder, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if unlisted and unlisted[0].filename == root:                  # the folder itself
        raise UserError(f"{root} cannot be listed ({unlisted[0].strerror})")
    if unlisted and warn:
        print(f"{METHOD}.py: warning: skipping {len(unlisted)} folder(s) that cannot be listed: "
              + ", ".join(f"{e.filename} ({e.strerror})" for e in unlisted), file=sys.stderr)
    if not paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if not class_conditional:
        return paths, None, []
    relative = [os.path.relpath(p, root).split(os.sep) for p in paths]
    at_top = [p for p, r in zip(paths, relative) if len(r) == 1]
    if at_top:
        raise UserError(f"--class_conditional needs every image in a class subfolder of {root}; "
                        f"{len(at_top)} are directly in it (e.g. {at_top[0]})")
    classes = sorted({r[0] for r in relative})
    return paths, [classes.index(r[0]) for r in relative], classes


# Copied from ddpm.to_rgb
def to_rgb(image):
    """Any PIL image -> 8-bit RGB. 16-bit and float grayscale are rescaled (PIL's convert clips
    them at 255); transparent pixels (alpha, or a PNG's transparent index or colour key) are
    composited over white (not the colour under them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        keyed = array == image.info.get("transparency", np.nan)    # a 16-bit PNG's colour key
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0                                   # 65535 -> 255
        elif image.mode == "F" and array.max() <= 1.0:
            array = array * 255.0                                   # 1.0 -> 255
        array = np.where(keyed, 255.0, array)
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


# Copied from ddpm.load_image
def load_image(path, height, width):
    """Decode, upright by EXIF, RGB, resize to cover H x W, centre-crop. -> (uint8 (3, H, W),
    upscaled?), or None if the file cannot be read."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: stored sideways
            image.draft("RGB", (height, width) if turned else (width, height))  # JPEG: 1/2..1/8
            image = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = image.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image).transpose(2, 0, 1), scale > 1         # (H, W, 3) -> (3, H, W)


# Copied from ddpm.build_cache
def build_cache(base, count, height, width, decode, num_workers):
    """Decode images 0..count-1 on a thread pool (PIL releases the GIL) into `base`.npy, uint8
    (N, 3, H, W), through a memory map: the dataset never has to fit in memory. decode(i) ->
    (image, extra) or None; the kept images are moved to the first rows, and `base`.json lists
    them with their extras. The array is renamed last: an interrupted build is never reused."""
    tmp = f"{base}.{os.uname().nodename}.{os.getpid()}.tmp.npy"     # one per builder, any node
    shape = (3, height, width)
    try:
        array = np.lib.format.open_memmap(tmp, "w+", np.uint8, (count, *shape))

        def work(i):
            result = decode(i)
            if result is not None:
                array[i] = result[0]                                # each thread its own rows
                return result[1]

        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            extras = list(pool.map(work, range(count)))
        kept = [i for i, e in enumerate(extras) if e is not None]
        if not kept:
            raise UserError(f"none of the {count} image files could be read")
        for j, i in enumerate(kept):                                # the kept images first
            array[j] = array[i]                                     # (j <= i); load_dataset
        array.flush()                                               # maps len(kept) rows
        with open(tmp + ".json", "w") as f:
            json.dump({"kept": kept, "extras": [extras[i] for i in kept]}, f)
        os.replace(tmp + ".json", base + ".json")
        os.replace(tmp, base + ".npy")
    finally:
        for leftover in (tmp, tmp + ".json"):
            if os.path.exists(leftover):
                os.remove(leftover)


# Copied from ddpm.load_dataset
def load_dataset(args, rank=0, log=print):
    """A read-only memory map uint8 (N, 3, H, W), labels (N,) or None, and the class names,
    decoded once into a --cache_dir file named by a hash of its sources (each file's path, size
    and mtime, or the built-in size and seed; the training size). A folder larger than memory
    trains through the page cache. One process per machine builds the file, the others wait (the
    renames are atomic). Old files stay: delete --cache_dir to reclaim the space."""
    (h, w), root = args.image_size, args.dataset_path
    if root is None:
        count, classes = args.procedural_size, ["day", "dusk"]
        source = ["procedural", count, args.seed]
        decode = functools.partial(procedural_landscape, height=h, width=w, seed=args.seed)
    else:
        paths, labels, classes = find_images(root, args.class_conditional, rank == 0)
        count, decode = len(paths), lambda i: load_image(paths[i], h, w)

        def signature(path):                                        # a dangling link: None,
            stat = os.stat(path) if os.path.exists(path) else None  # skipped as unreadable
            return [os.path.relpath(path, root), stat and stat.st_size, stat and stat.st_mtime_ns]
        source = [os.path.realpath(root), [signature(p) for p in paths]]
    key = hashlib.sha256(json.dumps([source, h, w]).encode()).hexdigest()
    name = os.path.basename(os.path.abspath(root or "procedural"))
    base = os.path.join(args.cache_dir, f"{name}-{h}x{w}-{key[:16]}")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.exists(base + ".npy"):
        log(f"decoding {count} images into {base}.npy (once; later runs reuse it)")
        try:
            os.makedirs(args.cache_dir, exist_ok=True)
            build_cache(base, count, h, w, decode, args.num_workers)
        except OSError as error:                                    # not writable, disk full
            raise UserError(f"--cache_dir {args.cache_dir}: {error.strerror or error}") from None
    while not os.path.exists(base + ".npy"):                        # another process builds it
        time.sleep(1)
    try:
        with open(base + ".json") as f:
            info = json.load(f)                                     # kept images and extras
    except (OSError, ValueError):
        raise UserError(f"the dataset cache {base}.json is missing or damaged: delete "
                        f"{base}.npy and run again") from None
    if root is None:
        labels = info["extras"]                                     # day / dusk
        log(f"dataset: {count} built-in procedural landscapes at {h}x{w}")
    else:
        bad = sorted(set(paths) - {paths[i] for i in info["kept"]})
        if bad and rank == 0:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            print(f"{METHOD}.py: warning: skipping {len(bad)} unreadable image file(s): "
                  f"{', '.join(bad[:5])}{more}", file=sys.stderr)
        labels = labels and [labels[i] for i in info["kept"]]
        log(f"dataset: {len(info['kept'])} images from {root}, {len(bad)} skipped, "
            f"{sum(info['extras'])} upscaled to {h}x{w}"
            + (f", classes: {', '.join(classes)}" if labels else ""))
    images = np.load(base + ".npy", mmap_mode="r")[:len(info["kept"])]
    return (images, torch.tensor(labels), classes) if args.class_conditional else (images, None, [])


# Copied from ddpm.batch_indices
def batch_indices(start, num_images, batch_size, seed, rank=0, world=1):
    """A rank's micro-batch: positions start + i world + rank (i < batch_size) of a stream whose
    epoch e is a permutation seeded by (seed, e). `start` counts the images all ranks drew before
    it, so a resumed run goes on where the stream stopped, whatever its batch size or processes."""
    positions = start + torch.arange(batch_size) * world + rank
    return torch.stack([epoch_order(num_images, seed, int(p) // num_images)[int(p) % num_images]
                        for p in positions])


# Copied from ddpm.epoch_order
@functools.lru_cache(maxsize=4)
def epoch_order(num_images, seed, epoch):
    """The order in which epoch `epoch` visits the images (kept for the epochs a batch spans)."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100_003
                                                                             + epoch))


# Copied from ddpm.make_batch
def make_batch(images, labels, indices, args, device):
    """uint8 (N, 3, H, W) -> x_0 in [-1, 1], flipped at random (--hflip), labels replaced by the
    null label with probability --label_dropout (Ho & Salimans Alg. 1); the global generator."""
    x = torch.from_numpy(images[indices.numpy()]).to(device).float() / 127.5 - 1.0
    if args.hflip:
        flip = (torch.rand(x.shape[0]) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)    # flip(3): mirror W
    if labels is None:
        return x, None
    drop = torch.rand(len(indices)) < args.label_dropout
    return x, torch.where(drop, args.num_classes, labels[indices]).to(device)


# Copied from ddpm.make_grid
def make_grid(images, padding=2):
    """uint8 (N, 3, H, W) -> one uint8 (H', W', 3) grid, as square as possible."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    grid = np.full((math.ceil(n / cols) * (h + padding) + padding, cols * (w + padding) + padding,
                    c), 255, dtype=np.uint8)
    for i, image in enumerate(images.cpu().numpy()):
        top, left = padding + i // cols * (h + padding), padding + i % cols * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)   # (3, h, w) -> (h, w, 3)
    return grid


# Copied from ddpm.to_uint8
def to_uint8(x):
    """[-1, 1] -> uint8, the inverse of make_batch's scaling."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


# Copied from ddpm.save_png
def save_png(array, path):
    """Write a uint8 (H, W, 3) array atomically (temporary file, then rename)."""
    Image.fromarray(array).save(f"{path}.tmp.png")
    os.replace(f"{path}.tmp.png", path)


# --- Training loop --------------------------------------------------------------------------------


# Copied from ddpm.TrainingDiverged
class TrainingDiverged(Exception):
    """Training keeps producing non-finite gradients: main() prints it and exits with status 1."""


# Copied from ddpm.EMA
class EMA:
    """Exponential moving average of the weights (Ho et al. Sec. 4): shadow <- decay shadow +
    (1 - decay) weights, after `start` steps of copying (early weights are poor). The update
    count is saved, so a resumed EMA continues where it was."""

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
        return {"num_updates": self.num_updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state):
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])


# Copied from ddpm.lr_lambda
def lr_lambda(run, args):
    """The LR factor of step `run.step`: linear warmup over --warmup_steps, then cosine decay to 0
    at --max_steps, or constant."""
    step, warmup = run.step, args.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.max_steps - warmup))
    return 1.0 if args.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * progress))


# Copied from ddpm.save_checkpoint
def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# Copied from ddpm.load_checkpoint
def load_checkpoint(path):
    """Load and validate a checkpoint of this script (weights_only: no code runs)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:                                      # truncated, not a zip, ...
        raise UserError(f"{path} cannot be read as a checkpoint ({type(error).__name__})") from None
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository")
    if (ckpt["method"], ckpt.get("format_version")) != (METHOD, FORMAT_VERSION):
        raise UserError(f"{path} is a {ckpt['method']}.py checkpoint of format "
                        f"{ckpt.get('format_version')}; {METHOD}.py reads its format "
                        f"{FORMAT_VERSION}")
    return ckpt


# The flags that shape the network or the diffusion process: a resumed run must agree on them.
ARCHITECTURE_KEYS = ("image_size", "base_channels", "channel_mults", "num_res_blocks",
                     "attention_resolutions", "num_heads", "num_classes", "schedule", "timesteps",
                     "prediction", "class_conditional", "patch_size", "beta_end")


# Copied from ddpm.check_compatible
def check_compatible(ckpt_args, args, path, keys=ARCHITECTURE_KEYS):
    different = [f"--{k} {ckpt_args.get(k)} (checkpoint) vs {getattr(args, k)} (now)"
                 for k in keys if k in ckpt_args and ckpt_args[k] != getattr(args, k)]
    if different:
        raise UserError(f"{path} was trained with another configuration: " + "; ".join(different))


# Copied from ddpm.setup_distributed
def setup_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process. NCCL on
    GPUs, gloo on CPUs."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def adamw(args):
    """AdamW with betas (0.9, --adam_beta2): the original trains with (0.9, 0.99) on LSUN and
    (0.9, 0.98) on FFHQ, where ddpm.py keeps PyTorch's (0.9, 0.999)."""
    return functools.partial(torch.optim.AdamW, betas=(0.9, args.adam_beta2))


# Copied from ddpm.build_run with torch.optim.AdamW->adamw(args)
def build_run(args, ckpt, device, rank, world):
    """Everything a run trains: model (DDP-wrapped when world > 1), EMA, SWA, optimizer, LR
    schedule, GradScaler (fp16 only), autocast, diffusion, the step and the images seen (`nimg`),
    restored from `ckpt` when resuming."""
    torch.manual_seed(args.seed)                                    # the same weights everywhere
    raw = build_model(args).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    run = argparse.Namespace(raw=raw, ema=EMA(raw, args.ema_decay, args.ema_start), step=0,
                             nimg=0, swa=AveragedModel(raw) if args.swa else None, nonfinite=0,
                             skipped=0, diffusion=build_diffusion(args).to(device), device=device,
                             rank=rank, world=world, autocast=torch.autocast(
                                 device.type, dtype=dtype, enabled=dtype is not None))
    run.optimizer = adamw(args)(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda _: lr_lambda(run, args))
    run.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    # noise, t, flips, dropout: seeded per rank and from the step, so that a run resumed on
    # another number of processes (whose generators the checkpoint lacks) does not replay step 0
    seed = (args.seed + rank + 100_003 * (ckpt["step"] if ckpt is not None else 0)) % 2 ** 32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        if run.swa is not None and ckpt["swa"] is not None:
            run.swa.load_state_dict(ckpt["swa"])
        # load_state_dict restores the saved hyperparameters with the moments; the ones given
        # now are put back, so an explicit --lr or --weight_decay on resume takes effect.
        given = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["lr_scheduler"])
        run.step = run.scheduler.last_epoch = ckpt["step"]
        run.nimg = ckpt["nimg"]
        run.scheduler.base_lrs = [args.lr] * len(given)
        for group, hyperparameters in zip(run.optimizer.param_groups, given):
            group.update(hyperparameters, lr=args.lr * run.scheduler.lr_lambdas[0](run.step))
        if ckpt["scaler"] and run.scaler.is_enabled():
            run.scaler.load_state_dict(ckpt["scaler"])
        rngs = [ckpt["rng"], *ckpt.get("rng_other_ranks", [])]     # older: rank 0's only
        if len(rngs) == world:
            rng = rngs[rank]
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32),
                                 *rng["numpy"][2:]))
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    run.model = raw if world == 1 else DistributedDataParallel(
        raw, device_ids=[device.index] if device.type == "cuda" else None)
    return run


# Copied from ddpm.micro_batch_step
def micro_batch_step(model, diffusion, x0, y, args, scaler, autocast, sync):
    """Forward and backward of one micro-batch's loss terms in turn; gradients accumulate. Under
    DDP only the last term with `sync` all-reduces (the forward runs in no_sync too: DDP decides
    at forward time). Returns the loss share."""
    terms, total = diffusion.training_losses(model, x0, y), 0.0
    for i, term in enumerate(terms):
        no_sync = isinstance(model, DistributedDataParallel) and not (sync and i == len(terms) - 1)
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast:
                loss = term() / args.accumulation_iters
            scaler.scale(loss).backward()
        total += loss.item()
    return total


# Copied from ddpm.train_step
def train_step(run, images, labels, args):
    """The forward and backward passes of one optimizer step: its micro-batches read the stream
    of batch_indices in turn from run.nimg, the images seen before the step. Returns the loss."""
    loss = 0.0
    for micro in range(args.accumulation_iters):
        start = run.nimg + micro * args.batch_size * run.world
        x0, y = make_batch(images, labels, batch_indices(start, len(images), args.batch_size,
                                                         args.seed, run.rank, run.world),
                           args, run.device)
        loss += micro_batch_step(run.model, run.diffusion, x0, y, args, run.scaler, run.autocast,
                                 sync=micro == args.accumulation_iters - 1)
    run.nimg += args.batch_size * args.accumulation_iters * run.world
    return loss


# Copied from ddpm.finished
def finished(run, args):
    """Training ends after --max_steps optimizer steps."""
    return run.step >= args.max_steps


# Copied from ddpm.optimizer_step
def optimizer_step(run, args):
    """Unscale, clip, step (skipped on a non-finite gradient), then the LR schedule, EMA and SWA.
    Returns the gradient norm and the learning rate this step used."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.grad_clip or math.inf)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        run.nonfinite = 0
        run.scaler.step(run.optimizer)
    else:              # gradients are all-reduced: every rank skips together; fp16's scaler
        run.nonfinite, run.skipped = run.nonfinite + 1, run.skipped + 1   # lowers its scale
        if run.nonfinite >= args.max_nonfinite_steps:
            raise TrainingDiverged(f"{run.nonfinite} consecutive steps with non-finite gradients "
                                   f"at step {run.step}; lower --lr, or use --precision bf16/fp32")
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.optimizer.param_groups[0]["lr"]
    run.step += 1
    run.scheduler.step()                                            # lr_lambda reads run.step
    if finite:                                                      # a skipped step adds nothing
        run.ema.update(run.raw)
        if run.swa is not None and run.step > args.swa_start:
            run.swa.update_parameters(run.raw)
    return float(grad_norm), lr


# Copied from ddpm.save_run
def save_run(run, args):
    """checkpoints/step_<N>.pt and checkpoints/last.pt, with every generator of every rank (as
    tensors and lists, for weights_only loading). Every rank calls it; rank 0 writes."""
    name, keys, *rest = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    rngs = [rng] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)
    if run.rank != 0:
        return
    state = {"model": run.raw.state_dict(), "ema": run.ema.state_dict(),
             "swa": run.swa.state_dict() if run.swa is not None else None,
             "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
             "lr_scheduler": run.scheduler.state_dict(), "step": run.step, "nimg": run.nimg,
             "args": vars(args), "rng": rngs[0], "rng_other_ranks": rngs[1:], "method": METHOD,
             "format_version": FORMAT_VERSION}
    for name in (f"step_{run.step}.pt", "last.pt"):
        save_checkpoint(os.path.join(args.output_dir, "checkpoints", name), state)


# Copied from ddpm.Progress
class Progress:
    """Rank 0's tqdm bar (printed lines instead when the output is not a terminal), TensorBoard
    scalars every --log_every steps, and the preview grids. Images/s counts only training."""

    def __init__(self, args, run):
        self.args, self.writer = args, SummaryWriter(args.output_dir)
        self.bar = tqdm(total=args.max_steps, initial=run.step, desc=METHOD, disable=None)
        self.steps, self.loss, self.seconds, self.nimg = 0, 0.0, 0.0, run.nimg

    def update(self, run, loss, seconds, grad_norm, lr):
        a = self.args
        self.bar.update(1)
        self.steps, self.loss, self.seconds = self.steps + 1, self.loss + loss, \
            self.seconds + seconds
        if run.step % a.log_every and not finished(run, a):
            return
        ips, self.nimg = (run.nimg - self.nimg) / self.seconds, run.nimg
        memory = (torch.cuda.max_memory_allocated(run.device) / 2 ** 20 if run.device.type ==
                  "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB
        scalars = {"loss": self.loss / self.steps, "lr": lr, "grad_norm": grad_norm,
                   "images_per_sec": ips, "kimg": run.nimg / 1000, "peak_memory_mb": memory,
                   "nonfinite_steps": run.skipped}
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, run.step)
        line = f"loss {scalars['loss']:.4f} lr {lr:.2e} {ips:.1f} img/s"
        self.bar.set_postfix_str(line)
        if self.bar.disable:
            eta = self.seconds / self.steps * (self.bar.total - run.step) / 60
            print(f"step {run.step}/{self.bar.total} {line} ETA {eta:.1f} min", flush=True)
        self.steps, self.loss, self.seconds = 0, 0.0, 0.0

    def preview(self, run):
        """samples/step_<N>.png: --preview_samples images of the EMA weights in --preview_steps
        steps, on fixed seeds, so that grids are comparable from step to step."""
        a = self.args
        grid = make_grid(generate(run.ema.shadow, run.diffusion, a, a.preview_samples,
                                  a.preview_steps, a.seed, progress=not self.bar.disable))
        save_png(grid, os.path.join(a.output_dir, "samples", f"step_{run.step}.png"))
        self.writer.add_image("samples", grid, run.step, dataformats="HWC")


# Copied from ddpm.train
def train(args, ckpt=None):
    """The training loop: batches, micro-batch steps, optimizer steps, logs, previews, saves."""
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    kernels.set_backend(args.kernels)
    images, labels, classes = load_dataset(args, rank, log)
    args.num_classes = len(classes)
    check_labels(args)                                              # the previews use them
    if ckpt is not None:                                            # the folder's classes changed
        check_compatible(ckpt["args"], args, args.resume, ["num_classes"])
    if len(images) < args.batch_size * world:
        log(f"{METHOD}.py: warning: {len(images)} images for {args.batch_size * world} per "
            f"micro-batch: every batch repeats images", file=sys.stderr)
    run = build_run(args, ckpt, device, rank, world)
    if rank == 0:
        try:
            for folder in ("samples", "checkpoints"):
                os.makedirs(os.path.join(args.output_dir, folder), exist_ok=True)
        except OSError as error:                                    # a file, not writable
            raise UserError(f"--output_dir {args.output_dir}: {error.strerror}") from None
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        progress = Progress(args, run)
        log(f"{METHOD}: {sum(p.numel() for p in run.raw.parameters()) / 1e6:.2f}M parameters, "
            f"{world} process(es) on {device}, {args.batch_size * args.accumulation_iters * world}"
            f" images per step" + (f", resumed at step {run.step}" if ckpt else ""))
    run.model.train()
    while not finished(run, args):
        start = time.perf_counter()
        loss = train_step(run, images, labels, args)
        grad_norm, lr = optimizer_step(run, args)
        last = finished(run, args)
        if rank == 0:
            progress.update(run, loss, time.perf_counter() - start, grad_norm, lr)
            if run.step % args.sample_every == 0 or last:
                progress.preview(run)
        if run.step % args.save_every == 0 or last:
            save_run(run, args)
    if rank == 0:
        progress.bar.close()
        progress.writer.close()
        log(f"done: {run.step} steps, checkpoints in {args.output_dir}/checkpoints"
            + (f", {run.skipped} steps skipped for non-finite gradients" if run.skipped else ""))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


# --- Configuration and CLI ------------------------------------------------------------------------

# `--preset paper`: the original's configs.py, for all its rows: T = 1000, linear betas, x0 with
# sqrt(SNR) weighting, attention at grid sides 16 and 8 (8 heads: the original's 64 channels per
# head at width 512; P = 8's 384-wide level gets 8 of 48, not 6 of 64: the U-Net has one count),
# Adam lr 1e-4 after 5k warmup steps, no decay, EMA 0.99 every 100 steps (here 0.99 ** (1 / 100)
# every step), 250 ancestral sampling steps, no flips. grad_clip 0: the original does not clip,
# and with the sqrt(SNR) weight (up to 100 at t = 0) clipping silently reweights the timesteps.
PRESETS = {
    "quick": {},
    "paper": dict(image_size="256", hflip=False, patch_size=4, attention_resolutions="16,8",
                  num_heads=8, dropout=0.0, schedule="linear", timesteps=1000, prediction="x0",
                  loss_weight="sqrt_snr", lr=1e-4, lr_schedule="constant", warmup_steps=5000,
                  grad_clip=0.0, ema_decay=0.99 ** (1 / 100), ema_start=0, save_every=10_000,
                  sample_every=10_000, sampler="ddpm", sampling_steps=250),
}

# The rest of it depends on (height, width, P): LSUN church at 256x256 with P = 2, 4, 8 and FFHQ
# at 1024x1024 with P = 4 (not the ImageNet models: two class-conditional experts).
PAPER_CONFIGS = {
    (256, 256, 2): dict(base_channels=128, channel_mults="1,2,2,4,4", num_res_blocks=2,
                        batch_size=128, max_steps=335_000, beta_end=0.02, adam_beta2=0.99),
    (256, 256, 4): dict(base_channels=256, channel_mults="1,1,2,2", num_res_blocks=2,
                        batch_size=256, max_steps=275_000, beta_end=0.02, adam_beta2=0.99),
    (256, 256, 8): dict(base_channels=256, channel_mults="1,1.5,2", num_res_blocks=3,
                        batch_size=512, max_steps=215_000, beta_end=0.02, adam_beta2=0.99),
    (1024, 1024, 4): dict(base_channels=128, channel_mults="1,2,2,4,4,4", num_res_blocks=2,
                          batch_size=32, max_steps=780_000, beta_end=0.025, adam_beta2=0.98),
}


# Copied from ddpm.paper_channel_mults
def paper_channel_mults(height, width):
    """Ho et al.: (1,2,2,2) at 32x32, (1,1,2,2,4,4) at 256x256; improved DDPM: (1,2,3,4) at 64x64,
    (1,1,2,3,4) at 128x128. Other sizes take the nearest smaller one."""
    side = min(height, width)
    return ([1, 1, 2, 2, 4, 4] if side >= 256 else [1, 1, 2, 3, 4] if side >= 128
            else [1, 2, 3, 4] if side >= 64 else [1, 2, 2, 2])


# Copied from ddpm.Parser
class Parser(argparse.ArgumentParser):
    """argparse that reports an error as one line and exit status 2 (through UserError)."""

    def error(self, message):
        raise UserError(message)


# Copied from ddpm.HelpFormatter
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in --help, but none for None: the flag's help says what happens then."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# Copied from ddpm.at_least
def at_least(low, kind=int, below=math.inf):
    """An argparse type: a number of `kind` in [low, below) (NaN is refused too)."""
    def number(text):
        if not low <= kind(text) < below:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {below}), got {text}")
        return kind(text)
    return number


# Copied from ddpm.numbers
def numbers(kind):
    """An argparse type: '1,2,2' -> [1, 2, 2] (whole numbers as int)."""
    def number_list(text):
        values = [kind(v) for v in text.split(",") if v.strip()]
        return [int(v) if float(v).is_integer() else v for v in values]
    return number_list


# Copied from ddpm.image_size
def image_size(text):
    """An argparse type: 'N' or 'HxW' -> [H, W]."""
    size = [int(v) for v in text.lower().split("x")]
    if len(size) > 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"must be N or HxW with positive sides, got {text}")
    return size * (3 - len(size))


# Copied from ddpm.add_flag
def add_flag(parser, groups, group, name, default=None, help="", **kw):
    """parser.add_argument in argument group `group`; a bool default makes --name and --no_name."""
    g = groups.get(group) or groups.setdefault(group, parser.add_argument_group(group))
    if isinstance(default, bool):
        g.add_argument(f"--{name}", action="store_true", default=default, help=help)
        return g.add_argument(f"--no_{name}", dest=name, action="store_false",
                              help=argparse.SUPPRESS)
    return g.add_argument(f"--{name}", default=default, help=help, **kw)


# Copied from ddpm.build_parser with build_parser->build_shared_parser
def build_shared_parser():
    """Every flag, its default (the quick preset) shown in --help. A preset, and a resumed run's
    configuration, are applied with set_defaults by parse_args."""
    p = Parser(prog=f"{METHOD}.py", formatter_class=HelpFormatter,
               description="Train on a folder of images (or the built-in landscapes), or sample "
               "a checkpoint with --sample. Explicit flags override --preset.")
    p.set_defaults(num_classes=0)
    add = functools.partial(add_flag, p, {})
    pos, nonneg, real = at_least(1), at_least(0), at_least(0.0, float)
    frac = at_least(0.0, float, 1.0)                                # a probability or decay

    add("mode", "preset", "quick", "quick: minutes on a 2-core CPU; paper: the published setup "
        "(with --resume or --sample the checkpoint's configuration replaces it)",
        choices=sorted(PRESETS))
    add("mode", "sample", False, "sample --checkpoint instead of training")
    add("mode", "checkpoint", help="checkpoint to sample (with --sample)")
    add("mode", "dry_run", False, "print the resolved configuration and exit")
    add("data", "dataset_path", help="image folder (recursive) (default: built-in landscapes)")
    add("data", "cache_dir", os.path.join("runs", "cache"), "where decoded datasets are kept")
    add("data", "image_size", "32", "training resolution, N or HxW", type=image_size)
    add("data", "class_conditional", False, "top-level subfolders are classes (built-in: 2)")
    add("data", "hflip", True, "random horizontal flips (--no_hflip: off)")
    add("data", "procedural_size", 4096, "number of built-in images", type=pos)
    add("data", "num_workers", 4, "threads that decode images into the cache", type=pos)
    add("model", "base_channels", 32, "width at level 0", type=pos)
    add("model", "channel_mults", "1,2,2", "width per level / base", type=numbers(float))
    add("model", "num_res_blocks", 1, "ResBlocks per level", type=pos)
    add("model", "attention_resolutions", "8", "sides with attention", type=numbers(int))
    add("model", "num_heads", 4, "attention heads", type=pos)
    add("model", "dropout", 0.0, "dropout in the ResBlocks", type=frac)
    add("model", "label_dropout", 0.1, "null-label probability in training", type=frac)
    add("diffusion", "schedule", "cosine", "beta schedule", choices=["linear", "cosine", "sigmoid"])
    add("diffusion", "timesteps", 1000, "diffusion steps T", type=at_least(2))
    add("diffusion", "prediction", "v", "network output (paper preset: its paper's)",
        choices=["eps", "x0", "v"])
    add("diffusion", "min_snr_gamma", 0.0, "min-SNR-gamma weighting (0: off)", type=real)
    add("diffusion", "loss", "mse", "elementwise error", choices=["mse", "l1", "huber"])
    add("diffusion", "variance", "small", "ancestral sigma_t^2: beta~_t (small) or beta_t",
        choices=["small", "large"])
    add("optimisation", "batch_size", 32, "images per micro-batch and process", type=pos)
    add("optimisation", "accumulation_iters", 1, "micro-batches per step", type=pos)
    add("optimisation", "max_steps", 1000, "optimizer steps", type=pos)
    add("optimisation", "lr", 1e-3, "peak AdamW learning rate", type=real)
    add("optimisation", "lr_schedule", "cosine", "after warmup", choices=["cosine", "constant"])
    add("optimisation", "warmup_steps", 100, "linear LR warmup steps", type=nonneg)
    add("optimisation", "weight_decay", 0.0, "AdamW weight decay", type=real)
    add("optimisation", "grad_clip", 1.0, "gradient norm clip (0: off)", type=real)
    add("optimisation", "precision", "fp32", "autocast dtype; fp16 adds a GradScaler",
        choices=["fp32", "bf16", "fp16"])
    add("optimisation", "ema_decay", 0.995, "EMA decay per step", type=frac)
    add("optimisation", "ema_start", 200, "steps the EMA copies before it averages", type=nonneg)
    add("optimisation", "swa", False, "also keep a stochastic weight average")
    add("optimisation", "swa_start", 800, "step from which --swa averages", type=nonneg)
    add("optimisation", "max_nonfinite_steps", 25, "non-finite steps in a row to stop", type=pos)
    add("run", "output_dir", help=f"default runs/{METHOD} (with --sample: runs/{METHOD}/generated)")
    add("run", "save_every", 400, "checkpoint every N steps", type=pos)
    add("run", "sample_every", 400, "preview grid every N steps", type=pos)
    add("run", "preview_samples", 16, "images in a preview grid", type=pos)
    add("run", "preview_steps", 50, "--sampler steps of a preview", type=pos)
    add("run", "log_every", 10, "log every N steps", type=pos)
    add("run", "seed", 0, "random seed", type=nonneg)
    add("run", "resume", help="'latest' (OUTPUT_DIR/checkpoints/last.pt) or a checkpoint path "
        "(default: a new run)")
    add("run", "kernels", "auto", "group norm and attention", choices=["auto", "triton", "torch"])
    add("sampling", "sampler", "ddim", "; ".join(f"{k}: {v}" for k, v in SAMPLERS.items()),
        choices=list(SAMPLERS))
    add("sampling", "sampling_steps", 50, "respaced steps of --sample", type=pos)
    add("sampling", "eta", 0.0, "DDIM noise: 0 deterministic, 1 ancestral", type=real)
    add("sampling", "guidance_scale", 1.0, "s in out_u + s (out_c - out_u)", type=float)
    add("sampling", "class_label", help="class to sample (default: cycle)", type=int)
    add("sampling", "num_samples", 16, "images --sample writes", type=pos)
    add("sampling", "weights", "ema", "weights --sample uses", choices=["ema", "model", "swa"])
    add("sampling", "save_gif", False, "with --sample: also write trajectory.gif")
    return p


def build_parser():
    """ddpm.py's flags and this method's. The quick defaults train at 256x256 with P = 8: the
    U-Net runs on a 32x32 grid at ddpm.py's quick widths (0.72 vs ddpm.py's 0.50 GFLOP per image:
    the convolutions from and to 3 P^2 = 192 channels)."""
    p = build_shared_parser()
    p.set_defaults(image_size="256", procedural_size=1024, schedule="linear", prediction="x0",
                   sampler="ddpm")
    g = p.add_argument_group("patches and objective (Luhman & Luhman 2022)")
    g.add_argument("--patch_size", type=int, choices=[1, 2, 4, 8], default=8,
                   help="patch side P: the U-Net and --attention_resolutions see an H/P x W/P grid")
    g.add_argument("--beta_end", type=float, default=0.02,
                   help="last beta of the linear schedule at T = 1000")
    g.add_argument("--loss_weight", choices=["sqrt_snr", "snr", "none"], default="sqrt_snr",
                   help="w(t) in w(t) ||x0 - x0_hat||^2")
    g.add_argument("--adam_beta2", type=at_least(0.0, float, 1.0), default=0.999,
                   help="AdamW's beta2 (beta1: 0.9)")
    return p


# Copied from ddpm.check_args
def check_args(args):
    """Fill in --channel_mults and --output_dir, and check all that can be before any work."""
    if args.channel_mults is None:
        args.channel_mults = paper_channel_mults(*args.image_size)
    widths = [args.base_channels * m for m in args.channel_mults]
    if not widths or any(not math.isfinite(w) or w != int(w) or w < 4 for w in widths):
        raise UserError(f"--base_channels x --channel_mults gives {widths} channels; every level "
                        f"needs a whole number of at least 4")
    (h, w), factor = unet_input_size(args), 2 ** (len(widths) - 1)
    if h % factor or w % factor:
        raise UserError(f"the U-Net's {h}x{w} input is not divisible by its downsampling factor "
                        f"{factor} (2^(levels-1)); use a multiple of {factor} or fewer levels")
    sides = [min(h, w) // 2 ** i for i in range(len(widths))]
    for c in [c for c, s in zip(widths, sides) if s in args.attention_resolutions] + widths[-1:]:
        if int(c) % args.num_heads:
            raise UserError(f"{int(c)} attention channels do not split into --num_heads "
                            f"{args.num_heads}; choose a divisor of {int(c)}")
    unused = [r for r in args.attention_resolutions if r not in sides]
    if unused and int(os.environ.get("RANK", 0)) == 0:
        print(f"{METHOD}.py: warning: --attention_resolutions {unused} match no level of the "
              f"U-Net (feature-map sides {sides})", file=sys.stderr)
    for key in ("sampling_steps", "preview_steps"):
        if getattr(args, key) > args.timesteps:
            raise UserError(f"--{key} {getattr(args, key)} exceeds --timesteps {args.timesteps}")
    build_diffusion(args)                                           # the schedule's own checks
    if args.dataset_path is not None and not os.path.isdir(args.dataset_path):
        raise UserError(f"--dataset_path {args.dataset_path} is not a folder")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", METHOD, *(["generated"] if args.sample else []))
    data = args.dataset_path and os.path.realpath(args.dataset_path)
    for key in ("cache_dir", "output_dir") if data else ():         # its files would be read
        if os.path.commonpath([data, os.path.realpath(getattr(args, key))]) == data:
            raise UserError(f"--{key} {getattr(args, key)} is inside --dataset_path {data}: "
                            "choose a folder outside it")
    return args


def parse_args(argv=None, base=None):
    """Command line -> checked configuration: the parser's defaults, then the preset, then `base`
    (a checkpoint's configuration), then the flags given, each overriding the one before."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**{**PRESETS.get(preset, {}), **(base or {})})
    if preset == "paper":                               # then the row of the size and P given
        first = parser.parse_args(argv)
        key = (*first.image_size, first.patch_size)
        if key not in PAPER_CONFIGS:
            raise UserError(f"--preset paper has rows for (H, W, P) in {list(PAPER_CONFIGS)}, not "
                            f"for {key}; for another size give the flags without the preset")
        parser.set_defaults(**{**PAPER_CONFIGS[key], **(base or {})})
    return check_args(parser.parse_args(argv))


# --- main() ---------------------------------------------------------------------------------------

# What --sample never takes from the training run in the checkpoint.
# Copied from ddpm.NOT_INHERITED
NOT_INHERITED = ("dataset_path", "output_dir", "resume", "seed", "weights", "save_gif",
                 "class_label", "sample", "checkpoint", "dry_run", "preset")


# Copied from ddpm.dry_run
def dry_run(args):
    """Print the configuration and the parameter count (and check the dataset folder)."""
    classes = find_images(args.dataset_path, args.class_conditional)[2] if args.dataset_path \
        else ["day", "dusk"]
    args.num_classes = len(classes) if args.class_conditional else 0
    print(json.dumps(vars(args), indent=2))
    print(f"parameters: {sum(p.numel() for p in build_model(args).parameters()):,}")
    return 0


# Copied from ddpm.main
def main(argv=None):
    try:
        mode = build_parser().parse_known_args(argv)[0]      # the configuration to start from
        if mode.sample and mode.checkpoint is None:
            raise UserError("--sample needs --checkpoint PATH")
        path = mode.checkpoint if mode.sample else mode.resume
        if path == "latest" and not mode.sample:
            path = os.path.join(mode.output_dir or os.path.join("runs", METHOD), "checkpoints",
                                "last.pt")
            if not os.path.isfile(path):
                raise UserError(f"--resume latest: no checkpoint at {path}; start without --resume")
        ckpt = None if path is None else load_checkpoint(path)   # its configuration; flags win
        ignore = NOT_INHERITED if mode.sample else ("resume", "dry_run", "preset")
        base = ckpt and {k: v for k, v in ckpt["args"].items() if k not in ignore}
        folder = path and os.path.dirname(os.path.abspath(path))
        if base and not mode.sample and os.path.basename(folder) == "checkpoints":
            base["output_dir"] = os.path.dirname(folder)    # the run's folder, wherever it is now
        args = parse_args(argv, base)
        if mode.sample:
            check_compatible(ckpt["args"], args, path)
            return sample_main(args, ckpt)
        if ckpt is not None:
            args.resume = path
            check_compatible(ckpt["args"], args, path,
                             [k for k in ARCHITECTURE_KEYS if k != "num_classes"])
        return dry_run(args) if args.dry_run else train(args, ckpt)
    except (UserError, TrainingDiverged) as error:
        print(f"{METHOD}.py: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UserError) else 1


if __name__ == "__main__":
    sys.exit(main())
