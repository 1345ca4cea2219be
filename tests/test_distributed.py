"""Context parallelism and the DTensor sharding rules, on CPU with gloo.

Each world size runs in one pool of spawned processes (127.0.0.1), started once for the tests that
use it; every task has a deadline, so a rank left waiting in a collective fails the test instead of
blocking the run. Results are compared with the float64 quadratic reference over the whole sequence
in one process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

from _helpers import ROOT, TOLERANCE, oracle, rel_error, run_script

import lightning_op
from lightning_op import distributed, reference
from lightning_op.nn import LightningAttention

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TASK_SECONDS = 120
FLOAT32 = TOLERANCE[torch.float32]
FLOAT64 = 1e-12


# ----------------------------------------------------------------------------- process pools


def _serve(rank, world, store, tasks, results):
    torch.set_num_threads(1)  # several ranks share few cores: spinning thread pools would slow them all
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    while (task := tasks.get()) is not None:
        fn, kwargs = task
        try:
            results.put((rank, True, fn(rank, world, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world`` processes joined in a gloo group, running module-level task functions."""

    def __init__(self, world: int) -> None:
        # a file store, not a TCP one on a port probed free: test processes running side by side
        # (pytest -n) could take the same port between the probe and the bind
        self.folder = tempfile.mkdtemp(prefix="lightning_op_ranks_")
        store = os.path.join(self.folder, "store")
        context = multiprocessing.get_context("spawn")
        self.world, self.results = world, context.Queue()
        self.tasks = [context.Queue() for _ in range(world)]
        self.processes = [
            context.Process(target=_serve, args=(rank, world, store, self.tasks[rank], self.results), daemon=True)
            for rank in range(world)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, timeout: float = TASK_SECONDS, **kwargs) -> list:
        """``fn(rank, world, **kwargs)`` on every rank; its return values in rank order."""
        for tasks in self.tasks:
            tasks.put((fn, kwargs))
        values, failures = [None] * self.world, []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                pytest.fail(f"{fn.__name__}: a rank did not finish within {timeout} s (a collective left waiting?)\n"
                            + "\n".join(failures))
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                if len(failures) == 1:
                    timeout = 10  # the others may be waiting for it in a collective
        if failures:
            pytest.fail("\n".join(failures))
        return values

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def close(self) -> None:
        self.stop()
        self.join()

    def stop(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)

    def join(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pools():
    """``pools(world)``: the pool of ``world`` ranks, started on first use and kept for the module
    (idle ranks wait on their queues; starting one costs seconds of imports)."""
    opened: dict = {}

    def pool(world: int) -> RankPool:
        if world not in opened or not opened[world].alive():
            opened[world] = RankPool(world)
        return opened[world]

    yield pool
    for pool_ in opened.values():  # all stop at once
        pool_.stop()
    for pool_ in opened.values():
        pool_.join()


# ----------------------------------------------------------------------------- shared inputs


def _inputs(lengths, *, b=2, h=4, d=16, dtype=torch.float32, layout="bhnd", seed=0):
    """The whole sequence's q, k, v, decay, initial state, output gradient and, per rank, a share
    of the final state's gradient: the same on every rank (one seed)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "bnhd":
        q, k, v = (randn(b, n, h, d).transpose(1, 2) * 0.5 for _ in range(3))
    else:
        q, k, v = (randn(b, h, n, d) * 0.5 for _ in range(3))
    decay = (reference.slopes(h) * 0.3).to(dtype)
    init = randn(b, h, d, d)
    grad_out = randn(b, h, n, d)
    final_shares = [randn(b, h, d, d) for _ in lengths]
    return q, k, v, decay, init, grad_out, final_shares


def _piece(x, lengths, rank):
    start = sum(lengths[:rank])
    return x[:, :, start:start + lengths[rank]]


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _sum_over_ranks(x):
    x = x.clone()
    dist.all_reduce(x)
    return x


class ReferenceAttention:
    """The float64 quadratic reference in place of the op on each rank (``OpAttention``'s four
    methods), differentiable in the decay: it tests the exchange's own decay terms before the op
    has a decay gradient."""

    differentiates_decay = True

    def forward(self, q, k, v, decay, scale, initial_state):
        return reference.attention_quadratic(q, k, v, decay, scale, initial_state)

    def state(self, q, k, v, decay):
        return reference.attention_quadratic(q, k, v, decay)[1]

    def state_gradient(self, q, grad_out, decay, scale, state_heads):
        b, _, n, dk = q.shape
        init = q.new_zeros(b, state_heads, dk, grad_out.shape[3], requires_grad=True)
        with torch.enable_grad():
            out, _ = reference.attention_quadratic(q, q.new_zeros(b, q.shape[1], n, dk), torch.zeros_like(grad_out),
                                                   decay, scale, init)
            return torch.autograd.grad(out, init, grad_out)[0]

    def backward(self, grad_out, grad_final_state, q, k, v, decay, scale, initial_state):
        leaves = [_leaf(x) for x in (q, k, v)] + ([] if decay is None else [_leaf(decay)])
        with torch.enable_grad():
            out, final = reference.attention_quadratic(*leaves[:3], leaves[3] if decay is not None else None, scale,
                                                       initial_state)
            grads = torch.autograd.grad((out, final), leaves, (grad_out, grad_final_state))
        return (*grads[:3], grads[3] if decay is not None else None)


# ----------------------------------------------------------------------------- tasks (run on every rank)


def _against_reference(rank, world, lengths, layout="bhnd", with_decay=True, with_init=True, scale=0.7):
    """Errors of this rank's output, final state and gradients against the whole sequence's oracle."""
    q, k, v, decay, init, grad_out, shares = _inputs(lengths, layout=layout)
    decay, init = (decay if with_decay else None), (init if with_init else None)
    out, final, grads = oracle(q, k, v, decay, scale, init, grad_out, sum(shares))
    mine = [_leaf(_piece(x, lengths, rank)) for x in (q, k, v)]
    my_init = None if init is None else _leaf(init)
    got, got_final = distributed.context_parallel_attn(*mine, decay, scale=scale, initial_state=my_init,
                                                       output_final_state=True)
    ((got * _piece(grad_out, lengths, rank)).sum() + (got_final * shares[rank]).sum()).backward()
    finals = [torch.empty_like(got_final) for _ in range(world)]
    dist.all_gather(finals, got_final.detach())
    errors = {"out": rel_error(got, _piece(out, lengths, rank)), "final": rel_error(got_final, final),
              "final differs between ranks": max((f - finals[0]).abs().max().item() for f in finals)}
    for name, x, want in zip("qkv", mine, grads):
        errors[f"d{name}"] = rel_error(x.grad, _piece(want, lengths, rank))
        if layout == "bnhd":
            errors[f"d{name} stored [B, N, H, D]"] = 0.0 if x.grad.stride(1) < x.grad.stride(2) else 1.0
    if init is not None:
        errors["d_initial_state (sum of shares)"] = rel_error(_sum_over_ranks(my_init.grad), grads[3])
    return errors


def _learnable_decay(rank, world, lengths, local=None):
    """Errors of every gradient, the decay's included, with ``local`` as each rank's attention
    (the op when None), all in float64 against the whole sequence's reference."""
    dtype = torch.float32 if local is None else torch.float64
    q, k, v, decay, init, grad_out, shares = _inputs(lengths, dtype=dtype)
    whole = [_leaf(x.double()) for x in (q, k, v, decay, init)]
    out, final = reference.attention_quadratic(*whole[:3], whole[3], 0.7, whole[4])
    ((out * grad_out.double()).sum() + (final * sum(shares).double()).sum()).backward()

    mine = [_leaf(_piece(x, lengths, rank)) for x in (q, k, v)] + [_leaf(decay), _leaf(init)]
    args = (*mine[:4], 0.7, mine[4])
    if local is None:
        got, got_final = distributed.context_parallel_attn(*args[:4], scale=0.7, initial_state=mine[4],
                                                           output_final_state=True)
    else:
        got, got_final = distributed._attention(*args, distributed.GroupExchange(dist.group.WORLD), local)
    ((got * _piece(grad_out, lengths, rank)).sum() + (got_final * shares[rank]).sum()).backward()
    errors = {"out": rel_error(got, _piece(out, lengths, rank)), "final": rel_error(got_final, final)}
    for name, x, want in zip("qkv", mine, whole):
        errors[f"d{name}"] = rel_error(x.grad, _piece(want.grad, lengths, rank))
    errors["d_decay (sum of shares)"] = rel_error(_sum_over_ranks(mine[3].grad), whole[3].grad)
    errors["d_initial_state (sum of shares)"] = rel_error(_sum_over_ranks(mine[4].grad), whole[4].grad)
    return errors


def _grouped_heads(rank, world, lengths):
    """Grouped-query heads (4 query heads, 2 kv heads) against the reference with k and v repeated."""
    q, k, v, decay, init, grad_out, shares = _inputs(lengths)
    k, v = k[:, ::2], v[:, ::2]
    out, final, _ = oracle(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), decay, 0.7, init, grad_out,
                           sum(shares))
    mine = [_piece(x, lengths, rank) for x in (q, k, v)]
    got, got_final = distributed.context_parallel_attn(*mine, decay, scale=0.7, initial_state=init,
                                                       output_final_state=True)
    return {"out": rel_error(got, _piece(out, lengths, rank)), "final": rel_error(got_final, final)}


