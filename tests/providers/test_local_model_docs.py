"""docs/local-model.md's mesh file snippets load (so they cannot rot), and the README
links the page."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from mesh.config import config_from_dict
from tests.meshtest import REPO

DOC = REPO / "docs" / "local-model.md"


def snippets() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if b.startswith("# mesh file")]


def test_the_page_has_snippets_and_the_readme_links_it() -> None:
    assert len(snippets()) == 2
    assert "(docs/local-model.md)" in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("index", [0, 1])
def test_each_snippet_loads_as_a_mesh_file(index: int) -> None:
    raw: dict[str, Any] = yaml.safe_load(snippets()[index])
    config = config_from_dict(raw, source=f"{DOC}#snippet{index}")
    assert config.agents
    kinds = {agent.provider.kind for agent in config.agents.values()}
    assert kinds <= {"llama_cpp", "openai_compatible"}


def test_a_misspelt_option_in_a_snippet_would_fail() -> None:
    """The check can fail: provider options are validated when the file loads."""
    raw: dict[str, Any] = yaml.safe_load(snippets()[1])
    raw["agents"]["writer"]["provider"]["base_ur1"] = "http://127.0.0.1:8000/v1"
    with pytest.raises(Exception, match="base_ur1"):
        config_from_dict(raw)
