"""MkDocs hook: the site shows the committed results as the package writes and formats them.

- Every file under ``results/`` is published at the same path in the site, so a page links a figure by its path
  in the repository (``../../results/pitfall/pitfall.png`` from ``docs/experiments/``), which works on GitHub too;
  such links are rewritten to the published copy.
- A line ``<!-- results-table: NAME -->`` becomes the table NAME (see ``TABLES``), made from the committed CSV by
  the formatter the command itself prints with. Markdown tables the commands write (``results/**/*.md``) are
  included with pymdownx.snippets instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import posixpath
import re
from collections import defaultdict
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
MARKER = re.compile(r"^<!-- results-table: ([\w-]+) -->$", re.MULTILINE)
LINK = re.compile(r"(\]\()([^)\s#]+)")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _typed(cls, row: dict[str, str]):
    """A dataclass row from a CSV row: each value converted by its field's annotation (``float | None`` etc.)."""
    values = {}
    for field in dataclasses.fields(cls):
        raw, kind = row[field.name], str(field.type)
        if raw == "" and "None" in kind:
            values[field.name] = None
        elif kind.startswith("float"):
            values[field.name] = float(raw)
        elif kind.startswith("int"):
            values[field.name] = int(raw)
        else:
            values[field.name] = raw
    return cls(**values)


def _modes() -> str:
    from parameternet.benchmark.modes import ModeRow, format_modes

    rows = [_typed(ModeRow, r) for r in _read(RESULTS / "benchmark" / "modes.csv")]
    return format_modes(rows, json.loads((RESULTS / "benchmark" / "modes.json").read_text()))


def _gpu() -> str:
    from parameternet.benchmark.gpu import GpuRow, format_gpu_table

    raw = _read(RESULTS / "benchmark" / "gpu.csv")
    tables = []
    for commit in dict.fromkeys(r["commit"] for r in raw):  # one table per code version, in the file's order
        runs = [r for r in raw if r["commit"] == commit]
        meta = dict(runs[0], commit=commit[:7], smoke=runs[0]["smoke"] == "True")
        tables.append(format_gpu_table([_typed(GpuRow, r) for r in runs], meta))
    return "\n\n".join(tables)


def _benchmark() -> str:
    from parameternet.benchmark.cpu import BenchmarkRow, format_table

    rows = [_typed(BenchmarkRow, r) for r in _read(RESULTS / "benchmark" / "benchmark.csv")]
    meta = json.loads((RESULTS / "benchmark" / "benchmark.json").read_text())
    return "```text\n" + format_table(rows, meta) + "\n```"


def _gpu_layers() -> str:
    """Milliseconds summed over ParameterNet-600M's distinct layer geometries, per kind, layout, precision and
    implementation (``static``: an ``nn.Conv2d`` of the same geometry)."""
    raw = _read(RESULTS / "benchmark" / "gpu_layers.csv")
    total: dict[tuple[str, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    layers: dict[str, set] = defaultdict(set)
    for r in raw:
        total[r["kind"], r["layout"], r["precision"]][r["impl"]] += float(r["ms"])
        layers[r["kind"]].add(tuple(r[k] for k in ("C", "O", "k", "stride", "groups", "H", "W")))
    impls = list(dict.fromkeys(r["impl"] for r in raw))
    lines = [
        "| kind (geometries) | layout | precision | " + " | ".join(impls) + " |",
        "|---|---|---|" + "---:|" * len(impls),
    ]
    for (kind, layout, precision), ms in total.items():
        cells = [f"{ms[i]:.1f}" if i in ms else "-" for i in impls]
        lines.append(f"| {kind} ({len(layers[kind])}) | {layout} | {precision} | " + " | ".join(cells) + " |")
    first = raw[0]
    lines += [
        "",
        f"Milliseconds per forward and backward, summed over the layer geometries; batch {first['batch']}, "
        f"{first['device']}, torch {first['torch']}, CUDA {first['cuda']}, commit {first['commit'][:7]}.",
    ]
    return "\n".join(lines)


TABLES = {"modes": _modes, "gpu": _gpu, "benchmark": _benchmark, "gpu-layers": _gpu_layers}


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            uri = path.relative_to(ROOT).as_posix()  # a table's .md is a page of its own, outside the nav
            files.append(File.generated(config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    def table(match: re.Match) -> str:
        if match.group(1) not in TABLES:
            raise ValueError(f"{page.file.src_uri}: no results table {match.group(1)!r}; known: {', '.join(TABLES)}")
        return TABLES[match.group(1)]()

    def link(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target:
            return match.group(0)
        in_repo = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page.file.src_uri), target))
        if not in_repo.startswith("results/"):
            return match.group(0)
        return match.group(1) + posixpath.relpath(in_repo, posixpath.dirname(page.file.src_uri) or ".")

    return LINK.sub(link, MARKER.sub(table, markdown))
