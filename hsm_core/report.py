"""The sweep's report: `<sweep_dir>/.hsm/report.html`, one page that needs no network, of where
the time went (every attempt on a timeline per source and slot, each source's use, the slow
and the retried jobs) and what the values say (return values against the swept parameters).

Built from the journal alone, so it serves a running, finished, interrupted or resumed sweep
alike. `sweep_report` is the page's data (also `hsm distributed report --json`); `page` puts
it into the page, whose own script (report_page/) draws it. Reads the journal's file only:
knows neither the scheduler nor the sources.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import functools
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hsm_core import files, journal
from hsm_core.jobs import NOT_DISPATCHED, Outcome

log = logging.getLogger(__name__)
FILE = "report.html"
PAGE_FOLDER = Path(__file__).parent / "report_page"
LISTED = 10  # the slowest jobs, the longest idle gaps
SHORTEST_GAP_S = 1.0  # idle time between a slot's attempts shorter than this is not a gap


def report_path(sweep_dir: Path) -> Path:
    return sweep_dir / journal.FOLDER / FILE


def write(sweep_dir: Path, data: dict[str, Any]) -> Path:
    """Write the sweep's report page of `data` (whole or not at all) and return its path."""
    path = report_path(sweep_dir)
    files.write_atomically(str(path), page(data).encode(), durable=False)
    return path


def sweep_report(sweep_dir: Path, rewritten_every: float | None = None) -> dict[str, Any]:
    """The report's data, as the journal has it now. `rewritten_every`: the launcher writes the
    page again that often, so while the sweep runs the page reloads itself."""
    data = build(journal.records(sweep_dir), running=journal.holder(sweep_dir) is not None, now=time.time())
    return {"sweep_dir": str(sweep_dir.absolute()), "rewritten_every": rewritten_every, **data}


def page(data: dict[str, Any]) -> str:
    """The self-contained page: its style, its data as JSON (`<` escaped, so no text in it can
    end the script element), its script."""
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    template, style, script = page_files()
    parts = {"STYLE": style, "SCRIPT": script, "TITLE": html.escape(f"Sweep {Path(data['sweep_dir']).name}"),
             "DATA": text}
    return re.sub(r"/\*(STYLE|SCRIPT|TITLE|DATA)\*/", lambda found: parts[found.group(1)],
                  template)  # one pass: no part's text is read as a mark


@functools.cache
def page_files() -> tuple[str, str, str]:
    """The page's template, style and script, read once (the launcher writes the page often)."""
    template, style, script = ((PAGE_FOLDER / name).read_text() for name in ("report.html", "report.css", "report.js"))
    return template, style, script


class ReportWriter:
    """Rewrites a sweep's report page while its batches run (`hydra.launcher.report=true`): every
    `every` seconds, and when the launcher asks (at a batch's end). Writes go one at a time, in
    order, on a thread of their own: reading a big journal takes a moment the event loop should
    not lose, and an older page must never land after a newer one."""

    def __init__(self, sweep_dir: Path, every: float) -> None:
        self.sweep_dir = sweep_dir
        self.every = every
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsm-report")
        self.pending: concurrent.futures.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failed = False  # said once: a disk that refuses the page does not fill the log

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.every, self._tick)

    def _tick(self) -> None:
        if self.pending is None or self.pending.done():  # else the last one is still being written
            self.pending = self.writer.submit(self._write)
        self.start()

    def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def write_now(self) -> None:
        """Write the page, after any write under way, and wait for it."""
        self.writer.submit(self._write).result()

    def close(self) -> None:
        self.writer.shutdown(wait=True)

    def _write(self) -> None:
        """Write the page; whatever keeps it from being written is said once, and never stops
        the sweep (a full disk, or a bug of the page's)."""
        try:
            write(self.sweep_dir, sweep_report(self.sweep_dir, self.every))
        except Exception as error:  # the page is a view: the sweep goes on without it
            if not self.failed:
                why = error.strerror if isinstance(error, OSError) and error.strerror else repr(error)
                log.warning(f"The report page cannot be written ({why}: {report_path(self.sweep_dir)}); the sweep"
                            " goes on without it")
            self.failed = True
        else:
            self.failed = False


