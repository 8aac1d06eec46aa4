"""The kit's summary per property and its JUnit XML (docs/conformance.md, "Reports"); for a
cluster target, also where the client actions went (docs/conformance.md, "Several nodes")."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .kit import KitResult, summary
from .properties import PROPERTIES


def text_summary(result: KitResult, target: str) -> str:
    lines = [f"pipeproof conform {target}: {result.examples} examples, {result.actions} client actions "
             f"in {result.seconds:.1f}s"]
    for name, verdict, n in summary(result):
        lines.append(f"  {verdict:<14} {name:<34} {n:>6} checks   (section {PROPERTIES[name].section})")
    if len(result.nodes) > 1:
        lines.append(f"  sessions per node (seed {result.seed}):")
        for node, url, sessions, requests in node_rows(result):
            lines.append(f"    node {node} {url}: {sessions} sessions, {requests} HTTP requests")
        lines.append(f"  resumes after a drop: {result.resumes_after_drop}, on another node: {result.resumes_moved}")
    if result.random_seed is not None:
        lines.append(f"  random search, seed {result.random_seed} (replay it: --random-seed {result.random_seed})")
    if result.violation is not None:
        lines.append("")
        lines.append("VIOLATION " + result.violation.render())
        if result.random_seed is not None:
            lines.append(f"reproduce: --random-seed {result.random_seed} (with the same --examples and --steps)")
    else:
        lines.append("ok: every observation was a behaviour the model allows")
    return "\n".join(lines)


def node_rows(result: KitResult) -> list[tuple[int, str, int, int]]:
    """(node number from 1, URL, sessions opened on it, HTTP requests sent to it) per node."""
    return [(i + 1, url, result.sessions[i], result.http_requests[i]) for i, url in enumerate(result.nodes)]


def write_junit(result: KitResult, path: Path, target: str) -> None:
    rows = summary(result)
    suite = ET.Element("testsuite", name="pipeproof-conform", tests=str(len(rows)),
                       failures=str(sum(1 for r in rows if r[1] == "FAIL")),
                       skipped=str(sum(1 for r in rows if r[1] == "not exercised")),
                       time=f"{result.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="target", value=target)
    if len(result.nodes) > 1:
        ET.SubElement(props, "property", name="seed", value=str(result.seed))
        for node, url, sessions, requests in node_rows(result):
            ET.SubElement(props, "property", name=f"node.{node}.url", value=url)
            ET.SubElement(props, "property", name=f"node.{node}.sessions", value=str(sessions))
            ET.SubElement(props, "property", name=f"node.{node}.http_requests", value=str(requests))
        ET.SubElement(props, "property", name="resumes_after_drop", value=str(result.resumes_after_drop))
        ET.SubElement(props, "property", name="resumes_moved", value=str(result.resumes_moved))
    for name, verdict, n in rows:
        case = ET.SubElement(suite, "testcase", classname="pipeproof.conform", name=name)
        case.set("time", "0")
        if verdict == "FAIL" and result.violation is not None:
            fail = ET.SubElement(case, "failure", message=result.violation.observed[:300], type=name)
            fail.text = result.violation.render()
        elif verdict == "not exercised":
            ET.SubElement(case, "skipped", message="no observation exercised this property")
        else:
            ET.SubElement(case, "system-out").text = f"{n} checks"
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


__all__ = ["node_rows", "text_summary", "write_junit"]
