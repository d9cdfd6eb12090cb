"""The documentation's ``medfcn`` commands name commands and options the CLI has.

Tutorials run (tests/test_tutorials.py), but many commands in the docs are shown, not run: cluster
launches, cheat-sheet lines over ``scans/``, the bundles' READMEs. Every ``medfcn <command>``
line in a fenced block of ``docs/``, the README and the bundles' READMEs is read here, its
command looked up in the Typer app and each ``--option`` in its options, so a renamed or removed
option fails here instead of on a reader's machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from medfcn.cli import app

from .conftest import REPO

# fenced blocks, also indented ones (in a list item): the closing fence at the opening's indent
FENCE = re.compile(r"^([ \t]*)```(\w+)[^\n]*\n(.*?)^\1```\s*$", re.MULTILINE | re.DOTALL)
# ``medfcn train`` at a line's start, after ``-m`` (torchrun) or after a shell ``&&``, ``;``, ``|``
COMMAND = re.compile(r"(?:^\s*|\s-m\s+|&&\s*|;\s*|\|\s*)medfcn\s+([a-z][\w-]*)(.*)$")
OPTION = re.compile(r"(?<![\w#/-])(--[a-z][\w-]*)")


def documentation_pages() -> list[Path]:
    return sorted([*(REPO / "docs").rglob("*.md"), REPO / "README.md", *(REPO / "bundles").glob("*/docs/README.md")])


def medfcn_commands(markdown: str) -> list[tuple[str, list[str]]]:
    """``(command, [--option, ...])`` of each ``medfcn`` command line in ``markdown``'s fenced
    blocks, continuation lines joined and ``# comments`` dropped."""
    found = []
    for _, _, body in FENCE.findall(markdown):
        for line in body.replace("\\\n", " ").splitlines():
            match = COMMAND.search(line)
            if match:
                arguments = re.split(r"\s#", match.group(2), maxsplit=1)[0]  # a shell comment
                found.append((match.group(1), OPTION.findall(arguments)))
    return found


def _options(command) -> set[str]:
    """Every option name of a command of the app (typer's click command; click itself is not a
    dependency of medfcn: typer may carry its own)."""
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


CLI = typer.main.get_command(app)
PAGES = documentation_pages()


def test_the_reader_finds_commands_options_and_skips_comments():
    page = (
        "```bash\nmedfcn infer b scans/ --out o/ [--tta]   # --not-this\n"
        "torchrun --nproc-per-node 2 -m medfcn train b \\\n    --set network_def#fusion=concat --epochs 3\n```\n"
        "```text\nmedfcn needs nothing here\n```\n"
        "- a list item:\n\n    ```bash\n    medfcn package run --out b --weights last\n    ```\n"
    )
    assert medfcn_commands(page) == [
        ("infer", ["--out", "--tta"]),
        ("train", ["--set", "--epochs"]),
        ("needs", []),
        ("package", ["--out", "--weights"]),
    ]


def test_the_docs_show_medfcn_commands():
    assert sum(len(medfcn_commands(p.read_text())) for p in PAGES) > 50


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_and_option_exists(page):
    wrong = []
    for command, options in medfcn_commands(page.read_text()):
        if command not in CLI.commands:
            wrong.append(f"medfcn {command}: no such command ({', '.join(sorted(CLI.commands))})")
            continue
        known = _options(CLI.commands[command]) | {"--help"}
        wrong += [f"medfcn {command} {option}: no such option" for option in options if option not in known]
    assert not wrong, f"{page.relative_to(REPO)}: " + "; ".join(wrong)


@pytest.mark.parametrize("bundle", sorted(REPO.glob("bundles/*/configs/metadata.json")), ids=lambda p: p.parts[-3])
def test_every_model_card_states_speed_dice_and_split(bundle):
    """The site's model cards (docs/gen_pages.py) show a bundle's ``performance`` as it stands:
    each shipped bundle states its held-out Dice, its split and its measured inference speed."""
    import json

    performance = json.loads(bundle.read_text())["performance"]
    assert "split" in performance and any(k.endswith("dice_mean") for k in performance)
    speed = performance["inference_speed"]
    assert {"model", "medfcn_infer", "measured_on", "command"} <= set(speed)
    assert speed["command"] == f"python bench/inference.py --bundle bundles/{bundle.parts[-3]}"