# -- the data ----------------------------------------------------------------------------


@dataclass
class Attempt:
    """One attempt of a job on a source, as the page draws it (times: wall-clock seconds)."""

    job: str  # the job's key
    number: int  # the job's n-th attempt, counted across launches
    source: str
    launch: int  # the launch that followed it last
    queued: float  # handed to the source
    gpus: list[int] = field(default_factory=list)
    ran: float | None = None  # began to run: at `queued`, or once the machine's scheduler said so
    end: float | None = None
    outcome: str = "running"
    cause: str | None = None
    where: str | None = None
    adopted: bool = False  # a later launch took it over where an earlier one left it running
    told: bool = False  # the machine's scheduler (Slurm) said it pending: it waited until it said RUNNING
    lane: int = 0


@dataclass
class Launch:
    start: float
    sources: list[str]
    slots: dict[str, int]
    batch: bool  # a later batch of the launch before (an adaptive sweeper's), not a launch of its own
    end: float | None = None
    reason: str | None = None


def outcome_of(end: journal.End) -> str:
    """An ended attempt's colour on the page: completed, failed, retried (failed, then run
    again), or lost (its machine or link failed; run elsewhere unless retries ran out)."""
    if end.status == Outcome.FAILED.value and end.retrying:
        return "retried"
    return end.status


def build(records: Sequence[journal.Record], running: bool, now: float) -> dict[str, Any]:
    """The report's data from the journal's records. `running`: a launcher holds the sweep now,
    so its last launch's open attempts run on (else they were cut short: interrupted)."""
    launches: list[Launch] = []
    attempts: list[Attempt] = []
    following: dict[str, Attempt] = {}  # by job key: its attempt without an end yet
    jobs: dict[str, dict[str, Any]] = {}
    changes: list[dict[str, Any]] = []
    last_time = records[0].time if records else now
    for record in records:
        if isinstance(record, journal.Launch):
            if launches and launches[-1].end is None:  # killed: it ended with its last record
                launches[-1].end = last_time
            launches.append(Launch(record.time, list(record.sources), dict(record.slots), batch=record.first > 0))
        elif isinstance(record, journal.LaunchEnd) and launches:
            launches[-1].end, launches[-1].reason = record.time, record.reason
        elif isinstance(record, journal.SourceChange):
            changes.append({"source": record.source, "change": record.change, "reason": record.reason,
                            "time": record.time})
        elif isinstance(record, journal.Moved) and record.hash in jobs:
            jobs[record.hash]["subdir"] = record.subdir
        elif isinstance(record, journal.AttemptRecord):
            job = jobs.setdefault(record.hash, {"key": record.hash, "attempts": 0, "status": "running",
                                                "value": None, "cause": None})
            job.update(num=record.num, overrides=list(record.overrides), subdir=record.subdir)
            attempt = following.get(record.hash)
            if isinstance(record, journal.Start):
                if not (attempt and attempt.source == record.source and attempt.launch < len(launches) - 1
                        and record.start <= launches[-1].start):  # else: an earlier launch's attempt, held again
                    if attempt:  # an earlier launch's, never ended: it stopped with that launch
                        cut_short(attempt, launches[attempt.launch].end or record.time)
                    job["attempts"] += 1
                    attempt = Attempt(record.hash, job["attempts"], record.source, 0, record.start, list(record.gpus))
                    attempts.append(attempt)
                    following[record.hash] = attempt
                attempt.launch = len(launches) - 1
                job["status"] = "running"
            elif isinstance(record, journal.State) and attempt:
                attempt.where = record.detail
                if record.state == "pending":
                    attempt.told = True
                elif record.state == "running" and attempt.ran is None:
                    attempt.ran = record.time
            elif isinstance(record, journal.Adopted) and attempt:
                attempt.adopted = True
            elif isinstance(record, journal.End):
                ended(record, job, following.pop(record.hash, None), attempts)
        last_time = record.time
    live = running and bool(launches) and launches[-1].reason is None  # its last launch goes on now
    if launches and launches[-1].end is None:
        launches[-1].end = now if live else last_time
    for attempt in following.values():  # no end recorded
        cut_short(attempt, launches[attempt.launch].end or now if launches else last_time)
        if live and attempt.launch == len(launches) - 1:
            attempt.outcome = "running"
        jobs[attempt.job]["status"] = attempt.outcome
    for job in jobs.values():
        if job["status"] == "retrying" and not live:  # to run again, but its launch ended first
            job["status"] = "interrupted"
    return arranged(launches, attempts, jobs, changes, live, now)


