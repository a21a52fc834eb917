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
