"""The kit's summary per property and its JUnit XML (docs/conformance.md, "Reports")."""

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
    if result.violation is not None:
        lines.append("")
        lines.append("VIOLATION " + result.violation.render())
    else:
        lines.append("ok: every observation was a behaviour the model allows")
    return "\n".join(lines)


def write_junit(result: KitResult, path: Path, target: str) -> None:
    rows = summary(result)
    suite = ET.Element("testsuite", name="pipeproof-conform", tests=str(len(rows)),
                       failures=str(sum(1 for r in rows if r[1] == "FAIL")),
                       skipped=str(sum(1 for r in rows if r[1] == "not exercised")),
                       time=f"{result.seconds:.3f}")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="target", value=target)
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


__all__ = ["text_summary", "write_junit"]
