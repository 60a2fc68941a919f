"""The documentation stays true: the configuration reference matches the schema, the README stays a short front
page with the set-up commands on its first screen, and every relative link in README.md and docs/ resolves.

The generator is scripts/config_reference.py, loaded from this checkout; nothing is written outside tmp_path.
"""

from __future__ import annotations

import importlib.util
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel, Field

from mllm.config.schema import ExperimentConfig, TrackingConfig

from .conftest import REPO

GENERATOR = REPO / "scripts" / "config_reference.py"
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SET_UP = ["bash scripts/main.sh", "bash scripts/test.sh"]  # the two commands; .ci/run runs the second
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mllm_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The config models inside an annotation such as `list[GroupRecipe] | None`."""
    args = typing.get_args(annotation)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)] + [
        m for a in args for m in models_in(a)
    ]


def keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config model, as the reference names it (`data.datasets[].name`, `merge.lambda`)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from keys(field.annotation, f"{key}.")
            continue
        yield key
        for entry in models_in(field.annotation):
            yield from keys(entry, f"{key}[].")


def test_the_committed_reference_matches_the_schema(generator: ModuleType) -> None:
    page = REPO / "docs" / "configuration.md"
    assert page.is_file(), "docs/configuration.md is missing; run: python scripts/config_reference.py"
    assert page.read_text() == generator.render(), (
        "docs/configuration.md differs from the schema in mllm/config/; rerun: python scripts/config_reference.py"
    )


def test_the_check_flag_fails_on_drift(generator: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    assert generator.main(["--out", str(page)]) == 0
    assert generator.main(["--check", "--out", str(page)]) == 0
    page.write_text(page.read_text().replace("`merge.density`", "`merge.thickness`"))
    assert generator.main(["--check", "--out", str(page)]) == 1
    assert generator.main(["--check", "--out", str(tmp_path / "absent.md")]) == 1


def test_the_reference_lists_every_key(generator: ModuleType) -> None:
    page = generator.render()
    every = list(keys(ExperimentConfig))
    assert {"name", "data.datasets[].preset", "data.sentiment_cuts.rating10", "merge.lambda",
            "merge.groups[].filters", "promote.split"} <= set(every)
    missing = [key for key in every if f"| `{key}` |" not in page]
    assert not missing, f"keys of the schema missing from the reference: {missing}"


def test_a_new_field_appears_with_its_description(generator: ModuleType) -> None:
    class Tracking(TrackingConfig):
        retention_days: int = Field(30, ge=1, description="Days a finished run is kept.")

    class Experiment(ExperimentConfig):
        tracking: Tracking = Field(default_factory=Tracking)

    before, after = generator.render(ExperimentConfig), generator.render(Experiment)
    row = "| `tracking.retention_days` | int (>= 1) | `30` | Days a finished run is kept. |"
    assert row not in before and row in after.splitlines()


def test_literal_choices_and_defaults_are_spelled_out(generator: ModuleType) -> None:
    rows = {line.split(" | ")[0]: line for line in generator.render().splitlines() if line.startswith("| `")}
    assert "one of `best`, `crossfit`, `one_se`, `nll` | `best` |" in rows["| `search.choice`"]
    assert "| `[4, 6]` |" in rows["| `data.sentiment_cuts.rating10`"]
    assert '| `[{"preset": "drugscom-sample"}]` |' in rows["| `data.datasets`"]


def test_readme_is_a_short_front_page_with_the_set_up_commands_first() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail to docs/ (at most 260)"
    first_screen = "\n".join(lines[:40])
    for command in SET_UP:
        assert command in first_screen, f"README.md's first 40 lines lack the set-up command `{command}`"


def links(markdown: str) -> list[str]:
    """The targets of a page's links and images, code blocks and code spans left out (`x[i](y)` is code)."""
    prose = CODE_SPAN.sub("", CODE_BLOCK.sub("", markdown))
    return LINK.findall(prose)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats
    numbered (`## Data: sources` -> `data-sources`, a second `## Data` -> `data-1`)."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", CODE_BLOCK.sub("", markdown), re.M):
        slug = candidate = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        repeat = 0
        while candidate in found:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        found.add(candidate)
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` to a missing file, or to a heading the target page lacks."""
    broken = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)} links to missing files or headings: {broken}"


def test_the_link_check_catches_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## Member recipe: the pilot behind `configs/default.yaml`\n")
    page = tmp_path / "page.md"
    page.write_text("## Here\n[ok](other.md#member-recipe-the-pilot-behind-configsdefaultyaml) [self](#here)\n"
                    "[gone](missing.md) [no heading](other.md#nowhere) [web](https://example.org/x)\n")
    assert broken_links(page) == ["missing.md", "other.md#nowhere (no such heading)"]
    assert anchors("## A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_the_link_scan_sees_links() -> None:
    text = (
        "[a](docs/x.md) ![fig](results/y.png) [web](https://example.org) [here](#top) [t](z.md \"title\")\n"
        "`frame[i](j)` and\n```python\nmodel[0](x)\n```\n[`code` text](docs/w.md)\n"
    )
    assert links(text) == ["docs/x.md", "results/y.png", "https://example.org", "#top", "z.md", "docs/w.md"]
