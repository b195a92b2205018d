"""Converts pytorch-fid's InceptionV3 FID weights (.pth) to the .npz that `evaluation.inception`
loads. Run once, where torch is installed (it is not a dependency of this project):

    python -m evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
        ~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.npz

The .pth is read with `torch.load(..., weights_only=True)` (tensors only, no arbitrary pickled
objects); every key and shape is checked against the Flax architecture before anything is
written. The .npz keeps the torch names and layouts, so it can be inspected against the source.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

import numpy as np

from evaluation import inception


def state_dict_to_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
    """{name: float32 numpy array} of a state_dict of torch tensors (or arrays), without the
    BatchNorm `num_batches_tracked` counters; raises ValueError if it is not InceptionV3's."""
    arrays = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        arrays[key] = np.asarray(value, np.float32)
    inception.torch_to_flax(arrays)  # validates names and shapes
    return arrays


def convert(state_dict: Mapping, out_path: str) -> None:
    arrays = state_dict_to_arrays(state_dict)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez(out_path, **arrays)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pth", help=f"pytorch-fid weights, {inception.SOURCE_FILE}")
    parser.add_argument("npz", nargs="?", default=os.path.expanduser(inception.DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)
    import torch  # only the converter needs it

    convert(torch.load(args.pth, map_location="cpu", weights_only=True), args.npz)
    print(f"wrote {args.npz}")


if __name__ == "__main__":
    main()
