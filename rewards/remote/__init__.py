"""Remote reward: an HTTP service that serves any registered reward, and its client reward.

Serve:  python -m rewards.remote --reward story --port 8000   (binds 127.0.0.1 by default)
Score:  get_reward("remote", url="http://127.0.0.1:8000", timeout=30, retries=3, backoff=0.5)
"""

from rewards.remote.client import RemoteReward, RemoteRewardError
from rewards.remote.server import RequestError, make_server, parse_score_request

__all__ = ["RemoteReward", "RemoteRewardError", "RequestError", "make_server", "parse_score_request"]
