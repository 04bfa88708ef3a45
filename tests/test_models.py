import pytest
import torch
from torch import nn

from fedloom.errors import ConfigError
from fedloom.models import MODELS, ResNetGN, build_model

IMAGE_MODELS = ["simple-cnn", "simple-cnn-bn", "cnn", "resnet-gn"]
SHAPES = [(1, 28, 28), (3, 32, 32), (64,)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


VALID = [(name, shape) for name in sorted(MODELS) for shape in SHAPES
         if len(shape) == 3 or name not in IMAGE_MODELS]  # image models on flat input: an error, tested below


@pytest.mark.parametrize(("name", "shape"), VALID, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in VALID])
def test_output_shape(name, shape):
    model = build_model(name, shape, 10)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_simple_cnn_parameter_count_matches_niid_bench():
    conv1 = 6 * 1 * 25 + 6
    conv2 = 16 * 6 * 25 + 16
    fc1 = 16 * 4 * 4 * 120 + 120
    fc2 = 120 * 84 + 84
    fc3 = 84 * 10 + 10
    assert n_params(build_model("simple-cnn", (1, 28, 28), 10)) == conv1 + conv2 + fc1 + fc2 + fc3
    # on 32x32 CIFAR images the flattened size is 16*5*5
    assert build_model("simple-cnn", (3, 32, 32), 10).fc1.in_features == 16 * 5 * 5


def test_fedavg_paper_parameter_counts():
    # McMahan et al. 2017, section 3: the 2NN has 199,210 parameters, the CNN 1,663,370 (MNIST)
    assert n_params(build_model("mlp", (784,), 10)) == 199_210
    assert n_params(build_model("mlp", (1, 28, 28), 10)) == 199_210
    assert n_params(build_model("cnn", (1, 28, 28), 10)) == 1_663_370


def test_logreg_is_one_linear_layer():
    model = build_model("logreg", (1, 28, 28), 10)
    assert n_params(model) == 784 * 10 + 10
    assert [type(m) for m in model.modules() if not list(m.children())] == [nn.Linear]


def test_image_model_on_flat_input_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        build_model("simple-cnn", (64,), 10)
    assert err.value.message == "model 'simple-cnn' needs image input (C,H,W); dataset gives shape (64,)"
    assert err.value.hint == "use model = 'mlp' or 'logreg'"


def test_image_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"at least 14x14; dataset gives shape \(1, 8, 8\)"):
        build_model("simple-cnn", (1, 8, 8), 10)
    assert build_model("resnet-gn", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_model_lists_valid_names_closest_first():
    with pytest.raises(ConfigError) as err:
        build_model("resnet", (3, 32, 32), 10)
    assert "unknown model 'resnet'; valid models: resnet-gn, " in err.value.message
    assert all(name in err.value.message for name in MODELS)
    assert err.value.hint == "did you mean 'resnet-gn'?"
    with pytest.raises(ConfigError) as err:
        build_model("CNN", (3, 32, 32), 10)
    assert "valid models: cnn, " in err.value.message


def test_resnet_gn_uses_group_norm_only():
    model = build_model("resnet-gn", (3, 32, 32), 10)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not list(model.buffers())  # no running statistics to average across clients
    # ResNet-20: a stem convolution, 3 stages x 3 blocks x 2 convolutions, 2 projection shortcuts, 1 linear
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2
    assert model.fc.in_features == 64


def test_resnet_gn_depth():
    assert len(ResNetGN(3, 10, depth=8).blocks) == 3
    assert len(ResNetGN(3, 10, depth=32).blocks) == 15
    with pytest.raises(ConfigError, match="6n\\+2"):
        ResNetGN(3, 10, depth=21)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_follows_the_callers_seed_and_is_deterministic(name):
    shape = (1, 28, 28)
    torch.manual_seed(123)
    a = build_model(name, shape, 10)
    b = build_model(name, shape, 10)  # the global RNG moved on: a model that seeded itself would repeat
    torch.manual_seed(123)
    c = build_model(name, shape, 10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not all(torch.equal(sa[k], sb[k]) for k in sa)
    # no dropout or other train-time randomness: two forward passes in train mode agree
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in a.modules())
    a.train()
    x = torch.randn(4, *shape)
    assert torch.equal(a(x), a(x))
