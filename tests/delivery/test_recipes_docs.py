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
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
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


# ---- doctor's lines as the pages quote them ---------------------------------------------------

DOCTOR_LINE = re.compile(r"^(ok|warn|fail|skip)\s+(\S+)\s+(.+)$")


def quoted_doctor_lines() -> list[tuple[str, str, str, str]]:
    """(page, status, check, detail) of every doctor line in the pages' plain code blocks."""
    found = []
    for page in sorted(PAGES):
        for lang, body in fences(page):
            if lang:
                continue
            for line in body.splitlines():
                m = DOCTOR_LINE.match(line)
                if m:
                    found.append((page, m.group(1), m.group(2), m.group(3)))
    return found


def doctor_checks_behind_the_pages() -> set[tuple[str, str, str]]:
    """What doctor's judgments say for the situations the pages describe (their example ids
    and addresses), as (status, check, detail)."""
    from ipaddress import IPv4Address, IPv4Network

    from gatepeer.aws.ec2 import IngressRule
    from gatepeer.doctor import closed as c
    from gatepeer.doctor.aws import run as aws_checks
    from gatepeer.doctor.judgments import judge_path_mtu, judge_underlay_mtu
    from gatepeer.kernel.pmtu import PathProbe

    net = IPv4Network
    table_id, peer = "rtb-0cccccccccccccccc", IPv4Address("10.0.1.10")
    s3_name = "com.amazonaws.ap-northeast-1.s3"
    s3_list = "pl-61a54008"
    # S3's ranges in the region: the first as the page names it, and eleven more.
    s3 = (net("52.219.0.0/16"), *(net(f"3.5.{i * 16}.0/20") for i in range(11)))
    local = c.TableRoute("local", destination=net("10.0.0.0/16"))
    nat = c.TableRoute("nat-0bbbbbbbbbbbbbbbb", destination=net("0.0.0.0/0"))
    gateway = c.TableRoute("vpce-0aaaaaaaaaaaaaaaa", prefix_list_id=s3_list)
    with_endpoint = c.RouteTable(table_id, (local, gateway, nat), {s3_list: s3})
    without = c.RouteTable(table_id, (local, nat))
    other_region = "com.amazonaws.us-west-2.s3"
    gone = "vpce-0d4d4d4d4d4d4d4d4"
    destinations = [
        (with_endpoint, c.Destination(s3_name, s3)),
        (without, c.Destination(s3_name, s3)),
        (
            with_endpoint,
            c.Destination(
                other_region,
                error=f"{other_region}: no managed prefix list has this name in this region (an "
                "AWS-managed list exists only in its own region: S3 endpoints are same-region "
                "only)",
                missing=True,
            ),
        ),
        (with_endpoint, c.Destination("vpce-0a1a1a1a1a1a1a1a1", (net("10.0.1.20/32"),))),
        (with_endpoint, c.Destination(gone, (net("10.0.1.30/32"),))),
        (
            with_endpoint,
            c.Destination(
                gone,
                error=f"{gone}: DescribeVpcEndpoints: InvalidVpcEndpointId.NotFound: The "
                f"VpcEndpoint Id '{gone}' does not exist",
                missing=True,
            ),
        ),
    ]
    checks = [c.judge_destination(t, d) for t, d in destinations]

    def endpoint(vpce: str, service: str, group: str, dns: bool = True) -> c.Endpoint:
        name = f"com.amazonaws.ap-northeast-1.{service}"
        return c.Endpoint(vpce, "Interface", name, "available", dns, (group,))

    ssm = [
        endpoint("vpce-0a1a1a1a1a1a1a1a1", "ssm", "sg-0aaaaaaaaaaaaaaa"),
        endpoint("vpce-0b2b2b2b2b2b2b2b2", "ssmmessages", "sg-0ddddddddddddddd"),
        endpoint("vpce-0c3c3c3c3c3c3c3c3", "ec2messages", "sg-0aaaaaaaaaaaaaaa"),
    ]
    # IoT Core's data endpoint: AWS gives it no private DNS (a private hosted zone does).
    iot = [endpoint(gone, "iot.data", "sg-0eeeeeeeeeeeeeeee", dns=False)]
    admits = IngressRule("sg-0aaaaaaaaaaaaaaa", "tcp", 443, 443, (net("10.0.1.10/32"),))
    everyone = [admits, *(IngressRule(g, "tcp", 443, 443, (net("10.0.0.0/16"),))
                          for g in ("sg-0ddddddddddddddd", "sg-0eeeeeeeeeeeeeeee"))]  # fmt: skip

    def groups(endpoints: list[c.Endpoint], rules: list[IngressRule]) -> c.Check:
        return c.judge_endpoint_groups(
            endpoints, rules, mode="nat", peer=peer, peer_groups=(), device_subnet=None
        )

    resolver = c.Resolver("rslvr-in-0123456789abcdef0", "INBOUND", "OPERATIONAL", "vpc-0")
    off = [endpoint("vpce-0a1a1a1a1a1a1a1a1", "ssm", "sg-0aaaaaaaaaaaaaaa", dns=False)]
    checks += [
        groups([], everyone),
        groups(ssm, everyone),
        groups(ssm, [admits]),
        groups(iot, everyone),
        groups(iot, [admits]),
        c.judge_endpoint_dns(ssm, True, True),
        c.judge_endpoint_dns(off, True, True),
        c.judge_endpoint_dns(iot, True, True),
        c.judge_endpoint_dns(iot, True, True, ["iot.ap-northeast-1.amazonaws.com."]),
        c.judge_resolver(ssm, [resolver]),
        c.judge_resolver(ssm, []),
        c.judge_resolver(ssm[:2], [resolver]),
        c.judge_resolver(iot, []),
    ]
    # Off EC2 (outside-aws.md): the MTU checks, and the AWS ones skipped.
    door = IPv4Address("100.64.10.1")
    checks += [
        judge_underlay_mtu("eth0", 1500, 1350),
        judge_underlay_mtu("eth0", 1500, "auto"),
        judge_path_mtu(PathProbe(door, 1400, answered=True), 1350),
        judge_path_mtu(PathProbe(door, 1500, reported_mtu=1400), 1450),
    ]

    class NotEc2:
        def on_ec2(self) -> bool:
            return False

    closed_config = cfg.parse(
        tomllib.loads(filled(recipe_toml("outside-aws.md")))
    )  # closed = true: the closed-network checks are listed, skipped
    checks += aws_checks(
        closed_config,
        NotEc2(),
        endpoints=(),
        device_subnet=None,
        ssm_read=None,  # type: ignore[arg-type]
    )
    return {(ch.status, ch.name, ch.detail) for ch in checks}


