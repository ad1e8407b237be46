"""The model registry beyond tests/test_models_data.py: sizes against the KD literature, the spatial path on 8×8
inputs, model arguments, and argument validation."""
from __future__ import annotations

import pytest
import torch

from thermokd import ThermoKDError
from thermokd.models import MODEL_NAMES, CifarResNet, WideResNet, build_model, is_model_name

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
