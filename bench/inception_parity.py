"""bench/inception.py against pytorch-fid's own network, in float64, on the same weights.

pytorch-fid is not a dependency of this repository: run this with the python of an environment
that has it (it needs torchvision), for example the one bench/compare_peer.py describes:
    python -m venv peer && peer/bin/pip install pytorch-fid -r requirements.txt
    peer/bin/python bench/inception_parity.py --out bench/results/inception_parity.md

Without the weights file (a download) both networks get the same random weights: pytorch-fid's
torchvision-built Inception-v3 with its FID blocks, random batch-norm statistics too, is loaded
into ours with strict=True (the names match), and ours' He-normal weights into it. With
--weights PATH (pt_inception-2015-12-05-6726825d.pth) both load the file. Reported: the largest
difference of the pool3 features at three input sizes (the resize to 299 is inside both).
--manifest PATH writes the names and shapes of pytorch-fid's state dict (the file that
tests/test_evaluate.py compares ours with: tests/data/pytorch_fid_inception_shapes.json).
"""

import argparse
import importlib.metadata
import json
import os
import sys

import torch
from pytorch_fid import inception as fid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from inception import InceptionV3  # noqa: E402


def pytorch_fid_network(state):
    """pytorch-fid's InceptionV3 (pool3 output), its weights `state` instead of the download."""
    fid.load_state_dict_from_url = lambda *args, **kwargs: state
    return fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).double().eval()


def random_state(seed):
    """A state dict of pytorch-fid's architecture with random weights and batch-norm statistics."""
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
    blocks = dict(Mixed_5b=fid.FIDInceptionA(192, 32), Mixed_5c=fid.FIDInceptionA(256, 64),
                  Mixed_5d=fid.FIDInceptionA(288, 64), Mixed_6b=fid.FIDInceptionC(768, 128),
                  Mixed_6c=fid.FIDInceptionC(768, 160), Mixed_6d=fid.FIDInceptionC(768, 160),
                  Mixed_6e=fid.FIDInceptionC(768, 192), Mixed_7b=fid.FIDInceptionE_1(1280),
                  Mixed_7c=fid.FIDInceptionE_2(2048))
    for name, block in blocks.items():
        setattr(net, name, block)
    g, state = torch.Generator().manual_seed(seed), net.state_dict()
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        elif ".bn." in k and v.dtype.is_floating_point:
            state[k] = torch.randn(v.shape, generator=g) * 0.1 + k.endswith("weight")
    return state


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="pt_inception-2015-12-05-6726825d.pth (default: random)")
    p.add_argument("--out", help="also write the report here")
    p.add_argument("--manifest", help="write pytorch-fid's parameter names and shapes here")
    args = p.parse_args()
    if args.manifest:
        with open(args.manifest, "w") as f:
            json.dump({k: list(v.shape) for k, v in random_state(0).items()}, f, indent=0)
    g = torch.Generator().manual_seed(0)
    if args.weights:
        states = {"the weights file": torch.load(args.weights, map_location="cpu")}
    else:
        states = {"pytorch-fid's random weights": random_state(1),
                  "our He-normal random weights": InceptionV3(seed=0).state_dict()}
    rows = []
    for name, state in states.items():
        ours = InceptionV3()
        ours.load_state_dict(state, strict=True)
        ours, theirs = ours.double(), pytorch_fid_network(state)
        for shape in [(3, 3, 32, 32), (2, 3, 48, 64), (2, 3, 299, 299)]:
            x = torch.rand(shape, generator=g, dtype=torch.float64)
            with torch.no_grad():
                a, b = theirs(x)[0].flatten(1), ours(x)
            rows.append([name, "x".join(map(str, shape)), f"{(a - b).abs().max().item():.1e}",
                         f"{b.std(0).mean().item():.2e}"])
    lines = report.header("Our Inception-v3 against pytorch-fid's", "inception_parity.py",
                          sys.argv[1:])
    lines += [f"pytorch-fid {importlib.metadata.version('pytorch-fid')}; every state dict loaded "
              "into ours with strict=True (all keys matched).", "",
              report.table(["weights", "input", "max abs difference (float64)",
                            "feature std across the batch"], rows), ""]
    report.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
