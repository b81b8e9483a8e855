"""A named RewardPool on a three-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine): its two
replicas spread over the two worker nodes, then one worker node removed while requests stream in.

The cluster: a head node with no CPU (the driver, Serve's controller and zero-CPU actors live there) and
two worker nodes of 1 fake CPU each, so ``placement="spread"`` puts one replica (1 CPU) on each worker.
A lost host is its replica process SIGKILLed (with the parts it holds) and its node removed at once
(``cluster.remove_node``: raylet, object store and the rest). Every score is checked against
``RewardModel.score`` on the same tiny checkpoint (fp32, this process).

The cluster helper normally writes its address to /tmp/ray/ray_current_cluster (and deletes that file
at shutdown), which would make other jobs' ``ray.init()`` on this machine join this test's cluster: the
fixture keeps that file alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import random_image, text_of_length

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from rewardplug import RewardModel, RewardPool  # noqa: E402

TOL = 1e-5  # fp32 scores through the pool against the model alone
OPTS = dict(dtype="float32", image_roots=None)
POOL = "nodes-test"
REQUEST_TIMEOUT_S = 150.0  # the pool's deadline: a request past it fails with PoolTimeoutError
ANSWER_BOUND_S = 90.0  # what this test allows any request, node loss included (a lost node is seen in ~15-30 s)
CONCURRENT = 4  # requests the streaming thread keeps in flight
AFTER_REMOVAL = 8  # requests submitted after the node is gone, all of which must be answered too
NODE_OPTS = dict(object_store_memory=100 * 2**20, include_dashboard=False)

pytestmark = pytest.mark.timeout(720)


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPU) + two worker nodes (1 CPU each), the driver connected to the head."""
    if ray.is_initialized():  # another module's cluster
        serve.shutdown()
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
        c = cluster_utils.Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, **NODE_OPTS))
        try:
            for _ in range(2):
                c.add_node(num_cpus=1, **NODE_OPTS)
            c.wait_for_nodes()
            ray.init(address=c.address, namespace="rewardplug", log_to_driver=False)
            yield c
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                c.shutdown()


def request_samples(seed: int) -> list[dict]:
    """Two prompt groups of 4 completions, one picture each (the same PIL object in a group): every
    request is new content, so no replica answers it from a cache."""
    rng = random.Random(seed)
    out = []
    for g in range(2):
        image = random_image(112, 112 - 8 * g, seed=seed * 10 + g)
        prompt = f"Request {seed}, group {g}: what is in the picture?"
        out += [{"prompt": prompt, "images": [image],
                 "completion": f"{k}: " + text_of_length(rng.randint(20, 200), seed * 97 + 13 * g + k)}
                for k in range(4)]  # fmt: skip
    return out


