"""FID and KID of a checkpoint's samples, or of a folder of images, against a reference folder.

    python bench/evaluate.py --checkpoint runs/patch_ddpm/checkpoints/last.pt --reference DIR \\
        --num_samples 10000
    python bench/evaluate.py --samples DIR_OF_PNGS --reference DIR

Prints `FID <value>` and `KID <mean> +- <std>`, and writes metrics.json and metrics.md (one
markdown row) into --output_dir: FID, KID's mean and standard deviation over subsets, the number
of images, the sampler and its steps, the seconds taken and the device.

- **Samples.** With --checkpoint, the script that wrote it (its `method` field: ddpm.py,
  patch_ddpm.py, ...) draws --num_samples images through its own `--sample` mode, in this
  process: per-image noise seeds (the same images whatever --batch_size), in batches, with a
  progress bar, into OUTPUT_DIR/samples. Its sampler and steps are the checkpoint's unless
  --sampler / --sampling_steps say otherwise. With --samples, every image file under the folder
  (recursive) but the grid.png and trajectory.gif that `--sample` writes beside its samples; all
  must have one size.
- **Reference.** The images of --reference (default: the built-in landscapes, --reference_size
  of them, of --reference_seed: by default the checkpoint's training seed), decoded as training
  decodes them (upright by EXIF, RGB, resized to cover the samples' size and centre-cropped) into
  the same cache file a training run at that size uses (--cache_dir).
  Its features, mean and covariance are cached beside it per feature network, so a second
  evaluation against the same folder at the same size reads no image; a changed folder (file
  list, sizes, modification times) gets new ones. Decoded like the training data, not read as
  they are (as pytorch-fid reads them): the reference is then exactly what a model trained at that
  size saw, and a folder of another size can be a reference (for PNGs at the samples' size the
  decode changes nothing).
- **Features** (bench/inception.py): Inception-v3's pool3, fed as pytorch-fid feeds it: images
  read with PIL as RGB, scaled to [0, 1], resized bilinearly to 299 x 299, mapped to [-1, 1];
  features in float64 for the statistics. The weights are pytorch-fid's public file, from
  --inception_weights PATH or downloaded once into the torch hub cache (a line says so).
  `--inception_weights random` uses random weights (for tests and smoke runs): what it prints is
  then named `random-feature FD` and `random-feature KD`, never FID or KID.
- **FID** (Heusel et al. 2017, https://arxiv.org/abs/1706.08500, Eq. 6):
  ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), in float64.
  It is biased upwards at small N (the papers use 50,000 samples): compare only numbers taken with
  the same N and the same reference.
- **KID** (Binkowski et al. 2018, https://arxiv.org/abs/1801.01401, Sec. 4): the unbiased
  squared MMD
  with the kernel k(x, y) = (x.y / d + 1)^3, d = 2048, on --kid_subsets random subsets of
  --kid_subset_size images of each set (defaults 100 and 1,000, as torch-fidelity); its mean and
  standard deviation over the subsets.

Exit status 2 with one line for a user error: no such checkpoint or folder, an empty folder,
samples of different sizes, fewer images than the KID subset size, no weights file offline. All
are checked before any sampling, but the reference's size (known after decoding it).
"""

import argparse
import hashlib
import importlib
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddpm  # noqa: E402
import inception  # noqa: E402
from ddpm import UserError  # noqa: E402

METHODS = ("ddpm", "patch_ddpm", "patchify_ddpm", "patch_diffusion", "patch_dm")
NOT_SAMPLES = ("grid.png", "trajectory.gif")        # what --sample writes beside its samples
WEIGHTS_SHA256_PREFIX = "6726825d"                  # in the file's name, as torch.hub names files
FEATURES_VERSION = 1                                # in the cache key: raise it with the features


class ScriptFailed(Exception):
    """The sampling script exited with this status (it has printed its own error line)."""


# ------------------------------------------------------------------------------------------------
# The metrics
# ------------------------------------------------------------------------------------------------

def gaussian(features):
    """Features (N, d) -> the mean and covariance (1/(N-1), as pytorch-fid) in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Frechet distance of two Gaussians, ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
    tr (S_1 S_2)^(1/2) is computed as the trace of the
    symmetric (S_1^(1/2) S_2 S_1^(1/2))^(1/2), which has the same eigenvalues: two symmetric
    eigendecompositions, exact for singular covariances too (N < d samples), where a general
    matrix square root of S_1 S_2 has to be regularised."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sqrt(cross).sum())


def features_frechet_distance(x, y):
    """The Frechet distance of Gaussians fitted to the rows of x and y (N, d). With fewer samples
    than dimensions in either set, in the samples' space: with centred, scaled rows A and B
    (S_1 = A^T A, S_2 = B^T B), tr (S_1 S_2)^(1/2) is the sum of the singular values of A B^T,
    (N_1, N_2) instead of two (d, d) eigendecompositions, and tr S_1 = ||A||^2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if min(len(x), len(y)) > x.shape[1]:
        return frechet_distance(*gaussian(x), *gaussian(y))
    a, b = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (x, y))
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum()
                 - 2 * cross)


