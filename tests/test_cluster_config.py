"""The shipped cluster YAMLs against Ray's own autoscaler schema and atp-ray's rules, offline;
the cluster verbs' early failures (no cloud is contacted)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from atp_ray.cluster import clusters, commands, prerequisites, verbs
from atp_ray.cluster import config as cc
from atp_ray.errors import ClusterError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "launch" / "gcp.yaml"}
# What a user must fill in, and nothing else (each has a comment above it in the YAML).
EXPECTED_PLACEHOLDERS = {
    "aws": {
        "available_node_types.head.node_config.ImageId",
        "available_node_types.gpu_worker.node_config.ImageId",
        "setup_commands[3]",  # the EFS file system to mount
    },
    "gcp": {"provider.project_id", "setup_commands[3]"},  # the Filestore instance to mount
}


def _config(provider: str) -> dict:
    return yaml.safe_load(CONFIGS[provider].read_text())


@pytest.mark.parametrize("provider", sorted(CONFIGS))
def test_shipped_config_passes_ray_schema_and_atp_rules(provider):
    config = _config(provider)
    assert config["provider"]["type"] == provider
    assert cc.ray_schema_problems(config) == []
    assert cc.atp_ray_problems(config) == []
    assert set(cc.placeholders(config)) == EXPECTED_PLACEHOLDERS[provider]


@pytest.mark.parametrize("provider", sorted(CONFIGS))
def test_shipped_config_invariants(provider):
    """The rules spelled out once more on the raw YAML, independent of the checker."""
    config = _config(provider)
    head = config["available_node_types"][config["head_node_type"]]
    (worker,) = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"][cc.DRIVER_RESOURCE] >= 1
    assert worker["min_workers"] == 0 and worker["resources"]["GPU"] >= 2
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert not any("0.0.0.0" in c or "dashboard-port" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    storage = config["metadata"]["atp_ray"]["storage"]
    assert storage.startswith("/") and "mount -t nfs" in config["setup_commands"][3]
    assert config["setup_commands"][3].rstrip().endswith(f"sudo chown ubuntu {storage}")
    setup = config["setup_commands"]
    assert (
        setup.index("cd ~/atp-ray && PYTHON=python3.11 ATP_RAY_VENV=~/atp-venv bash scripts/bootstrap.sh") >= 0
    )  # torch first, then the lock, then the package
    assert config["file_mounts"]["~/atp-ray"] == "."
    assert any("HF_HOME=$HOME/hf-cache" in c for c in setup)
    disk = (
        head["node_config"].get("BlockDeviceMappings", [{}])[0].get("Ebs", {}).get("VolumeSize")
        or (worker["node_config"]["disks"][0]["initializeParams"]["diskSizeGb"])
    )
    assert disk >= 200
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert rule.get("FromPort") == 22 or not rule.get("IpRanges"), rule


def test_bootstrap_installs_torch_then_the_lock_then_the_package():
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    torch = script.index('pip install "torch==')
    lock = script.index("pip install --no-deps --require-hashes -r requirements.lock")
    assert torch < lock < script.index("pip install --no-deps --no-build-isolation -e .") < script.index("pip check 2>&1")


def _broken(mutate) -> list[str]:
    config = copy.deepcopy(_config("aws"))
    mutate(config)
    return cc.ray_schema_problems(config) + cc.atp_ray_problems(config)


def _set_head_start(config, old, new):
    config["head_start_ray_commands"][-1] = config["head_start_ray_commands"][-1].replace(old, new)


BREAKAGES = {
    "public dashboard": (
        lambda c: _set_head_start(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "127.0.0.1",
    ),
    "no token auth": (lambda c: _set_head_start(c, "RAY_AUTH_MODE=token ", ""), "RAY_AUTH_MODE=token"),
    "token not copied": (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "auth_token"),
    "head with GPUs": (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1), "head trains nothing"),
    "no driver resource": (
        lambda c: c["available_node_types"]["head"]["resources"].pop(cc.DRIVER_RESOURCE),
        "search_driver",
    ),
    "GPUs always on": (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=1), "min_workers"),
    "single GPU workers": (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=1), "multi-GPU"),
    "local storage": (lambda c: c["metadata"]["atp_ray"].update(storage="runs/experiments"), "shared storage"),
    "world-open port": (
        lambda c: c["provider"]["security_group"]["IpPermissions"].append(
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ),
        "only SSH",
    ),
    "project not installed": (lambda c: c["setup_commands"].pop(1), "bootstrap.sh"),
    "not the locked Python": (
        lambda c: c["setup_commands"].__setitem__(1, c["setup_commands"][1].replace("PYTHON=python3.11 ", "")),
        "PYTHON=python3.11",
    ),
    "no CUDA check on GPU nodes": (lambda c: c.update(worker_setup_commands=[]), "torch.cuda.is_available()"),
    "no HF_HOME": (lambda c: c["setup_commands"].pop(2), "HF_HOME"),
    "storage not mounted": (lambda c: c["setup_commands"].pop(3), "must mount the shared file system"),
    "bucket of another cloud": (lambda c: c["metadata"]["atp_ray"].update(storage="gs://b/x"), "s3://"),
    "unknown field": (lambda c: c.update(dashboard_port=8265), "ray schema"),
    "bad node type field": (lambda c: c["available_node_types"]["head"].update(gpus=0), "ray schema"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_broken_rule_is_reported(name):
    mutate, expected = BREAKAGES[name]
    problems = _broken(mutate)
    assert any(expected in p for p in problems), problems


def test_launch_refuses_placeholders_and_reports_every_problem(tmp_path):
    config = _config("aws")
    config["head_start_ray_commands"][-1] = config["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ClusterError) as err:
        cc.check_cluster_config(path, for_launch=True)
    message = str(err.value)
    assert "5 problem(s)" in message and "dashboard-host=127.0.0.1" in message
    assert all(p in message for p in EXPECTED_PLACEHOLDERS["aws"])
    cc.check_cluster_config(CONFIGS["aws"], for_launch=False)  # the shipped file is fine apart from them


def _filled(provider: str, tmp_path: Path) -> Path:
    text = CONFIGS[provider].read_text().replace("CHANGE-ME", "my-value")
    path = tmp_path / f"{provider}.yaml"
    path.write_text(text)
    return path


def test_cloud_cluster_refuses_a_local_experiment_path(tmp_path):
    cluster = clusters.CloudCluster.open(_filled("aws", tmp_path))
    assert cluster.default_experiment_root() == "/mnt/atp-ray/experiments"
    cluster.check_shared("/mnt/atp-ray/experiments/x")
    with pytest.raises(ClusterError, match="local path, but the cluster has several nodes"):
        verbs.submit_search(cluster, ROOT / "tests" / "cluster_job.py", out="/home/me/runs/x")
    with pytest.raises(ClusterError, match="several nodes"):
        verbs.resume_search(cluster, "runs/x")


def test_experiment_names_resolve_under_the_storage(tmp_path):
    cluster = clusters.CloudCluster.open(_filled("gcp", tmp_path))
    assert verbs._experiment_dir(cluster, "demo-1") == "/mnt/atp-ray/experiments/demo-1"
    assert verbs._experiment_dir(cluster, "/mnt/atp-ray/experiments/x") == "/mnt/atp-ray/experiments/x"


def test_job_commands_are_atp_ray_search_resume_report_export():
    c = commands.JobCommands()
    assert c.search("search_spaces/demo.yaml", "/mnt/atp-ray/experiments/e", 8, ["search.metric=x"]) == [
        "atp-ray",
        "search",
        "--space",
        "search_spaces/demo.yaml",
        "--out",
        "/mnt/atp-ray/experiments/e",
        "--trials",
        "8",
        "search.metric=x",
    ]
    assert c.resume("/mnt/atp-ray/experiments/e", True) == [
        "atp-ray",
        "resume",
        "/mnt/atp-ray/experiments/e",
        "--retry-failed",
    ]
    assert c.report("/mnt/atp-ray/experiments/e") == ["atp-ray", "report", "/mnt/atp-ray/experiments/e"]
    assert c.export("/mnt/atp-ray/experiments/e", "t1", "/tmp/m") == [
        "atp-ray",
        "export",
        "/mnt/atp-ray/experiments/e",
        "--trial",
        "t1",
        "--out",
        "/tmp/m",
    ]


def test_missing_prerequisites_fail_early(tmp_path, monkeypatch):
    with pytest.raises(ClusterError, match="cluster config not found"):
        verbs.cloud_up(tmp_path / "nope.yaml")
    if importlib.util.find_spec("boto3") is None:
        with pytest.raises(ClusterError, match="needs boto3"):
            prerequisites.require_cloud_credentials("aws")
    else:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(ClusterError, match="no AWS credentials"):
            prerequisites.require_cloud_credentials("aws")
    with pytest.raises(ClusterError, match="provider gcp"):  # no client library or no credentials here
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
        prerequisites.require_cloud_credentials("gcp")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match="`ray` command is not installed"):
        prerequisites.ray_cli()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ClusterError, match="needs the dashboard"):
        prerequisites.require_job_api()


def test_cli_reports_a_missing_config_with_exit_code_2(tmp_path, capsys):
    from atp_ray.cli import main

    assert main(["cluster", "up", "--cluster", str(tmp_path / "nope.yaml")]) == 2
    assert "atp-ray cluster: error: cluster config not found" in capsys.readouterr().err


def test_submit_to_a_cloud_cluster_that_is_not_up_fails_clearly(tmp_path):
    """The real `ray dashboard` port-forward is tried and gives up (no cloud here); about 10 s."""
    cluster = clusters.CloudCluster.open(_filled("aws", tmp_path))
    with pytest.raises(ClusterError, match="cannot reach the head's dashboard"):
        verbs.submit_search(cluster, ROOT / "tests" / "cluster_job.py", out="/mnt/atp-ray/experiments/x")
