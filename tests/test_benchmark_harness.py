"""The benchmark harness itself: what a GPU window's run brings back when its time limit cuts it off."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch

from .conftest import REPO


def test_a_run_cut_off_mid_variant_still_writes_the_variants_it_measured(tmp_path):
    # gpu_run.sh ends pytest with SIGINT at its time limit; a variant interrupted before its first round ended has no
    # data, and pytest-benchmark would fail on it while writing the JSON, losing every variant measured before. The
    # SIGINT must also be heard where the session was started with it ignored (in the background of a script).
    (tmp_path / "test_cut.py").write_text(textwrap.dedent("""
        import os, signal

        def test_measured(benchmark):
            benchmark.pedantic(lambda: None, rounds=2)

        def test_cut_off(benchmark):
            benchmark.pedantic(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=2)
    """))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.conftest",
                           "test_cut.py", "--benchmark-json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_measured"]


def test_a_run_killed_mid_variant_leaves_the_variants_it_measured_in_a_partial_json(tmp_path):
    # A SIGINT heard too late (inside a long compile) runs on to timeout's SIGKILL, and pytest-benchmark, which writes
    # its JSON only at the session's end, would bring back nothing: the partial file, rewritten after each test, stays.
    (tmp_path / "test_killed.py").write_text(textwrap.dedent("""
        import os, signal

        def test_measured(benchmark):
            benchmark.pedantic(lambda: None, rounds=2)

        def test_also_measured(benchmark):
            benchmark.pedantic(lambda: None, rounds=2)

        def test_killed(benchmark):
            os.kill(os.getpid(), signal.SIGKILL)
    """))

    results = tmp_path / "results"  # not the working directory: the JSON path must be used as given
    results.mkdir()

    def run(*selection):
        out = results / f"out{len(selection)}.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                               "benchmarks.conftest", "test_killed.py", *selection, "--benchmark-json", str(out)],
                              cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=300)
        return proc, out, out.with_name(out.name + ".partial")

    stale = results / "out2.json.partial"  # the name of the next run's JSON
    stale.write_text('{"benchmarks": [{"name": "from an earlier run"}]}')
    proc, out, partial = run("-k", "not measured")  # killed in its first variant: nothing measured, and no stale stand-in
    assert proc.returncode == -signal.SIGKILL
    assert not partial.exists()
    proc, out, partial = run()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or out.stat().st_size == 0
    assert [b["name"] for b in json.loads(partial.read_text())["benchmarks"]] == ["test_measured", "test_also_measured"]
    proc, out, partial = run("-k", "measured")  # a session that ends normally: the full JSON, no partial beside it
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert [b["name"] for b in json.loads(out.read_text())["benchmarks"]] == ["test_measured", "test_also_measured"]
    assert not partial.exists()


def test_the_kernel_table_sorts_a_steps_gpu_time_by_what_each_kernel_does_and_the_report_shows_it(tmp_path):
    from benchmarks.harness import kernel_category, kernel_table
    from benchmarks.report import render

    named = {  # kernel names as the H100/H200 stacks print them
        "void flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>": "attention backward",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80": "attention backward",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>": "attention forward",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "GEMM",
        "triton_poi_fused__to_copy_add_mul_0": "compiled (triton)",
        "triton_poi_fused__scaled_dot_product_flash_attention_transpose_0": "compiled (triton)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>":
            "copies and casts",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norms and reductions",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void kOptimizer32bit2State<float, 0>": "optimizer",
        "void at::native::(anonymous namespace)::normal_kernel<float>": "random numbers",
        "gemvx_kernel<int, int, float>": "GEMM",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other elementwise",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
        "Memset (Device)": "other",
    }
    assert {name: kernel_category(name) for name in named} == named
    kernels = [(name, 1000.0 * (i + 1), 2 * (i + 1)) for i, name in enumerate(named)]  # two steps
    table = kernel_table(kernels, steps=2)
    assert [row["ms"] for row in table] == sorted((row["ms"] for row in table), reverse=True)
    assert abs(sum(row["share"] for row in table) - 1) < 1e-9
    assert abs(sum(row["ms"] for row in table) - sum(us for _, us, _ in kernels) / 2000) < 1e-9
    attention_bwd = next(row for row in table if row["category"] == "attention backward")
    assert (attention_bwd["ms"], attention_bwd["launches"]) == (1.5, 3)  # (1 + 2) ms over 2 steps, (2 + 4) / 2
    assert attention_bwd["top"] == "fmha_cutlassB_bf16_aligned_64x64_k128_sm80"
    assert kernel_table([("a_gemm", 10.0, 3), ("b_gemm", 10.0, 3)], steps=2)[0]["launches"] == 3  # 6 over 2 steps

    info = {"case": "full_flux_trainer", "variant": "1024px-b1-compile-no-ckpt", "resolution": 1024, "batch": 1,
            "compile": True, "checkpointing_interval": 0, "peft_input_casts": False, "torch": "2.11", "diffusers": "0.42",
            "device_name": "NVIDIA H200", "kernels": table}
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "t", "extra_info": info, "stats": {"median": 0.5}}]}))
    text = render([path])
    assert "### Where the GPU time of one step goes: 1024px-b1-compile-no-ckpt" in text
    assert f"| attention backward | 1.5 | {attention_bwd['share'] * 100:.0f}% | 3 |" in text


def test_the_step_clock_times_any_scripts_optimizer_steps_and_counts_what_it_trains(tmp_path):
    # benchmarks.upstream_pair clocks ddiff's and upstream's scripts alike, unchanged: the gaps between the ends of
    # consecutive optimizer steps, and the parameters the optimizer holds (the pair refuses two different LoRAs).
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import sys, time, torch
        frozen, lora = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
        frozen.requires_grad_(False)
        opt = torch.optim.AdamW(lora.parameters())
        for _ in range(int(sys.argv[1])):
            time.sleep(0.05)
            lora(frozen(torch.randn(2, 4))).sum().backward()
            opt.step()
            opt.zero_grad()
    """))
    clock = tmp_path / "clock.json"
    subprocess.run([sys.executable, "-m", "benchmarks.step_clock", str(tmp_path / "train.py"), "6"], check=True,
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "DDIFF_STEP_CLOCK": str(clock)}, timeout=120)
    record = json.loads(clock.read_text())
    assert len(record["step_ends"]) == 6
    assert record["trainable_params"] == 4 * 3 + 3

    from benchmarks.step_clock import step_times

    times = step_times(record["step_ends"], warmup=1)
    assert len(times) == 4 and all(t >= 0.05 for t in times)


