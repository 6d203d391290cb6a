"""docs/recipes/: each recipe page carries a Mermaid diagram, a gatepeer config that gatepeer's
own loader accepts once its placeholders are filled (and refuses, naming them, while they are
not), the sections the issue asks for, and a lab test of its data path; the page off AWS uses
the non-EC2 cloud-init example. `mkdocs build --strict` checks the links (scripts/test.sh)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatepeer import config as cfg

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "docs" / "recipes"
LAB_TESTS = REPO / "tests" / "lab" / "test_recipes_lab.py"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
PLACEHOLDER = "REPLACE"

# page -> (the AWS names its allow-list must hold, the lab test that proves its data path)
PAGES = {
    "s3.md": (("com.amazonaws.ap-northeast-1.s3",), "test_s3_through_the_gateway_endpoint_only"),
    "ssm.md": (
        (
            "vpce-0a1a1a1a1a1a1a1a1",
            "vpce-0b2b2b2b2b2b2b2b2",
            "vpce-0c3c3c3c3c3c3c3c3",
            "com.amazonaws.ap-northeast-1.s3",
        ),
        "test_ssm_through_interface_endpoints_and_the_inbound_resolver",
    ),
    "iot-core.md": (
        ("vpce-0d4d4d4d4d4d4d4d4",),
        "test_iot_core_mqtt_and_websocket_through_the_iot_data_endpoint",
    ),
    "outside-aws.md": ((), "test_a_peer_outside_aws_from_the_non_ec2_example"),
}


def fences(page: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer((RECIPES / page).read_text())]


def recipe_toml(page: str) -> str:
    tomls = [body for lang, body in fences(page) if lang == "toml"]
    assert len(tomls) == 1, f"{page}: want exactly one ```toml config, found {len(tomls)}"
    return tomls[0]


def filled(text: str) -> str:
    """The config as a reader would fill it in: each placeholder given a value."""
    return text.replace(PLACEHOLDER, "filled")


def test_every_recipe_page_is_checked_and_in_the_nav() -> None:
    pages = sorted(p.name for p in RECIPES.glob("*.md") if p.name != "index.md")
    assert pages == sorted(PAGES)
    nav = (REPO / "mkdocs.yml").read_text()
    index = (RECIPES / "index.md").read_text()
    for page in [*PAGES, "index.md"]:
        assert f"recipes/{page}" in nav, f"mkdocs.yml nav lacks recipes/{page}"
    for page in PAGES:
        assert f"]({page})" in index, f"docs/recipes/index.md does not link {page}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_recipe_page_has_a_diagram_and_every_section(page: str) -> None:
    text = (RECIPES / page).read_text()
    mermaid = [body for lang, body in fences(page) if lang == "mermaid"]
    assert mermaid and mermaid[0].lstrip().startswith("flowchart"), f"{page}: no Mermaid diagram"
    for heading in ("## gatepeer", "## SORACOM", "## What doctor says", "## Traps"):
        assert f"\n{heading}" in text, f"{page}: no {heading!r} section"
    assert "\n## AWS" in text or "\n## Azure" in text, f"{page}: no section for the cloud side"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_recipe_config_loads_with_gatepeers_loader(page: str, tmp_path: Path) -> None:
    path = tmp_path / "gatepeer.toml"
    path.write_text(filled(recipe_toml(page)))
    loaded = cfg.load(path, check_system=False)
    pp = loaded.packet_path
    names, _test = PAGES[page]
    assert (pp.mode, pp.closed) == ("nat", True), page
    assert loaded.soracom.redirection == "self", page
    assert pp.allowed_names == names, page
    assert pp.allowed_destinations or pp.allowed_names, f"{page}: closed with nothing allowed"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_recipe_config_left_unfilled_is_refused_naming_the_keys(page: str) -> None:
    with pytest.raises(cfg.ConfigError) as refused:
        cfg.parse(tomllib.loads(recipe_toml(page)))
    assert "soracom.auth_key_id" in str(refused.value)
    assert "soracom.vpg_id" in str(refused.value)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_recipe_data_path_has_its_lab_test(page: str) -> None:
    _names, test = PAGES[page]
    assert f"def {test}(" in LAB_TESTS.read_text(), f"{page}: its lab test {test} is gone"


def non_ec2_example() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "cloud-init" / "non-ec2.yaml").read_text())
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    return tomllib.loads(files[str(cfg.DEFAULT_PATH)])


def test_outside_aws_recipe_is_the_non_ec2_example_with_a_closed_packet_path() -> None:
    example = non_ec2_example()
    recipe = tomllib.loads(recipe_toml("outside-aws.md"))
    assert recipe["soracom"] == example["soracom"]
    # The example's tunnel, but for the MTU Door's IPsec leaves.
    assert {k: v for k, v in recipe["tunnel"].items() if k != "mtu"} == {
        k: v for k, v in example["tunnel"].items() if k != "mtu"
    }
    # The VNet's address space as the example gives it: there is no IMDS to ask.
    assert recipe["packet_path"]["vpc_cidrs"] == example["packet_path"]["vpc_cidrs"]
    assert "aws" not in recipe, "off EC2 there is no [aws] to configure"
    assert "non-ec2.yaml" in (RECIPES / "outside-aws.md").read_text()
