"""`memfed demo`, the README's main command: the whole network (a registry and three node processes over
mutual TLS) on the embedded default model, in its fast mode, checked through its JSON."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from memfed.cli.main import main

STEPS = [
    "internalize", "hot_swap", "edit_rollback", "seal_send", "deny", "watermark_trace", "federated_round",
    "time_machine", "externalize",
]  # fmt: skip


def _demo_processes() -> dict[str, str]:
    """Live processes started for a demo (they all name their memfed-demo-* work dir): pid -> command."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if any(b"memfed-demo-" in a for a in args):
            found[cmdline.parent.name] = b" ".join(args).decode(errors="replace")
    return found


def test_demo_tells_the_whole_story_and_leaves_nothing(default_model_dir: Path, capsys) -> None:
    before = set(Path(tempfile.gettempdir()).glob("memfed-demo-*"))
    running = _demo_processes()  # another demo on this machine is not ours to count
    code = main(["demo", "--json", "--fast"])
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["steps"]] == STEPS, report
    for step in report["steps"]:
        assert step["ok"], step
        assert step["seconds"] >= 0
    assert code == 0 and report["ok"]
    s = by_name(report)
    assert len(s["internalize"]["nodes"]) == 3
    assert "Fopestox" in s["internalize"]["after"] and "Fopestox" not in s["internalize"]["before"]
    assert s["hot_swap"]["activate_ms_p50"] >= 0 and len(s["hot_swap"]["mixed_batch"]) == 3
    assert s["edit_rollback"]["rolled_back"] == s["edit_rollback"]["bare"] != s["edit_rollback"]["edited"]
    assert s["seal_send"]["b_digest"] != s["seal_send"]["a_digest"]  # B got a copy watermarked for it
    assert s["seal_send"]["tamper_detected"]
    assert s["deny"]["audit"]["principal"] == "node:node-c"
    assert s["watermark_trace"]["traced_to"] == "node-b"
    assert s["watermark_trace"]["z"] >= s["watermark_trace"]["threshold"]
    assert s["federated_round"]["version"] == "1.1.0" and "1.1.0" in s["federated_round"]["catalog"]
    assert s["federated_round"]["contributors"] == ["node-a", "node-b"]
    assert s["time_machine"]["refused_while_archived"]
    assert s["externalize"]["recovery"] >= 0.8
    assert set(Path(tempfile.gettempdir()).glob("memfed-demo-*")) == before  # no temp state left
    left = {pid: cmd for pid, cmd in _demo_processes().items() if pid not in running}
    assert left == {}  # every registry and node process stopped


def test_demo_keep_leaves_its_work_dir(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--keep (checked without the network: the story itself is the test above)."""
    from memfed.cli import demo_network

    def story(story: Any, work: Path, model_dir: Path | None = None, *, fast: bool = False) -> None:
        story.step("internalize", "a stand-in step", lambda: (work / "marker").write_text("x") and {})

    monkeypatch.setattr(demo_network, "run", story)
    main(["demo", "--json", "--keep"])
    report = json.loads(capsys.readouterr().out)
    work = Path(report["work_dir"])
    try:
        assert (work / "marker").is_file() and by_name(report)["internalize"]["ok"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def by_name(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}
