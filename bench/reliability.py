"""The load-and-fault scenario of tests/test_reliability.py, then crafted inputs and kills
(bench/hostile.py), run to write their figures to docs/reliability.md. Run it with `bench/run-reliability`."""

from __future__ import annotations

import os

import httpx
from common import ROOT, throwaway_home, write_report

XGB, LOGREG = "breast-cancer-xgb", "breast-cancer-logreg"


def main() -> None:
    home = throwaway_home()
    from fhe_bento.client import FHEClient
    from fhe_bento.modelkit.demo import import_trained, train
    from harness import loadfault
    from harness.devserver import Server

    models, data = train()
    import_trained(models)
    replicas = [Server(home / name, {"FHE_BENTO_KEY_STORE": (home / "keys").as_uri()}) for name in ("a", "b")]
    for server in replicas:
        server.start()
    try:
        clients = [FHEClient(replicas[0].url, cache_dir=home / f"owner{i}", progress=False) for i in range(3)]
        owners = [loadfault.Owner(keyed=c.model(XGB), keyless=c.model(LOGREG)) for c in clients]
        x = data.x_test[:8]
        outcome = loadfault.run(replicas, victim=replicas[1], owners=owners, x=x, rounds=6)
        lost = sum(
            httpx.head(f"{server.url}/v1/models/{model}/keys/{key_id}").status_code != 200
            for model, key_id in outcome.accepted_keys
            for server in replicas
        )
        wrong = sum(
            model.labels(model.decrypt(answer)[None, :])[0]
            != models[model.name].predict(x[row : row + 1], fhe="disable")[0]
            for model, row, answer in outcome.predictions
        )
    finally:
        for server in replicas:
            server.stop()
    import hostile

    report = loadfault.markdown(outcome, lost, wrong, os.cpu_count() or 1) + hostile.run(
        home, data.x_test, lambda name, rows: models[name].predict(rows, fhe="disable")
    )
    write_report(ROOT / "docs" / "reliability.md", report)
    print(report)


if __name__ == "__main__":
    main()
