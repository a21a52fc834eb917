"""phantom-breast, procedural greyscale mammograms + breast ultrasound, as a reader (no ROOT: generated from a seed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.phantoms.breast import breast_card, breast_sample, label_of, patient_of, render_image, split_of_patients
from synthmed.data.readers.base import Item, Reader


class PhantomBreastOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(64, ge=32, le=1024, description="image size in pixels (geometry is continuous: 64, 128, 256 show the same anatomy)")
    n_patients: int = Field(200, ge=3, description="labelled patients, split by patient into train/validation/test")
    images_per_patient: int = Field(5, ge=1, description="images per patient (mammogram views alternate CC / MLO)")
    n_unlabelled_patients: int = Field(0, ge=0, description="patients of image-only images (backbone pretraining)")
    modality: str = Field("both", pattern="^(both|mammogram|ultrasound)$", description="both (60% mammogram / 40% ultrasound), or one")


class PhantomBreastReader(Reader):
    name = "phantom-breast"
    patient_unit = "patient"
    generated = True
    layout = "nothing: the phantom is generated from its seed"
    Options = PhantomBreastOptions
    # Edge maps: the breast outline, pectoral edge, layer interfaces and lesion margins, which
    # a ControlNet can follow at any size; '--conditioning binary' conditions on the lesion mask.
    default_conditioning = ("canny",)
    # sigma 2 and higher thresholds: at the general 1.5 / 0.05 / 0.15, ultrasound speckle turns a fifth of the pixels into edges
    default_canny = {"sigma": 2.0, "low": 0.08, "high": 0.2}

    def __init__(self, root=None, options=None, seed: int = 0):
        super().__init__(".", options, seed)

    def items(self) -> list[Item]:
        o = self.options
        split_of = split_of_patients(self.seed, o.n_patients, o.modality)  # the phantom's own split, kept as "official"
        out = []
        for pi in range(o.n_patients + o.n_unlabelled_patients):
            labelled = pi < o.n_patients
            prefix = "P" if labelled else "U"
            patient = f"{prefix}{pi:04d}"
            split = split_of[pi] if labelled else "unlabelled"
            stratum = label_of(self.seed, pi) if labelled else None  # stratifies --own-splits by diagnosis
            for k in range(o.images_per_patient):
                index = pi * o.images_per_patient + k
                out.append(Item(f"{patient}_{index:06d}", patient, split, (pi, index, k, prefix), stratum))
        return out

    def load(self, item: Item):
        pi, index, k, prefix = item.ref
        patient = patient_of(self.seed, pi, prefix, self.options.modality)
        return breast_sample(render_image(self.seed, index, k, self.options.size, patient), self.seed, item.split)

    def card(self) -> dict:
        o = self.options
        return breast_card(self.seed, o.size, o.n_patients, o.images_per_patient, o.n_unlabelled_patients, o.modality)
