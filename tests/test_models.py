from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.models import MODELS, build_model, count_parameters, fold_batch_norm
from kdsearch.recipe import HEAD_STAGES, MODEL_NAMES

# Published parameter counts at 100 classes (RepDistiller's model zoo, counted by instantiating
# the official model files; see shared/reference/kd_methods.md section 7).
PUBLISHED = {
    "resnet8": 83_892,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}


def test_registry_matches_the_recipe_names() -> None:
    assert set(MODELS) == set(MODEL_NAMES)


def test_the_recipe_knows_each_models_head_stages() -> None:
    for arch in MODELS:
        assert build_model(arch, 10).head_stages == tuple(range(1, HEAD_STAGES[arch] + 1)), arch


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_one(arch: str) -> None:
    count = count_parameters(build_model(arch, 100))
    assert abs(count - PUBLISHED[arch]) / PUBLISHED[arch] <= 0.005


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize(("channels", "classes", "size"), [(3, 100, 32), (1, 10, 8), (1, 7, 28)])
def test_taps_contract(arch: str, channels: int, classes: int, size: int) -> None:
    model = build_model(arch, classes, channels).eval()
    x = torch.randn(2, channels, size, size)
    taps = model.taps(x)
    assert taps.logits.shape == (2, classes)
    assert taps.pooled.shape == (2, model.feat_dim)
    assert len(taps.stages) == len(model.stage_channels)
    assert [s.shape[1] for s in taps.stages] == list(model.stage_channels)
    heights = [s.shape[-1] for s in taps.stages]
    assert heights == sorted(heights, reverse=True), "stages go from shallow (large) to deep"
    assert torch.isfinite(taps.logits).all()
    torch.testing.assert_close(model(x), taps.logits)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gradients_reach_every_parameter(arch: str) -> None:
    model = build_model(arch, 10, 3)
    model.taps(torch.randn(4, 3, 16, 16)).logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_cifar_stage_shapes_follow_the_papers() -> None:
    taps = build_model("resnet8x4", 100).taps(torch.randn(1, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in taps.stages] == [
        (32, 32, 32),
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
    ]
    taps = build_model("vgg8", 100).eval().taps(torch.randn(1, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in taps.stages] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 4, 4),
    ]
    taps = build_model("mobilenetv2", 100).eval().taps(torch.randn(1, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in taps.stages] == [
        (16, 16, 16),
        (12, 16, 16),
        (16, 8, 8),
        (48, 4, 4),
        (160, 2, 2),
    ]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_head_stage_gets_a_trunk_of_the_declared_width(arch: str) -> None:
    model = build_model(arch, 10, 3).eval()
    taps = model.taps(torch.randn(2, 3, 32, 32))
    assert model.head_stages == tuple(range(1, len(model.stage_channels)))
    for stage in model.head_stages:
        trunk, width = model.head_trunk(stage)
        out = trunk.eval()(taps.stages[stage])
        assert out.shape[:2] == (2, width)
    with pytest.raises(ValueError, match="cannot carry a head"):
        model.head_trunk(0)


def _trained_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """`model` in eval mode, in float64, with batch-norm statistics and affine maps far from the
    identity a fresh model has, so that folding them wrongly shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.double().eval()


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_folding_batch_norms_keeps_every_tap_and_leaves_the_model_alone(arch: str) -> None:
    model = _trained_batch_norms(build_model(arch, 10, 3), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = model.taps(x), folded.taps(x)
        for w, g in zip(want, got, strict=True):
            for a, b in zip(
                w if isinstance(w, tuple) else (w,),
                g if isinstance(g, tuple) else (g,),
                strict=True,
            ):
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        trunk, _ = model.head_trunk(model.head_stages[-1])
        trunk = _trained_batch_norms(trunk, seed=1)
        stage = want.stages[model.head_stages[-1]]
        torch.testing.assert_close(
            fold_batch_norm(trunk)(stage), trunk(stage), rtol=1e-9, atol=1e-9
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if arch.startswith("wrn"):  # pre-activation: a block's second batch norm follows a conv
        blocks = 3 * int(model.blocks_per_stage)
        assert _batch_norms(folded) == _batch_norms(model) - blocks == blocks + 1
    else:  # only a batch norm after no convolution (MobileNetV2 / ShuffleNetV2 have none) stays
        assert _batch_norms(folded) < _batch_norms(model) // 4
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(model.train())


# HSAKD's auxiliary classifiers at 100 classes (400 joint labels), in millions of parameters per
# head stage, as counted from the official model files (shared/reference/kd_methods.md section
# 1.3; MobileNetV2's and VGG's, which it rounds, counted from HSAKD's models/ at width 0.5 and
# with batch norm). The last head of each replays the last stage (VGG: the last two blocks) at
# stride 1. VGG's official heads sit on blocks 0, 1, 2 and 4; block 0 is the stem here.
HSAKD_HEADS = {
    "mobilenetv2": {1: 1.192, 2: 1.180, 3: 1.049, 4: 1.251},
    "resnet8x4": {1: 1.252, 2: 1.022, 3: 1.283},
    "resnet32x4": {1: 7.16, 2: 5.75, 3: 6.01},
    "resnet56": {1: 0.839, 2: 0.676, 3: 0.692},
    "resnet50": {1: 24.102, 2: 22.883, 3: 15.784, 4: 14.207},  # counted from HSAKD's resnetv2.py
    "shufflenetv1": {1: 1.199, 2: 0.901, 3: 1.019},  # HSAKD's models/ShuffleNetv1.py, counted
    "shufflenetv2": {1: 1.633, 2: 1.389, 3: 1.499},
    "vgg8": {1: 4.043, 2: 3.747, 4: 4.927},
    "vgg13": {1: 9.355, 2: 8.469, 4: 9.649},
    "wrn_40_2": {1: 2.19, 2: 1.76, 3: 1.82},
}


@pytest.mark.parametrize("arch", sorted(HSAKD_HEADS))
def test_auxiliary_heads_match_the_reference_sizes(arch: str) -> None:
    from kdsearch.losses.hsakd import AuxClassifier

    model = build_model(arch, 100)
    sizes = {
        s: sum(p.numel() for p in AuxClassifier(model, s, 100).parameters()) / 1e6
        for s in HSAKD_HEADS[arch]
    }
    assert sizes == pytest.approx(HSAKD_HEADS[arch], rel=0.01)
