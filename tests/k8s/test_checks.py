"""Configs that cannot work on the cluster are rejected before anything is rendered, naming the field and value."""
import pytest

from cluster import k8s
from cluster.config import DEPLOYMENT_NAMES, ConfigError, ImagineConfig
from tests.k8s.conftest import CONFIGS, load, variant


def _stage(name: str, **opts) -> dict:
    c, _ = load("production")
    d = c.stage(name).model_dump()
    d["ray_actor_options"] = {**d["ray_actor_options"], **opts}
    return {name: d}


def _group(**changes) -> list[dict]:
    _, kc = load("production")
    return [{**kc.worker_groups[0].model_dump(), **changes}]


@pytest.mark.parametrize("cfg_update, cluster_update, message", [
    ({}, {"worker_groups": _group(gpus=0)},
     "stages.text_encoder.ray_actor_options.num_gpus is 0.125, but no worker group has GPUs (worker groups: "
     "gpu-l4 (gpus 0)); add a group with gpus >= 1"),
    ({"stages": _stage("diffuser", resources={"accelerator_h100": 1})}, {},
     "stages.diffuser.ray_actor_options.resources needs accelerator_h100 (1), but no group provides it"),
    ({"stages": _stage("diffuser", num_cpus=16)}, {},
     "stages.diffuser: one replica needs {CPU: 16, GPU: 0.75}, but no node is that large"),
    ({"stages": {"diffuser": {**_stage("diffuser")["diffuser"],
                              "autoscaling": {"min_replicas": 1, "max_replicas": 5}}}}, {},
     "no room for diffuser replica 5 of 5 {CPU: 2, GPU: 0.75}"),
    ({"stages": {"upscaler": {**_stage("upscaler")["upscaler"], "model": "/opt/esrgan"}}}, {},
     "stages.upscaler loads the model folder /opt/esrgan, which is under no models[].path"),
    ({"api": {"auth": "required"}}, {"secrets": {"api_keys": None}},
     "api.auth is 'required' but no keys reach the pods"),
    ({"queue": {"redis_url": "redis://redis.example.internal:6379/2"}}, {},
     "queue.redis_url (redis://redis.example.internal:6379/2) is not the Redis that redis.mode 'statefulset' runs "
     "in the cluster; set it to redis://imagine-redis.imagine.svc:6379/2, or set redis.mode: external"),
    ({"queue": {"redis_url": "redis://imagine-redis.imagine.svc:6380/0"}}, {},
     "set it to redis://imagine-redis.imagine.svc:6379/0"),
    ({}, {"name": "imagine2"}, "queue.redis_url (redis://imagine-redis.imagine.svc:6379/0) is not the Redis"),
    ({"queue": {"redis_url": "redis://localhost:6379/0"}}, {"redis": {"mode": "external"}},
     "queue.redis_url (redis://localhost:6379/0) points at the pod itself"),
    ({"queue": {"local": {"enabled": True, "data_dir": "/tmp/r", "port": 6390}}}, {},
     "queue.local.enabled is true, but nothing starts a local Redis in Kubernetes"),
    ({"queue": {"password_env": "REDIS_PASSWORD"}}, {},
     "queue.password_env is 'REDIS_PASSWORD', a variable KubeRay sets itself in the head pod"),
    ({"queue": {"password_env": "IMAGINE_S3_SECRET_KEY"}}, {},
     "queue.password_env (IMAGINE_S3_SECRET_KEY) is also storage.secret_key_env"),
    ({"queue": {"password_file": ".imagine/redis-password"}}, {},
     "make them absolute or null: queue.password_file (.imagine/redis-password)"),
    ({"stages": {"job_runner": {**_stage("job_runner", num_cpus=16)["job_runner"]}}}, {},
     "stages.job_runner: one replica needs {CPU: 16}, but no node is that large"),
], ids=["gpu-stage-without-gpu-group", "missing-custom-resource", "replica-larger-than-any-node",
        "max-replicas-exceed-cluster", "model-without-source", "auth-without-keys", "redis-url-elsewhere",
        "redis-url-port", "redis-url-other-release", "external-redis-on-loopback", "local-redis",
        "password-env-kuberay-reserved", "password-env-shared", "password-file-relative", "job-runner-too-large"])
