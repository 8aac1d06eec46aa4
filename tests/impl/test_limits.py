"""Tests for pipeproof.impl.limits: per-user and per-account counting (PROTOCOL section 3)."""

from __future__ import annotations

import pytest

from pipeproof.impl.limits import ConnectionLimiter, ConnectionLimitExceeded, InProcessLimiter


async def test_user_then_account_limits_and_release() -> None:
    limiter = InProcessLimiter(max_per_user=2, max_per_account=3)
    assert isinstance(limiter, ConnectionLimiter)
    a1 = await limiter.acquire("s1", "alice", "acme")
    await limiter.acquire("s2", "alice", "acme")
    with pytest.raises(ConnectionLimitExceeded) as info:
        await limiter.acquire("s3", "alice", "acme")
    assert (info.value.scope, info.value.close_code, info.value.reason) == ("user", 4429, "connection_limit")
    await limiter.acquire("s4", "bob", "acme")
    with pytest.raises(ConnectionLimitExceeded) as info:
        await limiter.acquire("s5", "carol", "acme")
    assert info.value.scope == "account"
    assert limiter.count("alice", "acme") == (2, 3)
    await limiter.release(a1)
    await limiter.release(a1)  # idempotent
    assert limiter.count("alice", "acme") == (1, 2)
    await limiter.acquire("s6", "carol", "acme")
