"""harness.classifier: the cached MNIST digit classifier and its torch-fidelity adapter."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness import classifier as cl
from harness.data import to_model_range


pytestmark = pytest.mark.usefixtures("no_network")  # everything here must work offline


def test_test_accuracy_at_least_99_percent(mnist):
    _, info = cl.load_classifier("cpu")  # trains once (about a minute on 2 cores) if not cached
    pred = cl.predict(mnist.test)
    acc = float((pred == mnist.test_labels).double().mean())
    assert acc >= 0.99
    assert info["test_accuracy"] == pytest.approx(acc, abs=1e-9)  # the recorded figure is the measured one
    assert len(info["hash"]) == 12
    print(f"mnist classifier test accuracy {acc:.4f}")


def test_real_test_digits_score_high_and_cover_all_modes(mnist):
    """Through the metric path: IS of 5000 real test digits > 9 (at most 10), all 10 digits
    produced, near-uniform class histogram; FID against the training split is small."""
    from harness import fidelity as fi
    test = fi.extract(mnist.test[:5000], "mnist")
    m = fi.metrics_from_features(test, fi.reference_features("mnist-train", 1000, "mnist", "cpu"), "mnist")
    assert 9 < m["is"] <= 10
    assert m["modes"] == 10 and m["modes_entropy"] > 2.29  # log 10 = 2.3026
    print(f"real test digits: IS {m['is']:.3f}, FID vs train (1000) {m['fid']:.2f}")


def test_input_forms_agree(mnist):
    """uint8 (what torch-fidelity feeds), [-1, 1] floats (what models produce) and RGB copies give
    the same features."""
    net, _ = cl.load_classifier("cpu")
    x = mnist.test[:32]
    ext = cl.FeatureExtractorMnistCNN("mnist-cnn", ["128", "logits"])
    with torch.no_grad():
        f_u8, l_u8 = ext(x)
        f_fl, l_fl = ext(to_model_range(x))
        f_rgb, _ = ext(x.expand(-1, 3, -1, -1))
        f_net, l_net = net.features_and_logits(to_model_range(x))
    assert f_u8.shape == (32, cl.FEATURE_DIM) and l_u8.shape == (32, 10)
    for a in (f_fl, f_rgb, f_net):
        torch.testing.assert_close(a, f_u8)
    torch.testing.assert_close(l_net, l_u8)
    with pytest.raises(ValueError, match="expected images"):
        cl.to_classifier_input(torch.zeros(2, 1, 32, 32))


def test_training_is_seeded_and_leaves_global_rng_alone(mnist):
    """Two short runs with one seed give identical weights; the caller's RNG stream is untouched."""
    small = type(mnist)("mnist", mnist.train[:1024], mnist.test[:256], mnist.train_labels[:1024],
                        mnist.test_labels[:256])
    state = torch.random.get_rng_state()
    a = cl.train_classifier(small, seed=3, epochs=1)
    b = cl.train_classifier(small, seed=3, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["test_accuracy"] == b["test_accuracy"]


def test_file_lock_excludes_other_processes(tmp_path):
    """Parallel trials must not train the classifier twice: the lock is exclusive across processes."""
    lock = tmp_path / "x.lock"
    probe = ("import fcntl, sys\n"
             f"fh = open({str(lock)!r}, 'a')\n"
             "try:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB); print('got')\n"
             "except BlockingIOError:\n    print('blocked')\n")
    with cl.file_lock(lock):
        held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    assert (held, free) == ("blocked", "got")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    p = cl.atomic_save({"a": torch.ones(3)}, tmp_path / "sub" / "x.pt")
    assert torch.load(p)["a"].sum() == 3
    assert [f.name for f in p.parent.iterdir()] == ["x.pt"]
