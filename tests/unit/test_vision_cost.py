"""The vision term of the cost model: per image, quadratic in that image's patch count, so a
4K screenshot weighs what it costs and the balancer treats it so."""

from __future__ import annotations

import numpy as np
import pytest

from fabricd.images import ImageSpec
from fabricd.planner import CostModel, MixtureSchedule, Planner, build_units

pytestmark = pytest.mark.unit

NATIVE = ImageSpec(mode="native", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=4096 * 4096)


def test_vision_terms_are_per_image_and_quadratic_in_patches() -> None:
    cost = CostModel(attention=1.0, linear=0.0, vision_attention=2.0, vision_linear=3.0)
    # one unit of 10 tokens with two images of 4 and 6 patches: 100 + 2·(16+36) + 3·(4+6)
    assert cost(np.array([10]), np.array([2]), np.array([10.0]), np.array([52.0])).tolist() == [100 + 104 + 30]
    # without vision arrays, or with zero vision weights, only the language-model terms count
    assert cost(np.array([10]), np.array([2])).tolist() == [100.0]
    assert CostModel(attention=1.0, linear=0.0)(np.array([10]), np.array([2]), np.array([10.0]),
                                                np.array([52.0])).tolist() == [100.0]
    with pytest.raises(ValueError, match="vision_attention"):
        CostModel(vision_attention=-1.0)


def test_a_4k_screenshot_outweighs_many_thumbnails_of_the_same_tokens() -> None:
    h = np.array([2160, 224, 224, 224, 224], np.int64)
    w = np.array([3840, 224, 224, 224, 224], np.int64)
    patches = NATIVE.patches(h, w).astype(np.float64)
    cost = CostModel(attention=0.0, linear=1.0, vision_attention=1.0, vision_linear=0.0)
    big = cost(np.array([0]), np.array([1]), patches[:1], patches[:1] ** 2)[0]
    small = cost(np.array([0]), np.array([4]), np.array([patches[1:].sum()]), np.array([(patches[1:] ** 2).sum()]))[0]
    assert patches[0] > 100 * patches[1]             # the screenshot really is big at native resolution
    assert big > 100 * small                         # quadratic: far more than its share of patches


@pytest.mark.parametrize("vision", [False, True])
def test_the_balancer_sees_vision_work_only_when_the_cost_model_weighs_it(vision: bool) -> None:
    # 8 samples of equal text length: one holds a 4K screenshot, seven hold a small image each
    n = 8
    patches = np.full(n, float(NATIVE.patches(np.array([224]), np.array([224]))[0]))
    patches[0] = float(NATIVE.patches(np.array([2160]), np.array([3840]))[0])
    units = build_units("s", np.full(n, 100), np.ones(n, int), max_seq_len=1 << 16, long_samples="truncate",
                        image_tokens=np.full(n, 64), patches=patches, patches_sq=patches ** 2)
    cost = CostModel(attention=1.0, linear=0.0, vision_attention=1.0 if vision else 0.0)
    planner = Planner(seed=1, samples_per_step=n, micro_batch_tokens=1 << 16,
                      schedule=MixtureSchedule("constant", [(0, {"s": 1.0})], ["s"]), cost=cost, method="lpt",
                      sources=[units])
    plan = planner.plan(0, 2)
    rank_of_big = int(plan.rank[plan.sample_id == 0][0])
    alone = int((plan.rank == rank_of_big).sum())
    if vision:
        assert alone == 1   # the screenshot's rank gets nothing else
    else:
        assert alone == n // 2  # equal costs: an even split, the screenshot unseen
