"""Another process than the launcher: given an attempt's handle (a `submitted` record of a
sweep's journal), adopt it on this machine's Slurm and watch it to its end, through the
public source API. Prints one JSON line: the events seen and the job's return value.

    python adopt_watcher.py HANDLE_JSON SWEEP_DIR
"""

from __future__ import annotations

import asyncio
import json
import sys

from hsm_core import wire
from hsm_core.jobs import Collected, Ended, Handle, Noticed
from hsm_core.launch import build_sources
from hsm_core.settings import load_settings
from hsm_core.sources.base import Session


async def watch(record: dict, sweep_dir: str) -> dict:
    handle = Handle(record["source"], record["key"], record["names"])
    opened = wire.read_message(handle.names["session"])  # the attempt's session, as its folder keeps it
    session = Session(opened.session_id, opened.blob, tuple(opened.sys_path), cwd=".", sweep_dir=sweep_dir,
                      main=opened.main)
    [source] = build_sources(load_settings({"local": {"enabled": False},
                                            "remotes": {handle.source: {"kind": "slurm", "host": "localhost"}}}))
    try:
        await source.prepare(session)
        adopted = await source.adopt(handle)
        seen, value = [], None
        async for event in source.watch(handle):
            seen.append(type(event).__name__ + (f":{event.state}" if isinstance(event, Noticed) else ""))
            if isinstance(event, (Ended, Collected)):
                value = event.result.job_return.return_value if event.result.job_return else event.result.error
        return {"adopted": adopted, "events": seen, "value": value}
    finally:
        await source.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(watch(json.loads(sys.argv[1]), sys.argv[2]))))
