"""Measurements shared by the long-running tests of both hosts (tests/integration/test_webui_soak.py,
tests/integration_sdnext/test_sdnext_soak.py): a webui's resident memory from ``/proc``, its growth per 100
jobs, LoRA changes between jobs, and many clients sending at once while the status route is polled."""

import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest

from .api_checks import assert_accelerated
from .webui_server import WebUI

# Resident memory growth allowed per 100 jobs over a soak's second half, when it must have levelled off: the
# first jobs fill the webui's own caches (loaded LoRAs, upscalers, pipelines), and samples scatter by +-30 MB
# (the allocator) around a level line. A leak of 0.5 MB a job (a LoRA backup of a tiny UNet's attention layers;
# a kept copy of its weights is several MB) crosses it.
MAX_GROWTH_MB_PER_100_JOBS = 50.0
STATUS_POLL_S = 0.2


def skip_without_proc():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the soak reads the webui's memory from /proc (Linux)")


def resident_memory(pid: int) -> Tuple[float, int]:
    """(resident memory in MB, threads) of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["Threads"][0])


def growth_per_100_jobs(samples: List[Tuple[int, float]]) -> float:
    """The least-squares slope of (job number, MB) samples, per 100 jobs."""
    jobs, megabytes = np.array([s[0] for s in samples], float), np.array([s[1] for s in samples], float)
    return float(np.polyfit(jobs, megabytes, 1)[0] * 100)


def lora_changes(previous: Dict[str, float], current: Dict[str, float]) -> int:
    """LoRAs added, removed or reweighted from one job to the next."""
    return sum(previous.get(name) != current.get(name) for name in set(previous) | set(current))


def assert_memory_levels_off(memory: List[Tuple[int, float, int]], jobs: int, host_growth: float = 0.0) -> str:
    """``memory``: (job number, MB, threads) samples from job 0 (after the warm-up) to ``jobs``. The thread
    count must not grow and the second half's growth must stay under :data:`MAX_GROWTH_MB_PER_100_JOBS` above
    ``host_growth``, what the webui grows per 100 of the same jobs without the extension's script (a webui that
    grows by itself); returns the figures as text."""
    megabytes = [(number, mb) for number, mb, _ in memory]
    growth = growth_per_100_jobs(megabytes)
    late_growth = growth_per_100_jobs([sample for sample in megabytes if sample[0] >= jobs // 2])
    text = (f"resident memory (job, MB, threads): {[(n, round(mb, 1), t) for n, mb, t in memory]}\n"
            f"growth per 100 jobs: {growth:.1f} MB over the soak, {late_growth:.1f} MB over its second half"
            + (f", {host_growth:.1f} MB for the same jobs without the script" if host_growth else ""))
    assert memory[-1][2] <= memory[0][2] + 2, f"the webui's thread count grew: a thread per job is left behind\n{text}"
    assert late_growth <= host_growth + MAX_GROWTH_MB_PER_100_JOBS, f"resident memory keeps growing\n{text}"
    return text


def eager_growth(webui: WebUI, requests: Sequence[Tuple[str, dict]], memory_every: int = 5) -> float:
    """Resident memory growth per 100 jobs of the webui by itself: ``requests`` (path, body) sent without the
    script, memory sampled every ``memory_every`` jobs."""
    samples = [(0, resident_memory(webui.process.pid)[0])]
    for number, (path, body) in enumerate(requests, start=1):
        webui.post_ok(path, body)
        if number % memory_every == 0:
            samples.append((number, resident_memory(webui.process.pid)[0]))
    return growth_per_100_jobs(samples)


def images_alone(webui: WebUI, requests: List[Tuple[str, str, dict]]) -> List[np.ndarray]:
    """The image of each (name, path, body), sent one after the other."""
    return [WebUI.image(webui.post_ok(path, body)) for _, path, body in requests]


@dataclasses.dataclass
class SoakRun:
    """What :func:`run_soak` saw: (job number, what was compared) for the jobs compared with their eager twin,
    (job number, MB, threads) memory samples, the soak's seconds, and the status route before and after."""

    compared: List[Tuple[int, str]]
    memory: List[Tuple[int, float, int]]
    seconds: float
    before: Dict[str, Any]
    after: Dict[str, Any]

    def graphs_compiled(self) -> int:
        return self.after["dynamo_graphs_total"] - self.before["dynamo_graphs_total"]


