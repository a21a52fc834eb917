"""Typed configuration for every stage, loaded from YAML at the edge and saved next to outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthmed.core.io import SynthmedError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ARCH_PATTERN = r"^(resnet|densenet|vae-encoder:.+)$"  # classification networks (models.tasknets.build_classifier)


class TaskTrainingConfig(_Strict):
    """How a task model (a MONAI segmenter or classifier) trains on the real train split: the one recipe of the
    filter's judges, evaluate's segmenter and domain classifier, the steering classifier and the downstream cells."""

    steps: int = Field(600, ge=1, description="optimiser steps (downstream cells: the most, with early stopping)")
    batch_size: int = Field(16, ge=2, description="images per step (2+: BatchNorm)")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (10% warm-up, then cosine decay)")
    class_weighting: Literal["none", "median_frequency"] = Field(
        "none", description="segmenters: cross-entropy class weights; median_frequency (sqrt, capped at 10x) makes a judge that sees a rare class. "
                            "Downstream cells: the same weighting in every arm")


def _flat_keys(data, renames: dict[str, tuple[tuple[str, ...], str]]):
    """Earlier flat keys (e.g. segmenter_steps) read into the nested task-training groups (segmenter.steps); they win
    over the group's value, so `--set segmenter_steps=60` still works on a dumped config."""
    if not isinstance(data, dict) or not any(k in data for k in renames):
        return data
    data = dict(data)
    for old, (groups, key) in renames.items():
        if old in data:
            value = data.pop(old)
            for g in groups:
                current = data.get(g)
                current = current.model_dump() if isinstance(current, BaseModel) else dict(current or {})
                data[g] = {**current, key: value}
    return data


class PhantomConfig(_Strict):
    """The embedded phantom-histology data set."""

    seed: int = 0
    size: int = Field(64, description="tile size in pixels: 64, 128 or 256")
    n_slides: int = Field(48, ge=3, description="labelled slides (split by slide into train/validation/test)")
    tiles_per_slide: int = Field(12, ge=1)
    n_unlabelled_slides: int = Field(150, ge=0, description="slides of image-only tiles (backbone pretraining)")


class ConditioningConfig(_Strict):
    """What the ControlNet is conditioned on: builders stacked in this order (channels add up)."""

    builders: list[str] | None = Field(None, description="colour, binary, onehot, boundary, canny, soft (soft edges), tissue (the smoothed tissue "
                                                         "around the mask's objects), source, given; default: the format's")
    canny_sigma: float | None = Field(None, gt=0, description="Gaussian smoothing of canny and soft edges; default: the format's (1.5 if it has none)")
    canny_low: float | None = Field(None, ge=0, description="hysteresis thresholds on the gradient of the [0, 1] greyscale image; default: the format's (0.05 / 0.15)")
    canny_high: float | None = Field(None, ge=0)
    canny_region: Literal["image", "lesion"] = Field("image", description="image: edges everywhere; lesion: edges inside the dilated lesion mask only")
    tissue_sigma: float = Field(2.0, gt=0, description="tissue: the Gaussian's sigma in pixels of the prepared size (2 keeps the phantom's "
                                                         "gland lumens at 64 px; scale it with the image size)")


class PrepareConfig(_Strict):
    """`synthmed prepare FORMAT --root ROOT`: a source data set into the prepared layout."""

    source: str = Field("phantom-histology", description="FORMAT (see `synthmed prepare --help`)")
    root: str | None = Field(None, description="the source download's root folder (not for the generated phantom-histology / phantom-breast)")
    options: dict = Field(default_factory=dict, description="format-specific options (e.g. flag, level, modalities; phantom-breast: n_patients, images_per_patient, modality)")
    phantom: PhantomConfig = PhantomConfig()
    size: int | None = Field(None, ge=8, description="output size SIZE x SIZE; default: the format's (None = source size)")
    resize: Literal["resize", "crop", "pad"] | None = Field(None, description="resize policy; default: the format's")
    limit: int | None = Field(None, ge=1, description="at most this many samples per split")
    workers: int = Field(0, ge=0, description="worker processes; 0 = up to 4, one per CPU core")
    skip_bad: bool = Field(False, description="skip unreadable/invalid items and list them in skipped.jsonl")
    official_splits: bool = True
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    conditioning: ConditioningConfig = ConditioningConfig()
    prompt_template: str | None = Field(None, description="e.g. '{modality}, {label}'; fields depend on the format")


