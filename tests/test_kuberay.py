"""deploy/kuberay: every manifest against the KubeRay CRDs' OpenAPI schemas, offline."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay" / "crds"
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"{path} not present")
    crd = yaml.safe_load(path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def validate(manifest: dict) -> None:
    # Kubernetes' x-kubernetes-* extensions are unknown keywords to JSON Schema and ignored:
    # int-or-string fields carry anyOf [integer, string] next to them, which is what they mean.
    jsonschema.Draft7Validator(crd_schema(manifest["kind"])).validate(manifest)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kuberay_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayJob", "RayService")
    validate(manifest)


def test_a_broken_manifest_is_refused():
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-train.yaml").read_text())
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        validate(broken)
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_rayservice_runs_the_application_of_serve_config_yaml():
    from protein_ray.serve_settings import AppArgs

    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    for app in embedded + local:
        AppArgs.model_validate(app["args"])
        app["args"].pop("checkpoint", None)  # on the cluster it is an s3:// URI
    assert embedded == local


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-predict.yaml"])
def test_jobs_run_this_projects_entry_points_on_their_own_cluster(name):
    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / name).read_text())["spec"]
    words = job["entrypoint"].split()
    assert words[0] == "python" and (ROOT / words[1]).is_file()
    for flag, value in zip(words, words[1:]):
        if flag == "--config":
            assert (ROOT / value).is_file()
    assert job["shutdownAfterJobFinishes"] is True  # no standing cluster
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups)
    assert all(g["minReplicas"] == 0 for g in groups)  # GPU nodes only while the job runs


def test_rayservice_pods_start_ray_in_serves_high_throughput_mode():
    from protein_ray.serve_settings import HIGH_THROUGHPUT_ENV

    cluster = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for container in (c for group in groups for c in group["template"]["spec"]["containers"]):
        assert {e["name"]: e["value"] for e in container["env"]} == HIGH_THROUGHPUT_ENV, container["name"]
