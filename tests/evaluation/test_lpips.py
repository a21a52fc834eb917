"""LPIPS v0.1 (AlexNet) against the lpips package's own LPIPS module, same weights, same images.

lpips 0.1.4 is a test-only dependency installed with --no-deps (make test does it): it requires torchvision,
which this project must not depend on. torchvision is used in exactly one place in lpips,
`pretrained_networks.alexnet`, which takes `torchvision.models.alexnet(pretrained=...).features` and slices
it; the tests hand it a stand-in torchvision whose `models.alexnet` returns a copy of our AlexNet features
(torchvision's layer layout) carrying the weights under test. Everything else (scaling, slicing into
relu1..5, normalisation, the linear heads and their file, averaging) is lpips' own code.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from synthmed.evaluation import lpips as ours_module
from synthmed.evaluation.lpips import (
    ALEXNET_ENV,
    ALEXNET_FILE,
    ALEXNET_URL,
    CHANNELS,
    LIN_ENV,
    MIN_SIZE,
    NAME,
    AlexNetFeatures,
    build_lpips,
    expected_shapes,
    hub_alexnet_path,
    installed_lin_path,
    load_lpips,
    lpips_distance,
    resolve_lpips_weights,
)
from synthmed.core.io import SynthmedError

LPIPS_SPEC = importlib.util.find_spec("lpips")
needs_lpips = pytest.mark.skipif(LPIPS_SPEC is None, reason="lpips not installed (make test installs it: pip install --no-deps lpips==0.1.4)")
# torchvision's alexnet() state dict also holds the classifier; the loader must ignore it
CLASSIFIER = {"classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,), "classifier.4.weight": (4096, 4096)}


def _reference_models(features: AlexNetFeatures, model_paths: list[str | None]) -> tuple[types.ModuleType, list[torch.nn.Module]]:
    """The lpips package and lpips.LPIPS(net='alex', version='0.1', pretrained=True, pnet_rand=True) for each heads file (None: the
    package's weights/v0.1/alex.pth), its trunk a copy of `features`, imported against a stand-in torchvision.

    sys.modules is restored afterwards: no lpips bound to the stand-in (or a real lpips imported elsewhere
    replaced) leaks into other tests.
    """

    def alexnet(pretrained=True, **kwargs):
        # pnet_rand=True asks for an untrained trunk: nothing is downloaded, the weights are ours
        assert pretrained is False, "lpips asked torchvision for ImageNet weights"
        return types.SimpleNamespace(features=copy.deepcopy(features))

    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.ModuleType("torchvision.models")
    torchvision.models.alexnet = alexnet
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", torchvision)
        mp.setitem(sys.modules, "torchvision.models", torchvision.models)
        for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
            mp.delitem(sys.modules, name)
        before = set(sys.modules)
        try:
            lpips = importlib.import_module("lpips")
            return lpips, [lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, model_path=p, verbose=False) for p in model_paths]
        finally:
            for name in set(sys.modules) - before:
                if name == "lpips" or name.startswith("lpips."):
                    del sys.modules[name]


def _save_trunk(features: AlexNetFeatures, path):
    """A file in torchvision's alexnet() layout: features.N.* plus (random) classifier tensors."""
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    state.update({k: torch.zeros(shape) for k, shape in CLASSIFIER.items()})
    torch.save(state, path)
    return path


def _save_heads(model, path):
    torch.save({k: v.clone() for k, v in model.state_dict().items() if k.startswith("lin")}, path)
    return path


@pytest.fixture(scope="module")
def random_model():
    return build_lpips(seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, random_model):
    """(trunk file, heads file) with seeded random weights, in the official files' layouts."""
    folder = tmp_path_factory.mktemp("lpips")
    return _save_trunk(random_model.trunk.features, folder / "random-alexnet.pth"), _save_heads(random_model, folder / "random-heads.pth")


@pytest.fixture(scope="module")
def images():
    """Two sets of uint8 (N, H, W, 3): 64 x 64, odd 45 x 77, and the smallest size AlexNet allows."""
    rng = np.random.default_rng(0)
    shapes = [(3, 64, 64), (2, 45, 77), (2, MIN_SIZE, MIN_SIZE)]
    return [(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)) for n, h, w in shapes]


