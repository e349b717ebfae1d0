"""Models of any call signature: batches as tuples or mappings of tensors, outputs as tuples, mappings or objects
with ``.logits``, and ``output=`` for anything else — every engine method against the float64 oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from optmech import Probe, structural_matrix
from tests.oracles import structural_oracle_of

METHODS = ["gram", "jacobian", "loop", "auto"]


@dataclasses.dataclass
class Output:
    """Like a Hugging Face ModelOutput: logits among other fields."""

    logits: torch.Tensor
    hidden: torch.Tensor


class TokenModel(nn.Module):
    """Token ids and a padding mask in, by keyword; an object with .logits (or another layout) out."""

    def __init__(self, layout: str = "object") -> None:
        super().__init__()
        self.layout = layout
        self.embed = nn.Embedding(30, 8)
        self.mix = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0):
        h = self.norm(torch.tanh(self.mix(self.embed(input_ids))))
        mask = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = scale * self.head(pooled)
        if self.layout == "object":
            return Output(logits, h)
        if self.layout == "mapping":
            return {"hidden": h, "logits": logits}
        if self.layout == "tuple":
            return logits, h
        return {"scores": logits}


def tokens(n: int = 5, T: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 2:] = 0
    return ids, mask


def oracle(model, ids, mask, **kw):
    return structural_oracle_of(model, lambda b: _logits(model(ids[b:b + 1], mask[b:b + 1], **kw))[0], ids.shape[0])


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out["logits"] if "logits" in out else out[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["object", "mapping", "tuple"])
def test_mapping_batch_and_structured_output_match_the_oracle(method, layout):
    torch.manual_seed(0)
    model = TokenModel(layout).double()
    ids, mask = tokens()
    ref = oracle(model, ids, mask)
    A = structural_matrix(model, {"input_ids": ids, "attention_mask": mask}, method=method).A
    assert A.shape == (5, 4, 4)
    assert (A - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert "forward" not in model.__dict__  # the model is left as it was


@pytest.mark.parametrize("method", METHODS)
def test_tuple_batch_is_positional(method):
    torch.manual_seed(0)
    model = TokenModel("tuple").double()
    ids, mask = tokens()
    A_tuple = structural_matrix(model, (ids, mask), method=method).A
    A_map = structural_matrix(model, {"attention_mask": mask, "input_ids": ids}, method=method).A
    torch.testing.assert_close(A_tuple, A_map, rtol=1e-12, atol=0)


def test_non_tensor_values_pass_through_and_output_selects():
    torch.manual_seed(0)
    model = TokenModel("other").double()
    ids, mask = tokens()
    ref = structural_oracle_of(model, lambda b: model(ids[b:b + 1], mask[b:b + 1], scale=2.0)["scores"][0], 5)
    for output in ("scores", lambda out: out["scores"]):
        A = structural_matrix(model, {"input_ids": ids, "attention_mask": mask, "scale": 2.0}, output=output).A
        assert (A - ref).abs().max() <= 1e-10 * ref.abs().max()
    with pytest.raises(TypeError, match=r"model output: expected logits .* got dict instead\. Pass output="):
        structural_matrix(model, {"input_ids": ids, "attention_mask": mask})
    with pytest.raises(ValueError, match=r"output: could not select 'logit' from the model's output of type dict"):
        structural_matrix(model, {"input_ids": ids}, output="logit")


def test_tensor_input_with_structured_output():
    torch.manual_seed(0)
    model = TokenModel("object").double()
    ids, mask = tokens()
    ref = structural_oracle_of(model, lambda b: model(ids[b:b + 1]).logits[0], 5)
    for method in METHODS:
        A = structural_matrix(model, ids, method=method).A
        assert (A - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_bad_structured_batches_name_what_is_wrong():
    model = TokenModel().double()
    ids, mask = tokens()
    with pytest.raises(ValueError, match=r"inputs: expected every tensor to have the same batch size along dimension 0, got \{input_ids: \(5, 6\) int64, attention_mask: \(3, 6\)"):
        structural_matrix(model, {"input_ids": ids, "attention_mask": mask[:3]})
    with pytest.raises(ValueError, match=r"inputs: the model's own forward fails on inputs of \{input_ids: \(5, 6\) int64, mask: .*unexpected keyword"):
        structural_matrix(model, {"input_ids": ids, "mask": mask})
    with pytest.raises(ValueError, match=r"inputs\['x'\]: expected finite values, got NaN or inf in samples \[2\]"):
        x = torch.randn(4, 3, dtype=torch.float64)
        x[2, 1] = float("nan")
        structural_matrix(nn.Linear(3, 2).double(), {"x": x}, output=0)
    with pytest.raises(TypeError, match=r"inputs: expected a torch.Tensor of shape \(batch, \.\.\.\), or a tuple or mapping of them .* got set instead"):
        structural_matrix(model, {ids})
    with pytest.raises(ValueError, match=r"inputs: expected at least one tensor"):
        structural_matrix(model, {"scale": 1.0})


def test_probe_measures_a_structured_batch_exactly_and_checks_every_sample():
    torch.manual_seed(0)
    model = TokenModel("object").double()
    ids, mask = tokens()
    y = torch.tensor([0, 1, 2, 3, 0])
    m = Probe(model, check=True).measure({"input_ids": ids, "attention_mask": mask}, y)
    ref = oracle(model, ids, mask)
    assert (m.A - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert bool(m.bound_holds.all()) and len(m) == 5
    with pytest.raises(ValueError, match=r"targets: expected 5 targets"):
        Probe(model).measure({"input_ids": ids, "attention_mask": mask}, y[:3])


def test_training_step_capture_with_a_structured_batch():
    torch.manual_seed(0)
    model = TokenModel("object").double()
    ids, mask = tokens()
    y = torch.tensor([0, 1, 2, 3, 0])
    probe = Probe(model, check=True)
    with probe.capture() as step:
        out = model(input_ids=ids, attention_mask=mask)
    m = step.measure({"input_ids": ids, "attention_mask": mask}, y, out)  # the ModelOutput itself
    standalone = Probe(model).measure({"input_ids": ids, "attention_mask": mask}, y)
    torch.testing.assert_close(m.A, standalone.A, rtol=1e-10, atol=0)
    nn.functional.cross_entropy(out.logits, y).backward()  # the training graph is intact
    assert model.head.weight.grad is not None


class Positions(nn.Module):
    """Token and position embeddings, the positions (1, T) shared by the batch and broadcast by the add (BERT's)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(30, 8)
        self.positions = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1])[None, :])
        return self.head(torch.tanh(h).mean(1))


def test_embedding_of_indices_shared_by_the_batch_is_fast_and_exact():
    from optmech import EngineOptions

    torch.manual_seed(0)
    model = Positions().double()
    ids, _ = tokens()
    ref = structural_oracle_of(model, lambda b: model(ids[b:b + 1])[0], 5)
    result = structural_matrix(model, ids, method="gram")
    assert (result.A - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert result.route.generic() == {}
    # the training-step options change nothing the step computes: the shared embedding goes generic, and says why
    with pytest.warns(Warning, match="positions.weight"):
        kept = structural_matrix(model, ids, method="gram", options=EngineOptions.training_step())
    assert "positions.weight" in kept.route.generic()
    assert (kept.A - ref).abs().max() <= 1e-12 * ref.abs().max()
