"""The FID InceptionV3 against torch-fidelity's FeatureExtractorInceptionV3, same weights, same images.

torch-fidelity is a test-only dependency installed with --no-deps (make test does it): its own
requirements pull torchvision, which this project must not depend on.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import numpy as np
import pytest
import torch

from synthmed.evaluation.inception import (
    FEATURE_DIM,
    FIDELITY_WEIGHTS_FILE,
    NAME,
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_URL,
    FIDInception,
    build_fid_inception,
    hub_weights_path,
    inception_features,
    load_fid_inception,
    official_keys,
    resize_bilinear_tf1,
    resolve_fid_weights,
)
from synthmed.core.io import SynthmedError

FIDELITY = importlib.util.find_spec("torch_fidelity")
needs_fidelity = pytest.mark.skipif(FIDELITY is None, reason="torch-fidelity not installed (make test installs it: pip install --no-deps torch-fidelity)")


def _import_fidelity_modules():
    """torch-fidelity's InceptionV3 and TF1 resize modules, without running its package __init__.

    That __init__ imports every feature extractor and torchvision with them (CLIP, DINOv2, datasets).
    The two modules needed here import only torch and three torchvision-free siblings (helpers,
    defaults, deprecations, feature_extractor_base), so a bare package object built from the installed
    folder (spec_from_file_location, never executed) lets them import normally; nothing is stubbed.
    sys.modules is restored afterwards so no half-initialised torch_fidelity leaks into other tests.
    """
    names = ("torch_fidelity.feature_extractor_inceptionv3", "torch_fidelity.interpolate_compat_tensorflow")
    if "torch_fidelity" in sys.modules:  # already imported for real (an environment with torchvision)
        return tuple(importlib.import_module(name) for name in names)
    folder = FIDELITY.submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("torch_fidelity", f"{folder}/__init__.py", submodule_search_locations=[folder])
    before = set(sys.modules)
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        for name in set(sys.modules) - before:
            if name == "torch_fidelity" or name.startswith("torch_fidelity."):
                del sys.modules[name]


@pytest.fixture(scope="module")
def fidelity():
    return _import_fidelity_modules()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Seeded random weights saved in the official file's layout: a plain dict, no num_batches_tracked."""
    state = {k: v for k, v in build_fid_inception(seed=0).state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("fid") / "random-inception.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def ours(weights_file):
    return load_fid_inception(weights_file)


@pytest.fixture(scope="module")
def theirs(fidelity, weights_file):
    return fidelity[0].FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))