def _their_distance(lpips, model, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """lpips' own call on lpips' own preprocessing (lpips.im2tensor: x / 127.5 - 1 on each HWC image)."""
    with torch.no_grad():
        out = model(torch.cat([lpips.im2tensor(x) for x in a]), torch.cat([lpips.im2tensor(x) for x in b]))
    assert out.shape == (len(a), 1, 1, 1)
    return out.double().numpy().reshape(-1)


@pytest.fixture(scope="module")
def reference(random_model, files):
    """The lpips package and its module with our random trunk: [the package's real heads, our random heads]."""
    return _reference_models(random_model.trunk.features, [None, str(files[1])])


def test_layers_are_torchvision_alexnet_features():
    shapes = expected_shapes()
    convs = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    assert {k: v for k, v in shapes.items() if k.startswith("features.")} == {
        **{f"features.{i}.weight": s for i, s in convs.items()},
        **{f"features.{i}.bias": (s[0],) for i, s in convs.items()},
    }
    assert {k: v for k, v in shapes.items() if k.startswith("lin")} == {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    layers = AlexNetFeatures()
    conv1, pool = layers[0], layers[12]
    assert (conv1.stride, conv1.padding, pool.kernel_size, pool.stride) == ((4, 4), (2, 2), 3, 2)
    assert [type(m).__name__ for m in layers] == ["Conv2d", "ReLU", "MaxPool2d"] * 2 + ["Conv2d", "ReLU"] * 3 + ["MaxPool2d"]


@needs_lpips
def test_keys_and_shapes_equal_lpips(reference):
    theirs = reference[1][0].state_dict()
    # lpips keeps the trunk as net.slice{1..5}.{index in features}.*; the heads twice (lin{k} and lins.{k})
    got = {}
    for key, value in theirs.items():
        if key.startswith("net.slice"):
            got["features." + key.split(".", 2)[2]] = tuple(value.shape)
        elif key.startswith("lin") and not key.startswith("lins."):
            got[key] = tuple(value.shape)
    assert got == expected_shapes()
    scaling = build_lpips(seed=0).scaling_layer
    assert torch.equal(theirs["scaling_layer.shift"], scaling.shift) and torch.equal(theirs["scaling_layer.scale"], scaling.scale)


@needs_lpips
@pytest.mark.parametrize("heads", ["lpips package file", "random"])
def test_distances_equal_lpips(reference, files, images, heads):
    lin = None if heads == "lpips package file" else files[1]
    ours = load_lpips(files[0], lin)
    lpips, models = reference
    for a, b in images:
        got, ref = lpips_distance(ours, a, b), _their_distance(lpips, models[0 if lin is None else 1], a, b)
        assert got.shape == ref.shape == (len(a),) and got.dtype == np.float64
        assert ref.min() > 0.05  # random images under informative weights: far from 0
        err = np.abs(got - ref).max()
        print(f"{heads} heads, {a.shape}: max |ours - lpips| = {err:.3g} (distances {np.round(ref, 4)})")
        assert err < 1e-6


@needs_lpips
def test_installed_heads_are_found_without_importing_lpips():
    imported = "lpips" in sys.modules
    path = installed_lin_path()
    assert path is not None and path.is_file() and path.parts[-3:] == ("weights", "v0.1", "alex.pth")
    assert ("lpips" in sys.modules) == imported


def test_known_answers(random_model):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([128 + 60 * np.sin(xx / 7), 128 + 60 * np.cos(yy / 9), 64 + xx + yy // 2], -1)  # smooth (64, 64, 3)
    base = np.repeat(base[None], 2, 0)
    a = base.clip(0, 255).astype(np.uint8)
    noisy = [(base + rng.normal(0, s, base.shape)).clip(0, 255).astype(np.uint8) for s in (4, 16, 64)]
    np.testing.assert_array_equal(lpips_distance(random_model, a, a), 0)
    d = np.stack([lpips_distance(random_model, a, n) for n in noisy])  # (3 noise levels, 2 images)
    assert np.all(d[0] > 0) and np.all(np.diff(d, axis=0) > 0), d
    np.testing.assert_array_equal(lpips_distance(random_model, noisy[1], a), d[1])  # symmetric
    np.testing.assert_allclose(lpips_distance(random_model, a, noisy[2], batch_size=1), d[2], rtol=0, atol=1e-6)


def test_greyscale_is_the_replicated_image(random_model):
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, (2, 2, 40, 48, 1), dtype=np.uint8)
    got = lpips_distance(random_model, a, b)
    np.testing.assert_array_equal(got, lpips_distance(random_model, np.repeat(a, 3, -1), np.repeat(b, 3, -1)))
    assert np.all(got > 0)


def test_bad_inputs_are_refused(random_model):
    x = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"same shape, but got \(2, 64, 64, 3\) and \(2, 64, 48, 3\)"):
        lpips_distance(random_model, x, x[:, :, :48])
    with pytest.raises(ValueError, match=r"at least 31 x 31 px .* but got 64 x 30"):
        lpips_distance(random_model, x[:, :, :30], x[:, :, :30])
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 1 or 3\)"):
        lpips_distance(random_model, x.astype(np.float32), x)
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 1 or 3\)"):
        lpips_distance(random_model, x[..., :2], x[..., :2])
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        random_model(torch.full((1, 3, 64, 64), 2.0), torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"H, W >= 31"):
        random_model(torch.zeros(1, 3, 30, 64), torch.zeros(1, 3, 30, 64))
    assert lpips_distance(random_model, x[:0], x[:0]).shape == (0,)
    lpips_distance(random_model, x[:1, :MIN_SIZE, :MIN_SIZE], x[:1, :MIN_SIZE, :MIN_SIZE])  # the minimum works