def cut_short(attempt: Attempt, at: float) -> None:
    """An attempt with no end recorded: its launch stopped it at `at` (if it runs on, the caller
    says so)."""
    attempt.end, attempt.outcome = at, "interrupted"
    if attempt.ran is None and not attempt.told:
        attempt.ran = attempt.queued


def ended(record: journal.End, job: dict[str, Any], attempt: Attempt | None, attempts: list[Attempt]) -> None:
    """An End record: the attempt's outcome, and the job's status (a job that never reached a
    source, its config not composed or no source left, has no attempt on the timeline)."""
    job.update(status="retrying" if record.retrying else record.status, cause=record.cause,
               value=record.value if record.status == Outcome.COMPLETED.value else None)
    if attempt is None:
        if record.source == NOT_DISPATCHED:
            return
        job["attempts"] += 1
        attempt = Attempt(record.hash, job["attempts"], record.source, 0, record.start)
        attempts.append(attempt)
    attempt.end, attempt.outcome, attempt.cause = record.end, outcome_of(record), record.cause
    attempt.where = record.where or attempt.where
    if attempt.ran is None:
        attempt.ran = attempt.end if attempt.told else attempt.queued


def arranged(launches: list[Launch], attempts: list[Attempt], jobs: dict[str, dict[str, Any]],
             changes: list[dict[str, Any]], live: bool, now: float) -> dict[str, Any]:
    """Lanes, each source's use, parameters and values, with times from the first launch."""
    origin = launches[0].start if launches else min((attempt.queued for attempt in attempts), default=now)
    lanes, sources = laid_out(launches, attempts)
    params, fixed = swept_parameters(list(jobs.values()))
    metrics: list[str] = []
    job_rows = []
    for job in sorted(jobs.values(), key=lambda job: job["num"]):
        numbers = numeric_values(job["value"])
        metrics += [name for name in numbers if name not in metrics]
        job_rows.append(without_empty({
            "num": job["num"], "key": job["key"], "overrides": job["overrides"], "subdir": job["subdir"],
            "params": parameter_values(job["overrides"], params), "status": job["status"],
            "attempts": job["attempts"], "value": job["value"], "cause": job["cause"],
        }))
    num_of = {job["key"]: job["num"] for job in jobs.values()}

    def at(moment: float | None) -> float | None:
        return None if moment is None else round(moment - origin, 3)

    attempt_rows = [without_empty({
        "job": num_of[attempt.job], "attempt": attempt.number, "source": attempt.source, "lane": attempt.lane,
        "gpus": attempt.gpus, "queued": at(attempt.queued), "ran": at(attempt.ran), "end": at(attempt.end),
        "outcome": attempt.outcome, "cause": attempt.cause, "where": attempt.where, "adopted": attempt.adopted,
    }) for attempt in attempts]
    return {
        "generated": now,
        "origin": origin,
        "state": state(launches, live),
        "launches": [{"start": at(launch.start), "end": at(launch.end), "reason": launch.reason,
                      "sources": launch.sources, "batch": launch.batch} for launch in launches],
        "lanes": lanes,
        "sources": sources,
        "attempts": attempt_rows,
        "jobs": job_rows,
        "params": params,
        "fixed": fixed,
        "metrics": metrics,
        "slowest": [row for row in sorted(attempt_rows, key=run_time, reverse=True)[:LISTED] if run_time(row) > 0],
        "idle_gaps": [{**gap, "start": at(gap["start"]), "end": at(gap["end"])} for gap in idle_gaps(
            launches, attempts, lanes)],
        "source_changes": [{**change, "time": at(change["time"])} for change in changes],
        "summary": {status: sum(job["status"] == status for job in jobs.values())
                    for status in ("completed", "failed", "lost", "retrying", "running", "interrupted")},
    }


