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
  of them), decoded as training decodes them (upright by EXIF, RGB, resized to cover the samples'
  size and centre-cropped) into the same cache file a training run at that size uses (--cache_dir).
  Their statistics are cached beside it per feature network, so a second evaluation against the
  same folder at the same size reads no image; a changed folder (file list, sizes, modification
  times) gets new ones.
- **Features** (bench/inception.py): Inception-v3's pool3, fed as pytorch-fid feeds it: images
  read with PIL as RGB, scaled to [0, 1], resized bilinearly to 299 x 299, mapped to [-1, 1];
  features in float64 for the statistics. The weights are pytorch-fid's public file, from
  --inception_weights PATH or downloaded once into the torch hub cache (a line says so).
  `--inception_weights random` uses random weights (for tests and smoke runs): what it prints is
  then named `random-feature FD` and `random-feature KD`, never FID or KID.
- **FID** (Heusel et al. 2017): ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), in float64.
  It is biased upwards at small N (the papers use 50,000 samples): compare only numbers taken with
  the same N and the same reference.
- **KID** (Binkowski et al. 2018, Sec. 4 and Appendix): the unbiased estimate of the squared MMD
  with the kernel k(x, y) = (x.y / d + 1)^3, d = 2048, on --kid_subsets random subsets of
  --kid_subset_size images of each set (defaults 100 and 1,000, as torch-fidelity); its mean and
  standard deviation over the subsets.

Exit status 2 with one line for a user error: no such checkpoint or folder, an empty folder,
samples of different sizes, fewer images than the KID subset size, no weights file offline.
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


# ------------------------------------------------------------------------------------------------
# The metrics
# ------------------------------------------------------------------------------------------------

