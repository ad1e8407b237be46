"""Models: every image and feature-vector name in ``MODEL_NAMES`` builds, gives logits and backpropagates (the text
models are tested in test_text.py); sizes against the KD literature, the spatial path on 8×8 inputs, model
arguments, and argument validation."""
from __future__ import annotations

import pytest
import torch

from thermokd import ThermoKDError
from thermokd.models import MODEL_NAMES, TEXT_MODELS, CifarResNet, WideResNet, build_model, is_model_name


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# parameter counts on 100 classes as tabulated by CRD (Tian et al. 2020) and mdistiller, in millions
LITERATURE_M = {"resnet8": 0.08, "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74,
                "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(LITERATURE_M))
def test_parameter_counts_match_the_literature(name):
    assert n_params(build_model(name, 100, 3, 32)) / 1e6 == pytest.approx(LITERATURE_M[name], abs=0.01)


def test_x4_resnets_use_the_crd_widths():
    model = build_model("resnet8x4", 10)
    assert model.stem[0].out_channels == 32 and model.fc.in_features == 256
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1] == 256


@pytest.mark.parametrize("name", ["resnet8", "resnet32x4", "wrn_16_2", "cnn"])
def test_8x8_inputs_keep_at_least_2x2_feature_maps(name):
    model = build_model(name, 10, 1, 8)
    sizes = []
    hooks = [m.register_forward_hook(lambda _, __, out: sizes.append(out.shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.randn(2, 1, 8, 8))
    for hook in hooks:
        hook.remove()
    assert min(sizes) >= 2


def test_channels_last_and_eval_mode_give_the_same_logits():
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1, 28).eval()
    x = torch.randn(3, 1, 28, 28)
    plain = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_the_same_seed_builds_the_same_weights():
    torch.manual_seed(3)
    a = build_model("wrn_16_2", 10, 1, 8)
    torch.manual_seed(3)
    b = build_model("wrn_16_2", 10, 1, 8)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_model_args_reach_the_model():
    mlp = build_model("mlp", 4, in_channels=1, input_size=8, hidden=[32, 16, 8], dropout=0.1)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 8, 4]
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 4)
    cnn = build_model("cnn", 4, 3, 32, width=8, blocks=2)
    assert cnn.fc.in_features == 16 and cnn(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    wrn = build_model("wrn_10_1", 4, 1, 8, dropout=0.3)
    assert len(wrn.blocks) == 3 and wrn(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_is_model_name():
    assert all(is_model_name(n) for n in MODEL_NAMES)
    assert is_model_name("wrn_28_10") and not is_model_name("wrn_28") and not is_model_name("resnet9")


@pytest.mark.parametrize("field,kwargs", [("num_classes", dict(num_classes=0)), ("in_channels", dict(in_channels=0)),
                                          ("input_size", dict(input_size=0))])
def test_non_positive_sizes_are_refused(field, kwargs):
    args = dict(num_classes=10, in_channels=3, input_size=32) | kwargs
    with pytest.raises(ThermoKDError, match=f"'resnet8': {field} must be >= 1"):
        build_model("resnet8", **args)


def test_constructors_refuse_bad_depths_with_thermokd_errors():
    with pytest.raises(ThermoKDError, match=r"6n\+2"):
        CifarResNet(9, 10)
    with pytest.raises(ThermoKDError, match=r"6n\+2"):
        CifarResNet(2, 10)
    with pytest.raises(ThermoKDError, match=r"got depth 16, width 0"):
        WideResNet(16, 0, 10)


# ---------------------------------------------------------------------------------------------------------- models

HEAVY = {"resnet110", "resnet32x4", "wrn_40_2"}
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
MODEL_CASES = [(name, shape) for name in MODEL_NAMES if name not in TEXT_MODELS for shape in SHAPES
               if name not in HEAVY or shape == (1, 8, 8)]


@pytest.mark.parametrize("name,shape", MODEL_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in MODEL_CASES])
def test_model_builds_gives_logits_and_backpropagates(name, shape):
    torch.manual_seed(0)
    c, h, w = shape
    model = build_model(name, num_classes=7, in_channels=c, input_size=h)
    x = torch.randn(2, c, h, w)
    y = torch.tensor([0, 6])
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_param_counts_match_data_md():
    assert n_params(build_model("resnet8", 10, 3, 32)) == pytest.approx(78_000, rel=0.01)
    assert n_params(build_model("resnet20", 10, 3, 32)) == pytest.approx(272_000, rel=0.01)
    # wider and deeper variants are strictly larger
    assert n_params(build_model("resnet8x4", 10)) > n_params(build_model("resnet8", 10))
    assert n_params(build_model("resnet32x4", 10)) > n_params(build_model("resnet32", 10))


def test_wrn_any_valid_depth_and_width_parses():
    model = build_model("wrn_28_4", 10, 1, 8)
    assert model.fc.in_features == 64 * 4
    assert len(model.blocks) == 3 * (28 - 4) // 6
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_on_feature_vectors():
    model = build_model("mlp", 5, in_channels=64, input_size=1)
    assert model(torch.randn(3, 64)).shape == (3, 5)


@pytest.mark.parametrize("name", ["resnet9", "vgg16", "wrn", "wrn_16", "resnet8x2", "MLP", ""])
def test_unknown_model_name_lists_accepted(name):
    with pytest.raises(ThermoKDError, match="unknown model") as err:
        build_model(name, 10)
    msg = str(err.value)
    for accepted in ("resnet8", "resnet110", "wrn_40_2", "mlp", "cnn", "wrn_<depth>_<width>"):
        assert accepted in msg


def test_unknown_model_name_on_feature_vectors_is_reported_as_unknown():
    with pytest.raises(ThermoKDError, match="unknown model"):
        build_model("resnet9", 10, in_channels=64, input_size=1)


@pytest.mark.parametrize("name", ["wrn_15_2", "wrn_27_4", "wrn_41_1", "wrn_4_2", "wrn_16_0"])
def test_bad_wrn_raises(name):
    with pytest.raises(ThermoKDError, match=name):
        build_model(name, 10)


def test_bad_wrn_depth_message_explains_rule():
    with pytest.raises(ThermoKDError, match=r"6n\+4"):
        build_model("wrn_15_2", 10)


@pytest.mark.parametrize("name", ["resnet8", "cnn", "wrn_16_2", "resnet32x4"])
def test_conv_model_on_feature_vectors_raises(name):
    with pytest.raises(ThermoKDError) as err:
        build_model(name, 10, in_channels=64, input_size=1)
    msg = str(err.value)
    assert name in msg and "mlp" in msg and "image" in msg
