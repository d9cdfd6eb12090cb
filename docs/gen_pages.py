"""Pages of the documentation site generated at build time (mkdocs-gen-files), so that they
cannot drift from what they describe:

- ``reference/cli.md``: every ``medfcn`` command's usage, arguments and options, read from the
  Typer app itself (``medfcn.cli.app``);
- ``models/<bundle>.md``: one card per shipped bundle (``bundles/*``), from its
  ``configs/metadata.json``, ``configs/common.json``, ``LICENSE`` and ``docs/README.md``;
- the settings table of ``reference/bundle-format.md`` (at its marker): what ``medfcn train``
  accepts for each setting (``medfcn.settings.RULES``) and the shipped bundles' values;
- the condensed history at the top of ``experiments.md`` (at its marker): every row of its
  tables as number, what was tried, verdict and date, each cut to its first clause.

Run by ``mkdocs build`` / ``mkdocs serve`` (``mkdocs.yml``: ``plugins: gen-files``); the pages
are written into the build only, never into ``docs/``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import click
import mkdocs_gen_files
import typer

from medfcn.bundle import read_config
from medfcn.cli import app
from medfcn.settings import RULES

REPO = Path(__file__).resolve().parents[1]


def _shipped_bundles() -> list[Path]:
    """The bundles the repository ships (tracked by git), not one a user planned into
    ``bundles/``; every ``bundles/*`` where git is not there to ask."""
    found = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
    try:
        listed = subprocess.run(
            ["git", "ls-files", "bundles/*/configs/metadata.json"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return found
    tracked = {(REPO / name).parent.parent for name in listed}
    return [bundle for bundle in found if bundle in tracked]


BUNDLES = _shipped_bundles()
SETTINGS_MARKER = "<!-- medfcn: settings table -->"
HISTORY_MARKER = "<!-- medfcn: condensed history -->"
CLAUSE_ENDS = (" (", "; ", ": ", ". ", ", ")


def _cell(text: str | None) -> str:
    """``text`` for a Markdown table cell: one line, pipes escaped."""
    return " ".join((text or "").split()).replace("|", "\\|")


def _text(text: str | None) -> str:
    """Help text for a Markdown table cell: :func:`_cell`, with ``<`` and ``>`` shown as written
    (``datasets/<Task>/folds.json``), not taken as HTML."""
    return _cell(text).replace("<", "&lt;").replace(">", "&gt;")


def _parameter_rows(command: click.Command, ctx: click.Context) -> list[str]:
    """A table row per argument and option of ``command``: how it is written, what it does."""
    rows = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        if isinstance(param, click.Argument):  # as the usage line writes it
            names = param.name.upper() + ("..." if param.nargs != 1 else "")
        rows.append(f"| `{_cell(names)}` | {_text(text)} |")
    return rows


def command_page(group: click.Group) -> str:
    """The CLI reference: the app's help, then each command in the order ``medfcn --help`` lists them."""
    root = click.Context(group, info_name="medfcn")
    lines = [
        "# Command line",
        "",
        "Generated from the `medfcn` Typer app at build time: what `medfcn COMMAND --help` prints.",
        "`python -m medfcn ...` runs the same commands.",
        "",
        group.help or "",
        "",
    ]
    lines += ["| option of `medfcn` itself | meaning |", "| --- | --- |", *_parameter_rows(group, root), ""]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = click.Context(command, info_name=f"medfcn {name}", parent=root)
        usage = " ".join(["medfcn", name, *command.collect_usage_pieces(ctx)])
        lines += [f"## `medfcn {name}`", "", command.help or "", "", "```console", usage, "```", ""]
        lines += ["| argument or option | meaning |", "| --- | --- |", *_parameter_rows(command, ctx), ""]
    return "\n".join(lines)


def _licence(path: Path) -> str:
    """A bundle's ``LICENSE`` for its card: the code's terms (the first paragraph) and the
    weights' (the paragraph that starts "Model weights", which may differ: research use only);
    empty where there is no file."""
    if not path.is_file():
        return ""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()]
    weights = [p for p in paragraphs[1:] if p.startswith("Model weights")]
    return " ".join(paragraphs[:1] + weights)


def _shown(value) -> str:
    """A metadata value for a cell: a number or text as it is, a list or a mapping of them one
    level deep (``a: 1, b: 2``)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(_shown, value))
    return str(value)


def _performance_rows(performance: dict) -> list[str]:
    """Table rows of a bundle's ``metadata.json`` ``performance``: its held-out scores (per case
    too) and how they were measured."""
    return [f"| {_cell(key.replace('_', ' '))} | {_text(_shown(value))} |" for key, value in performance.items()]


def _demoted(markdown: str) -> str:
    """``markdown`` with every heading one level deeper, outside fenced code."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#+ ", line) else line)
    return "\n".join(out)


