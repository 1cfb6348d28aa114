"""scripts/install.sh hands pip's own configuration to uv, so that uv resolves what pip would here."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def _pip_config_to_uv_flags(env: dict[str, str]) -> list[str]:
    text = SCRIPT.read_text()
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_pip_conf_and_pip_variables_become_uv_flags_once_each(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///a/simple file:///b/simple\nfind-links = /wheels\n"
                    "constraint = /c.txt\ncert = /etc/ssl/x.pem\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf), PIP_INDEX_URL="https://example.org/simple", PIP_FIND_LINKS="/wheels")
    flags = _pip_config_to_uv_flags(env)
    pairs = list(zip(flags[::2], flags[1::2]))
    assert ("--index-url", "https://example.org/simple") in pairs
    assert ("--extra-index-url", "file:///a/simple") in pairs and ("--extra-index-url", "file:///b/simple") in pairs
    assert ("--constraint", "/c.txt") in pairs
    assert pairs.count(("--find-links", "/wheels")) == 1  # in pip.conf and in the environment: passed once
    assert not any("cert" in f for f in flags)  # only the options uv takes the same way


def test_no_pip_configuration_gives_no_flags(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    assert _pip_config_to_uv_flags(env) == []