def run_soak(webui: WebUI, jobs: Sequence[Any], send: Callable[[Any], dict], compare: Callable[[Any, dict], str],
             compare_every: int = 10, memory_every: int = 5) -> SoakRun:
    """Send every job (``send(job)`` returns the compiled answer) to a webui whose graphs are built: each must
    run compiled, compile nothing, leave the webui idle and keep no more graphs than the setting; every
    ``compare_every``-th answer goes to ``compare(job, answer)`` (its eager twin), and the webui's memory is
    sampled every ``memory_every`` jobs. After the soak: no graph compiled or evicted, no compiled call failed."""
    before = webui.status()
    memory = [(0, *resident_memory(webui.process.pid))]
    compared = []
    started = time.time()
    for number, job in enumerate(jobs, start=1):
        answer = send(job)
        assert_accelerated(answer)
        status = webui.status()
        assert status["busy"] is False and len(status["graphs"]) <= status["settings"]["max_graphs"]
        assert status["last_job"]["new_graphs"] == 0, f"job {number} ({job}) compiled: {status['last_job']}"
        if number % compare_every == 0:
            try:
                compared.append((number, compare(job, answer)))
            except AssertionError as error:
                raise AssertionError(f"job {number} ({job}) against its eager twin: {error}") from None
        if number % memory_every == 0:
            memory.append((number, *resident_memory(webui.process.pid)))
    run = SoakRun(compared, memory, time.time() - started, before, webui.status())
    assert run.after["compiles"] == before["compiles"] and run.graphs_compiled() == 0, "graphs were compiled"
    assert run.after["evictions"] == before["evictions"] and run.after["compiled_call_failures"] == 0
    assert run.after["failed_graphs"] == [] and run.after["recompile_limit_hits"] == []
    return run


def send_at_once(webui: WebUI, requests: List[Tuple[str, str, dict]], alone: List[np.ndarray],
                 rounds: int) -> List[List[Tuple[int, dict]]]:
    """Each (name, path, body) of ``requests`` from its own client, ``rounds`` times, all clients at once, while
    the status route is polled. Each answer must be 200 with an image byte-equal to ``alone`` (the same request
    sent alone), and the status route must answer 200 all along, also while a job runs. Prints what it
    measured."""
    polls, done = [], threading.Event()

    def poll_status():
        while not done.is_set():
            began = time.perf_counter()
            status, answer = webui.request("/onediff/v1/status", timeout=60)
            polls.append((status, time.perf_counter() - began, status == 200 and answer["busy"]))
            time.sleep(STATUS_POLL_S)

    def client(index):
        _, path, body = requests[index]
        return [webui.request(path, body) for _ in range(rounds)]

    poller = threading.Thread(target=poll_status, daemon=True)
    poller.start()
    started = time.time()
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(client, range(len(requests))))
    finally:
        done.set()
        poller.join(120)
    seconds = time.time() - started

    differences = {}
    for (name, _, _), image, sent in zip(requests, alone, answers):
        for status, answer in sent:
            assert status == 200, (name, answer)
            differences[name] = max(differences.get(name, 0), int(np.abs(WebUI.image(answer) - image).max()))
    latencies = sorted(latency for _, latency, _ in polls)
    print(f"\n{len(requests)} clients x {rounds} requests in {seconds:.0f} s; largest difference from the same "
          f"request alone (levels): {differences}")
    print(f"status route: {len(polls)} answers, {sum(busy for *_, busy in polls)} while busy, latency median "
          f"{latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    assert all(difference == 0 for difference in differences.values()), differences
    assert all(status == 200 for status, _, _ in polls) and any(busy for *_, busy in polls), polls
    return answers
