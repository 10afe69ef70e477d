"""KV-cache transmission between prefill and decode groups (placeholder, filled by a later issue).

Will hold the cache-transmission service: handshake, block layout translation between different
(tp, pp) layouts on each side, transports (NCCL, gloo, CUDA IPC, same-process), deadlines and
metrics. Nothing is implemented here yet.
"""
