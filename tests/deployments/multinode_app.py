"""Run by test_multinode.py in a fresh process: a 3-node Ray cluster (head + 2 workers whose custom
resources stand for GPUs), the application deployed on it, and where each stage's replica landed.
Prints one JSON line: {stage: node_id} plus the head's node id."""
import json
import os
import sys
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"
if len(sys.argv) > 2:  # keep Ray's temp dir in the work area
    os.environ["RAY_TMPDIR"] = sys.argv[2]
    os.makedirs(sys.argv[2], exist_ok=True)


def main(config_json: str, temp_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster as RayCluster
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.config import ImagineConfig
    from cluster.launcher import Cluster, apply

    cfg = ImagineConfig.from_dict(json.loads(config_json))
    rc = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": cfg.cluster.dashboard_port})
    rc.add_node(num_cpus=2, resources={"accel_a": 2})
    rc.add_node(num_cpus=2, resources={"accel_b": 2})
    rc.wait_for_nodes()
    ray.init(address=rc.address)
    try:
        apply(Cluster(cfg, Path.cwd()), wait_s=400)
        details = ServeSubmissionClient(f"http://127.0.0.1:{cfg.cluster.dashboard_port}").get_serve_details()
        app = details["applications"][cfg.cluster.app_name]["deployments"]
        placed = {name: sorted({r["node_id"] for r in d["replicas"]}) for name, d in app.items()}
        print(json.dumps({"placed": placed, "head": rc.head_node.node_id}))
    finally:
        from ray import serve
        serve.shutdown()
        ray.shutdown()
        rc.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
