"""The runbook (docs/operations.md) and the alert rules (config/prometheus/alerts.yml) agree:
every alert has its section, its `runbook` annotation links to that section, every section
says how to confirm (a command and a PromQL query) and what to do, and every
`report-forwarder …` command in the runbook is one the CLI accepts — parsed by click itself,
through the real command tree of `worker.cli`, so a command, an option or an option value
that does not exist fails here."""

from __future__ import annotations

import importlib
import re
import shlex
import string
from pathlib import Path
from typing import Any

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.cli import main
from worker.errors import ForwarderError
from worker.store.deadletters import check_id, parse_age

yaml: Any = importlib.import_module("yaml")  # PyYAML (in the test extra)

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
RUNBOOK_LINK = "docs/operations.md#{anchor}"
SEVERITIES = {"critical", "warning"}
METRIC = r"\b(report_forwarder_\w+|up)\b"
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<"}


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation but `-` and `_`
    dropped, spaces to `-`."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def runbook_text() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def headings(level: int) -> list[str]:
    return re.findall(rf"^{'#' * level} (.+?)\s*$", runbook_text(), re.M)


def alert_sections() -> dict[str, str]:
    """The sections under `## Alerts`, by heading."""
    part = runbook_text().split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    chunks = re.split(r"^### (.+?)\s*$", part, flags=re.M)
    return {chunks[i]: chunks[i + 1] for i in range(1, len(chunks), 2)}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def runbook_commands(text: str | None = None) -> list[str]:
    """Every `report-forwarder …` command: lines of fenced blocks and inline code spans."""
    text = runbook_text() if text is None else text
    commands = []
    for block in re.findall(r"^```\w*\n(.*?)^```", text, re.M | re.S):
        commands += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("report-")]
    prose = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.M | re.S)
    commands += re.findall(r"`(report-forwarder [^`]+)`", prose)
    return [c for c in commands if c.split()[0] == "report-forwarder"]


def cli_refusal(command_line: str) -> str | None:
    """Why the CLI would refuse ``command_line`` (click's own message), or None if it
    parses: the command path resolves, every option exists and every value converts.
    Nothing is run (click parses; no command's callback is invoked)."""
    argv = shlex.split(command_line, comments=True)
    for index, token in enumerate(argv):
        if token in SHELL_OPERATORS:
            argv = argv[:index]
            break
    if not argv or argv[0] != "report-forwarder":
        return f"not a report-forwarder command: {command_line!r}"
    command: click.Command = main
    name, rest = "report-forwarder", argv[1:]
    ctx: click.Context | None = None
    try:
        while True:
            if isinstance(command, click.Group) and not rest:
                return f"{name!r} is a group, not a command"
            ctx = command.make_context(name, rest, parent=ctx)
            if not isinstance(command, click.Group):
                break
            protected = getattr(ctx, "_protected_args", None)  # click >= 8.2
            if protected is None:
                protected = ctx.protected_args
            found, sub, rest = command.resolve_command(ctx, [*protected, *ctx.args])
            if sub is None or found is None:
                return f"no command in {rest!r}"
            name, command = found, sub
        body_checks(ctx.params)
    except click.ClickException as error:
        return error.format_message()
    except ForwarderError as error:
        return str(error)
    except click.exceptions.Exit:
        return "asks for help or the version, not a command"
    return None


def body_checks(params: dict[str, Any]) -> None:
    """The checks the dead-letters commands make in their body, before any Redis call
    (click's types cannot express them): an age for --since, the stream's form for an id."""
    if params.get("since") is not None:
        parse_age(params["since"])
    for entry_id in (*params.get("ids", ()), *filter(None, [params.get("entry_id")])):
        check_id(entry_id)


# -- the alert rules -------------------------------------------------------------------------


def test_alert_rules_have_the_labels_and_annotations_ops_need() -> None:
    """Every rule has a severity and a summary, a description naming a metric its
    expression uses, and a runbook link."""
    rules = alert_rules()
    assert len(rules) >= 10
    problems = []
    for rule in rules:
        name = rule["alert"]
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity not one of {sorted(SEVERITIES)}")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{name}: no {key}")
        used = {
            re.sub(r"_(bucket|sum|count)$", "", metric)  # a histogram by its own name
            for metric in re.findall(METRIC, str(rule["expr"]))
        }
        named = set(re.findall(METRIC, annotations.get("description", "")))
        if not used & named:
            problems.append(f"{name}: the description names none of {sorted(used)}")
    assert [] == problems


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert sorted(set(names)) == sorted(names)


# -- alerts and their sections ---------------------------------------------------------------