def test_the_torchvision_stand_in_is_seen_by_the_upstream_script_alone_and_transforms_as_torchvision_does(tmp_path):
    # Upstream's image pipeline (resize the short side, crop, to tensor, normalize) through the stand-in, while
    # transformers and diffusers in the same process go on finding no torchvision (their availability checks would
    # otherwise import torchvision modules the stand-in does not have).
    (tmp_path / "other_library.py").write_text(textwrap.dedent("""
        try:
            import torchvision.transforms
            SEES_TORCHVISION = True
        except ImportError:
            SEES_TORCHVISION = False
    """))
    (tmp_path / "upstream.py").write_text(textwrap.dedent("""
        import importlib.util, json, sys
        import torch
        from PIL import Image
        from torchvision import transforms
        from torchvision.transforms.functional import crop
        import other_library

        image = Image.new("RGB", (300, 200), (255, 255, 255))
        image.paste((0, 0, 0), (120, 60, 180, 140))  # a black box in the middle of white
        resized = transforms.Resize(100, interpolation=transforms.InterpolationMode.BILINEAR)(image)
        centre = transforms.CenterCrop(100)(resized)
        torch.manual_seed(0)
        boxes = [transforms.RandomCrop(100).get_params(resized, (100, 100)) for _ in range(50)]
        tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(centre)
        json.dump({"resized": resized.size, "centre": centre.size, "boxes": boxes,
                   "crop": crop(image, 10, 20, 30, 40).size, "range": [tensor.min().item(), tensor.max().item()],
                   "shape": list(tensor.shape), "others_see_torchvision": other_library.SEES_TORCHVISION,
                   "found_by_spec": importlib.util.find_spec("torchvision") is not None},
                  open(sys.argv[1], "w"))
    """))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-m", "benchmarks.step_clock", str(tmp_path / "upstream.py"), str(out)], check=True,
                   cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "DDIFF_TORCHVISION_SHIM": "1",
                                                   "DDIFF_STEP_CLOCK": str(tmp_path / "clock.json")})
    seen = json.loads(out.read_text())
    assert seen["resized"] == [150, 100]  # PIL's (width, height): the short side to 100, the aspect kept
    assert seen["centre"] == [100, 100] and seen["crop"] == [40, 30]
    assert all(0 <= top <= 0 and 0 <= left <= 50 and (h, w) == (100, 100) for top, left, h, w in seen["boxes"])
    assert len({left for _, left, _, _ in seen["boxes"]}) > 1  # random, within the image
    assert seen["shape"] == [3, 100, 100] and seen["range"] == [-1.0, 1.0]
    import importlib.util
    if importlib.util.find_spec("torchvision") is None:  # the real one is not installed here
        assert not seen["others_see_torchvision"] and not seen["found_by_spec"]