def test_missing_weights_is_one_line_naming_the_paths(tmp_path, monkeypatch):
    for env in (ALEXNET_ENV, LIN_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(ours_module, "installed_lin_path", lambda: None)  # as without the lpips package
    with pytest.raises(SynthmedError) as err:
        load_lpips()
    msg = str(err.value)
    hub = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE
    assert "\n" not in msg and str(hub) in msg and ALEXNET_URL in msg and f"{ALEXNET_ENV}=" in msg
    assert "lpips==0.1.4" in msg and "github.com/richzhang/PerceptualSimilarity" in msg and f"{LIN_ENV}=" in msg
    hub.parent.mkdir(parents=True)
    hub.touch()
    monkeypatch.setenv(LIN_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(SynthmedError, match="nowhere.pth") as err:
        resolve_lpips_weights()
    assert "AlexNet" not in str(err.value)  # only what is missing is reported
    with pytest.raises(SynthmedError, match="elsewhere.pth"):
        resolve_lpips_weights(alexnet=tmp_path / "elsewhere.pth")


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for env in (ALEXNET_ENV, LIN_ENV):
        monkeypatch.delenv(env, raising=False)
    package = tmp_path / "site-packages" / "lpips" / "weights" / "v0.1" / "alex.pth"
    package.parent.mkdir(parents=True)
    package.touch()
    monkeypatch.setattr(ours_module, "installed_lin_path", lambda: package)
    hub = hub_alexnet_path()
    hub.parent.mkdir(parents=True)
    hub.touch()
    assert resolve_lpips_weights() == (hub, package)
    env_alex, env_lin, alex, lin = (tmp_path / f"{n}.pth" for n in ("env-alex", "env-lin", "alex", "lin"))
    for f in (env_alex, env_lin, alex, lin):
        f.touch()
    monkeypatch.setenv(ALEXNET_ENV, str(env_alex))
    monkeypatch.setenv(LIN_ENV, str(env_lin))
    assert resolve_lpips_weights() == (env_alex, env_lin)
    assert resolve_lpips_weights(alex, lin) == (alex, lin)


def test_loaded_model_and_wrong_files(files, random_model, tmp_path):
    from safetensors.torch import save_file

    trunk, heads = files
    model = load_lpips(trunk, heads)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.name != NAME and "random-alexnet.pth" in model.name and "random-heads.pth" in model.name  # only official files get NAME
    got, ref = model.state_dict(), random_model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    state = torch.load(trunk, weights_only=True)
    save_file(torch.load(heads, weights_only=True), tmp_path / "heads.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file\n")
    torch.save({k.removeprefix("features."): v for k, v in state.items()}, tmp_path / "no-prefix.pth")
    torch.save({**state, "features.0.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "shape.pth")
    torch.save({"model": AlexNetFeatures}, tmp_path / "pickle.pth")  # a class reference: weights_only refuses it
    cases = [
        # torch.load reads safetensors files itself in recent torch (2.13 does), older ones refuse them
        ((tmp_path / "heads.safetensors", heads), "heads.safetensors: not (a readable weights file|the expected layout)"),
        ((tmp_path / "junk.pth", heads), r"junk.pth: not a readable weights file \(UnpicklingError"),
        ((tmp_path / "no-prefix.pth", heads), r"no-prefix.pth: not the expected layout \(10 keys missing, e.g. \['features.0.bias'"),
        ((tmp_path / "shape.pth", heads), r"shape.pth: wrong shapes \(1, e.g. features.0.weight \(64, 3, 7, 7\) != \(64, 3, 11, 11\)\)"),
        ((tmp_path / "pickle.pth", heads), "pickle.pth: not a readable weights file"),
        ((trunk, trunk), r"random-alexnet.pth: not the expected layout \(5 keys missing, e.g. \['lin0.model.1.weight'"),  # swapped files
    ]
    for args, message in cases:
        with pytest.raises(SynthmedError, match=message) as err:
            load_lpips(*args)
        assert "\n" not in str(err.value)


@pytest.mark.slow
@needs_lpips
def test_official_weights_equal_lpips():
    try:
        alex_file, lin_file = resolve_lpips_weights()
    except SynthmedError as exc:
        pytest.skip(str(exc))
    ours = load_lpips(alex_file, lin_file)
    assert ours.name == NAME
    lpips, (theirs,) = _reference_models(ours.trunk.features, [str(lin_file)])
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    b = np.concatenate([a[:1], np.clip(a[1:2].astype(int) + rng.integers(-20, 21, a[1:2].shape), 0, 255).astype(np.uint8), a[2:][:, ::-1]])
    got, ref = lpips_distance(ours, a, b), _their_distance(lpips, theirs, a, b)
    assert np.abs(got - ref).max() < 1e-6
    assert got[0] == 0 and 0 < got[1] < got[2]  # identical, lightly noised, flipped