def test_the_pages_quote_doctor_as_it_speaks() -> None:
    quoted = quoted_doctor_lines()
    assert {page for page, *_ in quoted} == set(PAGES), "a recipe page quotes no doctor line"
    said = doctor_checks_behind_the_pages()
    wrong = [line for line in quoted if line[1:] not in said]
    assert not wrong, "doctor does not say these lines as the pages quote them:\n" + "\n".join(
        " ".join(line) for line in wrong
    )


def test_the_stack_parameters_the_pages_name_exist() -> None:
    template = (REPO / "deploy" / "cloudformation" / "gatepeer.yaml").read_text()
    # From "Parameters:" to the next top-level key.
    block = re.split(r"^\S", template.split("\nParameters:\n", 1)[1], maxsplit=1, flags=re.M)[0]
    parameters = set(re.findall(r"^  ([A-Za-z0-9]+):$", block, re.M))
    assert {"S3GatewayEndpoint", "SsmEndpoints", "InboundResolver"} <= parameters
    for page in PAGES:
        named = set(re.findall(r"\b([A-Z][A-Za-z0-9]+)=", (RECIPES / page).read_text()))
        named -= {"Name", "Values"}  # the AWS CLI's --filters, not the stack's
        assert named <= parameters, (
            f"{page} names stack parameters the stack lacks: {named - parameters}"
        )