def test_the_attention_probe_records_a_crashing_case_and_goes_on(tmp_path):
    # Each case runs in a process of its own because cuDNN's backward ended the CUDA context with an illegal memory
    # access: a case that dies must come back as that case's status, with its error line, and the probe go on.
    from benchmarks.attention_probe import probe, render, run_case

    ok = run_case("math", "cpu", seq=64, heads=2, head_dim=16, iters=2)
    assert ok["status"] == "ok" and ok["rel_err_vs_math"] == {"out": 0.0, "dq": 0.0} and ok["bwd_ms"] > 0
    results = probe("cpu", seq=64, heads=2, head_dim=-1, iters=2)  # a negative size: the child raises
    assert results["math"]["status"].startswith("failed (exit 1): RuntimeError") and "negative" in results["math"]["status"]
    assert results["cudnn-diffusers"]["status"] == "unavailable: needs CUDA"
    table = render({"device_name": "cpu", "torch": "x", "seq": 64, "heads": 2, "head_dim": -1, "iters": 2,
                    "blocks": 57, "cases": {**results, "flash": ok}})
    assert "| math | failed (exit 1)" in table and "| flash | ok |" in table


def test_the_matched_gradient_reaches_attention_in_the_outputs_own_layout():
    # ddiff_cudnn's fix for the suspected cause of cuDNN's crash: the output's gradient arrives in FLUX's (B, S, H, D)
    # layout, whose strides differ from the (B, H, S, D) output's; GradInOutputLayout hands it on in the output's layout.
    from ddiff_core.speed import GradInOutputLayout as _GradLike

    seen, grads = {}, {}
    upstream = torch.randn(1, 8, 8)
    for matched in (False, True):
        x = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)  # (B, H, S, D)
        y = x * 2.0
        y.register_hook(lambda g, m=matched: seen.__setitem__(m, g.stride()))
        z = _GradLike.apply(y) if matched else y
        z.permute(0, 2, 1, 3).flatten(2, 3).backward(upstream)
        grads[matched] = x.grad
    assert seen[True] == (64, 32, 4, 1) and seen[False] != seen[True]
    assert torch.equal(grads[True], grads[False])  # the layout changes, the values do not


