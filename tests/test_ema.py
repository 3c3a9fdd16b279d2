"""--use_ema: a moving average of the LoRA, saved beside it in the stock format, held in checkpoints and resumed
exactly; --validation_use_ema validates with it and leaves training untouched."""

import torch
from safetensors.torch import load_file

from ddiff_core.ema import LoraEMA

from .conftest import assert_resume_from_copy_is_exact, run_script, train_args

EMA_FILE = "pytorch_lora_weights_ema.safetensors"


def test_the_average_follows_diffusers_warmup_and_swaps_back():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA([("w", param)], decay=0.9)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()  # decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    ema.update()  # decay min(0.9, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9 * 2 / 11 + 9 / 11))
    with ema.swapped_in():
        assert torch.equal(param.detach(), ema.shadow[0])
    assert torch.equal(param.detach(), torch.ones(3))
    other = LoraEMA([("w", param)], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 2


def test_ema_resumes_exactly(tiny_flux, tmp_path):
    args = ["--use_ema", "--ema_decay", "0.9", "--max_train_steps", "6", "--checkpointing_steps", "3",
            "--learning_rate", "1e-2"]
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, args)
    a, b = (load_file(tmp_path / run / EMA_FILE) for run in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    assert lora.keys() == a.keys() and any(not torch.equal(lora[k], a[k]) for k in a)


def test_ema_weights_load_into_the_stock_pipeline_and_validation_with_them_changes_no_training(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    common = ["--use_ema", "--ema_decay", "0.5", "--max_train_steps", "4", "--learning_rate", "5e-2"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "plain", *common))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "validated", *common, "--validation_use_ema",
                                           "--validation_prompt", "a cat", "--validation_steps", "2",
                                           "--num_validation_images", "1", "--validation_inference_steps", "2"))
    for name in ("pytorch_lora_weights.safetensors", EMA_FILE):
        a, b = (load_file(tmp_path / run / name) for run in ("plain", "validated"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (tmp_path / "validated" / "validation" / "final-base-vs-lora.png").is_file()

    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = image()
    pipe.load_lora_weights(str(tmp_path / "plain"), weight_name=EMA_FILE)
    assert not torch.allclose(base, image(), atol=1e-4)
