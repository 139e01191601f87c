"""The docs against the code: every `ovirt-ft` command line the docs show parses with the
real CLI parser, every config key they name exists, and the metric names, states and
ports they list are the ones the code has."""
from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine_plugin import cli
from vdsm_ft import hostconfig
from vdsm_ft.agent import metrics
from vdsm_ft.api import VmState

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
PLACEHOLDER = {"<vm>": "web01", "<host>": "host-b"}
# Code spans and fenced blocks, where commands and keys are written.
SPAN_RE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+(?:\n[^`\n]+)?)`", re.S)


def _code(path: Path) -> list[str]:
    """Fenced blocks as they are; inline spans (which may wrap) on one line."""
    return [m.group(1) if m.group(1) is not None else m.group(2).replace("\n", " ")
            for m in SPAN_RE.finditer(path.read_text())]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _cli_lines() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for code in _code(doc):
            for line in code.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|[\s$#])ovirt-ft( [^#|;]*)", " " + line)
                if m and m.group(1).strip():
                    words = shlex.split(m.group(1))
                    found.append((doc.name, [PLACEHOLDER.get(w, w) for w in words]))
    return found


def test_docs_name_cli_commands():
    names = {words[0] for _, words in _cli_lines()}
    assert {"status", "enable", "disable", "migrate-secondary"} <= names


@pytest.mark.parametrize("doc,words", _cli_lines(), ids=lambda v: " ".join(v)
                         if isinstance(v, list) else v)
def test_every_documented_cli_line_parses(doc, words):
    commands = _subcommands()
    assert words[0] in commands, f"{doc}: `ovirt-ft {words[0]}` is not a CLI command"
    for option in (w for w in words if w.startswith("-")):
        known = {o for a in commands[words[0]]._actions for o in a.option_strings} | \
            {o for a in cli.parser()._actions for o in a.option_strings}
        assert option in known, f"{doc}: ovirt-ft {words[0]} has no option {option}"
    if len(words) > 1:          # a full command line: the real parser must accept it
        args = cli.parser().parse_args(words)
        assert args.command == words[0]


def test_operations_documents_every_cli_command():
    text = (REPO / "docs" / "operations.md").read_text()
    for name in _subcommands():
        assert f"`ovirt-ft {name}" in text, name
    for name, sub in _subcommands().items():
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"ovirt-ft {name} {option}"


# ----------------------------------------------------------------- config keys

def _poller_keys() -> set[tuple[str, str]]:
    source = (REPO / "engine_plugin" / "config.py").read_text()
    return set(re.findall(r'\(p, "(\w+)", "(\w+)"', source))


HOST_SECTIONS = {s for s, _ in hostconfig._KEYS}


def test_host_and_poller_sections_do_not_overlap():
    assert HOST_SECTIONS and _poller_keys()
    assert not HOST_SECTIONS & {s for s, _ in _poller_keys()}


def _named_keys() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        for code in _code(doc):
            for section, key in re.findall(r"^\[(\w+)\] (\w+)", code.strip()):
                found.append((doc.name, section, key))
    return found


@pytest.mark.parametrize("doc,section,key", _named_keys())
def test_every_documented_config_key_exists(doc, section, key):
    if section in HOST_SECTIONS:
        assert (section, key) in hostconfig._KEYS, f"{doc}: agent.conf has no [{section}] {key}"
    else:
        assert (section, key) in _poller_keys(), f"{doc}: no [{section}] {key} anywhere"


def test_documented_ini_blocks_hold_only_real_agent_keys():
    blocks = [c for doc in DOCS for c in _code(doc)
              if re.search(r"^\[host\]", c, re.M)]
    assert blocks, "the host config reference block is gone from the docs"
    for block in blocks:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
        parser.read_string(block)
        for section in parser.sections():
            for key in parser[section]:
                assert (section, key) in hostconfig._KEYS, f"[{section}] {key}"


# ------------------------------------------------------- states, metrics, ports

def _operations() -> str:
    return (REPO / "docs" / "operations.md").read_text()


def test_every_state_is_explained():
    rows = re.findall(r"^\| `([^`]+)` \|", _operations(), re.M)
    states = [r for r in rows if r[0].isupper()]
    assert set(states) == {s.value for s in VmState}


def test_metric_names_match_the_agent():
    documented = set(re.findall(r"`(vdsm_ft_\w+)", _operations()))
    assert documented == {name for name, _, _ in metrics._HELP}


def test_documented_ports_match_the_defaults():
    first, last = hostconfig.HostConfig.colo_ports
    api = hostconfig.DEFAULT_API_PORT
    install = (REPO / "docs" / "install.md").read_text()
    assert f"TCP and UDP {api}" in install and f"TCP {first}-{last}" in install
    assert f"{first}-{last}" in _operations()


def test_the_state_table_in_the_agent_doc_is_the_codes():
    script = REPO / "scripts" / "state_table.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
