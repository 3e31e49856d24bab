"""The factor-split benchmark's command: one large Kronecker pair kept whole against its blocks.

    python scripts/benchmark_factor_split.py
    python scripts/benchmark_factor_split.py --dim 4608 --output-dim 512 --bounds none,2048,1024,512

The pair is ResNet-50's largest: A 4608×4608 (a 3×3 convolution over 512
channels, bias left out so that every bound divides it) and G 512×512. For
each bound it times, with the library's own ops in one `tf.function` each,
the inversion of A's blocks and G (Cholesky with its damping and
conditioning check, or eigh) and the preconditioning of a (4608, 512)
gradient matrix, float32; the minimum of `--repeats` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _bounds(text: str) -> list[int | None]:
    return [None if b.lower() == "none" else int(b) for b in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4608)
    parser.add_argument("--output-dim", type=int, default=512)
    parser.add_argument("--bounds", type=_bounds, default=_bounds("none,2048,1024,512,256"))
    parser.add_argument("--methods", default="cholesky,eigen")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from kfac_dist import linalg
    from kfac_dist.jobs.factor_split_timing import random_spd, time_bound

    rng = np.random.default_rng(0)
    a, g = random_spd(args.dim, rng), random_spd(args.output_dim, rng)
    print(f"A {args.dim}x{args.dim}, G {args.output_dim}x{args.output_dim}, float32, seconds")
    print("| method | max_factor_dim | blocks | inversion | preconditioning | total |")
    print("|:---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for bound in args.bounds:
            split = linalg.split_of(args.dim, bound)
            blocks = "1" if split is None else f"{split.members}×{split.size}"
            inv, pre = time_bound(a, g, bound, method, args.repeats)
            print(f"| {method} | {bound} | {blocks} | {inv:.3f} | {pre:.4f} | {inv + pre:.3f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
