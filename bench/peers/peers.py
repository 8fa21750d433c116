"""The Python peers of sagatx's benchmark, on the workloads of issue 6.

Each workload runs for about `SECONDS` after a warm-up, one task, one core,
and prints one JSON object per line: peer, workload, sagas (or transactions)
per second, microseconds each. Run through `bench/peers/run`, which makes
the pinned virtualenv.
"""

import asyncio
import contextlib
import json
import os
import sys
import time

SECONDS = float(os.environ.get("PEERS_SECONDS", "2"))
# Only this workload (e.g. "memory: 3 steps, sequential"), when set: what
# `sagatx bench` asks for in the rounds it alternates with its own.
ONLY = os.environ.get("PEERS_ONLY")


def timed(peer, workload, once, note=""):
    """Calls `once` in a loop: a warm-up, then for SECONDS."""
    if ONLY and workload != ONLY:
        return
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS / 4:
        once()
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in range(100):
            once()
        n += 100
        dt = time.perf_counter() - t0
        if dt >= SECONDS:
            break
    emit(peer, workload, n, dt, note)


def emit(peer, workload, n, dt, note=""):
    print(
        json.dumps(
            {
                "peer": peer,
                "workload": workload,
                "n": n,
                "per_second": n / dt,
                "us_each": dt / n * 1e6,
                "note": note,
            }
        ),
        flush=True,
    )


def py_api_saga():
    from py_api_saga.py_api_saga import SagaAssembler

    def noop():
        return None

    def reject():
        raise ValueError("rejected")

    def ok():
        SagaAssembler.saga().operation(noop, noop).operation(noop, noop).operation(
            noop, noop
        ).orchestrator_execute()

    def failing():
        try:
            SagaAssembler.saga().operation(noop, noop).operation(noop, noop).operation(
                reject, noop
            ).orchestrator_execute()
        except SagaAssembler.SagaException:
            return
        raise AssertionError("the third operation should have failed")

    timed("py-api-saga 0.0.3", "memory: 3 steps, sequential", ok)
    timed("py-api-saga 0.0.3", "memory: 3rd rejected, 2 compensations", failing)


def minos():
    # The library's local steps reach for a service name and an aggregate
    # transaction through dependency injection; outside a minos service
    # neither exists, so both are stubbed (the saga machinery is what runs).
    import minos.saga.executions.executors.abc as executors
    import minos.saga.executions.steps.local as local

    local.get_service_name = lambda *a, **k: "bench"
    executors.TransactionEntry = lambda **kw: contextlib.nullcontext()
    from minos.saga import Saga, SagaContext, SagaExecution, SagaStatus

    def noop(ctx):
        return ctx

    saga = Saga().local_step(noop).local_step(noop).local_step(noop).commit()

    async def run():
        async def once():
            ex = SagaExecution.from_definition(saga, context=SagaContext())
            await ex.execute(autocommit=False)
            assert ex.status == SagaStatus.Finished

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < SECONDS / 4:
            await once()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < SECONDS:
            for _ in range(20):
                await once()
            n += 20
        emit(
            "minos-microservice-saga 0.7.0",
            "memory: 3 steps, sequential",
            n,
            time.perf_counter() - t0,
            "local steps; service name and aggregate transaction stubbed",
        )

    asyncio.run(run())


def transaction_pkg():
    import transaction
    from nti.transactions.loop import TransactionLoop
    from transaction.interfaces import IDataManager
    from zope.interface import implementer

    @implementer(IDataManager)
    class Noop:
        def __init__(self, tm, key="noop"):
            self.transaction_manager = tm
            self.key = key

        def abort(self, txn):
            pass

        def tpc_begin(self, txn):
            pass

        def commit(self, txn):
            pass

        def tpc_vote(self, txn):
            pass

        def tpc_finish(self, txn):
            pass

        def tpc_abort(self, txn):
            pass

        def sortKey(self):
            return self.key

    tm = transaction.TransactionManager()

    def one():
        txn = tm.begin()
        txn.join(Noop(tm))
        tm.commit()

    def three():
        txn = tm.begin()
        for k in ("a", "b", "c"):
            txn.join(Noop(tm, k))
        tm.commit()

    timed("transaction 5.1", "tx: begin, join 1, commit", one)
    timed("transaction 5.1", "tx: begin, join 3, commit", three)

    def handler():
        transaction.get().join(Noop(transaction.manager))

    loop = TransactionLoop(handler)
    timed("nti.transactions 5.2", "tx: TransactionLoop, join 1", loop)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["py_api_saga", "minos", "transaction_pkg"]:
        globals()[name]()