def gaussian(features):
    """Features (N, d) -> the mean and covariance (1/(N-1), as pytorch-fid) in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Frechet distance of two Gaussians. tr (S_1 S_2)^(1/2) is computed as the trace of the
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
    """The unbiased squared MMD of two equally large sets under k(a, b) = (a.b / d + 1)^3:
    the means of k over distinct pairs within each set, minus twice the mean over all pairs
    across them."""
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

def load_inception(weights, device):
    """-> (network, a fingerprint of its weights for the cache, whether they are the real ones).
    `weights`: a file, "random", or None (pytorch-fid's file, downloaded once)."""
    net = inception.InceptionV3()
    if weights == "random":
        return net.to(device), "random-seed0", False
    if weights is None:
        name = os.path.basename(inception.WEIGHTS_URL)
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", name)
        if not os.path.isfile(weights):
            print(f"downloading the FID Inception weights (pytorch-fid, 91 MB) from "
                  f"{inception.WEIGHTS_URL} into {os.path.dirname(weights)}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(inception.WEIGHTS_URL, weights, progress=True)
            except OSError as error:                                # URLError is an OSError
                raise UserError(f"cannot download the Inception weights ({error}); fetch "
                                f"{inception.WEIGHTS_URL} elsewhere and pass "
                                f"--inception_weights PATH") from None
    if not os.path.isfile(weights):
        raise UserError(f"--inception_weights {weights} does not exist")
    with open(weights, "rb") as f:
        fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
    try:
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as error:                                      # not a state dict of it
        raise UserError(f"--inception_weights {weights} is not pytorch-fid's Inception weights "
                        f"file ({type(error).__name__})") from None
    return net.to(device), fingerprint, True


@torch.no_grad()
def inception_features(net, images, batch_size, desc):
    """uint8 images (N, 3, H, W), any indexable (an array, a memory map, a lazy folder) ->
    float64 pool3 features (N, 2048), in batches, with a progress bar."""
    device, out = next(net.parameters()).device, []
    for start in tqdm(range(0, len(images), batch_size), desc, disable=None):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # a copy
        out.append(net.eval()(x.float() / 255).double().cpu())
    return torch.cat(out).numpy()


class ImageFolder:
    """The sample images under `root` as uint8 (3, H, W), read on indexing with PIL as RGB."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise UserError(f"--samples {root} is not a folder")
        paths = ddpm.find_images(root, False)[0]
        self.paths = [p for p in paths if os.path.basename(p) not in NOT_SAMPLES]
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
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")).transpose(2, 0, 1)
        return np.stack([read(p) for p in self.paths[index]])


def reference_features(args, height, width, net, fingerprint):
    """The reference images' features at the samples' size, from the cache when it has them."""
    data = argparse.Namespace(image_size=[height, width], dataset_path=args.reference,
                              class_conditional=False, cache_dir=args.cache_dir,
                              num_workers=args.num_workers, procedural_size=args.reference_size,
                              seed=0)
    if args.reference is not None and not os.path.isdir(args.reference):
        raise UserError(f"--reference {args.reference} is not a folder")
    images = ddpm.load_dataset(data, log=lambda line: print(line, file=sys.stderr))[0]
    path = f"{images.filename[:-len('.npy')]}-inception-{fingerprint}.npy"
    if os.path.exists(path):
        return np.load(path), path
    features = inception_features(net, images, args.batch_size, "reference features")
    np.save(f"{path}.{os.getpid()}.tmp.npy", features)
    os.replace(f"{path}.{os.getpid()}.tmp.npy", path)               # never half a file
    return features, path


# ------------------------------------------------------------------------------------------------
# Sampling a checkpoint
# ------------------------------------------------------------------------------------------------

def sample_checkpoint(args, out_dir):
    """Draw --num_samples images with the script that wrote --checkpoint, in this process.
    -> a record of what was run: method, sampler, steps, seconds, peak memory."""
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{args.checkpoint} cannot be read as a checkpoint "
                        f"({type(error).__name__})") from None
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    if method not in METHODS:
        raise UserError(f"{args.checkpoint} is not a checkpoint of this repository's scripts "
                        f"({', '.join(m + '.py' for m in METHODS)})")
    sampler = args.sampler or ckpt["args"]["sampler"]
    steps = args.sampling_steps or ckpt["args"]["sampling_steps"]
    del ckpt
    argv = ["--sample", "--checkpoint", args.checkpoint, "--output_dir", out_dir,
            "--num_samples", str(args.num_samples), "--batch_size", str(args.batch_size),
            "--seed", str(args.seed), "--sampler", sampler, "--sampling_steps", str(steps)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status = importlib.import_module(method).main(argv)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(status)                                    # its error line is printed
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
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pos = ddpm.at_least(1)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="sample this checkpoint with the script that wrote it")
    what.add_argument("--samples", help="a folder of sample images")
    p.add_argument("--reference", help="the real images' folder (default: built-in landscapes)")
    p.add_argument("--reference_size", type=pos, default=4096,
                   help="built-in landscapes in the reference (without --reference)")
    p.add_argument("--num_samples", type=pos, default=10_000, help="with --checkpoint")
    p.add_argument("--sampler", help="with --checkpoint (default: the checkpoint's)")
    p.add_argument("--sampling_steps", type=pos, help="with --checkpoint (default: its own)")
    p.add_argument("--seed", type=ddpm.at_least(0), default=0, help="noise seed of the samples")
    p.add_argument("--batch_size", type=pos, default=50, help="images per sampling and "
                   "Inception batch")
    p.add_argument("--inception_weights", help="pytorch-fid's weights file, or 'random' "
                   "(default: download it once into the torch hub cache)")
    p.add_argument("--kid_subsets", type=pos, default=100)
    p.add_argument("--kid_subset_size", type=ddpm.at_least(2), default=1000)
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
    """Sample (or read) the images, compare them with the reference. -> the metrics dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.output_dir or default_output_dir(args)
    start, record = time.perf_counter(), {}
    if args.checkpoint:                                # first, so that its peak memory is its own
        record = sample_checkpoint(args, os.path.join(out, "samples"))
        samples = ImageFolder(os.path.join(out, "samples"))
    else:
        samples = ImageFolder(args.samples)
    if len(samples) < args.kid_subset_size:                         # before any feature
        raise UserError(f"{len(samples)} samples: KID needs at least --kid_subset_size "
                        f"{args.kid_subset_size}; lower it or give more samples")
    net, fingerprint, real = load_inception(args.inception_weights, device)
    fake = inception_features(net, samples, args.batch_size, "sample features")
    ref, cache = reference_features(args, samples.height, samples.width, net, fingerprint)
    if min(len(fake), len(ref)) < 2:
        raise UserError(f"{len(fake)} samples and {len(ref)} reference images: a covariance "
                        f"needs at least 2 of each")
    if len(samples) < 10_000:
        print(f"note: {len(samples)} samples; FID is biased upwards below the papers' 50,000: "
              f"compare only numbers with the same N", file=sys.stderr)
    kid = kernel_inception_distance(fake, ref, args.kid_subsets, args.kid_subset_size)
    fd = features_frechet_distance(fake, ref)
    names = ("fid", "kid") if real else ("random_feature_fd", "random_feature_kd")
    metrics = {names[0]: fd, f"{names[1]}_mean": kid[0], f"{names[1]}_std": kid[1],
               "num_samples": len(samples), "num_reference": len(ref),
               "resolution": f"{samples.height}x{samples.width}",
               "samples": args.samples or os.path.join(out, "samples"),
               "reference": args.reference or f"built-in landscapes ({args.reference_size})",
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
    with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
        json.dump(m, f, indent=2)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
    header = ["samples", "N", "resolution", "sampler", "steps", label[0], label[1], "seconds",
              "device"]
    row = [m.get("checkpoint") or m["samples"], m["num_samples"], m["resolution"],
           m["sampler"] or "-", m["sampling_steps"] or "-", f"{m[names[0]]:.3f}",
           f"{m[names[1] + '_mean']:.5f} +- {m[names[1] + '_std']:.5f}", m["seconds"],
           m["device"]]
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| "
                + " | ".join(map(str, row)) + " |\n")


def main(argv=None):
    try:
        evaluate(build_parser().parse_args(argv))
        return 0
    except UserError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
