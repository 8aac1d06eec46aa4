"""The conformance kit inside an existing pytest suite (docs/conformance.md, "In a pytest suite").

Installed with the package (entry point ``pytest11``), so any suite can run it:

* ``pytest --pipeproof-url ws://HOST:PORT --pipeproof-secret S`` adds one test per property
  (``pipeproof[<property>]``): the kit runs once against the server, then each test passes,
  fails with the violation's minimal trace (its own property's test only), or is skipped as not
  exercised. Several ``--pipeproof-url`` are the nodes of one cluster.
* the ``pipeproof_conformance`` fixture gives a test a :class:`Conformance` for the same server,
  to run the kit with its own budget and assert on the :class:`~.results.KitResult`.

The server's declared settings come from ``--pipeproof-declare NAME=VALUE`` (the fields of
:class:`~.timing.Timing`, as ``pipeproof conform`` takes them as flags); without any, the
protocol's defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from .errors import Violation
from .kit import run_kit
from .properties import PROPERTIES
from .results import KitResult, Target
from .timing import Timing
from .wire import Tokens


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pipeproof", "pipeproof conformance kit")
    group.addoption("--pipeproof-url", action="append", default=[], metavar="URL",
                    help="ws://HOST:PORT of a server to hold to the model (repeat for a cluster's nodes)")
    group.addoption("--pipeproof-secret", default=None, help="the server's HS256 secret, to mint tokens")
    group.addoption("--pipeproof-examples", type=int, default=20, help="kit examples (default 20)")
    group.addoption("--pipeproof-steps", type=int, default=8, help="client actions per example (default 8)")
    group.addoption("--pipeproof-budget", type=float, default=45.0, help="seconds for the search (default 45)")
    group.addoption("--pipeproof-declare", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting the server declares, e.g. ack_timeout=0.25 (see `pipeproof conform -h`)")
    group.addoption("--pipeproof-no-runs", action="store_true", help="the server implements sections 1-3 only")


def declared_timing(items: list[str]) -> Timing:
    """The :class:`Timing` of ``NAME=VALUE`` items; a UsageError names a bad one."""
    kinds = {f.name: f.type for f in dataclasses.fields(Timing)}
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in kinds:
            raise pytest.UsageError(f"--pipeproof-declare {item!r}: expected NAME=VALUE with NAME one of "
                                    f"{', '.join(sorted(kinds))}")
        try:
            changes[name] = int(value) if kinds[name] in (int, "int") else float(value)
        except ValueError:
            raise pytest.UsageError(f"--pipeproof-declare {item!r}: {value!r} is not a number") from None
    return Timing().with_(**changes)


@dataclass
class Conformance:
    """The server named on the command line, and a way to run the kit against it."""

    target: Target
    examples: int
    steps: int
    budget: float

    def run(self, **overrides: Any) -> KitResult:
        """Run the kit (``examples``, ``steps``, ``budget``, ``random_seed`` ... as for
        :func:`~.kit.run_kit`); returns its result, a violation included."""
        options: dict[str, Any] = {"examples": self.examples, "steps": self.steps, "budget": self.budget}
        options.update(overrides)
        return run_kit(self.target, **options)

    def check(self, **overrides: Any) -> KitResult:
        """:meth:`run`, failing the calling test with the violation's trace if there is one."""
        result = self.run(**overrides)
        if result.violation is not None:
            pytest.fail(result.violation.render(), pytrace=False)
        return result


def _conformance(config: pytest.Config) -> Conformance | None:
    urls: list[str] = config.getoption("pipeproof_url")
    if not urls:
        return None
    secret = config.getoption("pipeproof_secret")
    target = Target(urls[0], Tokens(secret), declared_timing(config.getoption("pipeproof_declare")),
                    runs=not config.getoption("pipeproof_no_runs"), cluster=tuple(urls[1:]))
    return Conformance(target, config.getoption("pipeproof_examples"), config.getoption("pipeproof_steps"),
                       config.getoption("pipeproof_budget"))


@pytest.fixture
def pipeproof_conformance(request: pytest.FixtureRequest) -> Conformance:
    """The server of ``--pipeproof-url`` (skipped when none was given)."""
    found = _conformance(request.config)
    if found is None:
        pytest.skip("no --pipeproof-url given")
    return found


class PropertyItem(pytest.Item):
    """``pipeproof[<property>]``: the verdict of one property in the session's one kit run."""

    def __init__(self, *, prop: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prop = prop

    def runtest(self) -> None:
        result = _session_result(self.session)
        if result.violation is not None and result.violation.prop == self.prop:
            raise result.violation
        if result.violation is None and result.checks.get(self.prop, 0) == 0:
            pytest.skip(f"{self.prop} was not exercised")
        if result.violation is not None and result.checks.get(self.prop, 0) == 0:
            pytest.skip(f"{self.prop} was not exercised before the run stopped at {result.violation.prop}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, Violation):
            return excinfo.value.render()
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[str, int | None, str]:
        section = PROPERTIES[self.prop].section
        return "pipeproof", None, f"pipeproof[{self.prop}] (PROTOCOL section {section})"


_RESULT = pytest.StashKey[KitResult]()


def _session_result(session: pytest.Session) -> KitResult:
    """The one kit run of the session, made by the first property test that asks."""
    if _RESULT not in session.stash:
        found = _conformance(session.config)
        assert found is not None  # the items exist only with --pipeproof-url
        session.stash[_RESULT] = found.run()
    return session.stash[_RESULT]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("pipeproof_url"):
        return
    items.extend(PropertyItem.from_parent(session, name=f"pipeproof[{prop}]", prop=prop) for prop in PROPERTIES)
