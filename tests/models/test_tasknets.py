import numpy as np
import pytest
import torch

from synthmed.training.tasks import balanced_indices, train_classifier
from synthmed.models.tasknets import build_classifier, feature_dim, features, intended_class_confidence, predict_proba, to_unit_range

N_CLASSES = 3


def shapes(n: int, seed: int, size: int = 32, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of a bright disc (0), a bright square (1) or stripes (2) at random places and sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = rng.integers(0, N_CLASSES, n)
    images = np.empty((n, size, size, channels), np.uint8)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.15, size * 0.3)
        if label == 0:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        elif label == 1:
            shape = (abs(yy - cy) < r * 0.85) & (abs(xx - cx) < r * 0.85)
        else:
            shape = (xx + rng.integers(0, 4)) % 6 < 3
        img = 40 + 150 * shape[..., None] + rng.normal(0, 20, (size, size, channels))
        images[i] = img.clip(0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads and crawl when they oversubscribe shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return shapes(96, seed=0), shapes(60, seed=1)


def train(images, labels, seed=0, **kw):
    return train_classifier(images, labels, N_CLASSES, steps=kw.pop("steps", 80), batch_size=16, lr=3e-3, seed=seed, **kw)


@pytest.fixture(scope="module")
def model(data):
    (x, y), _ = data
    return train(x, y)


def test_classifier_learns_shapes_well_above_chance(model, data):
    _, (x_test, y_test) = data
    accuracy = (predict_proba(model, x_test).argmax(1) == y_test).mean()
    assert accuracy > 0.8  # chance is 1/3


def test_predict_proba_rows_are_distributions(model, data):
    _, (x_test, _) = data
    probs = predict_proba(model, x_test, batch_size=7)
    assert probs.shape == (len(x_test), N_CLASSES) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs >= 0).all()


def test_training_is_deterministic_from_the_seed(data):
    (x, y), (x_test, _) = data
    progress = []
    first = train(x, y, seed=0, steps=5, progress=lambda *a: progress.append(a))
    again = train(x, y, seed=0, steps=5)
    other = train(x, y, seed=1, steps=5)
    np.testing.assert_array_equal(predict_proba(again, x_test), predict_proba(first, x_test))
    assert not np.allclose(predict_proba(other, x_test), predict_proba(first, x_test))
    assert [p[:2] for p in progress] == [(i, 5) for i in range(1, 6)]


def test_balanced_indices_draw_a_rare_class_as_often_as_a_common_one():
    labels = torch.tensor([0] * 90 + [1] * 10)
    idx = torch.cat([balanced_indices(labels, 50, step, seed=0) for step in range(20)])  # 1000 draws
    assert 0.4 < labels[idx].float().mean().item() < 0.6
    assert torch.equal(balanced_indices(labels, 50, 3, seed=0), balanced_indices(labels, 50, 3, seed=0))


def test_class_balanced_training_shows_the_rare_class_as_often_as_a_common_one(data, monkeypatch):
    """The labels the loss sees: about 1/3 per class with class_balanced, the rare class's prevalence without."""
    import torch.nn.functional as F

    (x, y), _ = data
    keep = (y != 2) | (np.arange(len(y)) % 8 == 0)  # class 2 rare
    x, y = x[keep], y[keep]
    assert (y == 2).mean() < 0.1
    cross_entropy, seen = F.cross_entropy, []

    def spy(logits, target, *args, **kwargs):
        seen.append(target.detach().cpu().clone())
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    share, probs = {}, {}
    for balanced in (True, False):
        seen.clear()
        m = train(x, y, steps=10, class_balanced=balanced)
        targets = torch.cat(seen).numpy()
        assert len(targets) == 10 * 16  # every step's batch reached the loss
        share[balanced] = np.bincount(targets, minlength=N_CLASSES) / len(targets)
        probs[balanced] = predict_proba(m, x[:8])
    assert all(0.2 < s < 0.47 for s in share[True]), share[True]  # each class about 1/3 of the draws
    assert share[False][2] < 0.15 and share[False][2] < share[True][2] / 2, share[False]  # plain draws: about its 6% prevalence
    assert not np.allclose(probs[True], probs[False])  # other batches, another model


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("arch,dim", [("resnet", 256), ("densenet", 1024)])
@pytest.mark.parametrize("size,channels", [(28, 1), (40, 3)])
def test_features_are_the_heads_input_at_any_size_and_channels(arch, dim, size, channels):
    """features() is the pooled input of the final linear layer, per image: the head applied to it gives the model's
    own probabilities, and an image's features do not depend on its batch, but do on its content."""
    m = build_classifier(N_CLASSES, channels, arch).eval()
    x, _ = shapes(5, seed=2, size=size, channels=channels)
    f = features(m, x, batch_size=2)
    assert feature_dim(m) == dim and f.shape == (5, dim) and f.dtype == np.float32
    head = m.fc if arch == "resnet" else m.class_layers.out
    logits = f @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    np.testing.assert_allclose(_softmax(logits), predict_proba(m, x), atol=1e-5)
    # alone, in another batch size and order, or beside a copy of itself: the same features
    np.testing.assert_allclose(features(m, x[[3]]), f[[3]], rtol=1e-4, atol=1e-5)
    order = [4, 2, 0, 3, 1]
    np.testing.assert_allclose(features(m, x[order], batch_size=5), f[order], rtol=1e-4, atol=1e-5)
    twin = features(m, x[[1, 1]])
    np.testing.assert_array_equal(twin[0], twin[1])
    gaps = [np.abs(f[i] - f[j]).max() for i in range(5) for j in range(i + 1, 5)]
    assert min(gaps) > 1e-3 * np.abs(f).max()  # different images, different features