class BackboneConfig(_Strict):
    """`synthmed train backbone`: VAE then text-to-image UNet, on unlabelled images."""

    preset: str = "tiny"
    vae_steps: int = Field(1500, ge=1)
    vae_batch_size: int = Field(32, ge=1)
    vae_crop: int = Field(32, ge=8)
    vae_lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    unet_steps: int = Field(3000, ge=1)
    unet_batch_size: int = Field(32, ge=1)
    unet_lr: float = Field(1e-3, gt=0)
    prompt_dropout: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(250, ge=1)
    seed: int = 0


class LoraConfig(_Strict):
    """LoRA adapters on the backbone UNet's attention projections (peft)."""

    rank: int = Field(0, ge=0, description="LoRA rank (0: no LoRA)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank)")
    lr: float | None = Field(None, gt=0, description="learning rate of the LoRA weights (default: lr)")
    stage: Literal["joint", "before"] = Field("joint", description="joint: trained with the ControlNet; before: a text-to-image LoRA stage first, then the ControlNet on the fused UNet")
    steps: int | None = Field(None, ge=1, description="steps of the 'before' stage (default: steps)")


class AugmentConfig(_Strict):
    """Augmentations applied identically to image, conditioning and mask."""

    flips: bool = Field(True, description="the 8 flips/90-degree rotations (4 for non-square images: no 90-degree turns)")
    views: int = Field(8, ge=1, le=8, description="at most this many of those views, drawn and cached (the latent cache holds N x views "
                                                  "latents): 1 the image as it is, 2 and its mirror image, 4 and their 180-degree turns, 8 all")
    crop: tuple[int, int] | None = Field(None, description="random crop (height, width) in pixels; needs cache_latents false")
    scale: tuple[float, float] = Field((1.0, 1.0), description="random rescale range before the crop; other than (1, 1) needs cache_latents false")


class RefinerConfig(_Strict):
    """A conditioned refiner after the decoder (models/refiner.py): paints, from the full-resolution conditioning image,
    the small structures the latent cannot carry; trained on the train split's round trips, class-weighted as the decoder."""

    steps: int = Field(0, ge=0, description="0: no refiner")
    batch_size: int = Field(16, ge=1)
    crop: int = Field(64, ge=8, description="square crops in pixels (whole images when they are smaller)")
    width: int = Field(48, ge=1, description="channels of its hidden layers")
    depth: int = Field(5, ge=2, description="3x3 convolutions: the receptive field is 2 x depth + 1 pixels")
    lr: float = Field(1e-3, gt=0)
    latent_noise: float = Field(0.6, ge=0, description="round trips from latent means plus noise of up to this x the latents' std (generated latents are not real ones)")
    checkpoint_every: int = Field(250, ge=1)
    compile: bool = Field(False, description="torch.compile its training forward on channels-last tensors (on 2 CPU threads 1.4x the speed of its "
                                             "forward and backward, about 1.2x the stage with its decodes, after a first compile that is cached; needs a "
                                             "C++ compiler, else it trains eagerly with a note)")


class DecoderConfig(_Strict):
    """Fine-tuning the VAE decoder on the training split before the ControlNet (the encoder and latents stay as they are)."""

    steps: int = Field(0, ge=0, description="0: the backbone's decoder as it is")
    batch_size: int = Field(32, ge=1)
    crop: int = Field(32, ge=8, description="square crops in pixels (the VAE is convolutional)")
    lr: float = Field(5e-4, gt=0)
    class_weights: dict[str, float] | None = Field(None, description="reconstruction-loss weight per mask class name (others 1), per pixel")
    focus_share: float = Field(0.4, ge=0, le=1, description="share of each batch's crops centred on a class weighted above 1")
    checkpoint_every: int = Field(100, ge=1)
    refiner: RefinerConfig = RefinerConfig()


