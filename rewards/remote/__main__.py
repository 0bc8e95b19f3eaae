"""`python -m rewards.remote --reward story --host 127.0.0.1 --port 0`: serve a registered reward.

Prints `serving reward '<name>' on http://<host>:<port>` once bound (port 0 picks a free one).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from rewards import get_reward
from rewards.remote.server import make_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.remote", description=__doc__)
    parser.add_argument("--reward", required=True, help="a registered reward name, e.g. story, math, composite")
    parser.add_argument("--options", default="{}", help='the reward\'s options as a JSON object, e.g. \'{"target": 50}\'')
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; there is no auth)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--exit-after", type=float, default=None, help="stop serving after this many seconds")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    server = make_server(get_reward(args.reward, **options), args.host, args.port, reward_name=args.reward, verbose=args.verbose)
    if args.exit_after is not None:
        timer = threading.Timer(args.exit_after, server.shutdown)
        timer.daemon = True
        timer.start()
    print(f"serving reward {args.reward!r} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
