"""How Tandem starts processes, the same for `tandem infra`, `tandem serve` and the container
entrypoint: the NATS and etcd command lines, the supervisord config, which GPUs each
replica gets, free ports and stopping by PID. Standard library only: the entrypoint
imports it before anything else runs.
"""
