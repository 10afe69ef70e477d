"""deploy/grafana/splitserve-dashboard.json against the metrics the server exports.

The names come from live registries of splitserve.router.metrics: `/metrics` serves the text of
each metrics class there (the router's `RouterMetrics`, and the front doors' counters), so
every class of that module with a ``render`` method is built and its registry read. A renamed
or removed metric fails here rather than leaving an empty panel; a metric the dashboard does not
show yet fails too, with the panel to add named.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from deploy_helpers import DASHBOARD, exposed_metric_names, metric_names_in


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    """Series name -> metric family, for everything the server's /metrics can expose."""
    import inspect

    from splitserve.router import metrics

    classes = [cls for _, cls in inspect.getmembers(metrics, inspect.isclass)
               if cls.__module__ == metrics.__name__ and hasattr(cls, "render")]
    assert "RouterMetrics" in {cls.__name__ for cls in classes}
    names: dict[str, str] = {}
    for cls in classes:
        names.update(exposed_metric_names(cls().registry))
    return names


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # the panels of a collapsed row


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL the dashboard runs: panel targets and template-variable queries."""
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        found.append(query.get("query", "") if isinstance(query, dict) else "")
    return [q for q in found if q]


def unknown_metrics(dashboard: dict[str, Any], exported: dict[str, str]) -> set[str]:
    return {name for q in queries(dashboard) for name in metric_names_in(q)} - set(exported)


def test_every_query_reads_an_exported_metric(dashboard, exported):
    assert all(metric_names_in(q) for q in queries(dashboard) if "label_values" not in q)
    assert unknown_metrics(dashboard, exported) == set()


def test_every_exported_metric_has_a_panel(dashboard, exported):
    shown = {exported[name] for q in queries(dashboard) for name in metric_names_in(q) if name in exported}
    missing = set(exported.values()) - shown
    assert not missing, f"add a panel to {DASHBOARD.name} for: {sorted(missing)}"


def test_dashboard_structure(dashboard):
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    datasource = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert [v["query"] for v in datasource] == ["prometheus"], "the importer chooses a Prometheus source"
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_a_misspelt_metric_is_caught(dashboard, exported):
    broken = json.loads(json.dumps(dashboard))
    target = next(t for p in panels(broken) for t in p.get("targets", []))
    target["expr"] = "sum(rate(splitserve:prompt_token_total[5m]))"
    assert unknown_metrics(broken, exported) == {"splitserve:prompt_token_total"}
