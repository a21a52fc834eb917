"""Downstream studies: `synthmed evaluate downstream` (the cells over given synthetic sets) and the
data_augmentation experiment (per real fraction: a subset, a ControlNet trained on it alone, its synthetic
set; then the cells, edge-map fidelity and class steering)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from synthmed.config import DownstreamConfig, RunConfig, save_config
from synthmed.config.settings import settings_changed
from synthmed.core.device import device
from synthmed.core.io import SynthmedError, file_sha256, read_json, short_hash, write_json
from synthmed.data.metadata import read_metadata
from synthmed.core.outputs import open_output, partial_of
from synthmed.core.progress import note
from synthmed.pipelines.generate import NOT_RESULT_SETTINGS as GENERATE_NOT_RESULTS
from synthmed.pipelines.train import changed_settings
from synthmed.evaluation.study import (SYNTHETIC_ARMS, RealData, aggregate, cell_settings, chosen_mix, first_seed_of, fraction_key, run_cell, seeds_of,
                                       still_to_run)


def downstream(data: Path, cfg: DownstreamConfig, out: Path, synthetic: dict | None = None) -> dict:
    """Run (or resume) the cells of a downstream study and write OUT/results.json.

    `synthetic` maps a fraction (or None: every fraction) to a synthetic set (a `generate` output)."""
    data, out = Path(data), Path(out)
    open_output(out, "downstream")
    save_config(cfg, out / "downstream_config.yaml")
    real, subsets, extras, sources, ceilings, skipped, bases = _setup(data, cfg, synthetic or {})
    cells = [(f, arm, seed) for f in cfg.fractions for arm in cfg.arms for seed in seeds_of(cfg, f, arm)
             if not any(s["fraction"] == f and s["arm"] == arm for s in skipped)]
    jobs = [(out / "cells" / fraction_key(f) / arm / f"seed{seed}", f, arm, seed, f"cell {i + 1}/{len(cells)}: {f:.0%} real, {arm}, seed {seed}",
             cell_settings(cfg, arm, bases[f])) for i, (f, arm, seed) in enumerate(cells)]
    started = time.time()
    # Cells whose mix their first seed's cell chooses (mix_chosen_on: first_seed) run after the others, with its choice.
    later = {i: first for i, j in enumerate(jobs) if (first := first_seed_of(cfg, j[1], j[2], j[-1], j[3])) is not None}
    tries = lambda job: len(job[-1]["mix"]) if isinstance(job[-1].get("mix"), list) else 1  # noqa: E731  (models a cell trains)
    wave = sorted((jobs[i] for i in range(len(jobs)) if i not in later), key=tries, reverse=True)  # the longest first

    def with_chosen_mix() -> list[tuple]:
        ready = []
        for i, first in later.items():
            folder, f, arm, seed, label, settings = jobs[i]
            mixed = chosen_mix(folder.parent / f"seed{first}", settings, first)
            if mixed is None:
                note(f"{folder}: waits for seed {first}'s cell, which chooses its mix and has not finished (a re-run trains it)")
            else:
                ready.append((folder, f, arm, seed, label, mixed))
        return ready

    _run_cells([wave, with_chosen_mix], real, subsets, extras, data, cfg, synthetic or {})
    results = aggregate(out, real, cfg, subsets, sources, ceilings)
    results["skipped_arms"] = skipped
    results["n_cells"] = len(cells)  # the grid less the arms that do not apply (listed in skipped_arms)
    results["seconds_this_invocation"] = round(time.time() - started, 1)
    write_json(out / "results.json", results)
    return results


def _run_cells(waves: list, real, subsets: dict, extras: dict, data: Path, cfg: DownstreamConfig, synthetic: dict) -> None:
    """Train the cells of each wave (a list of jobs, or a function giving it once the waves before have run) that have
    not finished with their settings (results made otherwise are moved aside), in `cfg.workers` processes or here."""
    if cfg.workers > 1:
        _run_in_workers(waves, data, cfg, synthetic)
        return
    for wave in waves:
        for folder, f, arm, seed, label, settings in _todo(wave):
            run_cell(folder, real, f, subsets[f], arm, seed, extras[f], cfg, label=label, settings=settings)


def _todo(wave) -> list[tuple]:
    """A wave's jobs (a list, or a function giving it once the waves before have run) that must train: no result
    yet, or one made with other settings (moved aside by still_to_run)."""
    jobs = wave() if callable(wave) else wave
    return [jobs[i] for i in still_to_run([(j[0], j[-1]) for j in jobs])]


def _setup(data: Path, cfg: DownstreamConfig, synthetic: dict) -> tuple:
    """What every cell reads: the real splits, the nested subsets, each fraction's extra pools (synthetic, trusted
    where asked, held-out, oracle), the synthetic sources, what the ceilings hold, the arms that do not apply, and
    per fraction what identifies its pools (the basis of each cell's settings)."""
    from synthmed.data.prepared import read_card
    from synthmed.data.subsets import nested_fractions

    card = read_card(data)
    real = RealData(data, cfg, card)
    subsets = nested_fractions(real.train.rows, cfg.fractions, cfg.subset_seed)
    need = any(a in SYNTHETIC_ARMS for a in cfg.arms)
    extras, sources, ceilings, skipped, bases = {}, {}, {}, [], {}
    for f in cfg.fractions:
        path = synthetic.get(f, synthetic.get(None))
        if need and not _gets_synthetic(cfg, f):
            skipped += [{"fraction": f, "arm": a, "why": "no synthetic set at this fraction (synthetic_fractions)"} for a in cfg.arms if a in SYNTHETIC_ARMS]
            if "real-pretrain" in cfg.arms:
                skipped.append({"fraction": f, "arm": "real-pretrain", "why": "synthetic-pretrain's control runs where synthetic-pretrain does"})
            path = None
        elif need and path is None:
            raise SynthmedError(f"{data}: arms {[a for a in cfg.arms if a in SYNTHETIC_ARMS]} need a synthetic set for fraction {f} (none given)")
        extras[f] = {}
        if path is not None and need:
            extras[f]["synthetic"] = real.synthetic_pool(Path(path), f, set(subsets[f]), cfg)
            sources[f] = str(Path(path).resolve())
        extras[f], ceilings[f], why = _ceiling_pools(real, card, f, subsets[f], extras[f], cfg)  # to the synthetic set's whole masks
        if cfg.synthetic_trust == "judge" and "synthetic" in extras[f]:
            extras[f]["synthetic"], ceilings[f]["synthetic_trust"] = real.trusted_pool(extras[f]["synthetic"], Path(path), set(subsets[f]))
        ceilings[f]["synthetic_arms"] = _gets_synthetic(cfg, f)
        skipped += [{"fraction": f, "arm": a, "why": w} for a, w in why.items()]
        bases[f] = _basis(card, subsets[f], sources.get(f), ceilings[f])
    return real, subsets, extras, sources, ceilings, skipped, bases


def _basis(card: dict, ids: list[str], source: str | None, pools: dict) -> dict:
    """What identifies a fraction's pools, by content (a run folder copied or moved keeps its cells): the real data
    set's fingerprint and the subset, the synthetic set's rows (metadata.jsonl: provenance, seeds, filter scores)
    and what the trust judge kept, the held-out and oracle pools (their patients and composition)."""
    basis = {"data": card.get("fingerprint"), "subset": short_hash("\n".join(ids))}
    if source is not None:
        basis["synthetic"] = {"rows": file_sha256(Path(source) / "train" / "metadata.jsonl")[:16], "trust": pools.get("synthetic_trust")}
    basis |= {k: pools[k] for k in ("heldout", "oracle") if k in pools}
    return basis


_WORKER: dict = {}  # a cell worker's set-up (_setup's result and the config), made once per process, or why it failed


def _run_in_workers(waves: list, data: Path, cfg: DownstreamConfig, synthetic: dict) -> None:
    """Run the cells of each wave (see _run_cells) `cfg.workers` at a time, each worker a fresh (spawned) process
    that makes the same set-up once and uses its share of this process's threads; a finished cell is its
    result.json, as in the serial loop. The workers start only when some cell has to train."""
    import multiprocessing
    import os

    import torch

    threads = max(1, torch.get_num_threads() // cfg.workers)
    ctx, pool = multiprocessing.get_context("spawn"), None
    try:
        for wave in waves:
            todo = _todo(wave)
            if not todo:
                continue
            pool = pool or ctx.Pool(cfg.workers, initializer=_worker_setup, initargs=(data, cfg, synthetic, threads, os.getpid()))
            for _ in pool.imap_unordered(_worker_cell, todo, chunksize=1):
                pass
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _worker_setup(*args) -> None:
    """The pool's initializer: (data, cfg, synthetic, threads, parent pid). A pool starts a new worker whenever its
    initializer raises, forever, so nothing may escape: a failure (a study that cannot be set up, or a worker that
    imported other code than the study's, say an edited source tree) waits for the worker's first cell, which
    raises it into the study as one line."""
    import os

    import torch

    try:
        data, cfg, synthetic, threads, parent = args
        _end_with(parent)
        os.environ["SYNTHMED_NO_PROGRESS"] = "1"  # plain progress lines: several workers share the terminal
        torch.set_num_threads(threads)
        _WORKER.update(setup=_setup(data, cfg, synthetic), cfg=cfg)
    except Exception as exc:  # noqa: BLE001 - any failure: reported, not retried
        _WORKER["failed"] = str(exc) if isinstance(exc, SynthmedError) else f"{type(exc).__name__}: {exc}"


def _end_with(parent: int) -> None:
    """On Linux, have the kernel send this worker SIGTERM when the study's process dies, even by SIGKILL or a crash,
    where no handler of its own runs: no orphan trains on into a folder that the next run of the study may use."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_cell(job: tuple) -> None:
    if "failed" in _WORKER:
        raise SynthmedError(f"a cell worker could not set the study up: {_WORKER['failed']}")
    folder, f, arm, seed, label, settings = job
    real, subsets, extras, *_ = _WORKER["setup"]
    run_cell(folder, real, f, subsets[f], arm, seed, extras[f], _WORKER["cfg"], label=label, settings=settings)


def _gets_synthetic(cfg: DownstreamConfig, f: float) -> bool:
    """Whether fraction f has a synthetic set (and its synthetic arms)."""
    return _listed(f, cfg.synthetic_fractions)


def _listed(f: float, fractions: list[float] | None) -> bool:
    """Whether fraction f is one of `fractions` (None: every fraction)."""
    return fractions is None or any(abs(f - g) < 1e-9 for g in fractions)


def _ceiling_pools(real: RealData, card: dict, f: float, ids: list[str], extras: dict, cfg: DownstreamConfig) -> tuple[dict, dict, dict]:
    """The held-out and oracle pools a fraction's arms need (chosen to its synthetic set's class composition),
    what they hold (for results.json), and why an arm does not apply (no patient outside 100%, data not generated)."""
    from synthmed.evaluation.downstream import arm_of

    wanted = {arm_of(a).extra for a in cfg.arms} & {"heldout", "oracle"}
    info, why = {}, {}
    if not _listed(f, cfg.ceiling_fractions):
        why.update({a: "no ceiling arms at this fraction (ceiling_fractions)" for a in cfg.arms if arm_of(a).extra in wanted})
        return extras, info, why
    for source in sorted(wanted):
        if source == "heldout":
            pool, ids_ = real.heldout_pool(ids, extras.get("synthetic"), cfg.subset_seed)
            reason = "no training patient lies outside this fraction"
        else:
            pool, ids_ = real.oracle_pool(card, ids, extras.get("synthetic"), cfg.subset_seed)
            reason = f"{card.get('name')!r} is not a generated data set (oracle samples exist for phantoms only)"
        if pool is None or not len(pool):
            why.update({a: reason for a in cfg.arms if arm_of(a).extra == source})
            continue
        extras[source] = pool
        patients = sorted({i.rsplit("_", 1)[0] for i in ids_}) if source == "oracle" else \
            sorted({str(real.train.rows[real.index[i]].get("patient_id") or i) for i in ids_})
        info[source] = {"n": len(pool), "n_patients": len(patients), "patients": patients[:50],
                        "composition": dict(zip(real.classes, (int(v) for v in real.composition(pool).sum(0))))}
    return extras, info, why


def data_augmentation(cfg: RunConfig, out: Path, data: Path) -> dict:
    """The study: per fraction, a subset data set, a ControlNet trained on it alone, its synthetic set; then the grid."""
    from synthmed.data.prepared import read_card
    from synthmed.data.subsets import nested_fractions, write_subset
    from synthmed.models.trained import is_complete
    from synthmed.pipelines.generate import generate
    from synthmed.pipelines.train import train_controlnet

    d = cfg.downstream
    synthetic = {}
    if any(a in SYNTHETIC_ARMS for a in d.arms):
        rows = read_metadata(data / "train" / "metadata.jsonl")
        subsets = nested_fractions(rows, d.fractions, d.subset_seed)
        for f in (f for f in d.fractions if _gets_synthetic(d, f)):
            base = out / "fractions" / fraction_key(f)
            sub, model, syn = base / "data", base / "controlnet", base / "synthetic"
            # A resumed study never reuses a stage made with other settings: the subset (another subset_seed or data),
            # the model trained on it, the set drawn from that model.
            if (sub / "dataset.json").is_file() and {r["id"] for r in read_metadata(sub / "train" / "metadata.jsonl")} != set(subsets[f]):
                set_aside(sub, "holds another subset of the train split")
                set_aside(model, "its subset was made again")
            if not (sub / "dataset.json").is_file():
                write_subset(data, subsets[f], sub, f)
            assert read_card(sub)["splits"]["train"]["n"] == len(subsets[f])
            changed = changed_settings(model, cfg.controlnet)
            set_aside_changed(model, changed)
            if changed or not is_complete(model):
                set_aside(syn, "its model is made again")
            set_aside_changed(syn, settings_changed(syn / "generate_config.yaml", cfg.generate, GENERATE_NOT_RESULTS))
            if not is_complete(model):
                train_controlnet(sub, cfg.controlnet, model, resume=True)
            if not (syn / "dataset.json").is_file():
                generate(sub, model, cfg.generate, syn)
            synthetic[f] = syn
    results = downstream(data, d, out / "downstream", synthetic)
    extra = {"edge_fidelity": {fraction_key(f): _set_edges(data, p, cfg) for f, p in synthetic.items()}}
    if cfg.steering.n_maps and synthetic:
        extra["steering"] = {fraction_key(f): _steering(data, out / "fractions" / fraction_key(f), cfg) for f in synthetic}
    results.update({k: v for k, v in extra.items() if any(x is not None for x in v.values())})
    write_json(out / "downstream" / "results.json", results)
    return results


def set_aside_changed(folder: Path, changed: list[str] | None) -> bool:
    """Move FOLDER (a study stage) aside if it was made with other settings, `changed` naming them; True if moved."""
    return bool(changed) and set_aside(folder, f"made with other settings (changed: {', '.join(changed)})")


def set_aside(folder: Path, why: str) -> bool:
    """Move FOLDER (and an interrupted FOLDER.partial) to FOLDER.stale, replacing an older one, with a note."""
    moved = False
    for f in (Path(folder), partial_of(Path(folder))):
        if f.exists():
            stale = f.with_name(f.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            f.replace(stale)
            moved = True
    if moved:
        note(f"{folder}: {why}; kept as {Path(folder).name}.stale and made again")
    return moved


def _set_edges(data: Path, synthetic: Path, cfg: RunConfig) -> dict | None:
    """Edge-map fidelity of one fraction's synthetic set (None without an edge channel)."""
    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.evaluation.sections import edge_fidelity

    syn = load_split(synthetic, "train")
    return edge_fidelity(read_card(data), syn.images, load_conditioning(syn), syn.masks, cfg.evaluate, "generated images vs their conditioning edge maps")


def _steering(data: Path, base: Path, cfg: RunConfig) -> dict:
    """Class steering of one fraction's model, once (saved in base/steering/results.json)."""
    from synthmed.evaluation.renders import steering

    done = base / "steering" / "results.json"
    if done.is_file():
        return read_json(done)
    s = cfg.steering
    ecfg = cfg.evaluate if cfg.evaluate.model_cache else cfg.evaluate.model_copy(update={"model_cache": str(base.parent / "models")})  # one classifier for all fractions
    res = steering(data, base / "controlnet", cfg.generate, s, ecfg, s.target_field or cfg.downstream.label_field,
                   s.positive or cfg.downstream.positive_class, base / "steering", device(), label_map=cfg.downstream.label_map)
    write_json(done, res)
    return res
