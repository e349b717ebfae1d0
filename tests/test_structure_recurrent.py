"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` on ``gram``'s fast path (structure/rules/recurrent.py), and models that
``vmap`` cannot batch over samples on the generic path (structure/jacobian.py): exact against the float64
oracle, with the generic path unused where the fast path covers the model and used (still exact) where
it does not."""

import warnings

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.structure import EngineOptions, SlowPathWarning, clear_cache
from optmech.structure.rules.recurrent import recurrent_steps


class Sequence(nn.Module):
    """(n, L, 3) -> a recurrent module (either layout, an initial state from the data or none) -> the last
    output, and the final state where asked -> logits."""

    def __init__(self, make, batch_first: bool = True, state: bool = False, use_final: bool = False) -> None:
        super().__init__()
        self.rnn = make(batch_first)
        self.batch_first, self.state, self.use_final = batch_first, state, use_final
        D = 2 if self.rnn.bidirectional else 1
        self.init = nn.Linear(3, D * self.rnn.num_layers * self.rnn.hidden_size) if state else None
        self.head = nn.Linear(D * self.rnn.hidden_size + (self.rnn.hidden_size if use_final else 0), 3)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        hx = None
        if self.state:  # h0 (and c0) from the first position: the state carries parameters of its own
            D, H = 2 if self.rnn.bidirectional else 1, self.rnn.hidden_size
            h0 = torch.tanh(self.init(x[:, 0])).view(x.shape[0], D * self.rnn.num_layers, H).transpose(0, 1).contiguous()
            hx = (h0, torch.sin(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        y, final = self.rnn(seq, hx)
        last = y[:, -1] if self.batch_first else y[-1]
        if self.use_final:
            h_n = final[0] if isinstance(final, tuple) else final
            last = torch.cat([last, h_n[-1]], 1)
        return self.head(last)


RECURRENT = {
    "lstm-2-layers-bidirectional": lambda: Sequence(lambda bf: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=bf)),
    "lstm-seq-first-state-final": lambda: Sequence(lambda bf: nn.LSTM(3, 4, batch_first=bf), batch_first=False, state=True, use_final=True),
    "gru-bidirectional-seq-first": lambda: Sequence(lambda bf: nn.GRU(3, 4, bidirectional=True, batch_first=bf), batch_first=False),
    "gru-2-layers-state-final": lambda: Sequence(lambda bf: nn.GRU(3, 5, num_layers=2, batch_first=bf), state=True, use_final=True),
    "rnn-relu-no-bias": lambda: Sequence(lambda bf: nn.RNN(3, 4, nonlinearity="relu", bias=False, batch_first=bf)),
    "rnn-tanh-2-layers-bidirectional": lambda: Sequence(lambda bf: nn.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=bf), state=True),
}


def _case(name: str, n: int = 4, L: int = 5, dtype=torch.float64):
    torch.manual_seed(0)
    model = RECURRENT[name]().to(dtype)
    x = torch.randn(n, L, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, x


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_modules_are_fast_and_exact(name, strategy):
    model, x = _case(name)
    A_ref, _ = structural_oracle(model, x)
    _r = structural_matrix(model, x, method="gram", per_layer=True, options=EngineOptions(contraction=strategy))
    A, groups = _r.A, _r.per_layer
    assert rel_err(A, A_ref) < RTOL[torch.float64], f"{name}/{strategy}: {rel_err(A, A_ref):.3e}"
    assert {n: r.rule for n, r in _r.route.items() if n.startswith("rnn.")} == {n: "recurrent" for n, _ in model.rnn.named_parameters("rnn")}
    assert not _r.route.generic()  # every parameter on the fast path
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    _, loop_groups = _r.A, _r.per_layer
    assert set(groups) == set(loop_groups) and "rnn" in groups  # the module's Linear layers over time, grouped under its path
    for layer, part in loop_groups.items():
        assert rel_err(groups[layer], part) < RTOL[torch.float64], layer


@pytest.mark.parametrize("name", ["lstm-seq-first-state-final", "gru-bidirectional-seq-first"])
def test_as_many_samples_as_steps_and_one_sample(name):
    """L = n (the samples' dimension is found by a backward pass) and n = 1."""
    for n, L in ((5, 5), (1, 4)):
        model, x = _case(name, n=n, L=L)
        A_ref, _ = structural_oracle(model, x)
        _r = structural_matrix(model, x, method="gram")
        assert rel_err(_r.A, A_ref) < RTOL[torch.float64], (n, L)
        assert not _r.route.generic()


@pytest.mark.parametrize("name", list(RECURRENT))
def test_the_recomputation_is_the_module(name):
    model, x = _case(name)
    rnn = model.rnn
    seq = x if rnn.batch_first else x.transpose(0, 1)
    y, final = rnn(seq)
    steps, mine, state = recurrent_steps(rnn, x, None)
    assert torch.allclose(mine, y if rnn.batch_first else y.transpose(0, 1), rtol=0, atol=1e-13)  # mine is batch-first
    for own, new in zip(final if isinstance(final, tuple) else (final,), state if isinstance(state, tuple) else (state,)):
        assert torch.allclose(own, new, rtol=0, atol=1e-13)
    D = 2 if rnn.bidirectional else 1
    per_direction = 2 if isinstance(rnn, nn.GRU) else 1
    assert len(steps) == rnn.num_layers * D * per_direction
    assert all(s.u.shape == (4, 5, rnn.weight_ih_l0.shape[0]) for s in steps)


def test_float32_lstm_matches_the_float64_oracle():
    """float32 runs oneDNN's fused LSTM in the module: the recomputation matches it, and A the float64 oracle."""
    model, x = _case("lstm-2-layers-bidirectional")
    A_ref, _ = structural_oracle(model, x)
    A = structural_matrix(model.float(), x.float(), method="gram").A
    assert A.dtype == torch.float32 and rel_err(A.double(), A_ref) < RTOL[torch.float32]


class Uncovered(nn.Module):
    """Recurrent calls the fast path leaves alone: a packed sequence, LSTM's projection, a module called
    twice, and a weight also read outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = nn.GRU(3, 4, batch_first=True)
        self.proj = nn.LSTM(3, 5, proj_size=2, batch_first=True)
        self.twice = nn.RNN(3, 3, batch_first=True)
        self.shared = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4 + 2 + 3 + 4, 3)

    def forward(self, x):
        lengths = x.shape[1] - (x[:, 0, 0] > 0).long()  # each sample's own length, from its data
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h_packed = self.packed(packed)
        y_proj, _ = self.proj(x)
        y_twice, _ = self.twice(self.twice(x)[0])
        y_shared, _ = self.shared(x)
        extra = (self.shared.weight_hh_l0.sum() * x[:, 0, :1]).expand(-1, 4)  # a second use of one weight
        h = torch.cat([h_packed[-1], y_proj[:, -1], y_twice[:, -1], y_shared[:, -1] + extra], 1)
        return self.head(h)


def test_calls_the_fast_path_does_not_cover_go_to_the_generic_path_exactly():
    torch.manual_seed(0)
    model = Uncovered().double()
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A_ref, _ = structural_oracle(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, A_ref) < RTOL[torch.float64]
    slow = {name.split(".")[0] for name in _r.route.generic()}
    assert slow == {"packed", "proj", "twice", "shared"}
    said = [str(w.message) for w in caught if issubclass(w.category, SlowPathWarning)]
    assert any("cannot vmap" in s for s in said)  # the generic path took them one sample at a time, and said so
    assert any("packed" in s and "generic torch.func path" in s for s in said)


def test_jacobian_takes_a_model_vmap_cannot_batch_one_sample_at_a_time():
    model, x = _case("lstm-2-layers-bidirectional")
    clear_cache(model)  # no initial state: the module's zeros are not batched
    A_ref, _ = structural_oracle(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _r = structural_matrix(model, x, method="jacobian", per_layer=True, chunk_size=3)
        A, groups = _r.A, _r.per_layer
        again = structural_matrix(model, x, method="jacobian").A
    assert rel_err(A, A_ref) < RTOL[torch.float64] and rel_err(again, A) < 1e-14  # chunked and not
    assert [issubclass(w.category, SlowPathWarning) and "cannot vmap" in str(w.message) for w in caught] == [True]  # said once
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    _, loop_groups = _r.A, _r.per_layer
    assert set(groups) == set(loop_groups)
    assert all(rel_err(groups[k], v) < RTOL[torch.float64] for k, v in loop_groups.items())
