"""Patch-DM: images of any size from a U-Net that only ever sees patches, seamless by feature
collage.

Paper
    Ding, Zhang, Wu, Tu. "Patched Denoising Diffusion Models For High-Resolution Image Synthesis."
    ICLR 2024. https://arxiv.org/abs/2308.01316
    Built on DiffAE: Preechakul, Chatthee, Wizadwongsa, Suwajanakorn. "Diffusion Autoencoders:
    Toward a Meaningful and Decodable Representation." CVPR 2022. https://arxiv.org/abs/2111.15640
    Original code: github.com/mlpc-ucsd/Patch-DM (built on github.com/phizaz/diffae).
    Figures are numbered as in arXiv 2308.01316v1, whose Fig. 1 is a 1024 x 512 image from a
    148M-parameter model trained on 21k nature images, and whose Fig. 2 sets (a) independent
    patches (seams), (b) shifted windows collaged in pixel space and (c) feature collage side by
    side. Section and equation numbers are not cited: this file was written without the paper's
    full text at hand, from its abstract, figures and the original code.

What this file adds over ddpm.py
    An H x W image (multiples of the patch size p, --patch_size) is an N x M grid of patches.
    Zero-padded by p/2 on every side it is an (N + 1) x (M + 1) *padded grid*, whose patches
    straddle the image grid's borders. The U-Net's encoder runs on padded-grid patches; at the
    middle block's output and on every skip connection their features are put back together
    into the padded image's feature map, cropped by half a patch on every side and cut again:
    these are the features of the *image-grid* patches, each made of the four quarters of its
    padded-grid neighbours (feature collage, the paper's Fig. 2 (c)). The decoder runs on those.
    Every decoder patch thus sees its neighbours, and the image has no seams; no parameter is
    added. Patches know their place by a sinusoidal embedding of their row and column (index
    + 0.5 in the decoder), concatenated with the time embedding, and their image by a learned
    512-d *semantic code* per training image that scales every ResBlock's normalised features.
    Training takes one random 2 x 2 block of padded-grid patches per image: its centre is one
    image-grid patch (the collage loss), and the four patches decoded on their own features
    are a second, masked loss. After --max_steps of that, --latent_steps train an MLP diffusion
    model on the learned codes, so that sampling draws new ones (DiffAE's latent DDIM).
    Sampling at any multiple of p, larger than the training images too: every DDIM step runs
    the network on the padded grid, in windows of at most --patch_batch patches, which gives
    the one-batch result up to float rounding, with network activations that do not grow with
    the image (only the canvases do; the abstract claims less memory than full-image diffusion,
    and the original code's activations grow with the pixels).
    Own flags: --patch_size, --collage (--no_collage: Fig. 2 (a)'s independent patches), --cfg,
    --patch_batch, --code_from, --preview_size, --latent_steps, --latent_batch_size,
    --latent_lr, --latent_weight_decay, --latent_width, --latent_layers,
    --latent_sampling_steps.

Departures from the paper and the original code
    - The semantic codes start from the principal components of 16-pixel thumbnails of the
      training images (not whitened, scaled to a norm of sqrt(512)), not from CLIP image
      features (a download): see `thumbnail_codes`.
    - Each image of a batch draws its own 2 x 2 block; the original draws one for the whole
      batch, so that all images of a step train the same grid position (`draw_blocks`).
    - Sampling uses the EMA weights of the U-Net, its code table and the latent model; the
      original's test_step samples with the raw weights of both (`generate`).
    - --patch_batch bounds the patches per forward pass; the original runs every patch of the
      image in one batch, so its memory grows with the pixels (`denoise_step`).
    - The latent model learns codes normalised per dimension by the table's mean and standard
      deviation (DiffAE's latent_znormalize, which the original turns off), and learns the EMA
      table that the EMA U-Net was averaged with (the original: the raw table). Its last layer
      starts as eps_theta(z_t) = z_t, right at high noise, so that a short run learns it
      (DiffAE's starts at random); like DiffAE's, it takes the input code again.
    - x_t is made for the 2 x 2 block only, not for the whole padded image.
    - The quick preset predicts v on the cosine schedule (ddpm.py's quick choice); the paper
      preset has the paper's eps and linear schedule (`build_parser` says why).
    - The U-Net is ddpm.py's (ADM-style), as the original's DiffAE U-Net is, but it samples
      down by a strided convolution and up by nearest neighbours and a convolution, where the
      original uses ResBlocks (which there also take the code). The paper preset takes its
      configuration (base 64, multipliers 1,2,4,8, 2 encoder and 3 decoder ResBlocks per level,
      attention at 16, one head).
    - Not implemented: the trainable semantic encoder of the 256 x 256 configurations (the
      original's --semantic_enc); the nature, LHQ and FFHQ-1024 setting is the code table.

Commands
    python patch_dm.py                                      # quick CPU run on built-in landscapes
    python patch_dm.py --dataset_path DIR --preset paper    # one GPU, the nature 512 x 1024 setup
    torchrun --nproc_per_node=4 patch_dm.py --dataset_path DIR --preset paper --batch_size 24
    python patch_dm.py --sample --checkpoint runs/patch_dm/checkpoints/last.pt
    python patch_dm.py --sample --checkpoint CKPT --image_size 1024x2048 --patch_batch 64
    tensorboard --logdir runs/patch_dm

The method's own code
    CodeResBlock, CodeUNet: ddpm.py's ResBlock and U-Net with the semantic code in every block
    pad_to_grid, split_patches, merge_patches, feature_collage: the geometry of the two grids
    chunked, PatchUNet: position embedding, encoder on padded-grid patches, collage, decoder
    LatentMLP, PatchDM, unet_input_size, build_model: the latent model; both networks
    draw_blocks, PatchDiffusion, build_diffusion: the training step's blocks and two-term loss
    latent_diffusion, code_statistics: the diffusion over codes
    tiles, guided_noise, denoise_step, sample: DDIM on the padded grid in bounded windows
    sample_codes, generate, seam_score: codes from the latent model; images; the seam metric
    check_labels, sample_main: --sample with guidance, a training image's code, any size
    load_dataset, thumbnail_codes, build_run: the code table, sized by the data and initialised
    PhaseEMA, lr_lambda, start_latent_phase, train_step, finished, Progress: the two phases
    PRESETS, build_parser, REFUSED, check_args, dry_run: this method's flags and checks
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

METHOD = "patch_dm"
FORMAT_VERSION = 4                      # 3: the latent MLP's conditioning had `width` channels


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


CODE_DIM = 512                   # the semantic code's width: CLIP ViT-B/16's (the original's init)
POSITION_DIM = 64                # sinusoid width of a patch's row, and of its column


class CodeResBlock(ResBlock):
    """ddpm.ResBlock conditioned on [time, position] (2 x emb_dim) and on the image's semantic
    code z, multiplicatively, as DiffAE's ResBlock takes its style code:
        h = GN(h) (1 + s) + b,  then  h (1 + c),  c = Linear(SiLU(z)),  then SiLU, dropout, conv,
    with (s, b) from [time, position]. One fused group norm does both, with the scale and
    shift (1 + s)(1 + c) - 1 and b (1 + c). The code rides at the end of the conditioning
    vector, so that the U-Net hands it to every block as it hands over the time embedding."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout):
        super().__init__(in_channels, out_channels, 2 * emb_dim, dropout)
        self.code_proj = nn.Sequential(nn.SiLU(), nn.Linear(CODE_DIM, out_channels))

    def forward(self, x, emb):
        emb, z = emb[:, :-CODE_DIM], emb[:, -CODE_DIM:]            # (B, 2E + 512) -> (B, 2E), z
        h = self.conv1(self.norm1(x))
        scale, shift = self.emb_proj(emb).chunk(2, dim=1)          # (B, 2C) -> 2 x (B, C)
        c = self.code_proj(z)                                       # (B, C)
        h = self.conv2(self.dropout(self.norm2(h, scale + c + scale * c, shift * (1 + c))))
        return self.skip(x) + h


