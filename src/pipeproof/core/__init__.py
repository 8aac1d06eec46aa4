"""Sans-I/O cores: protocol decisions with no socket, task or clock (DESIGN.md, "Sans-I/O core").

Each core takes inputs as method calls, with the current time as an argument, and returns plain
frozen-dataclass commands for its asyncio shell in impl/ to carry out; a core never imports
asyncio, reads a clock, or touches a socket or the store.
"""

from __future__ import annotations
