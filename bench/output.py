"""What every study writes: ``<stem>.json`` (or ``.json.gz``: every number, the machine and the
command) beside ``<stem>.md`` (the tables), and the figures those tables share.

JSON is indented, except that a list of plain values is written on one line: per-sample data
(thousands of test images per row) stays a handful of lines. Studies that keep per-sample data
write ``.json.gz``; ``load_json`` reads either.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Optional, Sequence

from tabulate import tabulate

from turbo_fx.bench import timing

_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, tuples and sets as JSON knows them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any, depth: int = 0) -> str:
    """``value`` as JSON, indented by one space per level, lists of plain values on one line."""
    value = value if isinstance(value, (dict, list, *_SCALARS)) else _plain(value)
    pad = " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if isinstance(value, list) and value and not all(isinstance(v, _SCALARS) for v in value):
        return "[\n" + ",\n".join(pad + dumps(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value, separators=(",", ":") if isinstance(value, list) else None, default=_plain)


def save_json(payload: dict, path: str) -> str:
    """Write ``payload`` to ``path``; gzip-compressed (reproducibly: no time stamp) for ``.gz``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = (dumps(payload) + "\n").encode()
    if path.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


def load_json(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def write(payload: dict, out: str, stem: str, render: Callable[[dict], str], compress: bool = False,
          quiet: bool = False) -> tuple[str, str]:
    """``<out>/<stem>.json`` (``.json.gz`` with ``compress``) and ``<stem>.md`` (``render(payload)``),
    the tables printed unless ``quiet``; returns both paths."""
    json_path = save_json(payload, os.path.join(out, stem + (".json.gz" if compress else ".json")))
    text = render(payload)
    md_path = os.path.join(out, stem + ".md")
    with open(md_path, "w") as f:
        f.write(text)
    if not quiet:
        print(text)
        timing.log(f"wrote {json_path} and {md_path}")
    return json_path, md_path


# --------------------------------------------------------------------------- markdown
def header(title: str, payload: dict, *lines: str) -> list[str]:
    """The title, the machine and the command, then ``lines`` (a paragraph each)."""
    out = [f"# {title}", "", f"Machine: {timing.machine_line(payload['machine'])}.",
           f"Command: `{payload.get('command', '')}`", ""]
    for line in lines:
        out += [line, ""]
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table of already formatted cells."""
    return tabulate([[str(c) for c in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True)


def f(value: Optional[float], spec: str, missing: str = "-") -> str:
    """``value`` formatted, or ``missing`` for None."""
    return missing if value is None else format(value, spec)


def speedup(v: Optional[dict], spec: str = ".2f", unit: str = "x") -> str:
    """``1.62x [1.57, 1.67]`` from ``stats.speedup_interval``'s dict."""
    return "-" if not v else f"{v['speedup']:{spec}}{unit} [{v['low']:{spec}}, {v['high']:{spec}}]"


def p_value(p: float) -> str:
    # Below 0.001 the exact value says nothing more (and a bootstrap p cannot resolve it).
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def difference(c, digits: int = 4, scale: float = 1.0) -> str:
    """``+0.0020 [-0.0035, +0.0075]`` for a ``stats.Comparison`` (or a dict with the same keys)."""
    get = c.get if isinstance(c, dict) else lambda k: getattr(c, k)
    return (f"{scale * get('difference'):+.{digits}f} [{scale * get('low'):+.{digits}f}, "
            f"{scale * get('high'):+.{digits}f}]")


def tokens(per_block: Optional[Sequence[int]]) -> str:
    """``257→65``: tokens entering the first block → the last; ``-`` when unknown."""
    if not per_block:
        return "-"
    return f"{per_block[0]}→{per_block[-1]}" if len(per_block) > 1 else str(per_block[0])


def file_stem(name: str) -> str:
    """A model or study name as a file name stem (``timm:vit_base`` -> ``timm_vit_base``)."""
    return name.replace(":", "_").replace("/", "_")


def render_markdown(path: str, markdown) -> str:
    """Rewrite the markdown beside a result JSON from the JSON alone, with the study's ``markdown``."""
    text = markdown(load_json(path))
    with open(path.removesuffix(".gz").removesuffix(".json") + ".md", "w") as f:
        f.write(text)
    return text