def polynomial_mmd2(x, y):
    """The unbiased squared MMD of two sets of m rows under k(a, b) = (a.b / d + 1)^3:
    sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return within - 2 * kxy.mean()


def kernel_inception_distance(x, y, subsets, subset_size, seed=0):
    """KID: the mean and standard deviation of polynomial_mmd2 over `subsets` pairs of subsets
    of `subset_size` images, each drawn without replacement from its set."""
    if min(len(x), len(y)) < subset_size:
        raise UserError(f"KID needs at least --kid_subset_size {subset_size} images in each set; "
                        f"there are {len(x)} and {len(y)}: lower --kid_subset_size")
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    values = [polynomial_mmd2(x[rng.choice(len(x), subset_size, replace=False)],
                              y[rng.choice(len(y), subset_size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def inception_weights(weights):
    """--inception_weights -> (a weights file or "random", a fingerprint of the weights for the
    cache key). None: pytorch-fid's file in the torch hub cache, downloaded there once."""
    if weights == "random":
        return weights, f"random-seed0-v{FEATURES_VERSION}"
    if weights is None:
        weights = os.path.join(torch.hub.get_dir(), "checkpoints",
                               os.path.basename(inception.WEIGHTS_URL))
        if not os.path.isfile(weights):
            print(f"downloading the FID Inception weights (pytorch-fid, 91 MB) from "
                  f"{inception.WEIGHTS_URL} into {os.path.dirname(weights)}", file=sys.stderr)
            try:
                os.makedirs(os.path.dirname(weights), exist_ok=True)
                torch.hub.download_url_to_file(inception.WEIGHTS_URL, weights,
                                               hash_prefix=WEIGHTS_SHA256_PREFIX)
            except (OSError, RuntimeError) as error:                # offline; a wrong hash
                raise UserError(f"cannot download the Inception weights ({error}); fetch "
                                f"{inception.WEIGHTS_URL} elsewhere and pass "
                                f"--inception_weights PATH") from None
    if not os.path.isfile(weights):
        raise UserError(f"--inception_weights {weights} does not exist")
    with open(weights, "rb") as f:
        return weights, f"{hashlib.sha256(f.read()).hexdigest()[:16]}-v{FEATURES_VERSION}"


def load_inception(weights, device):
    """A weights file or "random" -> the network on `device`, in eval mode."""
    net = inception.InceptionV3()
    if weights != "random":
        try:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as error:                                  # not a state dict of it
            raise UserError(f"--inception_weights {weights} is not pytorch-fid's Inception "
                            f"weights file ({type(error).__name__})") from None
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, images, batch_size, desc):
    """uint8 images (N, 3, H, W), any indexable (an array, a memory map, a lazy folder) ->
    float64 pool3 features (N, 2048), in batches, with a progress bar."""
    device, out = next(net.parameters()).device, []
    for start in tqdm(range(0, len(images), batch_size), desc, disable=None):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # a copy
        out.append(net.eval()(x.float() / 255).double().cpu())     # (B, 3, H, W) -> (B, 2048)
    return torch.cat(out).numpy()


class ImageFolder:
    """Sample images as uint8 (N, 3, H, W), read on slicing with PIL as RGB: every image under
    `root` but NOT_SAMPLES, or exactly `paths`."""

    def __init__(self, root, paths=None):
        if not os.path.isdir(root):
            raise UserError(f"--samples {root} is not a folder")
        if paths is None:
            paths = [p for p in ddpm.find_images(root, False)[0]
                     if os.path.basename(p) not in NOT_SAMPLES]
        self.paths = paths
        if not self.paths:
            raise UserError(f"no sample images under {root} (only {', '.join(NOT_SAMPLES)})")
        sizes = {}
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    sizes.setdefault(image.size, path)
            except (OSError, ValueError, SyntaxError) as error:
                raise UserError(f"{path} cannot be read as an image ({error})") from None
        if len(sizes) > 1:
            raise UserError(f"the samples under {root} have {len(sizes)} sizes ("
                            + ", ".join(f"{w}x{h} like {p}" for (w, h), p in sizes.items())
                            + "); FID compares images of one size")
        self.width, self.height = next(iter(sizes))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        def read(path):
            try:
                with Image.open(path) as image:
                    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
            except (OSError, ValueError, SyntaxError) as error:      # truncated after its header
                raise UserError(f"{path} cannot be read as an image ({error})") from None
        return np.stack([read(p) for p in self.paths[index]])       # (B, 3, H, W)


