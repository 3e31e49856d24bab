"""Command line of the placement tuner: every policy on a model's factors, and the one to use.

    python scripts/tune_placement.py convnet --replicas 4
    python scripts/tune_placement.py ResNet50 --replicas 8 --measure
    python scripts/tune_placement.py ResNet50 --input-shape 160,160,3 --replicas 64 --json
    python scripts/tune_placement.py path/to/model.keras --replicas 2

The logic lives in `kfac_dist.jobs.tuner`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        help="an example name (autoencoder, convnet), a keras.applications name "
        "(ResNet50, built with weights=None) or the path of a saved .keras model",
    )
    parser.add_argument("--replicas", "-n", type=int, required=True, help="replicas in sync")
    parser.add_argument(
        "--input-shape",
        type=lambda text: tuple(int(d) for d in text.split(",")),
        help="input shape of a keras.applications model, e.g. 224,224,3",
    )
    parser.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    parser.add_argument(
        "--inverse-sharing",
        choices=("auto", "all_reduce", "all_gather"),
        default="auto",
        help="Kfac's inverse_sharing, which sets the bytes of sharing the inverses",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="price each factor size by timing real inversions on this machine "
        "(MeasuredCostModel) instead of counting flops",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size")
    parser.add_argument(
        "--unsupported-layers",
        choices=("error", "diagonal"),
        default="error",
        help="what to do with trainable layers K-FAC has no block for",
    )
    parser.add_argument("--names-width", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from kfac_dist.jobs import tuner
    from kfac_dist.placement import MeasuredCostModel

    args = parse_args(argv)
    model = tuner.load_model(args.model, args.input_shape)
    units = tuner.model_units(model, args.unsupported_layers)
    cost_model = (
        MeasuredCostModel(args.inverse_method, repeats=args.repeats) if args.measure else None
    )
    tuning = tuner.tune(
        units,
        args.replicas,
        inverse_method=args.inverse_method,
        cost_model=cost_model,
        sharing=args.inverse_sharing,
    )
    if args.json:
        print(json.dumps({"model": model.name, **tuner.tuning_to_dict(tuning)}, indent=1))
    else:
        title = f"model {model.name}: {args.replicas} replicas"
        print(tuner.format_tuning(tuning, title=title, names_width=args.names_width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
