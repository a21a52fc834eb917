"""The conditioned refiner: the identity until trained, its own safetensors folder, checked inputs."""

import pytest
import torch

from synthmed.models.refiner import ConditionedRefiner, load_refiner, refine, save_refiner


def test_an_untrained_refiner_is_the_identity_and_none_changes_nothing():
    torch.manual_seed(0)
    image, cond = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16)
    assert torch.equal(ConditionedRefiner(3)(image, cond), image)
    assert refine(None, image, cond) is image and refine(ConditionedRefiner(3), image, None) is image


def test_a_saved_refiner_loads_with_its_shape_and_weights(tmp_path):
    torch.manual_seed(0)
    r = ConditionedRefiner(1, width=8, depth=3)
    with torch.no_grad():
        r.out.weight.normal_(0, 0.1)
    save_refiner(r, tmp_path / "refiner")
    back = load_refiner(tmp_path / "refiner")
    image, cond = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16)
    assert back.shape == {"cond_channels": 1, "width": 8, "depth": 3} and not back.training
    assert torch.equal(back(image, cond), r(image, cond)) and not torch.equal(back(image, cond), image)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="ConditionedRefiner expects cond_channels >= 1"):
        ConditionedRefiner(0)
    with pytest.raises(ValueError, match=r"ConditionedRefiner expects conditioning \(B, 3, 16, 16\)"):
        ConditionedRefiner(3)(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 16, 16))