def test_broken_configs_are_rejected_with_the_values(cfg_update, cluster_update, message):
    cfg, cluster = variant("production", cfg_update, cluster_update)
    with pytest.raises(ConfigError, match="cannot render Kubernetes manifests") as e:
        k8s.render(cfg, cluster)
    assert message in str(e.value)


def test_the_local_config_is_rejected_listing_every_problem():
    with pytest.raises(ConfigError) as e:
        k8s.check(ImagineConfig(), load("production")[1])
    msg = str(e.value)
    for part in ("cluster.http_host is '127.0.0.1'", "storage.local.enabled is true",
                 "storage.endpoint_url (http://127.0.0.1:8333) points at the pod itself",
                 "cluster.temp_dir (.imagine/ray)", "storage.credentials_file (.imagine/s3-credentials.json)",
                 "api.api_keys_file (.imagine/api_keys)", "queue.password_file (.imagine/redis-password)",
                 "queue.local.data_dir (.imagine/redis)", "queue.local.enabled is true",
                 "queue.redis_url (redis://127.0.0.1:6390/0) is not the Redis that redis.mode 'statefulset' runs"):
        assert part in msg


@pytest.mark.parametrize("text, message", [
    ("worker_groups:\n  - {name: gpu, gpus: 1, min_replicas: 5, max_replicas: 2, replicas: 2}\n",
     "worker group 'gpu': min_replicas (5) must be <= max_replicas (2)"),
    ("worker_groups:\n  - {name: gpu, gpus: 1, min_replicas: 1, max_replicas: 2, replicas: 3}\n",
     "replicas (3) must be within min_replicas (1) and max_replicas (2)"),
    ("worker_group: []\n", "worker_group: unknown key"),
    ("models:\n  - {path: /models/a, volume: {claim_name: x}, s3: {uri: 's3://bkt/a'}}\n",
     "set exactly one of volume, s3, image"),
    ("models:\n  - {path: /models/a, s3: {uri: 'https://bkt/a'}}\n", "is not an S3 URI"),
    ("head: {cpu: '2', num_cpus: 4}\n", "num_cpus (4) must be <= the pod's cpu (2)"),
    ("head: {memory: 16GB}\n", "'16GB' is not a Kubernetes quantity"),
    ("redis: {mode: helm}\n", "redis.mode: Input should be 'statefulset' or 'external'"),
    ("redis: {storage_size: 10GB}\n", "redis.storage_size: '10GB' is not a Kubernetes quantity"),
    ("redis: {password: hunter2}\n", "redis.password: unknown key"),
])
def test_broken_cluster_configs_are_rejected(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"invalid cluster config in {path}") as e:
        k8s.K8sConfig.load(path)
    assert message in str(e.value)


def test_cli_rejects_before_writing(tmp_path, capsys):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(CONFIGS["production"][1].read_text().replace("gpus: 1", "gpus: 0"))
    out = tmp_path / "out"
    assert k8s.main(["render", str(CONFIGS["production"][0]), "--k8s", str(bad), "--out", str(out)]) == 2
    assert "no worker group has GPUs" in capsys.readouterr().err and not out.exists()
    # a queue that would not reach the in-cluster Redis: refused the same way, naming the field
    bad_cfg = tmp_path / "imagine.yaml"
    bad_cfg.write_text(CONFIGS["production"][0].read_text().replace("imagine-redis.imagine.svc", "127.0.0.1"))
    assert k8s.main(["render", str(bad_cfg), "--k8s", str(CONFIGS["production"][1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "queue.redis_url (redis://127.0.0.1:6379/0)" in err and "redis://imagine-redis.imagine.svc:6379/0" in err
    assert not out.exists()


def test_job_runner_is_placed_like_the_ingress_and_reads_no_model():
    assert set(k8s.MODEL_READS) == set(DEPLOYMENT_NAMES) and k8s.MODEL_READS["job_runner"] == ()
    for name, hosts in (("production", ["gpu-l4"]), ("small", ["head", "gpu-l4"])):  # a CPU stage: wherever it fits
        cfg, cluster = load(name)
        placed = k8s.check(cfg, cluster)
        assert placed["job_runner"] == placed["ingress"] == hosts
    # it loads no model, so a model folder of its own needs no source (and nothing is mounted for it)
    cfg, cluster = variant("production", {"stages": {"job_runner": {**_stage("job_runner")["job_runner"],
                                                                    "model": "/opt/unused"}}})
    k8s.check(cfg, cluster)
