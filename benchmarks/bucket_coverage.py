"""How much of each still a square crop keeps vs its aspect-ratio bucket (share of the image's pixels).

    python -m benchmarks.bucket_coverage [--data data/demo] [--resolution 1024]
"""

import argparse
import json

from ddiff_core.buckets import Bucket, default_buckets, nearest_bucket, pixels_kept
from ddiff_core.config import TrainConfig
from ddiff_core.data import load_records, screen_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--multiple", type=int, default=16)
    args = parser.parse_args()
    records, _ = load_records(TrainConfig(instance_data_dir=args.data))
    records, _ = screen_records(records)
    buckets = default_buckets(args.resolution, args.multiple)
    square = [pixels_kept(r.size, Bucket(args.resolution, args.resolution)) for r in records]
    bucketed = [pixels_kept(r.size, nearest_bucket(r.size, buckets)) for r in records]
    print(json.dumps({
        "images": len(records), "resolution": args.resolution,
        "square_kept_mean": round(sum(square) / len(square), 3), "square_kept_worst": round(min(square), 3),
        "buckets_kept_mean": round(sum(bucketed) / len(bucketed), 3), "buckets_kept_worst": round(min(bucketed), 3),
        "per_image": {r.name: [round(a, 3), round(b, 3)] for r, a, b in zip(records, square, bucketed)},
    }))


if __name__ == "__main__":
    main()