# Copied from ddpm.UNet with UNet->CodeUNet, ResBlock->CodeResBlock
class CodeUNet(nn.Module):
    """The network of Ho et al. in ADM's form, out_theta(x_t, t, y, emb). Per encoder level
    `num_res_blocks` CodeResBlocks (+ attention where the shorter side is in
    `attention_resolutions`) and a stride-2 convolution; middle: CodeResBlock, attention,
    CodeResBlock; per decoder level one more CodeResBlock, each fed one stored encoder activation,
    then nearest upsampling and a 3x3 conv; out: GN, SiLU, a zero-initialised conv (the
    untrained network outputs 0). Every CodeResBlock's scale/shift comes from MLP(sinusoid(t)) +
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
            return nn.ModuleList([CodeResBlock(in_ch, out_ch, emb_dim, dropout), *attend])

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
        self.mid = nn.ModuleList([CodeResBlock(ch, ch, emb_dim, dropout),
                                  AttentionBlock(ch, num_heads),
                                  CodeResBlock(ch, ch, emb_dim, dropout)])
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
        """The conditioning vector of every CodeResBlock: (B,) -> (B, 4 * base_channels)."""
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
            if isinstance(blocks[0], CodeResBlock):                     # not the upsampling
                h = torch.cat([h, skips.pop()], dim=1)              # (B, C + C_skip, H, W)
            h = self.run(blocks, h, emb)
        return self.out(h)

    @staticmethod
    def run(blocks, h, emb):
        for block in blocks:
            h = block(h, emb) if isinstance(block, CodeResBlock) else block(h)
        return h


def pad_to_grid(x, p):
    """Zero padding of p/2 on every side: an N x M grid of p x p patches becomes the (N + 1) x
    (M + 1) padded grid. (B, C, N p, M p) -> (B, C, (N + 1) p, (M + 1) p)."""
    return F.pad(x, (p // 2,) * 4)


def split_patches(x, p):
    """Cut into p x p patches, row-major. (B, C, N p, M p) -> (B N M, C, p, p)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)                      # (B, C, N, p, M, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)        # (B N M, C, p, p)


def merge_patches(patches, N, M):
    """The inverse of split_patches. (B N M, C, p, q) -> (B, C, N p, M q)."""
    _, c, p, q = patches.shape
    x = patches.reshape(-1, N, M, c, p, q).permute(0, 3, 1, 4, 2, 5)   # (B, C, N, p, M, q)
    return x.reshape(-1, c, N * p, M * q)                          # (B, C, N p, M q)


