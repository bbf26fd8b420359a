"""cluster.yaml against Ray's own cluster-launcher schema."""

import shlex
from pathlib import Path

import pytest
import yaml

from protein_ray.serve_settings import HIGH_THROUGHPUT_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(cluster_config)
    prepared = prepare_config(cluster_config)  # fills Ray's AWS defaults the way `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_workers_scale_from_zero_with_bounds(cluster_config):
    types = cluster_config["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if name != cluster_config["head_node_type"]}
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert sum(t["max_workers"] for t in gpu_types.values()) >= cluster_config["max_workers"] > 0
    assert types[cluster_config["head_node_type"]]["resources"].get("GPU") == 0


def test_no_credentials_in_cluster_yaml():
    text = (ROOT / "cluster.yaml").read_text()
    for secret_marker in ("aws_access_key_id", "aws_secret_access_key", "AKIA"):
        assert secret_marker.lower() not in text.lower()


def test_a_broken_config_is_rejected(cluster_config):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = dict(cluster_config, max_workers="many")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_every_node_gets_this_project_and_rays_own_version(cluster_config):
    import ray

    # The checkout is synced to each node and installed there (so `serve deploy` can import it).
    (remote, local), = cluster_config["file_mounts"].items()
    assert (ROOT / local).resolve() == ROOT
    assert any("pip install" in c and remote in c for c in cluster_config["setup_commands"])
    assert cluster_config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_the_dashboard_listens_only_on_the_head_itself(cluster_config):
    """The dashboard submits jobs; it is reached through `ray dashboard cluster.yaml`
    (an SSH tunnel), never opened to the network."""
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


@pytest.mark.parametrize("commands", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_in_serves_high_throughput_mode(cluster_config, commands):
    [start] = [c for c in cluster_config[commands] if "ray start" in c]
    words = shlex.split(start.split(";")[-1])
    assignments = dict(word.split("=", 1) for word in words[:words.index("ray")])
    assert assignments == HIGH_THROUGHPUT_ENV
