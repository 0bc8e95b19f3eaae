"""A reward server that misbehaves on purpose, for the client's retry and timeout tests.

    python tests/rewards/flaky_server.py --fail-first 1 --status 503 --delay-first 0

The first `--fail-first` POSTs get `--status`; the first `--delay-first-n` POSTs sleep
`--delay-first` seconds before answering. GET /count reports how many POSTs arrived.
"""

from __future__ import annotations

import argparse
import threading
import time

from rewards import get_reward
from rewards.remote.server import ScoreHandler, make_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--delay-first", type=float, default=0.0)
    parser.add_argument("--delay-first-n", type=int, default=1)
    parser.add_argument("--exit-after", type=float, default=60.0)
    args = parser.parse_args()
    lock, seen = threading.Lock(), [0]

    class FlakyHandler(ScoreHandler):
        def do_GET(self):
            if self.path == "/count":
                self._reply(200, {"posts": seen[0]})
            else:
                super().do_GET()

        def do_POST(self):
            with lock:
                seen[0] += 1
                n = seen[0]
            if n <= args.delay_first_n:
                time.sleep(args.delay_first)
            if n <= args.fail_first:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(args.status, {"error": f"deliberate failure {n} of {args.fail_first}"})
            else:
                super().do_POST()

    server = make_server(get_reward("story"), reward_name="story", handler_class=FlakyHandler)
    timer = threading.Timer(args.exit_after, server.shutdown)
    timer.daemon = True
    timer.start()
    print(f"serving reward 'story' on {server.url}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