def feature_collage(h, grid_rows, grid_cols):
    """Feature collage (paper Fig. 2 (c)): the s x s features of a grid_rows x grid_cols padded
    grid, put back together, cropped by s/2 on every side and cut again, are the features of
    the (grid_rows - 1) x (grid_cols - 1) image-grid patches in between: each the four quarters
    of its padded-grid neighbours. Half a patch at every level of the U-Net, as p/2 pixels are
    half a patch in the image. (B R Q, C, s, s) -> (B (R - 1)(Q - 1), C, s, s)."""
    s = h.shape[-1]
    full = merge_patches(h, grid_rows, grid_cols)                   # (B, C, R s, Q s)
    inner = full[..., s // 2:full.shape[-2] - s // 2, s // 2:full.shape[-1] - s // 2]
    return split_patches(inner, s)             # (B, C, (R - 1) s, (Q - 1) s) -> (B (R-1)(Q-1), ...)


def chunked(fn, size, *inputs):
    """fn on slices of at most `size` rows (0: all) of every input, the results concatenated
    (fn returns a tensor or a list of tensors)."""
    n = inputs[0].shape[0]
    outs = [fn(*(x[i:i + (size or n)] for x in inputs)) for i in range(0, n, size or n)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return [torch.cat(parts) for parts in zip(*outs)]


class PatchUNet(CodeUNet):
    """The network of Patch-DM: CodeUNet on p x p patches, its encoder on padded-grid patches and
    its decoder on the image-grid patches that the collage makes of their features (or, with
    collage=False, on the padded-grid patches' own features: the paper's Fig. 2 (a)). A patch's
    conditioning is [MLP(sinusoid(t)), MLP([sinusoid(row), sinusoid(col)]), z]: its position is
    its padded-grid row and column, index + 0.5 in the decoder (the image-grid patches lie
    between them), and z its image's code from the table `codes`. Every operation but the
    collage acts on one patch (the convolutions zero-pad each patch, the group norms and the
    attention see one), so any split of the patches into batches gives the same result. The
    table trains with the network under one AdamW, as in the original, whose moments keep
    moving a code for some steps after its image has left the batch."""

    def __init__(self, base_channels, channel_mults, num_res_blocks, attention_resolutions,
                 num_heads, dropout, patch_size, num_images, collage=True):
        super().__init__(3, 3, base_channels, channel_mults, num_res_blocks,
                         attention_resolutions, num_heads, dropout, (patch_size, patch_size))
        emb_dim = 4 * base_channels
        self.position_mlp = nn.Sequential(nn.Linear(2 * POSITION_DIM, emb_dim), nn.SiLU(),
                                          nn.Linear(emb_dim, emb_dim))
        self.codes = nn.Embedding(num_images, CODE_DIM)
        self.patch_size, self.collage = patch_size, collage

    def embed(self, t, rows, cols, z, use_position):
        """Per patch: (P,) t, rows, cols, use_position (0 zeroes the sinusoids, as the original:
        the null position is the learned position_mlp(0)) and (P, 512) codes -> the
        conditioning (P, 8 base_channels + 512)."""
        time = self.time_mlp(timestep_embedding(t, self.base_channels))
        where = torch.cat([timestep_embedding(rows, POSITION_DIM),
                           timestep_embedding(cols, POSITION_DIM)], dim=1)    # (P, 128)
        return torch.cat([time, self.position_mlp(where * use_position[:, None]), z], dim=1)

    def encode(self, x, emb):
        """Patches -> [the input conv's and every encoder level's output (the skips), and the
        middle block's output], every feature the decoder takes."""
        h = self.input_conv(x)
        features = [h]
        for blocks in self.down:
            h = self.run(blocks, h, emb)
            features.append(h)
        return features + [self.run(self.mid, h, emb)]

    def decode(self, emb, *features):
        """The features of `encode` (of these patches) -> the patches' noise prediction."""
        skips, h = list(features[:-1]), features[-1]
        for blocks in self.up:
            if isinstance(blocks[0], CodeResBlock):                 # not the upsampling
                h = torch.cat([h, skips.pop()], dim=1)              # (P, C + C_skip, s, s)
            h = self.run(blocks, h, emb)
        return self.out(h)

    def forward(self, x, t, z, top, left, use_position, plain=False, chunk=0):
        """x (B, 3, R p, Q p): a window of R x Q padded-grid patches whose first is at grid row
        `top`, column `left` (B,) -> the prediction for the (R - 1) x (Q - 1) image-grid patches
        inside it, (B, 3, (R - 1) p, (Q - 1) p); with `plain` also the one of the padded-grid
        patches from their own features, (B, 3, R p, Q p). t, use_position (B,), z (B, 512).
        At most `chunk` patches go through the encoder or the decoder at once (0: all)."""
        p = self.patch_size
        R, Q = x.shape[2] // p, x.shape[3] // p
        each = lambda v, n: v.repeat_interleave(n, dim=0)          # (B, ...) -> (B n, ...)
        grid = torch.arange(R * Q, device=x.device)
        rows, cols = top[:, None] + grid // Q, left[:, None] + grid % Q    # (B, R Q)
        emb = self.embed(each(t, R * Q), rows.flatten(), cols.flatten(), each(z, R * Q),
                         each(use_position, R * Q))
        features = chunked(self.encode, chunk, split_patches(x, p), emb)   # (B R Q, C, s, s)
        if plain or not self.collage:
            own = chunked(self.decode, chunk, emb, *features)      # (B R Q, 3, p, p)
        if self.collage:
            inner = torch.arange((R - 1) * (Q - 1), device=x.device)
            rows = top[:, None] + inner // (Q - 1) + 0.5            # between the padded rows
            cols = left[:, None] + inner % (Q - 1) + 0.5
            n = (R - 1) * (Q - 1)
            emb = self.embed(each(t, n), rows.flatten(), cols.flatten(), each(z, n),
                             each(use_position, n))
            for i, f in enumerate(features):                        # one level at a time: the
                features[i] = feature_collage(f, R, Q)              # original is freed at once
            out = chunked(self.decode, chunk, emb, *features)       # (B (R-1)(Q-1), 3, p, p)
        else:                  # Fig. 2 (a): independent patches, their borders kept as seams
            out = feature_collage(own, R, Q)
        out = merge_patches(out, R - 1, Q - 1)                      # (B, 3, (R - 1) p, (Q - 1) p)
        return (out, merge_patches(own, R, Q)) if plain else out


class LatentMLP(nn.Module):
    """The latent model (DiffAE's MLPSkipNet, as Patch-DM trains it on its codes): eps_theta(z_t,
    t) for codes z. `layers` linear layers of `width`; each but the last is
    h = SiLU(LayerNorm(Linear(h) (1 + Linear(SiLU(e))))), e = MLP(sinusoid(t)) of 512 channels;
    every layer from the second on, the last (to 512) too, takes the input code again,
    concatenated to h. Through that skip the last layer can pass z_t on as it is, which at high
    noise is eps; without it a width under 512 cannot. Kaiming-normal weights, as DiffAE's,
    except the last layer's (see the departures). `trained` is 1 once the latent phase has
    begun."""

    def __init__(self, width=2048, layers=10, time_dim=64):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, CODE_DIM), nn.SiLU(),
                                      nn.Linear(CODE_DIM, CODE_DIM))
        inputs = [CODE_DIM] + [width + CODE_DIM] * (layers - 1)
        outputs = [width] * (layers - 1) + [CODE_DIM]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(inputs, outputs))
        self.conds = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(CODE_DIM, width))
                                   for _ in range(layers - 1))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers - 1))
        with torch.no_grad():
            for layer in [*self.layers[:-1], *(cond[1] for cond in self.conds)]:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            self.layers[-1].weight.zero_()[:, width:] = torch.eye(CODE_DIM)   # eps_theta = z_t
            self.layers[-1].bias.zero_()
        self.register_buffer("trained", torch.zeros((), dtype=torch.long))

    def forward(self, z, t, y=None):
        e = self.time_mlp(timestep_embedding(t, self.time_dim))    # (B, 512)
        h = z
        for i, (layer, cond, norm) in enumerate(zip(self.layers, self.conds, self.norms)):
            h = layer(h if i == 0 else torch.cat([h, z], dim=1))   # (B, width [+ 512])
            h = F.silu(norm(h * (1 + cond(e))))
        return self.layers[-1](torch.cat([h, z], dim=1))