def model_card(bundle: Path) -> str:
    """One bundle's page: a card from its metadata, then its own ``docs/README.md``."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    common = json.loads((bundle / "configs" / "common.json").read_text())
    classes = ", ".join(common.get("class_names", []))
    rows = [
        f"| version | {_text(meta.get('version'))} |",
        f"| task | {_text(meta.get('task'))} |",
        f"| classes | background, {_cell(classes)} |",
        f"| data | {_text(meta.get('data_source'))} |",
        f"| data type | {_text(meta.get('data_type'))} |",
        f"| intended use | {_text(meta.get('intended_use'))} |",
        f"| licence | {_cell(_licence(bundle / 'LICENSE'))} (`bundles/{bundle.name}/LICENSE`) |",
        *_performance_rows(meta.get("performance", {})),
        *([f"| training command | {_text(meta['training_command'])} |"] if "training_command" in meta else []),
        f"| MONAI / PyTorch | {_text(meta.get('monai_version'))} / {_text(meta.get('pytorch_version'))} |",
    ]
    lines = [
        f"# {bundle.name}",
        "",
        _text(meta.get("description")),
        "",
        "```bash",
        f"medfcn infer bundles/{bundle.name} scans/ --out out/",
        "```",
        "",
        "| field | value |",
        "| --- | --- |",
        *rows,
        "",
        f"Generated at build time from `bundles/{bundle.name}/configs/metadata.json`; the bundle's own",
        "`docs/README.md` follows.",
        "",
    ]
    readme = bundle / "docs" / "README.md"
    if readme.is_file():
        lines.append(_demoted(readme.read_text()))
    return "\n".join(lines)


def _bundle_settings(bundle: Path) -> dict:
    """The training configs of a bundle merged as ``medfcn train`` merges them in several
    processes (``common.json``, ``train.json``, ``multi_gpu_train.json``; :func:`read_config`)."""
    names = ("common.json", "train.json", "multi_gpu_train.json")
    return read_config([bundle / "configs" / n for n in names if (bundle / "configs" / n).is_file()]).get()


def _value(value) -> str:
    """A config value for a table cell: compact JSON; an expression as ``(expression)``."""
    if isinstance(value, str) and value.startswith("$"):
        return "(expression)"
    return f"`{_cell(json.dumps(value, separators=(',', ':')))}`"


def settings_table() -> str:
    """Every setting ``medfcn train`` checks: what it accepts, and each shipped bundle's value."""
    bundles = [(b.name, _bundle_settings(b)) for b in BUNDLES]
    lines = [
        "| setting | accepts | " + " | ".join(name for name, _ in bundles) + " |",
        "| --- | --- | " + " | ".join("---" for _ in bundles) + " |",
    ]
    for key, rule in RULES.items():
        values = " | ".join(_value(config[key]) if key in config else "-" for _, config in bundles)
        lines.append(f"| `{key}` | {_text(rule.text.format(dims='2 or 3'))} | {values} |")
    return "\n".join(lines)


def bundle_format_page() -> str:
    """``docs/reference/bundle-format.md`` with its settings table filled in."""
    source = (REPO / "docs" / "reference" / "bundle-format.md").read_text()
    if SETTINGS_MARKER not in source:
        raise ValueError(f"docs/reference/bundle-format.md: lost its marker {SETTINGS_MARKER}")
    return source.replace(SETTINGS_MARKER, settings_table())


def _first_clause(text: str, limit: int = 100) -> str:
    """``text`` up to the end of its first clause within ``limit`` characters (else cut at a
    space, with an ellipsis), with its code spans closed."""
    ends = [text.find(mark, 15) for mark in CLAUSE_ENDS]
    cut = min([end for end in ends if 0 < end <= limit], default=-1)
    if cut < 0 and len(text) > limit:
        cut = text.rfind(" ", 0, limit)
    short = text if cut < 0 else text[:cut] + " ..."
    short += "`" if short.count("`") % 2 else ""  # a code span or bold text cut open is closed
    return short + ("**" if short.count("**") % 2 else "")


def condensed_history(markdown: str) -> str:
    """One table of every experiment row of ``experiments.md`` (``| # | what | result | ... |
    verdict | date |``), grouped under its section's title."""
    lines = ["| # | what was tried | result | verdict | when |", "| --- | --- | --- | --- | --- |"]
    section = None  # a section's title, written before its first row
    for line in markdown.splitlines():
        if line.startswith("## "):
            section = line[3:]
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) >= 5 and cells[0].isdigit():
            if section:
                lines.append(f"| | **{_cell(section)}** | | | |")
                section = None
            what, result, verdict = (_first_clause(c) for c in (cells[1], cells[2], cells[-2]))
            lines.append(f"| {cells[0]} | {what} | {result} | {verdict} | {cells[-1]} |")
    return "\n".join(lines)


def experiments_page() -> str:
    """``docs/experiments.md`` with the condensed history filled in at its marker."""
    source = (REPO / "docs" / "experiments.md").read_text()
    if HISTORY_MARKER not in source:
        raise ValueError(f"docs/experiments.md: lost its marker {HISTORY_MARKER}")
    return source.replace(HISTORY_MARKER, condensed_history(source))


def main() -> None:
    with mkdocs_gen_files.open("reference/cli.md", "w") as page:
        page.write(command_page(typer.main.get_command(app)))
    for bundle in BUNDLES:
        with mkdocs_gen_files.open(f"models/{bundle.name}.md", "w") as page:
            page.write(model_card(bundle))
    with mkdocs_gen_files.open("reference/bundle-format.md", "w") as page:
        page.write(bundle_format_page())
    with mkdocs_gen_files.open("experiments.md", "w") as page:
        page.write(experiments_page())


main()
