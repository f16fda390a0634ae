"""Why a job's process died, from Ray's own words for it (texts captured from Ray 2.60.0 and
built from its sources), exit statuses, the kernel's log and death records: the one line a
user reads first in the job's error."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from ray.exceptions import ActorDiedError, OutOfMemoryError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from workers import deaths
from workers.pool import WarmGroupError

# ray.get's OutOfMemoryError for an actor that Ray 2.60.0's memory monitor killed (captured
# with RAY_memory_usage_threshold=0.02; the raylet's format strings: "%d worker(s) were killed
# due to the node running low on memory. %s", "Memory on the node (IP: %s, ID: %s) was %sGB
# used / %sGB limit (%f)", "OOM kill reason: %s", "Memory usage %dB exceeded threshold of %dB
# (%.1f%% of %dB limit)"), its first lines and its kill details.
RAY_OOM = (
    "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: "
    "192.0.2.2, ID: 50bb522372fc391f259c8fb1b44b2d714cf53cf37799375102962720) was 14.88GB "
    "used / 15.50GB limit (0.960000)\n"
    "OOM kill reason: Memory usage 14880000000B exceeded threshold of 14725000000B (95.0% of "
    "15500000000B limit)\n"
    "Ray killed 1 worker(s) based on the killing policy\n"
    "Selected to kill: (Actor(adc8d35bd4b0b5add4dc2b8c01000000): job ID=01000000, lease "
    "ID=00000000ad6b, task name=A.__init__, required resources={}, pid=26030, actual memory "
    "used=9.04GB, worker ID=611372bf)\n"
)
# Before Ray 2.5x (src/ray/raylet/node_manager.cc, CreateOomKillMessageDetails).
RAY_OOM_OLD = (
    "Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.0.0.7, ID: 0a1b) where the task (actor ID: 9c, name=Worker, "
    "pid=4242, memory used=9.10GB) was running was 15.12GB / 15.50GB (0.975483), which exceeds "
    "the memory usage threshold of 0.95. Ray killed this worker (ID: 77) because it was the "
    "most recently scheduled task; to see more information about memory usage on this node, "
    "use `ray logs raylet.out -ip 10.0.0.7`."
)
# ray.get's ActorDiedError for an actor whose process got a SIGKILL (captured, Ray 2.60.0).
RAY_KILLED = (
    "The actor died unexpectedly before finishing this task.\n"
    "\tclass_name: A\n"
    "\tactor_id: f31f7757ed0d2782095a8ae201000000\n"
    "\tpid: 25772\n"
    "\tnamespace: 74742fff-4e22-4c45-b47a-1ddb685fece5\n"
    "\tip: 192.0.2.2\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
    "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of "
    "file. Some common causes include: (1) the process was killed by the OOM killer due to "
    "high memory usage, (2) ray stop --force was called, or (3) the worker crashed "
    "unexpectedly due to SIGSEGV or another unexpected error. If the process was killed by "
    "the kernel OOM killer (verifiable by checking for OOM in dmesg of the OOMing node), "
    "consider enabling resource isolation via --enable-resource-isolation to prevent node "
    "deaths by resource contention and significant loss of progress by uninformed kernel OOM "
    "killing."
)
# The kernel's line for its OOM killer's victim (mm/oom_kill.c, __oom_kill_process).
KERNEL_OOM = (
    "Out of memory: Killed process 25772 (ray::RayTrainWo) total-vm:19034512kB, "
    "anon-rss:9301234kB, file-rss:51200kB, shmem-rss:0kB, UID:0 pgtables:20480kB "
    "oom_score_adj:0"
)
SIGKILL_LINE = "killed by signal 9 (SIGKILL: the kernel's OOM killer or someone's kill -9)"


def died(text: str) -> ActorDiedError:
    error = ActorDiedError()
    error.error_msg = text
    return error


def test_a_memory_monitor_kill_is_named_with_the_nodes_figures():
    assert deaths.memory_monitor("worker rank 1", RAY_OOM) == (
        "worker rank 1 killed by Ray's memory monitor: node memory 96% used (threshold 95%), "
        "14.9 of 15.5 GB"
    )
    assert deaths.memory_monitor("worker rank 0", RAY_OOM_OLD) == (
        "worker rank 0 killed by Ray's memory monitor: node memory 98% used (threshold 95%), "
        "15.1 of 15.5 GB"
    )
    close = RAY_OOM.replace("(0.960000)", "(0.951000)")
    assert "node memory 95.1% used (threshold 95.0%)" in deaths.memory_monitor("rank 0", close)
    assert deaths.memory_monitor("worker rank 0", RAY_KILLED) is None
    assert deaths.memory_monitor("worker rank 0", "ValueError: bad lr") is None


def test_signals_are_named_with_their_usual_senders():
    assert deaths.killed_by_signal("worker rank 0", signal.SIGKILL) == (
        f"worker rank 0 {SIGKILL_LINE}"
    )
    assert deaths.killed_by_signal("driver", 11) == (
        "driver killed by signal 11 (SIGSEGV: a crash in native code)"
    )
    usr1 = deaths.killed_by_signal("driver", signal.SIGUSR1)
    assert usr1 == "driver killed by signal 10 (SIGUSR1)"
    codes = (-9, 137, 143, 1, 0, None)  # -N: Python's subprocess; 128 + N: a shell's
    assert [deaths.signal_of_exit(c) for c in codes] == [9, 9, 15, None, None, None]


def test_a_process_that_vanished_is_a_sigkill_and_a_python_error_is_no_death():
    assert deaths.explain("worker rank 1", RAY_KILLED) == f"worker rank 1 {SIGKILL_LINE}"
    assert deaths.explain("worker rank 1", RAY_OOM).startswith(
        "worker rank 1 killed by Ray's memory monitor"
    )
    assert deaths.explain("driver", "", exit_code=-11).startswith("driver killed by signal 11")
    traceback = "ray.exceptions.RayTaskError(ValueError): ... ValueError: bad lr"
    assert deaths.explain("worker rank 0", traceback) is None


def test_the_kernels_oom_killer_is_named_where_its_log_names_the_pid():
    cgroup = KERNEL_OOM.replace("Out of memory", "Memory cgroup out of memory")
    assert deaths.kernel_oom("worker rank 1", ["noise", KERNEL_OOM], 25772) == (
        "worker rank 1 killed by the kernel's OOM killer (signal 9, SIGKILL): out of memory, "
        "the process held 9.6 GB"
    )
    assert "SIGKILL): memory cgroup out of memory" in deaths.kernel_oom("w", [cgroup], 25772)
    assert deaths.kernel_oom("worker rank 1", [KERNEL_OOM], 25773) is None


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="the kernel's log is not ours")
def test_the_kernels_log_is_read_from_a_time_on():
    assert deaths.kernel_log(since=0)  # every line since boot
    assert deaths.kernel_log(since=time.time() + 3600) == []


def test_a_drivers_death_from_ray_job_supervisors_words():
    # ray/dashboard/modules/job/job_supervisor.py and job_manager.py
    logs = "Job entrypoint command failed with exit code -9, last available logs (truncated"
    assert deaths.driver_death(logs + " to 20,000 chars):\n...") == f"driver {SIGKILL_LINE}"
    shell = "Job entrypoint command failed with exit code 137. No logs available."
    assert deaths.driver_death(shell) == f"driver {SIGKILL_LINE}"
    assert deaths.driver_death(None, -15).startswith("driver killed by signal 15 (SIGTERM")
    assert deaths.driver_death("Job entrypoint command failed with exit code 1. No logs") is None
    assert deaths.driver_death(None) is None
    supervisor = "Job supervisor actor died: " + str(died(RAY_OOM))
    assert deaths.driver_death(supervisor) == (
        "the driver's Ray job supervisor killed by Ray's memory monitor: node memory 96% used "
        "(threshold 95%), 14.9 of 15.5 GB"
    )
    vanished = "Job supervisor actor died: " + RAY_KILLED
    assert deaths.driver_death(vanished) == f"the driver's Ray job supervisor {SIGKILL_LINE}"


def test_the_line_of_a_death_comes_once_before_the_error():
    assert deaths.first("driver killed", "the job's log ends:\n...") == (
        "driver killed\nthe job's log ends:\n..."
    )
    assert deaths.first("driver killed", "driver killed\n...") == "driver killed\n..."
    assert deaths.first(None, "ValueError") == "ValueError"
    assert deaths.first("driver killed", None) == "driver killed"


STARTS = {
    0: {"rank": 0, "pid": 100, "host": "elsewhere", "time": 0.0},
    1: {"rank": 1, "pid": 25772, "host": "elsewhere", "time": 0.0},
}


def test_ray_trains_worker_group_error_names_each_killed_rank():
    """Ray Train v2's shapes, built from its own classes: a rank whose health check found
    its actor dead (SIGKILL), one the memory monitor killed, one that raised."""
    health = "A worker health check failed.\nWorker info: Worker(pid=25772, ...)"
    failures = {
        2: RuntimeError("Gloo connectFullMesh failed"),
        1: WorkerHealthCheckFailedError(health, failure=died(RAY_KILLED)),
        0: WorkerHealthCheckFailedError(health, failure=OutOfMemoryError(RAY_OOM)),
    }
    error = WorkerGroupError("3 workers failed", worker_failures=failures)
    assert deaths.of_failure(error, STARTS).splitlines() == [
        "worker rank 0 killed by Ray's memory monitor: node memory 96% used (threshold 95%), "
        "14.9 of 15.5 GB",
        f"worker rank 1 {SIGKILL_LINE}",
    ]
    only_python = WorkerGroupError("1 worker failed", {0: ValueError("bad lr")})
    assert deaths.of_failure(only_python, STARTS) is None
    controller = ControllerError(died(RAY_OOM))
    assert deaths.of_failure(controller, STARTS).startswith(
        "Ray Train's controller killed by Ray's memory monitor: node memory 96%"
    )


def test_a_warm_groups_failures_and_a_single_ray_error_name_the_rank_by_its_pid(tmp_path):
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed")
    error = WarmGroupError({0: gloo, 1: died(RAY_KILLED)})
    assert deaths.of_failure(error, STARTS) == f"worker rank 1 {SIGKILL_LINE}"
    # One Ray error, not by rank: the pid in its text says whose it is.
    assert deaths.of_failure(died(RAY_KILLED), STARTS) == f"worker rank 1 {SIGKILL_LINE}"
    assert deaths.of_failure(died(RAY_KILLED), {}) == f"a worker {SIGKILL_LINE}"
    # A death record (a waiting parent's) gives the signal itself.
    deaths.record(str(tmp_path), 25772, signal.SIGSEGV)
    assert deaths.signal_of(str(tmp_path), 25772) == signal.SIGSEGV
    assert deaths.of_failure(error, STARTS, str(tmp_path)) == (
        "worker rank 1 killed by signal 11 (SIGSEGV: a crash in native code)"
    )


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="the kernel's log is not ours")
def test_a_rank_on_this_host_is_checked_against_the_kernels_log():
    """Nothing in this machine's kernel log names a pid that never ran: the line stays the
    SIGKILL one (and reading the log does not fail the driver's error)."""
    starts = {1: {"rank": 1, "pid": 2**22 + 7, "host": socket.gethostname(), "time": 0.0}}
    gone = RAY_KILLED.replace("pid: 25772", f"pid: {2**22 + 7}")
    assert deaths.of_failure(died(gone), starts) == f"worker rank 1 {SIGKILL_LINE}"


class Rank:
    """A warm worker's calls (``workers.pool.WarmWorker``) for ``run_warm``: rank 0 raises
    at once, as a peer's broken collective does; rank 1 is SIGKILLed a moment later."""

    def ping(self, holder):
        return True

    def release(self, holder):
        return None

    def rendezvous(self):
        return "127.0.0.1", 0

    def run(self, holder, rank, world, master, config):
        if rank == 0:
            raise RuntimeError("Gloo: Connection reset by peer")
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_warm_group_reports_the_killed_rank_whose_peer_failed_first(ray_session):
    """The driver hears of rank 0's error first; the killed rank 1 is still named, since
    ``run_warm`` gives the others ``FAILURE_GRACE_S`` to say how they ended."""
    from workers.pool import Group, run_warm

    actors = [ray_session.remote(num_cpus=0, max_restarts=0)(Rank).remote() for _ in range(2)]
    with pytest.raises(WarmGroupError) as failed:
        run_warm(Group(actors, "holder"), {})
    assert sorted(failed.value.worker_failures) == [0, 1]
    assert deaths.of_failure(failed.value, {}) == f"worker rank 1 {SIGKILL_LINE}"
