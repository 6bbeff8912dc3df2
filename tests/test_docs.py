"""The documentation matches the code: config reference, schema keys, and quoted commands.

- ``docs/configuration.md`` is generated from the pydantic schemas by
  ``scripts/gen_config_reference.py``; it must be up to date and name every key.
- Every ``fewlabel <command>`` quoted in code in the README and ``docs/`` must be a real
  subcommand, and every ``--option`` after it an option of that subcommand, so that a renamed
  option cannot leave the documentation describing commands that fail.
- Relative links between the pages must point at files that exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from _factories import load_script
from fewlabel.cli import build_parser
from fewlabel.config.classification import ClassificationExperiment
from fewlabel.config.segmentation import SegmentationExperiment

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CONFIG_REFERENCE = DOCS / "configuration.md"


def _generator():
    return load_script("gen_config_reference")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _subcommands() -> dict[str, set[str]]:
    """Subcommand name → its option strings, from the real parser."""
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {
        name: {opt for a in sub._actions for opt in a.option_strings}
        for name, sub in action.choices.items()  # type: ignore[attr-defined]
    }


def _code_texts(markdown: str) -> list[str]:
    """Fenced code blocks (with line continuations joined) and inline code spans."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    texts = [b.replace("\\\n", " ") for b in blocks]
    texts += re.findall(r"`([^`\n]+)`", prose)
    return texts


_COMMAND = re.compile(r"(?:^|[\s/(])fewlabel[ \t]+([a-z][a-z-]*)([^\n;|&]*)", flags=re.M)


def _quoted_commands(markdown: str) -> list[tuple[str, list[str]]]:
    """``(subcommand, options)`` of every ``fewlabel <word> ...`` inside code."""
    found = []
    for text in _code_texts(markdown):
        for match in _COMMAND.finditer(text):
            rest = match.group(2).split("#", 1)[0]
            try:
                tokens = shlex.split(rest)
            except ValueError:
                tokens = rest.split()
            options = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
            found.append((match.group(1), options))
    return found


def test_config_reference_is_up_to_date():
    expected = _generator().render()
    assert CONFIG_REFERENCE.is_file(), "docs/configuration.md is missing; run scripts/gen_config_reference.py"
    assert CONFIG_REFERENCE.read_text(encoding="utf-8") == expected, (
        "docs/configuration.md is out of date; run .venv/bin/python scripts/gen_config_reference.py"
    )


@pytest.mark.parametrize(
    "schema", [ClassificationExperiment, SegmentationExperiment], ids=["classification", "segmentation"]
)
def test_config_reference_names_every_key(schema):
    text = CONFIG_REFERENCE.read_text(encoding="utf-8")
    keys = list(_generator().walk_keys(schema))
    assert "train.checkpoint.keep_last" in keys  # nested sections are walked
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_generator_reads_attribute_docstrings_and_bounds():
    gen = _generator()
    from fewlabel.config.segmentation import TCSMConfig

    docs = gen.attribute_docs(TCSMConfig)
    assert set(docs) == set(TCSMConfig.model_fields), "every TCSM key has an Attributes entry"
    assert docs["rampup_iterations"].startswith("the weight ramps as exp(−5(1 − t)²)")
    assert gen.allowed(TCSMConfig.model_fields["ema_decay"]) == "0.0 ≤ x ≤ 1.0"
    assert gen.allowed(TCSMConfig.model_fields["consistency_loss"]) == "`mse`, `kl`, `ce`"
    assert gen.allowed(TCSMConfig.model_fields["unlabeled_batch_size"]) == "≥ 1"


def test_command_parser_finds_commands_and_options():
    text = (
        "Run `fewlabel train cfg.yaml --set a=1` or\n\n```bash\n"
        "fewlabel evaluate --pred p --gt g \\\n    --merge infection=1,2 --output out  # a comment --nope\n"
        "fewlabel: error: not a command\n# puts `fewlabel` on the PATH, or .venv/bin/fewlabel\n```\nfewlabel never writes into your data.\n"
    )
    assert sorted(_quoted_commands(text)) == [
        ("evaluate", ["--pred", "--gt", "--merge", "--output"]),
        ("train", ["--set"]),
    ]


def test_every_documented_command_and_option_exists():
    commands = _subcommands()
    assert {"train", "evaluate", "predict", "demo", "convert", "export"} <= set(commands)
    problems = []
    seen = 0
    for page in _pages():
        for name, options in _quoted_commands(page.read_text(encoding="utf-8")):
            seen += 1
            if name not in commands:
                problems.append(f"{page.name}: `fewlabel {name}` is not a subcommand")
                continue
            problems.extend(
                f"{page.name}: `fewlabel {name}` has no option {opt}"
                for opt in options
                if opt not in commands[name] | {"--help"}
            )
    assert seen > 20, "the documentation should quote the commands it describes"
    assert not problems, "\n".join(problems)


# Pages that are linked before they exist: the label-efficiency results are measured on real
# data and written up separately from the user guide.
_PAGES_WRITTEN_SEPARATELY = {DOCS / "results.md"}


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (outside code blocks)."""
    text = re.sub(r"^```[^\n]*\n.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_relative_links_point_at_existing_files_and_headings():
    broken, pending = [], set()
    for page in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (page.parent / file_part).resolve() if file_part else page
            if not path.exists():
                if path in _PAGES_WRITTEN_SEPARATELY:
                    pending.add(path.name)
                else:
                    broken.append(f"{page.name}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"
    if pending:
        pytest.skip(f"linked pages not written yet: {sorted(pending)}")