def _compiled(rank, world, lengths):
    """``torch.compile(fullgraph=True)`` of a call and its backward against eager."""
    q, k, v, decay, init, grad_out, shares = _inputs(lengths)

    def run(fn):
        mine = [_leaf(_piece(x, lengths, rank)) for x in (q, k, v)] + [_leaf(init)]
        out, final = fn(*mine, decay)
        ((out * _piece(grad_out, lengths, rank)).sum() + (final * shares[rank]).sum()).backward()
        return out, final, *(x.grad for x in mine)

    def attention(q, k, v, init, decay):
        return distributed.context_parallel_attn(q, k, v, decay, scale=0.7, initial_state=init,
                                                 output_final_state=True)

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(attention, backend=counter, fullgraph=True))
    eager = run(attention)
    names = ("out", "final", "dq", "dk", "dv", "d_initial_state")
    errors = {name: rel_error(a, b) for name, a, b in zip(names, compiled, eager)}
    errors["graphs"] = counter.frame_count
    return errors


_ORDERS = {  # what a process imports, in order; then whether DTensor was loaded, and the rules
    "lightning_op": "import lightning_op\nloaded = 'torch.distributed.tensor' in sys.modules\n"
                    "import torch.distributed.tensor",
    "torch.distributed.tensor": "import torch.distributed.tensor\nimport lightning_op\nloaded = None",
    "torch._dynamo": "import lightning_op\nimport torch._dynamo  # imports the DTensor package itself\nloaded = None",
}
_RULES = """
from torch.distributed.tensor._api import DTensor
strategies = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
print(loaded, sorted(str(op) for op in strategies if op.namespace == "lightning"))
"""


