"""The [aws] section and soracom.auth_key_ssm_parameter: values, defaults, and one-line errors
that name the key; boto3 stays unimported for commands that do not need it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.config_files import SECRET, soracom_section, write_config, write_key

from gatepeer.config import DEFAULT_IMDS_ENDPOINT, ConfigError, load

PARAMETER = "/gatepeer/auth-key"


def ssm_soracom(**changes: str | None) -> str:
    """A [soracom] table that takes the key from SSM (no auth_key_file)."""
    values: dict[str, str | None] = {
        "auth_key_file": None,
        "auth_key_ssm_parameter": f'"{PARAMETER}"',
        **changes,
    }
    return soracom_section(Path("/unused"), **values)


def test_defaults_make_no_aws_feature(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key")
    cfg = load(write_config(tmp_path, soracom_section(key)))
    aws = cfg.aws
    assert aws.instance_facts is True
    # Not in the file: AWS_EC2_METADATA_SERVICE_ENDPOINT, else the default (gatepeer.aws.imds).
    assert aws.imds_endpoint is None and DEFAULT_IMDS_ENDPOINT == "http://169.254.169.254"
    assert aws.route_tables == () and aws.remove_stale_registrations is False
    assert aws.imds_timeout == 1.0
    assert not aws.any_api_feature
    assert cfg.soracom.auth_key_ssm_parameter is None and cfg.soracom.auth_key_file == key


def test_full_aws_section(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key")
    text = soracom_section(key) + (
        "[aws]\n"
        "instance_facts = false\n"
        'imds_endpoint = "http://127.0.0.1:8111/"\n'
        'imds_timeout = "250ms"\n'
        'region = "ap-northeast-1"\n'
        "disable_source_dest_check = true\n"
        'autoscaling_group = "gatepeer-asg"\n'
        'launch_lifecycle_hook = "gatepeer-launch"\n'
        'lifecycle_deadline = "15m"\n'
        'termination_lifecycle_hook = "gatepeer-terminate"\n'
    )
    aws = load(write_config(tmp_path, text)).aws
    assert aws.instance_facts is False
    assert aws.imds_endpoint == "http://127.0.0.1:8111"
    assert aws.imds_timeout == 0.25
    assert aws.region == "ap-northeast-1"
    assert aws.disable_source_dest_check and aws.any_api_feature
    assert aws.autoscaling_group == "gatepeer-asg"
    assert aws.launch_lifecycle_hook == "gatepeer-launch"
    assert aws.lifecycle_deadline == 900.0
    assert aws.termination_lifecycle_hook == "gatepeer-terminate"


def test_key_from_ssm_needs_no_key_file(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, ssm_soracom()))  # /unused does not exist: not checked
    assert cfg.soracom.auth_key_ssm_parameter == PARAMETER
    assert cfg.soracom.auth_key_file is None
    masked = cfg.masked()
    assert masked["soracom"]["auth_key_ssm_parameter"] == PARAMETER
    assert "SSM" in masked["soracom"]["auth_key_file"]
    with pytest.raises(ConfigError, match="soracom.auth_key_ssm_parameter"):
        cfg.soracom.read_auth_key()  # the file reader refuses; SSM is aws.ssm's job


def test_ssm_parameter_arn_is_accepted(tmp_path: Path) -> None:
    arn = "arn:aws:ssm:ap-northeast-1:123456789012:parameter/gatepeer/auth-key"
    cfg = load(
        write_config(
            tmp_path,
            soracom_section(Path("/x"), auth_key_file=None, auth_key_ssm_parameter=f'"{arn}"'),
        )
    )
    assert cfg.soracom.auth_key_ssm_parameter == arn


SSM = f'"{PARAMETER}"'
GROUP_AND_HOOK = 'autoscaling_group = "g"\nlaunch_lifecycle_hook = "h"\n'


@pytest.mark.parametrize(
    ("soracom", "aws", "message"),
    [
        # Exactly one secret source: both keys named.
        (
            {"auth_key_ssm_parameter": SSM},
            None,
            "soracom.auth_key_file and soracom.auth_key_ssm_parameter: set exactly one",
        ),
        ({"ssm": '""'}, None, "soracom.auth_key_ssm_parameter: not an SSM parameter name"),
        (
            {"ssm": '"/gatepeer/auth key"'},
            None,
            "soracom.auth_key_ssm_parameter: not an SSM parameter name",
        ),
        ({"ssm": "5"}, None, "soracom.auth_key_ssm_parameter: not an SSM parameter name"),
        (
            {},
            'imds_endpoint = "https://169.254.169.254"',
            "aws.imds_endpoint: must be http://ADDRESS[:PORT]",
        ),
        (
            {},
            'imds_endpoint = "http://169.254.169.254/latest"',
            "aws.imds_endpoint: must be http://ADDRESS[:PORT]",
        ),
        ({}, 'imds_timeout = "5m"', "aws.imds_timeout: must be between"),
        ({}, 'region = "Tokyo"', "aws.region: not an AWS region"),
        (
            {},
            'launch_lifecycle_hook = "h"',
            "aws.autoscaling_group: missing; aws.launch_lifecycle_hook",
        ),
        (
            {},
            'termination_lifecycle_hook = "h"',
            "aws.autoscaling_group: missing; aws.termination_lifecycle_hook",
        ),
        ({}, 'lifecycle_deadline = "5m"', "aws.lifecycle_deadline: has no effect without"),
        (
            {},
            GROUP_AND_HOOK + 'lifecycle_deadline = "1s"',
            "aws.lifecycle_deadline: must be between",
        ),
        (
            {},
            'disable_source_dest_check = "yes"',
            "aws.disable_source_dest_check: must be true or false",
        ),
        ({}, 'lifecycle_hook = "h"', "aws.lifecycle_hook: unknown key"),
        (
            {},
            'autoscaling_group = "two words"',
            "aws.autoscaling_group: not an Auto Scaling group name",
        ),
    ],
)
def test_invalid_is_one_line_naming_the_key(
    tmp_path: Path, soracom: dict[str, str], aws: str | None, message: str
) -> None:
    key = write_key(tmp_path / "key")
    if "ssm" in soracom:
        table = ssm_soracom(auth_key_ssm_parameter=soracom["ssm"])
    else:
        table = soracom_section(key, **soracom)
    text = table + (f"[aws]\n{aws}\n" if aws else "")
    with pytest.raises(ConfigError) as err:
        load(write_config(tmp_path, text))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


def test_cli_refuses_both_secret_sources_with_exit_2(tmp_path: Path) -> None:
    key = write_key(tmp_path / "key")
    path = write_config(tmp_path, soracom_section(key, auth_key_ssm_parameter=f'"{PARAMETER}"'))
    result = subprocess.run(
        [sys.executable, "-m", "gatepeer", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "soracom.auth_key_file and soracom.auth_key_ssm_parameter" in result.stderr
    assert result.stderr.count("\n") == 1


def test_status_and_help_never_import_boto3(tmp_path: Path) -> None:
    """boto3 costs hundreds of milliseconds to import: only [aws] features may pay for it."""
    path = write_config(tmp_path, ssm_soracom() + "[aws]\ndisable_source_dest_check = true\n")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from gatepeer.cli import main\n"
        "import gatepeer.agent, gatepeer.daemon\n"
        f"CliRunner().invoke(main, ['config', 'check', '--config', {str(path)!r}])\n"
        "CliRunner().invoke(main, ['--help'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"
