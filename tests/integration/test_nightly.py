"""A nightly rehearsal: three nights of the same regression sweep against one registry.

Night 1 registers a champion. Night 2, same data and seeds, is no regression, and running
night 2 again (a retried CronJob) creates no duplicate run or model version. Night 3 with a
deliberately degraded configuration exits with the regression code and leaves the champion.
"""

from __future__ import annotations

import pytest

from .conftest import client, run_cli, runs_of, write_space

pytestmark = pytest.mark.integration

EXIT_REGRESSION = 3
NIGHTLY = {"space.method": "lora", "space.methods": {"lora": {"r": 4, "lora_alpha": 8}}, "search.seed": 7}


def test_nightly_rehearsal(cluster, tmp_path):
    c = client(cluster)
    space = write_space(tmp_path, "itest-nightly", **NIGHTLY)

    night1 = run_cli(cluster, space, "--nightly", "--night", "2026-11-01")
    assert night1.returncode == 0, night1.stdout + night1.stderr
    champion = c.get_model_version_by_alias("itest-nightly-adapter", "champion")

    night2 = run_cli(cluster, space, "--nightly", "--night", "2026-11-02")
    assert night2.returncode == 0, night2.stdout + night2.stderr
    parents, children = runs_of(cluster, "itest-nightly")
    versions = c.search_model_versions("name = 'itest-nightly-adapter'")
    assert len(parents) == 2 and len(children) == 2 and len(versions) == 2

    again = run_cli(cluster, space, "--nightly", "--night", "2026-11-02")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished" in again.stdout
    assert len(runs_of(cluster, "itest-nightly")[0]) == 2
    assert len(c.search_model_versions("name = 'itest-nightly-adapter'")) == 2

    degraded = write_space(tmp_path, "itest-nightly", **{**NIGHTLY, "space.learning_rate": 1.0e-7})
    night3 = run_cli(cluster, degraded, "--nightly", "--night", "2026-11-03")
    assert night3.returncode == EXIT_REGRESSION, night3.stdout + night3.stderr
    now = c.get_model_version_by_alias("itest-nightly-adapter", "champion")
    assert int(now.version) >= int(champion.version) and now.tags["gate"] == "promoted"
    latest = max(runs_of(cluster, "itest-nightly")[0], key=lambda r: r.info.start_time)
    assert latest.data.tags["registry.gate"] == "regression"
    reports = {a.path for a in c.list_artifacts(latest.info.run_id, "report")}
    assert {"report/report.md", "report/best_curve_per_method.png", "report/winner_vs_champion.png"} <= reports
