"""Model families: documented |θ| formulas, shapes, the a–d table, inits, errors."""

import pytest
import torch

from optmech.models import FAMILIES, INIT_SCHEMES, PAPER_MAPPINGS, build, build_paper, expected_n_params, n_params, paper_spec

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_formula_and_output_shape(family, shape):
    for depth in (0, 1, 2, 5):
        for skip in (False, True):
            model = build(family, depth=depth, skip=skip, input_shape=shape, n_classes=10)
            assert n_params(model) == expected_n_params(family, depth, skip, shape, 10)
            assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_documented_mnist_counts():
    """The numbers in the docstrings and READING.md §3."""
    assert [n_params(build("resnet", depth=k, skip=True)) for k in (0, 5)] == [93_066, 116_106]
    assert n_params(build("resnet", depth=1, skip=False)) == 69_930 + 4_608
    assert n_params(build("snet", depth=0)) == 15_880 and n_params(build("snet", depth=3)) == 15_880 + 330
    assert n_params(build("mlp", depth=2)) == 50_890 + 2 * 4_160
    assert n_params(build("cnn", depth=1)) == 62_810 and n_params(build("cnn", depth=0)) == 7_850


def test_skip_changes_the_function_not_only_the_flag():
    x = torch.randn(3, 1, 28, 28)
    for family in FAMILIES:
        plain = build(family, depth=2, skip=False, seed=0)
        skip = build(family, depth=2, skip=True, seed=0)
        if family == "resnet":
            continue  # different parameter sets (projection shortcuts)
        skip.load_state_dict(plain.state_dict())
        assert not torch.allclose(plain(x), skip(x)), family


def test_paper_mapping_table():
    assert paper_spec("a") == ("resnet", False) and paper_spec("b") == ("resnet", True)
    assert paper_spec("c") == ("snet", False) and paper_spec("d") == ("snet", True)
    assert paper_spec("a", "swapped") == ("snet", False)
    assert set(PAPER_MAPPINGS) == {"reconstruction", "swapped", "authors-code"}
    assert n_params(build_paper("b", depth=0)) == 93_066


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b = build("cnn", depth=2, seed=5), build("cnn", depth=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("init", INIT_SCHEMES)
def test_inits(init):
    model = build("snet", depth=1, init=init, seed=0)
    if init != "pytorch":
        assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_he_normal_has_he_variance():
    model = build("mlp", depth=0, init="he_normal", seed=0)
    w = model.stem[1].weight
    assert abs(float(w.detach().var()) / (2 / 784) - 1) < 0.05


def test_dropout_modules_present_only_when_asked():
    has = lambda m: any(isinstance(x, torch.nn.Dropout) for x in m.modules())  # noqa: E731
    assert not has(build("mlp", depth=1)) and has(build("mlp", depth=1, dropout=0.2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="vgg", depth=1), "unknown family 'vgg'"),
        (dict(name="a", depth=1), "build_paper"),
        (dict(name="mlp", depth=-1), "depth: expected an integer"),
        (dict(name="snet", depth=1, input_shape=(28, 28)), "input_shape"),
        (dict(name="mlp", depth=1, init="lecun"), "unknown initialisation 'lecun'"),
        (dict(name="mlp", depth=1, dropout=1.0), "dropout"),
    ],
)
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(kwargs.pop("name"), **kwargs)


def test_paper_errors():
    with pytest.raises(ValueError, match="unknown paper model 'e'"):
        paper_spec("e")
    with pytest.raises(ValueError, match="unknown a–d mapping"):
        paper_spec("a", "mine")
