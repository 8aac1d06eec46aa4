"""An independent server for the conformance kit's regression suite (issue 15).

Written from docs/protocol.md alone, on another stack than the reference server (the plain
``websockets`` asyncio server and its HTTP hook, PyJWT, the stdlib; state in memory), with bug
switches (:mod:`.bugs`) that break one documented rule each. Nothing here imports the reference
server, the model, the cores or the protocol package.
"""
