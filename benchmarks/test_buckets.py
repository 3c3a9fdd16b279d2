"""Step time per aspect-ratio bucket at equal area: a 2.39:1 frame should cost what a square of the same pixels does.

    pytest benchmarks/test_buckets.py --model-size small
"""

import pytest

from benchmarks.cases import RESOLUTION, bucket_step
from benchmarks.harness import versions
from ddiff_core.families import get_family


def _buckets(size, family="flux"):
    return get_family(family).default_buckets(RESOLUTION.get(size, 64))


@pytest.mark.parametrize("index", range(len(_buckets("small"))))
def test_bucket_step(benchmark, bench_env, timing_enabled, index):
    if bench_env.size == "full":
        pytest.skip("--model-size full runs benchmarks/test_full_model.py only")
    buckets = _buckets(bench_env.size, bench_env.family)
    if index >= len(buckets):
        pytest.skip(f"{bench_env.size} has {len(buckets)} buckets")
    bucket = buckets[index]
    step = bucket_step(bench_env, bucket)
    benchmark.group = "bucket_step"
    benchmark.extra_info.update(case="bucket_step", variant=str(bucket), bucket=str(bucket), pixels=bucket.height * bucket.width,
                                size=bench_env.size, device=bench_env.device, dtype=bench_env.dtype,
                                family=bench_env.family, **versions())
    benchmark.pedantic(step, rounds=10 if timing_enabled else 1, warmup_rounds=2 if timing_enabled else 0, iterations=1)
