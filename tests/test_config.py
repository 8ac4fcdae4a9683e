"""The trial config: one source of defaults, presets as diffs, one-line errors naming the key."""
import pytest

from harness.config import (PRESETS, ConfigError, TrialConfig, build_config, flatten, leaf_keys,
                            parse_value, unflatten)


def test_defaults_are_table1():
    cfg = TrialConfig()
    assert (cfg.loss.lambda_rec, cfg.loss.lambda_idem, cfg.loss.lambda_tight) == (20, 20, 2.5)
    assert cfg.loss.clamp_ratio == 1.5 and cfg.loss.distance == "l1"
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2) == (1e-4, 0.5, 0.999)
    assert cfg.train.batch_size == 256 and cfg.model.width == 64 and cfg.model.latent == 512


def test_mnist_preset_is_the_code_listing():
    cfg = build_config({"data.dataset": "mnist"})
    assert cfg.preset == "mnist-code"
    assert (cfg.loss.lambda_rec, cfg.loss.lambda_idem, cfg.loss.lambda_tight) == (1, 1, 0.1)
    assert cfg.loss.distance == "l2" and cfg.loss.clamp_ratio is None
    assert cfg.model_name() == "dcgan28"
    # overrides win over the preset
    assert build_config({"data.dataset": "mnist", "loss.lambda_tight": 0.3}).loss.lambda_tight == 0.3
    assert build_config({"data.dataset": "ring8"}).model_name() == "mlp2d"
    assert build_config({}, preset=None).loss.lambda_tight == 2.5


@pytest.mark.parametrize("over, key", [
    ({"loss.lambda_tight": -1}, "loss.lambda_tight"),
    ({"loss.clamp_ratio": 0.5}, "loss.clamp_ratio"),
    ({"loss.distance": "l3"}, "loss.distance"),
    ({"data.dataset": "cifar"}, "data.dataset"),
    ({"model.name": "resnet"}, "model.name"),
    ({"loss.lambda_tigth": 1}, "loss.lambda_tigth"),
    ({"optim.lr": 0}, "optim.lr"),
    ({"train.batch_size": 1}, "train.batch_size"),
    ({"noise.name": "fft", "data.dataset": "ring8"}, "noise.name"),
    ({"model.name": "dcgan64", "data.dataset": "ring8"}, "model.name"),
    ({"data.dataset": "folder"}, "data.root"),
])
def test_bad_values_name_the_key_in_one_line(over, key):
    with pytest.raises(ConfigError) as e:
        build_config(over)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key), msg


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean loss.lambda_tight"):
        build_config({"lambda_tight": 0.1})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset: unknown value 'nope'; allowed"):
        build_config({}, preset="nope")


def test_flat_roundtrip_and_run_key():
    cfg = build_config({"data.dataset": "mnist", "seed": 3})
    flat = cfg.flat()
    assert set(flat) == set(leaf_keys())
    assert TrialConfig.model_validate(unflatten(flat)) == cfg
    assert flatten(unflatten({"a.b": 1, "a.c": 2, "d": 3})) == {"a.b": 1, "a.c": 2, "d": 3}
    # budget and evaluation do not change the run key (so more steps resume the same run) ...
    assert build_config({"train.steps": 10}).run_key() == build_config({"train.steps": 99, "eval.k": 5}).run_key()
    # ... but anything that changes the trajectory does
    assert build_config({"seed": 1}).run_key() != build_config({"seed": 2}).run_key()


def test_parse_value():
    assert parse_value("1e-4") == 1e-4 and parse_value("null") is None and parse_value("true") is True
    assert parse_value("l1") == "l1" and parse_value("mnist,inception") == ["mnist", "inception"]
    assert parse_value('["mnist"]') == ["mnist"]


def test_presets_are_valid_configs():
    for name in PRESETS:
        build_config({}, preset=name)
