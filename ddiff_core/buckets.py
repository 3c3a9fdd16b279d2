"""Aspect-ratio buckets: each still trains in the frame it was shot in (1.85:1, 2.39:1, ...), not a square crop.

A bucket is a (height, width) of about ``--resolution``² pixels; every image goes to the bucket nearest its aspect
ratio, is resized to cover it and cropped; a batch holds images of one bucket only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

# Film and photo frames, landscape; their portrait forms are added too.
FRAME_RATIOS = {"1:1": 1.0, "5:4": 5 / 4, "4:3": 4 / 3, "3:2": 3 / 2, "16:9": 16 / 9, "1.85:1": 1.85, "2.39:1": 2.39}
# An image enlarged more than this to cover its bucket is trained blurred: it is counted and warned about.
MAX_UPSCALE = 1.5


class BucketError(ValueError):
    """A bucket list that cannot be used; one line."""


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def bucket_for(resolution: int, ratio: float, multiple: int) -> Bucket:
    """The bucket of about resolution² pixels with this width/height ratio, sides rounded to ``multiple``."""
    width = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
    height = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
    return Bucket(height, width)


def default_buckets(resolution: int, multiple: int) -> list[Bucket]:
    """One bucket per frame ratio and its portrait form (duplicates that rounding makes are merged), by ratio."""
    ratios = [r for r in FRAME_RATIOS.values()] + [1 / r for r in FRAME_RATIOS.values() if r != 1.0]
    return sorted({bucket_for(resolution, r, multiple) for r in ratios}, key=lambda b: b.ratio)


def aspect_ratio(name: str) -> float:
    """'2.39:1' -> 2.39, '2:3' -> 0.667 (width over height).

    Raises:
        ValueError: not 'W:H' with positive numbers.
    """
    width, sep, height = str(name).partition(":")
    try:
        ratio = float(width) / float(height)
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"aspect {name!r} is not W:H") from err
    if not sep or not 0 < ratio < 100:
        raise ValueError(f"aspect {name!r} is not W:H")
    return ratio


def parse_buckets(text: str) -> list[Bucket]:
    """'h1,w1;h2,w2' (upstream's --aspect_ratio_buckets) -> buckets.

    Raises:
        BucketError: unparsable, or a side that is not a positive whole number.
    """
    buckets = []
    for part in (p.strip() for p in str(text).split(";")):
        match = re.fullmatch(r"(\d+)\s*,\s*(\d+)", part)
        if not match:
            raise BucketError(f"--aspect_ratio_buckets: {part!r} is not 'height,width' (list them as 'h1,w1;h2,w2')")
        height, width = int(match.group(1)), int(match.group(2))
        if height == 0 or width == 0:
            raise BucketError(f"--aspect_ratio_buckets: {part!r} has a zero side")
        buckets.append(Bucket(height, width))
    by_ratio: dict[float, Bucket] = {}
    for bucket in buckets:
        other = by_ratio.setdefault(round(bucket.ratio, 6), bucket)
        if other != bucket:  # the nearest-ratio rule would never pick one of them
            raise BucketError(f"--aspect_ratio_buckets: {other} and {bucket} have the same aspect ratio; keep one")
    return sorted(set(buckets), key=lambda b: b.ratio)


def check_buckets(buckets: list[Bucket], multiple: int, family: str) -> None:
    """Raises BucketError when a side is not a multiple of what the family needs."""
    for bucket in buckets:
        if bucket.height % multiple or bucket.width % multiple:
            raise BucketError(f"--aspect_ratio_buckets: {bucket} has a side that is not a multiple of {multiple}, "
                              f"which {family} needs")


def nearest_bucket(size: tuple[int, int], buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio) to a (width, height) image's."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - ratio), b.height * b.width))


def upscale(size: tuple[int, int], bucket: Bucket) -> float:
    """How much a (width, height) image is enlarged to cover the bucket (1.0 or less: it is not)."""
    return max(bucket.width / size[0], bucket.height / size[1])


def bucket_report(sizes: list[tuple[int, int]], names: list[str], targets: list[Bucket]) -> dict:
    """What buckets.json holds: images per bucket, how many enlarged beyond MAX_UPSCALE, each image's bucket, and the
    share of each image's pixels the crop keeps."""
    counts = Counter(str(t) for t in targets)
    enlarged = Counter(str(t) for s, t in zip(sizes, targets) if upscale(s, t) > MAX_UPSCALE)
    kept = [pixels_kept(s, t) for s, t in zip(sizes, targets)]
    return {
        "buckets": [{"bucket": str(b), "ratio": round(b.ratio, 3), "images": counts[str(b)],
                     "upscaled_beyond_limit": enlarged[str(b)]}
                    for b in sorted(set(targets), key=lambda b: b.ratio)],
        "images": len(targets), "upscaled_beyond_limit": sum(enlarged.values()), "max_upscale": MAX_UPSCALE,
        "pixels_kept_mean": round(sum(kept) / len(kept), 4), "pixels_kept_worst": round(min(kept), 4),
        "assignment": {name: str(t) for name, t in zip(names, targets)},
    }


def pixels_kept(size: tuple[int, int], bucket: Bucket) -> float:
    """The share of a (width, height) image's area that survives resizing to cover ``bucket`` and cropping it."""
    scale = upscale(size, bucket)
    return (bucket.width * bucket.height) / (size[0] * scale * size[1] * scale)


def most_common(targets: list[Bucket]) -> Bucket:
    return Counter(targets).most_common(1)[0][0]
