"""Fresh samples of a generated data set: the "oracle" a synthetic-data study measures itself against.

A phantom is a pure function of (seed, index), so it can render as many new labelled samples as a
study wants, from slides/patients that no split of the prepared set holds: their indices start after
every labelled and unlabelled slide/patient the prepared set was made from, and their ids carry the
prefix "O". They are what perfect extra data would look like; a generator can at best match them.
"""

from __future__ import annotations

import itertools

GENERATED = ("phantom-histology", "phantom-breast")
PREFIX = "O"


def is_generated(card: dict) -> bool:
    """Whether a prepared set's card names a phantom (which can render fresh samples)."""
    return card.get("name") in GENERATED and isinstance(card.get("generator"), dict)


def first_unseen(card: dict) -> int:
    """The first slide/patient index after every one the prepared set was rendered from."""
    g = card["generator"]
    if card["name"] == "phantom-histology":
        return int(g["n_slides"]) + int(g.get("n_unlabelled_slides") or 0)
    return int(g["n_patients"]) + int(g.get("n_unlabelled_patients") or 0)


def fresh_samples(card: dict, n: int) -> list:
    """n labelled Sample records (split "train") from slides/patients no split of the set holds."""
    if not is_generated(card):
        raise ValueError(f"fresh_samples expects a phantom data set card ({', '.join(GENERATED)}), but got {card.get('name')!r}")
    g, start = card["generator"], first_unseen(card)
    if card["name"] == "phantom-histology":
        from synthmed.data.phantoms.histology import iter_tiles, phantom_sample

        per = int(g["tiles_per_slide"])
        tiles = iter_tiles(int(g["seed"]), -(-n // per), per, int(g["size"]), prefix=PREFIX, offset=start)
        return [phantom_sample(t, int(g["seed"]), "train") for t in itertools.islice(tiles, n)]
    from synthmed.data.phantoms.breast import breast_sample, iter_images

    per = int(g["images_per_patient"])
    images = iter_images(int(g["seed"]), -(-n // per), per, int(g["size"]), PREFIX, start, g.get("modality", "both"))
    return [breast_sample(im, int(g["seed"]), "train") for im in itertools.islice(images, n)]