class PatchDM(nn.Module):
    """Both networks. One phase trains at a time: `phase` "unet" (the U-Net and the code table)
    or "latent"; the other network is frozen, and forward is the training pass of the phase."""

    def __init__(self, unet, latent):
        super().__init__()
        self.unet, self.latent = unet, latent
        self.set_phase("unet")

    def set_phase(self, phase):
        self.phase = phase
        self.unet.requires_grad_(phase == "unet")
        self.latent.requires_grad_(phase == "latent")

    def forward(self, x, t, *conditions):
        """unet: x_t of 2 x 2 blocks with conditions (index, keep_code, top, left,
        use_position) -> (centre prediction, plain prediction); latent: z_t -> eps."""
        if self.phase == "latent":
            return self.latent(x, t)
        index, keep_code, top, left, use_position = conditions
        z = self.unet.codes(index) * keep_code[:, None]             # (B, 512), 0 if dropped
        return self.unet(x, t, z, top, left, use_position, plain=True)


def unet_input_size(args):
    """The (height, width) the U-Net runs on: one patch."""
    return args.patch_size, args.patch_size


def build_model(args):
    """Both networks of a checked configuration (`args.num_images` comes from the dataset)."""
    unet = PatchUNet(args.base_channels, args.channel_mults, args.num_res_blocks,
                     args.attention_resolutions, args.num_heads, args.dropout, args.patch_size,
                     args.num_images, args.collage)
    return PatchDM(unet, LatentMLP(args.latent_width, args.latent_layers))


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


def draw_blocks(batch, rows, cols, device):
    """The 2 x 2 block of padded-grid patches each image trains on: its first patch's row in
    0..N-1 and column in 0..M-1, uniform and drawn per image, so that a step's gradient covers
    as many places in the image as it has images: a lower-variance estimate of the loss over all
    blocks. The original draws one block for the whole batch: every image of a step trains the
    same grid position."""
    return (torch.randint(0, rows, (batch,), device=device),
            torch.randint(0, cols, (batch,), device=device))


# With --cfg, the code is dropped with probability 0.1 and the position with 0.5 in training, the
# original's values, so that guidance has an unconditional model (with both zero) to extrapolate
# from.
CODE_DROP, POSITION_DROP = 0.1, 0.5


