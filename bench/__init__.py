"""`imagine bench`: throughput and latency of four ways to run the same model on this machine (issue 8).

    imagine bench --quick          # about 9 minutes on 2 CPU cores: every part, short windows
    imagine bench                  # the full run (about 25 minutes on 2 CPU cores)
    imagine bench --device cuda --model sd15-shaped --gpu-quick   # the GPU plan (about 7.5 min on one H200)

What runs and how (`imagine bench --help`): the in-process ceiling, then the reference design
(`reference.py`) and our graph with request-level (`request_level.py`) and step-level batching, deployed
in turn on one local Ray and S3, each driven over loopback HTTP in a closed loop (peak) and at open-loop
Poisson loads. What each number means: `report.DEFINITIONS` (also written into every report).

Not part of the product: bench imports pipeline/, cluster/ and deployments/, never the other way round
(`imagine bench` reaches it through `cluster.cli.EXTENSIONS`, by name). The modules:

    workload.py       the plan (QUICK, FULL), the request mix, Poisson arrivals, request bodies
    load.py           open- and closed-loop load generators and the clients of the served apps
    stats.py          percentiles, window throughput, CPU use by program (/proc), the Diffuser's counters
    ceiling.py        Pipeline.generate in this process at its best batch size
    serving.py        the local Ray + S3, deploying each served mode, measuring it
    report.py         summary, ratios, goals; the .json, .md and .png files
    cli.py            the `imagine bench` command
    reference.py      the reference app (Ray Serve's Stable Diffusion example design)
    request_level.py  the request-level batching baseline (a Diffuser batching whole requests)
    sd15.py           SD-1.5-shaped model folders with random weights (sd15-shaped, sd15-tiny) for the GPU plan

Importing bench's modules loads neither torch nor Ray (reference.py and request_level.py aside: they are
the deployments, loaded only when a served mode is deployed).
"""
