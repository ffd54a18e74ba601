"""Every input form (example_input tensor/tuple/dict, --input-shape, integer dtypes), loss_fn, and bad inputs."""

from __future__ import annotations

import math

import pytest

from tests.cli.conftest import NET, layer, read_json

TWO_INPUTS = """
import torch
from torch import nn

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x, y=None, *, scale=1.0):
        out = self.a(x)
        if y is not None:
            out = out + self.b(y)
        return out * scale
"""


def _json(run, tmp_path, *args):
    out = tmp_path / "r.json"
    result = run(*args, "--json", out)
    assert result.exit_code == 0, result.stderr
    return read_json(out)


@pytest.mark.parametrize(
    ("example", "b_count"),
    [
        ("torch.randn(3, 10)", None),
        ("(torch.randn(3, 10), torch.randn(3, 6))", 3 * 4),
        ("{'x': torch.randn(3, 10), 'y': torch.randn(3, 6), 'scale': 2.0}", 3 * 4),
    ],
)
def test_example_input_tensor_tuple_and_dict(write, run, tmp_path, example, b_count) -> None:
    target = write("two.py", TWO_INPUTS + f"\ndef example_input():\n    return {example}\n")
    doc = _json(run, tmp_path, target)
    assert layer(doc, "a")["activation"]["count"] == 3 * 4
    names = [item["name"] for item in doc["layers"]]
    if b_count is None:
        assert "b" not in names
    else:
        assert layer(doc, "b")["activation"]["count"] == b_count


def test_input_shape_single_and_repeated(write, run, tmp_path) -> None:
    target = write("two.py", TWO_INPUTS)
    doc = _json(run, tmp_path, target, "--input-shape", "5,10")
    assert layer(doc, "a")["shape"] == [5, 4]
    doc = _json(run, tmp_path, target, "--input-shape", "5,10", "--input-shape", "5,6")
    assert layer(doc, "b")["shape"] == [5, 4]


def test_input_shape_overrides_example_input(write, run, tmp_path) -> None:
    target = write("model.py", NET + "\ndef example_input():\n    return torch.randn(4, 10)\n")
    doc = _json(run, tmp_path, target, "--input-shape", "7,10")
    assert layer(doc, "fc1")["shape"] == [7, 20]


LM = """
import torch
from torch import nn

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50)

    def forward(self, ids):
        assert ids.dtype == torch.long
        self.seen = (int(ids.min()), int(ids.max()))
        return self.head(self.emb(ids))

model = LM()
"""


def test_long_token_ids_from_the_embedding_or_a_range(write, run, tmp_path) -> None:
    target = write("lm.py", LM)
    doc = _json(run, tmp_path, target, "--input-shape", "4,16", "--input-dtype", "long")
    assert layer(doc, "emb")["shape"] == [4, 16, 8]
    doc = _json(run, tmp_path, target, "--input-shape", "4,16", "--input-dtype", "long", "--input-range", "3,5")
    assert layer(doc, "head")["shape"] == [4, 16, 50]
    # ids outside the vocabulary reach nn.Embedding, which raises: the message names that layer
    result = run(target, "--input-shape", "4,16", "--input-dtype", "long", "--input-range", "0,1000")
    assert result.exit_code == 2
    assert "layer 'emb'" in result.stderr and "Embedding(50, 8)" in result.stderr


def test_long_input_without_embedding_needs_a_range(write, run) -> None:
    target = write("model.py", NET)
    result = run(target, "--input-shape", "4,10", "--input-dtype", "long")
    assert result.exit_code == 2
    assert "--input-range" in result.stderr


def test_no_input_names_both_ways(write, run) -> None:
    result = run(write("model.py", NET))
    assert result.exit_code == 2
    assert "example_input()" in result.stderr and "--input-shape" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--input-shape", "4,x"], "is not a shape"),
        (["--input-shape", "4,0"], "positive integers"),
        (["--input-dtype", "long"], "--input-shape too"),
        (
            [
                "--input-shape",
                "4,10",
                "--input-shape",
                "4,10",
                "--input-dtype",
                "long",
                "--input-dtype",
                "long",
                "--input-dtype",
                "float",
            ],
            "one dtype for all",
        ),
        (["--input-shape", "4,10", "--input-range", "5,1"], "LOW must be below HIGH"),
        (["--input-shape", "4,10", "--input-dtype", "complex"], "complex"),
    ],
)
def test_bad_input_options_exit_2(write, run, args, expected) -> None:
    result = run(write("model.py", NET), *args)
    assert result.exit_code == 2
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        # wrong shape: fc1 expects 10 features
        (
            "torch.randn(4, 12)",
            ["layer 'fc1'", "Linear(in_features=10, out_features=20, bias=True)", "(4, 12) float32", "mat1 and mat2"],
        ),
        # wrong type: integer tensor into a float Linear
        ("torch.ones(4, 10, dtype=torch.long)", ["layer 'fc1'", "(4, 10) int64"]),
    ],
)
def test_bad_input_names_the_layer(write, run, tmp_path, example, expected) -> None:
    target = write("model.py", NET + f"\ndef example_input():\n    return {example}\n")
    out = tmp_path / "r.json"
    result = run(target, "--json", out)
    assert result.exit_code == 2
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_error_in_a_container_forward_names_it_and_the_last_layer_run(write, run) -> None:
    source = NET.replace(
        "return self.fc2(self.act(self.fc1(x)))", "h = self.act(self.fc1(x))\n        return h.view(3, -1, 7)"
    )
    result = run(write("model.py", source + "\ndef example_input():\n    return torch.randn(4, 10)\n"))
    assert result.exit_code == 2
    assert "the model's own forward() (Net), after layer 'act' had run" in result.stderr
    assert "model.py line 14" in result.stderr


