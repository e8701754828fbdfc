"""One sweep job inside a Slurm allocation: `python -m hsm_core.batch_job REQUEST_DIR`.

The request folder holds what a worker agent gets in a Run message, as files: `request.json`
(the session file, sys.path, working dir, sweep dir, environment) and `payload` (the job's
pickled config). The job runs exactly as a forked job does (`hydra_job.run_in_job_process`)
and leaves its outcome in `outcome`, which the login node's agent reads. Travels with the agent.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a plain file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hsm_core import hydra_job  # noqa: E402


def main(request_dir: str) -> int:
    with open(os.path.join(request_dir, "request.json")) as file:
        request = json.load(file)
    for entry in reversed(request["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    hydra_job.adopt_main(request["main"])
    with open(request["session"], "rb") as file:
        session = hydra_job.load_session(file.read())
    hydra_job.install_session(session)
    os.environ.update(request["env"])
    with open(os.path.join(request_dir, "payload"), "rb") as file:
        payload = file.read()
    return hydra_job.run_in_job_process(session, payload, request["cwd"], request["sweep_dir"],
                                        os.path.join(request_dir, "outcome"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
