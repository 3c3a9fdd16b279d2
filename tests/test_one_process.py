"""Several runs in one process: a family plugin holds facts, each run owns its objective, so runs set up side by
side (of different families, or of one family with different schedules) train exactly what each trains alone."""

import json

import torch
from safetensors.torch import load_file

from ddiff_core.config import parse_config
from ddiff_core.tiny import save_tiny_pipeline
from ddiff_core.trainer import LoraTrainer

from .conftest import train_args


def _weights(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


def _finish(trainer):
    trainer.train()
    trainer.save()
    trainer.cleanup()


def test_runs_set_up_side_by_side_train_what_each_trains_alone(tiny_flux, tmp_path):
    sdxl = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    other_schedule = tmp_path / "flux-shift3"  # the same FLUX weights with another timestep grid
    save_tiny_pipeline("flux", other_schedule)
    scheduler_config = other_schedule / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "shift": 3.0,
                                            "use_dynamic_shifting": False}))
    sd15 = save_tiny_pipeline("sd15", tmp_path / "sd15")
    common = ["--max_train_steps", "3", "--learning_rate", "1e-2"]
    runs = {  # model, and settings an objective reads: any of them kept on a shared family would leak
        "flux": (tiny_flux, ["--weighting_scheme", "logit_normal", "--guidance_scale", "3.5"]),
        "flux-shift3": (other_schedule, ["--weighting_scheme", "logit_normal", "--logit_mean", "0.5",
                                         "--guidance_scale", "1.0"]),
        "sdxl": (sdxl, ["--snr_gamma", "5"]),
        "sdxl-v": (sdxl, ["--prediction_type", "v_prediction", "--noise_offset", "0.1"]),
        "sd15": (sd15, []),
    }

    def config(name, out):
        model, extra = runs[name]
        return parse_config(train_args(model, out / name, *common, *extra))

    for name in runs:  # alone: set up, trained and saved before the next one exists
        _finish(LoraTrainer(config(name, tmp_path / "alone")).setup())
    together = [LoraTrainer(config(name, tmp_path / "together")).setup() for name in runs]  # all set up first
    for trainer in reversed(together):  # then trained, in the other order
        _finish(trainer)

    for name in runs:
        alone, side_by_side = _weights(tmp_path / "alone" / name), _weights(tmp_path / "together" / name)
        assert alone.keys() == side_by_side.keys()
        assert all(torch.equal(alone[k], side_by_side[k]) for k in alone), name
    flux, shifted = _weights(tmp_path / "alone" / "flux"), _weights(tmp_path / "alone" / "flux-shift3")
    assert any(not torch.equal(flux[k], shifted[k]) for k in flux)  # the schedule matters, so sharing it would show