def reference_statistics(args, height, width, net, fingerprint):
    """The reference images' features at the samples' size and their mean and covariance, from
    the cache when it has them. -> (dict of features, mu, sigma; the cache file)."""
    data = argparse.Namespace(image_size=[height, width], dataset_path=args.reference,
                              class_conditional=False, cache_dir=args.cache_dir,
                              num_workers=args.num_workers, procedural_size=args.reference_size,
                              seed=args.reference_seed)
    images = ddpm.load_dataset(data, log=lambda line: print(line, file=sys.stderr))[0]
    path = f"{images.filename[:-len('.npy')]}-inception-{fingerprint}.npz"   # (N, 3, H, W)
    if not os.path.exists(path):
        features = inception_features(net, images, args.batch_size, "reference features")
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, features=features, **dict(zip(("mu", "sigma"), gaussian(features))))
            os.replace(tmp, path)                                   # never half a file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with np.load(path) as cached:
        return dict(cached), path


# ------------------------------------------------------------------------------------------------
# Sampling a checkpoint
# ------------------------------------------------------------------------------------------------

def checkpoint_method(args):
    """The script, sampler and steps that will sample --checkpoint (read without running it)."""
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{args.checkpoint} cannot be read as a checkpoint "
                        f"({type(error).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") not in METHODS or "args" not in ckpt:
        raise UserError(f"{args.checkpoint} is not a checkpoint of this repository's scripts "
                        f"({', '.join(m + '.py' for m in METHODS)})")
    return (ckpt["method"], args.sampler or ckpt["args"].get("sampler"),
            args.sampling_steps or ckpt["args"].get("sampling_steps"), ckpt["args"].get("seed"))


def sample_checkpoint(args, out_dir):
    """Draw --num_samples images with the script that wrote --checkpoint, in this process, into
    out_dir. -> a record of what was run: method, sampler, steps, seconds, peak memory."""
    method, sampler, steps, _ = checkpoint_method(args)
    argv = ["--sample", "--checkpoint", args.checkpoint, "--output_dir", out_dir,
            "--num_samples", str(args.num_samples), "--batch_size", str(args.batch_size),
            "--seed", str(args.seed), "--sampler", str(sampler), "--sampling_steps", str(steps)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status = importlib.import_module(method).main(argv)
    seconds = time.perf_counter() - start
    if status:
        raise ScriptFailed(status)
    memory = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(method=method, checkpoint=args.checkpoint, sampler=sampler, sampling_steps=steps,
                sampling_seconds=round(seconds, 2), sampling_peak_memory_mib=round(memory),
                seed=args.seed)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def build_parser():
    p = ddpm.Parser(prog="bench/evaluate.py", description=__doc__.split("\n")[0],
                    formatter_class=ddpm.HelpFormatter)
    pos = ddpm.at_least(1)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="sample this checkpoint with the script that wrote it")
    what.add_argument("--samples", help="a folder of sample images")
    p.add_argument("--reference", help="the real images' folder (default: built-in landscapes)")
    p.add_argument("--reference_size", type=pos, default=4096,
                   help="built-in landscapes in the reference (without --reference)")
    p.add_argument("--reference_seed", type=ddpm.at_least(0),
                   help="their seed (default: the checkpoint's --seed, the landscapes it trained "
                   "on; with --samples 0)")
    p.add_argument("--num_samples", type=pos, default=10_000, help="with --checkpoint")
    p.add_argument("--sampler", help="with --checkpoint (default: the checkpoint's)")
    p.add_argument("--sampling_steps", type=pos, help="with --checkpoint (default: its own)")
    p.add_argument("--seed", type=ddpm.at_least(0), default=0, help="noise seed of the samples")
    p.add_argument("--batch_size", type=pos, default=50, help="images per sampling and "
                   "Inception batch")
    p.add_argument("--inception_weights", help="pytorch-fid's weights file, or 'random' "
                   "(default: download it once into the torch hub cache)")
    p.add_argument("--kid_subsets", type=pos, default=100, help="KID: random subsets drawn")
    p.add_argument("--kid_subset_size", type=ddpm.at_least(2), default=1000,
                   help="KID: images per subset, of each set")
    p.add_argument("--output_dir", help="default runs/evaluate/<checkpoint or samples name>")
    p.add_argument("--cache_dir", default=os.path.join("runs", "cache"),
                   help="decoded reference images and their features (as the scripts')")
    p.add_argument("--num_workers", type=pos, default=4, help="threads decoding the reference")
    return p


