"""One sweep job inside a Slurm allocation: `python -m hsm_core.batch_job FOLDER SESSION`.

The attempt's folder holds, as files (wire.AttemptFiles), what a worker agent gets as
messages: its session's OpenSession (shared by the batch's jobs) and its Run. The job runs
exactly as a forked job does (worker.enter_session, worker.run_job) and leaves its outcome
in the folder, for the login node's agent to take. Travels with the agent.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a plain file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsm_core import hydra_job, wire, worker  # noqa: E402


def main(folder: str, session_file: str) -> int:
    files = wire.AttemptFiles(folder, session_file)
    session = worker.enter_session(wire.read_message(files.session))
    hydra_job.install_session(session)
    return worker.run_job(session, wire.read_message(files.request), files.outcome)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
