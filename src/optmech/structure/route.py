"""Which path each parameter of θ went through in one call: the route report.

``gram`` takes a parameter through a rule (:mod:`.rules`) in a contraction form, or hands it to the generic
``torch.func`` path for a stated reason; ``jacobian`` and ``loop`` take every parameter their own way. The
report is returned with every result (:class:`.engine.StructuralMatrix`), so users and tests read it instead of
inspecting the engine's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

__all__ = ["Route", "RouteReport", "SlowPathWarning", "GenericPathWarning"]


class SlowPathWarning(UserWarning):
    """The engine took an exact but slower path than it could on other models (said once per model). Filter with
    ``warnings.filterwarnings("ignore", category=optmech.structure.SlowPathWarning)``."""


class GenericPathWarning(SlowPathWarning):
    """Some parameters went through the generic ``torch.func`` path of ``gram`` (exact, slower); said once per
    model and set of reasons, naming each parameter and why."""


@dataclasses.dataclass(frozen=True)
class Route:
    """One parameter's path.

    Attributes:
        parameter: its name in ``model.named_parameters()``.
        rule: the rule that took it (``"linear"``, ``"conv"``, ``"norm"``, ``"embedding"``, ``"attention"``,
            ``"recurrent"``, ``"direct"``), or None (the generic path, or a method without rules).
        form: how its share was contracted: ``"ghost"``, ``"materialise"``, ``"pooled"``, ``"elementwise"``,
            ``"direct"``; ``"generic"`` (torch.func restricted to the parameters gram left); or the method that
            took every parameter (``"jacobian"``, ``"loop"``).
        reason: why it went to the generic path (None otherwise).
    """

    parameter: str
    rule: str | None
    form: str
    reason: str | None = None

    @property
    def fast(self) -> bool:
        return self.rule is not None


class RouteReport(Mapping[str, Route]):
    """parameter name -> :class:`Route`, for every parameter of θ, in θ's order; ``method`` is the method that ran."""

    def __init__(self, method: str, routes: list[Route]) -> None:
        self.method = method
        self._routes = {r.parameter: r for r in routes}

    def __getitem__(self, name: str) -> Route:
        return self._routes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def generic(self) -> dict[str, str]:
        """{parameter: reason} of the parameters that went through the generic path."""
        return {n: r.reason or "" for n, r in self._routes.items() if r.form == "generic"}

    def forms(self) -> dict[str, str]:
        """{parameter: form} of every parameter."""
        return {n: r.form for n, r in self._routes.items()}

    def rules(self) -> dict[str, str | None]:
        """{parameter: rule} of every parameter (None: generic, or a method without rules)."""
        return {n: r.rule for n, r in self._routes.items()}

    def __repr__(self) -> str:
        return f"RouteReport(method={self.method!r}, {len(self)} parameters, {len(self.generic())} generic)"

    def __str__(self) -> str:
        rows = [f"method: {self.method}"]
        for r in self._routes.values():
            via = f"{r.rule}/{r.form}" if r.rule else r.form
            rows.append(f"  {r.parameter}: {via}" + (f" ({r.reason})" if r.reason else ""))
        return "\n".join(rows)