def test_features_match_the_logits(model, data):
    _, (x_test, _) = data
    f = features(model, x_test[:8])
    logits = f @ model.fc.weight.detach().numpy().T + model.fc.bias.detach().numpy()
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), predict_proba(model, x_test[:8]), atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_greyscale_training_learns_from_the_one_channel(arch):
    """1-channel 28 px shapes: the training loss falls well below chance (ln 3 = 1.10; about 0.35-0.55 after 10 steps,
    while blank images of the same labels stay above 1), and the model takes 1 channel, never 3."""
    x, y = shapes(32, seed=3, size=28, channels=1)
    losses, blank = [], []
    m = train(x, y, steps=10, arch=arch, progress=lambda step, total, loss: losses.append(loss))
    train(np.zeros_like(x), y, steps=10, arch=arch, progress=lambda step, total, loss: blank.append(loss))
    assert len(losses) == 10 and np.mean(losses[-4:]) < 0.8 < np.mean(blank[-4:]), (losses, blank)
    probs = predict_proba(m, x)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert probs.std(0).max() > 1e-3  # its output depends on the image
    with pytest.raises(ValueError, match="expects images with 1 channels, but got 3"):
        predict_proba(m, np.repeat(x, 3, axis=-1))


def test_intended_class_confidence_picks_the_label_column():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]], np.float32)
    np.testing.assert_array_equal(intended_class_confidence(probs, np.array([0, 2, 1])), probs[[0, 1, 2], [0, 2, 1]])
    assert intended_class_confidence(probs, np.array([1, 1, 1])).tolist() == pytest.approx([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"labels": np.array([0, 1, 3, 0])}, "labels in"),
        ({"labels": np.array([0, 1, -1, 0])}, "labels in"),
        ({"labels": np.array([0, 1, 2])}, "labels with N"),
        ({"labels": np.array([0.0, 1.0, 2.0, 0.0])}, "integer labels"),
        ({"images": np.zeros((4, 8, 8, 3), np.float32)}, "uint8 images"),
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "uint8 images"),
        ({"batch_size": 1}, "batch_size >= 2"),
        ({"arch": "vit"}, "arch in"),
        ({"n_classes": 1, "labels": np.zeros(4, int)}, "n_classes >= 2"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, match):
    args = {"images": np.zeros((4, 8, 8, 3), np.uint8), "labels": np.array([0, 1, 2, 0]), "n_classes": 3, "steps": 1, "batch_size": 2, "lr": 1e-3, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=f"expects .*{match}.*but got"):
        train_classifier(**args)


def test_inference_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="expects images with 3 channels, but got 1"):
        predict_proba(model, np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="expects .*labels in \\[0, 3\\), but got"):
        intended_class_confidence(np.full((2, 3), 1 / 3), np.array([0, 3]))
    with pytest.raises(ValueError, match="expects .*labels with N = 2, but got"):
        intended_class_confidence(np.full((2, 3), 1 / 3), np.array([0]))


def test_a_vae_encoder_trunk_stays_frozen_and_its_head_learns(tiny_backbone_dir, tmp_path):
    """vae-encoder:BACKBONE: the backbone's VAE encoder as a frozen trunk (grey images as R = G = B) and a trained head
    that learns the shapes; weights round-trip through safetensors like the other classifiers."""
    from synthmed.models.backbone import load_backbone
    from synthmed.models.tasknets import EncoderClassifier, load_weights, save_weights

    arch = f"vae-encoder:{tiny_backbone_dir}"
    x, y = shapes(48, seed=4, size=32, channels=1)
    m = train(x, y, steps=40, arch=arch)
    assert isinstance(m, EncoderClassifier) and m.in_channels == 1
    encoder = load_backbone(tiny_backbone_dir).vae.encoder.state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in m.encoder.state_dict().items())  # the trunk did not move
    assert not any(p.requires_grad for p in m.encoder.parameters()) and all(p.requires_grad for p in m.head.parameters())
    x_test, y_test = shapes(30, seed=5, size=32, channels=1)
    assert (predict_proba(m, x_test).argmax(1) == y_test).mean() > 0.6  # chance is 1/3
    assert features(m, x_test).shape == (30, feature_dim(m))
    # the head's map pooled two ways: its average and its maximum over space (a small finding is not averaged away)
    with torch.no_grad():
        h = m.head(m.trunk(to_unit_range(x_test[:4])))
    np.testing.assert_allclose(features(m, x_test[:4]), torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1).numpy(), atol=1e-5)
    save_weights(m, tmp_path / "m.safetensors")
    again = load_weights(build_classifier(N_CLASSES, 1, arch), tmp_path / "m.safetensors")
    np.testing.assert_allclose(predict_proba(again, x_test), predict_proba(m, x_test), atol=1e-6)
    with pytest.raises(ValueError, match="arch"):
        build_classifier(N_CLASSES, 1, "vae-encoder:")
