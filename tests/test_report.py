"""The sweep's report page (`hsm distributed report`, `hydra.launcher.report=true`): its data from
the journal (pure logic, tested on records), and the page itself in a real browser (Debian's
headless Chromium through Playwright, the network refused)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

import browser
import hosts
from conftest import remote_override
from hosts import SshHost, hydra_value
from hsm_core import journal, report

SWEEP_APP = Path(__file__).parent / "sweep_app.py"


# -- the data, from records ---------------------------------------------------------------------


def ident(num: int, overrides: list[str] | None = None) -> dict[str, Any]:
    return {"num": num, "overrides": overrides or [f"x={num}"], "hash": f"job{num}", "subdir": str(num)}


def start(num: int, attempt: int, source: str, at: float, **more: Any) -> journal.Start:
    return journal.Start(time=at, **ident(num), source=source, attempt=attempt, start=at, **more)


def end(num: int, attempt: int, source: str, began: float, at: float, status: str = "completed",
        retrying: bool = False, cause: str | None = None, value: Any = None) -> journal.End:
    return journal.End(time=at, **ident(num), source=source, attempt=attempt, start=began, end=at, status=status,
                       failure_class=None, cause=cause, retrying=retrying, value=value)


def launch(at: float, slots: dict[str, int]) -> journal.Launch:
    return journal.Launch(time=at, python="python", command=["app.py", "-m"], cwd="/", sources=list(slots),
                          slots=slots, jobs=3)


def attempts_of(data: dict[str, Any], job: int) -> list[tuple[Any, ...]]:
    return [(row["attempt"], row["source"], row["outcome"], row["queued"], row.get("ran"), row.get("end"),
             row.get("adopted", False)) for row in data["attempts"] if row["job"] == job]


def test_a_resumed_sweep_shows_every_attempt_once_with_the_adopted_and_the_lost_ones() -> None:
    """Launch 1 is killed while jobs 1 and 2 run; launch 2 adopts job 1 (it ran on), finds job 2
    gone (lost: the Start it writes for a held attempt is the same attempt), runs it again."""
    records: list[journal.Record] = [
        launch(100, {"local": 1, "host1": 1}),
        start(0, 1, "local", 101), start(1, 1, "host1", 101.5),
        end(0, 1, "local", 101, 105, value=0.5), start(2, 1, "local", 105.5),
        launch(120, {"local": 1, "host1": 1}),
        start(1, 1, "host1", 101.5), start(2, 1, "local", 105.5),
        journal.Adopted(time=121, **ident(1), source="host1", attempt=1, key="k1"),
        end(2, 1, "local", 105.5, 121.2, status="lost", retrying=True, cause="the attempt was gone from local"),
        start(2, 1, "local", 121.5), end(1, 1, "host1", 101.5, 124, value={"loss": 0.25}),
        end(2, 2, "local", 121.5, 126, value=0.75), journal.LaunchEnd(time=126.5, reason="completed"),
    ]
    data = report.build(records, running=False, now=200)
    assert data["origin"] == 100 and data["state"] == "completed"
    assert [(launch["start"], launch["end"], launch["batch"]) for launch in data["launches"]] == [
        (0, 5.5, False), (20, 26.5, False)]  # a resume is a launch of its own
    detached = report.build([launch(0, {"host1": 1}), start(0, 1, "host1", 1),
                             journal.State(time=2, **ident(0), source="host1", attempt=1, state="detached",
                                           detail="the link to host1 was lost"), end(0, 1, "host1", 1, 9)],
                            running=False, now=20)
    assert attempts_of(detached, 0) == [(1, "host1", "completed", 1, 1, 9, False)]  # it ran all along
    stopped = report.build([launch(0, {"local": 1}), start(0, 1, "local", 1),
                            journal.LaunchEnd(time=3, reason="interrupted by SIGINT"), launch(10, {"local": 1}),
                            start(0, 1, "local", 11), end(0, 1, "local", 11, 14)], running=False, now=20)
    assert attempts_of(stopped, 0) == [(1, "local", "interrupted", 1, 1, 3, False),  # Ctrl-C, then resumed
                                       (2, "local", "completed", 11, 11, 14, False)]
    batches = report.build([launch(0, {"local": 1}), journal.LaunchEnd(time=4, reason="completed"),
                            dataclasses.replace(launch(5, {"local": 1}), first=3)], running=False, now=9)
    assert [launch["batch"] for launch in batches["launches"]] == [False, True]  # an adaptive sweeper's next batch
    assert attempts_of(data, 0) == [(1, "local", "completed", 1, 1, 5, False)]
    assert attempts_of(data, 1) == [(1, "host1", "completed", 1.5, 1.5, 24, True)]
    assert attempts_of(data, 2) == [(1, "local", "lost", 5.5, 5.5, 21.2, False),
                                    (2, "local", "completed", 21.5, 21.5, 26, False)]
    assert [row["cause"] for row in data["attempts"] if row["outcome"] == "lost"] == ["the attempt was gone from local"]
    assert [(job["num"], job["status"], job["attempts"], job.get("value")) for job in data["jobs"]] == [
        (0, "completed", 1, 0.5), (1, "completed", 1, {"loss": 0.25}), (2, "completed", 2, 0.75)]
    assert data["metrics"] == ["value", "loss"]


def test_time_waiting_for_slurm_is_apart_from_the_run_and_open_attempts_follow_the_launcher() -> None:
    records: list[journal.Record] = [
        launch(0, {"cluster": 2}),
        start(0, 1, "cluster", 1),
        journal.State(time=1.5, **ident(0), source="cluster", attempt=1, state="pending", detail="Slurm job 7 pending"),
        journal.State(time=11, **ident(0), source="cluster", attempt=1, state="running", detail="Slurm job 7 on n1"),
        end(0, 1, "cluster", 1, 21),
        start(1, 1, "cluster", 2),
        journal.State(time=2.5, **ident(1), source="cluster", attempt=1, state="pending", detail="Slurm job 8 pending"),
    ]
    running = report.build(records, running=True, now=30)
    assert running["state"] == "running"
    assert attempts_of(running, 0) == [(1, "cluster", "completed", 1, 11, 21, False)]
    assert attempts_of(running, 1) == [(1, "cluster", "running", 2, None, 30, False)]  # pending still
    [cluster] = running["sources"]
    assert (cluster["busy"], cluster["waiting"], cluster["available"]) == (10, 10 + 28, 60)
    detached = report.build([launch(0, {"host1": 1}), start(0, 1, "host1", 1),
                             journal.State(time=2, **ident(0), source="host1", attempt=1, state="detached",
                                           detail="the link to host1 was lost"), end(0, 1, "host1", 1, 9)],
                            running=False, now=20)
    assert attempts_of(detached, 0) == [(1, "host1", "completed", 1, 1, 9, False)]  # it ran all along
    stopped = report.build([*records, journal.LaunchEnd(time=25, reason="interrupted by SIGINT")], running=True,
                           now=30)  # the lock is held a moment after the record: the record decides
    assert stopped["state"] == "interrupted by SIGINT"
    assert attempts_of(stopped, 1) == [(1, "cluster", "interrupted", 2, None, 25, False)]
    killed = report.build(records, running=False, now=30)
    assert killed["state"].startswith("ended without a record")
    assert attempts_of(killed, 1)[0][2] == "interrupted" and killed["summary"]["interrupted"] == 1


def test_lanes_are_slots_or_gpu_sets_and_use_is_busy_over_offered_slot_time() -> None:
    records: list[journal.Record] = [
        launch(0, {"local": 2, "gpu": 2}),
        start(0, 1, "local", 0), start(1, 1, "local", 0), end(1, 1, "local", 0, 5), start(2, 1, "local", 5),
        end(0, 1, "local", 0, 10), end(2, 1, "local", 5, 8),
        start(3, 1, "gpu", 0, gpus=[0]), start(4, 1, "gpu", 0, gpus=[1, 2]), end(3, 1, "gpu", 0, 4),
        end(4, 1, "gpu", 0, 10, status="failed", retrying=True, cause="ValueError: no"),
        start(4, 2, "gpu", 10, gpus=[0]), end(4, 2, "gpu", 10, 12, status="failed", cause="ValueError: no"),
        journal.LaunchEnd(time=12, reason="completed"),
    ]
    data = report.build(records, running=False, now=50)
    assert [(lane["source"], lane["label"]) for lane in data["lanes"]] == [
        ("local", "slot 1"), ("local", "slot 2"), ("gpu", "GPU 0"), ("gpu", "GPUs 1,2")]
    lanes = {(row["job"], row["attempt"]): data["lanes"][row["lane"]]["label"] for row in data["attempts"]}
    assert lanes == {(0, 1): "slot 1", (1, 1): "slot 2", (2, 1): "slot 2", (3, 1): "GPU 0", (4, 1): "GPUs 1,2",
                     (4, 2): "GPU 0"}
    outcomes = {(row["job"], row["attempt"]): row["outcome"] for row in data["attempts"]}
    assert outcomes[(4, 1)] == "retried" and outcomes[(4, 2)] == "failed"
    local, gpu = data["sources"]
    assert (local["busy"], local["available"], local["utilisation"]) == (18, 24, 0.75)
    assert (gpu["busy"], gpu["available"]) == (16, 24)
    idle = [(gap["source"], gap["lane"], gap["start"], gap["end"]) for gap in data["idle_gaps"]]
    assert idle == [("gpu", "GPU 0", 4, 10), ("local", "slot 2", 8, 12), ("gpu", "GPUs 1,2", 10, 12),
                    ("local", "slot 1", 10, 12)]
    assert [(row["job"], row["attempt"]) for row in data["slowest"]] == [(0, 1), (4, 1), (1, 1), (3, 1), (2, 1),
                                                                           (4, 2)]


def test_swept_parameters_are_numeric_or_categorical_and_shared_ones_are_apart() -> None:
    jobs: list[dict[str, Any]] = [{"num": num, "overrides": overrides} for num, overrides in enumerate([
        ["lr=0.1", "model=mlp", "epochs=3"], ["lr=1e-4", "model=cnn", "epochs=3"],
        ["lr=0.001", "model=mlp", "epochs=3", "+extra=1"]])]
    params, fixed = report.swept_parameters(jobs)
    assert params == [{"name": "lr", "kind": "numeric", "log": True},
                      {"name": "model", "kind": "categorical", "values": ["mlp", "cnn"]},
                      {"name": "extra", "kind": "numeric", "log": False}]
    assert fixed == {"epochs": "3"}
    assert report.parameter_values(jobs[1]["overrides"], params) == {"lr": 1e-4, "model": "cnn", "extra": None}


def test_a_return_value_is_kept_as_the_json_the_page_reads() -> None:
    assert journal.summary_value(0.5) == 0.5 and journal.summary_value(True) is True
    assert journal.summary_value(float("nan")) == "nan" and journal.summary_value(-math.inf) == "-inf"
    assert journal.summary_value(2**60) == float(2**60)  # beyond what JavaScript holds exactly
    assert journal.summary_value({"val": {"loss": 0.1, "acc": 0.9}, "curve": [1, 2], "model": object()}) == {
        "val.loss": 0.1, "val.acc": 0.9, "curve[0]": 1, "curve[1]": 2}
    assert journal.summary_value(object()) is None and journal.summary_value(list(range(100))) is None
    assert journal.summary_value("x" * 1000) == "x" * journal.SUMMARY_TEXT


def test_no_text_in_the_data_can_end_its_script_element() -> None:
    hostile = "x=</script><script>alert(1)</script><!--"
    data = {"sweep_dir": "/tmp/<b>sweep", **report.build([launch(0, {"local": 1}),
                                                        journal.Start(time=0, **ident(0, [hostile]), source="local",
                                                                      attempt=1, start=0)], False, 1)}
    page = report.page(data)
    assert "<script><script>" not in page and page.count("</script>") == 2  # the data's and the script's own
    embedded = re.search(r'<script type="application/json" id="hsm-report-data">(.*?)</script>', page, re.S)
    assert embedded and json.loads(embedded.group(1)) == json.loads(json.dumps(data))
    assert "<title>Sweep &lt;b&gt;sweep</title>" in page


def test_a_page_that_cannot_be_written_is_said_once_and_never_stops_the_sweep(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = journal.private_folder(tmp_path / journal.FOLDER)
    (folder / journal.FILE).write_text(json.dumps({"event": "launch", **asdict(launch(1, {"local": 1}))}) + "\n")
    (folder / report.FILE).mkdir()  # where the page goes, a folder: every write fails
    writer = report.ReportWriter(tmp_path, every=1)
    writer.write_now()
    writer.write_now()
    writer.close()
    said = [record.getMessage() for record in caplog.records if "report page cannot be written" in record.message]
    assert len(said) == 1 and str(folder / report.FILE) in said[0], caplog.text


# -- the page, in a browser -----------------------------------------------------------------------


def hover_text(opened: browser.Opened, selector: str) -> str:
    opened.page.hover(selector)
    return str(opened.page.inner_text("#hsm-tooltip"))


@pytest.mark.timeout(240)
def test_the_report_of_a_sweep_with_a_failure_a_retry_and_two_sources(
        ssh_hosts: list[SshHost], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """As a user runs it: `report=true` on the command line; the launcher names the page once and
    leaves it written; in Chromium (network refused) every attempt is an element with the data
    the journal has, a hover tells its overrides, where it ran and why it failed, the jobs table
    sorts, and the page asks for nothing and logs no error."""
    host = ssh_hosts[0]
    markers = Path(tempfile.mkdtemp(dir=hosts.BASE))  # the host's user marks the attempt it kills
    markers.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(markers, ignore_errors=True))
    sweep = subprocess.run(
        [sys.executable, str(SWEEP_APP), "-m", "hydra/launcher=hsm_distributed", "hydra.sweep.dir=sweep",
         "task=killed_once", "x=range(6)", "+sleep=1", f"+marker_dir={hydra_value(str(markers))}",
         "hydra.launcher.report=true", "hydra.launcher.progress_interval=0.5",
         "hydra.launcher.local.max_parallel_jobs=1",
         remote_override(host.name, host.source_config(max_parallel_jobs=2))],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    output = sweep.stdout + sweep.stderr
    page_path = tmp_path / "sweep" / ".hsm" / "report.html"
    assert output.count("report page") == 1 and page_path.absolute().as_uri() in output, output[-3000:]
    assert page_path.exists(), output[-3000:]

    ended = [record for record in journal.read(tmp_path / "sweep") if record["event"] == "end"]
    assert {record["source"] for record in ended} == {"local", host.name}
    assert sorted((record["num"], record["status"]) for record in ended if record["status"] != "completed") == [
        (1, "failed"), (2, "lost")], ended  # x=1 raises; x=2's first attempt is killed, then run again
    with browser.chromium() as chromium:
        opened = browser.open_page(chromium, page_path)
        shot = opened.screenshot("report-failure-retry-two-sources")
        data = browser.embedded_data(opened)
        expected = sorted((record["num"], record["attempt"], record["source"],
                           "retried" if record["status"] == "failed" and record["retrying"] else record["status"])
                          for record in ended)
        assert sorted(browser.in_data(data)) == sorted(browser.shown_attempts(opened)) == expected
        assert data["state"] == "completed" and data["summary"]["completed"] == 5 and data["summary"]["failed"] == 1
        assert opened.errors == [] and opened.requests == []
        assert shot.stat().st_size > 10_000

        lost = hover_text(opened, 'g.attempt[data-outcome="lost"]')
        assert "#2" in lost and "x=2" in lost and "lost" in lost and "attempt 1 of 2" in lost, lost
        failed = hover_text(opened, 'g.attempt[data-outcome="failed"]')
        assert "x=1" in failed and "ValueError: x=1 always fails" in failed, failed
        assert ("on local" in failed) or (f"on {host.name}" in failed)

        opened.page.click("#table th[data-col='1']")  # x, ascending
        opened.page.click("#table th[data-col='1']")  # x, descending
        first_rows = opened.page.eval_on_selector_all("#table tbody tr", "rows => rows.map(r => r.dataset.job)")
        assert first_rows[:2] == ["5", "4"], first_rows
        assert opened.page.locator("#slices canvas").count() == 1  # the value against x
        opened.page.click("#table tbody tr[data-job='2']")  # a job picked: its two attempts outlined
        assert opened.page.eval_on_selector_all("g.attempt.picked", "gs => gs.map(g => g.dataset.attempt)") == [
            "1", "2"]

        cli = subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "report", "sweep", "--json"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        printed = json.loads(cli.stdout)
        assert data["rewritten_every"] == 0.5 and printed["rewritten_every"] is None  # the launcher's page, and not
        assert {**printed, "generated": None, "rewritten_every": None} == {**data, "generated": None,
                                                                           "rewritten_every": None}


def write_big_journal(sweep_dir: Path, jobs: int) -> None:
    """The journal of a finished sweep of `jobs` jobs over three sources (a Slurm one keeps
    its jobs pending a while), ~2% lost and run again and ~1% failed: as the launcher writes it."""
    rng = random.Random(7)
    slots = {"local": 4, "gpu-box": 8, "cluster": 16}
    lines: list[journal.Record] = [launch(0, slots)]
    free = {(name, slot): 0.0 for name, count in slots.items() for slot in range(count)}
    for num in range(jobs):
        overrides = [f"lr={10 ** rng.uniform(-4, -1):.4g}", f"model={rng.choice(['mlp', 'cnn', 'vit'])}"]
        job: dict[str, Any] = {"num": num, "overrides": overrides, "hash": f"{num:016x}", "subdir": str(num)}
        for attempt in (1, 2):
            (source, slot), began = min(free.items(), key=lambda item: item[1])
            lines.append(journal.Start(time=began, **job, source=source, attempt=attempt, start=began,
                                       gpus=[slot] if source == "gpu-box" else []))
            ran = began
            if source == "cluster":
                ran = began + rng.uniform(1, 20)
                lines.append(journal.State(time=ran, **job, source=source, attempt=attempt, state="running",
                                           detail=f"Slurm job {num} running on node1"))
            finished = ran + rng.uniform(5, 60)
            lost = attempt == 1 and rng.random() < 0.02
            failed = not lost and rng.random() < 0.01
            lines.append(journal.End(time=finished, **job, source=source, attempt=attempt, start=began, end=finished,
                                     status="lost" if lost else "failed" if failed else "completed",
                                     failure_class=None, cause="ValueError: diverged" if failed else None,
                                     retrying=lost, value=None if lost or failed else {"loss": rng.random()}))
            free[(source, slot)] = finished
            if not lost:
                break
    lines.append(journal.LaunchEnd(time=max(free.values()), reason="completed"))
    folder = journal.private_folder(sweep_dir / journal.FOLDER)
    (folder / journal.FILE).write_text("".join(
        json.dumps({"event": record.EVENT, **asdict(record)}) + "\n" for record in lines))


@pytest.mark.timeout(120)
def test_a_report_of_10000_jobs_is_built_in_under_5_s_and_drawn_in_under_2_s(tmp_path: Path) -> None:
    write_big_journal(tmp_path, 10_000)
    began = time.perf_counter()
    path = report.write(tmp_path, report.sweep_report(tmp_path))
    built = time.perf_counter() - began
    with browser.chromium() as chromium:
        opened = browser.open_page(chromium, path)
        print(f"\n10,000 jobs: page built in {built:.2f} s ({path.stat().st_size / 1e6:.1f} MB), drawn in"
              f" {opened.seconds:.2f} s")
        assert built < 5, f"built in {built:.2f} s"
        assert opened.seconds < 2, f"drawn in {opened.seconds:.2f} s"
        attempts = sum(isinstance(record, journal.Start) for record in journal.records(tmp_path))
        assert attempts > 10_000 and opened.page.locator("g.attempt").count() == attempts
        assert opened.errors == [] and opened.requests == []


@pytest.mark.timeout(120)
def test_the_page_of_a_running_sweep_shows_its_running_attempts_and_reloads_itself(tmp_path: Path) -> None:
    """A launcher holds the sweep dir (its lock, taken here as a launcher takes it) and has not
    recorded its end: the open attempt is drawn as running up to now, and a page the launcher
    rewrites (report=true) reloads itself at that pace; the same page once the sweep ended does not."""
    records: list[journal.Record] = [launch(time.time() - 20, {"local": 2}), start(0, 1, "local", time.time() - 19),
                                     end(0, 1, "local", time.time() - 19, time.time() - 10, value=1.0),
                                     start(1, 1, "local", time.time() - 9)]
    folder = journal.private_folder(tmp_path / journal.FOLDER)
    (folder / journal.FILE).write_text("".join(
        json.dumps({"event": record.EVENT, **asdict(record)}) + "\n" for record in records))
    lock = journal.claim(tmp_path)
    try:
        path = report.write(tmp_path, report.sweep_report(tmp_path, rewritten_every=1))
    finally:
        os.close(lock)
    with browser.chromium() as chromium:
        opened = browser.open_page(chromium, path)
        assert sorted(browser.shown_attempts(opened)) == [(0, 1, "local", "completed"), (1, 1, "local", "running")]
        assert "reloads itself while the sweep runs" in opened.page.inner_text("#head")
        with opened.page.expect_event("load", timeout=10_000):
            pass  # the page reloads itself within a second or two
        report.write(tmp_path, report.sweep_report(tmp_path, rewritten_every=1))  # the launcher is gone
        opened.page.reload()
        opened.page.wait_for_function("document.documentElement.dataset.rendered === 'true'")
        assert opened.page.locator("#live").count() == 0
        assert browser.shown_attempts(opened)[-1] == (1, 1, "local", "interrupted")
        assert opened.errors == [] and opened.requests == []


def test_the_report_command_names_a_folder_that_is_not_a_sweep_and_a_machine_without_a_browser(
        tmp_path: Path) -> None:
    def report_command(*extra: str, browser_command: str = "true") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hsm_core.cli", "distributed", "report", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "BROWSER": browser_command, "DISPLAY": ""})

    shown = report_command()
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert f"{tmp_path} has no .hsm/journal.jsonl" in shown.stderr
    folder = journal.private_folder(tmp_path / journal.FOLDER)
    (folder / journal.FILE).write_text(json.dumps({"event": "launch", **asdict(launch(1, {"local": 1}))}) + "\n")
    opened = report_command("--open")  # BROWSER=true: a browser that opens anything
    assert opened.returncode == 0 and (folder / "report.html").exists(), opened.stderr
    assert opened.stdout == f"report: {(folder / 'report.html').as_uri()}\n"
    refused = report_command("--open", browser_command="false")  # none that can
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "hsm: no web browser here to open it. Fix: copy the page" in refused.stderr, refused.stderr
    (folder / journal.FILE).unlink()
    (folder / journal.FILE).mkdir()  # a journal that cannot be read (root reads any file)
    unreadable = report_command("--json")
    assert unreadable.returncode == 1 and "Traceback" not in unreadable.stderr
    assert "hsm: the sweep's journal cannot be read (Is a directory" in unreadable.stderr, unreadable.stderr
