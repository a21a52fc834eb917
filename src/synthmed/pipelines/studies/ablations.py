"""The ablations experiment: one generation run (train > generate > evaluate) per cell, on the same prepared
data; a crashed cell writes error.json and the others go on; finished stages and cells are skipped."""

from __future__ import annotations

import traceback
from pathlib import Path

from synthmed.config import RunConfig
from synthmed.core.io import SynthmedError, read_json, write_json


def ablations(cfg: RunConfig, out: Path, data: Path, run) -> dict:
    """One generation run (train > generate > evaluate) per ablation cell, on the same prepared data;
    a crashed cell writes error.json and the others go on; finished stages and cells are skipped.
    `run(cfg, folder)` runs one cell (pipelines.run.run, passed in: the chain sits above its studies)."""
    from synthmed.config import deep_merge

    if not cfg.ablations:
        raise SynthmedError("experiment ablations needs an `ablations:` mapping (cell name -> settings)")
    base = cfg.model_dump(exclude={"ablations", "quick"})
    base.update(experiment="generation", data=str(Path(data).resolve()))
    base["evaluate"]["model_cache"] = base["evaluate"].get("model_cache") or str((out / "cache").resolve())  # one segmenter/classifier for every cell
    cells = {}
    for i, (name, over) in enumerate(cfg.ablations.items()):
        folder = out / "cells" / name
        try:
            cell_cfg = RunConfig.model_validate(deep_merge(base, over))
        except Exception as exc:  # noqa: BLE001
            raise SynthmedError(f"ablations.{name}: {str(exc).splitlines()[0]}: {str(exc).splitlines()[-1].strip()}") from None
        if not (folder / "evaluation" / "results.json").is_file():
            print(f"ablation {i + 1}/{len(cfg.ablations)}: {name}", flush=True)
            try:
                run(cell_cfg, folder)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001  (one cell's failure must not stop the others)
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / "error.json", {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                print(f"ablation {name}: failed ({type(exc).__name__}: {exc}); the other cells go on", flush=True)
                continue
        (folder / "error.json").unlink(missing_ok=True)
        cells[name] = (over, read_json(folder / "evaluation" / "results.json"))
    results = {"cells": {name: _ablation_row(name, over, res, out) for name, (over, res) in cells.items()},
               "errors": {name: read_json(out / "cells" / name / "error.json")["error"] for name in cfg.ablations if (out / "cells" / name / "error.json").is_file()},
               "n_cells": len(cfg.ablations), "base": {k: base[k] for k in ("controlnet", "generate")}}
    write_json(out / "results.json", results)
    return results


def _ablation_row(name: str, over: dict, res: dict, out: Path) -> dict:
    """One cell's settings and headline figures (plausibility, fidelity, intended class)."""
    p, f = res["plausibility"], res["fidelity"]
    spaces = f.get("feature_spaces") or {}
    first = next(iter(spaces.values()), {})
    regen = (f.get("paired") or {}).get("regenerated") or {}
    return {"settings": over, "dice_generated": p["intervals"]["dice_generated"], "dice_shuffled": p["intervals"]["dice_shuffled"],
            "dice_real_test": p["intervals"]["dice_real_test"], "per_class_dice": {c: v["dice"] for c, v in p["per_class"]["generated"].items()},
            "fid": first.get("fid"), "kid": first.get("kid"), "feature_space": next(iter(spaces), None),
            "ssim_regenerated": regen.get("ssim"), "psnr_regenerated": regen.get("psnr"),
            "intended_class_accuracy": (res.get("intended_class") or {}).get("accuracy"),
            "n_generated": p["n_generated"], "report": f"cells/{name}/report.html"}
