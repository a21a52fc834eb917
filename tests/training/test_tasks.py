import numpy as np

from synthmed.data.prepared import load_split
from synthmed.evaluation.metrics import dice_iou
from synthmed.models.tasknets import predict
from synthmed.training.tasks import train_segmenter


def test_segmenter_learns_nuclei_from_real_images(phantom_data):
    train = load_split(phantom_data, "train", need_masks=True)
    model = train_segmenter(train.images, train.masks, 5, steps=80, batch_size=8, lr=3e-3, seed=0)
    pred = predict(model, train.images)
    assert pred.shape == train.masks.shape and pred.dtype == np.uint8
    trained = dice_iou(pred, train.masks, list("abcde"))["dice_foreground"]
    blank = dice_iou(np.zeros_like(pred), train.masks, list("abcde"))["dice_foreground"]
    assert trained > 0.5 > blank


def test_median_frequency_weights_favour_the_rare_class():
    import numpy as np

    from synthmed.training.tasks import class_weights

    masks = np.zeros((2, 20, 20), np.uint8)
    masks[:, :10] = 1  # common
    masks[:, 10:, :1] = 2  # rare (10 px per image)
    w = class_weights(masks, 3)
    assert w.shape == (4,) and w[2] > w[1] and w[2] > w[0] and w[3] == 1.0  # class 3 absent: weight 1
    assert float(w.max()) <= 10.0


def test_an_interrupted_judge_continues_from_its_checkpoint(phantom_data, tmp_path):
    """A judge (filter segmenter or classifier) interrupted mid-training resumes at its last save, to the same weights."""
    import pytest
    import torch

    from synthmed.training.common import PhaseCheckpoint
    from synthmed.training.tasks import train_classifier

    train = load_split(phantom_data, "train")
    images, masks, labels = train.images[:12], train.masks[:12], (np.arange(12) % 2)
    for name, fit in (("segmenter", lambda **kw: train_segmenter(images, masks, 5, 8, 4, 1e-3, 0, **kw)),
                      ("classifier", lambda **kw: train_classifier(images, labels, 2, 8, 4, 1e-3, 0, **kw))):
        straight = fit()
        ckpt = PhaseCheckpoint(tmp_path / name, "state", every=3)

        def stop_at_5(done, total, loss):
            if done == 5:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit(progress=stop_at_5, checkpoint=ckpt)
        seen = []
        resumed = fit(progress=lambda done, total, loss: seen.append(done), checkpoint=ckpt)
        assert seen == [4, 5, 6, 7, 8], name  # from the save at step 3, not from step 0
        for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (name, k)


def test_micro_batches_give_the_full_batch_gradient_of_the_segmenter():
    """A 512 px batch of 16 runs as 4 passes of 4 (activation memory), with the gradient of one pass over all 16:
    MONAI's U-Net has no batch statistics and Dice + unweighted CE are means over images and pixels."""
    import torch
    from monai.losses import DiceCELoss

    from synthmed.models.tasknets import build_segmenter
    from synthmed.training.common import accumulated_step, micro_batches

    assert micro_batches(16, 64 * 64) == 1 and micro_batches(16, 256 * 256) == 1 and micro_batches(16, 512 * 512) == 4 and micro_batches(6, 512 * 512) == 2 and micro_batches(5, 512 * 512) == 5
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 48, 48, generator=g), torch.randint(0, 3, (4, 1, 48, 48), generator=g)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    grads = {}
    for parts in (1, 2):
        torch.manual_seed(1)
        model = build_segmenter(2)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        import synthmed.training.common as common

        budget = common.TRAIN_PIXELS
        common.TRAIN_PIXELS = 4 * 48 * 48 // parts  # force `parts` passes
        try:
            loss = accumulated_step(lambda a, b: loss_fn(model(a), b), x, y, model.parameters(), opt, sched, clip=None)
        finally:
            common.TRAIN_PIXELS = budget
        grads[parts] = (loss, [p.grad.clone() for p in model.parameters()])
    assert abs(grads[1][0] - grads[2][0]) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads[1][1], grads[2][1]))