def test_every_alert_has_its_section_and_every_section_its_alert() -> None:
    """The sections under `## Alerts` are exactly the alerts of alerts.yml."""
    assert sorted(rule["alert"] for rule in alert_rules()) == sorted(alert_sections())


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_runbook_annotation_links_to_the_alerts_section(rule: dict[str, Any]) -> None:
    """The `runbook` annotation is docs/operations.md#<the anchor of the alert's heading>,
    and the document has that anchor."""
    expected = RUNBOOK_LINK.format(anchor=anchor(rule["alert"]))
    assert expected == rule["annotations"]["runbook"]
    assert anchor(rule["alert"]) in {anchor(h) for h in headings(3)}


@pytest.mark.parametrize("name", sorted(alert_sections()))
def test_each_section_says_what_it_means_how_to_confirm_and_what_to_do(name: str) -> None:
    """Each alert's section has its meaning, a confirmation with a report-forwarder command
    and a PromQL query, and a fix."""
    section = alert_sections()[name]
    for part in ("**Meaning.**", "**Confirm.**", "**Fix.**"):
        assert part in section, f"{name}: no {part}"
    confirm = section.split("**Confirm.**", 1)[1].split("**Fix.**", 1)[0]
    assert runbook_commands(confirm), f"{name}: no report-forwarder command to confirm it"
    assert [q for q in fenced_blocks(confirm, "promql") if q.strip()], f"{name}: no PromQL"
    assert section.split("**Fix.**", 1)[1].strip(), f"{name}: nothing to do"


def test_every_link_inside_the_runbook_resolves() -> None:
    """Every `(#anchor)` link points at a heading of the runbook."""
    anchors = {anchor(h) for level in (1, 2, 3) for h in headings(level)}
    links = re.findall(r"\]\(#([^)]+)\)", runbook_text())
    assert links
    assert [] == [link for link in links if link not in anchors]


def test_the_scaling_section_is_there() -> None:
    """The runbook ends with scaling workers by queue depth (deploy/kubernetes)."""
    assert "Scaling workers by queue depth" in headings(2)


# -- the commands ----------------------------------------------------------------------------


def test_the_runbook_gives_commands() -> None:
    """The runbook has commands to check (so the test below is not vacuous)."""
    commands = runbook_commands()
    assert len(commands) >= 20
    for expected in ("report-forwarder stats", "report-forwarder accounts resume default"):
        assert expected in commands


@pytest.mark.parametrize("command_line", sorted(set(runbook_commands())))
def test_every_runbook_command_exists_in_the_cli(command_line: str) -> None:
    """Click parses the command through the real command tree: the command exists, and
    so does every option it uses, with a value it accepts."""
    assert None is cli_refusal(command_line)


@pytest.mark.parametrize(
    ("command_line", "because"),
    [
        ("report-forwarder accounts pause default", "No such command"),
        ("report-forwarder dead-letters", "a group, not a command"),
        ("report-forwarder dead-letters list --reasons expired", "No such option"),
        ("report-forwarder dead-letters replay --reason paused", "is not one of"),
        ("report-forwarder dead-letters list --limit 0", "0"),
        ("report-forwarder stats --json extra", "unexpected extra argument"),
        ("report-forwarder worker --concurrency N", "not a valid integer"),
        ("report-forwarder dead-letters purge --since 5 min", "invalid dead-letter id"),
        ("report-forwarder dead-letters purge --since 5mn", "invalid age"),
        ("report-forwarder dead-letters show ID", "invalid dead-letter id"),
    ],
)
def test_the_command_check_refuses_what_the_cli_lacks(command_line: str, because: str) -> None:
    """A command, option or value the CLI does not have is refused, with click's reason."""
    refusal = cli_refusal(command_line)
    assert refusal is not None
    assert because in refusal


def test_shell_around_a_command_is_not_part_of_it() -> None:
    """A pipe or a comment after a command is the shell's, not the command's."""
    assert None is cli_refusal("report-forwarder stats --json | jq .backlog  # the backlog")


_OPTION_NAMES = st.builds(
    "--{}{}".format,
    st.sampled_from(string.ascii_lowercase),
    st.text(string.ascii_lowercase + "-", max_size=19),
)


@given(option=_OPTION_NAMES)
def test_an_option_the_command_does_not_have_is_refused(option: str) -> None:
    """Any option name that `dead-letters list` does not declare is refused."""
    known = {o for p in _dl_list().params for o in (*p.opts, *p.secondary_opts)}
    refusal = cli_refusal(f"report-forwarder dead-letters list {option}")
    if option in known:
        assert refusal is None or "requires an argument" in refusal
    else:
        assert refusal is not None
        assert "No such option" in refusal


def _dl_list() -> click.Command:
    group = main.commands["dead-letters"]
    assert isinstance(group, click.Group)
    return group.commands["list"]
