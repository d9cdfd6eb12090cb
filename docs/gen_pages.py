"""Pages of the documentation site generated at build time (mkdocs-gen-files), so that they
cannot drift from what they describe:

- ``reference/cli.md``: every ``medfcn`` command's usage, arguments and options, read from the
  Typer app itself (``medfcn.cli.app``);
- ``models/<bundle>.md``: one card per shipped bundle (``bundles/*``), from its
  ``configs/metadata.json``, ``configs/common.json``, ``LICENSE`` and ``docs/README.md``;
- the settings table of ``reference/bundle-format.md`` (at its marker): what ``medfcn train``
  accepts for each setting (``medfcn.settings.RULES``) and the shipped bundles' values.

Run by ``mkdocs build`` / ``mkdocs serve`` (``mkdocs.yml``: ``plugins: gen-files``); the pages
are written into the build only, never into ``docs/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import mkdocs_gen_files
import typer

from medfcn.cli import app
from medfcn.settings import RULES

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
SETTINGS_MARKER = "<!-- medfcn: settings table -->"


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
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = click.Context(command, info_name=f"medfcn {name}", parent=root)
        usage = " ".join(["medfcn", name, *command.collect_usage_pieces(ctx)])
        lines += [f"## `medfcn {name}`", "", command.help or "", "", "```console", usage, "```", ""]
        lines += ["| argument or option | meaning |", "| --- | --- |", *_parameter_rows(command, ctx), ""]
    return "\n".join(lines)


def _first_line(path: Path) -> str:
    """The first non-empty line of a text file, or an empty string where there is none."""
    if not path.is_file():
        return ""
    return next((line.strip() for line in path.read_text().splitlines() if line.strip()), "")


def _performance_rows(performance: dict) -> list[str]:
    """Table rows of a bundle's ``metadata.json`` ``performance``: its held-out scores and how
    they were measured (per-case lists left out)."""
    rows = []
    for key, value in performance.items():
        if isinstance(value, (dict, list)):
            continue
        rows.append(f"| {_cell(key.replace('_', ' '))} | {_text(str(value))} |")
    return rows


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
        f"| licence | {_cell(_first_line(bundle / 'LICENSE'))} (`bundles/{bundle.name}/LICENSE`) |",
        *_performance_rows(meta.get("performance", {})),
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
    """The top-level entries of a bundle's training configs as ``medfcn train`` merges them
    (``common.json``, then ``train.json``, then ``multi_gpu_train.json``)."""
    merged: dict = {}
    for name in ("common.json", "train.json", "multi_gpu_train.json"):
        path = bundle / "configs" / name
        if path.is_file():
            merged.update(json.loads(path.read_text()))
    return merged


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


def main() -> None:
    with mkdocs_gen_files.open("reference/cli.md", "w") as page:
        page.write(command_page(typer.main.get_command(app)))
    for bundle in BUNDLES:
        with mkdocs_gen_files.open(f"models/{bundle.name}.md", "w") as page:
            page.write(model_card(bundle))
    with mkdocs_gen_files.open("reference/bundle-format.md", "w") as page:
        page.write(bundle_format_page())


main()
