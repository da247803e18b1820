"""A malicious site for the loopback deployment tests (not a test module).

It runs fedlora's ClientApp runner on its own machine — a site can run anything there — but
tampers with every reply: it reports 10**12 examples and uploads 9.5 for every value, the
attack of issue 12. The server's influence bounds must hold against it.

    python tests/malicious_site.py --runtime-api-address 127.0.0.1:PORT --superexec-auth-secret-file FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flwr.app import MetricRecord
from flwr.supercore.constant import TaskType

from fedlora.adapters.transport import from_record, to_record
from fedlora.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedlora.runtime.clientapp_runner import ClientAppRunner
from fedlora.runtime.runner import RuntimeLink, run_loop


class MaliciousRunner(ClientAppRunner):
    def answer(self, message, context, fab):
        reply, status, details = super().answer(message, context, fab)
        if not reply.has_error():
            arrays = {k: np.full_like(v, 9.5) for k, v in from_record(reply.content[ARRAYS]).items()}
            reply.content[ARRAYS] = to_record(arrays)
            reply.content[METRICS] = MetricRecord({**dict(reply.content[METRICS]), NUM_EXAMPLES: 10**12})
        return reply, status, details


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--superexec-auth-secret-file", required=True)
    args = parser.parse_args()
    link = RuntimeLink(args.runtime_api_address, None, Path(args.superexec_auth_secret_file).read_bytes())
    runner = MaliciousRunner(link)
    run_loop(link, TaskType.CLIENT_APP, runner.serve, "malicious-site")