@pytest.mark.parametrize("first", list(_ORDERS))
def test_sharding_rules_are_registered_whichever_is_imported_first(first):
    """``import lightning_op`` does not import the DTensor package (about 0.9 s); the rules are
    registered when it is imported, before or after, directly or through another package."""
    result = subprocess.run([sys.executable, "-c", "import sys\n" + _ORDERS[first] + _RULES], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    loaded = "False" if first == "lightning_op" else "None"
    assert result.stdout.strip() == f"{loaded} ['lightning.attn.default', 'lightning.attn_bwd.default']", result.stdout


def _dtensor(rank, world, placement):
    """The op on batch- or head-sharded DTensors: the local op, no collective, forward and backward."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    b, h = (2 * world, 2) if placement == "batch" else (1, 2 * world)
    q, k, v, decay, init, grad_out, shares = _inputs([40], b=b, h=h)
    out, final, grads = oracle(q, k, v, decay, 0.7, init, grad_out, shares[0])
    dim = 0 if placement == "batch" else 1

    def local(x, d=dim):
        size = x.shape[d] // world
        return x.narrow(d, rank * size, size)

    leaves = [_leaf(local(x)) for x in (q, k, v, init)]
    q_, k_, v_, init_ = (DTensor.from_local(x, mesh, [Shard(dim)]) for x in leaves)
    decay_ = DTensor.from_local(decay, mesh, [Replicate()]) if dim == 0 else DTensor.from_local(local(decay, 0), mesh,
                                                                                              [Shard(0)])
    with CommDebugMode() as comms:
        got, got_final = lightning_op.lightning_attn(q_, k_, v_, decay_, scale=0.7, initial_state=init_,
                                                     output_final_state=True)
        loss = (got.to_local() * local(grad_out)).sum() + (got_final.to_local() * local(shares[0])).sum()
        loss.backward()
    errors = {"out": rel_error(got.to_local(), local(out)), "final": rel_error(got_final.to_local(), local(final)),
              "collectives": comms.get_total_counts(),
              "placements": 0 if got.placements == (Shard(dim),) == got_final.placements else 1}
    for name, x, want in zip(("dq", "dk", "dv", "d_initial_state"), leaves, grads):
        errors[name] = rel_error(x.grad, local(want))
    return errors


def _dtensor_sequence(rank, world):
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    q, k, v = (DTensor.from_local(x, mesh, [Shard(2)]) for x in _inputs([16])[:3])
    try:
        torch.ops.lightning.attn(q, k, v, None, 1.0, None)
    except Exception as error:  # noqa: BLE001 - the message is what is tested
        return str(error)
    return "no error"


class _Model(torch.nn.Module):
    """Two LightningAttention layers with residuals and a head; ``group`` runs them context-parallel."""

    def __init__(self, hidden=32, heads=2, group=None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            LightningAttention(hidden, heads, layer_idx=i, num_layers=2, scale=0.5, context_parallel_group=group)
            for i in range(2)
        )
        self.head = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[0]
        return self.head(x)


def _wrapped_training(rank, world, wrapper, n=96, steps=2):
    """A 2-layer model trained with each rank holding 1/world of one sequence, under ``wrapper``
    ("ddp": DistributedDataParallel; "fsdp2": ``fully_shard``, parameters sharded over the ranks,
    gradients reduce-scattered and averaged): the losses and gradients of one process holding all
    of it (under FSDP2, each rank's gradient shard gathered whole)."""
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(1, n, 32, generator=gen), torch.randn(1, n, 32, generator=gen)
    one, parallel = _Model(), _Model(group=dist.group.WORLD)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        parallel = DistributedDataParallel(parallel)
        parameters, whole = parallel.module.parameters, lambda grad: grad
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in parallel.layers:
            fully_shard(layer)
        fully_shard(parallel)
        parameters, whole = parallel.parameters, lambda grad: grad.full_tensor()
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (one, parallel)]
    piece = slice(rank * n // world, (rank + 1) * n // world)
    errors = {}
    for step in range(steps):
        for optimiser in optimisers:
            optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(one(x), target)
        loss.backward()
        # each rank's mean over its equal share: the wrappers' average of the gradients is the whole mean's
        local = torch.nn.functional.mse_loss(parallel(x[:, piece]), target[:, piece])
        local.backward()
        errors[f"loss step {step}"] = rel_error(_sum_over_ranks(local.detach()) / world, loss)
        errors[f"gradients step {step}"] = max(
            rel_error(a.grad, whole(b.grad)) for a, b in zip(one.parameters(), parameters())
        )
        for optimiser in optimisers:
            optimiser.step()
    return errors


# ----------------------------------------------------------------------------- tests


def _assert_within(results, bound, what=""):
    for rank, errors in enumerate(results):
        bad = {name: e for name, e in errors.items() if not e <= bound}
        assert not bad, f"{what} rank {rank}: {bad} (bound {bound:.0e})"


SHARDS = {2: (50, 70), 3: (1, 70, 33), 4: (64, 0, 1, 40)}


@pytest.mark.parametrize("world", sorted(SHARDS))
def test_matches_the_whole_sequence(pools, world):
    """Uneven shards (one token, none), with and without decay and initial state: outputs, the
    final state, dq, dk, dv and the sum of the initial state's shares."""
    pool = pools(world)
    for options in (dict(), dict(with_decay=False, with_init=False, scale=1.0)):
        _assert_within(pool.run(_against_reference, lengths=SHARDS[world], **options), FLOAT32, options)


def test_bnhd_views_read_and_written_in_place(pools):
    _assert_within(pools(2).run(_against_reference, lengths=(37, 91), layout="bnhd"), FLOAT32)


@pytest.mark.parametrize("world", [2, 3])
def test_decay_gradient_of_the_exchange(pools, world):
    """The cross-rank decay terms, with a differentiable float64 reference in place of the op."""
    _assert_within(pools(world).run(_learnable_decay, lengths=SHARDS[world], local=ReferenceAttention()), FLOAT64)


def test_learnable_decay_through_the_op(pools):
    _assert_within(pools(2).run(_learnable_decay, lengths=SHARDS[2]), FLOAT32)


def test_grouped_query_heads(pools):
    _assert_within(pools(2).run(_grouped_heads, lengths=SHARDS[2]), FLOAT32)


def test_compiles_in_one_graph(pools):
    results = pools(2).run(_compiled, lengths=SHARDS[2], timeout=300)
    assert all(errors.pop("graphs") == 1 for errors in results), results
    _assert_within(results, 1e-6)


@pytest.mark.parametrize("placement", ["batch", "heads"])
def test_dtensor_sharded_over_batch_or_heads_runs_the_local_op(pools, placement):
    results = pools(2).run(_dtensor, placement=placement)
    assert all(errors.pop("collectives") == 0 and errors.pop("placements") == 0 for errors in results), results
    _assert_within(results, FLOAT32)


def test_dtensor_sharded_over_the_sequence_points_at_context_parallelism(pools):
    for message in pools(2).run(_dtensor_sequence):
        assert "sequence" in message and "context_parallel_attn" in message, message


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_layer_model_trains_as_one_process(pools, wrapper):
    _assert_within(pools(2).run(_wrapped_training, wrapper=wrapper, steps=3 if wrapper == "ddp" else 2), FLOAT32)


def test_refuses_without_a_process_group():
    q = torch.randn(1, 2, 8, 16)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.context_parallel_attn(q, q, q)


@pytest.mark.slow
def test_example_under_torchrun():
    """examples/train_context_parallel.py under torchrun: its losses and first gradients are one
    process's within float32 rounding (measured 1e-7 to 3e-7; a missing state gives 1e-2 and more)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("LIGHTNING_OP_BACKEND", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "examples", "train_context_parallel.py"), "--tokens", "1024", "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    checks = dict(re.findall(r"^\s*check (\S+): max_rel_err=(\S+) tol=\S+$", result.stdout, re.MULTILINE))
    assert sorted(checks) == ["gradients_step0_vs_one_process", "loss_step0_vs_one_process",
                              "loss_step1_vs_one_process"], result.stdout
    assert all(float(error) <= 2e-6 for error in checks.values()), result.stdout


@pytest.mark.slow
def test_bench_cp_smoke(tmp_path):
    """benchmarks/bench_cp.py runs (CPU smoke shapes); one rank of one is the plain op."""
    run_script("benchmarks/bench_cp.py", "--smoke", "--lengths", "64", "--worlds", "2", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(row["N_r"], row["W"]) for row in rows] == [(64, 2)]
    assert rows[0]["rel_err_w1_vs_op"] < 1e-6 and rows[0]["cp_fwdbwd_ms"] > 0
    assert rows[0]["cp_fwd_host_ms"] > 0 and rows[0]["fwd_host_ms"] > 0
    assert rows[0]["fwd_collective_bytes"] == (2 * 32 * 32 + 2) * 4  # one other rank's state and length