class ControlNetConfig(_Strict):
    """`synthmed train controlnet`: a ControlNet from the frozen backbone's UNet (or, mode text, the UNet alone)."""

    backbone: str = Field("tiny", description="preset, diffusers folder, single-file .safetensors, or hub id (local cache)")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=1, description="global batch: split over processes and grad_accum micro-batches")
    lr: float = Field(5e-4, gt=0)
    prompt_dropout: float = Field(0.3, ge=0, le=1, description="proportion of prompts replaced by the empty prompt")
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    conditioning_mode: Literal["both", "mask", "text"] = Field("both", description="both: mask + prompt; mask: empty prompts; text: no ControlNet, fine-tune the UNet (LoRA or full)")
    prompt_source: Literal["text", "label"] = Field("text", description="text: the data set's prompts; label: label_prompt filled with the class label")
    label_prompt: str = Field("{label}", description="prompt for prompt_source label, e.g. '{label} breast ultrasound'")
    depth: str = Field("deep", description="ControlNet residuals used: deep (all), shallow:K (first K down blocks), mid")
    controlnet_init: str | None = Field(None, description="warm start from this ControlNet folder")
    lora: LoraConfig = LoraConfig()
    unet_lr: float | None = Field(None, gt=0, description="text mode without LoRA: learning rate of the full UNet (default: lr)")
    unet_decoder_lr: float | None = Field(None, gt=0, description="also train the UNet decoder (up blocks) at this lower rate")
    class_weights: dict[str, float] | None = Field(None, description="loss weight per mask class name (others 1), on the latent grid")
    decoder: DecoderConfig = Field(DecoderConfig(), description="fine-tune the VAE decoder first, weighted to rare classes (saved as vae/)")
    augment: AugmentConfig = AugmentConfig()
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="frozen backbone in this precision; trained weights stay fp32")
    gradient_checkpointing: bool = False
    attention: Literal["auto", "sdpa", "xformers"] = Field("auto", description="auto: xFormers on CUDA when installed, else PyTorch SDPA")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the trained weights (saved as the final model) when > 0")
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting (5 is the paper's choice)")
    cache_latents: bool | None = Field(None, description="encode images and prompts once (default: yes, unless crops/rescaling)")
    latent_cache: str = Field("auto", min_length=1, description="where cached latents live: auto ($SYNTHMED_CACHE, else ~/.cache/synthmed: "
                              "reused by later runs on the same images and VAE encoder), a folder, or memory")
    compile: bool = Field(False, description="torch.compile the ControlNet and UNet")
    channels_last: bool = False
    validation_every: int = Field(0, ge=0, description="validation loss + image grid to the tracker every N steps (0: off)")
    validation_samples: int = Field(4, ge=1, description="fixed validation-split masks rendered each time")
    validation_steps: int = Field(20, ge=1, description="sampling steps of the validation images")
    log_with: str | None = Field("tensorboard", description="accelerate tracker: tensorboard, wandb, mlflow (if installed), or null")


class PlanConfig(_Strict):
    """What to generate: how many synthetic samples of which class (written before sampling)."""

    mode: Literal["replay", "balance", "multiply", "counts"] = Field("replay", description="replay: n_samples from training masks as they are; balance: every class (or `classes`) up to the largest; "
                                  "multiply: `classes` x factor; counts: add `counts` per class")
    classes: list[str] | None = Field(None, description="the classes to add (default: all classes below the target)")
    factor: float = Field(2.0, gt=1, description="multiply: target = factor x the real count")
    counts: dict[str, int] = Field(default_factory=dict, description="counts: how many objects (segmentation) or images (classification) to add per class")
    unit: Literal["auto", "objects", "pixels", "images"] = Field("auto", description="what is counted: auto = objects where the data has instances, else pixels for masks, images for labels")
    max_samples: int = Field(2000, ge=1, description="cap on the synthetic samples a plan may ask for")


class LayoutConfig(_Strict):
    """New mask layouts made from training masks only; the options used are recorded per sample."""

    flips: bool = Field(True, description="a random flip/90-degree rotation of the source mask (4 shape-keeping ones for non-square)")
    elastic: float = Field(0.5, ge=0, le=1, description="probability of an elastic deformation")
    elastic_magnitude: tuple[float, float] = Field((2.0, 4.0), description="displacement range in pixels")
    copy_paste: int = Field(4, ge=0, description="objects of the classes being added pasted into each layout (0: off)")
    max_overlap: float = Field(0.1, ge=0, le=1, description="largest share of a pasted object that may cover existing objects")


class FilterConfig(_Strict):
    """Quality filter: score every sample with judges trained on the real train split, keep the good ones."""

    by: Literal["none", "dice", "confidence", "both"] = Field("none", description="dice: the real-trained segmenter's Dice against the conditioning mask; confidence: the real-trained classifier's probability of the intended class")
    min_dice: float | None = Field(None, ge=0, le=1, description="keep samples whose Dice reaches this; None: the judge's "
                                                                     "`real_quantile` per-image Dice on the real validation split")
    min_confidence: float | None = Field(None, ge=0, le=1, description="keep samples whose intended-class probability reaches this; None: "
                                                                           "the `real_quantile` of the classifier's true-class probability on real validation images")
    real_quantile: float = Field(0.1, ge=0, le=1, description="automatic thresholds: keep what the judge rates at least as well as the worst "
                                                              "real_quantile of real validation images")
    min_focus_dice: float | None = Field(None, ge=0, le=1, description="dice filter, judged per class: also the judge's Dice on the classes a "
                                                                           "sample was planned for (its focus, e.g. the rare class) must reach this (None: not judged)")
    attempts: int = Field(3, ge=1, description="draws per planned sample (new seed each) before it is dropped")
    segmenter: TaskTrainingConfig = Field(TaskTrainingConfig(steps=1200), description="the Dice judge's training")
    classifier: TaskTrainingConfig = Field(TaskTrainingConfig(steps=600), description="the confidence judge's training")
    classifier_arch: str = Field("resnet", pattern=ARCH_PATTERN, description="the confidence judge's network, as downstream.arch (e.g. "
                                                                              "vae-encoder:tiny-breast: a judge that learns from a small real subset)")

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        return _flat_keys(data, {
            "segmenter_steps": (("segmenter",), "steps"), "classifier_steps": (("classifier",), "steps"),
            "batch_size": (("segmenter", "classifier"), "batch_size"), "lr": (("segmenter", "classifier"), "lr")})


class GenerateConfig(_Strict):
    """`synthmed generate`: plan by class, make layouts from training masks, sample, filter, export."""

    n_samples: int = Field(96, ge=1, description="replay mode: how many samples")
    plan: PlanConfig = PlanConfig()
    layouts: LayoutConfig = LayoutConfig()
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(3.0, ge=1, description="classifier-free guidance (1: off)")
    conditioning_scale: float = Field(1.5, ge=0, description="ControlNet residual scale (controlnet_conditioning_scale); >1 follows the mask more strictly")
    scheduler: Literal["ddim", "unipc", "dpm", "euler"] = Field("unipc", description="dpm = DPM-Solver++ (2M)")
    guess_mode: bool = Field(False, description="ControlNet on the conditional pass only, residuals scaled from 0.1 to 1 (diffusers' guess mode)")
    control_start: float = Field(0.0, ge=0, lt=1, description="fraction of the steps before the ControlNet is applied")
    control_end: float = Field(1.0, gt=0, le=1, description="fraction of the steps after which it is no longer applied")
    negative_prompt: str = ""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    batch_size: int = Field(16, ge=1, description="images per network call on each process")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads per process on CPU (default: torch's); CPU kernels split work by "
                                                             "thread count, so bit-identical samples across runs need the same value")
    seed: int = 0
    filter: FilterConfig = FilterConfig()
    grey_max_colour: float | None = Field(6.0, ge=0, description="greyscale data (card channels 1): the VAE decodes 3 channels, saved as their mean; a draw "
                                                                 "whose channels differ from that mean by more than this many grey levels (mean absolute, 0-255) "
                                                                 "is colour, not grey, and is redrawn like a filter reject, then dropped (None: keep all; "
                                                                 "the residual is recorded either way)")
    export: list[str] = Field(default_factory=list, description="also write OUT/export/<format>: folder, medmnist, pannuke")


class EvaluateConfig(_Strict):
    """`synthmed evaluate`: the plausibility and fidelity minimum."""

    segmenter: TaskTrainingConfig = Field(TaskTrainingConfig(steps=1200), description="the plausibility segmenter's training")
    seed: int = 0
    extractors: list[str] = Field(default_factory=lambda: ["domain"],
                                  description="feature spaces for FID/KID: domain (a classifier trained on the real train split's labels), "
                                              "inception (the standard FID InceptionV3; needs its weights file), or module:function")
    inception_weights: str | None = Field(None, description="pt_inception-2015-12-05-6726825d.pth (default: SYNTHMED_FID_WEIGHTS, then the torch hub cache)")
    domain: TaskTrainingConfig = Field(TaskTrainingConfig(steps=600), description="the domain feature extractor's classifier training")
    n_boot: int = Field(200, ge=10, description="bootstrap resamples for every 95% interval")
    memorisation_quantile: float = Field(0.01, gt=0, lt=1, description="near-copy: closer to training than this quantile of real test images")
    memorisation_ratio: float | None = Field(0.5, gt=0, lt=1, description="... and nearest/second-nearest distance ratio below this")
    model_cache: str | None = Field(None, description="folder where the evaluation segmenter and domain classifier are saved and reused for the same data, settings and seed")
    edge_tolerance: float = Field(2.0, ge=0, description="edge-map fidelity: pixels within which a generated image's edge counts as matching its conditioning edge map")
    paired_regeneration: int = Field(64, ge=0, description="real validation masks drawn again with the model for paired SSIM/PSNR/MS-SSIM/LPIPS (0: off)")
    lpips_alexnet: str | None = Field(None, description="torchvision's alexnet-owt-7be5be79.pth for LPIPS (default: SYNTHMED_LPIPS_ALEXNET, then the torch hub cache)")
    lpips_lin: str | None = Field(None, description="LPIPS v0.1 alex.pth linear heads (default: SYNTHMED_LPIPS_LIN, then the installed lpips package's file)")

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        return _flat_keys(data, {
            "segmenter_steps": (("segmenter",), "steps"), "segmenter_batch_size": (("segmenter",), "batch_size"),
            "segmenter_lr": (("segmenter",), "lr"), "domain_steps": (("domain",), "steps")})


DOWNSTREAM_ARMS = ("real", "real+classic", "real+synthetic", "real+classic+synthetic", "synthetic-only", "synthetic-pretrain", "real-pretrain",
                   "real+heldout", "real+classic+heldout", "real+oracle", "real+classic+oracle")
ARM_ALIASES = {"real+synthetic+classic": "real+classic+synthetic"}


class DownstreamConfig(_Strict):
    """`synthmed evaluate downstream`: real vs real+synthetic training, per real-data fraction and seed."""

    task: Literal["auto", "segmentation", "classification"] = Field("auto", description="auto: segmentation where the train split has masks")
    arms: list[Literal[DOWNSTREAM_ARMS]] = Field(
        default_factory=lambda: ["real", "real+classic", "real+synthetic", "real+classic+synthetic", "real+classic+heldout", "real+classic+oracle"],
        description="real, real+classic (the practitioner's baseline), real+synthetic, real+classic+synthetic, synthetic-only, "
                    "synthetic-pretrain (synthetic pre-training, real fine-tuning), real-pretrain (its control: the same two phases on the real subset), and the ceilings real+heldout, real+classic+heldout "
                    "(real samples of patients outside the fraction; none at 100%), real+oracle, real+classic+oracle (fresh samples of a phantom; "
                    "phantom data sets only). An arm that does not apply to a fraction or data set is skipped and listed as such")
    fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 1.0], description="nested shares of the labelled train split, by patient")
    subset_seed: int = Field(0, description="order in which patients enter the nested fractions")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="training seeds per cell (3+ for a CI)")
    seeds_at_lowest: list[int] | None = Field(None, description="training seeds at the lowest fraction (default: seeds), e.g. 5 for the headline")
    arm_seeds_at_lowest: dict[Literal[DOWNSTREAM_ARMS], list[int]] | None = Field(
        None, description="training seeds of the arms named, at the lowest fraction, in place of seeds_at_lowest: e.g. 10 for the headline pair "
                          "(real+classic, real+classic+synthetic) and 3 for the arms read less; arms are compared on the seeds they share; "
                          "arms the study does not run are ignored")
    synthetic_fractions: list[float] | None = Field(None, description="fractions that get a synthetic set (a ControlNet each) and the synthetic arms "
                                                                      "(default: every fraction); the others run the real, classic and ceiling arms")
    synthetic_count: int | None = Field(None, ge=1, description="synthetic samples a cell may use (None: all of the fraction's set)")
    mix: float | list[float] | None = Field(0.5, description="share of each mixed batch drawn from the extra pool (None: pool sizes); a list: "
                                                          "each cell tries every value and keeps the best on the real validation split")
    ceiling_mix: float | list[float] | Literal["mix"] | None = Field(
        "mix", description="the ceiling arms' (heldout, oracle) share of each mixed batch: a value or a list as for `mix`, or mix (the same as the "
                           "synthetic arms)")
    ceiling_fractions: list[float] | None = Field(None, description="fractions that get the ceiling arms (default: every fraction where they "
                                                                    "apply); at the others they are skipped and listed as such")
    mix_chosen_on: Literal["each_seed", "first_seed"] = Field(
        "each_seed", description="with a list of mixes: each_seed, every cell tries them all; first_seed, the first seed's cell of each fraction and "
                                 "arm tries them all (on the real validation split) and the other seeds train once with its choice")
    compile: bool = Field(False, description="torch.compile each cell's training forward (about 1.4x the steps per second on CPU after a first "
                                             "compile that is cached; needs a C++ compiler, else the cell trains eagerly with a note)")
    pretrain_steps: int | None = Field(None, ge=1, description="synthetic-pretrain: steps on the synthetic set before real fine-tuning (default: half of training.steps)")
    training: TaskTrainingConfig = Field(TaskTrainingConfig(steps=1500), description="each cell's model: steps is the most, with early stopping")
    eval_every: int = Field(100, ge=1, description="validation (real validation split) every this many steps")
    patience: int = Field(4, ge=1, description="early stopping: evaluations without improvement")
    arch: str = Field("resnet", pattern=ARCH_PATTERN,
                      description="classification network: resnet, densenet (MONAI, from scratch) or vae-encoder:BACKBONE (a small head on "
                                  "that backbone's frozen, pretrained VAE encoder, e.g. vae-encoder:tiny-breast)")
    rare_class: str | None = Field(None, description="the class reported on its own (default: the rarest in the train split)")
    label_field: str = Field("label", description="classification: the metadata column that is the target (e.g. cancer: cancerous / non-cancerous)")
    label_map: dict[str, str] | None = Field(None, description="classification: values of label_field merged into targets, e.g. {malignant: cancerous, "
                                                               "benign: non-cancerous, normal: non-cancerous}; unmapped values are kept")
    positive_class: str | None = Field(None, description="binary classification: the class whose probability gives AUC and sensitivity at 90% "
                                                         "specificity (default: the rare class)")
    workers: int = Field(1, ge=1, description="cells trained at once, each in its own process with its share of the CPU threads (on a "
                                               "few cores, 2 single-thread cells use them better than one two-thread cell); a cell's "
                                               "numbers depend on its seed and its thread count")
    synthetic_trust: Literal["none", "judge"] = Field("none", description="segmentation: judge leaves out of the loss every pixel of a synthetic "
                                                                           "sample where the generation filter's segmenter (trained on the same real "
                                                                           "subset) disagrees with its mask: a label is trusted only where the image "
                                                                           "carries it; none: every pixel counts")
    mask_classes: dict[str, str] | None = Field(None, description="segmentation: mask classes merged into the classes the model learns, e.g. "
                                                                 "{benign: lesion, malignant: lesion} for lesion segmentation; unmapped classes are kept")

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        if isinstance(data, dict) and isinstance(data.get("arms"), list):  # the name real+classic+synthetic had before the ceilings came
            data = {**data, "arms": [ARM_ALIASES.get(a, a) if isinstance(a, str) else a for a in data["arms"]]}
        return _flat_keys(data, {
            "max_steps": (("training",), "steps"), "batch_size": (("training",), "batch_size"), "lr": (("training",), "lr")})

    @field_validator("mix")
    @classmethod
    def _mix(cls, v):
        values = v if isinstance(v, list) else [v]
        if (isinstance(v, list) and not v) or any(m is not None and not 0 <= m <= 1 for m in values):
            raise ValueError(f"mix must be a share in [0, 1], None, or a non-empty list of shares, got {v}")
        return v

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"arms must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _arm_seeds(self):
        by_arm = self.arm_seeds_at_lowest or {}  # arms the study does not run are ignored: narrowing `arms` needs no other edit
        if empty := sorted(a for a, seeds in by_arm.items() if not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError(f"arm_seeds_at_lowest must give each arm a non-empty list of distinct seeds, got {({a: by_arm[a] for a in empty})}")
        return self

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions must lie in (0, 1], got {v}")
        return sorted(set(v))


class SteeringConfig(_Strict):
    """Class steering: real validation maps rendered as each class, judged by a classifier trained on the real train split."""

    n_maps: int = Field(0, ge=0, description="real validation conditioning maps, each rendered once per class (0: off)")
    field: str = Field("label", description="the metadata column whose values are steered by the prompt (e.g. label: malignant / benign)")
    classes: list[str] | None = Field(None, description="the values rendered (default: every value of `field` in the validation split)")
    target_field: str | None = Field(None, description="the classifier's target (default: downstream.label_field), e.g. cancer")
    positive: str | None = Field(None, description="the target class whose probability is the prompt/edge effect (default: downstream.positive_class, else the rarest)")
    match_field: str | None = Field("modality", description="a render's prompt is the most frequent training prompt of its class with the map's value of this field")
    classifier: TaskTrainingConfig = Field(TaskTrainingConfig(steps=600), description="the judging classifier's training")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        return _flat_keys(data, {"classifier_steps": (("classifier",), "steps")})


class RunConfig(_Strict):
    """`synthmed run CONFIG.yaml`: the whole flow for one experiment."""

    experiment: Literal["generation", "data_augmentation", "baseline_generation", "ablations"] = Field(
        "generation", description="generation: prepare > train > generate > evaluate; data_augmentation: the downstream grid")
    prepare: PrepareConfig = PrepareConfig()
    data: str | None = Field(None, description="an already prepared data set; skips `prepare` if given")
    controlnet: ControlNetConfig = ControlNetConfig()
    generate: GenerateConfig = GenerateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    steering: SteeringConfig = SteeringConfig()
    ablations: dict[str, dict] = Field(default_factory=dict, description="experiment ablations: cell name -> settings laid over this config (e.g. {shallow: {controlnet: {depth: 'shallow:1'}}})")
    quick: dict = Field(default_factory=dict, description="settings that `synthmed run --quick` lays over the others (a test-sized run)")


def load_yaml_config(path: Path, model: type[BaseModel] = RunConfig) -> BaseModel:
    """Read a YAML file into a config model, with a one-line error naming the file."""
    path = Path(path)
    if path.is_dir():
        raise SynthmedError(f"{path}: is a folder; give one YAML config file in it ({', '.join(sorted(p.name for p in path.glob('*.yaml'))[:4]) or 'none found'})")
    if not path.is_file():
        raise SynthmedError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return model.model_validate(raw)
    except yaml.YAMLError as exc:
        raise SynthmedError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SynthmedError(f"{path}: {where}: {err['msg']}") from None


def overrides(model: type[BaseModel], base: dict, assignments: list[str]) -> BaseModel:
    """Validate `base` updated by KEY=VALUE assignments (dotted keys for nested settings, YAML values)."""
    data = dict(base)
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SynthmedError(f"--set expects KEY=VALUE, but got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SynthmedError(f"--set {key}: {p} is not a group of settings")
        node[leaf] = yaml.safe_load(value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SynthmedError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def settings_changed(saved: Path, cfg: BaseModel, ignore: set[str] = frozenset()) -> list[str] | None:
    """The dotted keys whose values in `cfg` differ from the config saved at `saved` (a YAML written by save_config;
    keys it predates take today's defaults), leaving out the dotted keys in `ignore`; None if nothing is saved there,
    ["(unreadable)"] if it does not read as today's settings."""
    saved = Path(saved)
    if not saved.is_file():
        return None
    try:
        old = type(cfg).model_validate(yaml.safe_load(saved.read_text()) or {}).model_dump(mode="json")
    except (yaml.YAMLError, ValidationError):
        return ["(unreadable)"]
    return _changed(old, cfg.model_dump(mode="json"), set(ignore))


def _changed(old: dict, new: dict, ignore: set[str], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(old.keys() | new.keys()):
        if f"{prefix}{k}" in ignore:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, ignore, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def config_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: Path) -> None:
    """Write the resolved config as YAML next to an output."""
    Path(path).write_text(config_yaml(cfg))


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid on it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def quick_version(cfg: RunConfig, source: str = "config") -> RunConfig:
    """The config with its `quick:` settings laid over the others (what `synthmed run --quick` runs)."""
    if not cfg.quick:
        raise SynthmedError(f"{source}: has no `quick:` section for --quick")
    try:
        return RunConfig.model_validate(deep_merge(cfg.model_dump(exclude={"quick"}), cfg.quick))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SynthmedError(f"{source}: quick.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
