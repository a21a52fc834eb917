"""Downstream utility: train a segmentation or classification model on one arm's training pool and
score it on the real test split. One call = one cell of a study (fraction x arm x seed).

Arms differ only in what the batches are drawn from and how they are augmented:
- real: the real training subset, no augmentation beyond what every arm gets (none);
- real+classic: the real subset with classic augmentation (flips, 90-degree rotations, a small affine,
  intensity), the baseline a practitioner would use and a synthetic-data method has to beat;
- real+synthetic, real+classic+synthetic: real + synthetic samples, `mix` of each batch drawn from the
  synthetic pool (the second without, the first with classic augmentation on both);
- synthetic-only: the synthetic pool alone (validation and test stay real);
- synthetic-pretrain: pre-trained on the synthetic pool, then fine-tuned on the real subset (both with
  classic augmentation); real-pretrain, its control, runs the same two phases on the real subset alone
  (same steps and schedules: a gain of synthetic-pretrain over it is the synthetic data's, not the schedule's);
- the ceilings, the same number of *real* samples instead of synthetic ones: real+heldout,
  real+classic+heldout (training samples of patients outside the fraction) and real+oracle,
  real+classic+oracle (fresh samples of a generated data set from slides/patients no split holds).
Early stopping on the real validation split keeps the best weights; the test split is only scored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.config.settings import ARM_ALIASES, DOWNSTREAM_ARMS
from synthmed.training.common import CompiledForward, accumulated_step, optimiser_step, warmup_cosine
from synthmed.models.tasknets import to_unit_range

EXTRA_SOURCES = ("synthetic", "heldout", "oracle")  # what an arm adds to the real subset
IGNORE = 255  # a target code left out of the segmentation loss (synthetic pixels the trust judge does not confirm)
ARMS = DOWNSTREAM_ARMS
TASKS = ("segmentation", "classification")


@dataclass(frozen=True)
class Arm:
    """What an arm is made of: the extra pool it adds (None, synthetic, heldout, oracle), whether it
    uses classic augmentation, whether the real subset is in it, and whether it pre-trains on the extra pool."""

    name: str
    extra: str | None
    classic: bool
    real: bool = True
    pretrain: bool = False

    @property
    def baseline(self) -> str | None:
        """The arm its gain is measured against: real+classic for the augmented arms, real otherwise."""
        if self.name == "real":
            return None
        if self.name == "real+classic":
            return "real"
        return "real+classic" if self.classic else "real"


def arm_of(name: str) -> Arm:
    """The Arm of a name in ARMS (or an alias)."""
    name = ARM_ALIASES.get(name, name)
    if name not in ARMS:
        raise ValueError(f"arm_of expects an arm in {ARMS}, but got {name!r}")
    if name == "synthetic-only":
        return Arm(name, "synthetic", False, real=False)
    if name == "synthetic-pretrain":
        return Arm(name, "synthetic", True, pretrain=True)
    if name == "real-pretrain":  # synthetic-pretrain's control: the same two phases and steps, the real subset in both
        return Arm(name, None, True, pretrain=True)
    parts = name.split("+")
    extra = next((p for p in parts if p in EXTRA_SOURCES), None)
    return Arm(name, extra, "classic" in parts)


@dataclass
class Pool:
    """Training samples: (N, H, W, C) uint8 images and targets ((N, H, W) codes or (N,) labels)."""

    images: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def balanced_p(self) -> np.ndarray:
        """Draw probabilities 1 / (count of the sample's label), normalised: every label equally likely per draw."""
        p = 1.0 / np.bincount(self.targets)[self.targets]
        return p / p.sum()


@dataclass
class TrainSettings:
    """How one cell trains: a step budget with early stopping on the real validation split."""

    max_steps: int = 1500
    eval_every: int = 100
    patience: int = 4  # evaluations without improvement before stopping
    batch_size: int = 16
    lr: float = 2e-3
    mix: float | None = 0.5  # share of each batch from the extra pool (real+synthetic); None: in proportion to pool sizes
    arch: str = "resnet"  # classification: resnet | densenet
    class_balanced: bool = True  # classification: batches drawn by inverse class frequency
    pretrain_steps: int | None = None  # synthetic-pretrain: steps on the synthetic pool first (None: max_steps // 2)
    class_weights: object = None  # segmentation: cross-entropy class weights (a tensor), the same in every arm of a study
    compile: bool = False  # torch.compile the training forward (training.common.CompiledForward)
    curve: list = field(default_factory=list)


def arm_pools(arm: str, real: Pool, extras: dict[str, Pool | None] | Pool | None) -> tuple[list[Pool], bool]:
    """The pools an arm draws from and whether it uses classic augmentation.

    `extras` maps a source (synthetic, heldout, oracle) to its pool; a bare Pool is the synthetic one.
    synthetic-pretrain returns its fine-tuning pools (the real subset); `pretrain_pool` gives the other."""
    spec = arm_of(arm)
    extras = extras if isinstance(extras, dict) else {"synthetic": extras}
    extra = extras.get(spec.extra) if spec.extra else None
    if spec.extra and (extra is None or len(extra) == 0):
        raise ValueError(f"arm_pools expects a non-empty {spec.extra} pool for arm {arm!r}, but got none")
    if spec.pretrain or not spec.extra:
        return [real], spec.classic
    return ([real, extra] if spec.real else [extra]), spec.classic


def draw(pools: list[Pool], batch_size: int, step: int, seed: int, mix: float | None, balanced_labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """One batch (images, targets), a pure function of (seed, step): a binomial share from the second pool,
    class-balanced within each pool for classification."""
    rng = np.random.default_rng([seed, step, 17])
    if len(pools) == 2:
        share = mix if mix is not None else len(pools[1]) / (len(pools[0]) + len(pools[1]))
        n_syn = int(rng.binomial(batch_size, share))
        sizes = [batch_size - n_syn, n_syn]
    else:
        sizes = [batch_size]
    images, targets = [], []
    for pool, n in zip(pools, sizes):
        if n == 0:
            continue
        idx = rng.choice(len(pool), n, replace=True, p=pool.balanced_p if balanced_labels else None)
        images.append(pool.images[idx])
        targets.append(pool.targets[idx])
    return np.concatenate(images), np.concatenate(targets)


@dataclass(frozen=True)
class ClassicAugmentation:
    """Classic augmentation of a whole batch on tensors, one random draw per sample: flips, 90-degree
    rotations, a small affine (rotation, scale; reflection padding; masks nearest), Gaussian noise,
    contrast (gamma) and intensity jitter. The settings are those of MONAI's RandFlip, RandRotate90,
    RandAffine, RandGaussianNoise, RandAdjustContrast and RandScaleIntensity as the study used them per
    sample; done per batch with torch's affine_grid / grid_sample, so an augmented cell costs about what
    a plain one does. Every draw is a pure function of (seed, step)."""

    p_flip: float = 0.5
    p_rot90: float = 0.5
    p_affine: float = 0.5
    rotate: float = 0.26  # radians, uniform in +-
    scale: float = 0.1  # uniform in 1 +- scale
    p_noise: float = 0.3
    noise_std: float = 0.02
    p_contrast: float = 0.3
    gamma: tuple[float, float] = (0.8, 1.25)
    p_intensity: float = 0.3
    intensity: float = 0.1

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, C, H, W) in [0, 1]; y (B, 1, H, W) integer codes or None."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 29]).generate_state(1)[0]))
        b = len(x)
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        flip_h, flip_w, do_rot, k = u(b) < self.p_flip, u(b) < self.p_flip, u(b) < self.p_rot90, torch.randint(1, 4, (b,), generator=g)
        do_aff, angle, zoom = u(b) < self.p_affine, (2 * u(b) - 1) * self.rotate, 1 + (2 * u(b) - 1) * self.scale
        square = x.shape[-1] == x.shape[-2]
        # One sampling grid per sample: flips, 90-degree turn and the affine composed into a 2x3 matrix.
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.where(flip_w, -1.0, 1.0)
        theta[:, 1, 1] = torch.where(flip_h, -1.0, 1.0)
        quarter = torch.where(do_rot & square, k.float() * math.pi / 2, torch.zeros(b))
        turn = torch.where(do_aff, angle, torch.zeros(b)) + quarter
        s = torch.where(do_aff, 1 / zoom, torch.ones(b))
        rot = torch.stack([torch.stack([torch.cos(turn), -torch.sin(turn)], -1), torch.stack([torch.sin(turn), torch.cos(turn)], -1)], -2)
        theta[:, :, :2] = (rot * s[:, None, None]) @ theta[:, :, :2]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # pure flips and quarter turns map pixel centres onto pixel centres: nearest keeps them exact
        x = torch.where(do_aff[:, None, None, None], F.grid_sample(x, grid, "bilinear", "reflection", align_corners=False),
                        F.grid_sample(x, grid, "nearest", "reflection", align_corners=False))
        if y is not None:
            y = F.grid_sample(y.float(), grid, "nearest", "reflection", align_corners=False).round().long()
        noise = (u(b) < self.p_noise).float()[:, None, None, None] * torch.randn(x.shape, generator=g) * self.noise_std
        x = x + noise
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        gam = self.gamma[0] + u(b) * (self.gamma[1] - self.gamma[0])
        gam = torch.where(u(b) < self.p_contrast, gam, torch.ones(b))[:, None, None, None]
        x = ((x - lo) / span).clamp(0, 1) ** gam * span + lo
        factor = torch.where(u(b) < self.p_intensity, 1 + (2 * u(b) - 1) * self.intensity, torch.ones(b))[:, None, None, None]
        return (x * factor).clamp(0, 1), y


def build_model(task: str, n_classes: int, in_channels: int, arch: str, image_size: int | None = None):
    """The downstream model: a MONAI U-Net (segmentation, K + 1 outputs) or ResNet/DenseNet (classification)."""
    if task == "segmentation":
        from synthmed.models.tasknets import build_segmenter

        return build_segmenter(n_classes, in_channels)
    from synthmed.models.tasknets import build_classifier

    return build_classifier(n_classes, in_channels, arch, image_size=image_size)


def segmentation_loss(class_weights=None):
    """Dice + cross-entropy on softmax outputs and integer targets (B, 1, H, W), class weights in both terms, with
    IGNORE pixels left out of both: MONAI's DiceLoss and torch's cross-entropy with their ignore_index. On targets
    without IGNORE it is MONAI's DiceCELoss(to_onehot_y=True, softmax=True, weight=class_weights), value and gradient."""
    from monai.losses import DiceLoss

    dice = DiceLoss(to_onehot_y=True, softmax=True, weight=class_weights, ignore_index=IGNORE)
    ce = torch.nn.CrossEntropyLoss(weight=class_weights, ignore_index=IGNORE)
    return lambda logits, y: dice(logits, y) + ce(logits, y[:, 0].long())


def train_cell(task: str, pools: list[Pool], classic: bool, val: Pool, n_classes: int, settings: TrainSettings, seed: int,
               progress=None, device: str = "cpu", pretrain: Pool | None = None):
    """Train one cell's model; returns (model in eval mode with the best validation weights, record).

    The record has the learning curve [(step, mean train loss, validation score)], the best step and score
    and the step training stopped at. Validation score: mean foreground Dice, or balanced accuracy.
    With `pretrain`, the model first trains `settings.pretrain_steps` steps on that pool alone (no early
    stopping), then fine-tunes on `pools` with a fresh optimiser and schedule."""
    if task not in TASKS:
        raise ValueError(f"train_cell expects task in {TASKS}, but got {task!r}")
    torch.manual_seed(seed)
    model = build_model(task, n_classes, pools[0].images.shape[-1], settings.arch, image_size=min(pools[0].images.shape[1:3])).to(device)
    weights = None if settings.class_weights is None else torch.as_tensor(settings.class_weights, dtype=torch.float32).to(device)
    loss_fn = segmentation_loss(weights) if task == "segmentation" else None
    transform = ClassicAugmentation() if classic else None
    forward = CompiledForward(model, settings.compile)  # training steps only: validation and test run the model eagerly
    balanced = task == "classification" and settings.class_balanced

    def run(phase_pools, steps, stream, each):
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
        sched = warmup_cosine(opt, steps, warmup_fraction=0.1, floor=0.02)
        for step in range(1, steps + 1):
            model.train()
            xb, yb = draw(phase_pools, settings.batch_size, step, seed + stream, settings.mix, balanced)
            x = to_unit_range(xb)  # (B, C, H, W)
            y = torch.from_numpy(yb.astype(np.int64))
            if task == "segmentation":
                y = y[:, None]  # (B, 1, H, W)
            if transform is not None:
                x, y2 = transform(x, y if task == "segmentation" else None, seed + stream, step)
                y = y2 if task == "segmentation" else y
            if task == "segmentation":  # U-Net (instance norm): large images train in micro-batches, same gradient
                loss = accumulated_step(lambda xs, ys: loss_fn(forward(xs.to(device)), ys.to(device)), x, y, model.parameters(), opt, sched, clip=None)
            else:  # batch norm: the batch is one pass
                loss = F.cross_entropy(forward(x.to(device)), y.to(device))
                optimiser_step(loss, model.parameters(), opt, sched, clip=None)
                loss = loss.item()
            if each(step, steps, loss):
                return step
        return steps

    record = {}
    if pretrain is not None:
        n_pre = settings.pretrain_steps or max(1, settings.max_steps // 2)
        run([pretrain], n_pre, 7919, lambda step, steps, loss: progress and progress(step, steps, loss))
        record["pretrain_steps"] = n_pre
    best = [-np.inf, 0, None]
    curve, losses, stale = [], [], [0]

    def each(step, steps, loss):
        losses.append(loss)
        stop = False
        if step % settings.eval_every == 0 or step == steps:
            score = validation_score(task, model.eval(), val, n_classes)
            curve.append({"step": step, "train_loss": float(np.mean(losses)), "val_score": score})
            losses.clear()
            if score > best[0]:
                best[:], stale[0] = [score, step, copy.deepcopy(model.state_dict())], 0
            else:
                stale[0] += 1
            stop = stale[0] >= settings.patience
        if progress:
            progress(step, steps, loss)
        return stop

    stopped = run(pools, settings.max_steps, 0, each)
    model.load_state_dict(best[2])
    if settings.compile:
        record["compiled"] = forward.compiled
    return model.eval(), {**record, "curve": curve, "best_step": best[1], "best_val_score": float(best[0]), "stopped_at": stopped,
                          "early_stopped": stopped < settings.max_steps}


def predict(task: str, model, images: np.ndarray) -> np.ndarray:
    """Segmentation: class-code maps (N, H, W); classification: probabilities (N, K)."""
    if task == "segmentation":
        from synthmed.models.tasknets import predict as seg_predict

        return seg_predict(model, images)
    from synthmed.models.tasknets import predict_proba

    return predict_proba(model, images)


def validation_score(task: str, model, val: Pool, n_classes: int) -> float:
    """The early-stopping score on the real validation split: mean per-image Dice, or balanced accuracy."""
    pred = predict(task, model, val.images)
    if task == "segmentation":
        from synthmed.evaluation.metrics import dice_per_image

        d = dice_per_image(pred, val.targets, n_classes)
        return float(np.nanmean(d)) if np.isfinite(d).any() else 0.0
    labels = pred.argmax(1)
    recalls = [float((labels[val.targets == c] == c).mean()) for c in np.unique(val.targets)]
    return float(np.mean(recalls))


def _ids_under(obj, keys=("source_mask_id", "source_id", "donor_id")) -> set[str]:
    """Every sample id a provenance record names (its layout's source, pasted objects' donors), at any depth."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and isinstance(v, str):
                found.add(v)
            else:
                found |= _ids_under(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            found |= _ids_under(v, keys)
    return found


def leakage(rows: list[dict], model_train_ids: list[str] | None, allowed: set[str], held_out: set[str]) -> str | None:
    """Why a synthetic set may not train an arm that has only the `allowed` real training ids, or None.

    Refused: a sample drawn from (or pasting objects from) a validation/test sample or a training sample
    outside the arm's subset, a sample from another source split, a model whose training ids are unknown,
    and a model trained on samples outside the subset (more real data than the arm has)."""
    for r in rows:
        prov = r.get("provenance") or {}
        if prov.get("source_split", "train") != "train":
            return f"sample {r.get('id')} was drawn from the {prov['source_split']!r} split"
        named = _ids_under(prov)
        if not named:
            return f"sample {r.get('id')} has no provenance naming its source mask"
        if named & held_out:
            return f"sample {r.get('id')} derives from validation/test sample {sorted(named & held_out)[0]}"
        if named - allowed:
            return f"sample {r.get('id')} derives from training sample {sorted(named - allowed)[0]}, outside this fraction's subset"
    if model_train_ids is None:
        return "its model's training.json does not list the samples it was trained on"
    extra = set(model_train_ids) - allowed
    if extra:
        return f"its model was trained on {len(model_train_ids)} samples, {len(extra)} outside this fraction's subset of {len(allowed)} (e.g. {sorted(extra)[0]})"
    return None
