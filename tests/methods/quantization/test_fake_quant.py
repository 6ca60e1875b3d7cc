import pytest
import torch
from torch import nn

from lightning_compress.methods.quantization import Format, calibrate, dequantize_layer, quantize_layer
from lightning_compress.methods.quantization.fake_quant import binarize, fake_quantize, fixed_point, minmax_scale
from lightning_compress.methods.quantization.formats import check_fixed_point


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symmetric_per_channel_weights_take_at_most_2b_minus_1_values(bits):
    torch.manual_seed(0)
    layer = quantize_layer(nn.Conv2d(4, 6, 3), Format(bits, "symmetric"), None)
    q = layer.quantized_weight().detach()
    scale, zp = layer.weight_scale_zero_point()
    assert torch.all(zp == 0)
    for channel in range(6):
        levels = torch.round(q[channel] / scale[channel]).unique()
        assert levels.numel() <= 2**bits - 1
        assert levels.abs().max() <= 2 ** (bits - 1) - 1
    assert (q - layer.weight).abs().max() <= scale.max() / 2 + 1e-6


def test_affine_activation_range_covers_the_observed_interval_with_exact_zero():
    fmt = Format(8, "affine")
    scale, zp = minmax_scale(torch.tensor(-1.0), torch.tensor(3.0), fmt, signed=False)
    x = torch.linspace(-1, 3, 101)
    q = fake_quantize(x, scale, zp, fmt, signed=False)
    assert (q - x).abs().max() <= scale / 2 + 1e-6
    assert fake_quantize(torch.zeros(1), scale, zp, fmt, signed=False).item() == 0.0


def test_straight_through_gradient_is_one_inside_and_zero_outside():
    fmt = Format(4, "affine")
    scale, zp = minmax_scale(torch.tensor(0.0), torch.tensor(1.0), fmt, signed=False)
    x = torch.tensor([0.1, 0.5, 0.9, 2.0, -1.0], requires_grad=True)
    fake_quantize(x, scale, zp, fmt, signed=False).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 0, 0]


def test_fixed_point_rounds_and_saturates():
    fmt = Format(4, "fixed_point", integer_bits=2)  # step 0.25, range [-2, 1.75]
    x = torch.tensor([0.1, 0.13, -0.3, 5.0, -5.0], requires_grad=True)
    y = fixed_point(x, fmt)
    assert y.tolist() == [0.0, 0.25, -0.25, 1.75, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 0, 0]


def test_stochastic_fixed_point_is_unbiased():
    torch.manual_seed(0)
    fmt = Format(8, "fixed_point", integer_bits=2, rounding="stochastic")
    x = torch.full((200_000,), 0.3)
    assert fixed_point(x, fmt).mean().item() == pytest.approx(0.3, abs=2e-3)
    assert set(fixed_point(x, fmt).unique().tolist()) <= {0.296875, 0.3125}


def test_binary_weights_and_hard_tanh_gradient():
    x = torch.tensor([0.3, -0.2, 0.0, 1.5], requires_grad=True)
    y = binarize(x)
    assert y.tolist() == [1, -1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 0]
    torch.manual_seed(0)
    stochastic = binarize(torch.full((100_000,), 0.5), stochastic=True)
    assert stochastic.mean().item() == pytest.approx(0.5, abs=0.01)  # P(+1) = 0.75


def test_swap_keeps_parameters_and_adds_buffers():
    layer = nn.Linear(8, 4)
    weight = layer.weight
    quantize_layer(layer, Format(8, "symmetric"), Format(8, "affine"))
    assert layer.weight is weight
    assert {"weight", "bias", "weight_bits", "activation_min", "activation_max", "activation_observed",
            "_extra_state"} == set(layer.state_dict())
    assert layer.state_dict()["_extra_state"]["weight_format"] == {"bits": 8, "scheme": "symmetric", "integer_bits": 0,
                                                                  "rounding": "nearest"}
    layer.train()
    layer(torch.randn(5, 8) * 3)
    assert bool(layer.activation_observed) and layer.activation_max > 0
    dequantize_layer(layer)
    assert type(layer) is nn.Linear and set(layer.state_dict()) == {"weight", "bias"}


def test_quantized_forward_under_bf16_autocast_computes_scales_in_fp32():
    torch.manual_seed(0)
    layer = quantize_layer(nn.Conv2d(3, 8, 3), Format(8, "symmetric"), Format(8, "affine")).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 3, 8, 8))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert layer.activation_min.dtype == torch.float32


def test_calibrate_changes_no_weight_or_batchnorm_statistic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 3, 8, 8))
    for i in (0, 4):
        quantize_layer(model[i], Format(8, "symmetric"), Format(8, "affine"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "activation" not in k and not k.endswith("_extra_state")}
    seen = calibrate(model, [(torch.randn(4, 3, 8, 8), None) for _ in range(3)])
    assert seen == 3
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert bool(model[0].activation_observed) and not model[0].observing


def test_eight_bit_model_output_is_close_to_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    x = torch.randn(16, 3, 8, 8)
    reference = model(x)
    for i in (0, 2, 5):
        quantize_layer(model[i], Format(8, "symmetric"), Format(8, "affine"))
    calibrate(model, [(x, None)])
    out = model(x)
    assert float((out - reference).detach().norm() / reference.detach().norm()) < 0.02


@pytest.mark.parametrize("value", [(2, 3), (0, 8), [1], "1,7"])
def test_fixed_point_format_errors_name_the_argument(value):
    with pytest.raises(ValueError, match=r"fixed_point="):
        check_fixed_point("fixed_point", value, 8)
