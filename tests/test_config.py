import pytest

from ddiff_core.config import ConfigError, parse_config

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]


def test_upstream_defaults_and_overrides():
    cfg = parse_config(BASE + ["--rank", "16", "--center_crop", "--optimizer", "adamw"])
    assert (cfg.rank, cfg.center_crop, cfg.optimizer, cfg.resolution) == (16, True, "AdamW", 512)
    assert cfg.weighting_scheme is None and cfg.max_sequence_length is None  # the family's, once it is known
    assert cfg.cache_text_embeddings is True and cfg.cache_latents is False


def test_yaml_keys_with_command_line_overriding(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrained_model_name_or_path: m\ninstance_data_dir: d\nrank: 8\nlearning_rate: 1e-3\ncache_latents: true\n")
    cfg = parse_config(["--config", str(path), "--rank", "32"])
    assert (cfg.rank, cfg.learning_rate, cfg.cache_latents) == (32, 1e-3, True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (BASE + ["--rnak", "4"], "unrecognized arguments: --rnak"),
        (BASE + ["--weighting_scheme", "logit_nrmal"], "logit_nrmal"),
        (BASE + ["--lr_scheduler", "cosine_warm"], "cosine_warm"),
        (BASE + ["--mixed_precision", "fp8"], "fp8"),
        (BASE + ["--rank", "four"], "--rank"),
        (BASE + ["--train_batch_size", "0"], "--train_batch_size"),
        (["--instance_data_dir", "d"], "--pretrained_model_name_or_path is required"),
        (["--pretrained_model_name_or_path", "m"], "--instance_data_dir or --dataset_name"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rnak: 4\n", "unknown key 'rnak'"),
        ("rank: four\n", "rank must be int"),
        ("center_crop: 1\n", "center_crop must be true or false"),
        ("weighting_scheme: logit_nrmal\n", "logit_nrmal"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_yaml_is_an_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + ["--config", str(path)])


def test_yaml_anchors_and_aliases_are_refused_and_errors_stay_short(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: &a [x, x, x]\nvalidation_prompt: [*a, *a]\n")
    with pytest.raises(ConfigError, match="anchors or aliases"):
        parse_config(["--config", str(path)])
    path.write_text("rank: [" + ", ".join(["12345"] * 10000) + "]\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert len(str(err.value)) < 300
