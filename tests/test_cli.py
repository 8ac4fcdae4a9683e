"""The command line: bad input is one line on stderr, exit code 2, and nothing written."""
import json

import pytest

from harness.cli import main


@pytest.mark.parametrize("args, key", [
    (["--dataset", "cifar10"], "data.dataset"),
    (["--model", "resnet50"], "model.name"),
    (["--data-root", "/nonexistent/data"], "data.root"),
    (["--loss.lambda_idem", "-1"], "loss.lambda_idem"),
    (["--loss.clamp_ratio", "0.5"], "loss.clamp_ratio"),
    (["--distance", "l3"], "loss.distance"),
    (["--set", "loss.lambda_tigth=1"], "loss.lambda_tigth"),
    (["--device", "tpu"], "device"),
])
def test_bad_train_input(args, key, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--steps", "5", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert key in err, err
    assert not out.exists()


def test_missing_cuda_is_a_clear_error(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert main(["train", "--dataset", "mnist", "--steps", "7", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train.steps"] == 7 and cfg["loss.lambda_tight"] == 0.1 and cfg["preset"] == "mnist-code"
    assert not (tmp_path / "r").exists()


def test_help_lists_every_config_key(cli):
    from harness.config import leaf_keys
    r = cli("train", "--help")
    assert r.returncode == 0
    for key in set(leaf_keys()) - {"preset"}:
        assert f"--{key}" in r.stdout, key
    assert "λt" in r.stdout  # field comments become the help text


def test_bad_input_in_a_fresh_process(cli, tmp_path):
    r = cli("train", "--dataset", "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("ign-bench train: error: data.dataset")


def test_evaluate_a_checkpoint(tmp_path, capsys):
    from harness.config import build_config
    from harness.trial import run_trial
    run_trial(build_config({"data.dataset": "ring8", "train.steps": 20, "eval.grid": 0, "eval.n_samples": 100,
                            "model.hidden": 32, "model.depth": 2}), tmp_path, progress=False)
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(tmp_path), "--k", "2", "--n", "300", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["step"] == 20 and res["n_samples"] == 300
    assert all(f"{m}_k{k}" in res for m in ("swd", "energy", "idem") for k in (1, 2))
    table = capsys.readouterr().out
    assert "k=1" in table and "k=2" in table and "swd" in table
    assert main(["evaluate", str(tmp_path), "--k", "0"]) == 2
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
