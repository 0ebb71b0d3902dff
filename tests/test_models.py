import pytest
import torch

from decoct.models import MODELS, create_model, depth_for_size


@pytest.mark.parametrize("name", ["convnet", "convnetd3", "convnet_bn", "resnet18", "resnet18_ap", "mlp"])
def test_forward_and_embed_shapes(name):
    m = create_model(name, num_classes=7, channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    assert m.embed(x).shape == (2, m.feature_dim)


def test_convnet_matches_paper_layout():
    m = create_model("convnet", 10, 3, 32)
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    norms = [l for l in m.features if isinstance(l, torch.nn.GroupNorm)]
    assert len(convs) == 3 and all(c.out_channels == 128 for c in convs)
    assert all(n.num_groups == n.num_channels == 128 for n in norms)  # instance norm
    assert m.feature_dim == 128 * 4 * 4
    assert sum(p.numel() for p in m.parameters()) == 320010  # the DC/MTT ConvNet-D3 for CIFAR-10


def test_depth_rule():
    assert [depth_for_size(s) for s in (8, 32, 64, 128)] == [2, 3, 4, 5]
    assert create_model("convnet", 10, 3, 64).config["depth"] == 4


def test_resnet_stems():
    cifar = create_model("resnet18", 10, 3, 32)
    imnet = create_model("resnet18", 10, 3, 224, stem="imagenet")
    assert cifar.net.conv1.kernel_size == (3, 3) and isinstance(cifar.net.maxpool, torch.nn.Identity)
    assert imnet.net.conv1.kernel_size == (7, 7)
    assert create_model("resnet50", 10, 3, 32).feature_dim == 2048


def test_bad_names_and_options():
    with pytest.raises(KeyError, match="unknown model 'vgg99'"):
        create_model("vgg99", 10)
    with pytest.raises(ValueError, match="norm"):
        create_model("convnet", 10, norm="layer")
    with pytest.raises(ValueError, match="does not take"):
        create_model("resnet18", 10, width=3)
    assert "convnetd4" in MODELS
