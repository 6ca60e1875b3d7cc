from __future__ import annotations

import pytest
import torch

from lightning_compress.models import create_model, list_models

INPUTS = {"digits_cnn": (1, 8, 8)}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_classifies_small_images(name):
    model = create_model(name, num_classes=7).eval()
    shape = INPUTS.get(name, (3, 32, 32))
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize(
    "name, params",
    [
        ("vgg19_bn", 20_040_522),  # 20.02M conv + 11,008 BN + 5,130 head: the CIFAR VGG19-BN
        ("vgg_proxy", 579_786),
        ("mobilenet_v2", 2_236_682),
        ("shufflenet_v2_x1_0", 1_263_854),
        ("squeezenet1_1", 727_626),
        ("xception", 4_118_506),
    ],
)
def test_parameter_counts(name, params):
    assert sum(p.numel() for p in create_model(name, 10).parameters()) == params


def test_vgg19_has_sixteen_convs_and_one_linear():
    model = create_model("vgg19_bn")
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("Conv2d") == 16 and kinds.count("Linear") == 1 and kinds.count("BatchNorm2d") == 16


@pytest.mark.parametrize(
    "name, final_hw",
    [("mobilenet_v2", 4), ("shufflenet_v2_x1_0", 4), ("squeezenet1_1", 8), ("xception", 4)],
)
def test_stems_adapted_to_32x32(name, final_hw):
    # ImageNet stems would leave 1x1 maps after the last stage; the CIFAR adaptation keeps more.
    model = create_model(name).eval()
    trunk = model.features if hasattr(model, "features") else torch.nn.Sequential(
        model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4
    )
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 32, 32)).shape[-1] == final_hw


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="model='resnet9000'.*vgg19_bn"):
        create_model("resnet9000")


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("vgg_proxy", num_classes=0)
