"""Before vs after for each efficiency fix: two parameters of one pytest-benchmark group per fix.

    pytest benchmarks --model-size small --benchmark-json .benchmarks/results.json
"""

import pytest

from benchmarks.cases import NotApplicable
from benchmarks.harness import run_case

ROUNDS = {  # timed rounds per variant on the CPU; each is a whole step / validation / request
    "vae_scaling": 20, "feature_caches": 20, "gradient_checkpointing": 20, "mixed_precision": 10, "compile": 20,
    "lora_input_casts": 20,
    "validation_reload": 5, "validation_batching": 5, "serving": 5, "lora_switch": 50, "lora_list": 50,
    "dataloader": 5, "ddp_no_sync": 1,
}


@pytest.fixture(autouse=True)
def _sizes_only(bench_env):
    if bench_env.size == "full":
        pytest.skip("--model-size full runs benchmarks/test_full_model.py only")


@pytest.mark.parametrize("variant", ["before", "after"])
@pytest.mark.parametrize("case", list(ROUNDS))
def test_fix(benchmark, bench_env, timing_enabled, case, variant):
    try:
        run_case(benchmark, bench_env, case, variant, rounds=ROUNDS[case] if timing_enabled else 1,
                 timing=timing_enabled)
    except NotApplicable as reason:
        pytest.skip(str(reason))
