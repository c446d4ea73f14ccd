"""What a node tells its operator when it cannot serve or its cluster is too small: the rules
(pure), and real daemons saying them in the log, `/v1/cluster`, `status` and `generate`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from edgemoe.cli.main import app
from edgemoe.daemon.diagnosis import (
    NO_MODEL,
    NO_MODEL_GRACE_S,
    REPEAT_FIRST_S,
    REPEAT_MAX_S,
    NodeFacts,
    WarningLog,
    capacity_warning,
    warnings,
)

from .conftest import TOKEN, Node, make_node, wait_for

runner = CliRunner()
CLEAN_ENV = {"EDGEMOE_CONFIG": "/nonexistent/edgemoe.toml", "NO_COLOR": "1"}


def facts(**over: object) -> NodeFacts:
    base = dict(uptime_s=60.0, has_model=True, peers=2, capacities=(600, 600),
                model_expert_bytes=1000, expert_bytes=100)  # fmt: skip
    return NodeFacts(**{**base, **over})  # type: ignore[arg-type]


def test_nobody_has_the_model_is_said_only_after_the_grace_period() -> None:
    alone = facts(has_model=False, peers=0, capacities=(), model_expert_bytes=0, expert_bytes=0)
    assert warnings(alone) == [NO_MODEL]
    assert warnings(facts(has_model=False, peers=0, uptime_s=NO_MODEL_GRACE_S / 2)) == []
    assert warnings(facts(has_model=False, peers=1)) == []  # a peer may have it
    assert warnings(facts(peers=0)) == []  # this node has it


def test_capacity_warning_counts_the_experts_no_member_has_room_for() -> None:
    assert capacity_warning(facts()) is None  # 1200 >= 1000
    short = capacity_warning(facts(capacities=(600,)))
    assert short == "cluster memory 600 B below the model's experts 1000 B: 4 experts over capacity"
    assert capacity_warning(facts(capacities=(650,))).endswith(": 4 experts over capacity")
    assert capacity_warning(facts(model_expert_bytes=0)) is None  # model not known yet


def test_warning_log_says_a_warning_at_once_then_with_doubling_backoff() -> None:
    book = WarningLog()
    said = [t for t in range(0, 2000) if book.due(float(t), ["w"])]
    gaps = [b - a for a, b in itertools.pairwise(said)]
    assert said[0] == 0
    assert gaps[:3] == [REPEAT_FIRST_S, 2 * REPEAT_FIRST_S, 4 * REPEAT_FIRST_S]
    assert max(gaps) == REPEAT_MAX_S
    # cleared, then back: said at once again
    assert book.due(2000.0, []) == [] and book.due(2001.0, ["w"]) == ["w"]


@pytest.fixture(scope="module")
def lonely(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A daemon with no model, no seed and no mDNS, on a state dir that does not exist yet."""
    tmp = tmp_path_factory.mktemp("lonely")
    node = make_node(tmp, "lonely", shard_dir=None, cluster_id="lonely", capacity="100%",
                     mdns=False)  # fmt: skip
    node.state_dir.rmdir()
    node.state_dir = tmp / "not-yet" / "state"
    node.start()
    try:
        wait_for(lambda: "listening on" in node.log(), 60, "the daemon to listen")
        yield node
    finally:
        node.stop()


def test_daemon_says_which_directories_it_creates(lonely: Node) -> None:
    assert f"created {lonely.state_dir}, {lonely.state_dir / 'model'}" in lonely.log()


def test_node_without_model_or_peers_says_nobody_has_the_model(lonely: Node) -> None:
    wait_for(lambda: NO_MODEL in lonely.log(), NO_MODEL_GRACE_S + 30, "the warning in the log")
    assert lonely.log().count(NO_MODEL) == 1  # backoff: not every check
    status, view = lonely.request("GET", "/v1/cluster")
    assert status == 200 and view["warnings"] == [NO_MODEL] and view["ready"] is False
    args = ["--node", lonely.url, "--api-token", TOKEN]
    result = runner.invoke(app, ["status", *args], env=CLEAN_ENV)
    assert result.exit_code == 1, result.output
    assert f"warning: {NO_MODEL}" in " ".join(result.stdout.split())
    assert "local share -" in result.stdout  # no traffic, no share
    assert result.stderr.strip() == f"error: node {view['node_id']} cannot serve: {NO_MODEL}"
    scripted = runner.invoke(app, ["status", *args, "--json"], env=CLEAN_ENV)
    assert scripted.exit_code == 1 and json.loads(scripted.stdout)["cluster"]["warnings"]
    gen = runner.invoke(app, ["generate", "hi", *args], env=CLEAN_ENV)
    assert gen.exit_code == 1
    assert gen.stderr.strip() == f"error: {lonely.url} cannot answer: {NO_MODEL}"


def test_cluster_below_the_model_warns_in_log_view_and_status(small: Node) -> None:
    def said() -> list[str]:
        return [w for w in small.cluster()["warnings"] if w.startswith("cluster memory")]

    found = wait_for(said, 60, "the capacity warning")
    assert found[0].endswith(": 7 experts over capacity")  # 16 experts, room for 9.6
    wait_for(lambda: found[0] in small.log(), 30, "the capacity warning in the log")
    result = runner.invoke(app, ["status", "--node", small.url, "--api-token", TOKEN],
                           env=CLEAN_ENV)  # fmt: skip
    assert result.exit_code == 0, result.output  # it serves, from fetched experts
    assert "7 experts over capacity" in " ".join(result.stdout.split())
