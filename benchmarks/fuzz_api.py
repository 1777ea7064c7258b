"""Fuzz the HTTP API from its own OpenAPI document: schemathesis generates requests for every operation of
/openapi.json (bodies, headers, multipart fields, query strings) and each answer must not be a 5xx.

    cpujob .venv/bin/python benchmarks/fuzz_api.py [RUN] [--examples 300] [--backend torch|onnx]

RUN defaults to the schema-1 fixture run in tests/fixtures/run-v1. Prints the cases per operation and every
5xx found; exit status 1 if any. tests/test_fuzz_api.py runs the same check with fewer examples.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fuzz(run, examples: int = 300, backend: str = "torch", seed: int = 0) -> dict:
    """{operation: (cases, [5xx descriptions], {status: count})} for every operation of the app's /openapi.json."""
    import schemathesis

    from fmnist.apps.serve.app import create_app

    app = create_app(run, backend=backend)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"host": "localhost"})
    results = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        results[f"{operation.method.upper()} {operation.path}"] = _fuzz_operation(operation, examples, seed)
    return results


def _fuzz_operation(operation, examples: int, seed: int) -> tuple[int, list[str], dict]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    failures, statuses = [], Counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy())
    def check(case):
        response = case.call(headers={"host": "localhost"})
        _keep_denormals()
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code} {case.method} {case.path}: {response.text[:200]}")

    _keep_denormals()
    check()
    return sum(statuses.values()), failures, dict(sorted(statuses.items()))


def _keep_denormals() -> None:
    """The server flushes denormal floats to zero in PyTorch (a process-wide CPU flag), and Hypothesis refuses
    to generate floats under it: the server and the generator share this process, so it is turned off again."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=str(ROOT / "tests" / "fixtures" / "run-v1"))
    p.add_argument("--examples", type=int, default=300, help="generated requests per operation")
    p.add_argument("--backend", default="torch")
    args = p.parse_args()
    start = time.perf_counter()
    results = fuzz(args.run, args.examples, args.backend)
    bad = 0
    for op, (cases, failures, statuses) in results.items():
        print(f"{op:26s} {cases:5d} cases, {len(failures)} server errors; statuses {statuses}")
        for f in failures[:5]:
            print("   ", f)
        bad += len(failures)
    total = sum(r[0] for r in results.values())
    print(f"{total} cases in {time.perf_counter() - start:.0f} s, {bad} server errors")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
