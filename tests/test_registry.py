import pytest

from prompttune.registry import METHODS, Registry, RegistryError


def test_duplicate_names_fail():
    reg = Registry("thing")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(RegistryError, match="duplicate thing name 'a'"):
        reg.register("a")(type("B", (), {}))


def test_unknown_name_lists_choices():
    with pytest.raises(RegistryError, match=r"unknown method 'nope'; valid choices: .*coop.*linear_probe.*zero_shot"):
        METHODS.get("nope")


def test_core_methods_registered():
    for name in ("zero_shot", "linear_probe", "coop"):
        assert name in METHODS


def test_list_command(cli):
    out = cli("list")
    assert out.returncode == 0, out.stderr
    assert "methods:" in out.stdout and "coop" in out.stdout and "clip-tiny" in out.stdout
