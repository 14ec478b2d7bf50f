"""Every entry point in launch/ starts 2 CPU processes that train like 1 process.

Each launcher runs tests/dist_worker.py on one case (CLIP InfoNCE, ZeRO-2, no cache) via
VLP_ENTRY; its loss and updated weights must equal the 1-process run on the same global
batch, and the processes must have seen world size 2, distinct ranks and the launcher's own
variables. SLURM runs launch/slurm.sbatch with stand-ins for srun/scontrol that set what
srun sets per task; OpenMPI gets the OMPI_COMM_WORLD_* variables mpirun sets. The
multi-node forms (NODE_RANK, NNODES) run as 2 "nodes" x 1 process on this machine.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
CASE = ("infonce", 2, 0)  # objective, ZeRO stage, chunk size
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                 "NNODES", "NPROC_PER_NODE", "HOSTFILE")

# Stand-ins on PATH. The venv's tools go through its python (`python -m ...`) instead of
# putting the venv's bin/ first, because that would also swap `ninja` for the venv's
# copy, whose build log differs from the system one and makes DeepSpeed rebuild its CPU
# comm op (a minute) in every process that follows.
SHIMS = {
    "python": 'exec "{py}" "$@"',
    "torchrun": 'exec "{py}" -m torch.distributed.run "$@"',
    "deepspeed": 'exec "{py}" -m deepspeed.launcher.runner "$@"',
    "accelerate": 'exec "{py}" -m accelerate.commands.accelerate_cli "$@"',
    # srun inside an allocation: SLURM_NTASKS tasks here, each with the variables srun sets
    "srun": 'pids=(); for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
            '  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" & pids+=($!)\n'
            'done; rc=0; for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done; exit $rc',
    "scontrol": '[ "$1 $2" = "show hostnames" ] && tr , "\\n" <<< "$3"',
}

# A cheap process for the multi-node rendezvous: vlp's init, then what every rank saw.
PROBE = '''import json, os, sys
import torch.distributed
from vlp import dist
seen = dist.env_info()
dist.init_distributed("gloo")
views = [None] * dist.world_size()
torch.distributed.all_gather_object(views, {"rank": dist.rank(), "world": dist.world_size(),
                                            "local_rank": seen.local_rank, "node": os.environ["PROBE_NODE"]})
if dist.rank() == 0:
    json.dump(views, open(sys.argv[1], "w"))
dist.shutdown()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shims(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin")
    for name, body in SHIMS.items():
        (path / name).write_text("#!/usr/bin/env bash\n" + body.format(py=sys.executable) + "\n")
        (path / name).chmod(0o755)
    return str(path)


def _env(shims, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "OMPI_", "VLP_"))}
    env.update(PATH=shims + os.pathsep + env["PATH"], OMP_NUM_THREADS="1",
               VLP_DIST_CASES="{}:{}:{}".format(*CASE), VLP_ENTRY="tests.dist_worker")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(cmd, env, log):
    """A launcher in its own process group, output to ``log`` (a pipe left unread can block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs, logs, timeout=420):
    """Wait for every process; the first failure (or the timeout) stops the others."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode for p in procs):
            break  # e.g. one "node" failed: the other would wait for it until its own timeout
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.terminate()  # launchers pass SIGTERM on to their workers
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    report = "".join(f"\n--- {log} (exit {p.returncode})\n" + open(log).read()[-3000:] for p, log in zip(procs, logs))
    assert all(p.returncode == 0 for p in procs), report


def _run(cmd, env, tmp_path):
    log = str(tmp_path / "launch.log")
    _wait([_start(cmd, env, log)], [log])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shims):
    path = tmp_path_factory.mktemp("ref")
    out = path / "one.pt"
    _run([sys.executable, "tests/dist_worker.py", str(out)], _env(shims), path)
    ref = torch.load(out, weights_only=False)
    assert [r["world"] for r in ref["ranks"]] == [1]
    # the step really moves the weights, so the equality below is not trivially true
    moved = ref[CASE][1]["text.text_projection"] - ref["init"]["text.text_projection"]
    assert moved.abs().max() > 1e-3
    return ref


def _check(reference, out, rank_var):
    got = torch.load(out, weights_only=False)
    ranks = got["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["world"] for r in ranks] == [2, 2], ranks
    # the launcher's own variables gave these ranks (read before vlp normalises them)
    assert all(r["env_rank"] == r["rank"] and r["env_world"] == 2 for r in ranks), ranks
    assert all(r["rank_vars"] == [rank_var] for r in ranks), ranks
    assert len({r["pid"] for r in ranks}) == 2
    (ref_loss, ref_params), (loss, params) = reference[CASE], got[CASE]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    init = reference["init"]
    for name, p in ref_params.items():
        update = (p - init[name]).abs().max() if name in init else p.abs().max()
        err = (params[name] - p).abs().max()
        assert err <= 1e-4 * update + 1e-6, (name, float(err), float(update))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "accelerate.sh"])
def test_launcher_two_processes(script, reference, shims, tmp_path):
    out = tmp_path / "two.pt"
    _run([os.path.join(LAUNCH, script), str(out)], _env(shims, NPROC_PER_NODE=2, MASTER_PORT=_free_port()), tmp_path)
    _check(reference, out, "RANK")


@pytest.mark.slow
def test_slurm_sbatch_two_tasks(reference, shims, tmp_path):
    out = tmp_path / "two.pt"
    env = _env(shims, SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="localhost", SLURM_NNODES=1, SLURM_NTASKS=2,
               MASTER_PORT=_free_port())
    _run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), str(out)], env, tmp_path)
    _check(reference, out, "SLURM_PROCID")


@pytest.mark.slow
def test_openmpi_variables(reference, shims, tmp_path):
    out, port = tmp_path / "two.pt", _free_port()
    logs = [str(tmp_path / f"rank{r}.log") for r in range(2)]
    procs = [
        _start([sys.executable, "tests/dist_worker.py", str(out)],
               _env(shims, OMPI_COMM_WORLD_RANK=r, OMPI_COMM_WORLD_LOCAL_RANK=r, OMPI_COMM_WORLD_SIZE=2,
                    OMPI_COMM_WORLD_LOCAL_SIZE=2, OMPI_COMM_WORLD_NODE_RANK=0,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port), logs[r])
        for r in range(2)
    ]
    _wait(procs, logs)
    _check(reference, out, "OMPI_COMM_WORLD_RANK")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "accelerate.sh"])
def test_two_nodes_one_process_each(script, shims, tmp_path):
    """The multi-node form, both "nodes" on this machine: each runs the script with its NODE_RANK."""
    (tmp_path / "launch_probe.py").write_text(PROBE)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: no ssh with NODE_RANK
    out, port = tmp_path / "views.json", _free_port()
    logs = [str(tmp_path / f"node{node}.log") for node in range(2)]
    procs = [
        _start([os.path.join(LAUNCH, script), str(out)],
               _env(shims, NNODES=2, NODE_RANK=node, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    HOSTFILE=hostfile, PROBE_NODE=node, VLP_ENTRY="launch_probe", PYTHONPATH=tmp_path), logs[node])
        for node in range(2)
    ]
    _wait(procs, logs, timeout=180)
    views = json.loads(out.read_text())
    # node-major global ranks; one process per node, so local rank 0 on both
    assert views == [{"rank": r, "world": 2, "local_rank": 0, "node": str(r)} for r in range(2)]


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(os.path.join(LAUNCH, "hostfile.example"))
    assert list(pool) == ["node0", "node1"] and all(slots > 0 for slots in pool.values())


def test_accelerate_config_is_plain_multi_process():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.path.join(LAUNCH, "accelerate.yaml"))
    assert cfg.distributed_type == "MULTI_GPU" and not cfg.deepspeed_config and not cfg.use_cpu
    assert cfg.mixed_precision == "no"  # precision is vlp's engine.precision


@pytest.mark.parametrize("script,env", [("torchrun.sh", {"NNODES": "2"}), ("accelerate.sh", {"NNODES": "2"}),
                                        ("deepspeed.sh", {"NODE_RANK": "1"})])
def test_multi_node_needs_master_addr(script, env):
    """Without MASTER_ADDR the other nodes would wait on their own 127.0.0.1 until timeout."""
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, **env}
    proc = subprocess.run([os.path.join(LAUNCH, script), "cfg.yaml"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr, proc.stderr


def test_scripts_parse():
    for name in ("torchrun.sh", "deepspeed.sh", "accelerate.sh", "slurm.sbatch"):
        path = os.path.join(LAUNCH, name)
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert os.access(path, os.X_OK), name
