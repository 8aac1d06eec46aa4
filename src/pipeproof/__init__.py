"""pipeproof: a formal, executable model of the three pipes of an agent-chat backend.

The subpackages map the repository's top-level folders into one namespace:
``pipeproof.model`` is ``model/``, ``pipeproof.impl`` is ``impl/``,
``pipeproof.conformance`` is ``conformance/`` (see docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"
