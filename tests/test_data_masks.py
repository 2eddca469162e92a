"""COCO masks equal pycocotools' bit for bit (the original's masks), on RLE (compressed and list counts) and on
slanted polygons, through the helpers the referring reader uses."""

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from deem.trainers.data import MaskError, decode_rle, encode_rle, polygons_to_mask, segmentation_to_mask


def test_rle_bit_exact_with_pycocotools():
    rng = np.random.default_rng(1)
    for h, w in ((1, 1), (7, 9), (31, 17), (64, 48)):
        for p in (0.0, 0.3, 0.9):
            m = rng.random((h, w)) < p
            ours = encode_rle(m)
            theirs = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
            assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
            np.testing.assert_array_equal(decode_rle(ours), coco_mask.decode(theirs).astype(bool))
            listed = encode_rle(m, compressed=False)
            via_coco = coco_mask.decode(coco_mask.frPyObjects(listed, h, w)).astype(bool)
            np.testing.assert_array_equal(decode_rle(listed), via_coco)
            np.testing.assert_array_equal(segmentation_to_mask(listed, h, w), m)


def test_polygons_bit_exact_with_pycocotools():
    rng = np.random.default_rng(2)
    differ_from_centres = 0
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(8, 40, 2))
        polys = []
        for _ in range(int(rng.integers(1, 3))):
            n = int(rng.integers(3, 8))
            pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
            polys.append(pts.reshape(-1).round(2).tolist())
        theirs = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polys, h, w))).astype(bool)
        ours = polygons_to_mask(polys, h, w)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(segmentation_to_mask(polys, h, w), theirs)
        # a pixel-centre rasteriser would not be bit-exact here (slanted edges): the check has teeth
        from matplotlib.path import Path

        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        centres = np.zeros((h, w), dtype=bool)
        for poly in polys:
            centres |= (
                Path(np.asarray(poly).reshape(-1, 2)).contains_points(np.c_[xx.ravel(), yy.ravel()]).reshape(h, w)
            )
        differ_from_centres += int((centres != theirs).any())
    assert differ_from_centres > 0


def test_bad_segmentations_are_refused_before_decoding():
    with pytest.raises(MaskError, match="sum to"):
        decode_rle({"size": [3, 4], "counts": [2, 3]})
    with pytest.raises(MaskError, match="at least 3"):
        polygons_to_mask([[0, 0, 4, 4]], 5, 5)  # pycocotools would read 4 numbers as a box
    with pytest.raises(MaskError, match="size"):
        segmentation_to_mask(encode_rle(np.ones((3, 3), bool)), 3, 4)