class Stream:
    """A thread that keeps CONCURRENT requests in flight until stopped; records each request's samples,
    how many times its future was resolved, its outcome and its latency."""

    def __init__(self, pool):
        self.pool = pool
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.stop = threading.Event()
        self.room = threading.Semaphore(CONCURRENT)
        self.thread = threading.Thread(target=self._run, name="nodes-test-stream", daemon=True)

    def _run(self):
        seed = 0
        while not self.stop.is_set():
            if not self.room.acquire(timeout=0.5):
                continue
            seed += 1
            record = {"seed": seed, "samples": request_samples(seed), "resolved": 0, "t0": time.monotonic()}
            with self.lock:
                self.requests.append(record)
            try:
                future = self.pool.submit(record["samples"])
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                self._done(record, None, e)
                continue
            future.add_done_callback(lambda f, r=record: self._done(r, f, None))

    def _done(self, record, future, error):
        with self.lock:
            record["resolved"] += 1
            record["latency_s"] = time.monotonic() - record["t0"]
            if error is None:
                error = future.exception()
            record["error"] = error
            record["scores"] = None if error is not None else future.result()
        self.room.release()

    def answered(self) -> int:
        with self.lock:
            return sum(r["resolved"] > 0 for r in self.requests)

    def wait_answered(self, n: int, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while self.answered() < n:
            assert time.monotonic() < deadline, f"{what}: only {self.answered()} of {n} requests answered in {timeout}s"
            time.sleep(0.1)


def within(seconds: float, fn, what: str):
    """``fn()``, or a failure naming ``what`` if it has not returned within ``seconds`` (a hang would
    otherwise show only as the test's timeout)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised below, in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, name=f"nodes-test {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} did not return within {seconds:g}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def replica_nodes(pool, timeout: float = 120) -> dict[str, str]:
    """replica id -> node id, from the replicas' own reports (``stats()``), once both have reported."""
    deadline = time.monotonic() + timeout
    while True:
        reports = pool.stats()["replicas"]
        if len(reports) >= 2:
            return {r["replica"]: r["node"] for r in reports}
        assert time.monotonic() < deadline, f"two replicas never reported within {timeout}s: {reports}"
        time.sleep(0.5)


def pick_victim(cluster, nodes: dict[str, str]) -> tuple[str, str, list[str]]:
    """The replica whose node goes, and the other live actors on that node: a replica node that also
    holds any other actor (Ray places zero-CPU actors such as a pool's bookkeeping where it likes) is
    preferred, so that whatever the pool keeps there is lost with the node too."""
    on_node: dict[str, list[str]] = {}
    for actor in cluster.global_state.actor_table(None).values():
        if actor["State"] == "ALIVE" and not actor["ActorClassName"].startswith("ServeReplica:"):
            on_node.setdefault(actor["Address"]["NodeID"], []).append(actor["Name"] or actor["ActorClassName"])
    replica, node = max(sorted(nodes.items()), key=lambda item: len(on_node.get(item[1], [])))
    return replica, node, on_node.get(node, [])


def holding_replica_pid(pool, replica: str, timeout: float = 30) -> int:
    """The replica's pid, once a fresh report (under 1 s old) shows it holding samples, so that the loss
    catches parts in flight there (after ``timeout`` the pid anyway: the test checks re-sends below)."""
    deadline = time.monotonic() + timeout
    while True:
        (report,) = [r for r in pool.stats()["replicas"] if r["replica"] == replica]
        fresh = report.get("age_s", time.time() - report.get("reported_at", 0)) < 1.0
        if (fresh and report.get("inflight_samples", 0) > 0) or time.monotonic() > deadline:
            return report["pid"]
        time.sleep(0.05)


def test_node_removed_under_load_every_request_answered_once_with_model_scores(cluster, tiny_path, tmp_path):
    workers = {n.node_id: n for n in cluster.worker_nodes}
    pool = RewardPool(str(tiny_path), name=POOL, num_replicas=2, gpus_per_replica=0, cpus_per_replica=1,
                      placement="spread", request_timeout_s=REQUEST_TIMEOUT_S, **OPTS)  # fmt: skip
    stream = None
    try:
        # Placement: one replica on each worker node (the head has no CPU for one).
        nodes = replica_nodes(pool)
        print(f"\nreplicas and their nodes: {nodes}; worker nodes {sorted(workers)}; head {cluster.head_node.node_id}")
        assert len(set(nodes.values())) == 2, f"placement='spread' put both replicas on one node: {nodes}"
        assert set(nodes.values()) == set(workers), f"replicas not on the worker nodes {sorted(workers)}: {nodes}"
        health_nodes = {h.get("node") for h in pool.health() if h.get("alive", True)}
        assert health_nodes == set(workers), f"health() disagrees with stats() on the replicas' nodes: {health_nodes}"

        stream = Stream(pool)
        stream.thread.start()
        # Load on both replicas before the loss: both have scored samples of the stream.
        stream.wait_answered(6, 240, "before the node removal")
        victim_replica, victim_node, others = pick_victim(cluster, nodes)
        deadline = time.monotonic() + 60
        while True:
            scored = {r["replica"]: r["engine"].get("samples", 0) for r in pool.stats()["replicas"]}
            if len(scored) == 2 and all(scored.values()):
                break
            assert time.monotonic() < deadline, f"the stream never reached both replicas: samples per replica {scored}"
            time.sleep(0.2)

        # A lost host takes its processes down at once: the replica is SIGKILLed with its node (removing the
        # node alone lets the replica process finish most parts it holds before it notices its raylet is gone).
        victim_pid = holding_replica_pid(pool, victim_replica)
        with stream.lock:
            submitted_before = len(stream.requests)
        t_removed = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        cluster.remove_node(workers[victim_node], allow_graceful=False)
        print(f"node removed {time.monotonic() - t_removed:.1f}s after the kill", flush=True)
        print(f"removed worker node {victim_node} (replica {victim_replica}; other actors there: {others or 'none'}) "
              f"with {submitted_before} requests submitted, {stream.answered()} answered; samples per replica so far "
              f"{scored}", flush=True)  # fmt: skip

        # The stream goes on: AFTER_REMOVAL more requests, submitted after the loss, all answered.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 60
        while True:
            with stream.lock:
                submitted = len(stream.requests)
            if submitted >= submitted_before + AFTER_REMOVAL:
                break
            assert time.monotonic() < deadline, f"the stream stalled after the node removal ({submitted} submitted)"
            time.sleep(0.1)
        stream.stop.set()
        stream.thread.join(30)
        assert not stream.thread.is_alive(), "the streaming thread did not stop"
        with stream.lock:
            total = len(stream.requests)
        print(f"{total} requests submitted; waiting for their answers", flush=True)
        stream.wait_answered(total, REQUEST_TIMEOUT_S + 60, "after the node removal")
        time.sleep(0.5)  # a second resolution of any future would show up here
        after_s = time.monotonic() - t_removed

        requests = list(stream.requests)
        twice = [(r["seed"], r["resolved"]) for r in requests if r["resolved"] != 1]
        assert not twice, f"requests resolved other than exactly once (request, times): {twice}"
        failed = [(r["seed"], f"{type(r['error']).__name__}: {r['error']}") for r in requests if r["error"] is not None]
        assert not failed, f"{len(failed)} of {total} requests failed across the node loss, e.g. {failed[:3]}"
        slowest = max(r["latency_s"] for r in requests)
        try:
            counters = within(60, pool.stats, "pool.stats() after the node loss")
        except Exception as e:  # noqa: BLE001 - the assertion says what broke
            raise AssertionError(f"pool.stats() failed after the node loss (the pool's state did not outlive "
                                 f"the node): {type(e).__name__}: {e}") from e
        print(f"{total} requests ({8 * total} samples), {total - submitted_before} submitted after the removal; "
              f"slowest answer {slowest:.1f}s; all answered {after_s:.1f}s after the removal; handle counters: "
              f"retries {counters.get('retries')}, hedges {counters.get('hedges')}, "
              f"timeouts {counters.get('timeouts')}")
        assert slowest <= ANSWER_BOUND_S, f"a request took {slowest:.1f}s (bound {ANSWER_BOUND_S}s)"
        assert counters.get("retries", 0) + counters.get("hedges", 0) >= 1, (
            f"no part was re-sent: the removed node held no request, so this run did not test the loss ({counters})")

        # Every score equals the model's own, in this process.
        reference_model = RewardModel.from_pretrained(tiny_path, device="cpu", **OPTS)
        samples = [s for r in requests for s in r["samples"]]
        got = [x for r in requests for x in r["scores"]]
        expected = reference_model.score(samples)
        worst = max(range(len(samples)), key=lambda k: abs(got[k] - expected[k]))
        assert abs(got[worst] - expected[worst]) <= TOL, (
            f"sample {worst}: pool {got[worst]} vs RewardModel.score {expected[worst]} (tolerance {TOL})")

        # A new process finds the pool by name, with its options, and scores through it.
        probe = {"prompt": "Is there a picture?", "completion": "Yes, noise.", "image_seed": 4}
        found = connect_from_new_process(cluster.address, probe, tmp_path)
        assert found["model"] == str(tiny_path) and found["num_replicas"] == 2 and found["placement"] == "spread", found
        assert found["gpus_per_replica"] == 0 and found["model_options"] == OPTS, found
        probe_image = random_image(80, 80, seed=probe["image_seed"])
        expected_probe = reference_model.score([{"prompt": probe["prompt"], "completion": probe["completion"],
                                                 "images": [probe_image]}])[0]  # fmt: skip
        assert abs(found["score"] - expected_probe) <= TOL, f"new process: {found['score']} vs model {expected_probe}"
    finally:
        if stream is not None:
            stream.stop.set()
        within(120, pool.shutdown, "pool.shutdown()")


def connect_from_new_process(address: str, probe: dict, tmp_path) -> dict:
    """``RewardPool.connect(POOL, address=...)`` in a new Python process: the pool's options and one score."""
    script = tmp_path / "connect.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import random_image
        from rewardplug import RewardPool

        probe = {probe!r}
        pool = RewardPool.connect({POOL!r}, address={address!r})
        c = pool.config
        score = pool.score([{{"prompt": probe["prompt"], "completion": probe["completion"],
                             "images": [random_image(80, 80, seed=probe["image_seed"])]}}], request_timeout_s=120)[0]
        print("FOUND " + json.dumps({{"model": c.model, "num_replicas": c.num_replicas, "placement": c.placement,
                                     "gpus_per_replica": c.gpus_per_replica, "model_options": c.model_options,
                                     "score": score}}))
        pool.close()
    """))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FOUND ")]
    assert done.returncode == 0 and lines, (
        f"a new process could not connect to pool {POOL!r} after the node loss (exit {done.returncode}):\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("FOUND "):])