@pytest.mark.parametrize(
    ("ret", "expected"),
    [("None", "returned None"), ("'text'", "returned a str"), ("{'logits': 3}", "returned a dict")],
)
def test_model_returning_no_tensor(write, run, ret, expected) -> None:
    source = NET.replace(
        "return self.fc2(self.act(self.fc1(x)))", f"self.fc2(self.act(self.fc1(x)))\n        return {ret}"
    )
    result = run(write("model.py", source + "\ndef example_input():\n    return torch.randn(4, 10)\n"))
    assert result.exit_code == 2
    assert expected in result.stderr and "not a tensor" in result.stderr


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("'not a tensor'", "example_input() returned a str"),
        ("()", "example_input() returned a tuple with no tensor"),
        ("{}", "example_input() returned a dict with no tensor"),
        ("1 / 0", "example_input() raised ZeroDivisionError"),
    ],
)
def test_bad_example_input(write, run, example, expected) -> None:
    result = run(write("model.py", NET + f"\ndef example_input():\n    return {example}\n"))
    assert result.exit_code == 2
    assert expected in result.stderr


def test_loss_fn_is_used(write, run, tmp_path) -> None:
    base = NET + "\ndef example_input():\n    return torch.randn(4, 10)\n"
    # d(sum of outputs)/d(output) is exactly 1 everywhere; the default random gradient has spread ~1
    doc = _json(run, tmp_path, write("withloss.py", base + "\ndef loss_fn(output, inputs):\n    return output.sum()\n"))
    grad = layer(doc, "fc2")["gradient"]
    assert grad["mean"] == 1.0 and grad["std"] == 0.0
    doc = _json(run, tmp_path, write("noloss.py", base))
    assert layer(doc, "fc2")["gradient"]["std"] > 0.3


def test_loss_fn_errors_exit_2(write, run) -> None:
    base = NET + "\ndef example_input():\n    return torch.randn(4, 10)\n"
    result = run(write("a.py", base + "\ndef loss_fn(output, inputs):\n    raise KeyError('labels')\n"))
    assert result.exit_code == 2 and "loss_fn() raised KeyError" in result.stderr and "a.py line" in result.stderr
    result = run(write("b.py", base + "\ndef loss_fn(output, inputs):\n    return output\n"))
    assert result.exit_code == 2 and "scalar" in result.stderr


def test_nan_inputs_run_and_are_reported(write, run, tmp_path) -> None:
    source = NET + "\ndef example_input():\n    x = torch.randn(4, 10)\n    x[0, 0] = float('nan')\n    return x\n"
    doc = _json(run, tmp_path, write("nan.py", source))
    fc1 = layer(doc, "fc1")["activation"]
    assert fc1["nonfinite_count"] == 20  # one NaN feature poisons every output unit of its sample
    assert math.isfinite(fc1["mean"])
    codes = [f["code"] for f in doc["findings"]]
    assert codes.count("nonfinite") == 1
    assert next(f for f in doc["findings"] if f["code"] == "nonfinite")["layer"] == "fc1"


def test_one_dtype_per_input(write, run, tmp_path) -> None:
    source = """
    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.proj = nn.Linear(6, 6)

        def forward(self, ids, weights):
            assert ids.dtype == torch.long and weights.dtype == torch.float64
            return self.proj(self.emb(ids)) * weights.unsqueeze(-1).float()
    """
    target = write("tagger.py", source)
    args = ["--input-shape", "3,7", "--input-shape", "3,7", "--input-dtype", "long", "--input-dtype", "float64"]
    doc = _json(run, tmp_path, target, *args)
    assert layer(doc, "proj")["shape"] == [3, 7, 6]