def without_empty(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its empty fields (None, false, []): a page of 10,000 jobs loads faster."""
    return {key: value for key, value in row.items() if value is not None and value is not False and value != []}


def state(launches: list[Launch], live: bool) -> str:
    """How the last launch ended, or that it runs."""
    if live:
        return "running"
    if not launches:
        return "no launch recorded"
    return launches[-1].reason or "ended without a record (the launcher was killed, or its machine stopped)"


def run_time(row: dict[str, Any]) -> float:
    return float(row["end"] - row["ran"]) if "end" in row and "ran" in row else 0.0


def laid_out(launches: list[Launch], attempts: list[Attempt]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each source's lanes (a slot each; with GPUs, one per set of GPU ids the jobs had), each
    attempt in the first lane free when it was handed over; and each source's use: busy
    slot-time over the slot-time its launches offered."""
    names = list(dict.fromkeys([*(name for launch in launches for name in launch.sources),
                                *(attempt.source for attempt in attempts)]))
    lanes: list[dict[str, Any]] = []
    sources = []
    for name in names:
        own = sorted((attempt for attempt in attempts if attempt.source == name), key=lambda attempt: attempt.queued)
        slots = max((launch.slots.get(name, 0) for launch in launches if name in launch.sources), default=0)
        slot_ends: list[float] = []  # of each slot lane, when its last attempt ended
        slot_of: dict[int, int] = {}
        gpu_sets: dict[tuple[int, ...], int] = {}
        for index, attempt in enumerate(own):
            if attempt.gpus:
                gpu_sets.setdefault(tuple(attempt.gpus), len(gpu_sets))
                continue
            free = next((lane for lane, ends in enumerate(slot_ends) if ends <= attempt.queued + 1e-6), None)
            if free is None and 0 < slots <= len(slot_ends):
                # The slot freed when the job's process ended; its record ends once its outputs are in.
                free = slot_ends.index(min(slot_ends))
            elif free is None:
                free = len(slot_ends)
                slot_ends.append(0.0)
            slot_ends[free] = max(slot_ends[free], attempt.end or attempt.queued)
            slot_of[index] = free
        first = len(lanes)
        lanes += [{"source": name, "label": f"slot {lane + 1}"} for lane in range(len(slot_ends))]
        ordered_sets = sorted(gpu_sets)
        lanes += [{"source": name, "label": ("GPU " if len(ids) == 1 else "GPUs ") + ",".join(map(str, ids))}
                  for ids in ordered_sets]
        for index, attempt in enumerate(own):
            attempt.lane = (first + len(slot_ends) + ordered_sets.index(tuple(attempt.gpus)) if attempt.gpus
                            else first + slot_of[index])
        lane_count = len(lanes) - first
        offered = sum((launch.end or launch.start) - launch.start for launch in launches if name in launch.sources)
        slots = slots or lane_count
        # When each began to run (one that never did waited to its end): busy after, waiting before.
        spans = [(attempt.queued, attempt.end if attempt.ran is None else attempt.ran, attempt.end) for attempt in own]
        busy = sum(max(0.0, (ended or 0.0) - (began or 0.0)) for _, began, ended in spans)
        waited = sum(max(0.0, (began or 0.0) - queued) for queued, began, _ in spans)
        available = slots * offered
        sources.append({
            "name": name, "slots": slots, "lanes": [first, len(lanes)], "attempts": len(own),
            "outcomes": {outcome: sum(attempt.outcome == outcome for attempt in own)
                         for outcome in ("completed", "failed", "retried", "lost", "running", "interrupted")},
            "busy": round(busy, 3), "waiting": round(waited, 3), "available": round(available, 3),
            "utilisation": round(min(1.0, busy / available), 4) if available > 0 else None,
            "mean_run": round(busy / len(own), 3) if own else None,
        })
    return lanes, sources


def idle_gaps(launches: list[Launch], attempts: list[Attempt], lanes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The longest stretches of a lane with no attempt while a launch offered it (a slot that was
    never used, a GPU that sat free, a tail where the last jobs ran alone)."""
    by_lane: dict[int, list[tuple[float, float]]] = {}
    for attempt in attempts:
        by_lane.setdefault(attempt.lane, []).append((attempt.queued, attempt.end or attempt.queued))
    gaps = []
    for lane, spans in by_lane.items():
        spans.sort()
        starts = [start for start, _ in spans]
        for launch in launches:
            if lanes[lane]["source"] not in launch.sources or launch.end is None:
                continue
            cursor = launch.start
            for start, end in spans[max(0, bisect.bisect_left(starts, launch.start) - 1):]:
                if start >= launch.end:
                    break
                if start - cursor >= SHORTEST_GAP_S:
                    gaps.append((start - cursor, lane, cursor, start))
                cursor = max(cursor, end)
            if launch.end - cursor >= SHORTEST_GAP_S:
                gaps.append((launch.end - cursor, lane, cursor, launch.end))
    gaps.sort(reverse=True)
    return [{"source": lanes[lane]["source"], "lane": lanes[lane]["label"], "start": start, "end": end,
             "seconds": round(length, 3)} for length, lane, start, end in gaps[:LISTED]]


# -- parameters and values ---------------------------------------------------------------------


def override_items(overrides: Sequence[str]) -> dict[str, str]:
    """`lr=0.1`, `+extra=1`, `~gone` as {name: value} (a deletion's value is empty)."""
    return {key.lstrip("+~"): value for key, _, value in (item.partition("=") for item in overrides)}


def swept_parameters(jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The overrides whose value differs between jobs, each numeric (every value a number; `log`
    when all are positive and span two decades or more) or categorical (its values in order of
    first use); and those that every job shares."""
    seen: dict[str, dict[str, None]] = {}  # each key's values, in order of first use
    present: collections.Counter[str] = collections.Counter()  # jobs that set the key
    for job in sorted(jobs, key=lambda job: job["num"]):
        for key, value in override_items(job["overrides"]).items():
            seen.setdefault(key, {})[value] = None
            present[key] += 1
    params: list[dict[str, Any]] = []
    fixed: dict[str, str] = {}
    for key, distinct in seen.items():
        values = list(distinct)
        if len(values) == 1 and present[key] == len(jobs):
            fixed[key] = values[0]
            continue
        numbers = [found for found in map(number, values) if found is not None]
        if len(numbers) == len(values):
            low, high = min(numbers), max(numbers)
            params.append({"name": key, "kind": "numeric", "log": bool(low and low > 0 and high / low >= 100)})
        else:
            params.append({"name": key, "kind": "categorical", "values": values})
    return params, fixed


def number(text: str) -> float | None:
    try:
        found = float(text)
    except ValueError:
        return None
    return found if found == found and abs(found) != float("inf") else None


def parameter_values(overrides: Sequence[str], params: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's value of each swept parameter (a number where the parameter is numeric)."""
    items = override_items(overrides)
    values: dict[str, Any] = {}
    for param in params:
        value = items.get(param["name"])
        values[param["name"]] = number(value) if value is not None and param["kind"] == "numeric" else value
    return values


def numeric_values(value: Any) -> dict[str, float]:
    """A return value's numbers by name: `value` for a plain number, a mapping's own names."""
    def numeric(item: Any) -> bool:
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if numeric(value):
        return {"value": value}
    if isinstance(value, dict):
        return {name: item for name, item in value.items() if numeric(item)}
    return {}
