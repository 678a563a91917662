"""save_adapter is atomic as a folder (loracuda.adapter_folder): killed at any instant, the folder
loads as the previous adapter or the new one (checked factor for factor), never one's config beside
the other's weights; the next save cleans whatever an interrupted one left; other files of the folder
survive every save and kill.

- Random kills: a forked child saves two adapters of ranks 2 and 5 alternately into one folder and is
  SIGKILLed at random instants, 60 times.
- Every step: a child dies at the k-th write-side step of one save (each fsync, rename, unlink), for
  every k, both directions (a over b, b over a); before the commit point the folder must still hold the
  old adapter, after it the new one.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import loracuda
from loracuda import adapter_folder
from atomic_save_worker import adapters
from tiny_models import mlp

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
# Files a training run keeps beside its adapter: they must survive every save and kill.
BYSTANDERS = {"README.md": b"# my run\n", "training_args.bin": b"\x00\x01args"}


@pytest.fixture(scope="module")
def expected():
    """{"a" | "b": {parameter name: tensor}} of the two adapters the worker saves."""
    return {name: {k: v.detach().clone() for k, v in m.named_parameters() if "lora_" in k} for name, m in adapters().items()}


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(TESTS, "atomic_save_worker.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def start(worker, command: str) -> int:
    worker.stdin.write(command + "\n")
    worker.stdin.flush()
    return int(worker.stdout.readline())


def reaped(worker) -> int:
    return int(worker.stdout.readline())


def which_adapter(folder, expected) -> str:
    """"a" or "b": the adapter the folder loads as, its factors equal bit for bit; fails otherwise."""
    model = mlp()
    loracuda.load_adapter(model, folder)  # raises if config and weights do not belong together
    got = {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}
    for name, want in expected.items():
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
            return name
    raise AssertionError(f"{folder} loads as neither adapter: ranks {[tuple(v.shape) for v in got.values()]}")


def put_bystanders(folder) -> None:
    os.makedirs(folder / "checkpoint-10", exist_ok=True)
    (folder / "checkpoint-10" / "state.txt").write_text("step 10")
    for name, data in BYSTANDERS.items():
        (folder / name).write_bytes(data)


def assert_bystanders(folder) -> None:
    for name, data in BYSTANDERS.items():
        assert (folder / name).read_bytes() == data, name
    assert (folder / "checkpoint-10" / "state.txt").read_text() == "step 10"


def assert_clean(folder) -> None:
    """Only the adapter's two files and the bystanders: no temporary, no journal."""
    assert set(os.listdir(folder)) == ADAPTER_FILES | set(BYSTANDERS) | {"checkpoint-10"}, sorted(os.listdir(folder))


def test_random_kills_leave_the_old_or_the_new_adapter(tmp_path, worker, expected):
    folder = tmp_path / "run"
    models = adapters()
    loracuda.save_adapter(models["a"], folder)
    put_bystanders(folder)
    rng = random.Random(1234)
    seen, leftovers = set(), 0
    kills = 60
    for i in range(kills):
        pid = start(worker, f"loop {folder}")
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        status = reaped(worker)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill {i}: the saver ended by itself ({status})"
        seen.add(which_adapter(folder, expected))
        assert_bystanders(folder)
        if set(os.listdir(folder)) - ADAPTER_FILES - set(BYSTANDERS) - {"checkpoint-10"}:
            leftovers += 1
        if i % 2:  # every other kill: the next save (here, not the next saver) must clean up
            name = "ab"[i % 4 == 1]
            loracuda.save_adapter(models[name], folder)
            assert_clean(folder)
            assert which_adapter(folder, expected) == name
    loracuda.save_adapter(models["b"], folder)
    assert_clean(folder)
    assert which_adapter(folder, expected) == "b"
    assert seen == {"a", "b"}, seen
    # Not asserted (timing-dependent), but shown with -s: how often a kill left something to clean.
    print(f"{kills} kills: {leftovers} left temporaries or a journal")


@pytest.mark.parametrize("old, new", [("a", "b"), ("b", "a")])
def test_a_kill_at_every_step_of_a_save(tmp_path, worker, expected, old, new):
    folder = tmp_path / "run"
    models = adapters()
    outcomes = []
    for k in range(1, 40):
        loracuda.save_adapter(models[old], folder)
        put_bystanders(folder)
        pid = start(worker, f"crash {folder} {k} {new}")
        status = reaped(worker)
        assert pid > 0 and os.WIFEXITED(status), status
        if os.WEXITSTATUS(status) == 0:  # the save has fewer than k steps: it completed
            assert which_adapter(folder, expected) == new
            assert_clean(folder)
            break
        assert os.WEXITSTATUS(status) == 17, status
        state = which_adapter(folder, expected)
        journal = os.path.exists(folder / adapter_folder.JOURNAL_NAME)
        outcomes.append((k, state, journal, sorted(set(os.listdir(folder)) - ADAPTER_FILES - set(BYSTANDERS))))
        # Once the new adapter is visible it stays so: old up to the commit point, new from it on.
        if len(outcomes) > 1 and outcomes[-2][1] == new:
            assert state == new, outcomes
        assert_bystanders(folder)
        if journal and os.geteuid() != 0:
            # A reader needs no write access to follow the journal.
            os.chmod(folder, 0o555)
            try:
                assert which_adapter(folder, expected) == state
            finally:
                os.chmod(folder, 0o755)
        # The next save rolls forward or cleans up, and writes its own adapter.
        loracuda.save_adapter(models[old], folder)
        assert_clean(folder)
        assert which_adapter(folder, expected) == old
    else:
        pytest.fail("the save never completed within 40 steps")
    states = [s for _, s, _, _ in outcomes]
    assert old in states and new in states, outcomes  # both sides of the commit point were hit
    assert any(j for _, _, j, _ in outcomes), outcomes  # some kill landed while the journal was pending


def test_stale_temporaries_of_older_saves_are_removed(tmp_path):
    """Leftovers of any interrupted save (older temporary names included) go at the next save; files
    that merely look alike stay."""
    model = adapters()["a"]
    folder = tmp_path / "run"
    loracuda.save_adapter(model, folder)
    stale = [".adapter_model.safetensors.k2j3h4.tmp", ".adapter_config.json.abc_12.tmp", ".loracuda_save.journal.ff.tmp"]
    keep = ["adapter_model.safetensors.tmp", ".adapter_model.safetensors.bak", "notes.tmp"]
    for name in stale + keep:
        (folder / name).write_bytes(b"junk")
    staging = folder / ".loracuda_save.0badc0de.tmp"  # a staging folder, with a writer's own temporary
    staging.mkdir()
    (staging / ".tmpAbC123").write_bytes(b"junk")
    (staging / "adapter_config.json").write_text("{}")
    (folder / adapter_folder.JOURNAL_NAME).write_text("not json")  # not ours: ignored by readers, removed by saves
    assert which_adapter(folder, {"a": {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}}) == "a"
    loracuda.save_adapter(model, folder)
    assert set(os.listdir(folder)) == ADAPTER_FILES | set(keep)


def test_a_journal_naming_other_files_is_ignored(tmp_path):
    """A reader follows only journals naming this library's own temporaries of the two adapter files."""
    model = adapters()["a"]
    folder = tmp_path / "run"
    loracuda.save_adapter(model, folder)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (folder / adapter_folder.JOURNAL_NAME).write_text(
        '{"token": "x", "renames": [["../secret.json", "adapter_config.json"], [".adapter_config.json.y.tmp", "../x"]]}'
    )
    want = {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}
    assert which_adapter(folder, {"a": want}) == "a"