def default_output_dir(args):
    if args.samples:
        return os.path.join("runs", "evaluate", os.path.basename(os.path.abspath(args.samples)))
    run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))))
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    return os.path.join("runs", "evaluate", f"{run}-{stem}-{args.num_samples}")


def evaluate(args):
    """Check what can be checked, sample (or read) the images, compare them with the reference.
    -> the metrics dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.output_dir or default_output_dir(args)
    if args.reference is not None:
        if not os.path.isdir(args.reference):
            raise UserError(f"--reference {args.reference} is not a folder")
        ddpm.find_images(args.reference, False)                     # not empty
    samples = None if args.checkpoint else ImageFolder(args.samples)
    count = args.num_samples if args.checkpoint else len(samples)
    if count < args.kid_subset_size:
        raise UserError(f"{count} samples: KID needs at least --kid_subset_size "
                        f"{args.kid_subset_size}; lower it or give more samples")
    training_seed = checkpoint_method(args)[3] if args.checkpoint else None
    if args.reference_seed is None:
        args.reference_seed = training_seed or 0
    weights, fingerprint = inception_weights(args.inception_weights)
    start, record = time.perf_counter(), {}
    if args.checkpoint:                  # before the network is built: its peak memory is its own
        folder = os.path.join(out, "samples")
        record = sample_checkpoint(args, folder)
        samples = ImageFolder(folder, [os.path.join(folder, f"{i:05d}.png")
                                       for i in range(args.num_samples)])
    net = load_inception(weights, device)
    fake = inception_features(net, samples, args.batch_size, "sample features")
    reference, cache = reference_statistics(args, samples.height, samples.width, net, fingerprint)
    ref = reference["features"]
    if len(samples) < 10_000:
        print(f"note: {len(samples)} samples; FID is biased upwards below the papers' 50,000: "
              f"compare only numbers with the same N", file=sys.stderr)
    kid = kernel_inception_distance(fake, ref, args.kid_subsets, args.kid_subset_size)
    large = min(len(fake), len(ref)) > inception.FEATURES              # the cached statistics
    fd = (frechet_distance(*gaussian(fake), reference["mu"], reference["sigma"]) if large
          else features_frechet_distance(fake, ref))
    real = weights != "random"
    names = ("fid", "kid") if real else ("random_feature_fd", "random_feature_kd")
    metrics = {names[0]: fd, f"{names[1]}_mean": kid[0], f"{names[1]}_std": kid[1],
               "num_samples": len(samples), "num_reference": len(ref),
               "resolution": f"{samples.height}x{samples.width}",
               "samples": args.samples or os.path.join(out, "samples"),
               "reference": args.reference or f"built-in landscapes ({args.reference_size}, "
                                              f"seed {args.reference_seed})",
               "reference_features": cache, "inception_weights": fingerprint,
               "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size,
               "sampler": None, "sampling_steps": None, **record,
               "seconds": round(time.perf_counter() - start, 2),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    write_metrics(metrics, names, out)
    return metrics


def write_metrics(m, names, out):
    """Print the two result lines; write metrics.json and metrics.md (a one-row table)."""
    label = ("FID", "KID") if names[0] == "fid" else ("random-feature FD", "random-feature KD")
    print(f"{label[0]} {m[names[0]]:.4f}")
    print(f"{label[1]} {m[names[1] + '_mean']:.6f} +- {m[names[1] + '_std']:.6f}")
    os.makedirs(out, exist_ok=True)

    def write(name, text):                                          # a temporary file, renamed
        tmp = os.path.join(out, f"{name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    write("metrics.json", json.dumps(m, indent=2))
    header = ["samples", "N", "resolution", "sampler", "steps", label[0], label[1], "seconds",
              "device"]
    row = [m.get("checkpoint") or m["samples"], m["num_samples"], m["resolution"],
           m["sampler"] or "-", m["sampling_steps"] or "-", f"{m[names[0]]:.3f}",
           f"{m[names[1] + '_mean']:.5f} +- {m[names[1] + '_std']:.5f}", m["seconds"],
           m["device"]]
    write("metrics.md", "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| "
          + " | ".join(map(str, row)) + " |\n")


def main(argv=None):
    try:
        evaluate(build_parser().parse_args(argv))
        return 0
    except UserError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    except ScriptFailed as failed:
        return failed.args[0]


if __name__ == "__main__":
    sys.exit(main())
