"""Diagrams and the architect's report, generated from the model and checked for drift (docs/diagrams.md).

Everything under ``diagrams/`` is derived from one declaration (DESIGN.md, "Layout": the DOT
diagram is one of the artifacts derived from each machine's declaration) plus one committed
verification record, ``diagrams/verdicts.json``:

* :mod:`.source` bundles what is drawn (the machines, invariants, mutants, scenarios), so a test
  can pass a changed model in;
* :mod:`.record` runs the checkers (``--refresh``) and fingerprints the model;
* :mod:`.machines` writes one DOT graph per machine (and per counterexample, path highlighted);
* :mod:`.sequence` draws counterexample traces as SVG sequence diagrams;
* :mod:`.protocol` publishes the wire protocol (JSON Schemas, AsyncAPI 3);
* :mod:`.report` writes ``index.html`` and one page per counterexample;
* :mod:`.generate` puts it together, writes the files and checks a committed tree for drift.
"""

from __future__ import annotations
