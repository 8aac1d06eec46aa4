"""The mutant matrix as data: mutant x checker -> caught or missed (docs/diagrams.md, "matrix").

The matrix is computed by ``model/check/matrix.py`` (``mutant_matrix``), which runs every checker
(explorer, Hypothesis, Z3) on every mutant. This module only adapts its cells to the record's
plain :class:`~pipeproof.drawing.record.MatrixCell`, reading them by field name, so the drawing
does not depend on that module's classes. When that module is not installed in this build, the
matrix has the explorer column only, taken from the counterexamples the refresh found itself,
and the report says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pipeproof.drawing.record import MatrixCell, MutantEntry
from pipeproof.drawing.source import Source

MATRIX_MODULE = "pipeproof.model.check.matrix"
FALLBACK_SOURCE = "explorer only (model/check/matrix.py not available when the record was refreshed)"


def compute_matrix(
    source: Source, mutants: Sequence[MutantEntry], *, run_full: bool, log: Callable[[str], None]
) -> tuple[str, list[MatrixCell]]:
    """(where the cells come from, cells in mutant order then checker order)."""
    if run_full and importlib.util.find_spec(MATRIX_MODULE) is not None:
        module = importlib.import_module(MATRIX_MODULE)
        log("matrix    running model/check/matrix.py mutant_matrix() (every checker x every mutant)")
        fn = module.mutant_matrix
        # Pass the source's mutants when the function takes them (so a changed zoo is honoured).
        accepts = inspect.signature(fn).parameters
        raw = fn(mutants=source.mutants) if "mutants" in accepts else fn()
        order = {m.name: i for i, m in enumerate(source.mutants)}
        cells = sorted(adapt_cells(raw), key=lambda c: (order.get(c.mutant, len(order)), c.mutant, c.checker))
        return "model/check/matrix.py mutant_matrix()", cells
    return FALLBACK_SOURCE, [
        MatrixCell(m.name, "explorer", m.counterexample is not None,
                   len(m.counterexample.steps) if m.counterexample else None, m.prop)
        for m in mutants
    ]


def _field(cell: Any, *names: str) -> Any:
    for n in names:
        if isinstance(cell, Mapping) and n in cell:
            return cell[n]
        if not isinstance(cell, Mapping) and hasattr(cell, n):
            return getattr(cell, n)
    return None


def _name(value: Any) -> str:
    return str(getattr(value, "name", value))


def adapt_cells(raw: Any) -> list[MatrixCell]:
    """Cells from ``mutant_matrix``'s result: an iterable of cells, or an object with ``cells``.

    A cell is read by field name (attribute or mapping key): ``mutant``, ``checker``,
    ``caught`` (or a ``verdict``/``status``/``result`` string), ``trace_length`` (or
    ``trace_len``/``length``/``steps``, or the length of ``trace``), ``property`` (or ``prop``).
    """
    cells_in: Iterable[Any] = raw.cells if hasattr(raw, "cells") else raw
    if isinstance(cells_in, Mapping):
        cells_in = cells_in.values()
    out = []
    for cell in cells_in:
        caught = _field(cell, "caught")
        if caught is None:
            verdict = str(_field(cell, "verdict", "status", "result") or "").lower()
            caught = verdict in ("caught", "violated", "killed", "detected")
        length = _field(cell, "trace_length", "trace_len", "length", "steps")
        if length is None and _field(cell, "trace") is not None:
            length = len(_field(cell, "trace"))
        if isinstance(length, Sequence) and not isinstance(length, str):
            length = len(length)
        detail = _field(cell, "detail", "message", "note")
        out.append(MatrixCell(
            mutant=_name(_field(cell, "mutant", "mutant_name", "name")),
            checker=_name(_field(cell, "checker", "method")),
            caught=bool(caught),
            trace_length=int(length) if length is not None and bool(caught) else None,
            property=str(_field(cell, "property", "prop") or ""),
            detail=str(detail) if detail else "",
        ))
    return out