def test_the_probe_sends_the_gradients_of_both_flux_block_kinds_with_the_same_values():
    # A single-stream block's attention output is concatenated with its 4x wider MLP output, so the gradient reaching
    # the attention is a slice with rows 5 x H*D apart; a double-stream block's is contiguous. "both" sends the two in
    # turn (single blocks first, as the backward meets them).
    from benchmarks.attention_probe import gradient_layouts

    grad = torch.randn(1, 6, 8)
    single, double = gradient_layouts(grad, "cudnn-views-both")
    assert double.stride() == (48, 8, 1) and single.stride() == (240, 40, 1)
    assert torch.equal(single, grad) and torch.equal(double, grad)
    assert [g.stride() for g in gradient_layouts(grad, "cudnn-views-single")] == [(240, 40, 1)]
    assert [g.stride() for g in gradient_layouts(grad, "cudnn-views-double")] == [(48, 8, 1)]


def test_bf16_lora_weights_lose_most_adamw_updates_of_lora_a_and_fp32_ones_keep_them(tmp_path):
    # What the upstream pair reports beside the time: upstream's bf16 LoRA under bf16 mixed precision cannot move most
    # of peft's Gaussian lora_A at lr 1e-4 (ddiff keeps the LoRA in fp32). Small weights (under 1/32) still move.
    from benchmarks.upstream_pair import bf16_update_survival, script_provenance

    result = bf16_update_survival(rank=4, width=512, steps=5)
    assert result["moved"]["float32"] == 1.0
    assert 0.0 < result["moved"]["bfloat16"] < 0.3
    script = tmp_path / "train.py"
    script.write_text('check_min_version("0.33.0.dev0")\n')
    assert script_provenance(script)["check_min_version"] == "0.33.0.dev0"


def test_gpu_run_tries_the_trainer_on_ddiff_cudnn_only_where_the_probe_found_it_running_right_and_faster(tmp_path):
    from benchmarks.attention_probe import cudnn_worth_a_trainer_run

    flash = {"status": "ok", "fwd_ms": 1.0, "bwd_ms": 3.0}
    matched = {"status": "ok", "fwd_ms": 0.8, "bwd_ms": 2.0, "rel_err_vs_flash": {"out": 4e-3, "dq": 8e-3}}
    assert cudnn_worth_a_trainer_run({"cases": {"flash": flash, "cudnn-matched": matched}})
    assert not cudnn_worth_a_trainer_run({"cases": {"flash": flash, "cudnn-matched": {**matched, "bwd_ms": 3.5}}})
    assert not cudnn_worth_a_trainer_run({"cases": {"flash": flash, "cudnn-matched": {
        **matched, "rel_err_vs_flash": {"out": 4e-3, "dq": 0.5}}}})
    assert not cudnn_worth_a_trainer_run({"cases": {"flash": flash, "cudnn-matched": {
        **matched, "rel_err_vs_flash": {"out": 4e-3, "dq": float("nan")}}}})  # NaN gradients: no
    assert not cudnn_worth_a_trainer_run({"cases": {"flash": flash, "cudnn-matched": {
        "status": "crashed (exit 1): RuntimeError: CUDA error: an illegal memory access was encountered"}}})
    # The H200's probe of 2026-11-27 (cuDNN on torch's layouts crashed, ddiff's layout ran): yes, as measured there.
    assert cudnn_worth_a_trainer_run(json.loads((REPO / "benchmarks/results/attention-h200.json").read_text()))
    result = tmp_path / "attention.json"  # the shell's question: exit 0 for yes, 1 for no (or no file)
    result.write_text(json.dumps({"cases": {"flash": flash, "cudnn-matched": matched}}))
    ask = [sys.executable, "-m", "benchmarks.attention_probe", "--worth-trying"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run(ask + [str(result)], env=env, capture_output=True, cwd=REPO).returncode == 0
    assert subprocess.run(ask + [str(tmp_path / "none.json")], env=env, capture_output=True, cwd=REPO).returncode == 1
