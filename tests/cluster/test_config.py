"""ImagineConfig: loading, rejection with dotted paths, credentials, secrets, and the Serve config."""
import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from cluster.config import (
    DEPLOYMENT_NAMES,
    STAGES,
    ConfigError,
    ImagineConfig,
    render_serve_config_yaml,
    validate_serve_config,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-XYZ"


def test_defaults():
    cfg = ImagineConfig.load(None)
    assert cfg == ImagineConfig() == ImagineConfig.from_dict({})
    assert cfg.stages.diffuser.max_batch_size == 16 and cfg.stages.diffuser.max_ongoing_requests == 64
    assert cfg.stages.ingress.ray_actor_options.num_cpus == 0.5
    assert cfg.stages.publisher.ray_actor_options.num_cpus == 0.5
    assert cfg.storage.bucket == "imagine" and cfg.api.auth == "auto"
    assert set(STAGES) < set(DEPLOYMENT_NAMES) == set(type(cfg.stages).model_fields)


def test_import_pulls_in_no_ray_or_torch():
    code = "import sys, cluster.config; print(sorted(m for m in ('ray', 'torch', 'boto3') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_yaml_equals_defaults():
    assert ImagineConfig.load(ROOT / "imagine.example.yaml") == ImagineConfig()


def test_roundtrip_and_partial_actor_options(tmp_path):
    f = tmp_path / "imagine.yaml"
    f.write_text("stages:\n  ingress:\n    ray_actor_options: {resources: {edge: 1}}\n"
                 "  diffuser:\n    autoscaling: {min_replicas: 0, max_replicas: 4}\n")
    cfg = ImagineConfig.load(f)
    assert cfg.stages.ingress.ray_actor_options.num_cpus == 0.5  # the stage's default survives a partial mapping
    assert cfg.stages.diffuser.num_replicas is None and cfg.stages.diffuser.autoscaling.max_replicas == 4
    assert ImagineConfig.from_dict(cfg.model_dump()) == cfg
    assert cfg.model_for("diffuser") is None
    assert ImagineConfig.from_dict({"model": "m", "stages": {"upscaler": {"model": "u"}}}).model_for("upscaler") == "u"


def test_frozen():
    cfg = ImagineConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.stages.diffuser.max_batch_size = 3
    with pytest.raises(pydantic.ValidationError):
        cfg.model = "elsewhere"


@pytest.mark.parametrize("data, expected", [
    ({"modle": "x"}, "modle: unknown key (did you mean 'model'?)"),
    ({"stages": {"diffuser": {"max_batchsize": 8}}}, "stages.diffuser.max_batchsize: unknown key"),
    ({"stages": {"diffuser": {"max_batch_size": 0}}}, "stages.diffuser.max_batch_size: Input should be greater"),
    ({"stages": {"upscaler": {"num_replicas": -1}}}, "stages.upscaler.num_replicas: Input should be greater"),
    ({"stages": {"diffuser": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
     "stages.diffuser.autoscaling: min_replicas (3) must be <= max_replicas (2)"),
    ({"stages": {"diffuser": {"num_replicas": 2, "autoscaling": {"max_replicas": 4}}}},
     "stages.diffuser: set either num_replicas (2) or autoscaling"),
    ({"stages": {"diffuser": {"max_ongoing_requests": 8}}},
     "stages.diffuser: max_ongoing_requests (8) must be >= max_batch_size (16)"),
    ({"storage": {"bucket": "My_Bucket"}}, "storage.bucket: bucket 'My_Bucket' is not a valid S3 bucket name"),
    ({"stages": {"upscaler": {"ray_actor_options": {"num_gpus": 1.5}}}},
     "stages.upscaler.ray_actor_options.num_gpus: num_gpus (1.5) above 1 must be a whole number"),
    ({"stages": {"upscaler": {"device": "cpu", "ray_actor_options": {"num_gpus": 0.25}}}},
     "stages.upscaler: ray_actor_options.num_gpus (0.25) > 0 but device is 'cpu'"),
    ({"stages": {"ingress": {"max_queued_requests": 10}}}, "stages.ingress.max_queued_requests: the ingress queue"),
    ({"cluster": {"route_prefix": "api"}}, "cluster.route_prefix: route_prefix 'api' must start with '/'"),
    ({"monitoring": {"prometheus_port": 8000}},
     "cluster.http_port (8000) and monitoring.prometheus_port (8000) must differ"),
])
def test_rejected_with_dotted_path(data, expected):
    with pytest.raises(ConfigError) as e:
        ImagineConfig.from_dict(data)
    assert expected in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "imagine.yaml"
    f.write_text("stages:\n  diffuser:\n    max_batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"imagine\.yaml[\s\S]*stages\.diffuser\.max_batchsize"):
        ImagineConfig.load(f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ImagineConfig.load(f)
    with pytest.raises(ConfigError, match="cannot read"):
        ImagineConfig.load(tmp_path / "missing.yaml")


def test_credentials_from_env(monkeypatch):
    monkeypatch.setenv("IMAGINE_S3_ACCESS_KEY", "AKID")
    monkeypatch.setenv("IMAGINE_S3_SECRET_KEY", SECRET)
    access, secret = ImagineConfig().storage.credentials()
    assert (access, secret.get_secret_value()) == ("AKID", SECRET)
    assert SECRET not in repr(secret)


def test_credentials_from_file_and_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGINE_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("IMAGINE_S3_SECRET_KEY", raising=False)
    storage = ImagineConfig().storage
    with pytest.raises(ConfigError, match="IMAGINE_S3_ACCESS_KEY and IMAGINE_S3_SECRET_KEY.*s3-credentials.json"):
        storage.credentials(tmp_path)
    (tmp_path / ".imagine").mkdir()
    (tmp_path / ".imagine/s3-credentials.json").write_text(json.dumps({"access_key": "AK", "secret_key": SECRET}))
    access, secret = storage.credentials(tmp_path)
    assert (access, secret.get_secret_value()) == ("AK", SECRET)
    monkeypatch.setenv("IMAGINE_S3_ACCESS_KEY", "AKID")  # one of the two env vars is a mistake, not a fallback
    with pytest.raises(ConfigError, match="IMAGINE_S3_ACCESS_KEY is set but IMAGINE_S3_SECRET_KEY is not"):
        storage.credentials(tmp_path)


def test_secret_never_in_config_output(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGINE_S3_ACCESS_KEY", "AKID")
    monkeypatch.setenv("IMAGINE_S3_SECRET_KEY", SECRET)
    (tmp_path / "creds.json").write_text(json.dumps({"access_key": "AK", "secret_key": SECRET}))
    cfg = ImagineConfig.from_dict({"storage": {"credentials_file": str(tmp_path / "creds.json")}})
    cfg.storage.credentials()
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), json.dumps(cfg.serve_config()),
                 render_serve_config_yaml(cfg)):
        assert SECRET not in text


def test_api_keys_from_env_and_file(monkeypatch, tmp_path):
    (tmp_path / "keys").write_text("# operators\nkey-a\n\n  key-b  \n")
    api = ImagineConfig.from_dict({"api": {"api_keys_file": "keys"}}).api
    monkeypatch.setenv("IMAGINE_API_KEYS", "key-c, key-d,")
    assert api.load_api_keys(tmp_path) == {"key-a", "key-b", "key-c", "key-d"}
    monkeypatch.delenv("IMAGINE_API_KEYS")
    assert api.load_api_keys(tmp_path / "nowhere") == set()
    assert api.auth_enabled()  # with or without keys: no keys means no access (fail closed)
    assert not ImagineConfig.from_dict({"api": {"auth": "disabled"}}).api.auth_enabled()


def test_serve_config_matches_serve_schema(tmp_path):
    cfg = ImagineConfig.from_dict({"stages": {
        "text_encoder": {"ray_actor_options": {"num_gpus": 0.25}},
        "diffuser": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2},
                     "ray_actor_options": {"num_gpus": 0.5, "memory_bytes": 2**30}},
        "upscaler": {"num_replicas": 2, "tile": 128, "max_queued_requests": 16,
                     "ray_actor_options": {"num_gpus": 0.25, "resources": {"gpu_node": 1}}}}})
    d = cfg.serve_config()
    validate_serve_config(d)
    app = d["applications"][0]
    assert app["import_path"] == "deployments.app:build_app_from_args"
    # replicas get the config without scaling settings (those reach Serve as deployment options,
    # applied in place); everything else round-trips
    replica_cfg = ImagineConfig.from_dict(app["args"]["config"])
    assert replica_cfg == ImagineConfig.from_dict(cfg.replica_view())
    assert replica_cfg.storage == cfg.storage and replica_cfg.stages.diffuser.ray_actor_options.num_gpus == 0.5
    assert "autoscaling" not in app["args"]["config"]["stages"]["diffuser"]
    assert "num_replicas" not in app["args"]["config"]["stages"]["upscaler"]
    deps = {dep["name"]: dep for dep in app["deployments"]}
    assert list(deps) == ["Ingress", "JobRunner", "TextEncoder", "Diffuser", "Upscaler", "Publisher"]
    assert deps["Ingress"]["max_queued_requests"] == 64
    assert deps["Ingress"]["user_config"] == {"max_queued_image_steps": 20000, "max_queued_image_steps_per_key": 8000}
    assert "max_queued_image_steps" not in app["args"]["config"]["queue"]  # in place, not a rebuild
    assert "max_queued_requests" not in deps["Diffuser"] and deps["Publisher"]["user_config"] == {"max_replicas": 1}
    assert "num_replicas" not in deps["Diffuser"]
    assert deps["Diffuser"]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0, "upscale_delay_s": 10.0,
        "downscale_delay_s": 60.0, "initial_replicas": 2}
    assert deps["Diffuser"]["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5, "memory": 2**30}
    assert deps["Diffuser"]["user_config"] == {"max_replicas": 4, "join": "every_step",
                                               "max_batch_size": 16, "batch_wait_timeout_s": 0.05}
    assert deps["Upscaler"]["num_replicas"] == 2 and deps["Upscaler"]["max_queued_requests"] == 16
    assert deps["Upscaler"]["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.25,
                                                     "resources": {"gpu_node": 1.0}}
    assert deps["Upscaler"]["user_config"] == {"max_replicas": 2, "tile": 128, "max_batch_size": 8,
                                               "batch_wait_timeout_s": 0.01}
    assert deps["TextEncoder"]["user_config"] == {"max_replicas": 1, "max_batch_size": 32,
                                                  "batch_wait_timeout_s": 0.01}
    assert render_serve_config_yaml(cfg).startswith("# Generated by `imagine serve-config`")
    # With the config's path, relative files are made absolute for replicas that run elsewhere.
    resolved = cfg.serve_config(tmp_path / "imagine.yaml")["applications"][0]["args"]["config"]
    assert resolved["storage"]["credentials_file"] == str(tmp_path / ".imagine/s3-credentials.json")


def test_serve_schema_rejects_what_serve_rejects():
    d = ImagineConfig().serve_config()
    d["applications"][0]["deployments"][2]["autoscaling_config"] = {"max_replicas": 2}  # beside num_replicas
    with pytest.raises(ConfigError, match="applications.0.deployments.2"):
        validate_serve_config(d)


def test_job_runner_autoscales_on_the_queue_without_a_secret_in_the_serve_config(tmp_path):
    cfg = ImagineConfig.from_dict({"stages": {"job_runner": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}},
                                   "queue": {"password_file": "secrets/redis"}})
    d = cfg.serve_config(tmp_path / "imagine.yaml")
    validate_serve_config(d)
    [runner] = [x for x in d["applications"][0]["deployments"] if x["name"] == "JobRunner"]
    policy = runner["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "deployments.queue:QueueAutoscalingPolicy"
    assert policy["policy_kwargs"]["password_file"] == str(tmp_path / "secrets" / "redis")  # resolved
    assert "@" not in policy["policy_kwargs"]["redis_url"]
    with pytest.raises(ConfigError, match="redis_url must not hold a password"):
        ImagineConfig.from_dict({"queue": {"redis_url": "redis://:hunter2@10.0.0.1:6379/0"}})


def test_api_keys_file_gives_each_key_a_tier(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGINE_API_KEYS", "imk_env")
    (tmp_path / "keys").write_text("# keys\nimk_a\nimk_b relax\n\nimk_c fast\n")
    api = ImagineConfig.from_dict({"api": {"api_keys_file": str(tmp_path / "keys")}}).api
    assert api.load_key_settings() == {"imk_env": None, "imk_a": None, "imk_b": "relax", "imk_c": "fast"}
    (tmp_path / "keys").write_text("imk_d slow\n")
    with pytest.raises(ConfigError, match="fast or relax"):
        api.load_key_settings()
