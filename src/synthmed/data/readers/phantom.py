"""phantom-histology, the embedded default, as a reader (no ROOT: generated from a seed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.phantoms.histology import phantom_card, phantom_sample, render_tile, slide_of, split_slides
from synthmed.data.readers.base import Item, Reader


class PhantomOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(64, description="tile size in pixels: 64, 128 or 256")
    n_slides: int = Field(48, ge=3)
    tiles_per_slide: int = Field(12, ge=1)
    n_unlabelled_slides: int = Field(150, ge=0)


class PhantomReader(Reader):
    name = "phantom-histology"
    patient_unit = "slide"
    generated = True
    layout = "nothing: the phantom is generated from its seed"
    Options = PhantomOptions

    def __init__(self, root=None, options=None, seed: int = 0):
        super().__init__(".", options, seed)
        if self.options.size not in (64, 128, 256):
            from synthmed.core.io import SynthmedError

            raise SynthmedError(f"phantom size must be 64, 128 or 256, got {self.options.size}")

    def items(self) -> list[Item]:
        o = self.options
        split_of = split_slides(self.seed, o.n_slides)  # the phantom's own slide split, kept as "official"
        out = []
        for si in range(o.n_slides + o.n_unlabelled_slides):
            labelled = si < o.n_slides
            prefix = "S" if labelled else "U"
            for ti in range(o.tiles_per_slide):
                index = si * o.tiles_per_slide + ti
                slide = f"{prefix}{si:04d}"
                out.append(Item(f"{slide}_{index:06d}", slide, split_of[si] if labelled else "unlabelled", (si, index, prefix)))
        return out

    def load(self, item: Item):
        si, index, prefix = item.ref
        tile = render_tile(self.seed, index, self.options.size, slide_of(self.seed, si, prefix))
        return phantom_sample(tile, self.seed, item.split)

    def card(self) -> dict:
        o = self.options
        return phantom_card(self.seed, o.size, o.n_slides, o.tiles_per_slide, o.n_unlabelled_slides)
