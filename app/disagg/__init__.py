"""Disaggregated prefill: a decode worker hands long prefills to a pool of PrefillWorkers.

- `decode`: the decode side, `RemotePrefill`: whether a request's prefill goes remote
  (`policy`), the queue job, and the one-shot slot the PrefillWorker's answer lands in.
- `prefill`: the prefill side, `PrefillJobs`: pulls jobs, prefills, answers, acks.
- `tunables`: the two live thresholds, `tandem disagg set|show|reset`.

The hand-off itself (the queue job, the answer, deadlines, redelivery) is the contract in
app/protocol/prefill.py.
"""
