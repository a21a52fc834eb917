"""`synthmed generate`: plan ▸ layouts ▸ sample (sharded, resumable) ▸ filter ▸ export.

Runs as one process or under `accelerate launch --num_processes N`: process 0 writes the plan
(and trains the quality filter's judges), every process draws the planned samples whose index
is its rank modulo N, and process 0 writes the manifest and renames OUT.partial to OUT.
Sample i's seed depends on (seed, i, attempt) only and batches are padded so that no row sees
its neighbours, so the output is the same whatever the batch size or number of processes.
"""

from __future__ import annotations

from pathlib import Path


from synthmed.config import GenerateConfig, config_yaml
from synthmed.core.io import SynthmedError, read_json, short_hash
from synthmed.core.outputs import check_output, partial_of
from synthmed.core.progress import task
from synthmed.generation.draw import grey_limit


def generate(data: Path, model: Path, cfg: GenerateConfig, out: Path, backbone: str | None = None) -> Path:
    """Synthesise the planned samples from training-split layouts, with provenance per sample."""
    from accelerate import PartialState

    from synthmed.core.device import cpu_only
    from synthmed.data.prepared import read_card
    from synthmed.data.prompts import prompt_rule
    from synthmed.evaluation.metrics import dice_per_image
    from synthmed.generation.draw import draw_shard, sampler_for
    from synthmed.generation.filter import load_judges
    from synthmed.generation.store import GenerationStore
    from synthmed.generation.export import check_exportable
    from synthmed.models.trained import check_conditioning, has_controlnet, read_training

    data, model, out = Path(data), Path(model), Path(out)
    state = PartialState(cpu=cpu_only())
    if state.device.type == "cpu" and cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    training = read_training(model)
    card = read_card(data)  # before any work: what the data and the model must agree on
    check_conditioning(model, training, card, data / "dataset.json")
    check_exportable(cfg.export, card, data / "dataset.json")
    if not has_controlnet(training) and cfg.filter.by in ("dice", "both"):
        raise SynthmedError(f"{model}: trained with conditioning_mode {training.get('conditioning_mode')!r} (no ControlNet): its images follow prompts, "
                            "not masks, so filter.by dice does not apply; use filter.by none or confidence")
    if state.is_main_process:
        check_output(out)
    store = GenerationStore(partial_of(out))
    if state.is_main_process:
        _plan(store, data, cfg, _identity(data, model, cfg, backbone))
    state.wait_for_everyone()
    summary, items = store.read_plan()
    judges = load_judges(store, data, cfg, state, dice_per_image)
    sampler, provenance = sampler_for(model, training, data, cfg, backbone, state.device)
    todo = [it for it in items if it["index"] % state.num_processes == state.process_index]
    with task(f"generate (process {state.process_index + 1}/{state.num_processes})" if state.num_processes > 1 else "generate", len(todo)) as update:
        draw_shard(store, todo, sampler, judges, cfg, prompt_rule(data, training), update, grey_limit=grey_limit(read_card(data), cfg))
    state.wait_for_everyone()
    if state.is_main_process:
        card = _card(data, model, summary, cfg, judges)
        store.finish(out, card, lambda item, rec: _row(item, rec, provenance), extras={"generate_config.yaml": config_yaml(cfg)},
                     before_rename=lambda root: _export(root, cfg.export))
    state.wait_for_everyone()
    return out


# Settings that do not change what is drawn (samples are batch-independent): a resumed run need not share them.
NOT_RESULT_SETTINGS = frozenset({"batch_size", "export", "cpu_threads"})


def _identity(data: Path, model: Path, cfg: GenerateConfig, backbone: str | None) -> str:
    """What a resumed run must share with the interrupted one (not batch size, threads or export)."""
    keep = cfg.model_dump(mode="json", exclude=set(NOT_RESULT_SETTINGS))
    text = repr((str(data.resolve()), str(model.resolve()), backbone, keep))
    return short_hash(text)


def _plan(store, data: Path, cfg: GenerateConfig, identity: str) -> None:
    """Write the plan once; a resumed run checks that it was made with the same settings."""
    from synthmed.generation.plan import make_plan

    if (store.root / "plan.json").is_file():
        made = read_json(store.root / "plan.json").get("identity")
        if made != identity:
            raise SynthmedError(f"{store.root}: an interrupted run with other settings (data, model or generate config); remove it or use them again")
        return
    train = _training_layouts(data)
    try:
        summary, entries = make_plan(train, cfg.plan, cfg.n_samples, cfg.layouts, cfg.seed)
    except ValueError as exc:
        raise SynthmedError(f"{data}: {exc}") from None
    summary["identity"] = identity
    summary["layouts"] = cfg.layouts.model_dump(mode="json")
    store.write_plan(summary, entries)


def _training_layouts(data: Path):
    """The training split's rows, masks, instances and conditioning (never validation/test)."""
    from synthmed.data.conditioning import spec_from_card
    from synthmed.data.prepared import load_conditioning, load_split, read_card, read_instances
    from synthmed.generation.plan import TrainingLayouts

    card = read_card(data)
    split = load_split(data, "train")  # hygiene: only the training split feeds generation
    cond = load_conditioning(split)
    classes = card.get("classes") or []
    instances = [read_instances(data / "train" / r["instance_mask"], split.images.shape[1:3]) if "instance_mask" in r else None for r in split.rows]
    spec = spec_from_card(card)
    labels = [r.get("label") for r in split.rows]
    if split.masks is None:
        classes = sorted({str(x) for x in labels if x is not None}) or classes
    return TrainingLayouts(split.rows, classes, split.masks, instances, cond, labels, spec)


def _row(item: dict, record: dict, shared: dict) -> dict:
    """The metadata.jsonl row of a kept sample: prepared-layout columns + provenance."""
    files = item["files"]
    row = {**item["row_fields"], "file_name": f"images/{item['id']}.png", "id": item["id"], "text": item["prompt"], **files,
           "label": item.get("label"), "patient_id": item.get("patient_id"), "split": "train", "source": f"synthetic:{item['source_id']}",
           "synthetic": True}
    for key in ("classes", "objects", "pixels"):
        if key in item:
            row[key] = item[key]
    row["provenance"] = {
        **shared,
        "prompt": record["prompt"],
        "seed": record["seed"],
        "attempt": record["attempt"],
        "source_mask_id": item["source_id"],
        "layout": item["layout"],
        "plan_focus": item["focus"],
        "filter_scores": record["scores"],
    }
    return row


def _card(data: Path, model: Path, summary: dict, cfg: GenerateConfig, judges) -> dict:
    from synthmed.data.prepared import read_card

    card = read_card(data)
    syn = {k: card[k] for k in ("classes", "labels", "label_map", "image_size", "channels", "conditioning", "task") if k in card}
    syn.update(name=f"synthetic:{card.get('name', 'data')}", source="synthmed generate", real_data=str(data.resolve()), model=str(model.resolve()),
               filter=judges.describe() if judges else None)
    limit = grey_limit(card, cfg)
    if limit is not None:
        syn["greyscale"] = {"vae": "grey in as R = G = B; the 3 decoded channels saved as their mean (1-channel PNG)",
                            "colour_residual": "mean absolute deviation of the decoded channels from their mean, grey levels 0-255, per draw in provenance.filter_scores",
                            "max_colour_residual": None if limit == float("inf") else limit}
    return syn


def _export(root: Path, formats: list[str]) -> None:
    """Also write the finished set in the formats asked for, under ROOT/export/<format>."""
    from synthmed.generation.export import export_dataset

    for fmt in formats:
        export_dataset(root, fmt, root / "export" / fmt)
