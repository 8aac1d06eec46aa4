"""Who the sessions and users are, and the bounds, as Z3 terms (docs/proofs.md, "two universes").

*Symbolic* (the proofs): ``Session`` and ``User`` are uninterpreted sorts, ``owner`` an
uninterpreted function, every bound an ``Int`` constant with only its documented positivity
assumption. *Finite* (BMC, traces, the cross-check with the explorer): a scenario's bounds, with
sessions and users as enum sorts and every quantifier expanded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import z3

from pipeproof.model.check.z3enc import Term, enum_sort
from pipeproof.model.system import Bounds


@dataclass
class Universe:
    """Who the sessions and users are, and the bounds, as Z3 terms (see module docstring)."""

    symbolic: bool
    S: Term
    U: Term
    sessions: tuple[Term, ...] = ()
    users: tuple[Term, ...] = ()
    owner_fn: Term = None
    K: Term = None  # events per user's stream
    max_account: Term = None
    params: dict[str, Term] = field(default_factory=dict)  # symbolic machine parameters
    assumptions: list[Term] = field(default_factory=list)
    bounds: Bounds | None = None
    k_int: int = 0
    _owner_of: tuple[int, ...] = ()
    # Nodes are Ints 0 .. N-1 in both universes (a lease holds one, or -1: free).
    N: Term = None
    node_fn: Term = None  # symbolic: Session -> Int, the node a session is on
    home_fn: Term = None  # symbolic: User -> Int, the node the user's run starts on
    n_int: int = 1

    @classmethod
    def symbolic_universe(cls) -> Universe:
        """Any number of users, sessions and events; bounds unconstrained except positivity."""
        S, U = z3.DeclareSort("Session"), z3.DeclareSort("User")
        p = {n: z3.Int(n) for n in ("buffer_max", "error_budget", "max_connections_per_user", "max_attempts",
                                    "ack_timeout", "resume_window", "horizon", "max_steps")}
        K, acct = z3.Int("events_per_user"), z3.Int("max_connections_per_account")
        N = z3.Int("nodes")
        node_fn, home_fn = z3.Function("node_of", S, z3.IntSort()), z3.Function("run_home", U, z3.IntSort())
        s, u = z3.Const("s!node", S), z3.Const("u!home", U)
        assumptions = [
            N >= 1, z3.ForAll([s], z3.And(node_fn(s) >= 0, node_fn(s) < N)),
            z3.ForAll([u], z3.And(home_fn(u) >= 0, home_fn(u) < N)),
            p["buffer_max"] >= 0, p["error_budget"] >= 0, p["max_connections_per_user"] >= 1, p["max_attempts"] >= 1,
            p["ack_timeout"] >= 0, p["resume_window"] >= 0, p["max_steps"] >= 0, K >= 2, acct >= 0,
            # Section 5's liveness horizon, derived exactly as delivery_machine derives it.
            p["horizon"] == p["max_attempts"] * p["ack_timeout"] + p["resume_window"],
        ]
        return cls(True, S, U, owner_fn=z3.Function("owner", S, U), K=K, max_account=acct, params=p,
                   assumptions=assumptions, N=N, node_fn=node_fn, home_fn=home_fn)

    @classmethod
    def finite_universe(cls, bounds: Bounds) -> Universe:
        """The scenario's instance: ``bounds.users`` users, ``sessions_per_user`` sessions each."""
        su = enum_sort(f"User{bounds.users}", [f"u{k}" for k in range(bounds.users)])
        ss = enum_sort(f"Session{bounds.users}x{bounds.sessions_per_user}",
                       [f"s{k}" for k in range(bounds.sessions)])
        owner_of = tuple(k // bounds.sessions_per_user for k in range(bounds.sessions))
        return cls(False, ss.sort, su.sort, sessions=ss.consts, users=su.consts, K=z3.IntVal(bounds.events_per_user),
                   max_account=z3.IntVal(bounds.max_connections_per_account), bounds=bounds,
                   k_int=bounds.events_per_user, _owner_of=owner_of, N=z3.IntVal(bounds.nodes), n_int=bounds.nodes)

    def owner(self, s: Term) -> Term:
        if self.symbolic:
            return self.owner_fn(s)
        out = self.users[self._owner_of[-1]]
        for k in range(len(self.sessions) - 2, -1, -1):
            out = z3.If(s == self.sessions[k], self.users[self._owner_of[k]], out)
        return out

    def node(self, s: Term) -> Term:
        """The node session ``s`` is on (model/system.py ``node_of``: s mod nodes)."""
        if self.symbolic:
            return self.node_fn(s)
        out = z3.IntVal((len(self.sessions) - 1) % self.n_int)
        for k in range(len(self.sessions) - 2, -1, -1):
            out = z3.If(s == self.sessions[k], z3.IntVal(k % self.n_int), out)
        return out

    def home(self, user: Term) -> Term:
        """The node ``user``'s run starts on (model/system.py ``run_home``)."""
        if self.symbolic:
            return self.home_fn(user)
        assert self.bounds is not None
        k = self.bounds.sessions_per_user
        out = z3.IntVal(((len(self.users) - 1) * k) % self.n_int)
        for j in range(len(self.users) - 2, -1, -1):
            out = z3.If(user == self.users[j], z3.IntVal((j * k) % self.n_int), out)
        return out

    def forall_node(self, body: Callable[[Term], Term], name: str = "n") -> Term:
        """``forall n in 0 .. N-1. body(n)``."""
        if self.symbolic:
            v = z3.Int(f"{name}!node")
            return z3.ForAll([v], z3.Implies(z3.And(v >= 0, v < self.N), body(v)))
        return z3.And([body(z3.IntVal(k)) for k in range(self.n_int)])

    def exists_node(self, body: Callable[[Term], Term], name: str = "n") -> Term:
        return z3.Not(self.forall_node(lambda n: z3.Not(body(n)), name))

    def forall(self, sort: str, body: Callable[..., Term], name: str = "x") -> Term:
        """``forall x: sort. body(x)``; ``sort`` is "S", "U" or "Int" (seq; finite: 1..K only,
        callers always guard seqs by ``1 <= i <= len``)."""
        if self.symbolic:
            v = z3.Const(f"{name}!{sort}", {"S": self.S, "U": self.U, "Int": z3.IntSort()}[sort])
            return z3.ForAll([v], body(v))
        dom = {"S": self.sessions, "U": self.users, "Int": [z3.IntVal(i) for i in range(1, self.k_int + 1)]}[sort]
        return z3.And([body(x) for x in dom])

    def exists(self, sort: str, body: Callable[..., Term], name: str = "x") -> Term:
        return z3.Not(self.forall(sort, lambda x: z3.Not(body(x)), name))