class PatchDiffusion(GaussianDiffusion):
    """GaussianDiffusion trained on 2 x 2 blocks of padded-grid patches, with Patch-DM's two
    terms."""

    def __init__(self, betas, patch_size, cfg, **options):
        super().__init__(betas, **options)
        self.patch_size, self.cfg = patch_size, cfg

    def training_losses(self, model, x0, index):
        """x0 (B, 3, N p, M p) of the images `index` (their codes). Per image a block of 2 x 2
        padded-grid patches (draw_blocks) and t; x_t is zero on the padding, as in sampling.
        Loss: the error of the collaged prediction on the block's centre, the image-grid patch
        (top, left) at position (top + 0.5, left + 0.5), plus the error of the plain decoder
        pass on the four patches, masked to the pixels inside the image and averaged over all
        (as the original: an edge block's term is smaller). With --no_collage (not in the
        original) the centre prediction is a crop of the plain pass: its pixels count twice."""
        p, b = self.patch_size, x0.shape[0]
        top, left = draw_blocks(b, x0.shape[2] // p, x0.shape[3] // p, x0.device)
        padded = pad_to_grid(torch.cat([x0, torch.ones_like(x0[:, :1])], dim=1), p)
        block = torch.stack([padded[i, :, r * p:(r + 2) * p, c * p:(c + 2) * p]
                             for i, (r, c) in enumerate(zip(top.tolist(), left.tolist()))])
        # (B, 4, (N + 1) p, (M + 1) p) -> (B, 4, 2p, 2p): image and inside-mask channels
        x0, inside = block[:, :3], block[:, 3:]                     # (B, 3, 2p, 2p), (B, 1, 2p, 2p)
        t = torch.randint(0, self.num_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t, target = self.q_sample(x0, t, noise) * inside, self.target(x0, noise, t)
        keep_code, use_position = torch.ones(b, device=x0.device), torch.ones(b, device=x0.device)
        if self.cfg:
            keep_code = (torch.rand(b, device=x0.device) >= CODE_DROP).float()
            use_position = (torch.rand(b, device=x0.device) >= POSITION_DROP).float()

        def loss():
            centre, plain = model(x_t, self.timestep_map[t], index, keep_code, top, left,
                                  use_position)
            weight = at(self.loss_weight, t, x0)
            collage = weight * self.error(centre.float(), target[..., p // 2:-(p // 2),
                                                                 p // 2:-(p // 2)])
            return collage.mean() + (weight * self.error(plain.float(), target) * inside).mean()
        return [loss]


def build_diffusion(args):
    """The image diffusion process of a checked configuration."""
    betas = make_beta_schedule(args.schedule, args.timesteps)
    return PatchDiffusion(betas, args.patch_size, args.cfg, prediction=args.prediction,
                          loss=args.loss, variance=args.variance, min_snr_gamma=args.min_snr_gamma)


def latent_diffusion():
    """The diffusion over codes (DiffAE's latent DDIM, as Patch-DM trains it): T = 1000, a
    constant beta of 0.008, eps prediction, L1 loss."""
    return GaussianDiffusion(torch.full((1000,), 0.008, dtype=torch.float64), "eps", "l1")


def code_statistics(table):
    """Per-dimension mean and standard deviation of a code table (N, 512): the latent model learns
    (z - mean) / std."""
    table = table.detach().float()
    return table.mean(0), table.std(0, unbiased=False).clamp(min=1e-6)


# --- Sampling -------------------------------------------------------------------------------------


# Copied from ddpm.per_image_noise
def per_image_noise(shape, seeds, device):
    """A function drawing noise of `shape` (B, ...), image i's from a generator seeded by
    seeds[i]: an image's noise does not depend on its batch (as in EDM)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return lambda: torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)


# Copied from ddpm.SAMPLERS
SAMPLERS = {"ddim": "DDIM (Song et al.)", "ddpm": "ancestral (Ho et al. Alg. 2)"}


def tiles(rows, cols, patch_batch):
    """Windows that cover an N x M image grid, (top, left, a, b): a x b image-grid patches, whose
    (a + 1)(b + 1) padded-grid patches (all the decoder needs) are at most max(K, 4), K =
    patch_batch; K = 0: one window, the whole grid (the original's single batch). A window
    recomputes the padded-grid patches on its border that its neighbour also encodes; that
    costs (a + 1)(b + 1) / (a b) encoder passes per patch (4 at K < 9, 1.3 at K = 64) and keeps
    the features of one window only."""
    if patch_batch == 0:
        return [(0, 0, rows, cols)]
    side = max(1, math.isqrt(max(patch_batch, 4)) - 1)
    return [(r, c, min(side, rows - r), min(side, cols - c))
            for r in range(0, rows, side) for c in range(0, cols, side)]


def guided_noise(unet, window, t, z, top, left, guidance_scale, chunk):
    """The prediction for a window's image-grid patches; with guidance (Ho & Salimans Eq. 6, s =
    1 + w) out_u + s (out_c - out_u), out_u with the code and the position dropped, as in
    training (the original's unconditional branch)."""
    ones = torch.ones(len(t), device=window.device)
    top, left = (torch.full_like(t, v) for v in (top, left))
    out = unet(window, t, z, top, left, ones, chunk=chunk).float()
    if guidance_scale == 1.0:
        return out
    uncond = unet(window, t, torch.zeros_like(z), top, left, 0 * ones, chunk=chunk).float()
    return uncond + guidance_scale * (out - uncond)


@torch.no_grad()
def denoise_step(unet, process, x, t, z, sampler="ddim", eta=0.0, noise=None,
                 guidance_scale=1.0, patch_batch=0):
    """One reverse step on the padded canvas x (B, 3, (N + 1) p, (M + 1) p), zero on its ring of
    p/2: for every window of `tiles` the network's prediction for its image-grid patches, then
    the DDIM (x0 clipped to [-1, 1]) or ancestral step of those pixels into a new canvas. The
    ring stays zero, in x_t as in the prediction. With --patch_batch K > 0 the images also go
    one at a time, so that memory holds one window's features and two canvases. `noise`: the
    step's noise on the canvas (ddpm, or ddim with eta > 0)."""
    p, k = unet.patch_size, process.timestep_map[t]
    rows, cols = x.shape[2] // p - 1, x.shape[3] // p - 1
    out = torch.zeros_like(x)
    for images in [slice(None)] if patch_batch == 0 else [slice(i, i + 1) for i in range(len(x))]:
        for top, left, a, b in tiles(rows, cols, patch_batch):
            window = x[images, :, top * p:(top + a + 1) * p, left * p:(left + b + 1) * p]
            eps = guided_noise(unet, window, k[images], z[images], top, left, guidance_scale,
                               patch_batch)
            inside = (images, slice(None), slice(top * p + p // 2, (top + a) * p + p // 2),
                      slice(left * p + p // 2, (left + b) * p + p // 2))
            z_noise = None if noise is None else noise[inside]
            if sampler == "ddpm":
                out[inside] = process.ddpm_step(x[inside], eps, t[images], z_noise)
            else:
                out[inside] = process.ddim_step(x[inside], eps, t[images], z_noise, eta)
    return out


@torch.no_grad()
def sample(unet, diffusion, shape, seeds, z, sampler="ddim", steps=50, eta=0.0,
           guidance_scale=1.0, patch_batch=0, trajectory=None, progress=False):
    """x_T ~ N(0, I) of `shape` (B, 3, H, W) (per-image seeds) on the zero-padded canvas, then
    `steps` denoise_steps of the respaced process, with codes z (B, 512). -> x_0 (B, 3, H, W)."""
    device, p = diffusion.betas.device, unet.patch_size
    process = diffusion if steps == diffusion.num_timesteps else diffusion.respace(steps)
    noise = per_image_noise(shape, seeds, device)
    x, every = pad_to_grid(noise(), p), max(1, process.num_timesteps // 25)
    crop = (..., slice(p // 2, -(p // 2)), slice(p // 2, -(p // 2)))
    for k in tqdm(range(process.num_timesteps - 1, -1, -1), "sampling", leave=False,
                  disable=not progress):
        t = torch.full((shape[0],), k, device=device, dtype=torch.long)
        step_noise = pad_to_grid(noise(), p) if sampler == "ddpm" or eta > 0 else None
        x = denoise_step(unet, process, x, t, z, sampler, eta, step_noise, guidance_scale,
                         patch_batch)
        if trajectory is not None and k % every == 0:
            trajectory.append(x[crop].clamp(-1, 1).cpu())
    return x[crop].clamp(-1, 1)


# A code's noise seed is its image's noise seed + CODE_SEED: the two draws are independent.
CODE_SEED = 2 ** 40


@torch.no_grad()
def sample_codes(latent, table, seeds, steps=50):
    """New codes: z_T ~ N(0, I) (per-image seeds), DDIM with eta 0 in `steps` steps of the latent
    process, x0 not clipped (codes are not bounded), then de-normalised by the statistics of
    `table` (the model learned the EMA table's: with --weights model, the raw table's scale is
    used for the raw U-Net). -> (B, 512)."""
    device = table.device
    process = latent_diffusion().respace(steps).to(device)
    z = per_image_noise((len(seeds), CODE_DIM), seeds, device)()
    for k in range(process.num_timesteps - 1, -1, -1):
        t = torch.full((len(seeds),), k, device=device, dtype=torch.long)
        eps = latent(z, process.timestep_map[t]).float()
        a, a_prev = at(process.alpha_bar, t, z), at(process.alpha_bar_prev, t, z)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()                  # Song et al. Eq. 12
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    mean, std = code_statistics(table)
    return z * std + mean


def generate(model, diffusion, args, num, steps, seed, trajectory=None, progress=False):
    """`num` images in batches of --batch_size, image i with noise seed (seed, i), at
    --image_size with --sample and at --preview_size in training (default: 4 times as wide as
    the training images). Codes: training image
    --code_from's, else new ones from the latent model once it is trained, else the training
    images' in turn (image i takes code i mod N). -> uint8 (num, 3, H, W). Patch-DM samples
    with the EMA weights here: the original's test_step takes the raw ones for both networks."""
    device, images = next(model.parameters()).device, []
    h, w = args.train_size
    size = args.image_size if args.sample else args.preview_size or [h, 4 * w]
    table = model.unet.codes.weight
    for start in tqdm(range(0, num, args.batch_size), "batches", disable=not progress):
        index = torch.arange(start, min(start + args.batch_size, num))
        seeds = [seed * 1_000_003 + i for i in index.tolist()]
        if args.code_from is not None:
            z = table[args.code_from].expand(len(index), -1)
        elif model.latent.trained:
            z = sample_codes(model.latent, table, [s + CODE_SEED for s in seeds],
                             args.latent_sampling_steps)
        else:
            z = table[(index % len(table)).to(device)]
        out = sample(model.unet, diffusion, (len(index), 3, *size), seeds, z, args.sampler, steps,
                     args.eta, args.guidance_scale, args.patch_batch,
                     trajectory if start == 0 else None, progress)
        images.append(to_uint8(out).cpu())
    return torch.cat(images)


def seam_score(images, p):
    """The seam metric: the mean squared difference of neighbouring pixels across the lines of
    both grids (every p/2 rows and columns: the image grid's and the padded grid's borders)
    over that between all other neighbours. About 1 for an image without seams. (N, 3, H, W)."""
    x = images.double()
    dx, dy = (x[..., :, 1:] - x[..., :, :-1]) ** 2, (x[..., 1:, :] - x[..., :-1, :]) ** 2
    on_x = torch.arange(1, x.shape[-1]) % (p // 2) == 0           # difference j-1 -> j, j on a line
    on_y = torch.arange(1, x.shape[-2]) % (p // 2) == 0
    border = torch.cat([dx[..., on_x].flatten(), dy[..., on_y, :].flatten()]).mean()
    interior = torch.cat([dx[..., ~on_x].flatten(), dy[..., ~on_y, :].flatten()]).mean()
    return float(border / interior)


def check_labels(args):
    """Guidance needs the unconditional model that --cfg trains; --code_from a training image."""
    if args.guidance_scale != 1.0 and not args.cfg:
        raise UserError("--guidance_scale needs a model trained with --cfg (code and position "
                        "dropped at times, for the unconditional prediction)")
    if args.code_from is not None and not 0 <= args.code_from < args.num_images:
        raise UserError(f"--code_from {args.code_from} is not a training image: give 0.."
                        f"{args.num_images - 1}")


def sample_main(args, ckpt):
    """--sample: 00000.png, ... and grid.png (and trajectory.gif) in --output_dir."""
    args.cfg = ckpt["args"]["cfg"]                  # how the model was trained, not a choice now
    check_labels(args)
    kernels.set_backend(args.kernels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args)
    model.load_state_dict(ckpt["model"] if args.weights == "model" else
                          {f"{name}.{k}": v for name in ("unet", "latent")
                           for k, v in ckpt["ema"][name]["shadow"].items()})
    if not model.latent.trained and args.code_from is None:
        print(f"{METHOD}.py: warning: {args.checkpoint} has no trained latent model "
              f"(--latent_steps 0, or not reached): the samples take the training images' "
              f"codes in turn", file=sys.stderr)
    trajectory = [] if args.save_gif else None
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


# Copied from ddpm.load_dataset with load_dataset->load_images
def load_images(args, rank=0, log=print):
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


def load_dataset(args, rank=0, log=print):
    """ddpm.py's dataset; its number of images is the size of the code table, which a resumed
    run must keep."""
    images, labels, classes = load_images(args, rank, log)
    if args.resume and args.num_images != len(images):
        raise UserError(f"{args.resume} has codes for {args.num_images} images; the dataset now "
                        f"has {len(images)}: resume on the same images")
    args.num_images = len(images)
    return images, labels, classes


# The semantic codes' initial norm: unit mean square per entry, the scale at which the default
# initialisation of code_proj's Linear works.
CODE_NORM = math.sqrt(CODE_DIM)


@torch.no_grad()
def thumbnail_codes(images):
    """The initial code table (N, 512). The original starts every image's code at its CLIP image
    features (a download), so that similar images start close; offline, the codes here are
    the principal-component scores of the images' thumbnails (16 pixels on the longer side),
    up to 512 components and zeros after them, scaled to a mean norm of CODE_NORM. Distances
    between codes are then those between thumbnails, up to the components left out. (Not
    whitened: whitening would weigh the faint components, mostly noise, as the main ones.)"""
    n, _, h, w = images.shape
    size = (max(1, round(16 * h / max(h, w))), max(1, round(16 * w / max(h, w))))
    thumbs = torch.cat([F.adaptive_avg_pool2d(torch.tensor(images[i:i + 256]).double(),
                                              size).flatten(1)
                        for i in range(0, n, 256)])                 # (N, 3 h' w')
    centred = thumbs - thumbs.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)       # centred = u diag(s) v^T
    scores = (u * s)[:, :CODE_DIM]                                  # (N, min(N, D, 512))
    codes = torch.zeros(n, CODE_DIM, dtype=torch.float64)
    codes[:, :scores.shape[1]] = scores
    return (codes * CODE_NORM / codes.norm(dim=1).mean().clamp(min=1e-12)).float()


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


class PhaseEMA:
    """An EMA of each network, each updated in its own phase (`phase`), so that the U-Net's stays
    as its phase left it while the latent model trains. `shadow` holds both averages."""

    def __init__(self, model, decay, start):
        self.unet, self.latent = EMA(model.unet, decay, start), EMA(model.latent, decay, start)
        self.shadow, self.phase = nn.Module(), "unet"
        self.shadow.unet, self.shadow.latent = self.unet.shadow, self.latent.shadow

    def update(self, model):
        getattr(self, self.phase).update(getattr(model, self.phase))

    def state_dict(self):
        return {"unet": self.unet.state_dict(), "latent": self.latent.state_dict()}

    def load_state_dict(self, state):
        self.unet.load_state_dict(state["unet"])
        self.latent.load_state_dict(state["latent"])


def lr_lambda(run, args):
    """The LR factor of step `run.step`: in the U-Net's phase, linear warmup over --warmup_steps,
    then cosine decay to 0 at --max_steps, or constant; in the latent phase a constant
    --latent_lr (the one parameter group's lr is --lr times this factor)."""
    step, warmup = run.step, args.warmup_steps
    if step >= args.max_steps:
        return args.latent_lr / args.lr
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


# The flags that shape the networks or the diffusion processes: a resumed run must agree on them,
# and --sample takes them from the checkpoint.
ARCHITECTURE_KEYS = ("train_size", "patch_size", "base_channels", "channel_mults",
                     "num_res_blocks", "attention_resolutions", "num_heads", "num_images",
                     "collage", "latent_width", "latent_layers", "schedule", "timesteps",
                     "prediction")


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


# Copied from ddpm.build_run with build_run->build_shared_run, EMA->PhaseEMA
def build_shared_run(args, ckpt, device, rank, world):
    """Everything a run trains: model (DDP-wrapped when world > 1), PhaseEMA, SWA, optimizer, LR
    schedule, GradScaler (fp16 only), autocast, diffusion, the step and the images seen (`nimg`),
    restored from `ckpt` when resuming."""
    torch.manual_seed(args.seed)                                    # the same weights everywhere
    raw = build_model(args).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    run = argparse.Namespace(raw=raw, ema=PhaseEMA(raw, args.ema_decay, args.ema_start), step=0,
                             nimg=0, swa=AveragedModel(raw) if args.swa else None, nonfinite=0,
                             skipped=0, diffusion=build_diffusion(args).to(device), device=device,
                             rank=rank, world=world, autocast=torch.autocast(
                                 device.type, dtype=dtype, enabled=dtype is not None))
    run.optimizer = torch.optim.AdamW(raw.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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


def build_run(args, ckpt, device, rank, world):
    """ddpm.py's run of both networks (one AdamW holds them both: a frozen network has no
    gradients, so it does not move), with the code table of a new run set by thumbnail_codes
    in the model and in its EMA (rank 0's table on every rank). A run in its latent phase keeps
    its --max_steps: more U-Net steps would move the codes its latent model has learned."""
    trained = ckpt is not None and bool(ckpt["model"]["latent.trained"])
    if trained and args.max_steps != ckpt["args"]["max_steps"]:
        raise UserError(f"{args.resume} is in the latent phase, after --max_steps "
                        f"{ckpt['args']['max_steps']}: --max_steps cannot change now (its latent "
                        f"model learned these codes); --latent_steps can")
    run = build_shared_run(args, ckpt, device, rank, world)
    if ckpt is None:
        images = load_images(args, 1, log=lambda *a, **k: None)[0]    # (rank 1: no warnings,
        codes = thumbnail_codes(images).to(device)                       # load_dataset gave them)
        if world > 1:                          # one table everywhere, whatever each SVD rounds
            dist.broadcast(codes, 0)
        run.raw.unet.codes.weight.data.copy_(codes)
        run.ema.shadow.unet.codes.weight.data.copy_(codes)
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


def start_latent_phase(run, args):
    """After --max_steps: freeze the U-Net and its codes, train the latent model on the EMA code
    table (normalised), with AdamW's --latent_weight_decay; under DDP the wrapper is rebuilt
    for the latent model's parameters."""
    run.raw.set_phase("latent")
    run.ema.phase = "latent"
    run.codes = run.ema.shadow.unet.codes.weight.detach()
    run.code_mean, run.code_std = code_statistics(run.codes)
    run.latent_diffusion = latent_diffusion().to(run.device)
    run.optimizer.param_groups[0]["weight_decay"] = args.latent_weight_decay
    if run.world > 1:
        run.model = DistributedDataParallel(
            run.raw, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.raw.latent.trained.fill_(1)


def train_step(run, images, labels, args):
    """The forward and backward passes of one optimizer step. U-Net phase: the micro-batches
    read the stream of batch_indices in turn from run.nimg (ddpm.py's train_step), and `y` of
    the loss is the images' dataset indices (their codes). Latent phase: --latent_batch_size
    codes of the table, the same stream going on. Returns the loss."""
    latent = run.step >= args.max_steps
    if latent and run.raw.phase != "latent":
        start_latent_phase(run, args)
    loss = 0.0
    for micro in range(args.accumulation_iters):
        size, sync = (args.latent_batch_size if latent else args.batch_size), \
            micro == args.accumulation_iters - 1
        index = batch_indices(run.nimg + micro * size * run.world, args.num_images, size,
                              args.seed, run.rank, run.world)
        if latent:
            z0 = (run.codes[index.to(run.device)] - run.code_mean) / run.code_std
            loss += micro_batch_step(run.model, run.latent_diffusion, z0, None, args, run.scaler,
                                     run.autocast, sync)
        else:
            x0, _ = make_batch(images, None, index, args, run.device)
            loss += micro_batch_step(run.model, run.diffusion, x0, index.to(run.device), args,
                                     run.scaler, run.autocast, sync)
    run.nimg += size * args.accumulation_iters * run.world
    return loss


def finished(run, args):
    """Training ends after --max_steps U-Net steps and --latent_steps latent steps."""
    return run.step >= args.max_steps + args.latent_steps


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


# Copied from ddpm.Progress with Progress->StepProgress
class StepProgress:
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


class Progress(StepProgress):
    """ddpm.py's progress over both phases (images/s counts codes in the latent phase)."""

    def __init__(self, args, run):
        super().__init__(args, run)
        self.bar.total = args.max_steps + args.latent_steps
        self.bar.refresh()


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

# `--preset paper`: the original's nature 512 x 1024 configuration: 64 x 64 patches, base 64,
# multipliers 1,2,4,8, 2 encoder and 3 decoder ResBlocks per level, attention at 16 with one head,
# dropout 0.1, batch 96, Adam 1e-4 constant, gradient clip 1, EMA 0.9999, fp16, the linear
# schedule with T = 1000, eps prediction and the fixed large variance (for --sampler ddpm), no
# flips; the latent MLP of 10 layers of 2048 with batch 512, AdamW 1e-4 and weight decay 0.01
# for 60M codes (117k steps); DDIM with 50 steps.
# The step count of the patch phase is not in the notes on the original: 1M is ours.
PRESETS = {
    "quick": {},
    "paper": dict(image_size="512x1024", patch_size=64, base_channels=64,
                  channel_mults="1,2,4,8", num_res_blocks=2, attention_resolutions="16",
                  num_heads=1, dropout=0.1, batch_size=96, lr=1e-4, lr_schedule="constant",
                  warmup_steps=0, grad_clip=1.0, ema_decay=0.9999, ema_start=0,
                  precision="fp16", schedule="linear", prediction="eps", variance="large",
                  max_steps=1_000_000,
                  latent_steps=117_000, latent_batch_size=512, latent_lr=1e-4,
                  latent_width=2048, latent_layers=10, preview_size="512x1024",
                  save_every=10_000, sample_every=10_000),
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
    """ddpm.py's flags with this method's defaults (the quick preset: the built-in landscapes at
    32 x 64 in 16 x 16 patches, previews 4 times wider than the training images; ddpm.py's v
    prediction and cosine schedule, with which short runs converge: a quick run with the paper's
    eps and linear schedule leaves whole patches in noise, as ddpm.py's eps preset leaves whole
    images, bench/results/ablation_digits_800.md) and its own flags."""
    p = build_shared_parser()
    p.set_defaults(image_size="32x64", base_channels=32, channel_mults="1,2", num_heads=4,
                   attention_resolutions="8", hflip=False,
                   procedural_size=512, batch_size=32, max_steps=1000, lr=1e-3, ema_start=100,
                   save_every=500, sample_every=500, preview_samples=4, train_size=None,
                   num_images=0)
    g = functools.partial(add_flag, p, {}, "Patch-DM (Ding et al. 2024)")
    pos, nonneg = at_least(1), at_least(0)
    g("patch_size", 16, "p: the U-Net's input; image sizes are multiples of it", type=pos)
    g("collage", True, "feature collage (--no_collage: independent patches, Fig. 2 (a))")
    g("cfg", False, "drop the code (p 0.1) and the position (p 0.5) in training, for "
      "--guidance_scale (the original samples such a model at 1.5)")
    g("patch_batch", 0, "most patches per network pass in sampling (0: the whole image at once)",
      type=nonneg)
    g("code_from", None, "sample with this training image's code (default: the latent model's)",
      type=nonneg)
    g("preview_size", None, "size of the preview images, N or HxW (default: the training height "
      "and 4 times its width)", type=image_size)
    g("latent_steps", 1000, "steps of the latent model after --max_steps (0: none)", type=nonneg)
    g("latent_batch_size", 64, "codes per latent micro-batch and process", type=pos)
    g("latent_lr", 1e-3, "AdamW learning rate of the latent model", type=at_least(0.0, float))
    g("latent_weight_decay", 0.01, "AdamW weight decay of the latent model",
      type=at_least(0.0, float))
    g("latent_width", 256, "width of the latent MLP (paper: 2048)", type=pos)
    g("latent_layers", 10, "linear layers of the latent MLP", type=at_least(2))
    g("latent_sampling_steps", 50, "DDIM steps that draw a code", type=pos)
    return p


# Copied from ddpm.check_args with check_args->check_shared_args
def check_shared_args(args):
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


# ddpm.py's flags that Patch-DM has no use for: it conditions on codes, not classes, and averages
# weights with the EMA only.
REFUSED = {"class_conditional": "Patch-DM conditions on a code per image, not on classes",
           "label_dropout": "--cfg drops codes and positions instead of labels",
           "class_label": "there are no classes: --code_from picks a training image's code",
           "swa": "the weights are averaged by the EMA of each phase only (no --swa, no "
                  "--weights swa)"}


def check_args(args):
    """This method's checks, then ddpm.py's on a patch (the U-Net's input). With --sample the
    training size comes from the checkpoint and --image_size is the canvas."""
    defaults = build_parser()
    refused = [k for k in REFUSED if getattr(args, k) != defaults.get_default(k)]
    if refused or args.weights == "swa":
        key = (refused or ["swa"])[0]
        raise UserError(f"--{key} is not a flag of {METHOD}.py: {REFUSED[key]}")
    if not args.sample:
        args.train_size = list(args.image_size)
    p, levels = args.patch_size, len(args.channel_mults or [])
    if levels and p % 2 ** levels:
        raise UserError(f"--patch_size {p}: the collage crops half a patch at each of the "
                        f"{levels} levels, so p must be a multiple of 2^{levels} = {2 ** levels}")
    sizes = [("--image_size", args.image_size)] + ([("--preview_size", args.preview_size)]
                                                     if args.preview_size else [])
    for flag, (h, w) in sizes:
        if h % p or w % p:
            raise UserError(f"{flag} {h}x{w} is not a multiple of --patch_size {p} in both sides")
    if args.latent_steps and args.lr == 0:
        raise UserError("--lr 0: the latent phase's --latent_lr is set as a multiple of --lr")
    return check_shared_args(args)


# Copied from ddpm.parse_args
def parse_args(argv=None, base=None):
    """Command line -> checked configuration: the parser's defaults, then the preset, then `base`
    (a checkpoint's configuration), then the flags given, each overriding the one before."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**{**PRESETS.get(preset, {}), **(base or {})})
    return check_args(parser.parse_args(argv))


# --- main() ---------------------------------------------------------------------------------------

# Copied from ddpm.NOT_INHERITED
NOT_INHERITED = ("dataset_path", "output_dir", "resume", "seed", "weights", "save_gif",
                 "class_label", "sample", "checkpoint", "dry_run", "preset")


def dry_run(args):
    """Print the configuration and the parameter count of both networks (the code table sized
    by the dataset folder)."""
    args.num_images = (len(find_images(args.dataset_path, False)[0]) if args.dataset_path
                       else args.procedural_size)
    print(json.dumps(vars(args), indent=2))
    model = build_model(args)
    for name, part in (("U-Net and codes", model.unet), ("latent model", model.latent)):
        print(f"parameters ({name}): {sum(p.numel() for p in part.parameters()):,}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
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