@pytest.fixture(scope="module")
def images():
    """Upsampled (64 x 64, and odd 37 x 50) and resized onto itself (299 x 299): uint8 (N, H, W, 3) each.
    Few, because InceptionV3 costs ~6 GFLOP an image whatever the input size."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (37, 50), (299, 299)]]


@pytest.fixture(scope="module")
def our_features(ours, images):
    return [inception_features(ours, x) for x in images]


def test_keys_are_the_official_layout():
    keys = official_keys()
    assert len(keys) == 94 * 5 + 2  # 94 conv + BN blocks (conv.weight, bn.{weight, bias, running_mean, running_var}) and fc
    assert keys[:2] == ["Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys and "Mixed_6e.branch7x7dbl_5.conv.weight" in keys
    shapes = FIDInception().state_dict()
    assert shapes["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and shapes["fc.weight"].shape == (1008, FEATURE_DIM)


@needs_fidelity
def test_keys_and_shapes_equal_torch_fidelity(theirs):
    ref = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in FIDInception().state_dict().items()} == ref


@needs_fidelity
def test_resize_matches_torch_fidelity(fidelity):
    rng = np.random.default_rng(1)
    for h, w in [(64, 64), (37, 50), (299, 299), (512, 400), (7, 3)]:
        x = torch.from_numpy(rng.uniform(0, 255, (1, 3, h, w)).astype(np.float32))
        ref = fidelity[1].interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert torch.equal(resize_bilinear_tf1(x, (299, 299)), ref), (h, w)


@needs_fidelity
def test_features_equal_torch_fidelity(theirs, images, our_features):
    for x, got in zip(images, our_features):
        with torch.no_grad():
            (ref,) = theirs(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        ref = ref.double().numpy()
        assert got.shape == ref.shape == (len(x), FEATURE_DIM) and got.dtype == np.float64
        assert ref.std() > 0.1 and (ref > 0).mean() > 0.5  # random weights that still give informative features
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{x.shape}: max |ours - torch-fidelity| / max |torch-fidelity| = {rel:.3g}")
        assert rel < 1e-5


def test_greyscale_is_the_repeated_image(ours):
    grey = np.random.default_rng(2).integers(0, 256, (1, 40, 40, 1), dtype=np.uint8)
    np.testing.assert_array_equal(inception_features(ours, grey), inception_features(ours, np.repeat(grey, 3, axis=-1)))


def test_deterministic_and_float_input(ours, images, our_features):
    np.testing.assert_array_equal(inception_features(ours, images[1]), our_features[1])
    x = torch.from_numpy(images[0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours.preprocess(x.float() / 255), ours.preprocess(x), rtol=0, atol=1e-5)
    a, b = build_fid_inception(seed=3).state_dict(), build_fid_inception(seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_refused(ours):
    with pytest.raises(ValueError, match=r"inception_features expects \(N, H, W, 1 or 3\)"):
        inception_features(ours, np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ours(torch.full((1, 3, 8, 8), 2.0))
    assert inception_features(ours, np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, FEATURE_DIM)


def test_missing_weights_is_one_line_naming_the_paths(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SynthmedError) as err:
        load_fid_inception()
    msg = str(err.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    assert "\n" not in msg and str(expected) in msg and WEIGHTS_URL in msg and f"{WEIGHTS_ENV}=" in msg
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(SynthmedError, match="nowhere.pth"):
        load_fid_inception()
    with pytest.raises(SynthmedError, match="elsewhere.pth"):
        load_fid_inception(tmp_path / "elsewhere.pth")


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    hub = hub_weights_path()
    hub.parent.mkdir(parents=True)
    hub.with_name(FIDELITY_WEIGHTS_FILE).touch()  # torch-fidelity's download
    assert resolve_fid_weights() == hub.with_name(FIDELITY_WEIGHTS_FILE)
    hub.touch()  # pytorch-fid's download comes first
    assert resolve_fid_weights() == hub
    env = tmp_path / "env.pth"
    env.touch()
    monkeypatch.setenv(WEIGHTS_ENV, str(env))
    assert resolve_fid_weights() == env
    explicit = tmp_path / "explicit.pth"
    explicit.touch()
    assert resolve_fid_weights(explicit) == explicit


def test_download_goes_to_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, hash_prefix=None: calls.append((url, dst, hash_prefix)))
    assert resolve_fid_weights(download=True) == hub_weights_path()
    assert calls == [(WEIGHTS_URL, str(hub_weights_path()), "6726825d")]


def test_safetensors_and_wrong_files(weights_file, ours, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(weights_file, weights_only=True)
    save_file(state, tmp_path / "w.safetensors")
    converted = load_fid_inception(tmp_path / "w.safetensors")
    got, ref = converted.state_dict(), ours.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in official_keys())
    assert converted.name != NAME and "w.safetensors" in converted.name  # only the official file is named as such
    torch.save({"fc.weight": state["fc.weight"], "head.bias": state["fc.bias"]}, tmp_path / "other.pth")
    with pytest.raises(SynthmedError, match=r"471 keys missing, e.g. .*1 unexpected, e.g. \['head.bias'\]") as err:
        load_fid_inception(tmp_path / "other.pth")
    assert "\n" not in str(err.value)
    torch.save({"model": FIDInception}, tmp_path / "pickle.pth")  # a class reference: weights_only refuses it
    with pytest.raises(SynthmedError, match="not a readable weights file"):
        load_fid_inception(tmp_path / "pickle.pth")


@pytest.mark.slow
@needs_fidelity
def test_official_weights_equal_torch_fidelity(fidelity):
    try:
        path = resolve_fid_weights()
    except SynthmedError as exc:
        pytest.skip(str(exc))
    ours = load_fid_inception(path)
    assert ours.name == NAME
    theirs = fidelity[0].FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8), np.full((1, 128, 128, 3), 128, np.uint8)])
    with torch.no_grad():
        (ref,) = theirs(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    got = inception_features(ours, x)
    assert np.abs(got - ref.double().numpy()).max() / np.abs(ref.numpy()).max() < 1e-5
    assert np.all(got >= 0) and got.std() > 0  # pool3 follows a ReLU


def test_evaluate_with_inception_and_no_weights_fails_in_one_line_before_training(phantom_data, tmp_path, monkeypatch):
    from synthmed import pipelines
    from synthmed.config import EvaluateConfig
    from synthmed.core.io import SynthmedError

    monkeypatch.delenv("SYNTHMED_FID_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(SynthmedError) as err:
        pipelines.evaluate(phantom_data, phantom_data, EvaluateConfig(extractors=["inception"]), tmp_path / "eval")
    message = str(err.value)
    assert "\n" not in message and "pt_inception-2015-12-05-6726825d.pth" in message and "SYNTHMED_FID_WEIGHTS" in message
    assert not (tmp_path / "eval").exists()
