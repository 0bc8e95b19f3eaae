"""A user's own reward from a file or an import path, without editing `rewards/`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rewards import get_reward
from rewards.loading import load_object

USER_FILE = textwrap.dedent("""
    def score(prompts, responses, **metadata):
        return [float(len(r)) for r in responses]

    class Contains:
        def __init__(self, word):
            self.word = word

        def __call__(self, prompts, responses, **metadata):
            return [float(self.word in r) for r in responses]
""")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_reward_from_a_file_relative_to_the_cwd(user_dir):
    reward = get_reward("my_rewards.py:score")
    assert reward(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]


def test_reward_class_from_a_file_is_built_with_the_options(user_dir):
    reward = get_reward(f"{user_dir}/my_rewards.py:Contains", word="cat")
    assert reward(["p", "q"], ["a cat", "a dog"]) == [1.0, 0.0]


def test_reward_from_an_import_path(user_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(user_dir))
    assert get_reward("my_pkg.rewards:score")(["p"], ["abc"]) == [3.0]


def test_file_found_on_sys_path_when_not_in_the_cwd(user_dir, tmp_path_factory, monkeypatch):
    """A Ray worker's cwd need not be the job's working dir, which is on its sys.path instead."""
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    monkeypatch.syspath_prepend(str(user_dir))
    assert get_reward("my_rewards.py:score")(["p"], ["ab"]) == [2.0]


def test_the_same_file_is_imported_once(user_dir):
    assert load_object("my_rewards.py:Contains") is load_object(f"{user_dir}/my_rewards.py:Contains")


@pytest.mark.parametrize("spec, error, match", [
    ("missing.py:score", FileNotFoundError, "'missing.py': no such file"),
    ("my_rewards.py:nope", AttributeError, "has no attribute 'nope'"),
    ("no_such_pkg.mod:fn", ImportError, "cannot import module 'no_such_pkg.mod'"),
    (":fn", ValueError, "expected '<module or file.py>:<attribute>'"),
])
def test_bad_specs_name_what_is_wrong(user_dir, spec, error, match):
    with pytest.raises(error, match=match):
        get_reward(spec)


def test_config_accepts_a_user_reward(user_dir):
    from align.config import compose

    cfg, _ = compose(["algo=grpo", "reward.name=my_rewards.py:Contains", "+reward.options.word=cat"])
    assert cfg.reward.name == "my_rewards.py:Contains"
    assert get_reward(cfg.reward.name, **cfg.reward.options)(["p"], ["cat"]) == [1.0]


@pytest.mark.timeout(300)
def test_ray_workers_load_the_file_from_the_job_working_dir(user_dir, tmp_path_factory):
    """A Ray worker started with the runtime env `working_dir` (what `align.launch` uploads) loads
    the same spec as the driver: the file travels with the working directory."""
    code = textwrap.dedent(f"""
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={{"working_dir": {str(user_dir)!r}}})

        @ray.remote
        def score():
            from rewards import get_reward
            return get_reward("my_rewards.py:Contains", word="cat")(["p", "q"], ["cat", "dog"])

        print("SCORES", ray.get(score.remote()))
        ray.shutdown()
    """)
    root = Path(__file__).resolve().parents[2]
    elsewhere = tmp_path_factory.mktemp("driver")  # the driver's cwd lacks the file
    env = {"PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=280, start_new_session=True)
    assert "SCORES [1.0, 0.0]" in done.stdout, done.stderr[-3000:]
